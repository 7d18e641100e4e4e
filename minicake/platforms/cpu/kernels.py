"""The C kernels of `kernels.c`, built once and called through ctypes.

- `decode_attention`: paged attention for decode tokens, reading K/V in place (the torch
  attention gathers them first).
- `rms_norm` (residual add fused in), `rope_` (q and k in place), `store_kv` and
  `silu_and_mul`: what a decode step runs between its matmuls, as one C call each instead
  of several small torch ops.
- `packed_linear`: y = x W^T with W rearranged once into panels of 32 output columns
  (`pack_weight`), so that the innermost loop reads weights in order and keeps a 12 x 32
  block of outputs in vector registers.
modules.py wraps them as the model's modules' CPU twins.

On the first call the C file is compiled with the system C compiler (`$CC`, default `cc`)
into `$MINICAKE_CACHE/kernels/`, under a name that hashes the source and the flags, and
loaded with ctypes; no torch headers, so the build takes about a second. Where there is
no compiler (or the build fails) a warning says so once and torch does the work instead:
slower, same numbers.
"""
import ctypes
import hashlib
import logging
import mmap
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from minicake.config import cache_dir

logger = logging.getLogger("minicake")
SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
BUILD_TIMEOUT_S = 120
_library = None  # the loaded ctypes library; False once a build failed
_recording = None  # the list of calls while `recording()`


