"""The async bridge between HTTP handlers and the `Cluster` (docs/design.md, The life of one request).

One background thread pulls `cluster.get_outputs` and hands each `StepOutput` to the asyncio
queue of the HTTP request it belongs to (`loop.call_soon_threadsafe`). A handler that stops
listening (client gone, stream cancelled) aborts its requests, which frees their blocks on
every instance. The thread also snapshots `cluster.stats()` for /metrics and the dashboard.
`drain` ends the server's requests before it stops: new ones are refused, running ones get a
grace period, then end with an error (their streams still get a final event and `[DONE]`).
"""
import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from minicake.sampling import SamplingParams
from minicake.disagg.cluster import ClusterUnavailable
from minicake.serve.metrics import ServerMetrics
from minicake.serve.protocol import APIError

log = logging.getLogger("minicake.serve")

STALL_TIMEOUT_S = 600.0  # no output at all for this long: the request is aborted with an error
STATS_PERIOD_S = 0.5
ABORTED_WAIT_S = 5.0  # drain: aborted requests' final outputs reach their handlers within this


@dataclass
class RequestTimes:
    """Client-side timeline of one request (one choice), in time.monotonic() seconds."""
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    gaps: list[float] = field(default_factory=list)  # inter-token gaps after the first token
    num_tokens: int = 0


class Frontend:
    def __init__(self, cluster, metrics: ServerMetrics):
        self.cluster = cluster
        self.metrics = metrics
        self.stats: list[dict] = []
        self._routes: dict[str, tuple[asyncio.Queue, int]] = {}  # request id -> (queue, choice)
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.refusal: str | None = None  # set by drain(): why new requests are refused

    def start(self) -> None:
        """Called on the event loop that serves requests (the app's startup)."""
        self._loop = asyncio.get_running_loop()
        self.stats = self.cluster.stats()
        self._thread = threading.Thread(target=self._pull_outputs, name="outputs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            assert not self._thread.is_alive(), "output thread did not stop within 5 s"

    def _pull_outputs(self) -> None:
        next_stats = 0.0
        while not self._stop.is_set():
            try:
                outputs = self.cluster.get_outputs(timeout=0.05)
                now = time.monotonic()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs, now)
                if now >= next_stats:
                    self.stats, next_stats = self.cluster.stats(), now + STATS_PERIOD_S
                    self.metrics.set_instance_stats(self.stats)
            except Exception:  # the cluster is broken: keep serving /health's 503
                log.exception("pulling outputs from the cluster failed")
                self._stop.wait(1.0)

    async def drain(self, reason: str, grace_s: float) -> None:
        """Refuse new requests with `reason` (ClusterUnavailable), let running ones finish for up
        to `grace_s` seconds, then abort the rest with `reason` as their error. Returns once every
        handler got its final output, or after ABORTED_WAIT_S more."""
        self.refusal = reason
        await self._until_no_request_runs(grace_s)
        for request_id in list(self._routes):
            self.cluster.abort_request(request_id, error=reason)
        await self._until_no_request_runs(ABORTED_WAIT_S)

    async def _until_no_request_runs(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while self._routes and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _dispatch(self, outputs: list, now: float) -> None:
        """Runs on the event loop. Outputs of requests nobody waits for (aborted) are dropped."""
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is not None:
                route[0].put_nowait((route[1], out, now))

    async def generate(self, prompts: list[list[int]], params: list[SamplingParams]
                       ) -> AsyncIterator[tuple[int, object]]:
        """Run one request per (prompt, params) pair, yielding (choice index, StepOutput) as
        tokens arrive, until all finished. Leaving early (exception, cancellation, close)
        aborts whatever is still running. Errors from `add_request` propagate unchanged
        (ValueError for bad input, RequestRejected from admission control, ClusterUnavailable,
        raised here too while draining)."""
        assert len(prompts) == len(params), "one SamplingParams per prompt"
        if self.refusal is not None:
            raise ClusterUnavailable(self.refusal)
        queue: asyncio.Queue = asyncio.Queue()
        base = f"req-{next(self._ids)}"
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        times = [RequestTimes(arrival=time.monotonic()) for _ in ids]
        running: set[int] = set()
        try:
            for i, (request_id, prompt, p) in enumerate(zip(ids, prompts, params)):
                self._routes[request_id] = (queue, i)
                self.cluster.add_request(request_id, prompt, p)
                self.metrics.observe_arrival(len(prompt))
                running.add(i)
            while running:
                try:
                    i, out, now = await asyncio.wait_for(queue.get(), STALL_TIMEOUT_S)
                except TimeoutError:
                    raise APIError(500, f"no output for {STALL_TIMEOUT_S:.0f} s: the request "
                                   "was aborted", type="server_error") from None
                self.metrics.observe_tokens(times[i], len(out.new_token_ids), now)
                if out.finished:
                    running.discard(i)
                    self.metrics.observe_finish(times[i], out.finish_reason, now)
                yield i, out
        finally:
            for i in running:
                self.cluster.abort_request(ids[i])
                self.metrics.observe_finish(times[i], "abort", time.monotonic())
            for request_id in ids:
                self._routes.pop(request_id, None)
