"""The OpenAI-compatible HTTP surface of a node (aiohttp, on the node's event loop).

    POST /v1/completions        text or token-id prompt; streaming (SSE) or not
    POST /v1/chat/completions   messages through the model's chat template
    GET  /v1/models             the model this node serves
    GET  /health                200 {"status": "ok"}; 503 {"status": "starting"} before the node is
                                registered and serving, {"status": "draining"} after SIGTERM
    GET  /stats                 counters and load, as JSON
    GET  /metrics               Prometheus text (also on --metrics-port)

Errors use OpenAI's error object with 400 (bad value), 404 (unknown model or route), 413 (body
too large), 422 (not the expected shape: missing field, wrong type), 429 (too many concurrent
requests on this node), 503 (queue full or shutting down; both with ``Retry-After``). Every
response body and the last stream chunk carry {"p2psched": {"origin", "served_by", "attempts"}}; so does
every stream chunk whose tokens came from another node than the chunk before (a steal or a resume).
A client that disconnects cancels its request wherever it runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web
from pydantic import ValidationError

from .containment import Containment
from .core.errors import RequestRejected
from .core.protocol import Sampling
from .core.scheduler import ClientEvent
from .metrics import CONTENT_TYPE, NodeMetrics
from .openai_schema import ChatRequest, CompletionRequest, _Sampling, error_response
from .service import Handle, NodeService

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_TOKENS = 16


def _errors_as_json(containment: Containment) -> Callable[..., Awaitable[web.StreamResponse]]:
    """aiohttp's own errors in OpenAI's format; anything else a handler raises is contained
    (counted in ``loop_errors["http"]``, logged once a minute) and answered 500 in that format."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            return error_response(exc.status, exc.reason or "error", kind)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug, not the client's fault: the node serves on
            containment.record("http", request.remote, exc)
            return error_response(500, "internal error while handling the request", "server_error",
                                  code="internal_error")

    return middleware


class _ClientGone(Exception):
    """The streaming client closed its connection while we wrote to it."""

    def __init__(self, response: web.StreamResponse):
        self.response = response


class Rejected(Exception):
    def __init__(self, response: web.Response):
        self.response = response


@dataclass
class Job:
    """One accepted request as the HTTP layer sees it."""

    kind: str  # "completion" or "chat"
    req: _Sampling
    prompt_ids: list[int]
    stop: list[str]
    handle: Handle
    created: int = field(default_factory=lambda: int(time.time()))
    num_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    held: ClientEvent | None = None  # read from the queue, not merged: the next to handle

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.handle.request_id


def _is_failure(event: ClientEvent) -> bool:
    return event.error is not None or event.finish_reason == "error"


async def _next_events(job: Job) -> ClientEvent:
    """The next event, merged with those already queued behind it: a stream that fell behind
    its engine catches up in fewer, larger chunks (one SSE chunk may carry several tokens, as
    OpenAI's may) instead of falling further behind. A failure is never merged into tokens (the
    tokens before it are sent first), nor are events from another server or attempt."""
    events = job.handle.events
    event, job.held = job.held or await events.get(), None
    if event.finish_reason is not None or _is_failure(event) or events.empty():
        return event
    token_ids = list(event.token_ids)
    while event.finish_reason is None and not events.empty():
        after = events.get_nowait()
        if _is_failure(after) or after.served_by != event.served_by or after.attempts != event.attempts:
            job.held = after
            break
        token_ids += after.token_ids
        event = after
    return ClientEvent(event.request_id, token_ids, event.finish_reason, None, event.served_by, event.attempts)


_json = msgspec.json.Encoder().encode


