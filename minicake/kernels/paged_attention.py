"""Paged attention in Triton: one kernel for prefill, chunked prefill over cached blocks, and decode.

The CUDA path of the paged KV cache (docs/design.md, Kernels and platforms). A program owns
BLOCK_Q new tokens of one sequence times the GROUP query heads that share one KV head, so each
K/V tile is loaded once for the whole group. Keys are gathered through the block table, softmax
is online in fp32, and a long context can be split over several programs (flash-decoding).
"""
import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 512  # shortest KV range worth a program and a partial write (a guess, not timed yet)
# the combine kernel holds NUM_SPLITS x HEAD_DIM fp32 partials in registers: 256 x 128 spills on
# sm_80 and sm_90, 128 x 128 does not (benchmarks/kernel_registers.py)
MAX_SPLITS = 128
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _find_seq_idx(query_start_loc_ptr, q_tile_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence whose first query tile is at or before `q_tile_idx` (binary search).

    Sequence s owns query tiles from query_start_loc[s] // BLOCK_Q + s on: numbering tiles
    like this bounds their count by num_tokens // BLOCK_Q + num_seqs without reading q lengths.
    """
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= q_tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _load_kv_tile(cache_ptr, block, offset, kv_ok, kv_head, stride_b, stride_o, stride_h,
                  HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Gather BLOCK_N keys (or values) of one KV head; block, offset, kv_ok: [BLOCK_N]."""
    offs_d = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
    ptrs = cache_ptr + block[:, None] * stride_b + offset[:, None] * stride_o + kv_head * stride_h + offs_d[None, :]
    return tl.load(ptrs, mask=kv_ok[:, None], other=0.0).to(DOT_DTYPE)  # [BLOCK_N, HEAD_DIM]


@triton.jit
def _online_softmax_step(q, k, v, offs_n, q_pos, m_i, l_i, acc, qk_scale,
                         CACHE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one K/V tile into the running softmax state of every row.
    q: [BLOCK_M, HEAD_DIM]; k, v: [BLOCK_N, HEAD_DIM]; offs_n: [BLOCK_N] and q_pos: [BLOCK_M] positions;
    m_i, l_i: [BLOCK_M] running max (base 2) and denominator; acc: [BLOCK_M, HEAD_DIM] running numerator."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))  # causal by position
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
    # a row that has seen no key yet (a later split's early rows) keeps p = alpha = 0
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # [BLOCK_M]
    p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.exp2(m_i - m_safe)  # [BLOCK_M] rescales what was summed under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(CACHE_DTYPE).to(DOT_DTYPE)  # rounded to the cache dtype, as a bf16/fp16 tensor-core dot does
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_q_heads, HEAD_DIM]; fp32 [NUM_SPLITS, ...] partial acc when split
    m_ptr, l_ptr,  # [NUM_SPLITS, num_tokens, num_q_heads] fp32, used only when NUM_SPLITS > 1
    q_ptr,  # [num_tokens, num_q_heads, HEAD_DIM]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    context_lens_ptr,  # [num_seqs] int32, cached context + new tokens
    query_start_loc_ptr,  # [num_seqs + 1] int32
    num_seqs, qk_scale,  # qk_scale = scale * log2(e): the softmax runs in base 2
    stride_q_t, stride_q_h,
    stride_o_s, stride_o_t, stride_o_h,
    stride_ml_s, stride_ml_t,
    stride_k_b, stride_k_o, stride_k_h,
    stride_v_b, stride_v_o, stride_v_h,
    stride_bt_s,
    GROUP: tl.constexpr,  # query heads per KV head, any whole number
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows of the q tile: BLOCK_Q tokens x GROUP heads, padded to a power of 2
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # the input dtype; fp32 under the interpreter, which has no bf16 dot
):
    q_tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_idx = _find_seq_idx(query_start_loc_ptr, q_tile_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq_idx)
    q_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
    q_tile_local = q_tile_idx - (q_start // BLOCK_Q + seq_idx)
    if q_tile_local * BLOCK_Q >= q_len:  # a spare program of the grid's upper bound
        return
    context_len = tl.load(context_lens_ptr + seq_idx)
    num_cached = context_len - q_len  # tokens that were cached before this step

    # row m of the tile is new token m // GROUP under query head m % GROUP
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
    q_idx = q_tile_local * BLOCK_Q + offs_m // GROUP  # [BLOCK_M] index among the new tokens
    head = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M] query head
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)  # [BLOCK_M]
    q_pos = num_cached + q_idx  # [BLOCK_M] absolute position: sees keys 0..q_pos
    q_offs = (q_start + q_idx)[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)  # [BLOCK_M, HEAD_DIM]

    # KV tiles up to the tile's last position, cut into NUM_SPLITS contiguous shares
    last_pos = num_cached + tl.minimum((q_tile_local + 1) * BLOCK_Q, q_len) - 1
    num_tiles = tl.cdiv(last_pos + 1, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max, base 2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running numerator @ V
    block_table_ptr = block_tables_ptr + seq_idx * stride_bt_s
    for tile in range(tile_lo, tile_hi):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        kv_ok = offs_n < context_len  # [BLOCK_N]
        # physical block and offset of every key: [BLOCK_N]
        block = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
        offset = offs_n % BLOCK_SIZE
        k = _load_kv_tile(k_cache_ptr, block, offset, kv_ok, kv_head, stride_k_b, stride_k_o, stride_k_h,
                          HEAD_DIM, DOT_DTYPE)  # [BLOCK_N, HEAD_DIM]
        v = _load_kv_tile(v_cache_ptr, block, offset, kv_ok, kv_head, stride_v_b, stride_v_o, stride_v_h,
                          HEAD_DIM, DOT_DTYPE)  # [BLOCK_N, HEAD_DIM]
        m_i, l_i, acc = _online_softmax_step(q, k, v, offs_n, q_pos, m_i, l_i, acc, qk_scale,
                                             v_cache_ptr.dtype.element_ty, DOT_DTYPE, DOT_PRECISION)

    o_offs = (q_start + q_idx)[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]  # [BLOCK_M, HEAD_DIM]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:  # partial state of this split; _combine_splits_kernel merges the splits
        tl.store(out_ptr + split * stride_o_s + o_offs, acc, mask=row_ok[:, None])
        ml_offs = split * stride_ml_s + (q_start + q_idx) * stride_ml_t + head  # [BLOCK_M]
        tl.store(m_ptr + ml_offs, m_i, mask=row_ok)
        tl.store(l_ptr + ml_offs, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(
    out_ptr,  # [num_tokens, num_q_heads, HEAD_DIM]
    acc_ptr,  # [NUM_SPLITS, num_tokens, num_q_heads, HEAD_DIM] fp32
    m_ptr, l_ptr,  # [NUM_SPLITS, num_tokens, num_q_heads] fp32
    stride_o_t, stride_o_h,
    stride_a_s, stride_a_t, stride_a_h,
    stride_ml_s, stride_ml_t,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)  # [NUM_SPLITS]
    offs_d = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
    ml_offs = offs_s * stride_ml_s + token * stride_ml_t + head  # [NUM_SPLITS]
    m = tl.load(m_ptr + ml_offs)  # [NUM_SPLITS], -inf for a split that saw no key
    l = tl.load(l_ptr + ml_offs)  # [NUM_SPLITS]
    m_max = tl.max(m, 0)  # finite: split 0 always holds key 0, which every token sees
    w = tl.exp2(m - m_max)  # [NUM_SPLITS]
    acc = tl.load(acc_ptr + offs_s[:, None] * stride_a_s + token * stride_a_t + head * stride_a_h
                  + offs_d[None, :])  # [NUM_SPLITS, HEAD_DIM]
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)  # [HEAD_DIM]
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + offs_d, out.to(out_ptr.dtype.element_ty))


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale=None,
                    num_splits=None):
    """Same contract as `reference.paged_attention_ref`. `num_splits` (a power of two) cuts every
    query tile's KV range over that many programs; None picks it from shapes and the device (only
    a decode-only batch splits)."""
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = context_lens.shape[0]
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m, block_q, block_n, num_warps = launch_config(num_tokens, num_seqs, group, q.dtype)
    num_q_tiles = num_tokens // block_q + num_seqs  # upper bound, see _find_seq_idx
    if num_splits is None and num_tokens != num_seqs:
        num_splits = 1  # a 16-bit prefill tile spills its fp32 partials when split (benchmarks/kernel_registers.py)
    elif num_splits is None:
        num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        num_splits = default_num_splits(num_q_tiles * num_kv_heads, block_tables.shape[1] * block_size, num_sms)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    if num_splits == 1:
        dest, m, l = out, out, out  # m, l unused
        stride_o_s, stride_ml_s, stride_ml_t = 0, 0, 0
    else:
        dest = torch.empty((num_splits, *q.shape), dtype=torch.float32, device=q.device)
        m = torch.empty((num_splits, num_tokens, num_q_heads), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        stride_o_s, stride_ml_s, stride_ml_t = dest.stride(0), m.stride(0), m.stride(1)
    _paged_attention_kernel[(num_q_tiles, num_kv_heads, num_splits)](
        dest, m, l, q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
        num_seqs, scale * LOG2_E,
        q.stride(0), q.stride(1),
        stride_o_s, dest.stride(-3), dest.stride(-2),
        stride_ml_s, stride_ml_t,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_DTYPE=tl.float32 if triton.knobs.runtime.interpret else _TL_DTYPES[q.dtype],
        num_warps=num_warps,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_q_heads)](
            out, dest, m, l,
            out.stride(0), out.stride(1),
            dest.stride(0), dest.stride(1), dest.stride(2),
            m.stride(0), m.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
        )
    return out


