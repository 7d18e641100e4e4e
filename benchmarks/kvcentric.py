"""KVCache-centric routing, live against simulated, on a slice of the Mooncake conversation trace.

Starts one cluster (P prefill instances with host KV pools, 1 decode instance) and replays the
same requests once per prefill scheduler (random, load, cache-local, kvcache): prefix hit rate
(token-weighted) and mean TTFT / TBT / TPOT as the client sees them. Beside each run, the
simulator's prediction for the same requests and arrival times, with the same Conductor code and
the cost profile fitted on this machine, its instances sharing the machine's cores as the live
ones do (SimConfig.cpu_cores; also shown as if each had its own). Also per instance process: the CPU time it
used and the time it waited for a core (/proc schedstat). Prints tables, ends with one JSON line.

The slice: the first multi-turn conversations of the trace (requests grouped by their first block
after the shared system prompt), their turns in trace order, re-spaced at --rate requests/s.
Each 512-token hash block becomes --block-tokens fixed random tokens (lengths scaled alike), and
every run draws fresh token blocks, so no run inherits another's cache.
"""
import argparse
import json
import math
import os
import random
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
from rich.console import Console
from rich.table import Table

from minicake.cache.block_keys import block_keys
from minicake.config import EngineConfig
from minicake.sampling import SamplingParams
from minicake.conductor.conductor import SCHEDULERS, ConductorConfig, Request
from minicake.conductor.cost_model import CPU_PROFILE, load_profile
from minicake.sim.simulator import SimConfig, Simulator
from minicake.sim.trace import TRACE_BLOCK_SIZE, TraceEntry, parse_line
from minicake.disagg.cluster import Cluster
from minicake.traces import open_trace

SIMS = ("sim", "sim_alone")  # simulated with the instances sharing the cores, and as if each had its own
STATS_SETTLE_S = 0.5
PER_REQUEST = ("ttft_s", "tbt_s", "gaps_s")  # kept in --dump only


def conversation_slice(path: str, num_requests: int, max_input: int, scan: int = 30000) -> list[tuple[int, int, list[int]]]:
    """(input tokens, output tokens, hash ids) of the turns of the first conversations with >= 3 turns."""
    turns = defaultdict(list)
    with open_trace(path) as f:
        for lineno, line in zip(range(scan), f):
            ts, n_in, n_out, ids = parse_line(line, f"{path}:{lineno + 1}")
            if len(ids) > 1:
                turns[ids[1]].append((ts, n_in, n_out, ids))
    chosen = []
    for conv in turns.values():  # dicts keep first-appearance order
        if len(conv) >= 3 and max(n for _, n, _, _ in conv) <= max_input:
            chosen += conv
        if len(chosen) >= num_requests:
            break
    chosen.sort(key=lambda t: t[0])
    return [(n_in, n_out, ids) for _, n_in, n_out, ids in chosen[:num_requests]]


def prompt_tokens(n_in: int, ids: list[int], block_tokens: int, vocab: int, salt: int) -> list[int]:
    """Each hash id -> the same `block_tokens` random tokens (within one run); length scaled."""
    tokens = []
    for h in ids:
        rng = random.Random(f"{salt}-{h}")
        tokens += [rng.randrange(3, vocab) for _ in range(block_tokens)]
    return tokens[:max(2, math.ceil(n_in * block_tokens / TRACE_BLOCK_SIZE))]


def replay(cluster: Cluster, prompts: list[list[int]], outputs: list[int], arrivals: list[float]) -> dict:
    """Send each request at its arrival time; per request: TTFT, token gaps, cached tokens."""
    start = time.monotonic()
    first, last, gaps, cached = {}, {}, defaultdict(list), {}
    sent, done = 0, 0
    while done < len(prompts):
        now = time.monotonic() - start
        while sent < len(prompts) and arrivals[sent] <= now:
            cluster.add_request(f"r{sent}", prompts[sent], SamplingParams(temperature=0, max_tokens=outputs[sent],
                                                                          ignore_eos=True))
            sent += 1
        wait = arrivals[sent] - now if sent < len(prompts) else 1.0
        for out in cluster.get_outputs(timeout=max(0.001, min(wait, 1.0))):
            rid, t = int(out.request_id[1:]), time.monotonic() - start
            assert out.finish_reason != "abort", f"request {rid} aborted: {out.error}"
            if out.new_token_ids:
                if rid not in first:
                    first[rid], cached[rid] = t, out.num_cached_tokens
                else:
                    gaps[rid].append(t - last[rid])
                last[rid] = t
            done += out.finished
    ttft = [first[i] - arrivals[i] for i in range(len(prompts))]
    return summarize(ttft, [gaps[i] for i in range(len(prompts))],
                     sum(cached.values()) / sum(len(p) for p in prompts))


