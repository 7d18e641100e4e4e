"""The server's live view: per-instance running/waiting requests, KV usage and prefix hit
rate, TTFT/TBT percentiles and tokens per second (docs/design.md, Metrics, as they happen).

In a terminal it is a rich Live table redrawn every half second; when stdout is not a TTY it
is one plain log line every ten seconds while there is traffic.
"""
import logging
import threading
import time

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from minicake.serve.metrics import ServerMetrics

log = logging.getLogger("minicake.serve")


def percentiles_ms(samples) -> str:
    if not samples:
        return "-"
    p50, p90, p99 = np.percentile(np.asarray(samples) * 1000, [50, 90, 99])
    return f"p50 {p50:.0f}  p90 {p90:.0f}  p99 {p99:.0f} ms"


class Dashboard:
    def __init__(self, metrics: ServerMetrics, console: Console | None = None):
        self.metrics = metrics
        self.console = console or Console()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard", daemon=True)
        self._last = (time.monotonic(), 0)  # (time, tokens generated) at the previous frame
        self.tokens_per_s = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "dashboard thread did not stop within 5 s"

    def _tick(self) -> None:
        now, generated = time.monotonic(), self.metrics.total_generated
        self.tokens_per_s = (generated - self._last[1]) / max(now - self._last[0], 1e-9)
        self._last = (now, generated)

    def _run(self) -> None:
        if not self.console.is_terminal:
            while not self._stop.wait(10.0):
                self._tick()
                if self.tokens_per_s > 0 or any(s["num_running"] + s["num_waiting"]
                                                for s in self.metrics.instance_stats):
                    log.info(self.line())
            return
        with Live(self.render(), console=self.console, refresh_per_second=2) as live:
            while not self._stop.wait(0.5):
                self._tick()
                live.update(self.render())

    def render(self) -> Group:
        table = Table(title="minicake instances", title_justify="left")
        for col in ("instance", "alive", "running", "waiting", "KV usage", "prefix hit (tokens)",
                    "preemptions"):
            table.add_column(col, justify="left" if col == "instance" else "right")
        for s in self.metrics.instance_stats:
            table.add_row(f"{s['role']} {s['rank']}", "yes" if s["alive"] else "[red]DEAD",
                          str(s["num_running"]), str(s["num_waiting"]), f"{s['kv_usage']:.0%}",
                          hit_rate(s), str(s["num_preemptions"]))
        m = self.metrics
        summary = Table.grid(padding=(0, 2))
        summary.add_row("TTFT", percentiles_ms(m.recent_ttft))
        summary.add_row("TBT (slowest 10% of gaps)", percentiles_ms(m.recent_tbt))
        summary.add_row("generation", f"{self.tokens_per_s:.1f} tokens/s, "
                        f"{m.total_finished} requests finished")
        return Group(table, summary)

    def line(self) -> str:
        per_instance = " | ".join(
            f"{s['role']}{s['rank']}{'' if s['alive'] else ' DEAD'}: run {s['num_running']} "
            f"wait {s['num_waiting']} kv {s['kv_usage']:.0%} hit {hit_rate(s)}"
            for s in self.metrics.instance_stats)
        return (f"{per_instance} || {self.tokens_per_s:.1f} tok/s, TTFT "
                f"{percentiles_ms(self.metrics.recent_ttft)}, TBT "
                f"{percentiles_ms(self.metrics.recent_tbt)}")


def hit_rate(stats: dict) -> str:
    """Token-weighted prefix hit rate: prompt tokens found in the cache / tokens looked up."""
    queries = stats["prefix_queries_tokens"]
    return f"{stats['prefix_hits_tokens'] / queries:.0%}" if queries else "-"
