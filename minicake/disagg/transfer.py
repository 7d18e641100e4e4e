"""Layer-wise KV transfer, prefill to decode, over torch.distributed (docs/design.md, Layer-wise KV transfer).

After layer j of a prefill step has stored its K/V, the prefill instance calls
`KVSender.send_layer`: a fixed-size header (transfer id, layer, first block, number of blocks)
and then that layer's blocks, copied into one contiguous tensor, leave with non-blocking sends,
and prefill goes on with layer j+1. The decode instance's `KVReceiver` reads each prefill rank's
stream header first, sizes the payload buffer from it (in gloo a receive buffer smaller than the
message aborts the process) and copies the blocks into the blocks it reserved. Only tensors cross
here, through torch.distributed, so gloo on CPU and NCCL on GPUs take the same code path.

Channels (`open_channels`): one process group per direction of each rank pair, so a receive
posted from B never queues A's send to B behind it (NCCL runs a communicator's operations in
order), and one user thread per group: receives in the thread that reads their stream, sends
from the main thread. Each direction carries one kind of stream, in order (NCCL has no tags).
On CUDA each receive thread posts and waits on a stream of its own and hands each payload over
with an event that the compute stream waits for (`_store`); sends go on the compute stream after
their payload copy and are awaited on their waiter thread's stream. On gloo: the same code
without streams. Once channels are open, nothing may synchronise the whole device
(torch.cuda.synchronize): that waits for the posted receives, i.e. for the next request.

Faults on NCCL, by construction (read from ProcessGroupNCCL; none of the CUDA path has run on a
GPU yet): every wait has a timeout, so a failed or late operation raises in the thread that
waits, after aborting only its communicator, and `NCCL_ENV` keeps the watchdog from ending the
process; a dead peer's transfers fail, the process lives on. Untested without two GPUs (the
CUDA tests in tests/test_channels.py): that a posted receive leaves the compute stream's
kernels and the other direction's sends alone, that NCCL reports a peer that died while idle
(else its transfers fail by the silence timeout), and that an abort returns while the peer is
dead (if it hangs, ProcessGroupNCCL's heartbeat monitor ends the process after
TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC).
"""
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from minicake.sampling import to_device

HEADER_TAG, PAYLOAD_TAG = 1, 2  # separate tags: a header never matches a payload receive (gloo)
HEADER_LEN = 4  # int64: transfer id, layer, first block (index in the request's block table), number of blocks
# A channel's next header may be as far away as the server's idle time: this bounds only that.
CHANNEL_TIMEOUT = timedelta(days=365)
# ProcessGroupNCCL's default error handling (3) ends the process when its watchdog sees an
# operation fail or outlive the group's timeout: a dead peer would take the survivors down. 2
# aborts only the failed communicator; the thread waiting on the operation raises. Each group
# reads it when it is created.
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}

# A gloo work completes only inside wait(), and a wait that times out ends the work: so waits
# run in one helper thread per peer, in the order the messages were posted, and the main
# thread only reads their results from a queue.


@dataclass
class Channels:
    """This rank's process groups: (src, dst) -> the group that carries src -> dst."""
    rank: int
    groups: dict

    def to(self, dst: int):
        assert (self.rank, dst) in self.groups, f"no channel from rank {self.rank} to rank {dst}"
        return self.groups[(self.rank, dst)]

    def from_(self, src: int):
        assert (src, self.rank) in self.groups, f"no channel from rank {src} to rank {self.rank}"
        return self.groups[(src, self.rank)]


def open_channels(device: torch.device) -> Channels:
    """Create one process group per direction of every pair of ranks, in one order everywhere:
    collective, so every rank of the job calls it once, before its first send or receive. On CUDA
    (`device` with its index) each pair's NCCL communicator connects here, in that order, rather
    than at its first use, where a send would wait in the main thread for the peer's receive."""
    os.environ.update(NCCL_ENV)
    rank, world = dist.get_rank(), dist.get_world_size()
    device_id = device if device.type == "cuda" else None
    groups = {}
    for src in range(world):
        for dst in range(world):
            if src != dst:
                group = dist.new_group([src, dst], timeout=CHANNEL_TIMEOUT, device_id=device_id)
                if rank in (src, dst):
                    groups[(src, dst)] = group
    return Channels(rank, groups)


