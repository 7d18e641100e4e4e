"""`python -m minicake.serve`: start the instance processes, then the OpenAI-compatible HTTP
server in front of them (docs/design.md, Processes).

Defaults: the bundled model on 127.0.0.1:8000; on a CPU machine one prefill and one decode
process over gloo, on a CUDA machine one instance per GPU. SIGINT and SIGTERM drain the server
(new requests get 503, running ones --shutdown-grace seconds to finish, then an error), close
every instance process and exit 0; a second signal stops at once. When too few instances are
left to serve a request, the server ends its requests with the reason and exits 1, for a
supervisor to restart it.
"""
import argparse
import asyncio
import logging
import math
import os
import signal
import sys

import torch
import uvicorn

from minicake.config import KERNELS, EngineConfig
from minicake.serve.api import create_app
from minicake.conductor.conductor import ADMISSIONS, SCHEDULERS, ConductorConfig
from minicake.conductor.cost_model import load_profile
from minicake.disagg.cluster import HEARTBEAT_TIMEOUT_S, Cluster
from minicake.disagg.node import JOIN_TIMEOUT_S, Nodes
from minicake.disagg.node import main as node_main
from minicake.disagg.worker import TOKEN_ENV
from minicake.serve.dashboard import Dashboard
from minicake.serve.metrics import ServerMetrics

log = logging.getLogger("minicake.serve")

ENGINE_FLAGS = ("model", "device", "dtype", "block_size", "max_num_seqs", "max_model_len",
                "max_num_batched_tokens", "num_kv_blocks", "kv_pool_blocks",
                "num_threads", "enforce_eager", "kernels")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minicake.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (bundled) or a Hugging Face checkpoint directory")
    p.add_argument("--served-model-name", help="name clients pass as 'model' "
                   "(default: the --model name, or the checkpoint directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prefill", type=int, help="prefill instances; 0 means --colocated "
                   "(default: 1 on CPU, half the GPUs rounded up on CUDA)")
    p.add_argument("--decode", type=int, help="decode instances (default: 1 on CPU, the "
                   "other half of the GPUs on CUDA)")
    p.add_argument("--colocated", action="store_true",
                   help="one instance that prefills and decodes: the non-disaggregated baseline")
    p.add_argument("--pipeline-stages", type=int, default=1,
                   help="processes per prefill instance for chunked pipeline-parallel prefill")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--num-kv-blocks", type=int,
                   help="KV cache blocks per instance (default: a share of free memory)")
    p.add_argument("--num-threads", type=int, help="torch CPU threads per instance process "
                   "(default: the cores shared out among the instances)")
    p.add_argument("--ttft-slo", type=float, help="seconds; a request is effective only "
                   "within it (counted in minicake:requests_effective)")
    p.add_argument("--tbt-slo", type=float, help="seconds, on the paper's TBT (mean of a "
                   "request's slowest 10%% of gaps)")
    p.add_argument("--kernels", choices=KERNELS, help="auto (default: C kernels on a CPU, Triton on "
                   "CUDA), or torch: the model's own torch ops, no platform code (minicake/platforms)")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="run every step eagerly: no decode graphs (recorded small decode steps, replayed)")
    p.add_argument("--kv-pool-blocks", type=int,
                   help="host-memory KV pool of each prefill instance, in blocks (default: none)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="kvcache",
                   help="how the Conductor picks the prefill instance (docs/design.md, Prefill choice)")
    p.add_argument("--admission", choices=ADMISSIONS, default="none",
                   help="admission control (docs/design.md, Admission control); a refused request gets HTTP 429 "
                   "(judged against --ttft-slo and --tbt-slo)")
    p.add_argument("--profile", help="the Conductor's cost profile, a JSON file benchmarks/fit_cost_model.py "
                   "writes (default: the analytic profile of a known GPU, else the bundled model's CPU fit)")
    p.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT_S,
                   help="seconds an instance may go silent before it is declared hung and killed "
                   "(default: %(default)g; raise it where one engine step takes longer)")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds running requests get to finish after SIGINT/SIGTERM before they are "
                   "aborted (default: %(default)g)")
    hosts = p.add_argument_group("several hosts (torchrun's flags; docs/serving.md, Two machines)")
    hosts.add_argument("--nnodes", type=int, default=1, help="hosts in the cluster (default: %(default)s)")
    hosts.add_argument("--node-rank", type=int, default=0, help="this host's rank: 0 runs the HTTP server and "
                       "the Conductor, the others only their --prefill and --decode instances")
    hosts.add_argument("--master-addr", default="127.0.0.1", help="node 0's address, as the others reach it")
    hosts.add_argument("--master-port", type=int, default=29500, help="torch.distributed's store; node 0's "
                       "control plane listens on the next port (default: %(default)s)")
    hosts.add_argument("--bind-addr", help="this host's address, where its control-plane listeners bind "
                       "(default: --master-addr on node 0, 127.0.0.1 on the others)")
    hosts.add_argument("--cluster-token", default=os.environ.get(TOKEN_ENV),
                       help=f"the secret every node signs its messages with (default: ${TOKEN_ENV})")
    hosts.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT_S,
                       help="seconds node 0 waits for the other nodes to join (default: %(default)g)")
    args = p.parse_args(argv)
    if not 0 <= args.shutdown_grace < math.inf:
        p.error(f"--shutdown-grace must be a finite number of seconds >= 0, got {args.shutdown_grace}")
    if args.admission != "none" and (args.ttft_slo is None or args.tbt_slo is None):
        p.error(f"--admission {args.admission} needs --ttft-slo and --tbt-slo")
    try:
        args.nodes = Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port,
                           args.bind_addr or (args.master_addr if args.node_rank == 0 else "127.0.0.1"),
                           args.cluster_token, args.join_timeout)
    except ValueError as e:
        p.error(str(e))
    return args


