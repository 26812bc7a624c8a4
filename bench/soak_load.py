"""The soak's client load: an open-loop, seeded stream of mixed requests and the clients that send them.

Arrivals are Poisson (exponential gaps) at a fixed mean rate and never wait for answers, so a
node that slows down meets the same load, not a politer one. Every request is drawn from the
seed: its target node (most go to node 0, so node 0 queues and its peers steal all the time),
completion or chat, streamed or not, prompt length, output length, and whether the client
hangs up part-way through its stream (some before the first token, while the request is still
queued or leased, some after a few tokens, while it runs). Each client checks what it got:
the status, the stream's framing, the token count, and on the simulated engine every token id
(a hash of seed, prompt and position, the same wherever the request ran).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from p2psched.sim_engine import SimTokenizer, expected_tokens

SIM_VOCAB = 32000
_WORDS = ("the", "cluster", "steals", "queued", "work", "from", "its", "busiest", "peer", "and", "streams",
          "tokens", "back", "to", "origin", "node", "while", "client", "waits", "patiently")


@dataclass(frozen=True)
class LoadShape:
    """What the load looks like; every field a share or a size, drawn per request."""

    rate: float = 6.0  # requests per second, all nodes together
    hot_share: float = 0.85  # sent to node 0; the rest split evenly among the others
    stream_share: float = 0.6
    chat_share: float = 0.15
    hang_up_share: float = 0.15  # of streamed requests: the client goes away mid-stream
    prompt_median_chars: int = 120  # log-normal prompt length
    prompt_max_chars: int = 2000
    output_median_tokens: int = 48  # log-normal output length, with a heavy tail
    output_max_tokens: int = 400

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("rate must be > 0")
        for name in ("hot_share", "stream_share", "chat_share", "hang_up_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1]")


@dataclass(frozen=True)
class Arrival:
    index: int
    at: float  # seconds after the start of the load
    node: int
    kind: Literal["completion", "chat"]
    is_stream: bool
    hang_up_after: int | None  # tokens to read before hanging up; None = read to the end
    prompt: str
    max_tokens: int


def arrivals(shape: LoadShape, num_nodes: int, seconds: float, seed: int) -> Iterator[Arrival]:
    """The seeded schedule: Poisson arrival times in [0, seconds) and what each request is."""
    rng = random.Random(seed)
    at, index = 0.0, 0
    while True:
        at += rng.expovariate(shape.rate)
        if at >= seconds:
            return
        if num_nodes == 1 or rng.random() < shape.hot_share:
            node = 0
        else:
            node = 1 + rng.randrange(num_nodes - 1)
        kind: Literal["completion", "chat"] = "chat" if rng.random() < shape.chat_share else "completion"
        is_stream = rng.random() < shape.stream_share
        max_tokens = max(2, min(shape.output_max_tokens,
                                int(rng.lognormvariate(math.log(shape.output_median_tokens), 0.9))))
        hang_up_after = None
        if is_stream and rng.random() < shape.hang_up_share:
            # a third hang up before any token (queued or leased), the rest while it runs
            hang_up_after = 0 if rng.random() < 1 / 3 else rng.randrange(1, max_tokens)
        num_chars = max(8, min(shape.prompt_max_chars,
                               int(rng.lognormvariate(math.log(shape.prompt_median_chars), 1.0))))
        words: list[str] = [f"soak request {index}:"]
        while sum(len(w) + 1 for w in words) < num_chars:
            words.append(rng.choice(_WORDS))
        yield Arrival(index, at, node, kind, is_stream, hang_up_after, " ".join(words)[:num_chars], max_tokens)
        index += 1


@dataclass
class ClientTally:
    """What the clients of one target node saw."""

    sent: int = 0
    completed: int = 0
    hung_up: int = 0  # deliberate: the client went away mid-stream
    errors: int = 0  # bad status, error chunk, broken stream, timeout, wrong tokens
    tokens: int = 0


@dataclass
class LoadResult:
    tallies: dict[str, ClientTally]
    done_at: list[float] = field(default_factory=list)  # seconds after start, per completed request
    ttft_s: list[float] = field(default_factory=list)  # per completed streamed request
    error_samples: list[str] = field(default_factory=list)  # the first few, for the report

    @property
    def in_flight(self) -> int:
        return sum(t.sent - t.completed - t.hung_up - t.errors for t in self.tallies.values())

    def error(self, tally: ClientTally, message: str) -> None:
        tally.errors += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(message)


class _HungUp(Exception):
    """The client went away on purpose."""


def _body(item: Arrival) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": item.max_tokens, "seed": item.index, "temperature": 0.8,
                            "ignore_eos": True, "return_token_ids": True, "stream": item.is_stream}
    if item.kind == "chat":
        body["messages"] = [{"role": "user", "content": item.prompt}]
    else:
        body["prompt"] = item.prompt
    return body


def _token_ids(choice: dict[str, Any]) -> list[int]:
    ids = choice.get("token_ids")
    return list(ids) if isinstance(ids, list) else []


async def _read_stream(resp: aiohttp.ClientResponse, item: Arrival, sent: float,
                       result: LoadResult) -> tuple[list[int], dict[str, Any]]:
    tokens: list[int] = []
    last: dict[str, Any] = {}
    is_done = False
    if item.hang_up_after == 0:
        resp.close()  # drop the connection: the node sees the client go when it next writes
        raise _HungUp
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            is_done = True
            break
        payload = json.loads(line[len("data: "):])
        if "error" in payload:
            raise RuntimeError(f"error chunk: {payload['error'].get('message')}")
        if payload.get("choices"):
            if not tokens:
                result.ttft_s.append(time.monotonic() - sent)
            tokens += _token_ids(payload["choices"][0])
            last = payload
        if item.hang_up_after is not None and len(tokens) >= item.hang_up_after:
            resp.close()
            raise _HungUp
    if not is_done:
        raise RuntimeError("stream ended without [DONE]")
    return tokens, last


async def send(session: aiohttp.ClientSession, url: str, item: Arrival, engine: str, start: float,
               result: LoadResult, tally: ClientTally) -> None:
    """One client: send the request, read the answer, check it, count the outcome."""
    tally.sent += 1
    route = "/v1/chat/completions" if item.kind == "chat" else "/v1/completions"
    sent = time.monotonic()
    try:
        async with session.post(url + route, json=_body(item)) as resp:
            if resp.status != 200:
                result.error(tally, f"#{item.index}: HTTP {resp.status}: {(await resp.text())[:200]}")
                return
            if item.is_stream:
                tokens, last = await _read_stream(resp, item, sent, result)
            else:
                last = await resp.json()
                tokens = _token_ids(last["choices"][0])
    except _HungUp:
        tally.hung_up += 1
        return
    except (TimeoutError, aiohttp.ClientError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        result.error(tally, f"#{item.index} ({item.kind}, stream={item.is_stream}): {type(exc).__name__}: {exc}")
        return
    problem = _check_tokens(item, engine, tokens)
    if problem:
        result.error(tally, f"#{item.index} ({item.kind}, served_by="
                            f"{last.get('p2psched', {}).get('served_by')}): {problem}")
        return
    tally.completed += 1
    tally.tokens += len(tokens)
    result.done_at.append(time.monotonic() - start)


def _check_tokens(item: Arrival, engine: str, tokens: list[int]) -> str | None:
    if len(tokens) != item.max_tokens:
        return f"{len(tokens)} tokens, expected {item.max_tokens}"
    if engine == "sim" and item.kind == "completion":
        expected = expected_tokens(item.index, SimTokenizer().encode(item.prompt), item.max_tokens, SIM_VOCAB)
        if tokens != expected:
            first = next(i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b)
            return f"token ids differ from the simulated engine's from position {first}"
    return None


async def drive(urls: list[str], shape: LoadShape, seconds: float, seed: int, engine: str,
                result: LoadResult, timeout_s: float = 300.0) -> None:
    """Send the whole schedule open-loop and wait for every client to finish."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session, \
            asyncio.TaskGroup() as group:
        start = time.monotonic()
        for item in arrivals(shape, len(urls), seconds, seed):
            delay = start + item.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            name = f"node{item.node}"
            group.create_task(send(session, urls[item.node], item, engine, start, result, result.tallies[name]),
                              name=f"client-{item.index}")
