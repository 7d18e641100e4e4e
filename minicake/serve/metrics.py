"""Server metrics in Prometheus form (names prefixed `minicake:`, as vLLM's are `vllm:`).

Latencies are measured where the client sees them (docs/design.md, Metrics): TTFT from arrival at the
frontend to the first token, inter-token gaps, end-to-end time, and TBT as in the Mooncake
paper (mean of the slowest 10% of a request's gaps), which decides whether a request was
effective under the SLOs. Per-instance numbers come from the latest `cluster.stats()`.
"""
import math
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


def paper_tbt(gaps: list[float]) -> float:
    """TBT of one request as the Mooncake paper defines it: the mean of the slowest 10% of its
    inter-token gaps (at least one gap). 0 for a request with fewer than two tokens."""
    if not gaps:
        return 0.0
    slowest = sorted(gaps, reverse=True)[:max(1, math.ceil(len(gaps) / 10))]
    return sum(slowest) / len(slowest)


class ServerMetrics:
    def __init__(self, ttft_slo: float | None = None, tbt_slo: float | None = None,
                 window: int = 1000):
        self.ttft_slo, self.tbt_slo = ttft_slo, tbt_slo
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("minicake:time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("minicake:inter_token_latency_seconds", "Gap between tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("minicake:e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("minicake:prompt_tokens", "Prompt tokens received",
                                     registry=r)
        self.generation_tokens = Counter("minicake:generation_tokens", "Tokens generated",
                                         registry=r)
        self.finished = Counter("minicake:request_success", "Requests finished, by reason",
                                ["finished_reason"], registry=r)
        self.rejected = Counter("minicake:requests_rejected", "Requests refused by admission "
                                "control (HTTP 429)", registry=r)
        self.effective = Counter("minicake:requests_effective", "Finished requests within the "
                                 "TTFT and TBT SLOs", registry=r)
        self.instance_stats: list[dict] = []
        r.register(_InstanceCollector(self))
        # recent samples for the dashboard's percentiles and tokens/s
        self.recent_ttft: deque[float] = deque(maxlen=window)
        self.recent_tbt: deque[float] = deque(maxlen=window)
        self.total_generated = 0
        self.total_finished = 0

    def set_instance_stats(self, stats: list[dict]) -> None:
        self.instance_stats = stats

    def observe_arrival(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def observe_tokens(self, times, num_tokens: int, now: float) -> None:
        """`times` is the request's frontend.RequestTimes; tokens that arrive together
        share the gap since the previous ones."""
        if num_tokens == 0:
            return
        if times.first_token is None:
            times.first_token = now
            self.ttft.observe(now - times.arrival)
            self.recent_ttft.append(now - times.arrival)
            gaps = [0.0] * (num_tokens - 1)
        else:
            gaps = [(now - times.last_token) / num_tokens] * num_tokens
        for gap in gaps:
            self.itl.observe(gap)
        times.gaps += gaps
        times.last_token = now
        times.num_tokens += num_tokens
        self.generation_tokens.inc(num_tokens)
        self.total_generated += num_tokens

    def observe_finish(self, times, finish_reason: str, now: float) -> None:
        self.finished.labels(finished_reason=finish_reason or "abort").inc()
        self.e2e.observe(now - times.arrival)
        self.total_finished += 1
        if finish_reason not in ("stop", "length") or times.first_token is None:
            return
        tbt = paper_tbt(times.gaps)
        self.recent_tbt.append(tbt)
        if (self.ttft_slo is None or times.first_token - times.arrival <= self.ttft_slo) and (
                self.tbt_slo is None or tbt <= self.tbt_slo):
            self.effective.inc()


class _InstanceCollector:
    """Exports the latest `cluster.stats()` snapshot: one label set per instance. A dead
    instance exports `instance_alive` 0 and nothing else: its other series end."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        labels = ["role", "rank"]
        gauges = {"num_requests_running": "Requests in the instance's running batch",
                  "num_requests_waiting": "Requests waiting in the instance's queue",
                  "kv_cache_usage_perc": "Fraction of KV blocks in use (1 = full)",
                  "instance_alive": "1 while the instance process is alive"}
        counters = {"prefix_cache_queries": "Prompt tokens looked up in the prefix cache",
                    "prefix_cache_hits": "Prompt tokens found in the prefix cache",
                    "num_preemptions": "Requests preempted (recomputed) for lack of blocks"}
        families = {name: GaugeMetricFamily(f"minicake:{name}", doc, labels=labels)
                    for name, doc in gauges.items()}
        families |= {name: CounterMetricFamily(f"minicake:{name}", doc, labels=labels)
                     for name, doc in counters.items()}
        for s in self.metrics.instance_stats:
            if not s["alive"]:
                families["instance_alive"].add_metric([s["role"], str(s["rank"])], 0)
                continue
            values = {"num_requests_running": s["num_running"],
                      "num_requests_waiting": s["num_waiting"], "kv_cache_usage_perc": s["kv_usage"],
                      "instance_alive": 1,
                      "prefix_cache_queries": s["prefix_queries_tokens"],
                      "prefix_cache_hits": s["prefix_hits_tokens"],
                      "num_preemptions": s["num_preemptions"]}
            for name, value in values.items():
                families[name].add_metric([s["role"], str(s["rank"])], value)
        yield from families.values()
