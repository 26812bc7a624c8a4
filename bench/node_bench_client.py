"""A load client for one node: N streamed completions sent at once from several processes.

Each client process opens its own aiohttp session, says it is ready, and waits for one shared
"go"; then every request it owns is sent at once. Spreading the streams over processes keeps
the client from being the bottleneck (one Python process parsing every chunk of 256 streams
would be). Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process),
so the parent measures the wall time from "go" to the last byte of the last stream.

Token counts come from each stream's final usage chunk (``stream_options.include_usage``);
only lines that may carry usage or an error are decoded, so the client spends little CPU per
token chunk on a machine it shares with the node.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import queue
import time
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as EventType
from typing import Any

import aiohttp


@dataclass
class StreamRecord:
    index: int
    started: float  # monotonic, when the request was sent
    status: int = 0  # HTTP status; 0 when the connection failed
    error: str = ""  # empty when the stream ended with usage and [DONE]
    first_chunk: float | None = None  # monotonic, the first chunk with a choice
    ended: float | None = None  # monotonic, the last byte
    completion_tokens: int = 0  # from the usage chunk
    num_chunks: int = 0  # chunks with a choice
    chunk_gaps_s: list[float] = field(default_factory=list)  # between consecutive choice chunks

    @property
    def is_ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_chunk is None else self.first_chunk - self.started


@dataclass(frozen=True)
class Job:
    """One request: the prompt as token ids (the same ids the engine-alone phase gets)."""

    index: int
    prompt_token_ids: list[int]
    max_tokens: int
    seed: int
    temperature: float


@dataclass
class LoadResult:
    go: float  # monotonic
    wall_s: float  # from go to the last byte of the last stream
    records: list[StreamRecord]
    client_cpu_s: float  # CPU time of all client processes from go to their last stream

    @property
    def ok(self) -> list[StreamRecord]:
        return [r for r in self.records if r.is_ok]

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.ok)


def _body(job: Job) -> dict[str, Any]:
    return {"prompt": job.prompt_token_ids, "max_tokens": job.max_tokens, "ignore_eos": True,
            "temperature": job.temperature, "seed": job.seed, "stream": True,
            "stream_options": {"include_usage": True}}


async def _stream_one(session: aiohttp.ClientSession, url: str, job: Job) -> StreamRecord:
    body = _body(job)
    record = StreamRecord(job.index, time.monotonic())
    last_chunk: float | None = None
    is_done = False
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            record.status = response.status
            if response.status != 200:
                record.error = (await response.text())[:300]
                return record
            async for raw in response.content:
                if not raw.startswith(b"data:"):
                    continue
                now = time.monotonic()
                payload = raw[5:].strip()
                if payload == b"[DONE]":
                    is_done = True
                    continue
                if b'"usage"' in payload or b'"error"' in payload:
                    obj = json.loads(payload)
                    if obj.get("error"):
                        record.error = str(obj["error"].get("message", obj["error"]))[:300]
                    if obj.get("usage"):
                        record.completion_tokens = int(obj["usage"]["completion_tokens"])
                    if not obj.get("choices"):
                        continue
                record.num_chunks += 1
                if last_chunk is None:
                    record.first_chunk = now
                else:
                    record.chunk_gaps_s.append(now - last_chunk)
                last_chunk = now
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    record.ended = time.monotonic()
    if not record.error and not is_done:
        record.error = "stream ended without [DONE]"
    elif not record.error and record.completion_tokens == 0:
        record.error = "no usage chunk"
    return record


async def _run_jobs(url: str, jobs: list[Job], go: EventType, ready: Queue[Any], timeout_s: float
                    ) -> tuple[list[StreamRecord], float]:
    """The records, and the CPU seconds this process spent on them."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        ready.put("ready")
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        cpu_started = time.process_time()
        records = list(await asyncio.gather(*(_stream_one(session, url, job) for job in jobs)))
        return records, time.process_time() - cpu_started


def _client_main(url: str, jobs: list[Job], go: EventType, ready: Queue[Any], results: Queue[Any],
                 timeout_s: float) -> None:
    results.put(asyncio.run(_run_jobs(url, jobs, go, ready, timeout_s)))


def run_load(url: str, jobs: list[Job], num_procs: int, timeout_s: float = 1800.0) -> LoadResult:
    """Send every job at once from ``num_procs`` processes (spawned: the parent may hold torch
    threads or a CUDA context); process start-up is not timed."""
    ctx = mp.get_context("spawn")
    num_procs = max(1, min(num_procs, len(jobs)))
    go, ready, results = ctx.Event(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_client_main, args=(url, jobs[k::num_procs], go, ready, results, timeout_s),
                         daemon=True) for k in range(num_procs)]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            _get_alive(ready, procs, 120.0)
        started = time.monotonic()
        go.set()
        replies = [_get_alive(results, procs, timeout_s + 60.0) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    records = sorted((r for mine, _ in replies for r in mine), key=lambda r: r.index)
    ends = [r.ended for r in records if r.ended is not None]
    return LoadResult(started, (max(ends) if ends else time.monotonic()) - started, records,
                      sum(cpu_s for _, cpu_s in replies))


def _get_alive(q: Queue[Any], procs: list[Any], timeout_s: float) -> Any:
    """``q.get()``, but fail instead of waiting forever when a client process died."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"client process exited with {dead[0].exitcode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"client processes silent for {timeout_s:.0f} s") from None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(result: LoadResult, max_tokens: int) -> dict[str, Any]:
    """The node-phase numbers: throughput from usage, TTFT and inter-chunk percentiles, failures."""
    ok = result.ok
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.chunk_gaps_s]
    tokens = result.completion_tokens
    failures = [r for r in result.records if not r.is_ok]
    return {
        "requests": len(result.records), "succeeded": len(ok), "failed": len(failures),
        "short": sum(1 for r in ok if r.completion_tokens != max_tokens),
        "failure_examples": [f"#{r.index}: status {r.status}: {r.error}" for r in failures[:3]],
        "wall_s": result.wall_s, "completion_tokens": tokens, "client_cpu_s": result.client_cpu_s,
        "tokens_per_s": tokens / result.wall_s if result.wall_s > 0 else 0.0,
        "chunks_per_token": sum(r.num_chunks for r in ok) / max(1, tokens),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "inter_chunk_p50_ms": _ms(percentile(gaps, 50)), "inter_chunk_p99_ms": _ms(percentile(gaps, 99)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds
