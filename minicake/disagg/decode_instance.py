"""A decode instance: reserves blocks, receives a prompt's K/V layer by layer, then decodes.

A new request first reserves every block its prompt needs (docs/design.md, The life of one request), reusing
the blocks of a prefix this instance already holds, and only then asks its prefill group to
start, saying which blocks not to send. When all layers have arrived and the last prefill
stage sent the first token, the sequence joins the engine's running batch through
`Engine.add_prefilled`, as soon as fewer than `max_num_seqs` run, and the ordinary
`Engine.step()` decodes it. A failed or silent transfer aborts only its own request, with the reason.
"""
import time
from collections import deque

from minicake.disagg.transfer import Channels, KVReceiver
from minicake.sched.sequence import Sequence
from minicake.engine import StepOutput
from minicake.disagg.instance import Instance
from minicake.disagg.messages import Abort, Heartbeat, NewRequest, StartPrefill, Prefilled, PrefillFailed


class DecodeInstance(Instance):
    def __init__(self, spec, engine, mailbox, channels: Channels):
        super().__init__(spec, engine, mailbox)
        k_caches = [k for k, _ in engine.kv_caches]
        v_caches = [v for _, v in engine.kv_caches]
        self.receiver = KVReceiver(channels, list(spec.prefill_ranks), k_caches, v_caches,
                                   engine.config.kv_transfer_timeout)
        self.to_reserve: deque[NewRequest] = deque()  # waiting for free blocks, in arrival order
        self.receiving: dict[int, tuple[NewRequest, Sequence]] = {}  # transfer id -> request
        self.prefilled: dict[int, Prefilled] = {}  # first tokens of transfers still receiving
        self.kv_complete: set[int] = set()
        # what the transfer adds to TTFT: from the end of prefill compute until the decode
        # side holds every layer (one clock: instances of a cluster share a host here)
        self.kv_wait_s, self.num_transfers = 0.0, 0

    def handle(self, msg) -> None:
        if isinstance(msg, NewRequest):
            self.to_reserve.append(msg)
        elif isinstance(msg, Prefilled):
            if msg.transfer_id in self.receiving:
                self.prefilled[msg.transfer_id] = msg
        elif isinstance(msg, Heartbeat):
            self.receiver.heard_from(msg.rank)
        elif isinstance(msg, PrefillFailed):
            self._fail(msg.transfer_id, msg.error)
        elif isinstance(msg, Abort):
            self._abort(msg.request_id)
        else:
            raise AssertionError(f"a decode instance got {type(msg).__name__}")

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def waiting_for_peers(self) -> bool:
        return bool(self.to_reserve or self.receiving)

    def work(self) -> None:
        self._reserve()
        done, failed = self.receiver.poll()
        self.kv_complete.update(done)
        for transfer_id, error in failed:
            self._fail(transfer_id, error)
        for transfer_id in [x for x in self.receiving if x in self.kv_complete and x in self.prefilled]:
            if len(self.engine.scheduler.running) >= self.engine.config.max_num_seqs:
                break  # the batch is full: the rest wait, oldest first, until a request finishes
            self._start_decoding(transfer_id)
        if self.engine.has_unfinished_requests():
            self.emit(self.engine.step())

    def _reserve(self) -> None:
        """Reserve blocks for waiting requests, oldest first, then ask prefill to start."""
        bm = self.engine.block_manager
        while self.to_reserve:
            msg = self.to_reserve[0]
            try:
                seq = Sequence(msg.request_id, msg.prompt_token_ids, msg.params)
            except Exception as e:  # a sequence that cannot be built: only this request fails
                self.to_reserve.popleft()
                error = self.request_failed(msg.request_id, e)
                self.emit([StepOutput.aborted(msg.request_id, len(msg.prompt_token_ids), error)])
                continue
            num_cached = bm.allocate_prefix(seq)  # blocks this instance holds are not sent again
            if not bm.allocate_slots(seq, len(seq) - num_cached):
                bm.free(seq)
                bm.forget(seq)
                return  # no room yet: running requests will finish and free blocks
            self.to_reserve.popleft()
            bm.record_prefix_query(len(seq), num_cached)
            seq.admitted = True
            first_block = num_cached // bm.block_size
            self.receiver.expect(msg.transfer_id, seq.block_table, first_block, list(msg.prefill_ranks))
            self.receiving[msg.transfer_id] = (msg, seq)
            self.mailbox.send(msg.prefill_ranks[0], StartPrefill(msg.request_id, msg.prompt_token_ids, msg.params,
                                                            msg.transfer_id, self.rank, first_block,
                                                            msg.fetch_from, msg.fetch_blocks))

    def _start_decoding(self, transfer_id: int) -> None:
        """Every layer arrived and the first token is known: join the running batch."""
        (_, seq), first = self.receiving.pop(transfer_id), self.prefilled.pop(transfer_id)
        self.kv_complete.discard(transfer_id)
        self.kv_wait_s += max(0.0, time.time() - first.sent_at)
        self.num_transfers += 1
        seq.num_cached_tokens = first.num_cached_tokens
        self.emit([self.engine.add_prefilled(seq, first.first_token)])

    def _fail(self, transfer_id: int, error: str) -> None:
        """The transfer cannot complete: free the reserved blocks, report the request aborted."""
        entry = self._drop(transfer_id)
        if entry is not None:
            self.emit([StepOutput.aborted(entry[0].request_id, len(entry[1]), error)])

    def _abort(self, request_id: str) -> None:
        self.to_reserve = deque(m for m in self.to_reserve if m.request_id != request_id)
        for transfer_id, (msg, _) in list(self.receiving.items()):
            if msg.request_id == request_id:
                self._drop(transfer_id)
        self.engine.abort_request(request_id)  # a request already decoding

    def _drop(self, transfer_id: int):
        entry = self.receiving.pop(transfer_id, None)
        self.receiver.forget(transfer_id)  # late payloads are drained and dropped
        self.prefilled.pop(transfer_id, None)
        self.kv_complete.discard(transfer_id)
        if entry is not None:
            self.engine.block_manager.free(entry[1])
            self.engine.block_manager.forget(entry[1])
        return entry

    def stats(self) -> dict:
        stats = self.engine.stats()
        stats["num_waiting"] += len(self.to_reserve) + len(self.receiving)
        stats["num_receiving"] = len(self.receiving)
        stats["kv_wait_s"], stats["num_transfers"] = self.kv_wait_s, self.num_transfers
        stats["num_received_blocks"] = self.receiver.num_received_blocks
        return stats
