"""Decode graphs: a small decode step recorded once and replayed (CUDA graphs' idea, on the CPU).

At batch 1 a decode step of the bundled model is ~300 calls into the C kernels, and between
them Python and torch spend ~3 ms choosing paths, checking shapes and allocating outputs: a
fifth of the step, on top of the weight reads that bound it. Yet every decode step of a given
batch size makes the same calls; only the values in a few inputs change (the token ids'
embeddings, positions, cache slots, block tables, lengths). So, as vLLM records a CUDA graph
per decode batch size, the runner records the C calls of one decode step of `batch`
sequences over fixed input buffers, then replays them: write the step's inputs into those
buffers and call the recorded kernels with the recorded arguments. No checks, no
allocations, no module calls on that path. The pointers stay valid: the graph keeps alive
the buffers made while recording, its inputs and the KV caches, and the model its weights and
RoPE tables (built once). What the recorded arguments fix stays fixed: the thread count.

Only the C calls are replayed, so while recording every torch op the model runs is watched
(a TorchDispatchMode): allocations and views are fine, they are the graph's buffers; an op
that computes values (a torch fallback, a copy) would be skipped by the replay, so it makes
the step unrecordable (`NotRecordable`) and that batch size stays eager.
"""
import logging

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minicake.model.attention import AttentionMetadata
from minicake.platforms.cpu import kernels

logger = logging.getLogger("minicake")
GRAPH_MAX_BATCH = 8  # decode graphs for batches of 1..8 sequences; larger ones spend little of a step in Python
ALLOCATIONS = (torch.ops.aten.empty, torch.ops.aten.empty_like)


class NotRecordable(Exception):
    """The step ran a torch op that computes values: its C calls alone do not replay it."""


class _OnlyBuffers(TorchDispatchMode):
    """Lets through allocations and views (ops that write nothing and return tensors sharing an
    input's memory), keeping their results alive; refuses every other op."""

    def __init__(self):
        super().__init__()
        self.buffers = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:  # add_, copy_, index_copy_, out=...: writes values
            raise NotRecordable(f"{func} writes into a tensor")
        out = func(*args, **(kwargs or {}))
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        if func.overloadpacket not in ALLOCATIONS and not all(
                isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in inputs for o in outs):
            raise NotRecordable(f"{func} computes values")
        self.buffers += outs
        return out


class DecodeGraph:
    """A decode step of `batch` sequences (one new token each), run by `record` once and by
    `replay` after that. Both return logits [batch, vocab_size] float32 in a buffer that the
    next replay overwrites."""

    def __init__(self, model, kv_caches, batch: int):
        self.model, self.kv_caches = model, kv_caches
        num_blocks = kv_caches[0][0].shape[0]  # no sequence holds more blocks than the cache has
        # the fixed inputs; every step writes its values into them
        hidden_size, dtype = model.config.hidden_size, model.embed_tokens.weight.dtype
        self.hidden = torch.empty(batch, hidden_size, dtype=dtype)  # [batch, hidden_size] embeddings
        self.positions = torch.zeros(batch, dtype=torch.int64)
        self.meta = AttentionMetadata(
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
            context_lens=torch.ones(batch, dtype=torch.int32),
            block_tables=torch.full((batch, num_blocks), -1, dtype=torch.int32),
            slot_mapping=torch.full((batch,), -1, dtype=torch.int64),
        )
        self.calls = None  # [(kernel, args)] once recorded
        self.buffers = []  # every tensor the recorded calls point into
        self.logits = None

    def _set_inputs(self, input_ids, positions, meta: AttentionMetadata) -> None:
        torch.index_select(self.model.embed_tokens.weight, 0, input_ids, out=self.hidden)
        self.positions.copy_(positions)
        self.meta.context_lens.copy_(meta.context_lens)
        self.meta.slot_mapping.copy_(meta.slot_mapping)
        # columns past a sequence's blocks keep stale ids: attention reads only up to its length
        self.meta.block_tables[:, :meta.block_tables.shape[1]] = meta.block_tables

    def record(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """Run the step over the fixed inputs, recording its C calls. On NotRecordable the step
        stopped part way: run it again eagerly (K/V stored twice are the same values)."""
        self._set_inputs(input_ids, positions, meta)
        # once unrecorded first, so that whatever the model builds on first use (RoPE's cos/sin
        # table, on a decode instance whose first step is a decode) exists before the recording
        self._forward()
        watch = _OnlyBuffers()
        with kernels.recording() as calls, watch:
            logits = self._forward()
        self.calls, self.buffers, self.logits = calls, watch.buffers, logits
        return logits

    def _forward(self) -> torch.Tensor:
        hidden, residual = self.model.run_layers(self.hidden, None, self.positions, self.meta, self.kv_caches)
        return self.model.compute_logits(self.model.final_norm(hidden, residual))

    def replay(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        self._set_inputs(input_ids, positions, meta)
        for kernel, args in self.calls:
            if kernel(*args) not in (None, -1):  # store_kv: a slot past the cache (checked when recorded)
                raise IndexError("slot_mapping points past the KV cache")
        return self.logits


class DecodeGraphs:
    """The runner's decode graphs, one per batch size 1..GRAPH_MAX_BATCH, each recorded the
    first time a decode step of that size runs. Only where the C kernels take the KV cache."""

    def __init__(self, model, kv_caches):
        assert kernels.usable(kv_caches[0][0]), "decode graphs replay C calls: float32 CPU caches only"
        self.model, self.kv_caches = model, kv_caches
        self.graphs: dict[int, DecodeGraph | None] = {}  # batch size -> its graph; None: recording failed

    def run(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor | None:
        """A step where every sequence decodes one token: logits [num_seqs, vocab], or None
        where it must run eagerly."""
        batch = len(input_ids)
        if batch > GRAPH_MAX_BATCH:
            return None
        if batch in self.graphs:
            graph = self.graphs[batch]
            return None if graph is None else graph.replay(input_ids, positions, meta)
        graph = DecodeGraph(self.model, self.kv_caches, batch)
        try:
            logits = graph.record(input_ids, positions, meta)
        except NotRecordable as e:
            logger.info("decode steps of %d sequences run eagerly: recording their graph met %s", batch, e)
            self.graphs[batch] = None
            return None
        self.graphs[batch] = graph
        return logits