def side_stream(device: torch.device):
    """A CUDA stream for one thread's receives and waits; None (no stream) on CPU."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def mark(stream):
    """An event after the work queued so far on `stream`; None on CPU."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def wait_for(event, tensor: torch.Tensor) -> None:
    """The current stream reads `tensor` only after `event`, and the allocator keeps its memory
    until that stream is done with it. Nothing to do on CPU (event None)."""
    if event is not None:
        stream = torch.cuda.current_stream(tensor.device)
        stream.wait_event(event)
        tensor.record_stream(stream)


class KVSender:
    """Prefill side: starts sends and learns later how they ended; never waits on a send."""

    def __init__(self, channels: Channels, timeout: float):
        self.channels, self.timeout = channels, timeout
        self.results: queue.SimpleQueue = queue.SimpleQueue()  # (transfer_id, error or None), one per send
        self.waiters: dict[int, queue.SimpleQueue] = {}  # dst rank -> sends its thread waits for
        self.num_pending = 0

    def send_layer(self, transfer_id: int, dst: int, layer: int, first_block: int,
                   block_ids: list[int], k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Send one layer's blocks `block_ids`, which are the request's blocks first_block,
        first_block+1, ... of its block table. k_cache, v_cache: [num_blocks, block_size,
        num_kv_heads, head_dim]. The payload is a copy: the blocks may be reused right away."""
        assert block_ids, "send at least one block"
        idx = to_device(block_ids, torch.int64, k_cache.device)  # no host sync: sends stay behind compute
        payload = torch.stack((k_cache[idx], v_cache[idx]))  # [2, n, block_size, num_kv_heads, head_dim]
        header = to_device([transfer_id, layer, first_block, len(block_ids)], torch.int64, k_cache.device)
        group = self.channels.to(dst)
        try:  # posted on the compute stream: NCCL sends once the payload copy is done
            works = [dist.isend(header, dst, group=group, tag=HEADER_TAG),
                     dist.isend(payload, dst, group=group, tag=PAYLOAD_TAG)]
        except RuntimeError as e:  # the peer is gone already
            works = e
        if dst not in self.waiters:
            self.waiters[dst] = queue.SimpleQueue()
            threading.Thread(target=self._wait_sends, args=(dst, self.waiters[dst], side_stream(k_cache.device)),
                             name=f"kv-send-{dst}", daemon=True).start()
        self.num_pending += 1
        self.waiters[dst].put((transfer_id, works, payload))  # the payload lives until its send ends

    def poll(self) -> list[tuple[int, str]]:
        """(transfer id, reason) for each send that failed or timed out since the last poll."""
        failed = []
        while not self.results.empty():
            transfer_id, error = self.results.get()
            self.num_pending -= 1
            if error is not None:
                failed.append((transfer_id, error))
        return failed

    def _wait_sends(self, dst: int, sends: queue.SimpleQueue, stream) -> None:
        error = None  # after one failure the stream to dst is out of step: fail every later send
        with torch.cuda.stream(stream):  # a wait makes this thread's stream wait, never the compute stream
            while True:
                transfer_id, works, _payload = sends.get()
                try:
                    if isinstance(works, Exception):
                        raise works
                    for w in works:
                        if error is None:
                            w.wait(timeout=timedelta(seconds=self.timeout))
                except Exception as e:  # noqa: BLE001 - a dead peer or a timeout, reported as text
                    error = f"KV send to rank {dst} failed: {e}"
                self.results.put((transfer_id, error))


@dataclass
class _Expected:
    block_ids: list[int]  # the request's whole block table on the decode side
    first_block: int  # blocks before this one the decode side already holds
    sources: set[int]  # prefill ranks that send parts of it
    remaining: int  # (layer, block) pairs still to arrive
    since: float  # when it was expected


class KVReceiver:
    """Decode side: drains every prefill rank's stream into the reserved blocks.

    Payloads of a transfer nobody expects (aborted or timed out) are received and dropped, so
    each stream stays in step with its sender whatever happens to single requests.
    """

    def __init__(self, channels: Channels, sources: list[int], k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor], timeout: float):
        self.channels, self.k_caches, self.v_caches, self.timeout = channels, k_caches, v_caches, timeout
        self.expected: dict[int, _Expected] = {}
        # (src, header list, payload, CUDA event after its arrival or None) | (src, None, error text, None)
        self.arrived: queue.SimpleQueue = queue.SimpleQueue()
        self.last_progress = {src: time.monotonic() for src in sources}
        self.errors: dict[int, str] = {}
        self.num_received_blocks = 0  # (layer, block) pairs stored into reserved blocks, ever
        for src in sources:
            threading.Thread(target=self._receive_stream, args=(src,), name=f"kv-recv-{src}", daemon=True).start()

    def expect(self, transfer_id: int, block_ids: list[int], first_block: int, sources: list[int]) -> None:
        """Blocks first_block.. of `block_ids` will arrive for every layer from `sources`."""
        assert 0 <= first_block < len(block_ids), "a transfer sends at least the last block"
        assert transfer_id not in self.expected, f"transfer {transfer_id} is already expected"
        remaining = len(self.k_caches) * (len(block_ids) - first_block)
        self.expected[transfer_id] = _Expected(list(block_ids), first_block, set(sources), remaining, time.monotonic())

    def forget(self, transfer_id: int) -> None:
        """Stop expecting a transfer (aborted): its blocks may be freed, late payloads are dropped."""
        self.expected.pop(transfer_id, None)

    def heard_from(self, src: int) -> None:
        """The source is alive and computing (a control-plane heartbeat): restart its silence clock."""
        self.last_progress[src] = time.monotonic()

    def poll(self) -> tuple[list[int], list[tuple[int, str]]]:
        """Store what arrived, without waiting. Returns the transfers now complete, and
        (transfer id, reason) for those whose source failed or sent nothing of theirs for
        `timeout` seconds; neither is expected any more."""
        while not self.arrived.empty():
            src, header, payload, arrived = self.arrived.get()
            self.last_progress[src] = time.monotonic()
            if isinstance(payload, str):
                self.errors[src] = payload
            else:
                self._store(*header, payload, arrived)
        done, failed, now = [], [], time.monotonic()
        for transfer_id, exp in list(self.expected.items()):
            errors = [self.errors[s] for s in exp.sources if s in self.errors]
            quiet_since = max([exp.since] + [self.last_progress[s] for s in exp.sources])
            if exp.remaining == 0:
                done.append(transfer_id)
            elif errors:
                failed.append((transfer_id, errors[0]))
            elif now - quiet_since > self.timeout:
                failed.append((transfer_id, f"no KV from ranks {sorted(exp.sources)} for {self.timeout:.0f}s"))
            else:
                continue
            del self.expected[transfer_id]
        return done, failed

    def _receive_stream(self, src: int) -> None:
        like = self.k_caches[0]  # [num_blocks, block_size, num_kv_heads, head_dim]
        group, stream = self.channels.from_(src), side_stream(like.device)
        try:
            with torch.cuda.stream(stream):  # waits make this thread's stream wait, never the compute stream
                while True:
                    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=like.device)
                    dist.irecv(header, src, group=group, tag=HEADER_TAG).wait(timeout=CHANNEL_TIMEOUT)
                    header = header.tolist()  # synchronises this thread's stream only
                    payload = torch.empty((2, header[3], *like.shape[1:]), dtype=like.dtype, device=like.device)
                    work = dist.irecv(payload, src, group=group, tag=PAYLOAD_TAG)
                    work.wait(timeout=timedelta(seconds=self.timeout))
                    self.arrived.put((src, header, payload, mark(stream)))
        except Exception as e:  # noqa: BLE001 - a dead peer ends the stream; the reason is reported
            self.arrived.put((src, None, f"KV stream from rank {src} failed: {e}", None))

    def _store(self, transfer_id: int, layer: int, first_block: int, num_blocks: int, payload: torch.Tensor,
               arrived) -> None:
        """payload: [2, num_blocks, block_size, num_kv_heads, head_dim], K then V; `arrived`: the
        CUDA event after its receive (None on CPU)."""
        exp = self.expected.get(transfer_id)
        if exp is None:
            return  # aborted or timed out: drop
        assert 0 <= layer < len(self.k_caches), f"transfer {transfer_id}: layer {layer} out of range"
        assert exp.first_block <= first_block and first_block + num_blocks <= len(exp.block_ids), \
            f"transfer {transfer_id}: blocks {first_block}..{first_block + num_blocks} outside the reserved ones"
        wait_for(arrived, payload)
        idx = to_device(exp.block_ids[first_block:first_block + num_blocks], torch.int64, payload.device)
        self.k_caches[layer][idx] = payload[0]
        self.v_caches[layer][idx] = payload[1]
        exp.remaining -= num_blocks
        self.num_received_blocks += num_blocks
