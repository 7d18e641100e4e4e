"""KVCache-centric routing, live against simulated, on a slice of the Mooncake conversation trace.

Starts one cluster (P prefill instances with host KV pools, 1 decode instance) and replays the
same requests once per prefill scheduler (random, load, cache-local, kvcache): prefix hit rate
(token-weighted) and mean TTFT / TBT / TPOT as the client sees them. Beside each run, the
simulator's prediction for the same requests and arrival times, with the same Conductor code and
the cost profile fitted on this machine. Prints a table, ends with one JSON line.

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
from minicake.sched.conductor import SCHEDULERS, ConductorConfig, Request
from minicake.sched.cost_model import load_profile
from minicake.sched.simulator import SimConfig, Simulator
from minicake.sched.trace import TRACE_BLOCK_SIZE, TraceEntry, parse_line
from minicake.serve.cluster import DEFAULT_PROFILE, Cluster


def conversation_slice(path: str, num_requests: int, max_input: int, scan: int = 30000) -> list[tuple[int, int, list[int]]]:
    """(input tokens, output tokens, hash ids) of the turns of the first conversations with >= 3 turns."""
    turns = defaultdict(list)
    with open(path) as f:
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
    tbt = [float(np.mean(sorted(g)[-math.ceil(0.1 * len(g)):])) for g in gaps if g]
    tpot = [float(np.mean(g)) for g in gaps if g]
    return {"hit_rate_token": hit_rate, "avg_ttft_s": float(np.mean(ttft)),
            "avg_tbt_s": float(np.mean(tbt)), "avg_tpot_s": float(np.mean(tpot))}


def simulate(scheduler: str, cost, prompts, outputs, arrivals, args, block_size: int, kv_tokens: int) -> dict:
    trace = [TraceEntry(a, Request(i, len(p), n, block_keys(p, block_size)))
             for i, (p, n, a) in enumerate(zip(prompts, outputs, arrivals))]
    sim = SimConfig(num_prefill=args.prefill, num_decode=1, decode_entry=args.decode_entry,
                    pool_tokens=(args.num_kv_blocks + args.kv_pool_blocks) * block_size)
    cond = ConductorConfig(scheduler=scheduler, block_size=block_size)
    s = Simulator(sim, cond, replace(cost, kv_capacity_tokens=kv_tokens), trace).run().summary()
    return {k: s[k] for k in ("hit_rate_token", "avg_ttft_s", "avg_tbt_s", "avg_tpot_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--trace", default="/work/shared/traces/conversation_trace.jsonl")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=1.0, help="arrivals per second")
    p.add_argument("--block-tokens", type=int, default=8, help="tokens per 512-token trace block (= block size)")
    p.add_argument("--max-input", type=int, default=24576, help="trace input tokens (before scaling) at most")
    p.add_argument("--max-output", type=int, default=8)
    p.add_argument("--num-kv-blocks", type=int, default=2048)
    p.add_argument("--kv-pool-blocks", type=int, default=2048)
    p.add_argument("--profile", default=DEFAULT_PROFILE)
    p.add_argument("--schedulers", default=",".join(SCHEDULERS))
    p.add_argument("--no-decode-entry", dest="decode_entry", action="store_false",
                   help="simulate without the decode loop's step granularity at entry and first token")
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
            live = replay(cluster, prompts, outputs, arrivals)
            results[name] = {"live": live, "sim": simulate(name, cost, prompts, outputs, arrivals, args, bs, kv_tokens)}
    report(results, args, load_before, os.getloadavg(), [len(p) for p in prompts])


def report(results: dict, args, load_before, load_after, lens: list[int]) -> None:
    table = Table(title=f"{args.requests} conversation turns at {args.rate:g} req/s, {args.prefill} prefill + 1 decode, "
                        f"{args.model}; load avg {load_before[0]:.1f} -> {load_after[0]:.1f}")
    for col in ("scheduler", "hit rate live", "sim", "TTFT live s", "sim", "err", "TBT live s", "sim", "err",
                "TPOT live s", "sim"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        live, sim = r["live"], r["sim"]
        err = {k: sim[k] / live[k] - 1 for k in ("avg_ttft_s", "avg_tbt_s")}
        r["sim_error"] = err
        table.add_row(name, f"{live['hit_rate_token']:.1%}", f"{sim['hit_rate_token']:.1%}",
                      f"{live['avg_ttft_s']:.2f}", f"{sim['avg_ttft_s']:.2f}", f"{err['avg_ttft_s']:+.0%}",
                      f"{live['avg_tbt_s']:.3f}", f"{sim['avg_tbt_s']:.3f}", f"{err['avg_tbt_s']:+.0%}",
                      f"{live['avg_tpot_s']:.3f}", f"{sim['avg_tpot_s']:.3f}")
    Console(width=150).print(table)
    print(f"prompt tokens: mean {np.mean(lens):.0f}, max {max(lens)} (hit rates are token-weighted)")
    print(json.dumps({"benchmark": "kvcentric", "model": args.model, "prefill": args.prefill,
                      "requests": args.requests, "rate": args.rate, "block_tokens": args.block_tokens,
                      "load_avg": [load_before[0], load_after[0]], "results": results}))


if __name__ == "__main__":
    main()
