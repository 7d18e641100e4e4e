"""The loop of one instance process: read the mailbox, do one unit of work, report (docs/design.md, Processes).

`serve_instance` is what every instance process (worker.py) runs: it builds the instance its role
names (colocated: a plain `Engine`; prefill stage; decode) and runs its loop until the parent
says `Shutdown`. The loop never blocks for long: it waits on its mailbox only when there is
nothing to compute, so aborts and shutdowns are seen within a step, and it tells the parent
`Alive` every ALIVE_PERIOD_S (the parent's heartbeat). An exception while handling one
request's message fails that request only; any other exception ends the instance (`Crashed`).
"""
import logging
import time
from dataclasses import dataclass

from minicake.config import EngineConfig
from minicake.engine import Engine, StepOutput
from minicake.disagg.calibration import startup_timings
from minicake.disagg.messages import (ALIVE_PERIOD_S, PARENT, Abort, Alive, Mailbox, NewRequest, Outputs, Ready,
                                     Shutdown, Stats, error_line)

STATS_PERIOD_S = 0.2  # a busy instance reports its stats at most this often
IDLE_WAIT_S = 0.05  # mailbox wait of an idle instance
POLL_WAIT_S = 0.001  # mailbox wait while only transfers are in flight

log = logging.getLogger("minicake.instance")


@dataclass
class InstanceSpec:
    role: str  # "colocated" | "prefill" | "decode"
    rank: int
    stage: int = 0  # prefill: this process's stage in its group
    group_ranks: tuple[int, ...] = ()  # prefill: the ranks of its group, stage order
    prefill_ranks: tuple[int, ...] = ()  # decode: every prefill rank (each may send K/V);
    # single-stage prefill: the other prefill instances it may pull prefix blocks from
    decode_ranks: tuple[int, ...] = ()  # prefill: every decode rank (each may wait for its K/V)

    @property
    def name(self) -> str:
        return f"{self.role} instance (rank {self.rank})"


class Instance:
    """The loop shared by all roles; a role fills in `handle`, `work` and `busy`."""

    def __init__(self, spec: InstanceSpec, engine: Engine, mailbox: Mailbox):
        self.spec, self.rank, self.engine, self.mailbox = spec, spec.rank, engine, mailbox
        self._last_stats, self._stats_time, self._alive_time = None, 0.0, 0.0

    def serve(self) -> None:
        while True:
            wait = 0 if self.busy() else (POLL_WAIT_S if self.waiting_for_peers() else IDLE_WAIT_S)
            for msg in self.mailbox.receive(wait):
                if isinstance(msg, Shutdown):
                    return
                try:
                    self.handle(msg)
                except Exception as e:
                    if not self.fail(msg, e):
                        raise
            self.work()
            self._report_stats()
            self.report_alive()

    def fail(self, msg, e: Exception) -> bool:
        """Handling `msg` raised `e`: fail the one request it is about and return True, or
        return False when it is about no single request (then the instance ends)."""
        return False

    def request_failed(self, request_id: str, e: Exception) -> str:
        """Log the traceback here; return the one-line error the request is aborted with."""
        log.error("rank %d: request %r failed", self.rank, request_id, exc_info=e)
        return error_line(f"{type(e).__name__}: {e}")

    def report_alive(self) -> None:
        if time.monotonic() - self._alive_time >= ALIVE_PERIOD_S:
            self.mailbox.send(PARENT, Alive(self.rank))
            self._alive_time = time.monotonic()

    def emit(self, outputs: list) -> None:
        if outputs:
            self.mailbox.send(PARENT, Outputs(self.rank, outputs))

    def stats(self) -> dict:
        return self.engine.stats()

    def _report_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_time < STATS_PERIOD_S and self.busy():
            return
        stats = self.stats()
        if stats != self._last_stats:
            self.mailbox.send(PARENT, Stats(self.rank, stats))
            self._last_stats, self._stats_time = stats, now

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def waiting_for_peers(self) -> bool:
        return False


class ColocatedInstance(Instance):
    """One ordinary engine that prefills and decodes: the baseline of disaggregation."""

    def handle(self, msg) -> None:
        if isinstance(msg, NewRequest):
            self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
        elif isinstance(msg, Abort):
            self.engine.abort_request(msg.request_id)
        else:
            raise AssertionError(f"a colocated instance got {type(msg).__name__}")

    def fail(self, msg, e: Exception) -> bool:
        if not isinstance(msg, NewRequest):  # the parent validated it already: report, never crash
            return False
        self.emit([StepOutput.aborted(msg.request_id, len(msg.prompt_token_ids), self.request_failed(msg.request_id, e))])
        return True

    def work(self) -> None:
        if self.engine.has_unfinished_requests():
            self.emit(self.engine.step())


def serve_instance(spec: InstanceSpec, config: EngineConfig, mailbox: Mailbox) -> None:
    """Build the instance `spec` names, tell the parent Ready, serve until Shutdown (the worker's main)."""
    engine = Engine(config)
    timings = startup_timings(spec.role, spec.stage, engine)  # checks the cost profile, before a role has the engine
    instance = build_instance(spec, engine, mailbox)
    mailbox.send(PARENT, Ready(spec.rank, engine.block_manager.num_blocks, engine.platform, *timings))
    instance.serve()


def build_instance(spec: InstanceSpec, engine: Engine, mailbox: Mailbox) -> Instance:
    if spec.role == "colocated":
        return ColocatedInstance(spec, engine, mailbox)
    from minicake.disagg.transfer import open_channels
    channels = open_channels(engine.kv_caches[0][0].device)  # collective: every rank of the job, once
    if spec.role == "prefill":
        from minicake.disagg.prefill_instance import PrefillInstance
        return PrefillInstance(spec, engine, mailbox, channels)
    from minicake.disagg.decode_instance import DecodeInstance
    return DecodeInstance(spec, engine, mailbox, channels)
