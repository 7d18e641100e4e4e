"""Hot-spot migration (docs/design.md, Hot-spot migration): a prefill instance pulls the prefix blocks it lacks.

The Conductor chose prefill instance A for a request whose leading blocks instance B holds
(on its device or in its host KV pool). A stages the request: it takes its own cached prefix,
reserves blocks for the rest of B's prefix and asks B for them (`FetchBlocks`, control plane).
B copies the blocks it still holds, says how many are real (`FetchReply`) and sends them layer
by layer on transfer.py's header + payload path; past what it holds (evicted since the decision)
it sends zeros, so the stream's length never depends on that race. Once every layer arrived, A
keys the real blocks in its prefix cache and keeps them: hot blocks replicate by themselves. A
failed or silent fetch costs only the fetch: the request then recomputes those blocks.
"""
from dataclasses import dataclass

import torch

from minicake.cache.block_keys import block_keys
from minicake.disagg.transfer import Channels, KVReceiver, KVSender
from minicake.sampling import SamplingParams
from minicake.sched.sequence import Sequence


@dataclass
class FetchBlocks:  # prefill A -> prefill B: send me the blocks of this prefix from first_block on
    fetch_id: int
    token_ids: list[int]  # the prefix, whole blocks: B recomputes its keys and checks its tokens
    first_block: int
    requester: int


@dataclass
class FetchReply:  # B -> A, before B's sends: blocks first_block .. first_block + num_real - 1 are real
    fetch_id: int
    num_real: int


@dataclass
class _Fetch:
    staging: Sequence  # holds the local prefix and the reserved blocks while the fetch runs
    payload: object  # what to resume once the blocks are in (the StartPrefill message)
    first_block: int
    num_real: int | None = None  # known once FetchReply arrived
    arrived: bool | None = None  # True: every layer arrived; False: the transfer failed


def holder_send(fetch: FetchBlocks, block_manager, pool, kv_caches, sender: KVSender, mailbox) -> int:
    """B's side: reply, then send blocks first_block.. of the prefix (zeros past what it holds).
    Returns the number of real blocks sent."""
    bs = block_manager.block_size
    keys = block_keys(fetch.token_ids, bs)
    sources, parent = [], None  # ("device", block id) or ("pool", key), leading blocks held
    for i, key in enumerate(keys):
        tokens = tuple(fetch.token_ids[i * bs:(i + 1) * bs])
        block_id = block_manager.cached.get(key)
        if block_id is not None and block_manager.blocks[block_id].token_ids == tokens \
                and block_manager.blocks[block_id].parent_key == parent:
            sources.append(("device", block_id))
        elif pool is not None and pool.lookup(key, parent, tokens):
            sources.append(("pool", key))
        else:
            break
        parent = key
    num_real = max(0, len(sources) - fetch.first_block)
    mailbox.send(fetch.requester, FetchReply(fetch.fetch_id, num_real))
    count = len(keys) - fetch.first_block
    for layer, (k_cache, v_cache) in enumerate(kv_caches):
        # k, v: [count, block_size, num_kv_heads, head_dim], a copy: B may reuse its blocks at once
        k = torch.zeros((count, *k_cache.shape[1:]), dtype=k_cache.dtype, device=k_cache.device)
        v = torch.zeros_like(k)
        for j, (where, ref) in enumerate(sources[fetch.first_block:]):
            src_k, src_v = (k_cache[ref], v_cache[ref]) if where == "device" else pool.read_block(ref, layer)
            k[j].copy_(src_k)
            v[j].copy_(src_v)
        sender.send_layer(fetch.fetch_id, fetch.requester, layer, fetch.first_block, list(range(count)), k, v)
    return num_real


class BlockFetcher:
    """A's side: stage a request, expect its blocks, and hand it back once they are in (or not)."""

    def __init__(self, channels: Channels, block_manager, kv_caches, peers: list[int], timeout: float, mailbox):
        self.bm, self.rank, self.mailbox = block_manager, channels.rank, mailbox
        self.receiver = KVReceiver(channels, peers, [k for k, _ in kv_caches], [v for _, v in kv_caches], timeout)
        self.fetches: dict[int, _Fetch] = {}
        self.num_fetched_blocks = 0

    def start(self, fetch_id: int, token_ids: list[int], num_blocks: int, holder: int, payload) -> bool:
        """Ask `holder` for the first `num_blocks` blocks of `token_ids` that this instance lacks.
        False (nothing staged) when it lacks none or has no free blocks to receive them into."""
        bs = self.bm.block_size
        staging = Sequence(f"fetch-{fetch_id}", token_ids[:num_blocks * bs], SamplingParams())
        self.bm.allocate_prefix(staging)  # at most num_blocks - 1: the last block is never a hit
        first = len(staging.block_table)
        if first >= num_blocks or not self.bm.allocate_slots(staging, len(staging) - staging.num_computed_tokens):
            self._release(staging)
            return False
        self.receiver.expect(fetch_id, staging.block_table, first, [holder])
        self.fetches[fetch_id] = _Fetch(staging, payload, first)
        self.mailbox.send(holder, FetchBlocks(fetch_id, list(staging.token_ids), first, self.rank))
        return True

    def on_reply(self, reply: FetchReply) -> None:
        if reply.fetch_id in self.fetches:
            self.fetches[reply.fetch_id].num_real = reply.num_real

    def poll(self) -> list:
        """Payloads of the fetches that ended: their real blocks are now in the prefix cache."""
        done, failed = self.receiver.poll()
        for fetch_id in done:
            if fetch_id in self.fetches:
                self.fetches[fetch_id].arrived = True
        for fetch_id, _error in failed:  # the request recomputes what it could not fetch
            if fetch_id in self.fetches:
                self.fetches[fetch_id].arrived = False
        ended = [i for i, f in self.fetches.items() if f.arrived is False or (f.arrived and f.num_real is not None)]
        payloads = []
        for fetch_id in ended:
            f = self.fetches.pop(fetch_id)
            num_real = f.num_real if f.arrived else 0
            f.staging.num_computed_tokens = (f.first_block + num_real) * self.bm.block_size
            self.bm.cache_full_blocks(f.staging)
            self.num_fetched_blocks += num_real
            self._release(f.staging)
            payloads.append(f.payload)
        return payloads

    def cancel(self, fetch_id: int) -> bool:
        """Abort a fetch (its request was aborted); late payloads are dropped."""
        f = self.fetches.pop(fetch_id, None)
        if f is None:
            return False
        self.receiver.forget(fetch_id)
        self._release(f.staging)
        return True

    def _release(self, staging: Sequence) -> None:
        self.bm.free(staging)
        self.bm.forget(staging)
