"""Plain-torch paged attention and KV store: the oracle of the kernel tests, and the model's own.

Same signatures as the Triton kernels in `paged_attention.py` and `store_kv.py`, written to be
obviously right rather than fast: one sequence and one query head at a time, a dense causal
mask. The KV cache is paged: per layer `[num_blocks, block_size, num_kv_heads, head_dim]`, and
a sequence's block table lists the blocks that hold its tokens in order. (The CPU platform
computes the same numbers in fewer, larger products: platforms/cpu/attention.py.)
"""
import torch


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    """Write the new tokens' K/V into their cache slots (slot = block * block_size + offset).

    k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64, -1 = skip
    (a padded token, or one whose block is already cached).
    """
    block_size = k_cache.shape[1]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, slot % block_size] = k[i]
            v_cache[slot // block_size, slot % block_size] = v[i]


def paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale=None):
    """Causal attention of each sequence's new tokens over its whole cached sequence.

    q: [num_tokens, num_q_heads, head_dim], the new tokens of all sequences concatenated
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: [num_seqs, max_blocks_per_seq] int32
    context_lens: [num_seqs] int32, cached context + new tokens, all already in the cache
    query_start_loc: [num_seqs + 1] int32, cumulative counts of new tokens
    returns [num_tokens, num_q_heads, head_dim]; new token i of sequence s sits at position
    context_lens[s] - q_len_s + i and sees cache positions 0..that position.
    scale: the softmax scale (default 1 / sqrt(head_dim)).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for s, context_len in enumerate(context_lens.tolist()):
        start, end = starts[s], starts[s + 1]
        positions = torch.arange(context_len, device=q.device)
        blocks = block_tables[s].long()[positions // block_size]
        k = k_cache[blocks, positions % block_size].float()  # [context_len, num_kv_heads, head_dim]
        v = v_cache[blocks, positions % block_size].float()
        q_pos = torch.arange(context_len - (end - start), context_len, device=q.device)  # [q_len]
        future = positions[None, :] > q_pos[:, None]  # [q_len, context_len]
        for h in range(num_q_heads):
            kv_h = h // (num_q_heads // num_kv_heads)  # grouped-query attention: heads share a kv head
            scores = q[start:end, h].float() @ k[:, kv_h].T * scale  # [q_len, context_len]
            probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
            out[start:end, h] = (probs @ v[:, kv_h]).to(q.dtype)
    return out
