"""Paged-attention kernel benchmark: decode and prefill time and achieved memory bandwidth on CUDA.

The peer is torch SDPA (scaled_dot_product_attention, enable_gqa) on the same K/V laid out
contiguously; the bound is the device's peak memory bandwidth. Shapes are Llama-3-8B's attention
(32 query heads, 8 KV heads, head_dim 128) in bf16, block_size 16, blocks in random order.

    python benchmarks/kernel_bench.py [--peak-gbps GBPS]

Without CUDA it says so and exits 0. Prints a table, then one JSON line.
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minicake.platforms.devices import gpu_spec  # noqa: E402

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DECODE_BATCHES = (1, 4, 16, 64, 256)
DECODE_CONTEXTS = (512, 2048, 8192, 32768)
PREFILL_SHAPES = ((1, 512), (1, 2048), (1, 8192), (4, 2048), (16, 512))  # (batch, prompt tokens)


def peak_gbps_for(device_name: str) -> float | None:
    """The datasheet peak bandwidth of a device (minicake/platforms/devices.py), or None when its
    name is not in the table."""
    spec = gpu_spec(device_name)
    return spec.hbm_bytes_s / 1e9 if spec else None


@dataclass
class Case:
    """One batch of equal sequences: paged inputs for the kernel, contiguous ones for SDPA."""
    paged: tuple  # (q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    sdpa_q: torch.Tensor  # [batch, num_q_heads, q_len, head_dim]
    sdpa_k: torch.Tensor  # [batch, num_kv_heads, context_len, head_dim]
    sdpa_v: torch.Tensor
    causal: bool
    bytes_moved: int  # K/V + q + out + block tables, each read or written once
    flops: int  # causal attention: 2 matmuls of 2 flops per multiply-add, visible pairs only


def make_case(batch, context_len, q_len, dtype=torch.bfloat16, device="cuda", num_q_heads=NUM_Q_HEADS,
              num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE, seed=0) -> Case:
    """Each sequence holds context_len tokens and asks for its last q_len (q_len 1 = decode,
    q_len = context_len = prefill). SDPA gets the same K/V, gathered from the paged cache."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = math.ceil(context_len / block_size)
    cache_shape = (batch * blocks_per_seq, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=dtype)
    # each sequence's blocks, scattered over the cache in random order: [batch, blocks_per_seq]
    block_tables = torch.randperm(cache_shape[0], generator=gen, device=device).view(batch, -1).to(torch.int32)
    # the same K/V, gathered into sequence order: [batch, context_len, num_kv_heads, head_dim]
    k = k_cache[block_tables.long()].flatten(1, 2)[:, :context_len]
    v = v_cache[block_tables.long()].flatten(1, 2)[:, :context_len]
    q = torch.randn(batch, q_len, num_q_heads, head_dim, generator=gen, device=device, dtype=dtype)
    context_lens = torch.full((batch,), context_len, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=device)
    bytes_moved = (2 * k.numel() + 2 * q.numel()) * k.element_size() + block_tables.numel() * 4
    visible = q_len * (context_len - q_len) + q_len * (q_len + 1) // 2  # keys seen, summed over queries
    return Case(paged=(q.flatten(0, 1), k_cache, v_cache, block_tables, context_lens, query_start_loc),
                sdpa_q=q.transpose(1, 2), sdpa_k=k.transpose(1, 2), sdpa_v=v.transpose(1, 2),
                causal=q_len > 1, bytes_moved=bytes_moved,
                flops=4 * batch * num_q_heads * head_dim * visible)


def run_sdpa(case: Case) -> torch.Tensor:
    """torch SDPA on the contiguous copy; returns [num_tokens, num_q_heads, head_dim] like the kernel.
    is_causal aligns the causal mask top-left, right for prefill (q_len = context_len) and decode (no mask)."""
    # flash for the benchmark's bf16; math only for the tests' small fp32 cases (flash has no fp32 on CUDA)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(case.sdpa_q, case.sdpa_k, case.sdpa_v, is_causal=case.causal,
                                             enable_gqa=True)  # [batch, num_q_heads, q_len, head_dim]
    return out.transpose(1, 2).flatten(0, 1)


