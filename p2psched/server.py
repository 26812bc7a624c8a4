"""``python -m p2psched.server``: the composition root. Parses flags into a frozen config,
builds the engine and the node, and runs it until SIGTERM.

The ``--scheduler-*`` flags keep FastDeploy's names and meanings, so its load-balancing launch
line works; ``--scheduler-name global`` joins the cluster and steals, ``local`` serves alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from server.errors import EngineConfigError

from .cli import Parser
from .core.config import NodeConfig
from .core.errors import ConfigError, RegistryUnavailable
from .core.flags import add_config_flags, config_from_namespace
from .engine_client import EngineClient, EngineDied, EngineStartError
from .engine_factory import build_frontend
from .node import Node
from .registry import verify_access
from .security import CurveKeys

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Every flag comes from the config dataclasses' field metadata (``flags.py``), but
    ``--log-level``, which sets no config."""
    p = Parser(prog="python -m p2psched.server",
               description="One p2psched inference node: OpenAI-compatible HTTP, continuous batching, "
                           "peer-to-peer work stealing.")
    sections = add_config_flags(p, NodeConfig, "node")
    sections["node"].add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                                  help="info logs one line per request (default %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """Raises ``ConfigError`` with a one-line reason (the engine's own settings included)."""
    try:
        return config_from_namespace(NodeConfig, args)
    except EngineConfigError as exc:  # server/ has its own exception tree: translated here
        raise ConfigError(str(exc)) from None


def build_node(config: NodeConfig) -> Node:
    """Start the engine process (the model loads there) and build the node around it. Raises
    ``EngineStartError`` with a one-line reason."""
    if config.curve_key_file:  # a bad key file is one line and exit 2 before the model loads
        CurveKeys.load(config.curve_key_file, config.curve_allow_dir)
    engine = EngineClient(config)
    ready = engine.start()
    try:
        tokenizer, text_stream, chat_template = build_frontend(ready)
        return Node(config, engine, tokenizer, text_stream, chat_template)
    except BaseException:
        engine.kill()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s " + (config.node_name or "node") + " %(name)s: %(message)s")
    from server.errors import ModelLoadError

    if config.engine_worker_queue_port:
        log.info("--engine-worker-queue-port %s is FastDeploy's (API server to engine workers) and not applicable "
                 "here: this node's engine process talks to it over local IPC; the port is not opened",
                 config.engine_worker_queue_port)

    if config.scheduler.is_global:
        # Before the model loads: a refused login, ACL rule or certificate is one line and exit 2;
        # a Redis that is only unreachable lets the node start and serve alone (DESIGN §4).
        try:
            asyncio.run(verify_access(config.scheduler))
        except ConfigError as exc:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 2
        except RegistryUnavailable as exc:  # the node warns when its first heartbeat fails too
            log.debug("Redis unreachable before start: %s", exc)
    try:
        node = build_node(config)
    except (ConfigError, ModelLoadError) as exc:  # the tokenizer or chat template of a model directory
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except EngineStartError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2 if exc.is_config_error else 1
    try:
        try:
            _run_loop(node)
        except* EngineDied as group:  # the node failed its requests and deregistered
            raise group.exceptions[0] from None
    except EngineDied as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # a port in use, an address this host does not have: before serving
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_loop(node: Node) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(node.run())
        return
    uvloop.run(node.run())


if __name__ == "__main__":
    sys.exit(main())
