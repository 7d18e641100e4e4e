"""KV store in Triton: write each new token's K/V into its slot of the paged cache.

The write half of the paged KV cache (docs/design.md, Kernels and platforms): one program
per token copies all its KV heads to slot = block * block_size + offset. Slot -1 is skipped:
a padded token, or one whose block is already cached (a prefix-cache hit).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr,  # [num_tokens, num_kv_heads, HEAD_DIM]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    slot_mapping_ptr,  # [num_tokens] int32 or int64, -1 = skip
    num_kv_heads,
    stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_kc_b, stride_kc_o, stride_kc_h,
    stride_vc_b, stride_vc_o, stride_vc_h,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_KV_HEADS_P2: tl.constexpr,  # num_kv_heads padded to a power of two (SmolLM2 has 3)
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, NUM_KV_HEADS_P2)  # [NUM_KV_HEADS_P2]
    offs_d = tl.arange(0, HEAD_DIM)  # [HEAD_DIM]
    mask = (offs_h < num_kv_heads)[:, None]  # [NUM_KV_HEADS_P2, 1]
    k = tl.load(k_ptr + token * stride_k_t + offs_h[:, None] * stride_k_h + offs_d[None, :],
                mask=mask)  # [NUM_KV_HEADS_P2, HEAD_DIM]
    v = tl.load(v_ptr + token * stride_v_t + offs_h[:, None] * stride_v_h + offs_d[None, :],
                mask=mask)  # [NUM_KV_HEADS_P2, HEAD_DIM]
    tl.store(k_cache_ptr + block * stride_kc_b + offset * stride_kc_o + offs_h[:, None] * stride_kc_h
             + offs_d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_vc_b + offset * stride_vc_o + offs_h[:, None] * stride_vc_h
             + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Same contract as `reference.store_kv_ref`: k, v [num_tokens, num_kv_heads, head_dim] go to
    k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] in place."""
    if k.dim() != 3 or k.shape != v.shape or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"want k, v [num_tokens, num_kv_heads, head_dim] and k_cache, v_cache "
                         f"[num_blocks, block_size, num_kv_heads, head_dim], got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    num_tokens, num_kv_heads, head_dim = k.shape
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k {tuple(k.shape)} does not fit the cache {tuple(k_cache.shape)}: "
                         f"num_kv_heads and head_dim must match")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [num_tokens] = [{num_tokens}], "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if len({t.device for t in (k, v, k_cache, v_cache, slot_mapping)}) != 1:
        raise ValueError("k, v, k_cache, v_cache and slot_mapping must be on one device")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k, v, k_cache and v_cache need a contiguous last (head_dim) dimension")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(),
        num_kv_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim,
        NUM_KV_HEADS_P2=triton.next_power_of_2(num_kv_heads),
    )
