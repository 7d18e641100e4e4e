"""Colocated vs disaggregated prefill/decode on this CPU, same prompts, same run
(docs/design.md, Layer-wise KV transfer and Chunked pipeline-parallel prefill).

Four deployments of the same model stay up side by side and take turns on every prompt, so
a change in machine load hits them alike: colocated (one engine), 1 prefill + 1 decode with
layer-wise KV sends, the same with every layer sent after the prompt is computed, and a
2-stage pipelined prefill group + 1 decode. Every process runs one torch thread, so prefill
compute is the same everywhere and the differences are the transfer and the pipeline.
TTFT is measured at the caller: from add_request until the first token arrives, which in
the disaggregated modes is after the decode instance holds every layer's K/V.

    python benchmarks/disagg.py --lengths 256 512 1024 2048 4096
"""
import argparse
import json
import os
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from minicake.config import EngineConfig
from minicake.sampling import SamplingParams
from minicake.disagg.cluster import Cluster

MODES = {  # name -> (Cluster arguments, EngineConfig overrides)
    "colocated": (dict(colocated=True), {}),
    "1P+1D layer-wise": (dict(prefill_instances=1, decode_instances=1), {}),
    "1P+1D send-after": (dict(prefill_instances=1, decode_instances=1), dict(kv_transfer_layerwise=False)),
    "2-stage+1D": (dict(pipeline_stages=2), {}),
}


def random_prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def finish(cluster: Cluster, request_ids: set[str], start: float, limit: float = 600.0) -> dict:
    """Wait until every request finished; request id -> (first token time, times of each token)."""
    times = {rid: [] for rid in request_ids}
    pending = set(request_ids)
    while pending:
        assert time.monotonic() - start < limit, f"requests {sorted(pending)} did not finish in {limit}s"
        for out in cluster.get_outputs(timeout=1.0):
            assert out.finish_reason != "abort", f"{out.request_id} aborted: {out.error}"
            times[out.request_id] += [time.monotonic()] * len(out.new_token_ids)
            if out.finished:
                pending.discard(out.request_id)
    return times


def kv_totals(cluster: Cluster) -> tuple[float, float, int]:
    """Summed over instances: prefill time spent starting K/V sends, decode wait for K/V after
    prefill compute ended, and the number of transfers completed."""
    stats = cluster.stats()
    return (sum(s.get("kv_send_s", 0.0) for s in stats), sum(s.get("kv_wait_s", 0.0) for s in stats),
            sum(s.get("num_transfers", 0) for s in stats))


def ttft(cluster: Cluster, prompt: list[int], rid: str) -> tuple[float, float]:
    """(TTFT, the part of it the K/V transfer added: the prefill's time gathering and starting
    sends plus the decode's wait after prefill compute ended; 0 colocated)."""
    before = kv_totals(cluster)
    start = time.monotonic()
    cluster.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    first = finish(cluster, {rid}, start)[rid][0] - start
    if not any(s["role"] == "decode" for s in cluster.stats()):
        return first, 0.0
    deadline = time.monotonic() + 5.0
    while kv_totals(cluster)[2] == before[2] and time.monotonic() < deadline:
        time.sleep(0.05)  # the instances report their stats a moment later
    time.sleep(0.3)
    after = kv_totals(cluster)
    assert after[2] == before[2] + 1, "the decode instance did not report the transfer"
    return first, (after[0] - before[0]) + (after[1] - before[1])


