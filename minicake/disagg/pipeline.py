"""Chunked pipeline-parallel prefill and the K/V sends after each layer.

A prefill group of S processes splits the model's layers into S contiguous ranges. Stage 0
schedules (chunked prefill, prefix cache) and describes each step as a `StageBatch`; the batch
travels down the stages through the control plane while its hidden states travel through
torch.distributed, so stage s works on chunk c while stage s+1 works on chunk c-1. Every
stage sends the K/V of its own layers to the decode instance right after computing them.
All stages have the same number of blocks and follow stage 0's block tables in the same
order, so a block id means the same tokens on every stage. S=1 is plain prefill. (docs/design.md,
Chunked pipeline-parallel prefill; Layer-wise KV transfer.)
"""
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from minicake.disagg.transfer import Channels, KVSender, side_stream
from minicake.sampling import to_device
from minicake.model.attention import AttentionMetadata

HIDDEN_TAG = 3  # hidden states between neighbour stages


class NeighbourFailed(Exception):
    """A hidden-state send or receive toward a neighbour stage failed or timed out: the
    requests of the step are aborted, the stage itself goes on."""


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """The contiguous layers of one stage; the first stages take one more when it does not divide."""
    assert 0 <= stage < num_stages <= num_layers, f"stage {stage} of {num_stages} over {num_layers} layers"
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


@dataclass
class SendPlan:
    """Send the request's blocks first_block.. (ids `block_ids` on this prefill group) to `dst`."""
    transfer_id: int
    dst: int
    first_block: int
    block_ids: list[int]


@dataclass
class SampleRow:
    """A request whose prompt ends in this step: the last stage samples its first token."""
    row: int  # index of its last new token in the flat batch
    transfer_id: int
    dst: int
    params: object  # SamplingParams
    num_cached_tokens: int


@dataclass
class StageBatch:
    """One prefill step as plain lists (control plane); hidden states follow on torch.distributed."""
    request_ids: list[str]
    positions: list[int]
    query_start_loc: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: list[int]
    sends: list[SendPlan]  # after each layer (layer-wise) or after the last one (send-all-after)
    samples: list[SampleRow]
    layerwise: bool

    def tensors(self, device) -> tuple[torch.Tensor, AttentionMetadata]:
        def t(x, dtype):
            return to_device(x, dtype, device)
        meta = AttentionMetadata(t(self.query_start_loc, torch.int32), t(self.context_lens, torch.int32),
                                 t(self.block_tables, torch.int32), t(self.slot_mapping, torch.int64))
        return t(self.positions, torch.int64), meta


class StageRunner:
    """This process's part of a prefill group: its layers, the K/V sends after each of them, and
    the hidden states to and from the neighbour stages."""

    def __init__(self, model, kv_caches, layers: range, channels: Channels, sender: KVSender, timeout: float):
        self.model, self.kv_caches, self.layers = model, kv_caches, layers
        self.channels, self.sender, self.timeout = channels, sender, timeout
        self.wait_stream = side_stream(kv_caches[0][0].device)  # waits for sent hidden states happen here
        self.hidden_sends: list = []  # (works, tensors) of the hidden states sent downstream
        self.send_s = 0.0  # time this process spent starting K/V sends (gathering the blocks)

    @torch.inference_mode()
    def run_layers(self, hidden, residual, positions, meta: AttentionMetadata, batch: StageBatch, heartbeat):
        """A later stage's step: hidden, residual [num_tokens, hidden_size] from the previous stage
        through this stage's layers (the model's own loop), K/V sent as `after_layer` says."""
        hidden, residual = self.model.run_layers(hidden, residual, positions, meta, self.kv_caches, self.layers,
                                                 after_layer=lambda i: self.after_layer(batch, i, heartbeat))
        self.finish_sends(batch)
        return hidden, residual

    def after_layer(self, batch: StageBatch, layer: int, heartbeat) -> None:
        """Layer `layer` has written the step's K/V: start sending its new blocks (layer-wise), and
        `heartbeat()` keeps peers patient."""
        if batch.layerwise:
            self._send(batch.sends, layer)
        heartbeat()

    def finish_sends(self, batch: StageBatch) -> None:
        """After the stage's last layer: without layer-wise sends, every layer goes now."""
        if not batch.layerwise:
            for i in self.layers:
                self._send(batch.sends, i)

    def _send(self, sends: list[SendPlan], layer: int) -> None:
        start = time.perf_counter()
        k_cache, v_cache = self.kv_caches[layer]
        for s in sends:
            self.sender.send_layer(s.transfer_id, s.dst, layer, s.first_block, s.block_ids, k_cache, v_cache)
        self.send_s += time.perf_counter() - start

    def send_hidden(self, hidden, residual, dst: int) -> None:
        """Pass the activations to the next stage; waits only for the previous batch's send,
        which keeps at most two batches between neighbours. A dead or silent next stage raises
        NeighbourFailed."""
        try:
            self._wait_hidden_sends()
            payload = torch.stack((hidden, residual)).contiguous()  # [2, num_tokens, hidden_size]
            work = dist.isend(payload, dst, group=self.channels.to(dst), tag=HIDDEN_TAG)
            self.hidden_sends.append(([work], payload))
        except RuntimeError as e:  # a dead or silent next stage
            self.hidden_sends = []
            raise NeighbourFailed(f"hidden-state send to rank {dst} failed (timeout {self.timeout:g}s): {e}") from e

    def _wait_hidden_sends(self) -> None:
        with torch.cuda.stream(self.wait_stream):  # the compute stream does not wait for a send
            for works, _ in self.hidden_sends:
                for w in works:
                    w.wait(timeout=timedelta(seconds=self.timeout))
        self.hidden_sends = []

    def recv_hidden(self, num_tokens: int, hidden_size: int, dtype, device, src: int):
        payload = torch.empty((2, num_tokens, hidden_size), dtype=dtype, device=device)
        try:  # on the compute stream, which needs the hidden states next
            dist.irecv(payload, src, group=self.channels.from_(src), tag=HIDDEN_TAG).wait(
                timeout=timedelta(seconds=self.timeout))
        except RuntimeError as e:  # a dead or silent previous stage
            raise NeighbourFailed(f"hidden-state receive from rank {src} failed "
                                  f"(timeout {self.timeout:g}s): {e}") from e
        return payload[0], payload[1]
