"""The CPU's torch attention: the reference's numbers, computed the way a CPU likes.

The oracle in kernels/reference.py attends one sequence and one query head at a time, as
plainly as possible. Here the same result is computed in fewer, larger products: decodes
batched in groups of similar length, each prefill chunk in causal tiles whose masked upper
triangle is mostly skipped, the query heads of a kv head stacked as one query (no copies for
GQA). The C decode kernel (kernels.py) takes over the decodes where it builds.
"""
import torch

PREFILL_TILE = 128  # query rows per causal tile of a prefill chunk
DECODE_GROUP = 8  # decodes per batched call: sorted by length, so a group pads little and stays in cache


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """`kernels/reference.py`'s `store_kv_ref` as two row copies (where the C kernels do not build)."""
    if (slot_mapping < 0).any():
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    # view the cache as one row per slot (2-D: a fast row copy): [num_blocks * block_size, num_kv_heads * head_dim]
    row = k_cache.shape[2] * k_cache.shape[3]
    k_cache.view(-1, row).index_copy_(0, slot_mapping.long(), k.reshape(-1, row).to(k_cache.dtype))
    v_cache.view(-1, row).index_copy_(0, slot_mapping.long(), v.reshape(-1, row).to(v_cache.dtype))


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
                    decode_attention=None):
    """Same contract as `kernels/reference.py`'s `paged_attention_ref`. decode_attention: what
    attends the one-token sequences (default: `batched_decode_attention` below; the
    C kernel where it builds)."""
    decode_attention = decode_attention or batched_decode_attention
    if q.shape[0] == context_lens.shape[0]:  # one new token per sequence: a decode-only step
        return decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    q_lens = [starts[s + 1] - starts[s] for s in range(len(lens))]
    decodes = [s for s, n in enumerate(q_lens) if n == 1]
    if decodes:  # all decodes (one new token each) in one call
        rows = query_start_loc[decodes].long()  # the one token of each decode
        out[rows] = decode_attention(q[rows], k_cache, v_cache, block_tables[decodes], context_lens[decodes], scale)
    # prefill chunks one sequence at a time
    for s, context_len in enumerate(lens):
        if q_lens[s] > 1:
            out[starts[s]:starts[s + 1]] = _prefill_attention(
                q[starts[s]:starts[s + 1]], k_cache, v_cache, block_tables[s], context_len, scale)
    return out


def batched_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    """One new token per sequence. q: [num_seqs, num_q_heads, head_dim], returns the same shape.

    Batched in groups of similar length (sorted), so that a group pads little and stays in cache.
    """
    out = torch.empty_like(q)
    order = context_lens.argsort().tolist()
    for i in range(0, len(order), DECODE_GROUP):
        group = order[i:i + DECODE_GROUP]
        out[group] = _decode_attention(q[group], k_cache, v_cache, block_tables[group], context_lens[group], scale)
    return out


def _decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    """One new token per sequence. q: [num_seqs, num_q_heads, head_dim], returns the same shape.

    Each sequence's keys are gathered as rows of (position, kv head), padded to the longest
    sequence with copies of its own position 0 (an owned, finite slot), and every query head
    is scored against every row in one batched matmul. Rows of another kv head (GQA) and
    padding get -inf, so a softmax over all rows is the per-head softmax, and one more batched
    matmul with the values finishes. Reading K and V as contiguous matrices once beats the
    extra (cheap) scores of the mismatched heads on a CPU.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    pos = torch.arange(int(context_lens.max()), device=q.device)
    past_end = pos[None, :] >= context_lens[:, None]  # [num_seqs, max_len]
    pos = pos.masked_fill(past_end, 0)  # [num_seqs, max_len]
    slots = block_tables.gather(1, pos // block_size).long() * block_size + pos % block_size
    slots = slots.flatten()
    # one row per slot (2-D index_select is a fast row copy): k, v: [num_seqs, max_len * num_kv_heads, head_dim]
    k = k_cache.view(-1, num_kv_heads * head_dim).index_select(0, slots).view(num_seqs, -1, head_dim)
    scores = torch.bmm(q.float() * scale, k.float().transpose(1, 2))  # [num_seqs, num_q_heads, max_len * num_kv_heads]
    kv_head_of = torch.arange(num_q_heads, device=q.device) // (num_q_heads // num_kv_heads)
    wrong_head = kv_head_of[:, None] != torch.arange(num_kv_heads, device=q.device)[None, :]  # [num_q_heads, num_kv_heads]
    hidden = past_end[:, None, :, None] | wrong_head[None, :, None, :]  # [num_seqs, num_q_heads, max_len, num_kv_heads]
    scores.view(hidden.shape).masked_fill_(hidden, float("-inf"))  # one pass: cheaper than two broadcast fills
    v = v_cache.view(-1, num_kv_heads * head_dim).index_select(0, slots).view(num_seqs, -1, head_dim)
    return torch.bmm(scores.softmax(dim=-1), v.float()).to(q.dtype)  # [num_seqs, num_q_heads, head_dim]


def _prefill_attention(q, k_cache, v_cache, block_table, context_len, scale):
    """The q_len new tokens of one sequence, at positions context_len - q_len ..., over its cache.

    q: [q_len, num_q_heads, head_dim]. The query rows go in tiles of PREFILL_TILE: a tile
    attends only up to its own last position, so most of the masked upper triangle of a long
    chunk is never computed (a 512-token prompt computes 62.5% of the scores of one 512 x 512
    product: three quarters of the masked half are skipped).
    """
    q_len, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    blocks = block_table[:-(-context_len // block_size)].long()
    # gather the sequence's blocks (one row per block): [context_len, num_kv_heads, head_dim]
    k = k_cache.view(k_cache.shape[0], -1).index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:context_len]
    v = v_cache.view(v_cache.shape[0], -1).index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:context_len]
    out = torch.empty_like(q)
    for start in range(0, q_len, PREFILL_TILE):
        end = min(start + PREFILL_TILE, q_len)
        out[start:end] = _causal_attention(q[start:end], k, v, context_len - q_len + start, scale)
    return out


def _causal_attention(q, k, v, first_pos, scale):
    """q: [n, num_q_heads, head_dim], new tokens at positions first_pos .. first_pos + n - 1;
    k, v: [>= first_pos + n, num_kv_heads, head_dim]. Returns like q.

    The query heads that share a kv head are stacked as one longer query, so the kv heads
    are never copied for GQA. Scores, causal mask and scale in one `baddbmm` (an additive
    -inf bias): fewer passes than SDPA's math path with a bool mask.
    """
    n, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    ctx = first_pos + n
    k, v = k[:ctx], v[:ctx]
    # q_g: [num_kv_heads, group * n, head_dim], head h = kv_head * group + g
    q_g = q.reshape(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, -1, head_dim)
    q_pos = torch.arange(first_pos, ctx, device=q.device)
    future = torch.arange(ctx, device=q.device)[None, :] > q_pos[:, None]  # [n, ctx]
    bias = torch.zeros(n, ctx, device=q.device).masked_fill_(future, float("-inf")).repeat(group, 1)
    # scores: [num_kv_heads, group * n, ctx]; o: [num_kv_heads, group * n, head_dim]
    scores = torch.baddbmm(bias, q_g.float(), k.float().permute(1, 2, 0), alpha=scale)
    o = torch.bmm(scores.softmax(dim=-1), v.float().transpose(0, 1))
    o = o.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3)  # [n, num_kv_heads, group, head_dim]
    return o.reshape(n, num_q_heads, head_dim).to(q.dtype)
