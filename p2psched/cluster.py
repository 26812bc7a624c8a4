"""``python -m p2psched.cluster --nodes N``: an embedded Redis and N node processes on free ports.

Also the library the integration tests, the demo and the benches use to run a real local
cluster: ``with Cluster(3, ["--engine", "sim"]) as c: c.nodes[0].url``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .cli import Parser
from .redis_server import EmbeddedRedis, free_port


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    """GET (or POST ``body``) and decode the JSON answer; (status, payload)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@dataclass
class NodeProcess:
    name: str
    port: int
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None  # working directory of the process (``-m`` imports from it first)
    host: str = "127.0.0.1"  # where its HTTP port is reached from here
    launcher: list[str] = field(default_factory=list)  # runs the command, e.g. ip netns exec NS

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*self.launcher, sys.executable, "-m", "p2psched.server", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        """Start again with the same arguments and ports (the new process gets a new node id);
        a live process is killed first. The log file is appended to."""
        self.kill()
        self.start()

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until /health answers 200; RuntimeError if the process exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while not self.is_healthy():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not healthy within {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: the process freezes with its sockets open (a hung, not a dead, node)."""
        if self.is_alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        if self.is_alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def stall_engine(self) -> None:
        """SIGUSR1: a sim node started with ``--sim-stall-s S`` hangs its next engine step S
        seconds while its event loop runs on (a node without it would die of the signal)."""
        if self.is_alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGUSR1)

    def stats(self) -> dict[str, Any]:
        _, payload = http_json(self.url + "/stats", timeout=5)
        assert isinstance(payload, dict)
        return payload

    def is_healthy(self) -> bool:
        try:
            status, _ = http_json(self.url + "/health", timeout=1)
            return status == 200
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Cluster:
    """``node_args`` go to every node; ``per_node_args[i]``, when given, to node i only (after them),
    e.g. fixed ZeroMQ ports so a node restarted with ``restart_node`` comes back where peers dial.
    ``http_ports`` fixes the HTTP ports (default: free ports, picked once). Nodes whose indexes are
    in ``deferred`` are not started with the cluster: ``start_node`` starts one later (a node
    joining a running cluster). ``hosts[i]``, when given, is node i's (address, launcher): its
    HTTP port is reached at that address and its command runs under the launcher (the multi-host
    lab of ``bench/netns.py`` gives each node a network namespace)."""

    def __init__(self, num_nodes: int, node_args: list[str] | None = None, topic: str = "default",
                 scheduler_name: str = "global", log_dir: str | None = None, redis: EmbeddedRedis | None = None,
                 start_timeout: float = 60.0, per_node_args: Sequence[Sequence[str]] | None = None,
                 http_ports: Sequence[int] | None = None, deferred: Sequence[int] = (),
                 hosts: Sequence[tuple[str, Sequence[str]]] | None = None):
        if per_node_args is not None and len(per_node_args) != num_nodes:
            raise ValueError(f"per_node_args has {len(per_node_args)} entries for {num_nodes} nodes")
        if http_ports is not None and len(http_ports) != num_nodes:
            raise ValueError(f"http_ports has {len(http_ports)} entries for {num_nodes} nodes")
        if hosts is not None and len(hosts) != num_nodes:
            raise ValueError(f"hosts has {len(hosts)} entries for {num_nodes} nodes")
        self.start_timeout = start_timeout  # seconds for every node to be healthy (and see its peers)
        self.redis = redis or EmbeddedRedis()
        self._owns_redis = redis is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="p2psched-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.nodes: list[NodeProcess] = []
        taken: set[int] = {self.redis.port}
        for i in range(num_nodes):
            name = f"node{i}"
            port = http_ports[i] if http_ports is not None else free_port(taken=taken)
            # A cluster on this host binds loopback (nodes default to every interface, with a warning
            # without CurveZMQ keys); a lab host's node keeps the default and finds its own address.
            bind = [] if hosts is not None else ["--host", "127.0.0.1"]
            args = [*bind, "--port", str(port), "--node-name", name, "--scheduler-name", scheduler_name,
                    "--scheduler-host", self.redis.host, "--scheduler-port", str(self.redis.port),
                    "--scheduler-topic", topic, *(node_args or []),
                    *(per_node_args[i] if per_node_args is not None else [])]
            node = NodeProcess(name, port, args, self.log_dir / f"{name}.log")
            if hosts is not None:
                node.host, node.launcher = hosts[i][0], list(hosts[i][1])
            self.nodes.append(node)
        if any(not 0 <= i < num_nodes for i in deferred):
            raise ValueError(f"deferred names a node outside 0..{num_nodes - 1}")
        self.deferred = set(deferred)
        self._scheduler_name = scheduler_name
        self.topic = topic

    def start(self, timeout: float = 60.0) -> Cluster:
        if not self.redis.is_running:
            self.redis.start()
        for i, node in enumerate(self.nodes):
            if i not in self.deferred:
                node.start()
        self.wait_ready(timeout)
        return self

    def start_node(self, index: int, timeout: float = 60.0) -> NodeProcess:
        """Start deferred node ``index`` and wait until it answers /health (it registers, and
        its peers see it at their next read of the members)."""
        node = self.nodes[index]
        self.deferred.discard(index)
        if not node.is_alive:
            node.start()
        node.wait_healthy(timeout)
        return node

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Every started node answers /health and, in a global cluster, sees every other one."""
        deadline = time.monotonic() + timeout
        started = [node for i, node in enumerate(self.nodes) if i not in self.deferred]
        for node in started:
            node.wait_healthy(max(0.0, deadline - time.monotonic()))
        if self._scheduler_name != "global":
            return
        others = len(started) - 1
        for node in started:
            while len(node.stats()["peers"]) < others:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name} did not discover its peers within {timeout}s")
                time.sleep(0.05)

    def restart_node(self, index: int, timeout: float = 60.0) -> NodeProcess:
        """Kill node ``index`` if it runs, start it again (same ports and name, a new node id) and
        wait until it answers /health. It does not wait for peers: Redis may be away."""
        node = self.nodes[index]
        node.restart()
        node.wait_healthy(timeout)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)  # a paused node could not act on SIGTERM
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(30)
                except subprocess.TimeoutExpired:
                    node.kill()
        if self._owns_redis:
            self.redis.__exit__(None, None, None)

    def __enter__(self) -> Cluster:
        try:
            return self.start(self.start_timeout)
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m p2psched.cluster",
                                     description="Start an embedded Redis and N nodes; Ctrl-C stops everything. "
                                                 "Arguments after -- go to every node.")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--engine", choices=["real", "sim"], default="real")
    parser.add_argument("--model", default="", help="preset or model directory (default: tiny, or sim)")
    parser.add_argument("--scheduler-name", choices=["local", "global"], default="global")
    parser.add_argument("--topic", default="default")
    argv = list(sys.argv[1:] if argv is None else argv)
    node_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, node_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 64:
        print(f"{parser.prog}: error: --nodes must be in 1..64", file=sys.stderr)
        return 2
    model = ["--model", args.model] if args.model else []
    cluster = Cluster(args.nodes, ["--engine", args.engine, *model, *node_args], args.topic, args.scheduler_name)
    try:
        cluster.start()
        print(f"redis: {cluster.redis.url}")
        for node in cluster.nodes:
            print(f"{node.name}: {node.url}   (log: {node.log_path})")
        print("Ctrl-C to stop.", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
