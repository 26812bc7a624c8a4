"""Several hosts on one machine: Linux network namespaces on a bridge, for multi-host tests and benches.

Each lab host is a network namespace with one veth pair: its end holds the host's address, the
other end is a port of a bridge in the machine's own namespace, which holds the bridge address,
so the test or bench process reaches every host directly (as an operator's load balancer
would). A host's processes run under ``ip netns exec`` (``launcher``); what a node binds there
is reachable only through its veth. ``cut`` takes the host's link down, a partition as a pulled
cable makes it (sockets stay open, packets vanish); ``heal`` brings it back.

Latency between hosts comes from ``bench/tcp_proxy.py``, one process per host in front of its
ports (``delay_ms`` each way per chunk): kernel netem is not available on these machines.

Needs root (``CAP_NET_ADMIN``) and iproute2; ``unavailable()`` says why a lab cannot be built.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from p2psched.cluster import Cluster
from p2psched.redis_server import EmbeddedRedis

REDIS_PORT, REDIS_PROXY = 6379, 7379  # on the lab's "redis" host: the server, and its proxy
STEAL, RESULT, STEAL_PROXY, RESULT_PROXY, HTTP = 6001, 6002, 7001, 7002, 8000  # on each node's host


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    probe = f"p2pprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 under 10.213.0.0/16 that no interface of this machine is in."""
    used = _ip("-o", "-4", "addr", "show").stdout
    for third in [(os.getpid() + k) % 250 + 1 for k in range(250)]:
        net = ipaddress.IPv4Network(f"10.213.{third}.0/24")
        if f" {net.network_address + 1}/" not in used and f"10.213.{third}." not in used:
            return net
    raise RuntimeError("no free /24 under 10.213.0.0/16 for the lab")


@dataclass
class LabHost:
    name: str
    namespace: str
    address: str
    veth: str  # the bridge-side end of its link, the one ``cut`` takes down
    proxy: subprocess.Popen[str] | None = None

    @property
    def launcher(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]


@dataclass
class NetLab:
    """``with NetLab(["redis", "h1", "h2"]) as lab: lab.hosts["h1"].address``."""

    names: Sequence[str]
    hosts: dict[str, LabHost] = field(default_factory=dict)
    bridge: str = ""
    gateway: str = ""  # the bridge's address, the machine's own on the lab network

    def __enter__(self) -> Self:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def build(self) -> None:
        net = _free_subnet()
        tag = f"p2p{net.network_address.packed[2]}"
        self.bridge, self.gateway = f"{tag}br", str(net.network_address + 1)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            host = LabHost(name, f"{tag}-{name}", str(net.network_address + 10 + i), f"{tag}v{i}")
            inside = f"{tag}n{i}"
            _ip("netns", "add", host.namespace)
            self.hosts[name] = host
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", host.namespace)
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", inside)
            _ip("-n", host.namespace, "link", "set", inside, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "route", "add", "default", "via", self.gateway)
            _ip("link", "set", host.veth, "master", self.bridge)
            _ip("link", "set", host.veth, "up")

    def cut(self, name: str) -> None:
        """Take host ``name``'s link down: nothing passes either way until ``heal``."""
        _ip("link", "set", self.hosts[name].veth, "down")

    def heal(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].veth, "up")

    def start_proxy(self, name: str, forwards: Sequence[tuple[int, int]], delay_ms: float) -> None:
        """A ``bench/tcp_proxy.py`` process on host ``name``: each (listen, target) port pair on
        the host's address, every chunk held ``delay_ms`` each way."""
        host = self.hosts[name]
        args = [*host.launcher, sys.executable, "-m", "bench.tcp_proxy", "--host", host.address,
                "--delay-ms", str(delay_ms)]
        for listen, target in forwards:
            args += ["--forward", f"{listen}:{target}"]
        host.proxy = subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                                      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert host.proxy.stdout is not None
        if host.proxy.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the TCP proxy on {name} did not start (exit {host.proxy.wait(10)})")

    def close(self) -> None:
        for host in self.hosts.values():
            if host.proxy is not None and host.proxy.poll() is None:
                host.proxy.terminate()
                try:
                    host.proxy.wait(5)
                except subprocess.TimeoutExpired:
                    host.proxy.kill()
            _ip("link", "del", host.veth, check=False)  # both ends: a namespace may outlive its name a while
            _ip("netns", "del", host.namespace, check=False)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)
        self.hosts.clear()


@dataclass
class LabCluster:
    lab: NetLab
    redis: EmbeddedRedis  # on host "redis"; its ``host``/``port`` reach it without the proxy
    cluster: Cluster  # node i on host ``f"n{i}"``
    redis_url: str  # what the nodes dial: through the proxy


@contextlib.contextmanager
def lab_cluster(num_nodes: int, node_args: Sequence[str], rtt_ms: float, log_dir: str,
                per_node_args: Sequence[Sequence[str]] | None = None, **cluster_args: Any) -> Iterator[LabCluster]:
    """Redis and ``num_nodes`` nodes, each on a lab host of its own. Every connection into a
    host (to Redis, to a node's steal or result port) crosses that host's proxy, which holds each
    chunk ``rtt_ms / 2`` each way; this process reaches the nodes' HTTP ports directly, as a load
    balancer next to them would. Nodes keep the default ``--host 0.0.0.0`` and find the address
    they advertise themselves. ``cluster_args`` go to ``Cluster`` (``topic``, ``scheduler_name``,
    ``deferred``); the cluster is started."""
    names = [f"n{i}" for i in range(num_nodes)]
    with NetLab(["redis", *names]) as lab:
        redis_host = lab.hosts["redis"]
        with EmbeddedRedis(port=REDIS_PORT, host=redis_host.address, launcher=redis_host.launcher) as redis:
            lab.start_proxy("redis", [(REDIS_PROXY, REDIS_PORT)], rtt_ms / 2)
            for name in names:
                lab.start_proxy(name, [(STEAL_PROXY, STEAL), (RESULT_PROXY, RESULT)], rtt_ms / 2)
            ports = ["--scheduler-port", str(REDIS_PROXY), "--steal-port", str(STEAL), "--result-port", str(RESULT),
                     "--advertise-steal-port", str(STEAL_PROXY), "--advertise-result-port", str(RESULT_PROXY)]
            extra = per_node_args or [[] for _ in names]
            cluster = Cluster(num_nodes, list(node_args), redis=redis, log_dir=log_dir,
                              per_node_args=[[*ports, *more] for more in extra], http_ports=[HTTP] * num_nodes,
                              hosts=[(lab.hosts[name].address, lab.hosts[name].launcher) for name in names],
                              **cluster_args)
            with cluster:
                yield LabCluster(lab, redis, cluster, f"redis://{redis_host.address}:{REDIS_PROXY}/0")
