"""The Conductor: Mooncake's KVCache-centric global scheduler.

For every request it looks up where the request's prefix is cached (the block index),
predicts TTFT on each prefill instance (queue + fetch + prefill), picks a decode instance by
predicted TBT and free KV room, and admits or rejects under the TTFT and TBT SLOs; a request
that would break an SLO even alone on an idle cluster is rejected as unreachable. It sees
instances only through the plain state dataclasses below, which whoever runs the instances
(the simulator, or `LiveConductor` for a running cluster) keeps up to date. Each decision:
docs/design.md, Prefill choice, Decode choice and Admission control.
"""
import math
import random
from dataclasses import dataclass, field

from minicake.cache.block_keys import block_keys
from minicake.conductor.cost_model import CostModel

SCHEDULERS = ("random", "load", "cache-local", "kvcache")
ADMISSIONS = ("none", "baseline", "early", "predictive")


@dataclass
class Request:
    """What the Conductor knows of a request: its length, its token budget and its block keys."""
    request_id: int
    prompt_len: int
    max_new_tokens: int
    block_keys: list[int]  # chained keys of the prompt's blocks (minicake.cache.block_keys)


def request_from_tokens(request_id: int, token_ids: list[int], max_new_tokens: int, block_size: int) -> Request:
    """A live request: its keys are those the engine's prefix cache gives the same full blocks."""
    return Request(request_id, len(token_ids), max_new_tokens, block_keys(token_ids, block_size))


@dataclass
class PrefillState:
    """A prefill instance as the Conductor sees it; its load is the predicted queue."""
    instance_id: int
    busy_until_s: float = 0.0  # predicted time it finishes every prefill assigned to it


@dataclass
class DecodeMember:
    join_s: float   # when it joins (joined) the running batch: predicted until it happens
    prompt_len: int
    reserved_tokens: int


@dataclass
class DecodeState:
    """A decode instance as the Conductor sees it. The instance updates batch_size and
    context_tokens each step; the Conductor alone updates reservations and members."""
    instance_id: int
    kv_capacity_tokens: int
    batch_size: int = 0
    context_tokens: int = 0
    reserved_tokens: int = 0  # KV reserved for every request assigned here, running or not
    members: dict[int, DecodeMember] = field(default_factory=dict)  # request_id -> member


@dataclass
class Decision:
    """The Conductor's answer for one request. A prefill instance that is told to fetch pulls
    blocks [local_blocks, cached_blocks) from `fetch_from` and keeps them (hot-spot migration)."""
    admitted: bool
    reason: str = ""              # why it was rejected
    prefill_id: int = -1
    decode_id: int | None = None  # None while the decode side is still to be chosen (baseline)
    local_blocks: int = 0         # leading blocks the prefill instance holds itself
    cached_blocks: int = 0        # leading blocks not recomputed: local + fetched
    cached_tokens: int = 0
    fetch_from: int | None = None
    prefill_s: float = 0.0        # service time on the prefill instance: fetch + prefill
    ttft_s: float = 0.0           # predicted
    tbt_s: float = 0.0            # predicted; 0 while the decode side is still to be chosen
    ttft_alone_s: float = 0.0     # predicted with every prefill queue empty (on the live instance that is fastest)

    @property
    def unreachable(self) -> bool:
        """Rejected because even alone on an idle cluster it would break an SLO: waiting cannot help."""
        return self.reason.endswith("SLO unreachable")


@dataclass
class ConductorConfig:
    scheduler: str = "kvcache"
    admission: str = "none"
    ttft_slo_s: float = 30.0
    tbt_slo_s: float = 0.1
    block_size: int = 512             # tokens per block key
    can_fetch: bool = True            # global pool: an instance may pull blocks another holds
    kvcache_balancing_threshold: float = 1.5  # fetch when best_len / len_i exceeds this
    load_threshold: float = 1.0       # admit while load = predicted / SLO stays under this
    seed: int = 0

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"unknown admission {self.admission!r}: choose one of {', '.join(ADMISSIONS)}")
        if self.ttft_slo_s <= 0 or self.tbt_slo_s <= 0:
            raise ValueError(f"SLOs must be > 0, got TTFT {self.ttft_slo_s} s and TBT {self.tbt_slo_s} s")


