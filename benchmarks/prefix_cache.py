"""Prefix caching: time to first token of a request whose first ~1000 tokens were served before,
against the same kind of request cold.

Each trial draws a fresh random 1024-token prefix. Cold: prefix + suffix A, nothing cached.
Warm: prefix + suffix B (32 tokens each), right after: the prefix's full blocks are reused and
only the rest is computed. TTFT is the time of LLM.generate with max_tokens=1; the median of
the trials is reported, with num_cached_tokens of the warm request.

    python benchmarks/prefix_cache.py [--prefix-tokens 1024] [--trials 3]

Prints a table, then one JSON line.
"""
import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cpu_peers import load_average  # noqa: E402
from minicake.llm import LLM  # noqa: E402
from minicake.sampling import SamplingParams  # noqa: E402

FIRST_TOKEN = SamplingParams(temperature=0, max_tokens=1)


def ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    start = time.perf_counter()
    [out] = llm.generate([prompt], FIRST_TOKEN, use_tqdm=False)
    return time.perf_counter() - start, out.num_cached_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--suffix-tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    llm = LLM(args.model, device="cpu", num_threads=args.threads, max_num_batched_tokens=2048)
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)

    def tokens(n):
        return [rng.randrange(vocab) for _ in range(n)]

    ttft(llm, tokens(64))  # warm-up
    cold, warm, cached = [], [], []
    for _ in range(args.trials):
        prefix = tokens(args.prefix_tokens)
        t, hit = ttft(llm, prefix + tokens(args.suffix_tokens))
        assert hit == 0, "a fresh random prefix cannot be cached"
        cold.append(t)
        t, hit = ttft(llm, prefix + tokens(args.suffix_tokens))
        warm.append(t)
        cached.append(hit)
    cold_ms, warm_ms = 1000 * statistics.median(cold), 1000 * statistics.median(warm)
    load_after = load_average()

    prompt_len = args.prefix_tokens + args.suffix_tokens
    table = Table(title=f"time to first token, {prompt_len}-token prompts, median of {args.trials}, "
                        f"{args.threads} threads, fp32")
    for col in ("request", "TTFT ms", "cached tokens"):
        table.add_column(col, justify="right")
    table.add_row("cold (nothing cached)", f"{cold_ms:.0f}", "0")
    table.add_row(f"warm (same {args.prefix_tokens}-token prefix)", f"{warm_ms:.0f}", str(cached[0]))
    Console().print(table)
    print(f"warm/cold: {warm_ms / cold_ms:.3f}; load average {load_before:.2f} -> {load_after:.2f}")
    print(json.dumps({
        "benchmark": "prefix_cache", "prefix_tokens": args.prefix_tokens, "suffix_tokens": args.suffix_tokens,
        "trials": args.trials, "threads": args.threads, "cold_ttft_ms": round(cold_ms, 1),
        "warm_ttft_ms": round(warm_ms, 1), "warm_over_cold": round(warm_ms / cold_ms, 3),
        "warm_cached_tokens": cached, "load_avg_before": load_before, "load_avg_after": load_after,
    }))


if __name__ == "__main__":
    main()
