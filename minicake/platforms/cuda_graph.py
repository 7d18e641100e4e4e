"""CUDA graphs for decode steps, and the warm-up that compiles every kernel before the first request.

On a GPU a decode step of the bundled model is ~850 kernel launches, and Python launches them
slower than the GPU runs them. As vLLM and nano-vllm do, the engine captures one decode step
per batch bucket (1, 2, 4, 8, 16, 24, ... up to max_num_seqs) over static input buffers, and
replays it: a step of n sequences is padded to the smallest bucket >= n. Padding rows read no
K/V (context length 0), write none (slot -1) and are never sampled; every op of the model
works row by row, so the real rows get the logits of the unpadded step. The graphs share one
memory pool, captured largest first. `StaticInputs.fill`, the bucketing and padding, is plain
torch: the tests run it on the CPU. `warm_up` runs each Triton specialisation a step can need.
"""
import bisect
import itertools

import torch

from minicake.model.attention import AttentionMetadata


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 below max_num_seqs, then max_num_seqs."""
    return sorted({b for b in (1, 2, 4, *range(8, max_num_seqs, 8)) if b < max_num_seqs} | {max_num_seqs})


class StaticInputs:
    """The input buffers every graph reads, rows for the largest bucket: a bucket's graph reads
    its first `bucket` rows. One new token per row, so query_start_loc is fixed."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, device: torch.device):
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.full((max_batch, max_blocks_per_seq), -1, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)

    def view(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        return self.input_ids[:bucket], self.positions[:bucket], AttentionMetadata(
            self.query_start_loc[:bucket + 1], self.context_lens[:bucket],
            self.block_tables[:bucket], self.slot_mapping[:bucket])

    def fill(self, bucket: int, input_ids, positions, meta: AttentionMetadata):
        """Write a decode step of n <= bucket sequences into rows 0..n-1 and padding into rows
        n..bucket-1 (no device-to-host reads); returns the bucket's view."""
        n, width = len(input_ids), meta.block_tables.shape[1]
        assert n <= bucket and width <= self.block_tables.shape[1], f"{n} rows of {width} blocks do not fit"
        self.input_ids[:n].copy_(input_ids)
        self.input_ids[n:bucket].zero_()
        self.positions[:n].copy_(positions)
        self.positions[n:bucket].zero_()
        self.context_lens[:n].copy_(meta.context_lens)
        self.context_lens[n:bucket].zero_()  # padding rows attend to nothing
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:bucket].fill_(-1)  # ... and store nothing
        # columns past a row's blocks keep stale ids: attention reads only up to its context length
        self.block_tables[:n, :width].copy_(meta.block_tables)
        return self.view(bucket)


def logits_of_step(model, kv_caches, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
    """A decode step's logits [num_seqs, vocab]: every row is a sequence's last token."""
    return model.compute_logits(model(input_ids, positions, meta, kv_caches))


class CudaGraphs:
    """The runner's decode graphs on CUDA (the interface of platforms/cpu/decode_graph.py's
    DecodeGraphs): `capture` once, before serving; then `run` replays the step's bucket."""

    def __init__(self, model, kv_caches, max_num_seqs: int, max_blocks_per_seq: int):
        self.model, self.kv_caches = model, kv_caches
        self.buckets = batch_buckets(max_num_seqs)
        device = kv_caches[0][0].device
        self.inputs = StaticInputs(self.buckets[-1], max_blocks_per_seq, device)
        # every graph writes its logits here; they are read before the next replay overwrites them
        self.logits = torch.empty(self.buckets[-1], model.config.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per bucket, largest first on one shared memory pool (a smaller step's
        buffers fit in the largest one's). The static inputs hold padding only: the capture's
        steps read and write no K/V."""
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            self._step(bucket)  # outside the graph first: Triton compiles, cuBLAS picks its kernels
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize()

    def _step(self, bucket: int) -> None:
        # new views on every call: RoPE's per-step cos/sin (cached by the positions tensor's
        # identity) is gathered again, so the capture records the gather instead of reusing
        # what the warm-up step left
        self.logits[:bucket].copy_(logits_of_step(self.model, self.kv_caches, *self.inputs.view(bucket)))

    def run(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor | None:
        """A step where every sequence decodes one token: logits [num_seqs, vocab] (a view the
        next replay overwrites), or None where it must run eagerly (not captured)."""
        n = len(input_ids)
        i = bisect.bisect_left(self.buckets, n)
        if i == len(self.buckets) or self.buckets[i] not in self.graphs:
            return None
        self.inputs.fill(self.buckets[i], input_ids, positions, meta)
        self.graphs[self.buckets[i]].replay()
        return self.logits[:n]


@torch.inference_mode()
def warm_up(model, kv_caches, max_num_seqs: int, max_num_batched_tokens: int, max_blocks_per_seq: int) -> None:
    """Run the model once on a step of each shape class that selects another Triton
    specialisation, so that no request waits for a compile. Triton specialises integer
    arguments on == 1 and on divisibility by 16 (the number of sequences, the block table's
    width, the number of tokens in the split partials), and paged attention picks its tiles
    (decodes only or not) and its number of KV splits (from the table's width) from shapes.
    The steps store no K/V (slot -1) and read whatever the cache holds."""
    num_blocks, block_size = kv_caches[0][0].shape[:2]
    device = kv_caches[0][0].device
    for num_seqs, q_len, width in itertools.product((1, 2, 16), (1, 3, 16), _widths(max_blocks_per_seq)):
        num_tokens, context_len = num_seqs * q_len, width * block_size
        if num_seqs > max_num_seqs or num_tokens > max_num_batched_tokens or context_len < q_len:
            continue
        meta = AttentionMetadata(
            query_start_loc=torch.arange(0, num_tokens + 1, q_len, dtype=torch.int32, device=device),
            context_lens=torch.full((num_seqs,), context_len, dtype=torch.int32, device=device),
            block_tables=(torch.arange(num_seqs * width, device=device) % num_blocks).view(num_seqs, -1).int(),
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device))
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        model.run_layers(model.embed(ids), None, torch.zeros_like(ids), meta, kv_caches)
    torch.cuda.synchronize()


def _widths(max_blocks_per_seq: int) -> list[int]:
    """Block-table widths: 1, 2, 16, and at each doubling of the context (each number of KV
    splits) one divisible by 16 and one not."""
    widths, w = {1, 2, 16}, 64
    while w <= max_blocks_per_seq:
        widths |= {w, w + 2}
        w *= 2
    return sorted(x for x in widths if x <= max_blocks_per_seq)
