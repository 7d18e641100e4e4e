"""Registers and spills of every Triton kernel specialisation the engine launches, compiled for
Ampere (sm_80) and Hopper (sm_90) with no GPU: Triton's NVIDIA backend and its bundled ptxas.

`compile_report` compiles one kernel with the argument types and constexprs its launcher would
pass and reads ptxas's report; tests/test_kernel_compile.py proves SPECIALISATIONS with it. A proxy
for speed without a GPU: spills go to local memory, and registers per thread bound occupancy.

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

os.environ["TRITON_INTERPRET"] = "0"  # interpreted kernels (the test suite's) cannot be compiled
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from minicake.kernels.paged_attention import (  # noqa: E402
    MAX_SPLITS, _TL_DTYPES, _combine_splits_kernel, _paged_attention_kernel, launch_config)
from minicake.kernels.store_kv import _store_kv_kernel  # noqa: E402

TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
INDEX_PTRS = ("block_tables_ptr", "context_lens_ptr", "query_start_loc_ptr")
FP32_PTRS = ("m_ptr", "l_ptr", "acc_ptr")
# strides that are multiples of head_dim in every real launch, so Triton's launcher marks them
# divisible by 16 (what lets it vectorise the loads); pointers from torch are 16-byte aligned too
ALIGNED_STRIDES = ("stride_q_t", "stride_q_h", "stride_o_t", "stride_o_h", "stride_k_b", "stride_k_o",
                   "stride_k_h", "stride_v_b", "stride_v_o", "stride_v_h", "stride_a_s", "stride_a_t",
                   "stride_a_h", "stride_k_t", "stride_v_t", "stride_kc_b", "stride_kc_o", "stride_kc_h",
                   "stride_vc_b", "stride_vc_o", "stride_vc_h")

# (kernel, dtype, phase, group or num_kv_heads, head_dim, num_splits): the set that covers every
# specialisation (tests/test_kernel_compile.py says why). Groups: SmolLM2-135M 3 (9 q / 3 kv heads,
# head_dim 64), Llama-3 and Qwen3-8B 4 (head_dim 128), Qwen2.5-7B 7 (head_dim 128).
SPECIALISATIONS = (
    ("attention", torch.bfloat16, "decode", 3, 64, 1),
    ("attention", torch.bfloat16, "decode", 4, 128, 1),
    ("attention", torch.bfloat16, "decode", 7, 128, 16),
    ("attention", torch.bfloat16, "prefill", 3, 64, 1),
    ("attention", torch.bfloat16, "prefill", 4, 128, 1),
    ("attention", torch.bfloat16, "prefill", 7, 128, 1),
    ("attention", torch.float16, "decode", 4, 128, 1),
    ("attention", torch.float16, "prefill", 4, 128, 1),
    ("attention", torch.float32, "decode", 3, 64, 2),
    ("attention", torch.float32, "prefill", 4, 128, 1),
    ("combine", torch.bfloat16, "decode", 3, 64, 16),
    ("combine", torch.bfloat16, "decode", 4, 128, MAX_SPLITS),
    ("combine", torch.float16, "decode", 4, 128, 2),
    ("combine", torch.float32, "decode", 3, 64, 2),
    ("store_kv", torch.bfloat16, "any", 3, 64, 1),
    ("store_kv", torch.bfloat16, "any", 8, 128, 1),
    ("store_kv", torch.float16, "any", 8, 128, 1),
    ("store_kv", torch.float32, "any", 3, 64, 1),
)
ARCHS = (80, 90)


def compile_kernel(kernel, arg_types: dict[str, str], constexprs: dict, arch: int, num_warps: int) -> dict:
    """Compile `kernel` for sm_<arch> (arg_types: each non-constexpr argument's Triton type, e.g.
    "*bf16", "i32") through ptxas; returns its registers and spill bytes per thread, shared bytes.
    Raises what Triton raises when a stage (ptxas included) fails."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        signature[name] = "constexpr" if name in constexprs else arg_types[name]
        if name.endswith("_ptr") or name in ALIGNED_STRIDES:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope():
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    report = log.getvalue()
    return dict(registers=int(re.search(r"Used (\d+) registers", report).group(1)),
                spill_store_bytes=int(re.search(r"(\d+) bytes spill stores", report).group(1)),
                shared_bytes=compiled.metadata.shared)


def compile_report(kernel: str, dtype: torch.dtype, phase: str, heads: int, head_dim: int, num_splits: int,
                   arch: int, block_size: int = 16) -> dict:
    """One specialisation as its launcher (kernels/) builds it; `heads` is the query heads per KV
    head for attention, the KV heads for store_kv."""
    name = TYPE_NAMES[dtype]
    ints = {"qk_scale": "fp32", "slot_mapping_ptr": "*i64"}
    if kernel == "attention":
        num_seqs = 8
        num_tokens = num_seqs if phase == "decode" else 512 * num_seqs
        block_m, block_q, block_n, num_warps = launch_config(num_tokens, num_seqs, heads, dtype)
        constexprs = dict(GROUP=heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
                          BLOCK_Q=block_q, BLOCK_N=block_n, NUM_SPLITS=num_splits,
                          DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", DOT_DTYPE=_TL_DTYPES[dtype])
        fn = _paged_attention_kernel
        # split partials are fp32 whatever the dtype
        ints["out_ptr"] = "*fp32" if num_splits > 1 else f"*{name}"
        tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    elif kernel == "combine":
        fn, num_warps, tiles = _combine_splits_kernel, 4, {}
        constexprs = dict(HEAD_DIM=head_dim, NUM_SPLITS=num_splits)
    else:
        fn, num_warps, tiles = _store_kv_kernel, 4, {}
        constexprs = dict(BLOCK_SIZE=block_size, HEAD_DIM=head_dim, NUM_KV_HEADS_P2=triton.next_power_of_2(heads))
    arg_types = {a: ints.get(a) or ("*i32" if a in INDEX_PTRS else "*fp32" if a in FP32_PTRS else
                                    f"*{name}" if a.endswith("_ptr") else "i32") for a in fn.arg_names}
    report = compile_kernel(fn, arg_types, constexprs, arch, num_warps)
    return dict(kernel=kernel, arch=f"sm_{arch}", dtype=name, phase=phase, heads=heads, head_dim=head_dim,
                num_splits=num_splits, **tiles, num_warps=num_warps, **report)


def main():
    from rich.console import Console
    from rich.table import Table

    rows = [compile_report(*spec, arch=arch) for arch in ARCHS for spec in SPECIALISATIONS]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = Table(title="Triton kernels compiled for sm_80 and sm_90: ptxas report per thread "
                        "(heads: query heads per KV head; store_kv: KV heads)")
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(str(row.get(col, "")) for col in columns))
    Console(width=200).print(table)
    print(json.dumps(dict(bench="triton_kernel_registers", triton=triton.__version__,
                          num_specialisations=len(SPECIALISATIONS), archs=[f"sm_{a}" for a in ARCHS], rows=rows)))


if __name__ == "__main__":
    main()
