"""Single-stream decode speed: one request, 256 new tokens, minicake against transformers.

A batch-1 decode step reads every weight once, so its bound is memory bandwidth: parameters
x 4 bytes per token against the read bandwidth measured in this run (printed as the bound).
Decode speed excludes the first token: (256 - 1) tokens over the time after the first token,
for minicake from the engine's own steps, for transformers from generate(256) - generate(1).
With --device cuda both run on the GPU in the engine's dtype (bf16) and the bound is the GPU's
datasheet bandwidth (minicake/platforms/devices.py); minicake's ms/token is then its batch-1
decode step, with CUDA graphs unless --enforce-eager.

    python benchmarks/single_stream.py [--new-tokens 256] [--threads N] [--device cuda] [--enforce-eager]

Prints a table, then one JSON line.
"""
import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cpu_peers import hf_generate, load_average, load_hf, num_parameters, read_gbps  # noqa: E402
from minicake.llm import LLM  # noqa: E402
from minicake.platforms.devices import gpu_spec  # noqa: E402
from minicake.sampling import SamplingParams  # noqa: E402

PROMPT = "The history of the printing press begins in"


def minicake_decode(llm: LLM, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens per second after it)."""
    engine = llm.engine
    engine.add_request("warm-up", prompt_ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("bench", prompt_ids, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    start = time.perf_counter()
    first = None
    while engine.has_unfinished_requests():
        engine.step()
        first = first or time.perf_counter()
    end = time.perf_counter()
    return first - start, (new_tokens - 1) / (end - first)


def hf_decode(hf, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    hf_generate(hf, [prompt_ids], 4)  # warm-up
    start = time.perf_counter()
    hf_generate(hf, [prompt_ids], 1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    hf_generate(hf, [prompt_ids], new_tokens)
    return ttft, (new_tokens - 1) / (time.perf_counter() - start - ttft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: minicake and transformers on the GPU")
    parser.add_argument("--enforce-eager", action="store_true", help="no decode graphs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    gbps = bandwidth_gbps(args.device)

    llm = LLM(args.model, device=args.device, num_threads=args.threads, num_kv_blocks=64,
              enforce_eager=args.enforce_eager)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    dtype = next(llm.engine.model.parameters()).dtype
    weight_bytes = num_parameters(llm.engine.model) * dtype.itemsize
    mc_ttft, mc_rate = minicake_decode(llm, prompt_ids, args.new_tokens)
    model_dir = llm.engine.model_dir
    del llm
    gc.collect()  # free the engine's GPU memory for transformers
    torch.cuda.empty_cache()
    hf_ttft, hf_rate = hf_decode(load_hf(model_dir, args.device, dtype), prompt_ids, args.new_tokens)
    gbps = gbps and max(gbps, bandwidth_gbps(args.device))
    bound = gbps and gbps * 1e9 / weight_bytes
    load_after = load_average()

    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    table = Table(title=f"single-stream decode, {len(prompt_ids)}-token prompt, {args.new_tokens} new tokens, "
                        f"{device}, {args.threads} threads, {str(dtype).removeprefix('torch.')}"
                        f"{', eager' if args.enforce_eager else ''}")
    for col in ("engine", "decode tok/s", "ms/token", "TTFT ms", "of bandwidth bound"):
        table.add_column(col, justify="right")
    for name, ttft, rate in (("minicake", mc_ttft, mc_rate), ("transformers", hf_ttft, hf_rate)):
        table.add_row(name, f"{rate:.1f}", f"{1000 / rate:.2f}", f"{1000 * ttft:.0f}",
                      f"{rate / bound:.0%}" if bound else "?")
    if bound:
        table.add_row(f"bound: {weight_bytes / 1e6:.0f} MB weights at {gbps:.1f} GB/s", f"{bound:.1f}",
                      f"{1000 / bound:.2f}", "", "100%")
    Console().print(table)
    print(f"speedup vs transformers: {mc_rate / hf_rate:.2f}x; load average {load_before:.2f} -> {load_after:.2f}")
    print(json.dumps({
        "benchmark": "single_stream", "device": device, "dtype": str(dtype).removeprefix("torch."),
        "enforce_eager": args.enforce_eager, "new_tokens": args.new_tokens, "threads": args.threads,
        "minicake_ms_per_token": round(1000 / mc_rate, 3),
        "minicake_tok_s": round(mc_rate, 1), "hf_tok_s": round(hf_rate, 1), "speedup_vs_hf": round(mc_rate / hf_rate, 2),
        "minicake_ttft_ms": round(1000 * mc_ttft, 1), "hf_ttft_ms": round(1000 * hf_ttft, 1),
        "weight_bytes": weight_bytes, "read_gbps": gbps and round(gbps, 1), "bandwidth_bound_tok_s": bound and round(bound, 1),
        "load_avg_before": load_before, "load_avg_after": load_after,
    }))


def bandwidth_gbps(device: str) -> float | None:
    """The read bandwidth measured on this CPU, or the GPU's datasheet peak (None: not in the table)."""
    if device == "cpu":
        return read_gbps()
    spec = gpu_spec(torch.cuda.get_device_name(device))
    return spec and spec.hbm_bytes_s / 1e9


if __name__ == "__main__":
    main()
