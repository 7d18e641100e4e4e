"""What the simulator measures, and the metrics computed from it (docs/design.md, Metrics).

TTFT: arrival to first token (the end of prefill). TBT: the mean of the slowest 10% of a
request's inter-token gaps (the paper's definition); TPOT: the plain mean gap. A request is
effective when it finished with TTFT and TBT within the SLOs. Hit rates are reported
block-weighted, token-weighted and as the per-request mean.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from minicake.conductor.conductor import ConductorConfig, Decision

PENDING, FINISHED, REJECTED, REJECTED_AFTER_PREFILL = 0, 1, 2, 3


@dataclass
class SimResult:
    ttft_slo_s: float
    tbt_slo_s: float
    arrival_s: np.ndarray
    prompt_len: np.ndarray
    num_blocks: np.ndarray
    status: np.ndarray
    first_token_s: np.ndarray
    cached_tokens: np.ndarray
    cached_blocks: np.ndarray
    decode_id: np.ndarray
    join_step: np.ndarray
    num_tokens: np.ndarray                 # tokens each request generates
    step_ends: list[list[float]]           # per decode instance: end time of every decode step
    prefill_busy_s: float = 0.0            # predicted service times of every prefill, summed
    decode_busy_s: float = 0.0             # predicted times of every decode step, summed
    wasted_prefill_s: float = 0.0
    fetched_blocks: int = 0
    end_s: float = 0.0
    rejections: list[tuple[float, int]] = field(default_factory=list)  # (time, status)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)   # the Conductor's reasons
    samples: list[tuple[float, list[float], list[float]]] = field(default_factory=list)  # (time, prefill loads, decode loads)

    @classmethod
    def empty(cls, trace, num_decode: int, cfg: ConductorConfig) -> "SimResult":
        n = len(trace)
        return cls(cfg.ttft_slo_s, cfg.tbt_slo_s,
                   arrival_s=np.array([e.arrival_s for e in trace]),
                   prompt_len=np.array([e.request.prompt_len for e in trace]),
                   num_blocks=np.array([len(e.request.block_keys) for e in trace]),
                   status=np.zeros(n, np.int8), first_token_s=np.full(n, np.nan),
                   cached_tokens=np.zeros(n, np.int64), cached_blocks=np.zeros(n, np.int64),
                   decode_id=np.full(n, -1), join_step=np.zeros(n, np.int64),
                   num_tokens=np.array([e.request.max_new_tokens for e in trace]),
                   step_ends=[[] for _ in range(num_decode)])

    def record_decision(self, rid: int, d: Decision) -> None:
        if d.admitted:
            self.cached_tokens[rid], self.cached_blocks[rid] = d.cached_tokens, d.cached_blocks
        else:
            self._count(d.reason)

    def reject(self, rid: int, now: float, status: int) -> None:
        self.status[rid] = status
        self.rejections.append((now, status))
        if status == REJECTED_AFTER_PREFILL:
            self._count("decode refused after prefill")

    def _count(self, reason: str) -> None:
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1

    def finish(self, rid: int, decode_id: int, join_step: int) -> None:
        self.status[rid], self.decode_id[rid], self.join_step[rid] = FINISHED, decode_id, join_step

    def tbt(self) -> tuple[np.ndarray, np.ndarray]:
        """(TBT, TPOT) of every finished request; 0 for a request with a single token."""
        n = len(self.status)
        tbt, tpot = np.full(n, np.nan), np.full(n, np.nan)
        ends = [np.array(e) for e in self.step_ends]
        for rid in np.flatnonzero(self.status == FINISHED):
            gaps_n = self.num_tokens[rid] - 1
            if gaps_n == 0:
                tbt[rid] = tpot[rid] = 0.0
                continue
            j, s = self.decode_id[rid], self.join_step[rid]
            times = ends[j][s:s + gaps_n]
            assert len(times) == gaps_n, f"request {rid}: {len(times)} decode steps recorded, expected {gaps_n}"
            gaps = np.diff(times, prepend=self.first_token_s[rid])
            slow = math.ceil(0.1 * gaps_n)
            tbt[rid] = np.partition(gaps, gaps_n - slow)[gaps_n - slow:].mean()
            tpot[rid] = gaps.mean()
        return tbt, tpot

    def summary(self) -> dict:
        done = self.status == FINISHED
        ttft = (self.first_token_s - self.arrival_s)[done]
        tbt, tpot = self.tbt()
        effective = done & (self.first_token_s - self.arrival_s <= self.ttft_slo_s) & (tbt <= self.tbt_slo_s)
        admitted = self.status != REJECTED
        pct = (lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan"))
        return {
            "requests": int(len(self.status)), "finished": int(done.sum()),
            "rejected": int((self.status == REJECTED).sum() + (self.status == REJECTED_AFTER_PREFILL).sum()),
            "rejected_after_prefill": int((self.status == REJECTED_AFTER_PREFILL).sum()),
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "avg_ttft_s": float(ttft.mean()) if len(ttft) else float("nan"),
            "p50_ttft_s": pct(ttft, 50), "p90_ttft_s": pct(ttft, 90), "p99_ttft_s": pct(ttft, 99),
            "avg_tbt_s": float(np.nanmean(tbt[done])) if done.any() else float("nan"),
            "p90_tbt_s": pct(tbt[done], 90), "avg_tpot_s": float(np.nanmean(tpot[done])) if done.any() else float("nan"),
            "effective_fraction": float(effective.mean()),
            "hit_rate_block": float(self.cached_blocks[admitted].sum() / max(1, self.num_blocks[admitted].sum())),
            "hit_rate_token": float(self.cached_tokens[admitted].sum() / max(1, self.prompt_len[admitted].sum())),
            "hit_rate_request_mean": float((self.cached_tokens / self.prompt_len)[admitted].mean()) if admitted.any() else 0.0,
            "prefill_busy_s": self.prefill_busy_s, "decode_busy_s": self.decode_busy_s, "wasted_prefill_s": self.wasted_prefill_s,
            "fetched_blocks": self.fetched_blocks, "makespan_s": self.end_s,
        }