class BlockIndex:
    """Block key -> ids of the instances that hold it (docs/design.md, KV pool); instances report changes."""

    def __init__(self):
        self.holders: dict[int, set[int]] = {}

    def add(self, instance_id: int, keys: list[int]) -> None:
        for k in keys:
            self.holders.setdefault(k, set()).add(instance_id)

    def remove(self, instance_id: int, keys: list[int]) -> None:
        for k in keys:
            h = self.holders[k]
            h.discard(instance_id)
            if not h:
                del self.holders[k]

    def match_lens(self, keys: list[int], num_instances: int) -> list[int]:
        """Leading blocks of `keys` each instance holds: one walk over the keys for all of them."""
        lens = [0] * num_instances
        alive = set(range(num_instances))
        n = 0
        for k in keys:
            h = self.holders.get(k)
            if h is None:
                break
            if not alive <= h:
                for i in alive - h:
                    lens[i] = n
                alive &= h
                if not alive:
                    break
            n += 1
        for i in alive:
            lens[i] = n
        return lens


class Conductor:
    def __init__(self, config: ConductorConfig, cost: CostModel, prefill: list[PrefillState],
                 decode: list[DecodeState], index: BlockIndex):
        assert prefill and decode, "the Conductor needs at least one prefill and one decode instance"
        self.config, self.cost, self.prefill, self.decode, self.index = config, cost, prefill, decode, index
        self.rng = random.Random(config.seed)
        self.avg_decode_s = 0.0  # mean decode duration of finished requests: the predictor of 4.7
        self.num_finished = 0

    def schedule(self, req: Request, now: float) -> Decision:
        """Choose the prefill instance (4.3) and, except under baseline admission, the decode
        instance (4.4); admit or reject (4.7). An admitted request is committed: the prefill
        queue grows and KV room is reserved on the decode instance."""
        assert req.prompt_len > 0 and req.max_new_tokens > 0, f"request {req.request_id}: empty prompt or no tokens to generate"
        cfg = self.config
        d = self._choose_prefill(req, now)
        if cfg.admission != "none" and (refusal := self._unreachable(req, d)) is not None:
            return refusal
        prefill_load = d.ttft_s / cfg.ttft_slo_s
        if cfg.admission == "baseline":
            if prefill_load >= cfg.load_threshold:
                return Decision(False, "prefill overloaded", ttft_s=d.ttft_s)
            self._commit_prefill(d, now)
            return d
        at = now + d.ttft_s if cfg.admission == "predictive" else None
        d.decode_id, d.tbt_s = self._choose_decode(req, now, at)
        if d.decode_id is None:
            return Decision(False, "no KV room", ttft_s=d.ttft_s)
        if cfg.admission != "none" and max(prefill_load, d.tbt_s / cfg.tbt_slo_s) >= cfg.load_threshold:
            side = "prefill" if prefill_load >= d.tbt_s / cfg.tbt_slo_s else "decode"
            return Decision(False, f"{side} overloaded", ttft_s=d.ttft_s, tbt_s=d.tbt_s)
        self._commit_prefill(d, now)
        self._reserve(self.decode[d.decode_id], req, join_s=now + d.ttft_s)
        return d

    def on_prefill_done(self, req: Request, decision: Decision, now: float) -> int | None:
        """The decode instance for a request whose prefill just ended, or None: rejected after
        prefill (baseline admission only), and that prefill was wasted."""
        if decision.decode_id is not None:
            return decision.decode_id
        decode_id, tbt = self._choose_decode(req, now, None)
        if decode_id is None or tbt / self.config.tbt_slo_s >= self.config.load_threshold:
            return None
        decision.decode_id, decision.tbt_s = decode_id, tbt
        self._reserve(self.decode[decode_id], req, join_s=now)
        return decode_id

    def on_decode_join(self, request_id: int, decode_id: int, now: float) -> None:
        self.decode[decode_id].members[request_id].join_s = now

    def on_finish(self, request_id: int, decode_id: int, now: float) -> None:
        """Release the request's KV reservation and learn its decode duration."""
        state = self.decode[decode_id]
        m = state.members.pop(request_id)
        state.reserved_tokens -= m.reserved_tokens
        assert state.reserved_tokens >= 0, f"decode {decode_id}: KV reservations went negative"
        self.num_finished += 1
        self.avg_decode_s += (now - m.join_s - self.avg_decode_s) / self.num_finished

    def _unreachable(self, req: Request, d: Decision) -> Decision | None:
        """The rejection of a request that breaks an SLO even alone (its TTFT with every queue
        empty, its TBT in a batch of its own; TBT where admission judges it at arrival), or None.
        Its predictions alone are the rejection's ttft_s and tbt_s."""
        cfg = self.config
        tbt = self.cost.decode_step_time(1, req.prompt_len)
        if d.ttft_alone_s / cfg.ttft_slo_s >= cfg.load_threshold:
            side = "TTFT"
        elif cfg.admission in ("early", "predictive") and tbt / cfg.tbt_slo_s >= cfg.load_threshold:
            side = "TBT"
        else:
            return None
        return Decision(False, f"{side} SLO unreachable", ttft_s=d.ttft_alone_s, tbt_s=tbt)

    def _cached_tokens(self, req: Request, blocks: int) -> int:
        return min(blocks * self.config.block_size, req.prompt_len - 1)  # the last token is always computed

    def _plan(self, req: Request, i: int, local: int, best: int, best_inst: int, now: float) -> Decision:
        """Algorithm 1 for instance i: fetch from best_inst if the ratio is worth it, else recompute."""
        cfg, cost = self.config, self.cost
        queue = max(0.0, self.prefill[i].busy_until_s - now)
        fetch = (cfg.scheduler == "kvcache" and cfg.can_fetch and best > local
                 and (local == 0 or best / local > cfg.kvcache_balancing_threshold))
        cached = best if fetch else local
        cached_tokens = self._cached_tokens(req, cached)
        service = cost.prefill_time(req.prompt_len, cached_tokens)
        if fetch:
            service += cost.transfer_time((best - local) * cfg.block_size)
        return Decision(True, prefill_id=i, local_blocks=local, cached_blocks=cached, cached_tokens=cached_tokens,
                        fetch_from=best_inst if fetch else None, prefill_s=service, ttft_s=queue + service)

    def _choose_prefill(self, req: Request, now: float) -> Decision:
        lens = self.index.match_lens(req.block_keys, len(self.prefill))
        best_inst = max(range(len(lens)), key=lens.__getitem__)
        plans = [self._plan(req, i, lens[i], lens[best_inst], best_inst, now) for i in range(len(lens))]
        if self.config.scheduler == "random":
            d = plans[self.rng.randrange(len(plans))]
        elif self.config.scheduler == "load":
            d = min(plans, key=lambda p: self.prefill[p.prefill_id].busy_until_s)
        else:
            d = min(plans, key=lambda p: p.ttft_s)
        # a dead instance's queue is infinite (live.py): it serves nobody alone either
        d.ttft_alone_s = min((p.prefill_s for p in plans if p.ttft_s < math.inf), default=math.inf)
        return d

    def _choose_decode(self, req: Request, now: float, at: float | None) -> tuple[int | None, float]:
        """Lowest predicted TBT among decode instances with KV room for the whole request;
        TBT as of now, or as of time `at` (prediction-based admission)."""
        need = req.prompt_len + req.max_new_tokens
        best, best_tbt = None, float("inf")
        for state in self.decode:
            if state.kv_capacity_tokens - state.reserved_tokens < need:
                continue
            if at is None:
                batch, context = state.batch_size + 1, state.context_tokens + req.prompt_len
            else:
                batch, context = self._predicted_batch(state, now, at)
                batch, context = batch + 1, context + req.prompt_len
            tbt = self.cost.decode_step_time(batch, context)
            if tbt < best_tbt:
                best, best_tbt = state.instance_id, tbt
        return best, best_tbt

    def _predicted_batch(self, state: DecodeState, now: float, at: float) -> tuple[int, int]:
        """(batch size, context tokens) of `state` at time `at` (docs/design.md, Admission control):
        the running requests and those whose prefill ends by `at`, less those predicted to end in
        (now, at] with the mean decode duration. A request already past the mean is known to be still
        running, so it stays: dropping it would undercount the long requests that fill a batch."""
        batch = context = 0
        for m in state.members.values():
            if m.join_s <= at and not now < m.join_s + self.avg_decode_s <= at:
                batch += 1
                context += m.prompt_len
        return batch, context

    def _commit_prefill(self, d: Decision, now: float) -> None:
        p = self.prefill[d.prefill_id]
        p.busy_until_s = max(p.busy_until_s, now) + d.prefill_s

    def _reserve(self, state: DecodeState, req: Request, join_s: float) -> None:
        need = req.prompt_len + req.max_new_tokens
        state.reserved_tokens += need
        state.members[req.request_id] = DecodeMember(join_s, req.prompt_len, need)
