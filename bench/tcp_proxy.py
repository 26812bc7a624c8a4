"""A small TCP forwarder with faults on demand: delay every chunk, cut every connection.

The chaos driver (``bench/chaos.py``) puts one ``LinkProxy`` in front of each ZeroMQ port of
each node: the node binds port X and advertises port PX, where the proxy listens and forwards
to X. Every peer connection into that node then crosses the proxy, so

- ``set_delay(ms)`` holds each chunk ``ms`` milliseconds before forwarding it, in both
  directions (order kept; a change applies to chunks read from then on);
- ``cut(seconds)`` resets every open connection and refuses new ones (accepted, then reset at
  once) until the time is up or ``heal()``; ZeroMQ reconnects by itself afterwards.

Proxies run on one asyncio loop in a daemon thread (``ProxyThread``), whose methods are safe to
call from any other thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Self

READ_BYTES = 65536


@dataclass
class ProxyCounters:
    accepted: int = 0  # connections forwarded
    refused: int = 0  # connections reset at once because the link was cut
    cut: int = 0  # open connections reset by ``cut``
    bytes_forwarded: int = 0


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Conn:
    writers: list[asyncio.StreamWriter]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class LinkProxy:
    """Listens on ``listen_port`` and forwards each connection to ``target_port``. Loop-bound:
    use it from its own event loop (``ProxyThread`` does)."""

    def __init__(self, name: str, listen_port: int, target_port: int, host: str = "127.0.0.1"):
        self.name = name
        self.host = host
        self.listen_port = listen_port
        self.target_port = target_port
        self.delay_ms = 0.0
        self.counters = ProxyCounters()
        self._cut_until = 0.0  # loop time
        self._conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None

    @property
    def is_cut(self) -> bool:
        return asyncio.get_running_loop().time() < self._cut_until

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.listen_port, reuse_address=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def set_delay(self, ms: float) -> None:
        if ms < 0:
            raise ValueError(f"delay must be >= 0 ms, got {ms}")
        self.delay_ms = ms

    def cut(self, seconds: float) -> None:
        """Reset every open connection; refuse new ones for ``seconds``."""
        self._cut_until = asyncio.get_running_loop().time() + seconds
        for conn in list(self._conns):
            conn.abort()
            self.counters.cut += 1
        self._conns.clear()

    def heal(self) -> None:
        self._cut_until = 0.0

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            self.counters.refused += 1
            client_writer.transport.abort()
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client_writer.transport.abort()  # the node is down: the dialer sees a reset and retries
            return
        if self.is_cut:  # cut while we dialled
            self.counters.refused += 1
            client_writer.transport.abort()
            target_writer.transport.abort()
            return
        self.counters.accepted += 1
        conn = _Conn([client_writer, target_writer])
        self._conns.add(conn)
        conn.tasks = [asyncio.create_task(self._pipe(client_reader, target_writer, conn)),
                      asyncio.create_task(self._pipe(target_reader, client_writer, conn))]
        await asyncio.gather(*conn.tasks, return_exceptions=True)
        self._conns.discard(conn)
        for writer in conn.writers:
            writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn) -> None:
        """Copy one direction; chunks wait ``delay_ms`` (as it was when read) in a FIFO. Either
        direction ending ends the connection (ZeroMQ never half-closes)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(READ_BYTES):
                    queue.put_nowait((loop.time() + self.delay_ms / 1000, data))
            except (ConnectionError, OSError):
                pass
            finally:
                queue.put_nowait(None)

        reading = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                release_at, data = item
                wait = release_at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                self.counters.bytes_forwarded += len(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            reading.cancel()
            for other in conn.tasks:
                if other is not asyncio.current_task():
                    other.cancel()


class ProxyThread:
    """An event loop in a daemon thread that hosts ``LinkProxy``s; controls by proxy name."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._proxies: dict[str, LinkProxy] = {}

    def start(self) -> Self:
        self._thread.start()
        return self

    def add(self, name: str, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        proxy = LinkProxy(name, listen_port, target_port, host)
        self._call(proxy.start())
        self._proxies[name] = proxy

    def names(self) -> list[str]:
        return list(self._proxies)

    def set_delay(self, name: str, ms: float) -> None:
        self._soon(self._proxies[name].set_delay, ms)

    def cut(self, name: str, seconds: float) -> None:
        self._soon(self._proxies[name].cut, seconds)

    def heal(self, name: str) -> None:
        self._soon(self._proxies[name].heal)

    def counters(self, name: str) -> ProxyCounters:
        counters = self._proxies[name].counters
        return ProxyCounters(counters.accepted, counters.refused, counters.cut, counters.bytes_forwarded)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        for proxy in self._proxies.values():
            with contextlib.suppress(Exception):
                self._call(proxy.close(), timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the proxy loop and wait for it, so the change holds on return."""
        async def call() -> None:
            fn(*args)

        self._call(call())


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.tcp_proxy --host H --forward 7001:6001 ... --delay-ms D``: forward each
    listen port to its target port on ``H``, every chunk held ``D`` ms, until SIGTERM. Prints
    ``ready`` once every port listens (the multi-host lab runs one in each network namespace)."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m bench.tcp_proxy", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on and forward to")
    parser.add_argument("--forward", action="append", default=[], metavar="LISTEN:TARGET",
                        help="a listen port and the port it forwards to (repeatable)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="hold each chunk this long, both ways")
    args = parser.parse_args(argv)
    try:
        pairs = [tuple(int(port) for port in spec.split(":")) for spec in args.forward]
        if not pairs or any(len(pair) != 2 for pair in pairs) or args.delay_ms < 0:
            raise ValueError
    except ValueError:
        print(f"{parser.prog}: error: give --forward LISTEN:TARGET at least once, and --delay-ms >= 0",
              file=sys.stderr)
        return 2

    async def serve() -> None:
        proxies = [LinkProxy(f"{listen}->{target}", listen, target, args.host) for listen, target in pairs]
        for proxy in proxies:
            proxy.set_delay(args.delay_ms)
            await proxy.start()
        print("ready", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for proxy in proxies:
            await proxy.close()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
