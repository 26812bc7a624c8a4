"""The walls between the rooms: no import cycles, and the pure core imports no I/O.

Imports are read from the source (``ast``), module level and inside functions alike: a lazy
import is still a dependency, and a cycle through one is a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("p2psched", "server", "kernels")

# State machines and value types (p2psched/core/): tested without sockets, loops, Redis or torch.
IO = {"zmq", "asyncio", "aiohttp", "redis", "torch", "triton", "socket", "subprocess", "multiprocessing",
      "server", "kernels"}
# The engine's own settings live beside the engine (server/ never imports p2psched); the node's
# config nests them. These two leaves are plain dataclasses and exceptions, importing nothing else.
ENGINE_CONFIG_LEAVES = {"server.engine_config", "server.errors"}
# The HTTP surface and the metrics see the node only through p2psched.service.
SERVICE_USERS = {"p2psched.http_api", "p2psched.metrics", "p2psched.service"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from x import y`` counts y if it is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for module, path in modules.items():
        graph[module] = {m for m in _imports(path) if m in modules and m != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = _graph()
    assert "p2psched.node" in graph and "p2psched.http_api" in graph["p2psched.node"]
    assert _cycles(graph) == []


def test_http_and_metrics_see_the_node_only_through_the_service_interface():
    graph = _graph()
    for module in SERVICE_USERS:
        assert "p2psched.node" not in graph[module], module


def test_the_pure_core_imports_no_io():
    files = {_module_name(p): p for p in (ROOT / "p2psched" / "core").glob("*.py")}
    assert {"p2psched.core.scheduler", "p2psched.core.steals", "p2psched.core.protocol"} <= set(files)
    for module in sorted(files):
        imports = _imports(files[module])
        roots = {name.split(".")[0] for name in imports if name not in ENGINE_CONFIG_LEAVES
                 and name.rpartition(".")[0] not in ENGINE_CONFIG_LEAVES}
        assert not roots & IO, f"{module} imports {sorted(roots & IO)}"
        # nor anything of the node's I/O shell: only the core and the package's version
        shell = {m for m in imports if m.startswith("p2psched") and not m.startswith("p2psched.core")
                 and m not in ("p2psched", "p2psched.PROTOCOL_VERSION")}
        assert not shell, f"{module} imports {sorted(shell)}"


def test_the_engine_config_leaves_import_nothing_but_each_other():
    for module in ENGINE_CONFIG_LEAVES:
        path = ROOT / (module.replace(".", "/") + ".py")
        project = {m for m in _imports(path) if m.split(".")[0] in {"server", "kernels", "p2psched", "torch"}}
        assert {m.rpartition(".")[0] if m.rpartition(".")[0] in ENGINE_CONFIG_LEAVES else m
                for m in project} <= ENGINE_CONFIG_LEAVES, f"{module} imports {sorted(project)}"