def measure(case: Case, peak_gbps) -> dict:
    import triton.testing

    from minicake.kernels.paged_attention import paged_attention
    out = paged_attention(*case.paged)
    max_diff = (out.float() - run_sdpa(case).float()).abs().max().item()
    assert max_diff < 0.05, f"kernel and SDPA disagree by {max_diff}: not timing a wrong kernel"
    kernel_ms = triton.testing.do_bench(lambda: paged_attention(*case.paged), return_mode="median")
    sdpa_ms = triton.testing.do_bench(lambda: run_sdpa(case), return_mode="median")
    gbps = case.bytes_moved / kernel_ms / 1e6
    return dict(kernel_us=round(kernel_ms * 1e3, 1), sdpa_us=round(sdpa_ms * 1e3, 1),
                speedup_vs_sdpa=round(sdpa_ms / kernel_ms, 2), kernel_gbps=round(gbps),
                sdpa_gbps=round(case.bytes_moved / sdpa_ms / 1e6),
                frac_peak=round(gbps / peak_gbps, 3) if peak_gbps else None,
                kernel_tflops=round(case.flops / kernel_ms / 1e9, 1),
                sdpa_tflops=round(case.flops / sdpa_ms / 1e9, 1), max_abs_diff=round(max_diff, 4))


def fits(batch, context_len, q_len) -> bool:
    """K/V twice (paged, then gathered for SDPA) plus q, out and their copies under 60% of free memory."""
    kv_bytes = 2 * batch * context_len * NUM_KV_HEADS * HEAD_DIM * 2
    q_bytes = batch * q_len * NUM_Q_HEADS * HEAD_DIM * 2
    return 2 * kv_bytes + 4 * q_bytes < 0.6 * torch.cuda.mem_get_info()[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-gbps", type=float, help="peak memory bandwidth, GB/s (default: table by device name)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py needs a CUDA GPU (the Triton kernels run natively there); skipped.")
        return
    from rich.console import Console
    from rich.table import Table

    name = torch.cuda.get_device_name()
    peak = args.peak_gbps or peak_gbps_for(name)
    plan = [("decode", b, ctx, 1) for b in DECODE_BATCHES for ctx in DECODE_CONTEXTS]
    plan += [("prefill", b, n, n) for b, n in PREFILL_SHAPES]
    table = Table(title=f"paged attention vs torch SDPA on {name} (peak {peak or '?'} GB/s), "
                        f"bf16, {NUM_Q_HEADS}q/{NUM_KV_HEADS}kv heads, head_dim {HEAD_DIM}")
    for col in ("phase", "batch", "context_len", "kernel us", "SDPA us", "SDPA/kernel", "kernel GB/s",
                "% of peak", "SDPA GB/s", "kernel TFLOP/s", "SDPA TFLOP/s", "max |diff|"):
        table.add_column(col, justify="right")
    rows = []
    for phase, batch, context_len, q_len in plan:
        if not fits(batch, context_len, q_len):
            print(f"skip {phase} batch {batch} context_len {context_len}: does not fit in free memory")
            continue
        row = dict(phase=phase, batch=batch, context_len=context_len,
                   **measure(make_case(batch, context_len, q_len), peak))
        rows.append(row)
        torch.cuda.empty_cache()
        pct = f"{100 * row['frac_peak']:.0f}%" if peak else "?"
        table.add_row(phase, str(batch), str(context_len), str(row["kernel_us"]), str(row["sdpa_us"]),
                      f"{row['speedup_vs_sdpa']}x", str(row["kernel_gbps"]), pct, str(row["sdpa_gbps"]),
                      str(row["kernel_tflops"]), str(row["sdpa_tflops"]), str(row["max_abs_diff"]))
    Console(width=160).print(table)  # wide enough when stdout is a log file
    print(json.dumps(dict(bench="paged_attention", device=name, peak_gbps=peak, dtype="bf16",
                          num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                          block_size=BLOCK_SIZE, rows=rows)))


if __name__ == "__main__":
    main()
