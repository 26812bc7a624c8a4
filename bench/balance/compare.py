"""``python -m bench.balance.compare DIR... --labels L... --out PNG``: the real runs of several
balance benches side by side (each DIR an ``--out`` of ``python -m bench``), p99 TTFT and mean
end-to-end latency per mode, as a PNG and a markdown table on stdout. Used for the same workload
on one host and across hosts at several round trips (``--netns-rtt-ms``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load(folder: Path) -> dict[str, Any]:
    modes: dict[str, Any] = json.loads((folder / "results.json").read_text())["modes"]
    return {mode: run["real"] for mode, run in modes.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.balance.compare", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="--out folders of python -m bench")
    parser.add_argument("--labels", nargs="+", required=True, help="one per run, e.g. 'one host' '1 ms'")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if len(args.labels) != len(args.runs):
        print(f"{parser.prog}: error: give one label per run", file=sys.stderr)
        return 2
    try:
        results = [load(folder) for folder in args.runs]
    except (OSError, ValueError, KeyError) as exc:
        print(f"{parser.prog}: error: cannot read a run's results.json: {exc}", file=sys.stderr)
        return 2
    modes = [mode for mode in results[0] if all(mode in r for r in results)]
    print("| mode | " + " | ".join(f"{label}: TTFT p99 s / E2EL mean s" for label in args.labels) + " |")
    print("|---|" + "---|" * len(args.labels))
    for mode in modes:
        cells = [f"{r[mode]['ttft']['p99']:.3f} / {r[mode]['e2el']['mean']:.3f}" for r in results]
        print(f"| {mode} | " + " | ".join(cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(results))]
        for ax, metric, stat in ((axes[0], "ttft", "p99"), (axes[1], "e2el", "mean")):
            ax.bar(xs, [r[mode][metric][stat] for r in results], width, label=mode)
    for ax, title in zip(axes, ("TTFT p99 (s)", "end-to-end latency, mean (s)"), strict=True):
        ax.set_xticks(range(len(results)), args.labels)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_yscale("log")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(modes))
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"written: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
