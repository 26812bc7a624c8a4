"""``python -m p2psched.keys DIR [--name NAME]``: write a CurveZMQ key pair for a node.

Writes ``DIR/NAME.key`` (the public key: copy it into every peer's ``--curve-allow-dir``) and
``DIR/NAME.key_secret`` (the pair, readable by the owner only: the node's ``--curve-key-file``).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import zmq
import zmq.auth

from .cli import Parser


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m p2psched.keys", description="Write a CurveZMQ key pair for a p2psched node.")
    parser.add_argument("directory", help="where to write NAME.key and NAME.key_secret (created if missing)")
    parser.add_argument("--name", default=socket.gethostname().split(".")[0] or "node",
                        help="file name stem (default: this host's name)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing pair")
    args = parser.parse_args(argv)
    if not zmq.has("curve"):
        print(f"{parser.prog}: error: this libzmq has no CURVE support", file=sys.stderr)
        return 2
    if not args.name or "/" in args.name or args.name.startswith("."):
        print(f"{parser.prog}: error: --name must be a plain file name", file=sys.stderr)
        return 2
    directory = Path(args.directory)
    public, secret = directory / f"{args.name}.key", directory / f"{args.name}.key_secret"
    if not args.force and (public.exists() or secret.exists()):
        print(f"{parser.prog}: error: {public} or {secret} exists (--force overwrites)", file=sys.stderr)
        return 2
    try:
        directory.mkdir(parents=True, exist_ok=True)
        old_umask = os.umask(0o077)
        try:
            zmq.auth.create_certificates(directory, args.name)
        finally:
            os.umask(old_umask)
        secret.chmod(0o600)
        public.chmod(0o644)
    except OSError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"public key (give to peers' --curve-allow-dir): {public}")
    print(f"secret key (this node's --curve-key-file):     {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
