"""`python -m minicake.bench`: the serving benchmark client, shaped like `vllm bench serve`.

It streams requests to a running `/v1/completions` endpoint: a random workload, or a replay
of a Mooncake trace (docs/design.md, Traces) in which every hash id becomes one fixed random block of
token ids, so requests that share hash ids share a prefix, and lengths are scaled by
`--scale`. It reports TTFT, TPOT, ITL, E2E, the paper's TBT and goodput under the SLOs.
"""
import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from minicake.sim.trace import TRACE_BLOCK_SIZE, read_trace
from minicake.serve.metrics import paper_tbt

REQUEST_TIMEOUT_S = 600.0


@dataclass
class BenchRequest:
    prompt: list[int]  # token ids, sent as the completions prompt
    output_len: int  # sent as max_tokens with ignore_eos, so exactly this many come back
    arrival_s: float  # send time, seconds after the start of the run


@dataclass
class BenchResult:
    ok: bool
    prompt_len: int
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)  # gaps between streamed chunks
    e2e: float = 0.0
    output_tokens: int = 0
    error: str = ""


def trace_requests(path: str, num_requests: int, scale: float, vocab_size: int, seed: int,
                   speed: float = 1.0) -> list[BenchRequest]:
    """The first `num_requests` of a trace. Hash id h becomes the token block
    rng(seed, h).integers(vocab_size) of round(512 * scale) tokens: equal ids, equal blocks."""
    block_len = max(1, round(TRACE_BLOCK_SIZE * scale))
    blocks: dict[int, list[int]] = {}
    requests = []
    for ts_ms, n_in, n_out, hash_ids in read_trace(path, num_requests):
        for h in hash_ids:
            if h not in blocks:
                rng = np.random.default_rng([seed, h])
                blocks[h] = rng.integers(0, vocab_size, block_len).tolist()
        tokens = [t for h in hash_ids for t in blocks[h]]
        prompt = tokens[:max(1, round(n_in * scale))]
        requests.append(BenchRequest(prompt, max(1, round(n_out * scale)), ts_ms / 1000 / speed))
    return requests