def _build() -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS + [platform.machine()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if not target.is_file():
        target.parent.mkdir(exist_ok=True)
        logger.info("building the CPU kernels into %s", target)
        # build beside the target and rename: processes starting together never load half a file
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = [os.environ.get("CC", "cc"), *FLAGS, str(SOURCE), "-o", str(built), "-lm"]
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            os.replace(built, target)
    return target


def library():
    """The loaded kernels, or None where they cannot be built here (warned about once)."""
    global _library
    if _library is None:
        try:
            _library = ctypes.CDLL(str(_build()))
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or e
            logger.warning("could not build %s (%s); torch does its work instead, slower",
                           SOURCE.name, str(detail).strip()[-300:])
            _library = False
            return None
        # the C signatures: pointers are tensors' data_ptr()s
        ptr, i32 = ctypes.c_void_p, ctypes.c_int
        _library.paged_decode_attention.argtypes = [ptr, ctypes.c_long] + [ptr] * 5 + [i32] * 6 + [ctypes.c_float, i32]
        _library.packed_linear.argtypes = [ptr] * 4 + [i32] * 4
        _library.rms_norm.argtypes = [ptr, ctypes.c_long] + [ptr] * 4 + [i32] * 3 + [ctypes.c_float, i32]
        _library.rope.argtypes = [ptr] * 5 + [i32] * 4 + [ctypes.c_long] * 2 + [i32]
        _library.store_kv.argtypes = [ptr] * 5 + [i32] * 2 + [ctypes.c_long] * 3
        _library.silu_and_mul.argtypes = [ptr] * 2 + [i32] * 3
        for kernel in (_library.paged_decode_attention, _library.packed_linear, _library.rms_norm, _library.rope,
                       _library.silu_and_mul):
            kernel.restype = None  # store_kv keeps ctypes' default, int: -1, or the first bad slot's token
    return _library or None


@contextmanager
def recording():
    """Within it every C kernel call is also appended, as (kernel, args), to the list it yields:
    a decode step recorded once and replayed (decode_graph.py)."""
    global _recording
    _recording = calls = []
    try:
        yield calls
    finally:
        _recording = None


def _run(kernel, *args):
    """Every wrapper below calls its kernel through here."""
    if _recording is not None:
        _recording.append((kernel, args))
    return kernel(*args)


def usable(x) -> bool:
    """Whether the C kernels can take x: a float32 CPU tensor, and the library is built."""
    return x.is_cpu and x.dtype == torch.float32 and library() is not None


def heads_side_by_side(x) -> bool:
    """x [num_tokens, heads, head_dim] holds each token's heads contiguously; token rows may be
    strided (views of the fused q/k/v output). The C kernels take q, k and v so."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def rms_norm(x, weight, eps, residual=None):
    """Same result as `model/llama.py`'s `RMSNorm`. x: [..., dim] float32, contiguous, or [num_tokens, heads, dim]
    with `heads_side_by_side` (Qwen3's per-head norm of q and k); residual: like x, contiguous;
    weight: [dim]. Returns the normalized x (contiguous), or with a residual (out, x + residual)
    with the sum normalized."""
    dim = x.shape[-1]
    if x.is_contiguous():
        tokens, heads, x_row = x.numel() // dim, 1, dim
    else:
        assert heads_side_by_side(x) and residual is None
        tokens, heads, x_row = x.shape[0], x.shape[1], x.stride(0)
    assert residual is None or residual.is_contiguous()
    out = torch.empty(x.shape)
    new_residual = None if residual is None else torch.empty(x.shape)
    _run(library().rms_norm, x.data_ptr(), x_row, None if residual is None else residual.data_ptr(),
         weight.data_ptr(), out.data_ptr(), None if residual is None else new_residual.data_ptr(), tokens, heads,
         dim, eps, torch.get_num_threads())
    return out if residual is None else (out, new_residual)


def rope_(q, k, positions, cos_table, sin_table):
    """Rotate q [num_tokens, q_heads, head_dim] and k [num_tokens, k_heads, head_dim] in place by
    the angles of `positions` [num_tokens] (int64); cos/sin_table: [max_positions, head_dim]
    float32. Token rows may be strided (views of the fused q/k/v output); each row's heads must
    be contiguous."""
    (n, q_heads, head_dim), k_heads = q.shape, k.shape[1]
    assert heads_side_by_side(q) and heads_side_by_side(k) and k.shape[2] == head_dim
    assert cos_table.is_contiguous() and sin_table.is_contiguous() and positions.dtype == torch.int64
    _run(library().rope, q.data_ptr(), k.data_ptr(), positions.contiguous().data_ptr(), cos_table.data_ptr(),
         sin_table.data_ptr(), n, q_heads, k_heads, head_dim, q.stride(0), k.stride(0), torch.get_num_threads())
    return q, k


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Same contract as `kernels/reference.py`'s `store_kv_ref` for float32 CPU tensors: k, v [num_tokens,
    num_kv_heads, head_dim] (token rows may be strided) into their slots of k/v_cache
    [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping [num_tokens] int64, -1 = skip."""
    row = k_cache.shape[2] * k_cache.shape[3]
    assert k.dtype == v.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and slot_mapping.dtype == torch.int64
    for x in (k, v):
        assert heads_side_by_side(x) and x.shape[1] * x.shape[2] == row
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    bad = _run(library().store_kv, k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
               slot_mapping.contiguous().data_ptr(), k.shape[0], row, k.stride(0), v.stride(0), num_slots)
    if bad >= 0:
        raise IndexError(f"slot_mapping[{bad}] = {int(slot_mapping[bad])} is past the cache's {num_slots} slots")


def silu_and_mul(x):
    """x [num_tokens, 2 * d] (gate, up) float32 -> silu(gate) * up [num_tokens, d]."""
    assert x.is_contiguous()
    n, d = x.shape[0], x.shape[1] // 2
    out = torch.empty(n, d)
    _run(library().silu_and_mul, x.data_ptr(), out.data_ptr(), n, d, torch.get_num_threads())
    return out


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Paged attention of one new token per sequence (float32 CPU tensors only); the same
    numbers as `kernels/reference.py`'s `paged_attention_ref` for a decode-only batch.

    q: [num_seqs, num_q_heads, head_dim], one new token per sequence, already in the cache (token
    rows may be strided: a view of the fused q/k/v output);
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim];
    block_tables: [num_seqs, max_blocks] int32; context_lens: [num_seqs] int32.
    Returns [num_seqs, num_q_heads, head_dim].
    """
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and q.is_cpu
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    num_seqs, num_q_heads, head_dim = q.shape
    assert heads_side_by_side(q)
    block_tables = block_tables.to(torch.int32).contiguous()
    context_lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty(num_seqs, num_q_heads, head_dim)
    _run(library().paged_decode_attention,
         q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
         context_lens.data_ptr(), out.data_ptr(), num_seqs, block_tables.shape[1], num_q_heads, k_cache.shape[2],
         head_dim, k_cache.shape[1], scale, torch.get_num_threads())
    return out


PANEL = 32  # output columns per panel of a packed weight (PANEL in the C file)
HUGE_PAGE = 2 << 20


def packed_numel(weight) -> int:
    """Floats in pack_weight(weight): n rounded up to a whole panel, times k."""
    n, k = weight.shape
    return num_panels(n) * PANEL * k


def num_panels(n: int) -> int:
    return -(-n // PANEL)  # ceil(n / PANEL)


def pack_weight(weight, out=None):
    """[n, k] (nn.Linear's layout) -> the panels `packed_linear` reads: [ceil(n / 32), k, 32], where
    weight row j is panels[j // 32, :, j % 32] and the last panel is padded with zero rows.
    out: where to write them, packed_numel(weight) floats (default: a new tensor)."""
    n, k = weight.shape
    padded = F.pad(weight, (0, 0, 0, -n % PANEL))  # [ceil(n / 32) * 32, k]
    panels = padded.view(-1, PANEL, k).transpose(1, 2)
    if out is None:
        return panels.contiguous()
    return out.view(panels.shape).copy_(panels)


def huge_page_empty(numel: int):
    """torch.empty(numel) (float32) in 2 MiB pages where Linux offers them ("transparent huge
    pages" in madvise mode, the common default), for the packed weights, which every decode
    step reads end to end. With 4 KiB pages the address translations of those reads cost up
    to a fifth of a batch-1 step here, and varied from run to run (measured, batch-1 decode
    of the bundled model: 18-19 ms per token in 6 of 6 runs with them, 20-25 without).
    A fresh mapping of its own (the heap would hand back pages of freed buffers, already
    touched in 4 KiB pages), aligned to 2 MiB and advised before anything touches it."""
    # private and anonymous (a shared mapping would be shmem, which THP leaves alone); no pages yet
    memory = mmap.mmap(-1, numel * 4 + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; elsewhere ordinary pages
        memory.madvise(mmap.MADV_HUGEPAGE)
    buffer = torch.frombuffer(memory, dtype=torch.float32)  # shares the mapping and keeps it alive
    skip = (-buffer.data_ptr() % HUGE_PAGE) // 4
    return buffer[skip:skip + numel]


def packed_linear(x, panels, out_features, bias=None):
    """F.linear(x, weight, bias) for float32 CPU tensors, given panels = pack_weight(weight).
    x: [m, k]; bias: [n] or None. Returns [m, n]."""
    assert x.dim() == 2 and x.dtype == panels.dtype == torch.float32 and x.is_cpu and panels.is_cpu
    assert panels.shape == (num_panels(out_features), x.shape[1], PANEL) and panels.is_contiguous()
    assert bias is None or (bias.shape == (out_features,) and bias.dtype == torch.float32 and bias.is_contiguous())
    x = x.contiguous()
    out = torch.empty(x.shape[0], out_features)
    _run(library().packed_linear, x.data_ptr(), panels.data_ptr(), None if bias is None else bias.data_ptr(),
         out.data_ptr(), x.shape[0], out_features, x.shape[1], torch.get_num_threads())
    return out

