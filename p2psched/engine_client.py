"""The node's handle on its engine process (``engine_core.py``).

``start()`` spawns the process and waits for its first word (the model loads there; progress is
logged while it does). ``open()`` binds the two IPC sockets on the node's event loop. Adds and
aborts made during one turn of the loop leave as one message; every step's outputs come back as
one message, and steps that arrived together are merged per request before the node sees them
(a node that falls behind its engine then does less work per token, not more). The engine's
stats arrive with its outputs: nothing here reads engine state.

If the process dies, ``stopped`` is set with ``failure`` saying how: the node fails its requests,
deregisters and exits non-zero.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import msgspec
import zmq
import zmq.asyncio

from . import engine_core
from .core.config import NodeConfig
from .core.engine import (
    Commands,
    EngineLimits,
    EngineOutput,
    EngineRequest,
    EngineStats,
    Ready,
    StartFailed,
    Step,
)
from .core.protocol import FinishReason

log = logging.getLogger(__name__)

START_PROGRESS_S = 10.0  # log "still loading" this often while the engine starts
STOP_WAIT_S = 10.0

OutputsCallback = Callable[[list[EngineOutput], float], None]


class EngineStartError(Exception):
    """The engine process could not start; ``is_config_error``: a bad flag or model (exit 2)."""

    def __init__(self, message: str, is_config_error: bool):
        super().__init__(message)
        self.is_config_error = is_config_error


class EngineDied(Exception):
    pass


class EngineClient:
    def __init__(self, config: NodeConfig):
        self._config = config
        self._dir = ""
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._ready: Ready | None = None
        self._commands: zmq.asyncio.Socket | None = None
        self._steps: zmq.asyncio.Socket | None = None
        self._on_outputs: OutputsCallback | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ops: list[EngineRequest | str] = []
        self._stall_s = 0.0
        self._flush_scheduled = False
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(Step).decode
        self._commands_sent = 0
        # Since when the engine has owed us a step: None while it is idle and has seen all we sent.
        self._waiting_since: float | None = None
        self._is_stopping = False
        self.stats = EngineStats()
        self.failure: BaseException | None = None
        self.stopped = asyncio.Event()

    # ---- start and stop ----

    def start(self) -> Ready:
        """Spawn the engine process and wait until its engine is built (blocking: before the loop).
        Whatever stops the wait (a failed start, Ctrl-C while the model loads) kills the process."""
        self._dir = tempfile.mkdtemp(prefix="p2ps-engine-")
        mp = multiprocessing.get_context("spawn")
        receiver, sender = mp.Pipe(duplex=False)
        # The engine ignores SIGTERM and SIGINT (the node drains first, then stops it), so
        # multiprocessing's exit handler, which terminates daemonic children and joins them,
        # would wait on it forever: the atexit hook below kills it first on any exit path that
        # skipped close() (atexit runs hooks last-registered first).
        self._proc = mp.Process(target=engine_core.main, name="p2psched-engine", daemon=True,
                                args=(self._config, self.commands_addr, self.steps_addr, sender,
                                      logging.getLogger().getEffectiveLevel()))
        self._proc.start()
        atexit.register(self.kill)
        sender.close()
        try:
            first = self._wait_for_first_word(receiver)
        except BaseException:
            self.kill()
            raise
        finally:
            receiver.close()
        self._ready = first
        self.stats = first.stats
        return first

    def _wait_for_first_word(self, receiver: Connection) -> Ready:
        assert self._proc is not None
        started = time.monotonic()
        while not receiver.poll(START_PROGRESS_S):
            if not self._proc.is_alive():
                break
            log.info("engine still starting (%.0f s; loading the model)", time.monotonic() - started)
        try:
            first = receiver.recv()
        except EOFError:
            self._proc.join(5)
            raise EngineStartError(f"the engine process exited during start (code {self._proc.exitcode})",
                                   False) from None
        if isinstance(first, StartFailed):
            self._proc.join(10)
            raise EngineStartError(first.message, first.is_config_error)
        assert isinstance(first, Ready)
        took = time.monotonic() - started
        log.log(logging.INFO if took > START_PROGRESS_S / 5 else logging.DEBUG,  # a quick start says nothing
                "engine process %d ready in %.1f s: model %s", self._proc.pid, took, first.model_id)
        return first

    @property
    def commands_addr(self) -> str:
        return f"ipc://{self._dir}/commands"

    @property
    def steps_addr(self) -> str:
        return f"ipc://{self._dir}/steps"

    @property
    def ready(self) -> Ready:
        assert self._ready is not None, "start() first"
        return self._ready

    @property
    def model_id(self) -> str:
        return self.ready.model_id

    @property
    def limits(self) -> EngineLimits:
        return self.ready.limits

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def open(self, ctx: zmq.asyncio.Context, on_outputs: OutputsCallback) -> None:
        """Bind the IPC sockets (on the running loop); ``read_steps()`` then delivers the steps."""
        assert self._proc is not None, "start() first"
        self._loop = asyncio.get_running_loop()
        self._on_outputs = on_outputs
        self._commands = ctx.socket(zmq.PUSH)
        self._steps = ctx.socket(zmq.PULL)
        for sock in (self._commands, self._steps):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        self._commands.bind(self.commands_addr)
        self._steps.bind(self.steps_addr)
        self._loop.add_reader(self._proc.sentinel, self._on_exit)

    def stop(self) -> None:
        """Ask the engine to finish its step and exit."""
        self._is_stopping = True
        if self._commands is not None:
            self._flush(stop=True)

    async def close(self) -> None:
        """Stop the engine process (killing it if it does not stop) and release everything."""
        proc = self._proc
        if proc is not None and self._commands is None:  # never opened: it never had work
            self.kill()
        elif proc is not None:
            if proc.is_alive():
                self.stop()
                try:
                    await asyncio.wait_for(self.stopped.wait(), STOP_WAIT_S)  # set when it exits
                except TimeoutError:
                    log.warning("engine process still in a step after %.0f s: killing it", STOP_WAIT_S)
            self.kill()
            if self._loop is not None:
                self._loop.remove_reader(proc.sentinel)
        for sock in (self._commands, self._steps):
            if sock is not None:
                sock.close(0)
        self._cleanup_dir()
        self.stopped.set()

    def kill(self) -> None:
        """Stop the engine process at once (the node could not be built around it, or is exiting)."""
        atexit.unregister(self.kill)
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _on_exit(self) -> None:
        assert self._proc is not None and self._loop is not None
        self._loop.remove_reader(self._proc.sentinel)
        self._proc.join(1)
        if not self._is_stopping:
            code = self._proc.exitcode
            self.failure = EngineDied(f"the engine process exited unexpectedly (code {code})")
            log.error("%s", self.failure)
        self.stopped.set()

    # ---- commands ----

    def add(self, request: EngineRequest) -> None:
        self._ops.append(request)
        self._schedule_flush()

    def abort(self, request_id: str) -> None:
        self._ops.append(request_id)
        self._schedule_flush()

    def stall(self, seconds: float) -> None:
        """Fault injection: the engine's next step hangs this long."""
        self._stall_s += seconds
        self._schedule_flush()

    def busy_for(self) -> float:
        """Seconds the engine has owed us a step (it has work, or commands it has not answered);
        0 when it is idle. Far longer than any normal step means the engine is stuck: its
        heartbeats must stop vouching for it, and it must not steal."""
        return 0.0 if self._waiting_since is None else time.monotonic() - self._waiting_since

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self, stop: bool = False) -> None:
        self._flush_scheduled = False
        if not (self._ops or self._stall_s or stop) or self._commands is None or self.failure is not None:
            return  # (a dead engine reads nothing: what the node does after it fails is not sent)
        message = Commands(self._ops, self._stall_s, stop)
        self._ops, self._stall_s = [], 0.0
        self._commands_sent += 1
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()
        self._commands.send(self._encode(message), copy=False)

    # ---- steps ----

    async def read_steps(self) -> None:
        """Deliver the engine's steps to ``on_outputs`` until cancelled (a task of the node's
        TaskGroup). Steps already waiting are merged per request into one call."""
        assert self._steps is not None, "open() first"
        steps = self._steps
        while True:
            frames = [await steps.recv(copy=False)]
            while True:
                try:
                    frames.append(await steps.recv(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
            self.deliver([self._decode(frame.buffer) for frame in frames])

    def deliver(self, steps: list[Step]) -> None:
        """One call of ``on_outputs`` for ``steps`` (in order): each request's new tokens joined,
        its last finish reason kept; the engine's stats and idleness from the last step."""
        last = steps[-1]
        self.stats = last.stats
        is_idle = last.stats.running == 0 and last.commands_seen == self._commands_sent
        self._waiting_since = None if is_idle else time.monotonic()
        busy_s = sum(step.busy_s for step in steps)
        outputs = steps[0].outputs if len(steps) == 1 else merge_outputs(steps)
        assert self._on_outputs is not None
        self._on_outputs(outputs, busy_s)


def merge_outputs(steps: list[Step]) -> list[EngineOutput]:
    """Every request's outputs over ``steps`` as one: token ids in order, the last finish reason
    (a request finishes once, in its last step). Linear in the tokens."""
    token_ids: dict[str, list[int]] = {}
    finish: dict[str, FinishReason | None] = {}
    for step in steps:
        for out in step.outputs:
            token_ids.setdefault(out.request_id, []).extend(out.new_token_ids)
            finish[out.request_id] = out.finish_reason
    return [EngineOutput(rid, ids, finish[rid]) for rid, ids in token_ids.items()]
