"""The model runner: a scheduled batch of sequences in, one sampled token per finished row out.

It flattens the batch the way the model's attention expects it (docs/design.md, One instance:
the engine): the new tokens of every sequence concatenated, their positions, and an
`AttentionMetadata` with where each sequence starts, its context length, its block table and
the cache slot of each new token. Only the rows that complete a sequence this step (the last
token of a prompt, or a decode) go through the LM head and the sampler: a prefill chunk that
stops mid-prompt samples nothing. The engine may hand it `decode_graphs` (the CPU's,
platforms/cpu/decode_graph.py, or CUDA graphs, platforms/cuda_graph.py): decode-only steps
then replay a recorded step instead of running the model module by module. The inputs are
built on the host and sampling runs on the device: the sampled ids are the only device data
a step reads back. On a prefill instance a `stage` (the instance itself,
disagg/prefill_instance.py) says which layers run here, ships each layer's new K/V after it
(from the step's host lists), and, in a pipelined group, passes the hidden states on instead
of sampling.
"""
import random
from dataclasses import dataclass

import torch

from minicake.model.attention import AttentionMetadata
from minicake.sampling import sample, to_device
from minicake.sched.sequence import Sequence


@dataclass
class FlatBatch:
    """A step's inputs as host lists, the layout of the model's flat batch (AttentionMetadata)."""
    input_ids: list[int]
    positions: list[int]
    query_start_loc: list[int]
    context_lens: list[int]
    slot_mapping: list[int]
    block_tables: list[list[int]]  # -1 padded to the widest


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

    def flatten(self, seqs: list[Sequence]) -> FlatBatch:
        """The step's inputs on the host: each sequence's scheduled tokens (num_computed .. + num_scheduled)."""
        bs = self.block_size
        flat = FlatBatch(input_ids=[], positions=[], query_start_loc=[0], context_lens=[], slot_mapping=[],
                         block_tables=[])
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            assert 0 <= start < end <= len(seq), f"bad schedule {start}..{end} of {len(seq)} tokens"
            table = seq.block_table
            flat.input_ids += seq.token_ids[start:end]
            flat.positions += range(start, end)
            flat.slot_mapping += [table[p // bs] * bs + p % bs for p in range(start, end)]
            flat.query_start_loc.append(flat.query_start_loc[-1] + end - start)
            flat.context_lens.append(end)
        width = max(len(seq.block_table) for seq in seqs)
        flat.block_tables = [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs]
        return flat

    def prepare(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's inputs on the device: `flatten`'s lists, copied once per tensor (on CUDA
        from pinned memory, without a host sync)."""
        return self._to_device(self.flatten(seqs))

    def _to_device(self, flat: FlatBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        meta = AttentionMetadata(
            query_start_loc=to_device(flat.query_start_loc, torch.int32, self.device),
            context_lens=to_device(flat.context_lens, torch.int32, self.device),
            block_tables=to_device(flat.block_tables, torch.int32, self.device),
            slot_mapping=to_device(flat.slot_mapping, torch.int64, self.device),
        )
        input_ids = to_device(flat.input_ids, torch.int64, self.device)
        return input_ids, to_device(flat.positions, torch.int64, self.device), meta

    @torch.inference_mode()
    def execute(self, seqs: list[Sequence]) -> list[int]:
        """Run one step; returns one token per sequence whose step reaches its end, in order (none
        on a pipeline stage that hands its hidden states on). The sampled ids are the step's only
        read of device data."""
        flat = self.flatten(seqs)
        input_ids, positions, meta = self._to_device(flat)
        ends = [i for i, seq in enumerate(seqs) if seq.step_reaches_end()]  # the sequences sampled
        sampled = [seqs[i] for i in ends]
        rows = [flat.query_start_loc[i + 1] - 1 for i in ends]  # their last new tokens
        if self.decode_graphs is not None and len(rows) == len(flat.input_ids) and self.stage is None and not (
                self.pool is not None and self.pool.pending):  # decodes only; pool loads run in the layers
            logits = self.decode_graphs.run(input_ids, positions, meta)
            if logits is not None:
                return self._sample(logits, sampled)
        stage = self.stage
        if stage is not None:
            stage.begin(seqs, flat)
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
        return self._sample(self.logits_of_rows(hidden, residual, rows), sampled)

    def logits_of_rows(self, hidden: torch.Tensor, residual: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Only the rows sampled (each a sequence's last new token) go through the final norm and
        the LM head: hidden, residual [num_tokens, hidden_size] -> logits [len(rows), vocab]."""
        idx = to_device(rows, torch.int64, hidden.device)
        return self.model.compute_logits(self.model.final_norm(hidden[idx], residual[idx]))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per row of logits [len(seqs), vocab], the row's noise keyed by its sequence's
        seed and the position of the new token."""
        for seq in seqs:
            if seq.seed is None:
                seq.seed = self.seeds.getrandbits(63)
        return sample(logits, [seq.params for seq in seqs], [seq.seed for seq in seqs], [len(seq) for seq in seqs])
