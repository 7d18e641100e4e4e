"""The model runner: a scheduled batch of sequences in, one sampled token per finished row out.

It flattens the batch the way the model's attention expects it (docs/design.md, One instance:
the engine): the new tokens of every sequence concatenated, their positions, and an
`AttentionMetadata` with where each sequence starts, its context length, its block table and
the cache slot of each new token. Only the rows that complete a sequence this step (the last
token of a prompt, or a decode) go through the LM head and the sampler: a prefill chunk that
stops mid-prompt samples nothing. On the CPU platform the engine hands it `decode_graphs`
(platforms/cpu/decode_graph.py): decode-only steps then replay a recorded step instead of
running the model module by module. On a prefill instance a `stage` (the instance itself,
disagg/prefill_instance.py) says which layers run here, ships each layer's new K/V after it,
and, in a pipelined group, passes the hidden states on instead of sampling.
"""
import torch

from minicake.model.attention import AttentionMetadata
from minicake.sampling import sample
from minicake.sched.sequence import Sequence


class ModelRunner:
    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 device: torch.device, seed: int, decode_graphs=None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)  # for requests without their own seed
        self.pool = None  # a KVPool whose pending loads run inside the forward pass, layer by layer
        self.decode_graphs = decode_graphs  # .run(input_ids, positions, meta) -> logits or None (eager)
        self.stage = None  # a prefill instance's stage (disagg/prefill_instance.py): its layers, hooks around them

    def prepare(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat inputs for each sequence's scheduled tokens (num_computed .. + num_scheduled)."""
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

        def tensor(x, dtype):
            return torch.tensor(x, dtype=dtype).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            query_start_loc=tensor(query_start_loc, torch.int32),
            context_lens=tensor(context_lens, torch.int32),
            block_tables=tensor(block_tables, torch.int32),
            slot_mapping=tensor(slots, torch.int64),
        )
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta

    @torch.inference_mode()
    def execute(self, seqs: list[Sequence]) -> list[int]:
        """Run one step; returns one token per sequence whose step reaches its end, in order (none
        on a pipeline stage that hands its hidden states on)."""
        input_ids, positions, meta = self.prepare(seqs)
        sampled = [i for i, seq in enumerate(seqs) if seq.step_reaches_end()]
        params = [seqs[i].params for i in sampled]
        generators = [seqs[i].generator for i in sampled]
        if self.decode_graphs is not None and len(sampled) == len(input_ids) and self.stage is None and not (
                self.pool is not None and self.pool.pending):  # decodes only; pool loads run in the layers
            logits = self.decode_graphs.run(input_ids, positions, meta)
            if logits is not None:
                return sample(logits.cpu(), params, generators, self.generator)
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
        rows = meta.query_start_loc[1:][sampled].long() - 1  # the last new token of each sampled sequence
        logits = self.model.compute_logits(self.model.final_norm(hidden[rows], residual[rows]))  # [len(sampled), vocab]
        return sample(logits.cpu(), params, generators, self.generator)
