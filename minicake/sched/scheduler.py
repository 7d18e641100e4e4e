"""The local scheduler: continuous batching with chunked prefill and preemption by recompute.

Every step has a token budget (`max_num_batched_tokens`). Running sequences come first,
decodes (one token each) before unfinished prompts, then waiting sequences are admitted in
arrival order while budget, `max_num_seqs` and free blocks allow. A prompt longer than the
remaining budget is prefilled in chunks over several steps, mixed with the decodes of others.
When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed (they keep their prefix keys) and it waits to be recomputed.
"""
from collections import deque

from minicake.cache.block_manager import BlockManager
from minicake.sched.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        assert seq.status == SequenceStatus.WAITING, "only new sequences are added"
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        """Pick this step's sequences and set each one's num_scheduled_tokens (> 0)."""
        budget = self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        preempted = False
        # decodes first, so that a long prompt never stalls the tokens of the others
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed_tokens() > 1):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens(), budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = self.running[-1]
                preempted = True
                self._preempt(victim)
                if victim in scheduled:
                    scheduled.remove(victim)
                    budget += victim.num_scheduled_tokens
                    victim.num_scheduled_tokens = 0
                if victim is seq:
                    break
            else:
                seq.num_scheduled_tokens = num_new
                budget -= num_new
                scheduled.append(seq)
        if not preempted:  # under memory pressure, admit nobody new
            scheduled += self._admit_waiting(budget)
        for seq in scheduled:
            assert seq.num_scheduled_tokens > 0, "scheduled without tokens"
            assert len(seq.block_table) * self.block_manager.block_size >= \
                seq.num_computed_tokens + seq.num_scheduled_tokens, "scheduled tokens lack slots"
        return scheduled

    def advance(self, seqs: list[Sequence]) -> list[Sequence]:
        """After the model ran a step over `seqs`: their scheduled tokens count as computed, the
        blocks those filled get their prefix keys, and the sequences whose step computed their
        last token are returned, in order: each of them gets a new token (or, on a prefill
        instance, its prompt is done)."""
        reached_end = [seq for seq in seqs if seq.step_reaches_end()]
        for seq in seqs:
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            self.block_manager.cache_full_blocks(seq)
        return reached_end

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose prompt another instance computed into blocks it already holds joins
        the running batch directly (a decode instance)."""
        assert seq.num_computed_tokens == len(seq) and seq.block_table, "only a computed sequence with its blocks"
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _admit_waiting(self, budget: int) -> list[Sequence]:
        admitted = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_cached = self.block_manager.allocate_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens(), budget)
            if not self.block_manager.allocate_slots(seq, num_new):
                self.block_manager.free(seq)
                seq.num_computed_tokens = 0
                break
            if not seq.admitted:
                seq.admitted = True
                seq.num_cached_tokens = num_cached
                self.block_manager.record_prefix_query(len(seq), num_cached)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_scheduled_tokens = num_new
            budget -= num_new
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finished or aborted: the sequence leaves its queue and its blocks are released."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        self.block_manager.forget(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
