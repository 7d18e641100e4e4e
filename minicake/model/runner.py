"""The model runner: a scheduled batch of sequences in, one sampled token per finished row out.

It flattens the batch the way the model's attention expects it (docs/design.md, One instance:
the engine): the new tokens of every sequence concatenated, their positions, and an
`AttentionMetadata` with where each sequence starts, its context length, its block table and
the cache slot of each new token. Only the rows that complete a sequence this step (the last
token of a prompt, or a decode) go through the LM head and the sampler: a prefill chunk that
stops mid-prompt samples nothing. The engine may hand it `decode_graphs` (the CPU's,
platforms/cpu/decode_graph.py, or CUDA graphs, platforms/cuda_graph.py): decode-only steps
then replay a recorded step instead of running the model module by module. Sampling runs on
the device; the sampled ids are the only device data the step reads back. On a prefill instance a `stage` (the instance itself,
disagg/prefill_instance.py) says which layers run here, ships each layer's new K/V after it,
and, in a pipelined group, passes the hidden states on instead of sampling.
"""
import random

import torch

from minicake.model.attention import AttentionMetadata
from minicake.sampling import sample, to_device
from minicake.sched.sequence import Sequence


class ModelRunner:
    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 device: torch.device, seed: int, decode_graphs=None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.seeds = random.Random(seed)  # a seed for each request without its own
        self.pool = None  # a KVPool whose pending loads run inside the forward pass, layer by layer
        self.decode_graphs = decode_graphs  # .run(input_ids, positions, meta) -> logits or None (eager)
        self.stage = None  # a prefill instance's stage (disagg/prefill_instance.py): its layers, hooks around them

    def prepare(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat inputs for each sequence's scheduled tokens (num_computed .. + num_scheduled), built
        on the host and copied once per tensor (on CUDA from pinned memory, without a host sync)."""
        bs = self.block_size
        input_ids, positions, slots, query_start_loc, context_lens = [], [], [], [0], []
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            assert 0 <= start < end <= len(seq), f"bad schedule {start}..{end} of {len(seq)} tokens"
            table = seq.block_table
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            query_start_loc.append(query_start_loc[-1] + end - start)
            context_lens.append(end)
        width = max(len(seq.block_table) for seq in seqs)
        # block_tables: [num_seqs, width], padded with -1 (no block)
        block_tables = [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs]
        meta = AttentionMetadata(
            query_start_loc=to_device(query_start_loc, torch.int32, self.device),
            context_lens=to_device(context_lens, torch.int32, self.device),
            block_tables=to_device(block_tables, torch.int32, self.device),
            slot_mapping=to_device(slots, torch.int64, self.device),
        )
        return to_device(input_ids, torch.int64, self.device), to_device(positions, torch.int64, self.device), meta

    @torch.inference_mode()
    def execute(self, seqs: list[Sequence]) -> list[int]:
        """Run one step; returns one token per sequence whose step reaches its end, in order (none
        on a pipeline stage that hands its hidden states on). The sampled ids are the step's only
        read of device data."""
        input_ids, positions, meta = self.prepare(seqs)
        sampled, rows, num_tokens = [], [], 0  # the sequences that reach their end, their last new token
        for seq in seqs:
            num_tokens += seq.num_scheduled_tokens
            if seq.step_reaches_end():
                sampled.append(seq)
                rows.append(num_tokens - 1)
        if self.decode_graphs is not None and len(rows) == num_tokens and self.stage is None and not (
                self.pool is not None and self.pool.pending):  # decodes only; pool loads run in the layers
            logits = self.decode_graphs.run(input_ids, positions, meta)
            if logits is not None:
                return self._sample(logits, sampled)
        stage = self.stage
        if stage is not None:
            stage.begin(seqs, positions, meta)
        loading = self.pool is not None and self.pool.begin_loads()  # pooled prefix blocks come back
        # hidden, residual: [num_tokens, hidden_size]
        hidden, residual = self.model.run_layers(self.model.embed(input_ids), None, positions, meta, self.kv_caches,
                                                 stage.layers if stage else None,
                                                 before_layer=self.pool.before_layer if loading else None,
                                                 after_layer=stage.after_layer if stage else None)
        if loading:
            self.pool.end_loads()
        if (stage is not None and not stage.end(hidden, residual)) or not sampled:
            return []
        rows = to_device(rows, torch.int64, self.device)
        logits = self.model.compute_logits(self.model.final_norm(hidden[rows], residual[rows]))  # [len(sampled), vocab]
        return self._sample(logits, sampled)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row of logits [len(seqs), vocab], the row's noise keyed by its sequence's
        seed and the position of the new token."""
        for seq in seqs:
            if seq.seed is None:
                seq.seed = self.seeds.getrandbits(63)
        return sample(logits, [seq.params for seq in seqs], [seq.seed for seq in seqs], [len(seq) for seq in seqs])
