"""Plain-torch paged attention and KV store: the CPU path and the oracle of the kernel tests.

Same signatures as the Triton kernels in `paged_attention.py` and `store_kv.py`. The KV
cache is paged: per layer `[num_blocks, block_size, num_kv_heads, head_dim]`, and a
sequence's block table lists the blocks that hold its tokens in order.
"""
import torch
import torch.nn.functional as F


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    """Write the new tokens' K/V into their cache slots (slot = block * block_size + offset).

    k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens], -1 = skip
    (a padded token, or one whose block is already cached).
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    # view the cache as one row per slot: [num_blocks * block_size, num_kv_heads, head_dim]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale=None):
    """Causal attention of each sequence's new tokens over its whole cached sequence.

    q: [num_tokens, num_q_heads, head_dim], the new tokens of all sequences concatenated
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: [num_seqs, max_blocks_per_seq] int32
    seq_lens: [num_seqs] int32, cached context + new tokens, all already in the cache
    query_start_loc: [num_seqs + 1] int32, cumulative counts of new tokens
    returns [num_tokens, num_q_heads, head_dim]; new token i of sequence s sits at position
    seq_lens[s] - q_len_s + i and sees cache positions 0..that position.
    """
    _, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_s = q[starts[s]:starts[s + 1]]  # [q_len, num_q_heads, head_dim]
        q_len = q_s.shape[0]
        if q_len == 0:
            continue
        blocks = block_tables[s, :(seq_len + block_size - 1) // block_size].long()
        # gather the sequence's blocks: [seq_len, num_kv_heads, head_dim]
        k_s = k_cache[blocks].flatten(0, 1)[:seq_len]
        v_s = v_cache[blocks].flatten(0, 1)[:seq_len]
        mask = None
        if q_len > 1:  # query i sits at seq_len - q_len + i and sees keys up to there
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        o = F.scaled_dot_product_attention(
            q_s.transpose(0, 1).float(),  # [num_q_heads, q_len, head_dim]
            k_s.transpose(0, 1).float(),  # [num_kv_heads, seq_len, head_dim]
            v_s.transpose(0, 1).float(),
            attn_mask=mask, scale=scale, enable_gqa=num_q_heads != num_kv_heads,
        )
        out[starts[s]:starts[s + 1]] = o.transpose(0, 1).to(q.dtype)
    return out