def random_requests(num_requests: int, input_len: int, output_len: int, vocab_size: int,
                    seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    return [BenchRequest(rng.integers(0, vocab_size, input_len).tolist(), output_len, 0.0)
            for _ in range(num_requests)]


def poisson_arrivals(requests: list[BenchRequest], rate: float, seed: int) -> None:
    """Replace arrival times by a Poisson process of `rate` requests/s (inf: all at once)."""
    gaps = np.random.default_rng(seed).exponential(1 / rate, len(requests)) if math.isfinite(
        rate) else np.zeros(len(requests))
    for r, t in zip(requests, np.cumsum(gaps) - gaps[0]):
        r.arrival_s = float(t)


async def send(client: httpx.AsyncClient, model: str, req: BenchRequest) -> BenchResult:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    result = BenchResult(ok=False, prompt_len=len(req.prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk, now = json.loads(line[6:]), time.perf_counter()
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
        result.e2e, result.ok = last - start, result.output_tokens > 0
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run(base_url: str, model: str | None, requests: list[BenchRequest]
              ) -> tuple[list[BenchResult], float]:
    """Send every request at its arrival time; returns the results and the wall duration."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S,
                                 limits=limits) as client:
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        start = time.perf_counter()

        async def at_arrival(req: BenchRequest) -> BenchResult:
            await asyncio.sleep(max(0.0, start + req.arrival_s - time.perf_counter()))
            return await send(client, model, req)

        results = await asyncio.gather(*(at_arrival(r) for r in requests))
        return list(results), time.perf_counter() - start


def stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    v = np.asarray(values) * 1000
    return {"mean": float(v.mean()), "median": float(np.median(v)),
            "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99))}


def summarize(results: list[BenchResult], duration: float, ttft_slo: float | None,
              tbt_slo: float | None) -> dict:
    """vllm-bench-serve-style numbers; TBT per request is the paper's (slowest 10% of gaps),
    TPOT the plain mean gap, and a request is effective when finished within both SLOs."""
    ok = [r for r in results if r.ok]
    tbts = [paper_tbt(r.itls) for r in ok]
    effective = sum(1 for r, tbt in zip(ok, tbts) if (ttft_slo is None or r.ttft <= ttft_slo)
                    and (tbt_slo is None or tbt <= tbt_slo))
    out_tokens, in_tokens = sum(r.output_tokens for r in ok), sum(r.prompt_len for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_slo_s": ttft_slo, "tbt_slo_s": tbt_slo, "effective_requests": effective,
        "effective_share": effective / len(results) if results else 0.0,
        "goodput": effective / duration,
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "tpot_ms": stats_ms([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok
                             if r.output_tokens > 1]),
        "itl_ms": stats_ms([gap for r in ok for gap in r.itls]),
        "tbt_ms": stats_ms([tbt for r, tbt in zip(ok, tbts) if r.itls]),
        "e2e_ms": stats_ms([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def print_report(summaries: dict[str, dict], console: Console) -> None:
    """One column per run (several when a script compares servers on the same requests)."""
    table = Table(title="serving benchmark")
    table.add_column("metric")
    for name in summaries:
        table.add_column(name, justify="right")
    rows = [("requests completed / sent", lambda s: f"{s['completed']} / {s['requests']}"),
            ("duration (s)", lambda s: f"{s['duration_s']:.1f}"),
            ("request throughput (req/s)", lambda s: f"{s['request_throughput']:.3f}"),
            ("output throughput (tok/s)", lambda s: f"{s['output_throughput']:.1f}"),
            ("total token throughput (tok/s)", lambda s: f"{s['total_token_throughput']:.1f}"),
            ("goodput (req/s)", lambda s: f"{s['goodput']:.3f}"),
            ("effective requests (share)", lambda s: f"{s['effective_share']:.0%}")]
    for metric in ("ttft", "tpot", "itl", "tbt", "e2e"):
        for stat in ("mean", "median", "p90", "p99"):
            rows.append((f"{metric.upper()} {stat} (ms)",
                         lambda s, m=metric, st=stat: f"{s[f'{m}_ms'][st]:.1f}"))
    for label, cell in rows:
        table.add_row(label, *(cell(s) for s in summaries.values()))
    console.print(table)
    for name, s in summaries.items():
        for error in s["errors"]:
            console.print(f"[red]{name}: {error}")


def workload(args) -> tuple[list[BenchRequest], str]:
    """The requests to send and a one-line description of them (scaling said out loud)."""
    if args.trace:
        requests = trace_requests(args.trace, args.num_requests, args.scale, args.vocab_size,
                                  args.seed, args.speed)
        what = (f"first {len(requests)} requests of {args.trace}, lengths x{args.scale} "
                f"({max(1, round(TRACE_BLOCK_SIZE * args.scale))} tokens per hash id)")
    else:
        requests = random_requests(args.num_requests, args.input_len, args.output_len,
                                   args.vocab_size, args.seed)
        what = f"{len(requests)} random requests, {args.input_len} in / {args.output_len} out"
    if args.rate is not None:
        poisson_arrivals(requests, args.rate, args.seed)
        what += f", Poisson arrivals at {args.rate} req/s"
    elif args.trace:
        what += f", trace timestamps x1/{args.speed}"
    return requests, what


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minicake.bench", description=__doc__)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name to send (default: the server's first model)")
    p.add_argument("--trace", help="Mooncake trace to replay: conversation, synthetic (shipped) "
                   "or a .jsonl[.gz] file; default: random workload")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--scale", type=float, default=1 / 32,
                   help="trace lengths (prompt, output, hash block) are multiplied by this")
    p.add_argument("--speed", type=float, default=1.0, help="replay trace timestamps this much faster")
    p.add_argument("--rate", type=float, help="Poisson arrivals at this many requests/s "
                   "(inf: all at once) instead of trace timestamps")
    p.add_argument("--input-len", type=int, default=128, help="random workload prompt tokens")
    p.add_argument("--output-len", type=int, default=32, help="random workload output tokens")
    p.add_argument("--vocab-size", type=int, default=49152,
                   help="random token ids are drawn below this (49152: the bundled model)")
    p.add_argument("--ttft-slo", type=float, help="seconds")
    p.add_argument("--tbt-slo", type=float, help="seconds, on the paper's TBT")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("num_requests", "scale", "speed", "rate", "input_len", "output_len", "vocab_size",
                 "ttft_slo", "tbt_slo"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("scale", "speed", "ttft_slo", "tbt_slo"):  # --rate inf means all at once
        if getattr(args, name) is not None and not math.isfinite(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        requests, what = workload(args)
    except ValueError as e:  # a bad trace: its file and line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    console = Console()
    console.print(f"workload: {what}")
    results, duration = asyncio.run(run(args.base_url, args.model, requests))
    summary = summarize(results, duration, args.ttft_slo, args.tbt_slo)
    print_report({args.base_url: summary}, console)
    print(json.dumps({"workload": what, **summary}, allow_nan=False), flush=True)
    return summary


if __name__ == "__main__":
    main()