def summarize(ttft: list[float], gaps: list[list[float]], hit_rate: float) -> dict:
    """Mean TTFT, the paper's TBT (mean of each request's slowest 10% of gaps) and TPOT (mean gap)."""
    tbt = [float(np.mean(sorted(g)[-math.ceil(0.1 * len(g)):])) if g else 0.0 for g in gaps]
    tpot = [float(np.mean(g)) for g in gaps if g]
    return {"hit_rate_token": hit_rate, "avg_ttft_s": float(np.mean(ttft)),
            "avg_tbt_s": float(np.mean([t for t, g in zip(tbt, gaps) if g])), "avg_tpot_s": float(np.mean(tpot)),
            "ttft_s": ttft, "tbt_s": tbt, "gaps_s": gaps}


def simulate(scheduler: str, cost, prompts, outputs, arrivals, args, block_size: int, kv_tokens: int,
             cpu_cores: int | None) -> dict:
    trace = [TraceEntry(a, Request(i, len(p), n, block_keys(p, block_size)))
             for i, (p, n, a) in enumerate(zip(prompts, outputs, arrivals))]
    sim = SimConfig(num_prefill=args.prefill, num_decode=1, decode_entry=args.decode_entry,
                    fetch_waits_for_holder=args.decode_entry, cpu_cores=cpu_cores,
                    pool_tokens=(args.num_kv_blocks + args.kv_pool_blocks) * block_size)
    cond = ConductorConfig(scheduler=scheduler, block_size=block_size)
    result = Simulator(sim, cond, replace(cost, kv_capacity_tokens=kv_tokens), trace).run()
    s, tbt = result.summary(), result.tbt()[0]
    return {**{k: s[k] for k in ("hit_rate_token", "avg_ttft_s", "avg_tbt_s", "avg_tpot_s", "fetched_blocks",
                                 "prefill_busy_s", "decode_busy_s")},
            "ttft_s": (result.first_token_s - result.arrival_s).tolist(), "tbt_s": tbt.tolist()}


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting in the run queue) of every thread of a process, so far."""
    run = wait = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                r, w, _ = f.read().split()
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
        run, wait = run + int(r), wait + int(w)
    return run / 1e9, wait / 1e9


def process_times(cluster: Cluster) -> dict[str, tuple[float, float]]:
    """schedstat of each instance process (by role and rank) and of this one (the client + the Cluster)."""
    times = {f"{s.role} {s.rank}": schedstat(p.pid) for s, p in zip(cluster.specs, cluster.procs)}
    return times | {"client + cluster": schedstat(os.getpid())}


def fetched_blocks(cluster: Cluster) -> int:
    return sum(s.get("num_fetched_blocks", 0) for s in cluster.stats())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--trace", default="conversation", help="conversation, synthetic (shipped) or a trace file")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=1.0, help="arrivals per second")
    p.add_argument("--block-tokens", type=int, default=8, help="tokens per 512-token trace block (= block size)")
    p.add_argument("--max-input", type=int, default=24576, help="trace input tokens (before scaling) at most")
    p.add_argument("--max-output", type=int, default=8)
    p.add_argument("--num-kv-blocks", type=int, default=2048)
    p.add_argument("--kv-pool-blocks", type=int, default=2048)
    p.add_argument("--profile", default=CPU_PROFILE)
    p.add_argument("--schedulers", default=",".join(SCHEDULERS))
    p.add_argument("--no-decode-entry", dest="decode_entry", action="store_false",
                   help="simulate without the instance loops' step granularity (SimConfig.decode_entry and "
                   "fetch_waits_for_holder)")
    p.add_argument("--cpu-cores", type=int, default=os.cpu_count(), help="cores the instances share (SimConfig.cpu_cores)")
    p.add_argument("--dump", help="also write every run's per-request TTFT and TBT, live and simulated, to this JSON file")
    args = p.parse_args()
    cost, bs = load_profile(args.profile), args.block_tokens
    slice_ = conversation_slice(args.trace, args.requests, args.max_input)
    arrivals = [i / args.rate for i in range(len(slice_))]
    outputs = [min(n_out, args.max_output) for _, n_out, _ in slice_]
    config = EngineConfig(model=args.model, device="cpu", block_size=bs, num_kv_blocks=args.num_kv_blocks,
                          kv_pool_blocks=args.kv_pool_blocks, max_num_batched_tokens=1024, num_threads=1)
    load_before = os.getloadavg()
    results = {}
    with Cluster(config, prefill_instances=args.prefill, decode_instances=1,
                 conductor=ConductorConfig(block_size=bs), cost=cost) as cluster:
        vocab = cluster.model_config.vocab_size
        kv_tokens = cluster.conductor.decode[0].kv_capacity_tokens
        warm = [prompt_tokens(n_in, ids, bs, vocab, -1) for n_in, _, ids in slice_[:2 * args.prefill]]
        cluster.conductor.config.scheduler = "load"  # every instance runs once before anything is timed
        replay(cluster, warm, outputs[:len(warm)], [0.0] * len(warm))
        for salt, name in enumerate(args.schedulers.split(",")):
            prompts = [prompt_tokens(n_in, ids, bs, vocab, salt) for n_in, _, ids in slice_]
            cluster.conductor.config.scheduler = name
            cluster.conductor.conductor.rng = random.Random(0)  # random routing draws as in the simulator
            times, fetched = process_times(cluster), fetched_blocks(cluster)
            live = replay(cluster, prompts, outputs, arrivals)
            time.sleep(STATS_SETTLE_S)  # the instances' last stats reach the cluster
            live["fetched_blocks"] = fetched_blocks(cluster) - fetched
            live["cpu_s"] = {k: [a - b for a, b in zip(v, times[k])] for k, v in process_times(cluster).items()}
            results[name] = {"live": live, **{key: simulate(name, cost, prompts, outputs, arrivals, args, bs,
                                                            kv_tokens, cores) for key, cores in zip(SIMS, (args.cpu_cores, None))}}
    report(results, args, load_before, os.getloadavg(), [len(p) for p in prompts])
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump(results, f)


def report(results: dict, args, load_before, load_after, lens: list[int]) -> None:
    table = Table(title=f"{args.requests} conversation turns at {args.rate:g} req/s, {args.prefill} prefill + 1 decode, "
                        f"{args.model}; load avg {load_before[0]:.1f} -> {load_after[0]:.1f}")
    for col in ("scheduler", "hit rate live", "sim", "TTFT live s", "sim", "err", "err alone", "TBT live s", "sim",
                "err", "err alone", "TPOT live s", "sim", "fetched live", "sim"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        live, sim, alone = r["live"], r["sim"], r["sim_alone"]
        for run in (sim, alone):
            run["error"] = {k: run[k] / live[k] - 1 for k in ("avg_ttft_s", "avg_tbt_s")}
        table.add_row(name, f"{live['hit_rate_token']:.1%}", f"{sim['hit_rate_token']:.1%}",
                      f"{live['avg_ttft_s']:.3f}", f"{sim['avg_ttft_s']:.3f}", f"{sim['error']['avg_ttft_s']:+.0%}",
                      f"{alone['error']['avg_ttft_s']:+.0%}",
                      f"{live['avg_tbt_s']:.3f}", f"{sim['avg_tbt_s']:.3f}", f"{sim['error']['avg_tbt_s']:+.0%}",
                      f"{alone['error']['avg_tbt_s']:+.0%}",
                      f"{live['avg_tpot_s']:.3f}", f"{sim['avg_tpot_s']:.3f}",
                      str(live["fetched_blocks"]), str(sim["fetched_blocks"]))
    console = Console(width=180)
    console.print(table)
    print(f"prompt tokens: mean {np.mean(lens):.0f}, max {max(lens)} (hit rates are token-weighted); err: sim / live - 1,"
          " 'alone': simulated as if every instance had its own cores")
    cpu = Table(title="CPU seconds used / waited for a core, per process and run (live); predicted work alone (sim)")
    names = list(next(iter(results.values()))["live"]["cpu_s"])
    for col in ("scheduler", *names, "sim prefill work", "sim decode work"):
        cpu.add_column(col, justify="right")
    for name, r in results.items():
        cpu.add_row(name, *(f"{u:.1f} / {w:.1f}" for u, w in r["live"]["cpu_s"].values()),
                    f"{r['sim_alone']['prefill_busy_s']:.1f}", f"{r['sim_alone']['decode_busy_s']:.1f}")
    console.print(cpu)
    summary = {name: {k: {key: v for key, v in run.items() if key not in PER_REQUEST} for k, run in r.items()}
               for name, r in results.items()}
    print(json.dumps({"benchmark": "kvcentric", "model": args.model, "prefill": args.prefill,
                      "requests": args.requests, "rate": args.rate, "block_tokens": args.block_tokens,
                      "profile": args.profile, "load_avg": [load_before[0], load_after[0]], "results": summary}))


if __name__ == "__main__":
    main()
