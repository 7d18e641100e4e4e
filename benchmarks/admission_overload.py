"""Overload: baseline vs early vs prediction-based early rejection (docs/design.md, Admission control).

Replays one trace through the simulator (kvcache scheduler, global pool, paper-70b profile)
under each admission policy on the same cluster, prints a table, draws the load over time of
early vs predictive side by side (`--plot`), and ends with one JSON line.
"""
import argparse
import json
import sys
import time

from rich.console import Console
from rich.table import Table

from minicake.conductor.conductor import ConductorConfig
from minicake.conductor.cost_model import paper_70b
from minicake.sim.plot import plot_load
from minicake.sim.simulator import SimConfig, Simulator
from minicake.sim.trace import load_trace

POLICIES = ("baseline", "early", "predictive")
COLUMNS = ("rejected", "rejected_by_reason", "wasted_prefill_s", "finished", "avg_ttft_s", "avg_tbt_s",
           "p90_tbt_s", "effective_fraction")


def fmt(value) -> str:
    if isinstance(value, dict):
        return "\n".join(f"{k}: {v}" for k, v in value.items())
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True, help="conversation, synthetic (shipped) or a trace file")
    p.add_argument("--prefill", type=int, default=8)
    p.add_argument("--decode", type=int, default=8)
    p.add_argument("--speed", type=float, default=2.0)
    p.add_argument("--ttft-slo", type=float, default=15.0)
    p.add_argument("--tbt-slo", type=float, default=0.075)
    p.add_argument("--plot", help="PNG of early vs predictive load over time")
    args = p.parse_args()
    try:
        trace = load_trace(args.trace, speed=args.speed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = {}
    for policy in POLICIES:
        config = ConductorConfig("kvcache", policy, args.ttft_slo, args.tbt_slo)
        results[policy] = Simulator(SimConfig(args.prefill, args.decode), config, paper_70b(), trace).run()
    summaries = {policy: r.summary() for policy, r in results.items()}
    table = Table(title=f"{args.trace.split('/')[-1]}, {args.prefill}P+{args.decode}D, {args.speed}x, "
                        f"SLO TTFT {args.ttft_slo} s / TBT {args.tbt_slo} s")
    table.add_column("admission")
    for c in COLUMNS:
        table.add_column(c, justify="right")
    for policy, s in summaries.items():
        table.add_row(policy, *(fmt(s[c]) for c in COLUMNS))
    Console(width=160).print(table)
    if args.plot:
        where = f"{args.prefill}P+{args.decode}D, {args.speed}x, TBT SLO {args.tbt_slo * 1000:g} ms"
        plot_load([(f"early rejection: {where}", results["early"]),
                   (f"prediction-based early rejection: {where}", results["predictive"])], args.plot)
    print(json.dumps({"config": vars(args), "wall_s": round(time.perf_counter() - start, 2),
                      **{policy: {c: s[c] for c in COLUMNS} for policy, s in summaries.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
