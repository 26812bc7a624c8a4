"""The OpenAI-compatible HTTP surface of a node (aiohttp, on the node's event loop).

    POST /v1/completions   text or token-id prompt; streaming (SSE) or not
    GET  /v1/models        the model this node serves
    GET  /health           200 {"status": "ok"} or 503 {"status": "draining"}
    GET  /stats            counters and load, as JSON (tests, the demo, operators)

Errors use OpenAI's error object: {"error": {"message", "type", "param", "code"}}. Every
response body and the last stream chunk carry {"p2psched": {"origin", "served_by", "attempts"}}.
Extensions: ``top_k``, ``stop_token_ids``, ``ignore_eos`` and ``return_token_ids`` (adds the
generated token ids to each choice, as vLLM does).
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RequestRejected
from .node import Handle, Node
from .protocol import Sampling
from .scheduler import ClientEvent

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1
    seed: Annotated[int, Field(ge=0, le=(1 << 63) - 1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    n: Literal[1] = 1
    return_token_ids: bool = False


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or kind}}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return error_response(exc.status, exc.reason or "error", kind)


class HttpServer:
    def __init__(self, node: Node):
        self.node = node
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors_as_json])
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/stats", self.stats),
        ])
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, public_host: str) -> str:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        return f"http://{public_host}:{bound}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        if self.node.is_draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ok", "node": self.node.name})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.node.snapshot())

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.node.config.model_name, "object": "model", "owned_by": "p2psched",
             "created": int(self.node.started_at), "root": self.node.engine.model_id}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
        except (ValueError, UnicodeDecodeError):
            return error_response(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object")
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = str(first["loc"][0]) if first["loc"] else None
            return error_response(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)
        if req.model is not None and req.model not in (self.node.config.model_name, self.node.engine.model_id):
            return error_response(404, f"model {req.model!r} does not exist; this node serves "
                                       f"{self.node.config.model_name!r}", param="model", code="model_not_found")
        limits = self.node.engine.limits
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if stop and not limits.supports_stop_strings:
            return error_response(400, "stop strings are not supported by the simulated engine; "
                                       "use stop_token_ids", param="stop")
        if len(stop) > 16 or any(not s or len(s) > 256 for s in stop):
            return error_response(400, "stop: at most 16 strings of 1..256 characters", param="stop")
        prompt_ids = self.node.tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else req.prompt
        if not prompt_ids:
            return error_response(400, "prompt must not be empty", param="prompt")
        if max(prompt_ids) >= limits.vocab_size:
            return error_response(400, f"prompt token ids must be below the vocabulary size {limits.vocab_size}",
                                  param="prompt")
        if req.max_tokens > self.node.config.max_tokens_cap:
            return error_response(400, f"max_tokens must be at most {self.node.config.max_tokens_cap}",
                                  param="max_tokens")
        if len(prompt_ids) + req.max_tokens > limits.max_model_len:
            return error_response(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({req.max_tokens}) "
                                       f"exceed the context length {limits.max_model_len}",
                                  param="prompt", code="context_length_exceeded")
        sampling = Sampling(max_tokens=req.max_tokens,
                            seed=req.seed if req.seed is not None else random.getrandbits(63),
                            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                            ignore_eos=req.ignore_eos, stop_token_ids=list(req.stop_token_ids or []), stop=stop)
        try:
            handle = self.node.submit(prompt_ids, sampling)
        except RequestRejected as exc:
            headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
            return error_response(exc.status, str(exc), code=exc.code, headers=headers)
        is_finished = False
        try:
            if req.stream:
                response = await self._stream(request, req, handle, len(prompt_ids), stop)
            else:
                response = await self._collect(req, handle, len(prompt_ids), stop)
            is_finished = True
            return response
        finally:
            if is_finished:
                self.node.done(handle.request_id)
            else:
                self.node.cancel(handle.request_id)

    def _envelope(self, handle: Handle, req: CompletionRequest) -> dict[str, Any]:
        return {"id": f"cmpl-{handle.request_id}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or self.node.config.model_name}

    def _p2p(self, last: ClientEvent) -> dict[str, Any]:
        return {"origin": self.node.name, "served_by": last.served_by, "attempts": last.attempts}

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def _collect(self, req: CompletionRequest, handle: Handle, num_prompt: int,
                       stop: list[str]) -> web.Response:
        token_ids: list[int] = []
        text = self.node.text_stream(stop)
        parts: list[str] = []
        while True:
            event = await handle.events.get()
            token_ids += event.token_ids
            parts.append(text.push(event.token_ids))
            if event.error is not None or event.finish_reason == "error":
                return error_response(503, f"request failed: {event.error or 'engine error'}", "server_error",
                                      code="request_failed", headers={"Retry-After": "1"})
            if event.finish_reason is not None:
                break
        parts.append(text.flush())
        choice: dict[str, Any] = {"index": 0, "text": "".join(parts), "logprobs": None,
                                  "finish_reason": event.finish_reason}
        if req.return_token_ids:
            choice["token_ids"] = token_ids
        self._log_done(handle, event, len(token_ids))
        return web.json_response({**self._envelope(handle, req), "choices": [choice],
                                  "usage": self._usage(num_prompt, len(token_ids)), "p2psched": self._p2p(event)})

    async def _stream(self, request: web.Request, req: CompletionRequest, handle: Handle,
                      num_prompt: int, stop: list[str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        envelope = self._envelope(handle, req)
        num_tokens = 0
        text = self.node.text_stream(stop)

        async def send(payload: dict[str, Any]) -> None:
            await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

        while True:
            event = await handle.events.get()
            num_tokens += len(event.token_ids)
            if event.error is not None or event.finish_reason == "error":
                await send({"error": {"message": f"request failed: {event.error or 'engine error'}",
                                      "type": "server_error", "param": None, "code": "request_failed"}})
                break
            delta = text.push(event.token_ids) + (text.flush() if event.finish_reason is not None else "")
            choice: dict[str, Any] = {"index": 0, "text": delta,
                                      "logprobs": None, "finish_reason": event.finish_reason}
            if req.return_token_ids:
                choice["token_ids"] = event.token_ids
            chunk: dict[str, Any] = {**envelope, "choices": [choice]}
            if event.finish_reason is not None:
                chunk["p2psched"] = self._p2p(event)
                await send(chunk)
                if req.stream_options is not None and req.stream_options.include_usage:
                    await send({**envelope, "choices": [], "usage": self._usage(num_prompt, num_tokens)})
                self._log_done(handle, event, num_tokens)
                break
            await send(chunk)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _log_done(self, handle: Handle, last: ClientEvent, num_tokens: int) -> None:
        latency = time.time() - handle.request.arrival
        log.info("request id=%s origin=%s served_by=%s attempts=%d tokens=%d latency_s=%.3f",
                 handle.request_id, self.node.name, last.served_by, last.attempts, num_tokens, latency)
