"""`python -m minicake.sim`: replay a Mooncake trace through the Conductor in simulation.

Runs the discrete-event simulator (minicake/sim/simulator.py), shows a progress bar, prints
a table and ends with one JSON line; `--plot FILE.png` draws per-instance prefill and decode
load over time with the rejections. Bad input exits with code 2 and says what was wrong.
"""
import argparse
import json
import math
import sys
import time

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from minicake.conductor.conductor import ADMISSIONS, SCHEDULERS, ConductorConfig
from minicake.conductor.cost_model import load_profile
from minicake.sim.plot import plot_load
from minicake.sim.simulator import SimConfig, Simulator
from minicake.sim.trace import TRACE_BLOCK_SIZE, load_trace


def pool_tokens(text: str) -> int | None:
    if text == "unlimited":
        return None
    if not text.isdigit() or int(text) < TRACE_BLOCK_SIZE:
        raise argparse.ArgumentTypeError(f"expected a number of tokens >= {TRACE_BLOCK_SIZE} (one block) "
                                         f"or 'unlimited', got {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minicake.sim", description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True,
                   help="Mooncake trace: conversation, synthetic (shipped) or a .jsonl[.gz] file")
    p.add_argument("--prefill", type=int, default=8, help="prefill instances")
    p.add_argument("--decode", type=int, default=8, help="decode instances")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="kvcache")
    p.add_argument("--pool", choices=("local", "global"), default="global",
                   help="global: an instance may fetch blocks another instance holds")
    p.add_argument("--pool-tokens", type=pool_tokens, default=3_000_000,
                   help="host KV pool of each prefill instance, in tokens, or 'unlimited'")
    p.add_argument("--eviction", choices=("lru", "lfu"), default="lru")
    p.add_argument("--admission", choices=ADMISSIONS, default="none")
    p.add_argument("--threshold", type=float, default=1.5, help="kvcache_balancing_threshold")
    p.add_argument("--speed", type=float, default=1.0, help="replay this many times faster")
    p.add_argument("--ttft-slo", type=float, default=15.0, help="seconds")
    p.add_argument("--tbt-slo", type=float, default=0.075, help="seconds")
    p.add_argument("--profile", default="paper-70b", help="paper-70b or a JSON profile")
    p.add_argument("--limit", type=int, help="replay only the first N requests")
    p.add_argument("--max-output", type=int, help="cap every output length (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="write per-instance load over time to this PNG")
    args = p.parse_args(argv)
    for name in ("prefill", "decode", "limit", "max_output"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("threshold", "speed", "ttft_slo", "tbt_slo"):
        if not math.isfinite(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.speed <= 0:
        p.error(f"--speed must be > 0, got {args.speed}")
    return args


def finite_or_null(value):
    """JSON has no NaN or Infinity: a non-finite float (a mean over no requests) becomes null."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def print_table(console: Console, summary: dict) -> None:
    table = Table(title="minicake.sim")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, dict):
            value = "\n".join(f"{k}: {v}" for k, v in value.items()) or "-"
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    try:
        cost = load_profile(args.profile)
        trace = load_trace(args.trace, args.limit, args.speed, args.max_output)
        sim_config = SimConfig(args.prefill, args.decode, args.pool, args.pool_tokens, args.eviction)
        conductor_config = ConductorConfig(args.scheduler, args.admission, args.ttft_slo, args.tbt_slo,
                                           block_size=TRACE_BLOCK_SIZE, can_fetch=args.pool == "global",
                                           kvcache_balancing_threshold=args.threshold, seed=args.seed)
        sim = Simulator(sim_config, conductor_config, cost, trace)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("simulating", total=len(trace))
        result = sim.run(lambda n: progress.update(task, completed=n))
    wall = time.perf_counter() - start
    summary = result.summary() | {"sim_wall_s": round(wall, 2)}
    print_table(Console(), summary)
    if args.plot:
        plot_load([(f"{args.trace.split('/')[-1]}: {args.prefill}P+{args.decode}D, {args.scheduler}, "
                    f"admission {args.admission}, {args.speed}x", result)], args.plot)
    config = {k: v for k, v in vars(args).items() if k != "plot"}
    print(json.dumps(finite_or_null(config | summary), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
