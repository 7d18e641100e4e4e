"""Trace-driven discrete-event simulation of a Mooncake cluster (docs/design.md, The simulator).

P prefill instances (a FIFO of whole-prompt prefills each, a host KV pool each) and D decode
instances (continuous batching: one event per decode step, never per token) serve a trace
through the real Conductor. Time comes from a cost model; nothing is computed. The pools
report what they add and evict to the Conductor's block index, as live instances would.
Three settings model minicake's own CPU cluster (benchmarks/kvcentric.py): `decode_entry` (its
decode loop's step granularity), `fetch_waits_for_holder` (so is the holder's, for a migration)
and `cpu_cores` (its instances share one machine's cores).
"""
import heapq
import math
import random
from collections import deque
from dataclasses import dataclass

from minicake.conductor.conductor import (BlockIndex, Conductor, ConductorConfig, Decision, DecodeState,
                                      PrefillState)
from minicake.conductor.cost_model import CostModel
from minicake.sim.pool_model import KVPoolModel
from minicake.sim.metrics import REJECTED, REJECTED_AFTER_PREFILL, SimResult
from minicake.sim.trace import TraceEntry

PREFILL_DONE, DECODE_STEP, SAMPLE = 0, 1, 2


@dataclass
class SimConfig:
    num_prefill: int = 8
    num_decode: int = 8
    pool: str = "global"                 # global: any instance may pull blocks another holds
    pool_tokens: int | None = 3_000_000  # host KV pool of each prefill instance; None: unlimited
    eviction: str = "lru"
    sample_points: int = 400             # load samples over the run, for the plot
    # minicake's live cluster: a request enters, and its first token leaves, through its decode
    # instance's loop, so both wait for the decode step in progress; the Conductor learns of the
    # first token then, and resets that prefill instance's queue to what still waits (LiveConductor)
    decode_entry: bool = False
    # minicake's live cluster: the holder of migrated blocks sends them between its own steps, so
    # a fetch waits for the holder's prefill in progress (one step while prompts fit the step budget)
    fetch_waits_for_holder: bool = False
    # the instances are processes sharing this many cores (None: each has its own device): while n
    # of them compute (a prefill, a decode step), each advances at min(1, cpu_cores / n) of its speed
    cpu_cores: int | None = None

    def __post_init__(self):
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError(f"need >= 1 prefill and decode instance, got {self.num_prefill}P + {self.num_decode}D")
        if self.pool not in ("local", "global"):
            raise ValueError(f"unknown pool {self.pool!r}: choose local or global")
        if self.eviction not in ("lru", "lfu"):
            raise ValueError(f"unknown eviction {self.eviction!r}: choose lru or lfu")
        if self.cpu_cores is not None and self.cpu_cores < 1:
            raise ValueError(f"cpu_cores must be >= 1 or None, got {self.cpu_cores}")


class SharedCores:
    """Processor sharing between the jobs running on one machine's cores (at most one job per
    instance, one thread each): while n jobs run, each advances at min(1, cores / n) of its
    speed alone, as the OS scheduler shares the cores fairly on average."""

    def __init__(self, cores: int):
        self.cores = cores
        self.left: dict[int, float] = {}  # job -> seconds of work left, timed alone
        self.last_s = 0.0

    def _slowdown(self) -> float:
        return max(1.0, len(self.left) / self.cores)

    def _advance(self, now: float) -> None:
        for job in self.left:
            self.left[job] -= (now - self.last_s) / self._slowdown()
        self.last_s = now

    def start(self, job: int, work_s: float, now: float) -> None:
        self._advance(now)
        self.left[job] = work_s

    def finish(self, job: int, now: float) -> None:
        self._advance(now)
        del self.left[job]

    def end_times(self, now: float) -> dict[int, float]:
        """When each running job ends if nothing starts or ends before."""
        return {job: now + max(0.0, left) * self._slowdown() for job, left in self.left.items()}


