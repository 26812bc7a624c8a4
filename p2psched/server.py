"""``python -m p2psched.server``: the composition root. Parses flags into a frozen config,
builds the engine and the node, and runs it until SIGTERM.

The ``--scheduler-*`` flags keep FastDeploy's names and meanings, so its load-balancing launch
line works; ``--scheduler-name global`` joins the cluster and steals, ``local`` serves alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .cli import Parser
from .config import NodeConfig, SchedulerConfig, SimEngineConfig
from .errors import ConfigError, RegistryUnavailable
from .node import Node
from .registry import verify_access
from .sim_engine import SimEngine, SimTokenizer

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m p2psched.server",
                                description="One p2psched inference node: OpenAI-compatible HTTP, "
                                            "continuous batching, peer-to-peer work stealing.")
    d, s, e = NodeConfig(), SchedulerConfig(), SimEngineConfig()
    node = p.add_argument_group("node")
    node.add_argument("--host", default=d.host, help="bind address for HTTP and ZeroMQ (default %(default)s)")
    node.add_argument("--advertise-host", default=d.advertise_host,
                      help="address peers use to reach this node (default: --host, or 127.0.0.1 for 0.0.0.0)")
    node.add_argument("--port", type=int, default=d.port, help="HTTP port (default %(default)s)")
    node.add_argument("--metrics-port", type=int, default=d.metrics_port,
                      help="Prometheus metrics port (default: none; /metrics is also served on --port)")
    node.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                      help="in-flight HTTP requests before new ones get 429 (default 0: no limit)")
    node.add_argument("--steal-port", type=int, default=d.steal_port, help="ZeroMQ steal port (0 = any free)")
    node.add_argument("--result-port", type=int, default=d.result_port, help="ZeroMQ result port (0 = any free)")
    node.add_argument("--advertise-steal-port", type=int, default=d.advertise_steal_port,
                      help="steal port peers dial, if it differs from the bound one (NAT, a proxy; default: bound)")
    node.add_argument("--advertise-result-port", type=int, default=d.advertise_result_port,
                      help="result port peers dial, if it differs from the bound one (default: bound)")
    node.add_argument("--curve-key-file", default=d.curve_key_file,
                      help="CurveZMQ secret key file (python -m p2psched.keys writes one): encrypt and "
                           "authenticate every ZeroMQ connection; needs --curve-allow-dir")
    node.add_argument("--curve-allow-dir", default=d.curve_allow_dir,
                      help="directory of public key files of the peers allowed to connect")
    node.add_argument("--node-name", default=d.node_name, help="name shown in the registry and responses")
    eng = p.add_argument_group("engine")
    eng.add_argument("--engine", choices=["real", "sim"], default=d.engine,
                     help="real: the LLM engine; sim: a cost model for scale experiments (default %(default)s)")
    eng.add_argument("--model", default=d.model,
                     help="a preset (tiny, small, llama-1b: random weights) or a Hugging Face model directory "
                          "(default: tiny; 'sim' with --engine sim)")
    eng.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    eng.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "float16", "bfloat16"],
                     help="weights and KV cache (auto: float32 on CPU, bfloat16 on CUDA)")
    eng.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                     help="sequences the engine runs at once (default %(default)s)")
    eng.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                     help="tokens per engine step, prefill chunks included (default %(default)s)")
    eng.add_argument("--kv-cache-blocks", type=int, default=d.kv_cache_blocks,
                     help="KV cache size in blocks (default 0: from memory)")
    eng.add_argument("--kv-cache-memory-fraction", type=float, default=d.kv_cache_memory_fraction,
                     help="on CUDA without --kv-cache-blocks: share of free GPU memory for the KV cache "
                          "(default %(default)s; on CPU the cache holds max-num-seqs full-length sequences, "
                          "at most 2 GiB)")
    eng.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block (default %(default)s)")
    eng.add_argument("--max-model-len", type=int, default=d.max_model_len,
                     help="longest prompt + output (default 0: the model's own, capped at 8192)")
    eng.add_argument("--min-step-ms", type=float, default=d.min_step_ms,
                     help="pace engine steps to at least this many ms, so nodes sharing one CPU behave like "
                          "separate accelerators (demos; default 0: off)")
    eng.add_argument("--attention-backend", choices=["auto", "triton", "torch"], default=d.attention_backend,
                     help="auto: Triton kernels on CUDA, the torch reference on CPU (default %(default)s)")
    eng.add_argument("--cuda-graphs", "--use-cudagraph", action="store_true", default=d.cuda_graphs,
                     help="replay decode steps from CUDA graphs, one per batch-size bucket, captured at start "
                          "(CUDA with the triton backend; --use-cudagraph is FastDeploy's name)")
    eng.add_argument("--cpu-threads", type=int, default=d.cpu_threads,
                     help="torch threads on CPU (default 0: torch's choice; 1 when several nodes share a host)")
    node.add_argument("--max-queue-len", type=int, default=d.max_queue_len,
                      help="pending requests before new ones get 503 (default %(default)s)")
    node.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sched = p.add_argument_group("scheduler (FastDeploy-compatible names)")
    sched.add_argument("--scheduler-name", choices=["local", "global"], default=s.name,
                       help="global: register in Redis and steal work; local: serve alone (default %(default)s)")
    sched.add_argument("--scheduler-host", default=s.host, help="Redis host (default %(default)s)")
    sched.add_argument("--scheduler-port", type=int, default=s.port, help="Redis port (default %(default)s)")
    sched.add_argument("--scheduler-db", type=int, default=s.db, help="Redis database (default %(default)s)")
    sched.add_argument("--scheduler-username", default=s.username, help="Redis ACL user (default: the default user)")
    sched.add_argument("--scheduler-password", default=s.password, help="Redis password (default none)")
    sched.add_argument("--scheduler-password-file", default=s.password_file,
                       help="read the Redis password from this file instead (keeps it out of ps)")
    sched.add_argument("--scheduler-tls", action="store_true", default=s.tls, help="connect to Redis over TLS")
    sched.add_argument("--scheduler-tls-ca-file", default=s.tls_ca_file,
                       help="CA certificate(s) that signed Redis's certificate (default: the system's)")
    sched.add_argument("--scheduler-tls-cert-file", default=s.tls_cert_file,
                       help="client certificate for Redis (tls-auth-clients)")
    sched.add_argument("--scheduler-tls-key-file", default=s.tls_key_file, help="the client certificate's key")
    sched.add_argument("--scheduler-topic", default=s.topic,
                       help="namespace; only nodes with the same topic steal from each other (default %(default)s)")
    sched.add_argument("--scheduler-ttl", type=float, default=s.ttl,
                       help="seconds a request may wait before it first starts on some engine; then its "
                            "client gets an error (default %(default)s)")
    sched.add_argument("--scheduler-min-load-score", type=int, default=s.min_load_score,
                       help="a peer is stolen from only with at least this many pending requests "
                            "(default %(default)s)")
    sched.add_argument("--scheduler-load-shards-num", type=int, default=s.load_shards_num,
                       help="shards of the Redis load index (default %(default)s)")
    sched.add_argument("--heartbeat-interval", type=float, default=s.heartbeat_interval,
                       help="seconds between registry heartbeats (default %(default)s)")
    sched.add_argument("--lease-timeout", type=float, default=s.lease_timeout,
                       help="seconds of thief silence before the origin takes a request back (default %(default)s)")
    sched.add_argument("--steal-timeout", type=float, default=s.steal_timeout,
                       help="seconds to wait for a grant before asking the next peer (default %(default)s)")
    sim = p.add_argument_group("simulated engine")
    sim.add_argument("--sim-decode-step-ms", type=float, default=e.decode_step_ms)
    sim.add_argument("--sim-decode-ms-per-seq", type=float, default=e.decode_ms_per_seq)
    sim.add_argument("--sim-prefill-ms-per-token", type=float, default=e.prefill_ms_per_token)
    sim.add_argument("--sim-kv-tokens", type=int, default=e.kv_tokens)
    sim.add_argument("--sim-max-model-len", type=int, default=e.max_model_len)
    sim.add_argument("--sim-stall-s", type=float, default=e.stall_s,
                     help="fault injection: on SIGUSR1 the next engine step hangs this many seconds, as a wedged "
                          "accelerator would (default 0: SIGUSR1 is not handled)")
    return p


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    scheduler = SchedulerConfig(
        name=args.scheduler_name, host=args.scheduler_host, port=args.scheduler_port, db=args.scheduler_db,
        username=args.scheduler_username, password=args.scheduler_password,
        password_file=args.scheduler_password_file, tls=args.scheduler_tls, tls_ca_file=args.scheduler_tls_ca_file,
        tls_cert_file=args.scheduler_tls_cert_file, tls_key_file=args.scheduler_tls_key_file, topic=args.scheduler_topic, ttl=args.scheduler_ttl,
        min_load_score=args.scheduler_min_load_score, load_shards_num=args.scheduler_load_shards_num,
        heartbeat_interval=args.heartbeat_interval, lease_timeout=args.lease_timeout,
        steal_timeout=args.steal_timeout)
    sim = SimEngineConfig(decode_step_ms=args.sim_decode_step_ms, decode_ms_per_seq=args.sim_decode_ms_per_seq,
                          prefill_ms_per_token=args.sim_prefill_ms_per_token, kv_tokens=args.sim_kv_tokens,
                          max_model_len=args.sim_max_model_len, stall_s=args.sim_stall_s)
    return NodeConfig(host=args.host, advertise_host=args.advertise_host, port=args.port,
                      metrics_port=args.metrics_port, max_concurrent_requests=args.max_concurrent_requests,
                      steal_port=args.steal_port, result_port=args.result_port,
                      advertise_steal_port=args.advertise_steal_port, advertise_result_port=args.advertise_result_port,
                      curve_key_file=args.curve_key_file, curve_allow_dir=args.curve_allow_dir, node_name=args.node_name,
                      engine=args.engine, model=args.model, device=args.device, dtype=args.dtype,
                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      kv_cache_blocks=args.kv_cache_blocks, kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                      block_size=args.block_size,
                      max_model_len=args.max_model_len, cpu_threads=args.cpu_threads, min_step_ms=args.min_step_ms,
                      attention_backend=args.attention_backend, cuda_graphs=args.cuda_graphs,
                      max_queue_len=args.max_queue_len,
                      scheduler=scheduler, sim=sim)


def attention_backend_for(requested: str, device: str, head_dim: int, cuda_graphs: bool) -> str:
    """``triton`` or ``torch`` for this device and model. The kernels serve head dims that are
    powers of two >= 16: ``auto`` falls back to torch (logged) for others, ``triton`` refuses."""
    chosen = ("triton" if device.startswith("cuda") else "torch") if requested == "auto" else requested
    if chosen == "triton" and (head_dim & (head_dim - 1) or head_dim < 16):
        if requested == "triton" or cuda_graphs:
            raise ConfigError(f"the Triton kernels (needed by --attention-backend triton and --cuda-graphs) serve "
                              f"head dims that are powers of two >= 16; this model's is {head_dim}")
        log.warning("head dim %d is not one the Triton kernels serve: attention runs through the torch backend",
                    head_dim)
        return "torch"
    return chosen


def build_node(config: NodeConfig) -> Node:
    """Raises ``ConfigError`` or ``server.errors.ModelLoadError`` with a one-line reason."""
    from server.chat_template import ChatTemplate
    from server.detokenizer import TextStream

    if config.engine == "sim":
        sim_tokenizer = SimTokenizer()
        sim_engine = SimEngine(config.sim, config.max_num_seqs)
        if config.sim.stall_s > 0:
            signal.signal(signal.SIGUSR1, lambda *_: sim_engine.stall_next_step(config.sim.stall_s))
        return Node(config, sim_engine, sim_tokenizer, lambda stop: TextStream(sim_tokenizer, stop), ChatTemplate())
    import torch

    from server.engine import EngineConfig
    from server.loader import load

    from .real_engine import RealEngine

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    from server.attention import make_backend

    if config.attention_backend == "triton" and not device.startswith("cuda"):
        raise ConfigError("--attention-backend triton needs a CUDA device (CI checks the kernels with "
                          "TRITON_INTERPRET=1 in tests)")
    if config.cuda_graphs and (not device.startswith("cuda") or config.attention_backend == "torch"):
        raise ConfigError("--cuda-graphs needs a CUDA device and the triton attention backend")
    loaded = load(config.model_name, config.dtype, device)
    backend = make_backend(attention_backend_for(config.attention_backend, device, loaded.config.head_dim,
                                                 config.cuda_graphs), torch.device(device))
    engine = RealEngine(loaded, EngineConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        block_size=config.block_size, kv_cache_blocks=config.kv_cache_blocks, max_model_len=config.max_model_len,
        kv_cache_memory=config.kv_cache_memory_fraction if device.startswith("cuda") else 0.0,
        decode_graphs=config.cuda_graphs), backend)
    tokenizer = loaded.tokenizer
    template = ChatTemplate.from_model_dir(loaded.path)
    return Node(config, engine, tokenizer, lambda stop: TextStream(tokenizer, stop), template)


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
    except (ConfigError, ModelLoadError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        _run_loop(node)
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