def instance_counts(args) -> tuple[int, int, bool]:
    """(prefill, decode, colocated) from the flags and the machine."""
    gpus = torch.cuda.device_count() if args.device in (None, "cuda") else 0
    if args.nnodes > 1:  # this node's share: it may run no instance of a role
        return (1 if args.prefill is None else args.prefill), (1 if args.decode is None else args.decode), False
    if args.colocated or args.prefill == 0 or (
            gpus == 1 and args.prefill is None and args.decode is None):
        return 1, 1, True
    prefill = args.prefill if args.prefill is not None else max(1, (gpus + 1) // 2)
    decode = args.decode if args.decode is not None else max(1, gpus // 2)
    return prefill, decode, False


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGINT or SIGTERM only asks for a drain (see
    `supervise`): the socket stays open meanwhile, so new requests get a 503, not a refusal."""
    drain_requested = False

    def handle_exit(self, sig, frame) -> None:
        if self.drain_requested:  # the second signal: uvicorn's own shutdown, now
            super().handle_exit(sig, frame)
        self.drain_requested = True


async def supervise(server: DrainingServer, frontend, cluster, grace_s: float) -> int:
    """Until the server is told to stop, then stop it. Returns the exit code: 0 after a drain
    asked for by a signal, 1 once the cluster can no longer serve (a supervisor restarts it)."""
    code = 0
    while not server.should_exit:
        if server.drain_requested:
            log.info("shutting down: running requests get %g s to finish", grace_s)
            await frontend.drain(f"the server is shutting down (requests still running after "
                                 f"{grace_s:g} s were aborted)", grace_s)
            break
        reason = cluster.unavailable_reason()
        if reason is not None:
            log.error("%s: exiting", reason)
            await frontend.drain(reason, 0.0)
            code = 1
            break
        await asyncio.sleep(0.1)
    server.should_exit = True
    return code


async def serve(cluster, args) -> int:
    """Serve until a signal or the cluster's failure ends it; returns the exit code."""
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    metrics = ServerMetrics(args.ttft_slo, args.tbt_slo)
    app = create_app(cluster, name, metrics)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=5)  # drained already: this is a backstop
    server = DrainingServer(config)
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if not server.started:
        await serving
        return 1
    print(f"minicake serves '{name}' at http://{args.host}:{args.port}/v1", flush=True)
    dashboard = Dashboard(metrics)
    dashboard.start()
    try:
        code = await supervise(server, app.state.frontend, cluster, args.shutdown_grace)
        await serving
    finally:
        dashboard.stop()
    return code


def main(argv=None) -> None:
    # SIGTERM behaves like Ctrl-C: while uvicorn serves, DrainingServer handles both; before and
    # after (and after a second signal, which uvicorn re-raises), they land here as
    # KeyboardInterrupt, so that the cluster is closed below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    prefill, decode, colocated = instance_counts(args)
    if args.node_rank > 0:  # a node agent: no HTTP server, no Conductor
        node_main(args.nodes, prefill, decode, args.heartbeat_timeout)
    settings = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    try:
        config = EngineConfig(**settings)
    except ValueError as e:
        sys.exit(f"error: {e}")
    slos = {k: v for k, v in (("ttft_slo_s", args.ttft_slo), ("tbt_slo_s", args.tbt_slo)) if v is not None}
    try:
        conductor = ConductorConfig(scheduler=args.scheduler, admission=args.admission,
                                    block_size=config.block_size, **slos)
        cost = load_profile(args.profile) if args.profile else None
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        cluster = Cluster(config, prefill_instances=prefill, decode_instances=decode,
                          pipeline_stages=args.pipeline_stages, colocated=colocated, conductor=conductor,
                          cost=cost, heartbeat_timeout=args.heartbeat_timeout, nodes=args.nodes)
    except (OSError, ValueError, TimeoutError) as e:  # a missing or invalid model file, a node that never joined
        sys.exit(f"error: {e}")
    code = 0
    try:
        code = asyncio.run(serve(cluster, args))
    except KeyboardInterrupt:
        pass
    finally:
        cluster.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
