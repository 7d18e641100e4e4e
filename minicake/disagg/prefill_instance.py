"""A prefill instance: one stage of a prefill group that computes prompts and ships their K/V.

Stage 0 owns the request queue and runs the ordinary `Engine.step()` (chunked prefill, prefix
cache) with itself plugged in as the step's stage (`Engine.serve_as_prefill`; the runner calls
its `begin`, `after_layer` and `end`): each step becomes a `StageBatch` saying, per request,
which blocks are ready to send; after each of its layers the new blocks go to the decode
instance that reserved them (docs/design.md, Layer-wise KV transfer); after its last layer it
hands the hidden states to the next stage (Chunked pipeline-parallel prefill) or, alone in its
group, lets the engine sample the first token. Later stages run their layers on what arrives.
Whoever samples tells the decode instance `Prefilled`. A request leaves the engine once its
prompt is computed ("prefilled"). A single-stage instance also keeps a host KV pool, reports the
block keys it holds to the parent (the Conductor's index), and pulls a prefix from another
prefill instance first when told to (hot-spot migration).
"""
import time
from collections import deque

import torch

from minicake.disagg.migration import BlockFetcher, FetchBlocks, FetchReply, holder_send
from minicake.disagg.transfer import Channels, KVSender
from minicake.engine import StepOutput
from minicake.model.runner import FlatBatch
from minicake.sampling import sample
from minicake.conductor.live import HeldKeys
from minicake.sched.sequence import Sequence
from minicake.disagg.instance import Instance
from minicake.disagg.messages import PARENT, Abort, Heartbeat, HeldBlocks, StartPrefill, Prefilled, PrefillFailed
from minicake.disagg.pipeline import NeighbourFailed, SampleRow, SendPlan, StageBatch, StageRunner, stage_layers

HEARTBEAT_S = 1.0