class HttpServer:
    def __init__(self, node: NodeService):
        self.node = node
        self.metrics = NodeMetrics(node)
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors_as_json(node.containment)])
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/stats", self.stats),
            web.get("/metrics", self.prometheus),
        ])
        self._runners: list[web.AppRunner] = []
        self._in_flight = 0

    async def start(self, host: str, port: int, public_host: str, metrics_port: int | None = None) -> str:
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runners.append(runner)
        if metrics_port is not None:
            metrics_app = web.Application()
            metrics_app.add_routes([web.get("/metrics", self.prometheus), web.get("/", self.prometheus)])
            metrics_runner = web.AppRunner(metrics_app, access_log=None)
            await metrics_runner.setup()
            await web.TCPSite(metrics_runner, host, metrics_port).start()
            self._runners.append(metrics_runner)
        bound = runner.addresses[0][1]
        return f"http://{public_host}:{bound}"

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    # ---- small endpoints ----

    async def health(self, request: web.Request) -> web.Response:
        if self.node.is_draining:
            return web.json_response({"status": "draining", "node": self.node.name}, status=503)
        if not self.node.ready.is_set():
            return web.json_response({"status": "starting", "node": self.node.name}, status=503)
        if self.node.is_engine_stalled:  # a load balancer's health check should route around it
            return web.json_response({"status": "engine_stalled", "node": self.node.name}, status=503)
        return web.json_response({"status": "ok", "node": self.node.name})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.node.snapshot().as_json())

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.node.model.name, "object": "model", "owned_by": "p2psched",
             "created": self.node.model.created, "root": self.node.model.model_id,
             "max_model_len": self.node.model.limits.max_model_len}]})

    # ---- the two generation endpoints ----

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        cap = self.node.max_concurrent_requests
        if cap and self._in_flight >= cap:
            return self._reject(error_response(429, f"this node already serves {cap} requests; retry later",
                                               "rate_limit_error", code="too_many_requests",
                                               headers={"Retry-After": "1"}))
        self._in_flight += 1
        try:
            try:
                job = await self._accept(request, kind)
            except Rejected as rejected:
                return self._reject(rejected.response)
            is_finished = False
            try:
                response = await (self._stream(request, job) if job.req.stream else self._collect(job))
                is_finished = True
                return response
            except _ClientGone as gone:  # it hung up while we wrote: a disconnect, not an error
                return gone.response
            finally:
                if is_finished:
                    self.node.done(job.handle.request_id)
                else:
                    self.node.cancel(job.handle.request_id)
                    self._log(job, "cancelled", job.handle.request.served_by, job.handle.request.attempts)
        finally:
            self._in_flight -= 1

    def _reject(self, response: web.Response) -> web.Response:
        self.node.note_rejected()
        return response

    async def _accept(self, request: web.Request, kind: str) -> Job:
        node = self.node
        try:
            body = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            raise Rejected(error_response(413, f"request body exceeds {MAX_BODY_BYTES} bytes")) from None
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested past Python's limit
            raise Rejected(error_response(400, "request body is not valid JSON")) from None
        if not isinstance(body, dict):
            raise Rejected(error_response(422, "request body must be a JSON object"))
        try:
            req: _Sampling = (ChatRequest if kind == "chat" else CompletionRequest).model_validate(body)
        except ValidationError as exc:
            first = max(exc.errors(), key=lambda e: len(e["loc"]))  # in a union, the branch that got furthest
            param = str(first["loc"][0]) if first["loc"] else None
            shape = first["type"] == "missing" or first["type"].endswith("_type") or first["type"] in (
                "model_attributes_type", "list_type", "union_tag_invalid")
            message = f"{param}: {first['msg']}" if param else first["msg"]
            raise Rejected(error_response(422 if shape else 400, message, param=param)) from None
        if req.model is not None and req.model not in (node.model.name, node.model.model_id):
            raise Rejected(error_response(404, f"model {req.model!r} does not exist; this node serves "
                                               f"{node.model.name!r}", param="model", code="model_not_found"))
        limits = node.model.limits
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if isinstance(req, ChatRequest):
            try:
                prompt_text = node.chat_template([m.as_template_input() for m in req.messages])
            except Exception as exc:  # the model's own template refused the conversation (jinja2 errors)
                raise Rejected(error_response(400, f"messages: {exc}", param="messages")) from None
            prompt_ids = node.tokenizer.encode(prompt_text)
            max_tokens = req.max_completion_tokens or req.max_tokens
            param = "messages"
        else:
            assert isinstance(req, CompletionRequest)
            prompt_ids = node.tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else req.prompt
            max_tokens = req.max_tokens
            param = "prompt"
        if not prompt_ids:
            raise Rejected(error_response(400, "prompt must not be empty", param=param))
        cap = node.model.max_tokens_cap
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS if kind == "completion" else \
                max(1, min(cap, limits.max_model_len - len(prompt_ids)))
        if max_tokens > cap:
            raise Rejected(error_response(400, f"max_tokens must be at most {cap}", param="max_tokens"))
        sampling = Sampling(max_tokens=max_tokens, seed=req.seed if req.seed is not None else random.getrandbits(63),
                            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                            ignore_eos=req.ignore_eos, stop_token_ids=list(req.stop_token_ids or []), stop=stop)
        try:
            handle = node.submit(prompt_ids, sampling)  # the engine's own limits: scheduler.submit
        except RequestRejected as exc:
            headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
            param_name = param if exc.param == "prompt" else exc.param
            raise Rejected(error_response(exc.status, str(exc), "server_error" if exc.status >= 500 else
                                          "invalid_request_error", param=param_name, code=exc.code,
                                          headers=headers)) from None
        return Job(kind, req, prompt_ids, stop, handle)

    # ---- responses ----

    def _observe(self, job: Job, event: ClientEvent) -> None:
        if not event.token_ids:
            return
        now = time.time()
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.ttft.observe(now - job.handle.request.arrival)
        elif job.last_token_at is not None:
            self.metrics.itl.observe(now - job.last_token_at)
        job.last_token_at = now
        job.num_tokens += len(event.token_ids)

    def _envelope(self, job: Job, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if job.kind == "chat" else "text_completion"
        return {"id": job.response_id, "object": kind, "created": job.created,
                "model": job.req.model or self.node.model.name}

    def _choice(self, job: Job, text: str, token_ids: list[int], finish: str | None, chunk: bool,
                first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if job.kind == "chat" and chunk:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        elif job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if job.req.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def _p2p(self, last: ClientEvent) -> dict[str, Any]:
        return {"origin": self.node.name, "served_by": last.served_by, "attempts": last.attempts}

    def _usage(self, job: Job) -> dict[str, int]:
        prompt = len(job.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": job.num_tokens, "total_tokens": prompt + job.num_tokens}

    def _failed(self, job: Job, event: ClientEvent) -> str | None:
        if not _is_failure(event):
            return None
        self._log(job, "failed", event.served_by, event.attempts)
        return f"request failed: {event.error or 'engine error'}"

    async def _collect(self, job: Job) -> web.Response:
        token_ids: list[int] = []
        text = self.node.text_stream(job.stop)
        parts: list[str] = []
        while True:
            event = await job.handle.events.get()
            self._observe(job, event)
            token_ids += event.token_ids
            parts.append(text.push(event.token_ids))
            failure = self._failed(job, event)
            if failure:
                return error_response(503, failure, "server_error", code="request_failed",
                                      headers={"Retry-After": "1"})
            if event.finish_reason is not None:
                break
        parts.append(text.flush())
        self._done(job, event)
        return web.json_response({
            **self._envelope(job, chunk=False),
            "choices": [self._choice(job, "".join(parts), token_ids, event.finish_reason, chunk=False)],
            "usage": self._usage(job), "p2psched": self._p2p(event)})

    async def _stream(self, request: web.Request, job: Job) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Request-Id": job.response_id})
        await response.prepare(request)
        try:
            await self._stream_events(response, job)
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError: the client closed
            raise _ClientGone(response) from None
        return response

    async def _stream_events(self, response: web.StreamResponse, job: Job) -> None:
        envelope = self._envelope(job, chunk=True)
        text = self.node.text_stream(job.stop)
        include_usage = job.req.stream_options is not None and job.req.stream_options.include_usage
        first = True
        served_by = ""

        async def send(payload: dict[str, Any]) -> None:
            await response.write(b"data: " + _json(payload) + b"\n\n")

        while True:
            event = await _next_events(job)
            self._observe(job, event)
            failure = self._failed(job, event)
            if failure:
                await send({"error": {"message": failure, "type": "server_error", "param": None,
                                      "code": "request_failed"}})
                break
            delta = text.push(event.token_ids) + (text.flush() if event.finish_reason is not None else "")
            chunk: dict[str, Any] = {**envelope, "choices": [
                self._choice(job, delta, event.token_ids, event.finish_reason, chunk=True, first=first)]}
            first = False
            if event.finish_reason is not None or event.served_by != served_by:
                chunk["p2psched"] = self._p2p(event)  # on the last chunk, and whenever the server changes
                served_by = event.served_by
            if event.finish_reason is not None:
                await send(chunk)
                if include_usage:
                    await send({**envelope, "choices": [], "usage": self._usage(job)})
                self._done(job, event)
                break
            await send(chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()

    def _done(self, job: Job, last: ClientEvent) -> None:
        self.metrics.e2e.observe(time.time() - job.handle.request.arrival)
        self._log(job, "completed", last.served_by, last.attempts)

    def _log(self, job: Job, outcome: str, served_by: str, attempts: int) -> None:
        log.info("request id=%s kind=%s outcome=%s origin=%s served_by=%s attempts=%d prompt_tokens=%d "
                 "tokens=%d latency_s=%.3f", job.handle.request_id, job.kind, outcome, self.node.name,
                 served_by or "-", attempts, len(job.prompt_ids), job.num_tokens,
                 time.time() - job.handle.request.arrival)