def decode_rate(cluster: Cluster, prompts: list[list[int]], max_tokens: int, tag: str) -> float:
    """Tokens per second from the moment every request has its first token to the last one."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.monotonic()
    for i, p in enumerate(prompts):
        cluster.add_request(f"{tag}-{i}", p, params)
    times = finish(cluster, {f"{tag}-{i}" for i in range(len(prompts))}, start)
    t0 = max(t[0] for t in times.values())
    tokens = [x for t in times.values() for x in t if x > t0]
    return len(tokens) / (max(tokens) - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=2, help="TTFT samples per length and mode (median kept)")
    p.add_argument("--chunk", type=int, default=1024, help="max_num_batched_tokens: the prefill chunk")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = p.parse_args()

    # a long timeout: on a loaded 2-core machine a stage can stall for long, and this measures speed, not faults
    base = EngineConfig(model=args.model, device="cpu", num_threads=1, max_num_batched_tokens=args.chunk,
                        kv_transfer_timeout=300.0,
                        num_kv_blocks=(max(args.lengths) + args.decode_batch * (256 + args.decode_tokens)) // 16 + 16)
    console = Console()
    load = os.getloadavg()[0]
    clusters = {}
    try:
        for name in args.modes:
            kwargs, overrides = MODES[name]
            console.print(f"starting {name} ...")
            clusters[name] = Cluster(EngineConfig(**(vars(base) | overrides)), **kwargs)
        vocab = clusters[args.modes[0]].model_config.vocab_size
        for name, c in clusters.items():  # warm-up: first-call costs stay out of the figures
            ttft(c, random_prompt(64, 0, vocab), f"warm-{name}")
        samples = {name: {n: [] for n in args.lengths} for name in clusters}
        waits = {name: {n: [] for n in args.lengths} for name in clusters}
        for n in args.lengths:
            for r in range(args.repeats):
                prompt = random_prompt(n, 1000 * n + r, vocab)  # the same prompt for every mode
                for name, c in clusters.items():
                    first, wait = ttft(c, prompt, f"ttft-{n}-{r}")
                    samples[name][n].append(first)
                    waits[name][n].append(wait)
                    console.print(f"  {name:18s} {n:5d} tokens: TTFT {first:.3f}s, transfer adds {wait:.3f}s")
        decode_prompts = [random_prompt(256, 7 + i, vocab) for i in range(args.decode_batch)]
        rates = {name: decode_rate(c, decode_prompts, args.decode_tokens, "dec") for name, c in clusters.items()}
        load = max(load, os.getloadavg()[0])
    finally:
        for c in clusters.values():
            c.close()
    report(console, args, samples, waits, rates, load)


def report(console: Console, args, samples: dict, waits: dict, rates: dict, load: float) -> None:
    medians = {name: {n: statistics.median(v) for n, v in by_len.items()} for name, by_len in samples.items()}
    wait_medians = {name: {n: statistics.median(v) for n, v in by_len.items()} for name, by_len in waits.items()}
    ref = medians.get("colocated")
    table = Table(title=f"TTFT (median of {args.repeats}, seconds) and decode speed; "
                        f"load average up to {load:.1f} on {os.cpu_count()} cores")
    table.add_column("mode")
    for n in args.lengths:
        table.add_column(f"{n} tok", justify="right")
    table.add_column(f"decode tok/s (batch {args.decode_batch})", justify="right")
    for name, by_len in medians.items():
        cells = [f"{t:.3f}" + (f" ({t / ref[n] - 1:+.0%})" if ref and name != "colocated" else "")
                 for n, t in by_len.items()]
        table.add_row(name, *cells, f"{rates[name]:.1f}")
    console.print(table)
    console.print("(+x%): TTFT against colocated, measured a moment apart, so machine load moves it too")
    waits_table = Table(title="Time the K/V transfer adds: prefill gathering blocks and starting sends, plus "
                              "the decode side's wait after prefill compute (median s, share of TTFT)")
    waits_table.add_column("mode")
    for n in args.lengths:
        waits_table.add_column(f"{n} tok", justify="right")
    for name, by_len in wait_medians.items():
        if name != "colocated":
            waits_table.add_row(name, *[f"{w:.3f} ({w / medians[name][n]:.0%})" for n, w in by_len.items()])
    console.print(waits_table)
    print(json.dumps({"benchmark": "disagg", "model": args.model, "chunk": args.chunk, "load_avg": round(load, 2),
                      "ttft_s": {name: {str(n): round(t, 4) for n, t in v.items()} for name, v in medians.items()},
                      "transfer_adds_s": {name: {str(n): round(w, 4) for n, w in v.items()}
                                                  for name, v in wait_medians.items() if name != "colocated"},
                      "decode_tok_s": {name: round(r, 2) for name, r in rates.items()}}))


if __name__ == "__main__":
    main()