class PrefillInstance(Instance):
    def __init__(self, spec, engine, mailbox, channels: Channels):
        super().__init__(spec, engine, mailbox)
        cfg, layers = engine.config, len(engine.model.layers)
        self.stage, self.group = spec.stage, spec.group_ranks
        self.is_last = self.stage == len(self.group) - 1
        self.sender = KVSender(channels, cfg.kv_transfer_timeout)
        self.layers = stage_layers(layers, len(self.group), self.stage)
        self.runner = StageRunner(engine.model, engine.kv_caches, self.layers, channels, self.sender,
                                  cfg.kv_transfer_timeout)
        self.requests: dict[str, tuple[Sequence, StartPrefill]] = {}  # stage 0: request id -> its sequence
        self.sent_blocks: dict[str, int] = {}  # stage 0: request id -> blocks sent (or held by decode)
        self.batch: StageBatch | None = None  # stage 0: the step being run
        self.batches: deque[StageBatch] = deque()  # stages > 0: batches from the previous stage
        self.dst_of: dict[int, int] = {}  # transfer id -> decode rank, to report failed sends
        self.last_heartbeat = 0.0
        self.fetcher, self.held = None, HeldKeys()
        if self.stage == 0:
            engine.serve_as_prefill(self)
        if len(self.group) == 1:  # the pool and migration follow stage 0's blocks: single-stage groups only
            self.fetcher = BlockFetcher(channels, engine.block_manager, engine.kv_caches, list(spec.prefill_ranks),
                                        cfg.kv_transfer_timeout, mailbox)

    def handle(self, msg) -> None:
        if isinstance(msg, StartPrefill):
            assert self.stage == 0, "requests enter a prefill group at stage 0"
            if msg.fetch_from is None or self.fetcher is None or not self.fetcher.start(
                    msg.transfer_id, msg.prompt_token_ids, msg.fetch_blocks, msg.fetch_from, msg):
                self._admit(msg)
        elif isinstance(msg, FetchBlocks):
            holder_send(msg, self.engine.block_manager, self.engine.block_manager.pool, self.engine.kv_caches,
                        self.sender, self.mailbox)
        elif isinstance(msg, FetchReply):
            self.fetcher.on_reply(msg)
        elif isinstance(msg, StageBatch):
            self.batches.append(msg)
        elif isinstance(msg, Abort):
            if self.requests.pop(msg.request_id, None) is not None:
                self.engine.abort_request(msg.request_id)
                del self.sent_blocks[msg.request_id]
            fetching = self.fetcher.fetches.items() if self.fetcher is not None else ()
            for fetch_id in [i for i, f in fetching if f.payload.request_id == msg.request_id]:
                self.fetcher.cancel(fetch_id)
        else:
            raise AssertionError(f"a prefill instance got {type(msg).__name__}")

    def fail(self, msg, e: Exception) -> bool:
        """A StartPrefill that could not be admitted (e.g. a seed torch refuses) fails on its decode instance."""
        if not isinstance(msg, StartPrefill):
            return False
        error = self.request_failed(msg.request_id, e)
        self.handle(Abort(msg.request_id))  # whatever of it got in leaves
        self.mailbox.send(msg.decode_rank, PrefillFailed(msg.transfer_id, error))
        return True

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests() or bool(self.batches)

    def waiting_for_peers(self) -> bool:
        return self.sender.num_pending > 0 or (self.fetcher is not None and bool(self.fetcher.fetches))

    def _admit(self, msg: StartPrefill) -> None:
        seq = self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
        self.requests[msg.request_id] = (seq, msg)
        self.sent_blocks[msg.request_id] = msg.first_block

    def _report_blocks(self) -> None:
        """Tell the parent which block keys were gained and lost (device cache and pool), batched."""
        bm = self.engine.block_manager
        held = set(bm.cached) | (set(bm.pool.entries) if bm.pool is not None else set())
        added, removed = self.held.diff(held)
        if added or removed:
            self.mailbox.send(PARENT, HeldBlocks(self.rank, added, removed))

    def work(self) -> None:
        for transfer_id, error in self.sender.poll():
            if transfer_id in self.dst_of:  # a failed migration send is the puller's to notice
                self.mailbox.send(self.dst_of[transfer_id], PrefillFailed(transfer_id, error))
        if self.fetcher is not None:
            for msg in self.fetcher.poll():
                try:
                    self._admit(msg)
                except Exception as e:
                    self.fail(msg, e)
        if self.stage == 0:
            self._step()
            if len(self.group) == 1:
                self._report_blocks()
        elif self.batches:
            batch = self.batches.popleft()
            positions, meta = batch.tensors(self.engine.device)
            try:
                hidden, residual = self.runner.recv_hidden(len(batch.positions), self.engine.model_config.hidden_size,
                                                           self.engine.kv_caches[0][0].dtype, self.engine.device,
                                                           src=self.group[self.stage - 1])
                hidden, residual = self.runner.run_layers(hidden, residual, positions, meta, batch, self._heartbeat)
                if not self.is_last:
                    self._pass_on(hidden, residual, batch)
                elif batch.samples:
                    self._sample(hidden, residual, batch.samples, batch.positions)
            except NeighbourFailed as e:  # the requests of this batch fail like a failed K/V send
                for transfer_id, dst in {(s.transfer_id, s.dst) for s in batch.sends + batch.samples}:
                    self.mailbox.send(dst, PrefillFailed(transfer_id, str(e)))

    def stats(self) -> dict:
        return self.engine.stats() | {"kv_send_s": self.runner.send_s,
                                      "num_fetched_blocks": self.fetcher.num_fetched_blocks if self.fetcher else 0}

    def _heartbeat(self) -> None:
        """While computing, tell the decode instances once a second that this rank is alive:
        with send-after-prefill, or a long queue, their K/V may be many seconds away."""
        self.report_alive()  # and the parent, which otherwise hears from this loop only between steps
        if time.monotonic() - self.last_heartbeat > HEARTBEAT_S:
            for dst in self.spec.decode_ranks:
                self.mailbox.send(dst, Heartbeat(self.rank))
            self.last_heartbeat = time.monotonic()

    def _step(self) -> None:
        """Stage 0: one engine step; prompts it finished move on to their decode instances."""
        if not self.engine.has_unfinished_requests():
            return
        try:
            outputs = self.engine.step()
        except NeighbourFailed as e:
            self._abort_step(str(e))
            return
        for out in outputs:
            self._prefilled(out)

    def _prefilled(self, out: StepOutput) -> None:
        """A request's prompt is computed here (or it was aborted): it leaves this instance. Alone in
        its group, this process sampled the first token and tells the decode instance."""
        entry = self.requests.pop(out.request_id, None)
        self.sent_blocks.pop(out.request_id, None)
        if entry is None or not out.new_token_ids:  # aborted, or the last stage samples it
            return
        seq, prefill = entry
        self.mailbox.send(prefill.decode_rank, Prefilled(prefill.transfer_id, out.new_token_ids[0],
                                                         seq.num_cached_tokens, time.time()))

    def _abort_step(self, error: str) -> None:
        """The next stage failed: the step's requests free their blocks here and fail on their
        decode instances the way a failed K/V send does (PrefillFailed)."""
        for transfer_id, dst in {(s.transfer_id, s.dst) for s in self.batch.sends + self.batch.samples}:
            self.mailbox.send(dst, PrefillFailed(transfer_id, error))
        for request_id in self.batch.request_ids:
            self.requests.pop(request_id)
            del self.sent_blocks[request_id]
            self.engine.abort_request(request_id)

    # --- the engine's step calls these (Engine.serve_as_prefill): stage 0 only -----------------

    def begin(self, seqs: list[Sequence], flat: FlatBatch) -> None:
        """The step (the runner's host lists) as a StageBatch: the blocks each request completes now are sent."""
        bm, layerwise = self.engine.block_manager, self.engine.config.kv_transfer_layerwise
        query_start_loc = flat.query_start_loc
        sends, samples = [], []
        for i, seq in enumerate(seqs):
            prefill = self.requests[seq.request_id][1]
            end = seq.num_computed_tokens + seq.num_scheduled_tokens
            done = seq.step_reaches_end()  # the prompt's last chunk: its partial last block goes too
            ready = bm.blocks_needed(end) if done else end // bm.block_size
            first = self.sent_blocks[seq.request_id] if layerwise else prefill.first_block
            if ready > first and (layerwise or done):
                sends.append(SendPlan(prefill.transfer_id, prefill.decode_rank, first, seq.block_table[first:ready]))
                self.sent_blocks[seq.request_id] = ready
                self.dst_of[prefill.transfer_id] = prefill.decode_rank
            if done:
                samples.append(SampleRow(query_start_loc[i + 1] - 1, prefill.transfer_id, prefill.decode_rank,
                                         seq.params, seq.num_cached_tokens))
        self.batch = StageBatch([seq.request_id for seq in seqs], flat.positions, query_start_loc, flat.context_lens,
                                flat.block_tables, flat.slot_mapping, sends, samples, layerwise)

    def after_layer(self, layer: int) -> None:
        self.runner.after_layer(self.batch, layer, self._heartbeat)

    def end(self, hidden, residual) -> bool:
        """After this stage's last layer: True lets the engine sample (a group of one stage);
        otherwise the hidden states go to the next stage (NeighbourFailed if it cannot take them)."""
        self.runner.finish_sends(self.batch)
        if self.is_last:
            return True
        self._pass_on(hidden, residual, self.batch)
        return False

    def _pass_on(self, hidden, residual, batch: StageBatch) -> None:
        nxt = self.group[self.stage + 1]
        self.runner.send_hidden(hidden, residual, nxt)  # posted before the batch is announced
        self.mailbox.send(nxt, batch)
        for s in batch.sends:
            self.dst_of[s.transfer_id] = s.dst

    @torch.inference_mode()
    def _sample(self, hidden, residual, samples: list[SampleRow], positions: list[int]) -> None:
        """Only the last token of each finished prompt goes through the norm and the LM head; its
        first token is sampled at the position after it, as a colocated engine samples it."""
        runner = self.engine.runner  # its seed stream: unused on stages > 0 but here
        logits = runner.logits_of_rows(hidden, residual, [s.row for s in samples])
        seeds = [runner.seeds.getrandbits(63) if s.params.seed is None else s.params.seed for s in samples]
        tokens = sample(logits, [s.params for s in samples], seeds, [positions[s.row] + 1 for s in samples])
        now = time.time()
        for s, token in zip(samples, tokens):
            self.mailbox.send(s.dst, Prefilled(s.transfer_id, token, s.num_cached_tokens, now))
