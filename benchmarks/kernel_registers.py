"""Registers and spills of the paged-attention kernel compiled for a Hopper GPU (sm_90), no GPU needed.

Compiles `_paged_attention_kernel` with the launcher's own tile sizes (`launch_config`) through
Triton's NVIDIA backend and its bundled ptxas, and reads ptxas's report. A proxy for speed on a
machine without a GPU: spills go to local memory, and registers per thread bound occupancy.

    python benchmarks/kernel_registers.py

Prints a table, then one JSON line.
"""
import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for real, even when run from the test environment
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from minicake.kernels.paged_attention import _paged_attention_kernel, launch_config  # noqa: E402

INDEX_PTRS = ("block_tables_ptr", "context_lens_ptr", "query_start_loc_ptr")
FP32_PTRS = ("m_ptr", "l_ptr")
# strides that are multiples of head_dim in every real launch, so Triton's launcher marks them
# divisible by 16 (what lets it vectorise the loads); pointers from torch are 16-byte aligned too
ALIGNED_STRIDES = ("stride_q_t", "stride_q_h", "stride_o_t", "stride_o_h", "stride_k_b", "stride_k_o",
                   "stride_k_h", "stride_v_b", "stride_v_o", "stride_v_h")


def compile_report(phase: str, group: int, head_dim: int, dtype: str = "bf16", block_size: int = 16) -> dict:
    """ptxas registers and spill bytes of one kernel specialisation for sm_90."""
    num_seqs = 8
    num_tokens = num_seqs if phase == "decode" else 512 * num_seqs
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    block_m, block_q, block_n, num_warps = launch_config(num_tokens, num_seqs, group, torch_dtype)
    constexprs = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q,
                      BLOCK_N=block_n, NUM_SPLITS=1, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                      DOT_DTYPE={"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype])
    names = _paged_attention_kernel.arg_names
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i32" if name in INDEX_PTRS else "*fp32" if name in FP32_PTRS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
            if name in ALIGNED_STRIDES:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(_paged_attention_kernel, signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    registers = int(re.search(r"Used (\d+) registers", log.getvalue()).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log.getvalue()).group(1))
    return dict(phase=phase, dtype=dtype, group=group, head_dim=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=num_warps, registers=registers, spill_store_bytes=spills,
                shared_bytes=kernel.metadata.shared)


def main():
    from rich.console import Console
    from rich.table import Table

    rows = [compile_report(phase, group, head_dim)
            for phase in ("decode", "prefill") for group in (1, 3, 4) for head_dim in (64, 128)]
    rows.append(compile_report("prefill", 4, 128, dtype="fp32"))  # the tests' fp32 path on a GPU
    table = Table(title="paged attention compiled for sm_90: ptxas report per thread")
    for col in rows[0]:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*map(str, row.values()))
    Console(width=160).print(table)
    print(json.dumps(dict(bench="paged_attention_registers", target="sm_90", triton=triton.__version__, rows=rows)))


if __name__ == "__main__":
    main()
