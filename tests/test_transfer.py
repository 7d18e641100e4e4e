"""The layer-wise KV path between processes, on synthetic KV caches over gloo.

Each test launches real ranks with minicake's launcher. The senders' caches are random with a
fixed seed, so the receiving rank rebuilds them to check what landed in its reserved blocks.
"""
import importlib
import json
import os
import queue
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minicake.disagg.transfer import Channels, KVReceiver, KVSender, open_channels
from minicake.disagg.launcher import PARENT_PID, die_with_parent, free_port, init_rank, launch, stop

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 3, 12, 4, 2, 8


def caches(seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return ([torch.randn(shape, generator=g) for _ in range(NUM_LAYERS)],
            [torch.randn(shape, generator=g) for _ in range(NUM_LAYERS)])


def poll_until_settled(receiver: KVReceiver, limit: float = 20.0):
    done, failed, start = [], [], time.monotonic()
    while receiver.expected and time.monotonic() - start < limit:
        d, f = receiver.poll()
        done, failed = done + d, failed + f
        time.sleep(0.005)
    return done, failed


def run_ranks(target, world_size: int, limit: float = 60.0, backend: str = "gloo") -> dict:
    """Run `target(rank, results)` (a function of a module in tests/) on every rank, each a
    `python -m test_transfer` process; returns what the ranks put in `results` ((key, value)
    pairs, JSON), by key."""
    folder = Path(tempfile.mkdtemp())
    procs = launch("test_transfer", list(range(world_size)), world_size, "127.0.0.1", free_port(),
                   args=(target.__module__, target.__name__, backend, str(folder)),
                   env={"PYTHONPATH": str(Path(__file__).parent)})
    deadline = time.monotonic() + limit
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {limit}s")
            time.sleep(0.2)
    finally:
        stop(procs, timeout=5)
    return {k: v for f in folder.glob("*.json") for k, v in json.loads(f.read_text())}


def rank_main(module: str, target_name: str, backend: str, folder: str) -> None:
    """A rank's process: join the group, run the target, write what it put."""
    die_with_parent(int(os.environ[PARENT_PID]))
    torch.set_num_threads(1)
    rank, results = init_rank(backend), queue.Queue()
    try:
        getattr(importlib.import_module(module), target_name)(rank, results)
    finally:  # a rank that dies on purpose (os._exit) writes nothing
        (Path(folder) / f"{rank}.json").write_text(json.dumps(list(results.queue)))
    os._exit(0)  # without tearing gloo down under the receive threads


def fan_in(rank, results):
    """Ranks 0 and 1 are two prefill stages (layer 0; layers 1-2), rank 2 the decode side."""
    k, v = caches(rank)
    channels = open_channels(k[0].device)
    if rank < 2:
        sender = KVSender(channels, timeout=10)
        layers = [0] if rank == 0 else [1, 2]
        for layer in layers:  # transfer 8 is one nobody expects any more: drained, then 9 lands
            sender.send_layer(8, 2, layer, 0, [0, 1], k[layer], v[layer])
            sender.send_layer(9, 2, layer, 1, [5, 2, 9], k[layer], v[layer])
        while sender.num_pending:
            assert not sender.poll(), "every send completes"
            time.sleep(0.005)
        dist.barrier()  # stay until the decode side is done: a closed stream would fail transfer 7 early
        return
    before = [x.clone() for x in k]
    receiver = KVReceiver(channels, [0, 1], k, v, timeout=10)
    receiver.expect(9, block_ids=[0, 1, 4, 3], first_block=1, sources=[0, 1])
    receiver.expect(7, block_ids=[6], first_block=0, sources=[0])  # the sender never sends it
    receiver.timeout = 2.0
    done, failed = poll_until_settled(receiver)
    landed = []
    for layer in range(NUM_LAYERS):
        sent_k, sent_v = caches(0 if layer == 0 else 1)
        landed.append(torch.equal(k[layer][[1, 4, 3]], sent_k[layer][[5, 2, 9]])
                      and torch.equal(v[layer][[1, 4, 3]], sent_v[layer][[5, 2, 9]]))
    untouched = all(torch.equal(k[i][[0, 2, 5, 6]], before[i][[0, 2, 5, 6]]) for i in range(NUM_LAYERS))
    results.put(("decode", (done, failed, landed, untouched)))
    dist.barrier()


def test_each_stage_sends_its_layers_into_the_blocks_the_decode_side_reserved():
    done, failed, landed, untouched = run_ranks(fan_in, world_size=3)["decode"]
    assert done == [9]
    assert landed == [True] * NUM_LAYERS
    assert untouched, "a held block, a dropped transfer's blocks and unreserved blocks keep their K/V"
    assert [x for x, _ in failed] == [7] and "no KV from ranks [0]" in failed[0][1]


def sender_dies(rank, results):
    k, v = caches(rank)
    channels = open_channels(k[0].device)
    if rank == 0:
        KVSender(channels, timeout=10).send_layer(3, 1, 0, 0, [1, 2], k[0], v[0])
        time.sleep(1.0)
        os._exit(1)  # dies mid-transfer: layers 1 and 2 never leave
    receiver = KVReceiver(channels, [0], k, v, timeout=30)
    receiver.expect(3, block_ids=[4, 5], first_block=0, sources=[0])
    start = time.monotonic()
    done, failed = poll_until_settled(receiver)
    results.put(("decode", (done, failed, time.monotonic() - start)))


def test_a_prefill_rank_dying_mid_transfer_fails_that_transfer_with_a_reason():
    done, failed, seconds = run_ranks(sender_dies, world_size=2)["decode"]
    assert done == [] and [x for x, _ in failed] == [3]
    assert "rank 0" in failed[0][1]
    assert seconds < 30, "a dead peer is noticed before the timeout"


def receiver_dies(rank, results):
    k, v = caches(rank)
    channels = open_channels(k[0].device)
    if rank == 1:
        time.sleep(1.0)
        os._exit(1)
    sender = KVSender(channels, timeout=30)
    for layer in range(NUM_LAYERS):
        sender.send_layer(4, 1, layer, 0, [1], k[layer], v[layer])
    failed, start = [], time.monotonic()
    while sender.num_pending and time.monotonic() - start < 30:
        failed += sender.poll()
        time.sleep(0.01)
    results.put(("prefill", (failed, sender.num_pending)))


def test_sends_to_a_dead_decode_rank_fail_instead_of_hanging():
    failed, pending = run_ranks(receiver_dies, world_size=2)["prefill"]
    assert pending == 0
    assert {x for x, _ in failed} == {4} and "rank 1" in failed[0][1]


def test_sending_no_blocks_is_refused():
    k, v = caches(0)
    with pytest.raises(AssertionError, match="at least one block"):
        KVSender(Channels(0, {}), timeout=1).send_layer(1, 1, 0, 0, [], k[0], v[0])


if __name__ == "__main__":
    rank_main(*sys.argv[1:])
