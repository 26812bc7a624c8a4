"""The address a node advertises to its peers, and whether peers on other hosts can use it.

A node bound to every interface (``--host 0.0.0.0``, the default) advertises the address of the
interface its kernel routes to Redis through: the one network every member shares. Asking costs
no packet: connecting a UDP socket only picks a route. A loopback address advertised into a Redis
that is reached over the network is a node no other host can steal from or send results to; it
is said loudly at start and carried in the node's registry record (``warning``), where
``python -m p2psched.registry`` shows it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from .core.config import NodeConfig

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or a name resolved here) is this machine's loopback; a name
    that does not resolve is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def route_source(host: str, port: int) -> str | None:
    """The local address the kernel would send from to reach ``host:port``; None when the name
    does not resolve or no route leads there."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.connect(address)
                return str(sock.getsockname()[0]).split("%")[0]
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class Advertised:
    host: str  # what peers dial, in the steal and result endpoints and the HTTP URL (IPv6 in brackets)
    warning: str = ""  # why peers on other hosts cannot reach ``host``; "" when they can


def advertised_host(cfg: NodeConfig) -> Advertised:
    """``--advertise-host``; else ``--host`` unless it is a wildcard; else, for a global node, the
    address routing to Redis (the first sentinel, with Sentinel); else loopback."""
    sched = cfg.scheduler
    redis_host, redis_port = sched.registry_address
    if cfg.advertise_host:
        host = cfg.advertise_host
    elif not cfg.binds_every_interface:
        host = cfg.host
    elif sched.is_global:
        host = route_source(redis_host, redis_port) or LOOPBACK
    else:
        host = LOOPBACK
    if ":" in host and not host.startswith("["):  # an IPv6 address, as endpoints and URLs write it
        host = f"[{host}]"
    if sched.is_global and is_loopback(host) and not is_loopback(redis_host):
        where = "--advertise-host" if cfg.advertise_host else "--host" if not cfg.binds_every_interface else "the route"
        return Advertised(host, f"advertises the loopback address {host} (from {where}) into a Redis reached at "
                                f"{redis_host}, not a loopback address: nodes on other hosts cannot steal from "
                                f"this node or send it results; give --host 0.0.0.0 or --advertise-host with an "
                                f"address they can reach")
    return Advertised(host)
