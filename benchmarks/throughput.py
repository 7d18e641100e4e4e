"""Offline throughput: minicake's LLM.generate against transformers' batched generate, same requests.

64 requests, prompt lengths uniform in [32, 512], output lengths uniform in [32, 256], random
prompt tokens, ignore_eos, fixed seed. transformers gets them as one left-padded `generate`
call per --hf-batch-size requests (greedy, as many new tokens as the batch's longest request;
only the requested tokens count). Also printed: the fraction of the matmul roofline, counting
2 x parameters FLOPs for every prompt and generated token against the fp32 matmul rate
measured in this run (before and after; the higher one is used). With --device cuda both run on
the GPU in the engine's dtype (bf16), and the roofline is the GPU's datasheet bf16 peak
(minicake/platforms/devices.py); --enforce-eager turns the engine's CUDA graphs off.

    python benchmarks/throughput.py [--num-requests 64] [--hf-batch-size 64] [--skip-hf] [--device cuda]

Prints a table, then one JSON line.
"""
import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cpu_peers import hf_generate, load_average, load_hf, matmul_gflops, num_parameters  # noqa: E402
from minicake.llm import LLM  # noqa: E402
from minicake.platforms.devices import gpu_spec  # noqa: E402
from minicake.sampling import SamplingParams  # noqa: E402


def make_requests(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(32, 512))], rng.randint(32, 256)) for _ in range(n)]


def run_minicake(llm: LLM, requests) -> float:
    prompts = [p for p, _ in requests]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outputs] == [n for _, n in requests], "every request gets its length"
    return elapsed


def run_hf(hf, requests, batch_size: int) -> float:
    hf_generate(hf, [[1, 2, 3]], 2)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        hf_generate(hf, [p for p, _ in batch], max(n for _, n in batch))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: minicake and transformers on the GPU")
    parser.add_argument("--enforce-eager", action="store_true", help="no decode graphs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    gflops_before = roofline_gflops(args.device)

    settings = {"num_threads": args.threads, "enforce_eager": args.enforce_eager}
    if args.max_num_batched_tokens:
        settings["max_num_batched_tokens"] = args.max_num_batched_tokens
    llm = LLM(args.model, device=args.device, **settings)
    dtype = next(llm.engine.model.parameters()).dtype
    requests = make_requests(args.num_requests, llm.engine.model_config.vocab_size, args.seed)
    prompt_tokens, output_tokens = sum(len(p) for p, _ in requests), sum(n for _, n in requests)
    params = num_parameters(llm.engine.model)
    mc_s = run_minicake(llm, requests)
    preemptions = llm.engine.stats()["num_preemptions"]
    hf_s = None
    if not args.skip_hf:
        model_dir = llm.engine.model_dir
        del llm
        gc.collect()  # the engine's KV cache holds most of a GPU's memory: free it for transformers
        torch.cuda.empty_cache()
        hf_s = run_hf(load_hf(model_dir, args.device, dtype), requests, args.hf_batch_size)
    gflops = max(gflops_before, roofline_gflops(args.device))
    load_after = load_average()

    flops = 2 * params * (prompt_tokens + output_tokens)
    result = {
        "benchmark": "throughput", "device": device_name(args.device), "dtype": str(dtype).removeprefix("torch."),
        "enforce_eager": args.enforce_eager, "num_requests": args.num_requests, "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens, "threads": args.threads, "parameters": params,
        "minicake_s": round(mc_s, 2), "minicake_tok_s": round(output_tokens / mc_s, 1),
        "hf_s": hf_s and round(hf_s, 2), "hf_tok_s": hf_s and round(output_tokens / hf_s, 1),
        "speedup_vs_hf": hf_s and round(hf_s / mc_s, 2), "hf_batch_size": args.hf_batch_size,
        "matmul_gflops": gflops and round(gflops, 1), "minicake_gflops": round(flops / mc_s / 1e9, 1),
        "roofline_fraction": gflops and round(flops / mc_s / 1e9 / gflops, 3), "num_preemptions": preemptions,
        "load_avg_before": load_before, "load_avg_after": load_after,
    }
    table = Table(title=f"offline throughput, {args.num_requests} requests, {prompt_tokens} prompt + "
                        f"{output_tokens} generated tokens, {device_name(args.device)}, {args.threads} threads, "
                        f"{str(dtype).removeprefix('torch.')}{', eager' if args.enforce_eager else ''}")
    for col in ("engine", "seconds", "generated tok/s", "GFLOP/s (2 x params x tokens)", "of matmul roofline"):
        table.add_column(col, justify="right")
    share = (lambda s: f"{flops / s / 1e9 / gflops:.0%}") if gflops else (lambda s: "?")
    table.add_row("minicake", f"{mc_s:.1f}", f"{output_tokens / mc_s:.1f}", f"{flops / mc_s / 1e9:.1f}", share(mc_s))
    if hf_s:
        table.add_row(f"transformers (batch {args.hf_batch_size}, padded)", f"{hf_s:.1f}", f"{output_tokens / hf_s:.1f}",
                      f"{flops / hf_s / 1e9:.1f}", share(hf_s))
    roofline = "matmul roofline (2048^3 fp32)" if args.device == "cpu" else "datasheet bf16 peak"
    table.add_row(roofline, "", "", f"{gflops:.1f}" if gflops else "?", "100%")
    Console().print(table)
    print(f"speedup vs transformers: {result['speedup_vs_hf']}x; load average {load_before:.2f} -> {load_after:.2f}")
    print(json.dumps(result))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def roofline_gflops(device: str) -> float | None:
    """The fp32 matmul rate measured on this CPU, or the GPU's datasheet bf16 peak (None: not in the table)."""
    if device == "cpu":
        return matmul_gflops()
    spec = gpu_spec(device_name(device))
    return spec and spec.bf16_flops / 1e9


if __name__ == "__main__":
    main()