class Simulator:
    def __init__(self, config: SimConfig, conductor_config: ConductorConfig, cost: CostModel,
                 trace: list[TraceEntry]):
        assert conductor_config.can_fetch == (config.pool == "global"), "only a global pool lets instances fetch"
        arrivals = [e.arrival_s for e in trace]
        if not arrivals or not all(0 <= a < math.inf for a in arrivals) or arrivals != sorted(arrivals):
            # NaN or infinite arrivals would keep the event loop going forever
            raise ValueError("a simulated trace needs >= 1 request, arrivals finite, >= 0 and in order")
        self.config, self.cost, self.trace = config, cost, trace
        self.requests = [e.request for e in trace]
        self.pools = [KVPoolModel(config.pool_tokens, conductor_config.block_size, config.eviction)
                      for _ in range(config.num_prefill)]
        self.index = BlockIndex()
        self.prefill = [PrefillState(i) for i in range(config.num_prefill)]
        self.decode = [DecodeState(i, cost.kv_capacity_tokens) for i in range(config.num_decode)]
        self.conductor = Conductor(conductor_config, cost, self.prefill, self.decode, self.index)
        self.events: list[tuple[float, int, int, int]] = []  # (time, seq, kind, instance)
        self.seq = 0
        self.prefill_queue = [deque() for _ in self.prefill]  # request ids, FIFO
        self.prefill_running: list[int | None] = [None] * config.num_prefill
        self.prefill_computing = [False] * config.num_prefill  # not while its fetch waits for the holder
        self.fetch_waiters = [[] for _ in self.prefill]  # fetch_waits_for_holder: pullers, per holder
        self.decode_pending = [[] for _ in self.decode]  # joined after prefill, wait for a step boundary
        self.decode_running = [[] for _ in self.decode]  # heap of (last step index, request id)
        self.decode_stepping = [False] * config.num_decode
        self.dispatch_pending = [[] for _ in self.decode]  # decode_entry: seen after the step in progress
        self.awaiting_first = [{} for _ in self.prefill]  # decode_entry: request id -> predicted prefill s
        self.step_rng = random.Random(0)  # decode step times vary by cost.decode_step_cv, reproducibly
        self.cores = SharedCores(config.cpu_cores) if config.cpu_cores is not None else None
        self.job_event: dict[int, int] = {}  # cpu_cores: job -> seq of the event at which it now ends
        self.result = SimResult.empty(trace, config.num_decode, conductor_config)
        self.decisions: list[Decision | None] = [None] * len(trace)

    def run(self, on_progress=None) -> SimResult:
        """Replay the whole trace; `on_progress(n)` is called now and then with arrivals done."""
        arrivals = [e.arrival_s for e in self.trace]
        self.sample_every = max(arrivals[-1], 1.0) / self.config.sample_points
        self._push(0.0, SAMPLE, 0)
        nxt, now = 0, 0.0
        while nxt < len(arrivals) or len(self.events) > 1 or self.events[0][2] != SAMPLE:
            if nxt < len(arrivals) and (not self.events or arrivals[nxt] <= self.events[0][0]):
                now = arrivals[nxt]
                self._arrive(nxt, now)
                nxt += 1
                if on_progress is not None and (nxt % 256 == 0 or nxt == len(arrivals)):
                    on_progress(nxt)
                continue
            t, seq, kind, inst = heapq.heappop(self.events)
            if kind != SAMPLE and not self._job_ends(kind, inst, seq, t):
                continue  # cpu_cores: the job was rescheduled since this event was pushed
            now = t
            if kind == PREFILL_DONE:
                self._prefill_done(inst, now)
            elif kind == DECODE_STEP:
                self._decode_step_done(inst, now)
            else:
                self._sample(now)
        self.result.end_s = now
        return self.result

    def _push(self, t: float, kind: int, inst: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, inst))

    def _job(self, kind: int, inst: int) -> int:
        return inst if kind == PREFILL_DONE else self.config.num_prefill + inst

    def _start_job(self, kind: int, inst: int, work_s: float, now: float) -> None:
        """A prefill or a decode step of `work_s` seconds (alone) starts on instance `inst`."""
        if self.cores is None:
            self._push(now + work_s, kind, inst)
            return
        self.cores.start(self._job(kind, inst), work_s, now)
        self._reschedule(now)

    def _job_ends(self, kind: int, inst: int, seq: int, now: float) -> bool:
        if self.cores is None:
            return True
        job = self._job(kind, inst)
        if self.job_event.get(job) != seq:  # rescheduled since, or ended earlier than this event said
            return False
        del self.job_event[job]
        self.cores.finish(job, now)
        self._reschedule(now)
        return True

    def _reschedule(self, now: float) -> None:
        """Every running job's end moves when the number of running jobs changes."""
        for job, end in self.cores.end_times(now).items():
            kind, inst = (PREFILL_DONE, job) if job < self.config.num_prefill else \
                (DECODE_STEP, job - self.config.num_prefill)
            self._push(end, kind, inst)
            self.job_event[job] = self.seq

    def _arrive(self, rid: int, now: float) -> None:
        req = self.requests[rid]
        d = self.conductor.schedule(req, now)
        self.decisions[rid] = d
        self.result.record_decision(rid, d)
        if not d.admitted:
            self.result.reject(rid, now, REJECTED)
            return
        if self.config.decode_entry:
            self.awaiting_first[d.prefill_id][rid] = d.prefill_s
        self.pools[d.prefill_id].pin(req.block_keys[:d.local_blocks])
        if d.fetch_from is not None:
            self.pools[d.fetch_from].pin(req.block_keys[:d.cached_blocks])
        if self.config.decode_entry and d.decode_id is not None and self.decode_stepping[d.decode_id]:
            self.dispatch_pending[d.decode_id].append(rid)
        else:
            self._enqueue_prefill(rid, now)

    def _enqueue_prefill(self, rid: int, now: float) -> None:
        i = self.decisions[rid].prefill_id
        self.prefill_queue[i].append(rid)
        if self.prefill_running[i] is None:
            self._start_prefill(i, now)

    def _start_prefill(self, i: int, now: float) -> None:
        rid = self.prefill_queue[i].popleft()
        d, keys = self.decisions[rid], self.requests[rid].block_keys
        if d.fetch_from is not None:  # hot-spot migration: the puller keeps what it pulls
            src = d.fetch_from
            self._access(src, keys[:d.cached_blocks])
            self.pools[src].unpin(keys[:d.cached_blocks])
            self._access(i, keys[:d.cached_blocks])
            self.result.fetched_blocks += d.cached_blocks - d.local_blocks
        self.prefill_running[i] = rid
        self.result.prefill_busy_s += d.prefill_s
        if self.config.fetch_waits_for_holder and d.fetch_from is not None and self.prefill_computing[d.fetch_from]:
            self.fetch_waiters[d.fetch_from].append(i)
        else:
            self._compute_prefill(i, now)

    def _compute_prefill(self, i: int, now: float) -> None:
        self.prefill_computing[i] = True
        self._start_job(PREFILL_DONE, i, self.decisions[self.prefill_running[i]].prefill_s, now)

    def _access(self, i: int, keys: list[int]) -> None:
        added, evicted = self.pools[i].access(keys)
        self.index.add(i, added)
        self.index.remove(i, evicted)

    def _prefill_done(self, i: int, now: float) -> None:
        rid, self.prefill_running[i], self.prefill_computing[i] = self.prefill_running[i], None, False
        req, d = self.requests[rid], self.decisions[rid]
        self._access(i, req.block_keys)
        self.pools[i].unpin(req.block_keys[:d.local_blocks])
        for puller in self.fetch_waiters[i]:  # served between this step and the next
            self._compute_prefill(puller, now)
        self.fetch_waiters[i].clear()
        if self.prefill_queue[i]:
            self._start_prefill(i, now)
        if not self.config.decode_entry or req.max_new_tokens == 1:
            self._first_token(rid, now)  # else: when the decode instance joins it
        decode_id = self.conductor.on_prefill_done(req, d, now)
        if decode_id is None:  # baseline admission: the decode side refused, the prefill was wasted
            self.awaiting_first[i].pop(rid, None)
            self.result.reject(rid, now, REJECTED_AFTER_PREFILL)
            self.result.wasted_prefill_s += d.prefill_s
        elif req.max_new_tokens == 1:  # the prefill made the only token
            self.conductor.on_decode_join(rid, decode_id, now)
            self.conductor.on_finish(rid, decode_id, now)
            self.result.finish(rid, decode_id, join_step=0)
        else:
            self.decode_pending[decode_id].append(rid)
            if not self.decode_stepping[decode_id]:
                self._start_decode_step(decode_id, now)

    def _start_decode_step(self, j: int, now: float) -> None:
        state, running = self.decode[j], self.decode_running[j]
        step = len(self.result.step_ends[j])  # index of the step about to run
        for rid in self.decode_pending[j]:
            req = self.requests[rid]
            self.conductor.on_decode_join(rid, j, now)
            self.result.decode_id[rid], self.result.join_step[rid] = j, step
            if self.config.decode_entry:
                self._first_token(rid, now)
            # it makes max_new_tokens - 1 more tokens, one per step; the prompt + first token are in KV
            heapq.heappush(running, (step + req.max_new_tokens - 2, rid))
            state.batch_size += 1
            state.context_tokens += req.prompt_len + 1
        self.decode_pending[j].clear()
        self.decode_stepping[j] = True
        step_s = self.cost.decode_step_time(state.batch_size, state.context_tokens)
        if self.cost.decode_step_cv:  # a lognormal factor of mean 1 and that spread
            sigma = math.sqrt(math.log1p(self.cost.decode_step_cv ** 2))
            step_s *= self.step_rng.lognormvariate(-sigma * sigma / 2, sigma)
        self.result.decode_busy_s += step_s
        self._start_job(DECODE_STEP, j, step_s, now)

    def _first_token(self, rid: int, now: float) -> None:
        self.result.first_token_s[rid] = now
        if self.config.decode_entry:  # as LiveConductor: the queue left is what still waits
            i = self.decisions[rid].prefill_id
            waiting = self.awaiting_first[i]
            del waiting[rid]
            self.prefill[i].busy_until_s = now + sum(waiting.values())

    def _decode_step_done(self, j: int, now: float) -> None:
        state, running, ends = self.decode[j], self.decode_running[j], self.result.step_ends[j]
        step = len(ends)
        ends.append(now)
        for rid in self.dispatch_pending[j]:
            self._enqueue_prefill(rid, now)
        self.dispatch_pending[j].clear()
        state.context_tokens += state.batch_size
        while running and running[0][0] == step:
            rid = heapq.heappop(running)[1]
            req = self.requests[rid]
            state.batch_size -= 1
            state.context_tokens -= req.prompt_len + req.max_new_tokens
            self.conductor.on_finish(rid, j, now)
            self.result.finish(rid, j, self.result.join_step[rid])
        if state.batch_size or self.decode_pending[j]:
            self._start_decode_step(j, now)
        else:
            self.decode_stepping[j] = False

    def _sample(self, now: float) -> None:
        cfg = self.conductor.config
        prefill = [max(0.0, p.busy_until_s - now) / cfg.ttft_slo_s for p in self.prefill]
        decode = [self.cost.decode_step_time(s.batch_size, s.context_tokens) / cfg.tbt_slo_s if s.batch_size else 0.0
                  for s in self.decode]
        self.result.samples.append((now, prefill, decode))
        self._push(now + self.sample_every, SAMPLE, 0)
