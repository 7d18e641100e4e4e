"""Channels: one process group per direction of a rank pair, so traffic both ways never queues.

On gloo (CPU) every rank posts a standing receive from its peer while it sends to that peer, and
two prefill instances pull prefix blocks from each other at once. The CUDA tests (NCCL, two
GPUs) check what only a GPU shows: a posted receive never holds up the decode side's kernels,
and a dead peer fails only its own transfers without taking the survivors down.
"""
import os
import time

import pytest
import torch
import torch.distributed as dist

from minicake.cache.block_keys import block_keys
from minicake.cache.block_manager import BlockManager
from minicake.disagg.migration import BlockFetcher, holder_send
from minicake.disagg.transfer import Channels, KVReceiver, KVSender, open_channels
from minicake.sampling import SamplingParams
from minicake.sched.sequence import Sequence
from test_transfer import BLOCK_SIZE, NUM_BLOCKS, NUM_LAYERS, caches, poll_until_settled, run_ranks

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between two processes needs two GPUs")


def wait_for_sends(sender: KVSender, limit: float = 20.0) -> list:
    failed, deadline = [], time.monotonic() + limit
    while sender.num_pending and time.monotonic() < deadline:
        failed += sender.poll()
        time.sleep(0.005)
    return failed


def landed(k, v, block_ids: list[int], src: int, src_block_ids: list[int]) -> bool:
    """The blocks `block_ids` hold, in every layer, what rank `src` sent from its blocks `src_block_ids`."""
    sent_k, sent_v = caches(src)
    return all(torch.equal(k[i][block_ids].cpu(), sent_k[i][src_block_ids])
               and torch.equal(v[i][block_ids].cpu(), sent_v[i][src_block_ids]) for i in range(NUM_LAYERS))


def both_ways(rank, results):
    """Each rank waits for the other's K/V (a standing receive) and sends its own at the same time."""
    peer = 1 - rank
    k, v = caches(rank)
    channels = open_channels(k[0].device)
    receiver = KVReceiver(channels, [peer], k, v, timeout=10)
    receiver.expect(10 + peer, block_ids=[6, 7], first_block=0, sources=[peer])
    sender = KVSender(channels, timeout=10)
    for layer in range(NUM_LAYERS):
        sender.send_layer(10 + rank, peer, layer, 0, [2, 3], k[layer], v[layer])
    done, failed = poll_until_settled(receiver)
    names = (channels.to(peer).group_name, channels.from_(peer).group_name)
    results.put((rank, (done, failed, wait_for_sends(sender), landed(k, v, [6, 7], peer, [2, 3]), names)))
    dist.barrier()  # the peer may still be receiving


def test_a_standing_receive_from_a_peer_does_not_stop_sending_to_it():
    out = run_ranks(both_ways, world_size=2)
    for rank in (0, 1):
        done, failed, send_failures, arrived, _ = out[rank]
        assert (done, failed, send_failures, arrived) == ([11 - rank], [], [], True)
    (to_1, from_1), (to_0, from_0) = out[0][4], out[1][4]
    assert to_1 == from_0 and to_0 == from_1 and to_1 != to_0, "one group per direction, the same on both ends"


class Outbox:
    """The test's control plane: what a rank sends, handed over by `exchange`."""

    def __init__(self):
        self.sent = []

    def send(self, dst: int, msg) -> None:
        self.sent.append((dst, msg))


def exchange(outbox: Outbox, rank: int) -> list:
    """Every rank's sent messages, all at once over the default group; returns those for `rank`."""
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, outbox.sent)
    outbox.sent = []
    return [msg for sent in everything for dst, msg in sent if dst == rank]


def prompt(rank: int) -> list[int]:
    return list(range(3 + 100 * rank, 3 + 100 * rank + 4 * BLOCK_SIZE + 1))  # 4 full blocks and a token


def fetch_from_each_other(rank, results):
    """Two single-stage prefill instances, each holding a prompt, pull the other's prompt at once."""
    peer = 1 - rank
    k, v = caches(rank)
    channels = open_channels(k[0].device)
    bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    held = Sequence(f"held-{rank}", prompt(rank), SamplingParams())
    bm.allocate_prefix(held)
    bm.allocate_slots(held, len(held))
    held.num_computed_tokens = len(held)
    bm.cache_full_blocks(held)
    outbox, sender = Outbox(), KVSender(channels, timeout=10)
    fetcher = BlockFetcher(channels, bm, list(zip(k, v)), [peer], timeout=10, mailbox=outbox)
    assert fetcher.start(10 + rank, prompt(peer), num_blocks=4, holder=peer, payload=f"request-{rank}")
    for fetch in exchange(outbox, rank):
        holder_send(fetch, bm, None, list(zip(k, v)), sender, outbox)
    for reply in exchange(outbox, rank):
        fetcher.on_reply(reply)
    payloads, deadline = [], time.monotonic() + 20
    while not payloads and time.monotonic() < deadline:
        payloads = fetcher.poll()
        time.sleep(0.005)
    fetched = [bm.cached.get(key) for key in block_keys(prompt(peer), BLOCK_SIZE)]
    holders = [None, None]
    dist.all_gather_object(holders, held.block_table[:4])
    arrived = None not in fetched and landed(k, v, fetched, peer, holders[peer])
    results.put((rank, (payloads, arrived, wait_for_sends(sender), fetcher.num_fetched_blocks)))
    dist.barrier()


