"""The Conductor of a running cluster (docs/design.md, The live Conductor): the simulator's decision code, live.

`LiveConductor` owns the same `Conductor`, `BlockIndex`, `PrefillState`s and `DecodeState`s that
the simulator drives, and keeps them up to date from what the running system reports instead
of from simulated events: prefill instances report the block keys they gained and lost (batched,
on change: `HeldKeys`), the cluster reports each request's first token, its later tokens and
its end. Time is seconds since the cluster started. A prefill instance that dies loses every
block it held in the index and is never chosen again. A refused client is told when to retry
(`retry_after_s`) unless no wait can help (`SLOUnreachable`).
"""
import itertools
import math
import time
from dataclasses import dataclass

from minicake.conductor.conductor import (BlockIndex, Conductor, ConductorConfig, Decision, DecodeState, PrefillState,
                                      Request, request_from_tokens)
from minicake.conductor.cost_model import CostModel


class RequestRejected(Exception):
    """Raised by `Cluster.add_request` when admission control refuses a request for now (docs/design.md,
    Admission control); `retry_after_s`: when the predicted queue will let it meet the SLO (the server's 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SLOUnreachable(ValueError):
    """Raised by `Cluster.add_request` for a request that admission control would refuse even
    alone on an idle cluster: like bad input, it can never run as sent (the server answers 400)."""


class HeldKeys:
    """Instance side: the block keys reported so far, and what changed since (one batch per report)."""

    def __init__(self):
        self.reported: set[int] = set()

    def diff(self, held: set[int]) -> tuple[list[int], list[int]]:
        """(keys added, keys removed) since the last call; both empty when nothing changed."""
        added, removed = list(held - self.reported), list(self.reported - held)
        self.reported = set(held)
        return added, removed


@dataclass
class LiveRequest:
    req: Request
    decision: Decision
    num_tokens: int = 0  # output tokens so far (the first one comes from the prefill instance)


class LiveConductor:
    def __init__(self, config: ConductorConfig, cost: CostModel, num_prefill: int,
                 decode_capacity_tokens: list[int]):
        self.config, self.cost = config, cost
        self.prefill = [PrefillState(i) for i in range(num_prefill)]
        self.decode = [DecodeState(i, cap) for i, cap in enumerate(decode_capacity_tokens)]
        self.index = BlockIndex()
        self.conductor = Conductor(config, cost, self.prefill, self.decode, self.index)
        self.held: list[set[int]] = [set() for _ in range(num_prefill)]  # what each instance reported
        self.queued: list[dict[str, float]] = [{} for _ in range(num_prefill)]  # rid -> predicted prefill s
        self.dead: set[int] = set()
        self.requests: dict[str, LiveRequest] = {}
        self._ids = itertools.count()
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def schedule(self, request_id: str, token_ids: list[int], max_tokens: int) -> Decision:
        """The Conductor's decision; an admitted request is committed (queue, KV reservation).
        Unlike the simulator, baseline admission picks the decode instance now as well: a decode
        instance must reserve the blocks before its prefill starts (docs/design.md, The life of one request)."""
        assert request_id not in self.requests, f"request {request_id!r} is already scheduled"
        req = request_from_tokens(next(self._ids), token_ids, max_tokens, self.config.block_size)
        now = self.now()
        d = self.conductor.schedule(req, now)
        if not d.admitted and d.reason == "no KV room" and self.config.admission == "none":
            d = self._queue_for_room(req, now)
        if d.admitted and d.decode_id is None and self.conductor.on_prefill_done(req, d, now) is None:
            self.prefill[d.prefill_id].busy_until_s -= d.prefill_s  # undo the commit: nothing runs
            return Decision(False, "decode overloaded", ttft_s=d.ttft_s)
        if d.admitted:
            self.requests[request_id] = LiveRequest(req, d)
            self.queued[d.prefill_id][request_id] = d.prefill_s
        return d

    def _queue_for_room(self, req: Request, now: float) -> Decision:
        """Without admission control nothing is refused: when no decode instance has room for the
        whole request now, the one with the most room takes it and reserves its blocks once
        running requests free them (the decode instance queues it)."""
        d = self.conductor._choose_prefill(req, now)
        state = max(self.decode, key=lambda s: s.kv_capacity_tokens - s.reserved_tokens)
        d.decode_id = state.instance_id
        d.tbt_s = self.cost.decode_step_time(state.batch_size + 1, state.context_tokens + req.prompt_len)
        self.conductor._commit_prefill(d, now)
        self.conductor._reserve(state, req, join_s=now + d.ttft_s)
        return d

    def retry_after_s(self, d: Decision) -> int:
        """Whole seconds a rejected client should wait: until the prefill queue has drained enough
        for this request's predicted TTFT to fall under the SLO (the first whole second after), or
        a mean decode duration when the decode side refused; at least 1."""
        assert not d.admitted and not d.unreachable, "only a request that waiting can help is told to retry"
        over = d.ttft_s - self.config.ttft_slo_s * self.config.load_threshold  # the queue to drain, in seconds
        decode = self.conductor.avg_decode_s if d.reason in ("decode overloaded", "no KV room") else 0.0
        return max(1, math.floor(over) + 1, math.ceil(decode))

    def on_keys(self, instance_id: int, added: list[int], removed: list[int]) -> None:
        """A prefill instance's batched report of the block keys it gained and lost."""
        if instance_id in self.dead:
            return
        held = self.held[instance_id]
        removed = [k for k in removed if k in held]
        added = [k for k in added if k not in held]
        held.difference_update(removed)
        held.update(added)
        self.index.remove(instance_id, removed)
        self.index.add(instance_id, added)

    def on_tokens(self, request_id: str, n: int) -> None:
        """n new output tokens reached the client. The first one ends the prefill: the prefill
        queue shrinks and the request joins its decode batch; each token grows the context."""
        r = self.requests.get(request_id)
        if r is None or n == 0:
            return
        d, state = r.decision, self.decode[r.decision.decode_id]
        if not r.num_tokens:
            now = self.now()
            self._dequeue(request_id, d.prefill_id, now)
            self.conductor.on_decode_join(r.req.request_id, d.decode_id, now)
            state.batch_size += 1
            state.context_tokens += r.req.prompt_len
        r.num_tokens += n
        state.context_tokens += n

    def on_finish(self, request_id: str, aborted: bool = False) -> None:
        """Release the request's KV reservation; a finished (not aborted) one teaches the decode duration."""
        r = self.requests.pop(request_id, None)
        if r is None:
            return
        d = r.decision
        if r.num_tokens:
            state = self.decode[d.decode_id]
            state.batch_size -= 1
            state.context_tokens -= r.req.prompt_len + r.num_tokens
        else:
            self._dequeue(request_id, d.prefill_id, self.now())
        if aborted or not r.num_tokens:
            self._release(r)
        else:
            self.conductor.on_finish(r.req.request_id, d.decode_id, self.now())

    def on_prefill_death(self, instance_id: int) -> None:
        """Every block it held leaves the index; it is never chosen again (its queue is infinite)."""
        self.dead.add(instance_id)
        self.index.remove(instance_id, list(self.held[instance_id]))
        self.held[instance_id].clear()
        self.prefill[instance_id].busy_until_s = float("inf")

    def on_decode_death(self, instance_id: int) -> None:
        self.decode[instance_id].kv_capacity_tokens = 0  # never chosen again: it has no room

    def _dequeue(self, request_id: str, prefill_id: int, now: float) -> None:
        """The queue left on the instance is the predicted prefill time of what still waits there."""
        queue = self.queued[prefill_id]
        if queue.pop(request_id, None) is not None and prefill_id not in self.dead:
            self.prefill[prefill_id].busy_until_s = now + sum(queue.values())

    def _release(self, r: LiveRequest) -> None:
        d = r.decision
        if d.decode_id is None:
            return
        state = self.decode[d.decode_id]
        member = state.members.pop(r.req.request_id, None)
        if member is not None:
            state.reserved_tokens -= member.reserved_tokens
