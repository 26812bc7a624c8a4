"""The engine core: the engine in its own process, stepping as fast as it can.

A busy loop with no asyncio and no HTTP (in the manner of vLLM's engine-core split): take every
command the node sent since the last step (adds, aborts; one message per node loop turn), run
one step, send one message with every request's new token ids and finish reasons, and the
engine's stats. Sends are queued to ZeroMQ's I/O thread, so the node's work on step N (text,
SSE, peers) overlaps the engine's step N+1, and the node's interpreter lock is not the engine's.

The node binds two IPC sockets and spawns this process (``engine_client.py``). The engine is
built here, from the node's config; its first word on the start pipe is ``Ready`` (model id,
limits, how to build the tokenizer) or ``StartFailed`` (a one-line reason). The process exits
when told to, when its parent is gone, or when a step raises (the node sees the exit and fails
its requests). It ignores SIGINT and SIGTERM: the node drains first, then stops it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from multiprocessing.connection import Connection

import msgspec
import zmq

from .core.config import NodeConfig
from .core.engine import Commands, Engine, StartFailed, Step
from .engine_factory import build_engine

log = logging.getLogger(__name__)

IDLE_POLL_MS = 200  # an idle engine wakes this often to notice a parent that died without a word


# ---- the process ----


def main(config: NodeConfig, commands_addr: str, steps_addr: str, start_pipe: Connection, log_level: int) -> None:
    """Entry point of the engine process (spawned; ``config`` arrives pickled)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s " + (config.node_name or "node") + " engine %(name)s: %(message)s")
    parent = os.getppid()
    try:
        engine, ready = build_engine(config)
    except BaseException as exc:
        from server.errors import ModelLoadError

        from .core.errors import ConfigError

        is_config = isinstance(exc, (ConfigError, ModelLoadError))
        if not is_config:
            log.exception("engine failed to start")
        start_pipe.send(StartFailed(str(exc) if is_config else f"{type(exc).__name__}: {exc}", is_config))
        start_pipe.close()
        sys.exit(2 if is_config else 1)
    ctx = zmq.Context(1)
    commands = ctx.socket(zmq.PULL)
    steps = ctx.socket(zmq.PUSH)
    for sock in (commands, steps):
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    commands.connect(commands_addr)
    steps.connect(steps_addr)
    try:
        start_pipe.send(ready)
        start_pipe.close()
        run(engine, commands, steps, config.min_step_ms / 1000, parent)
    except BrokenPipeError:  # the node died while the model loaded
        pass
    finally:
        commands.close(0)
        steps.close()  # lingers: the last outputs reach the node
        ctx.term()
        if os.getppid() != parent:  # the node was killed: nobody else removes the sockets' folder
            shutil.rmtree(os.path.dirname(commands_addr.removeprefix("ipc://")), ignore_errors=True)


def run(engine: Engine, commands: zmq.Socket[bytes], steps: zmq.Socket[bytes], min_step_s: float, parent: int) -> None:
    """Schedule -> run -> postprocess until told to stop; a step that raises ends the process."""
    decode = msgspec.msgpack.Decoder(Commands).decode
    encode = msgspec.msgpack.Encoder().encode
    stall_s = 0.0
    seen = 0
    while True:
        timeout = 0 if engine.has_work() else IDLE_POLL_MS
        changed = False
        while commands.poll(timeout):
            timeout, changed = 0, True
            message = decode(commands.recv(copy=False).buffer)
            seen += 1
            for op in message.ops:
                if isinstance(op, str):
                    engine.abort(op)
                else:
                    engine.add(op)
            stall_s += message.stall_s
            if message.stop:
                return
        if os.getppid() != parent:
            log.warning("the node process is gone: engine exits")
            return
        if engine.has_work():
            started = time.perf_counter()
            if stall_s:
                time.sleep(stall_s)  # a wedged accelerator, for the chaos suite
                stall_s = 0.0
            result = engine.step()
            busy_s = time.perf_counter() - started
            if busy_s < min_step_s:
                time.sleep(min_step_s - busy_s)
                busy_s = min_step_s
            frame = encode(Step(result.outputs, busy_s, result.stats, seen))
        elif changed:  # commands left the engine idle (aborts): say so, with its stats
            frame = encode(Step([], 0.0, engine.stats(), seen))
        else:
            continue
        while True:  # the node may be gone (killed): then nothing reads, and a blocking send never returns
            try:
                steps.send(frame, zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                if os.getppid() != parent:
                    log.warning("the node process is gone: engine exits")
                    return
                time.sleep(0.001)