def launch_config(num_tokens: int, num_seqs: int, group: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_Q, BLOCK_N, num_warps) from shapes alone. Chosen from sm_90 register counts
    (no bf16 spills at head_dim <= 128, benchmarks/kernel_registers.py), not from GPU timings."""
    min_rows = triton.next_power_of_2(group)
    if num_tokens == num_seqs:  # decode only: one token per sequence, a 16-row tile is enough
        block_m = max(16, min_rows)
        return block_m, block_m // group, 32, 4  # small tiles, several programs per SM
    if dtype == torch.float32:  # the tests' dtype: half tiles keep shared memory under 100 KB
        block_m = max(64, min_rows)
        return block_m, block_m // group, 32, 4
    block_m = max(128, min_rows)
    return block_m, block_m // group, 64, 8


def default_num_splits(num_programs: int, max_context: int, num_sms: int) -> int:
    """Split the KV range until the grid covers the GPU's SMs twice, while each split keeps at
    least MIN_TOKENS_PER_SPLIT of the longest possible context (max_context, from the block
    table's width), and no more than MAX_SPLITS. Small-batch decode at long context is the case this is for."""
    num_splits = 1
    while (num_splits < MAX_SPLITS and num_programs * num_splits < 2 * num_sms
           and max_context >= 2 * num_splits * MIN_TOKENS_PER_SPLIT):
        num_splits *= 2
    return num_splits


def _check_inputs(q, k_cache, v_cache, block_tables, context_lens, query_start_loc):
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"want q [num_tokens, num_q_heads, head_dim] and k_cache, v_cache "
                         f"[num_blocks, block_size, num_kv_heads, head_dim], got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}: want the same "
                         f"head_dim and num_q_heads a multiple of num_kv_heads")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"q, k_cache, v_cache must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens), ("query_start_loc", query_start_loc)):
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"{name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
    if block_tables.dim() != 2 or block_tables.shape[0] != context_lens.shape[0] or context_lens.dim() != 1:
        raise ValueError(f"want block_tables [num_seqs, max_blocks] and context_lens [num_seqs], got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if query_start_loc.shape != (context_lens.shape[0] + 1,) or query_start_loc.stride(0) != 1 or context_lens.stride(0) != 1:
        raise ValueError(f"query_start_loc must be contiguous [num_seqs + 1] = [{context_lens.shape[0] + 1}], "
                         f"got {tuple(query_start_loc.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables needs a contiguous last dimension")
