"""CurveZMQ between nodes: keys from files, an allow-list directory, who is on the other end.

With ``--curve-key-file`` (a secret key file written by ``python -m p2psched.keys``) and
``--curve-allow-dir`` (the public key files of the peers allowed to connect), every ZeroMQ
connection of the node is encrypted and authenticated:

- the node's steal and result ROUTERs are CURVE servers; pyzmq's ZAP authenticator admits a
  client only if its public key is in the allow-list directory (re-read on every registry
  refresh, so keys can be added or removed while nodes run), and stamps each message with
  the client's public key as its ``User-Id``;
- the node's DEALERs to a peer are CURVE clients that expect the server key the peer
  published in its registry record, so a thief only talks to the node the registry named;
- a message that names a node id (a Steal's thief id, a Tokens/Heartbeat/Handback sender) is
  accepted only if that node's published public key is the ``User-Id`` of the connection it
  came on and is still in the allow-list (``Node``), so one allowed peer cannot speak for
  another and a revoked key stops working on connections already made; clients do not set
  routing ids, so replies for a node go only to the connection its messages came on.

Without keys nothing is encrypted, and a node that binds a non-loopback address warns loudly.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from .core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveKeys:
    public_key: str  # z85, 40 characters: what the registry record publishes
    secret_key: bytes
    allow_dir: Path

    @classmethod
    def load(cls, key_file: str, allow_dir: str) -> CurveKeys:
        """Read a secret key file and check the allow-list directory; ``ConfigError`` with one line."""
        if not zmq.has("curve"):
            raise ConfigError("this libzmq has no CURVE support: CurveZMQ keys cannot be used")
        path = Path(key_file)
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--curve-key-file {key_file}: cannot read a CurveZMQ key pair ({exc})") from None
        if secret is None:
            raise ConfigError(f"--curve-key-file {key_file}: holds no secret key (use the .key_secret file "
                              "python -m p2psched.keys wrote)")
        allowed = Path(allow_dir)
        if not allowed.is_dir():
            raise ConfigError(f"--curve-allow-dir {allow_dir}: not a directory")
        try:
            count = len(zmq.auth.load_certificates(allowed))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--curve-allow-dir {allow_dir}: cannot read public keys ({exc})") from None
        if count == 0:
            log.warning("--curve-allow-dir %s holds no public key: no peer can connect", allow_dir)
        return cls(public.decode("ascii"), secret, allowed)

    def make_server(self, sock: zmq.asyncio.Socket) -> None:
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key.encode("ascii")
        sock.curve_server = True

    def make_client(self, sock: zmq.asyncio.Socket, server_public_key: str) -> None:
        """Before ``connect``: ``ValueError`` when the peer published no usable key."""
        if len(server_public_key) != 40:
            raise ValueError("the peer published no CurveZMQ public key")
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key.encode("ascii")
        sock.curve_serverkey = server_public_key.encode("ascii")

    def start_authenticator(self, ctx: zmq.asyncio.Context) -> AsyncioAuthenticator:
        """pyzmq's ZAP handler on the node's loop, admitting the keys in the allow-list directory."""
        auth = AsyncioAuthenticator(ctx, log=logging.getLogger("p2psched.zap"))
        auth.start()
        auth.configure_curve(domain="*", location=str(self.allow_dir))
        return auth

    def reload_allow_list(self, auth: AsyncioAuthenticator) -> None:
        """New handshakes see the directory as it is now (connections already made are checked
        per message against ``allowed_keys``)."""
        auth.configure_curve(domain="*", location=str(self.allow_dir))

    def allowed_keys(self) -> frozenset[str]:
        """The z85 public keys in the allow-list directory now (none if it cannot be read)."""
        try:
            return frozenset(key.decode("ascii") for key in zmq.auth.load_certificates(self.allow_dir))
        except (OSError, ValueError):
            log.warning("cannot read --curve-allow-dir %s: no peer is allowed until it can be read", self.allow_dir)
            return frozenset()


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_open(host: str, curve: CurveKeys | None) -> None:
    """A node reachable from other hosts without CurveZMQ keys: anyone who can reach its ports
    can steal its queued requests or feed its clients tokens. Say so where operators look."""
    if curve is None and not is_loopback(host):
        log.warning("*** %s is not a loopback address and CurveZMQ is off: the steal and result sockets "
                    "accept any peer that can reach them. Give every node --curve-key-file and "
                    "--curve-allow-dir (python -m p2psched.keys writes key pairs). ***", host)