def test_two_prefill_instances_pull_prefix_blocks_from_each_other_at_once():
    out = run_ranks(fetch_from_each_other, world_size=2)
    assert out[0] == [["request-0"], True, [], 4]
    assert out[1] == [["request-1"], True, [], 4]


def test_a_missing_channel_is_named():
    with pytest.raises(AssertionError, match="no channel from rank 0 to rank 3"):
        Channels(0, {}).to(3)


def decode_gpu_keeps_computing(rank, results):
    """Rank 1 (decode) runs kernels to completion while its receive from rank 0 is posted; only
    then does it tell rank 0, over the other direction, to send."""
    torch.cuda.set_device(rank)
    peer = 1 - rank
    k, v = ([x.cuda() for x in xs] for xs in caches(rank))
    channels = open_channels(k[0].device)
    receiver, sender = KVReceiver(channels, [peer], k, v, timeout=30), KVSender(channels, timeout=30)
    if rank == 1:
        x = torch.randn(2048, 2048, device="cuda")
        start = time.monotonic()
        for _ in range(20):
            x = torch.tanh(x @ x)
        torch.cuda.current_stream().synchronize()  # never returns if the posted receive blocks this stream
        computed_s = time.monotonic() - start
        receiver.expect(2, block_ids=[3, 4], first_block=0, sources=[0])
        sender.send_layer(1, 0, 0, 0, [0], k[0], v[0])  # the go signal
        done, failed = poll_until_settled(receiver, limit=30)
        results.put(("decode", (computed_s, done, failed, landed(k, v, [3, 4], 0, [7, 8]))))
    else:
        receiver.expect(1, block_ids=[5], first_block=0, sources=[1])
        go, _ = poll_until_settled(receiver, limit=30)
        for layer in range(NUM_LAYERS):
            sender.send_layer(2, 1, layer, 0, [7, 8], k[layer], v[layer])
        results.put(("prefill", (go, wait_for_sends(sender))))
    time.sleep(2.0)  # the peer finishes receiving


@two_gpus
def test_a_posted_nccl_receive_never_holds_up_the_decode_gpu():
    out = run_ranks(decode_gpu_keeps_computing, world_size=2, limit=90, backend="nccl")
    computed_s, done, failed, arrived = out["decode"]
    assert out["prefill"] == [[1], []]
    assert (done, failed, arrived) == ([2], [], True)
    assert computed_s < 20


def sender_dies(rank, results):
    """Rank 0 (prefill, cuda:0) sends transfer 5 whole and one layer of transfer 3, then dies;
    rank 1 (decode, cuda:1) fails transfer 3 only, and lives on to compute."""
    torch.cuda.set_device(rank)
    k, v = ([x.cuda() for x in xs] for xs in caches(rank))
    channels = open_channels(k[0].device)
    if rank == 0:
        sender = KVSender(channels, timeout=30)
        for layer in range(NUM_LAYERS):
            sender.send_layer(5, 1, layer, 0, [5], k[layer], v[layer])
        sender.send_layer(3, 1, 0, 0, [1, 2], k[0], v[0])
        wait_for_sends(sender)
        os._exit(1)  # dies mid-transfer: layers 1 and 2 of transfer 3 never leave
    receiver = KVReceiver(channels, [0], k, v, timeout=20)
    receiver.expect(5, block_ids=[6], first_block=0, sources=[0])
    receiver.expect(3, block_ids=[4, 7], first_block=0, sources=[0])
    done, failed = poll_until_settled(receiver, limit=40)
    time.sleep(2.0)  # a watchdog that tears the process down would have done so by now
    alive = torch.ones(1, device="cuda").add_(1).item() == 2
    results.put(("decode", (done, failed, landed(k, v, [6], 0, [5]), alive)))


@two_gpus
def test_a_dead_nccl_peer_fails_only_its_unfinished_transfers():
    done, failed, arrived, alive = run_ranks(sender_dies, world_size=2, limit=90, backend="nccl")["decode"]
    assert done == [5] and arrived and alive
    assert [x for x, _ in failed] == [3] and ("rank 0" in failed[0][1] or "ranks [0]" in failed[0][1])
