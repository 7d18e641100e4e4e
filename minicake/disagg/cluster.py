"""The parent side of a disaggregated deployment: start the instances, route, collect, stop.

`Cluster` starts one process per instance (docs/design.md, Processes): prefill groups of `pipeline_stages`
ranks each, then the decode instances, or one colocated engine. It validates a request,
asks the Conductor (minicake/conductor/live.py) for its prefill and decode instance, or refuses it
(`RequestRejected`), and gathers the `StepOutput`s the instances stream back, which with the
prefill instances' block-key reports keep the Conductor's view current. A background thread reads the instances' outbox and
watches the processes: when one dies, or sends nothing for `heartbeat_timeout` seconds (hung: it
is killed), every request it touched finishes with "abort" and an error, and the survivors free
those requests' blocks. The cluster serves on while one whole prefill group and one decode
instance live (degraded); after that `add_request` raises `ClusterUnavailable`. On several hosts
(node.py) the other nodes' agents start their instances and report their exits, and a node whose
agent goes silent for `heartbeat_timeout` is gone with its instances.
"""
import itertools
from collections import Counter
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import replace



from minicake.config import EngineConfig
from minicake.engine import StepOutput, check_request
from minicake.model.config import ModelConfig
from minicake.model.loader import check_weight_files, resolve_model
from minicake.model.tokenizer import Tokenizer
from minicake.sampling import SamplingParams
from minicake.disagg.instance import InstanceSpec
from minicake.conductor.conductor import ConductorConfig
from minicake.conductor.cost_model import CostModel, calibrate, default_profile
from minicake.conductor.live import LiveConductor, RequestRejected, SLOUnreachable
from minicake.disagg.messages import (Abort, Crashed, Exited, HeldBlocks, Mailbox, NewRequest, Outputs, Stats,
                                     error_line)
from minicake.disagg.node import Nodes, Processes, close_nodes, join_nodes, fit_to_host

START_TIMEOUT_S = 300.0  # every instance loads its model and reports Ready within this
# An instance reports from its loop between steps (and a prefill instance after every layer), so
# the default must outlast the longest step with no report: a 1024-token prefill chunk of the
# bundled model in a colocated or preempting decode engine took 3.1 s on one thread and 19 s on two
# oversubscribed ones (this 2-core CPU, shared); 60 s is three times that. Raise it for larger models on CPU.
HEARTBEAT_TIMEOUT_S = 60.0
log = logging.getLogger("minicake")
EMPTY_STATS = {"num_running": 0, "num_waiting": 0, "kv_usage": 0.0, "num_free_blocks": 0, "num_blocks": 0,
               "prefix_queries_tokens": 0, "prefix_hits_tokens": 0, "num_preemptions": 0}


class ClusterUnavailable(RuntimeError):
    """The cluster cannot take a request: too few live instances to serve one, or closed."""


class Cluster:
    def __init__(self, config: EngineConfig, prefill_instances: int = 1, decode_instances: int = 1,
                 pipeline_stages: int = 1, colocated: bool = False, conductor: ConductorConfig | None = None,
                 cost: CostModel | None = None, heartbeat_timeout: float = HEARTBEAT_TIMEOUT_S,
                 nodes: Nodes | None = None):
        """conductor: scheduler and admission policy (default: kvcache routing, no admission
        control); cost: the Conductor's cost profile (default: conductor/cost_model.py default_profile, the
        analytic profile of a known GPU or the bundled model's CPU fit; rescaled at start-up either way);
        heartbeat_timeout: seconds of silence after which an instance is declared hung and killed;
        nodes: the hosts (node.py; default: this one); the instance counts are this node's."""
        self.nodes = nodes or Nodes()
        least = 1 if self.nodes.nnodes == 1 else 0  # with several nodes, this one may run none of a role
        for name, value, low in (("prefill_instances", prefill_instances, least),
                                 ("decode_instances", decode_instances, least), ("pipeline_stages", pipeline_stages, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if colocated and self.nodes.nnodes > 1:
            raise ValueError("a colocated instance runs on one node: leave out --nnodes")
        if isinstance(heartbeat_timeout, bool) or not isinstance(heartbeat_timeout, (int, float)) or not (
                1.0 <= heartbeat_timeout < float("inf")):
            raise ValueError(f"heartbeat_timeout must be a number of seconds >= 1, got {heartbeat_timeout!r}")
        self.heartbeat_timeout = heartbeat_timeout
        self.config = config
        path = resolve_model(config.model)  # converts the bundled model once, here, not in every child
        self.model_config = ModelConfig.from_dir(path)
        self.tokenizer = Tokenizer.from_dir(path)
        check_weight_files(path)  # a bad weights file fails here, in one line, not in every instance
        self.max_model_len = config.max_model_len_for(self.model_config)
        if pipeline_stages > self.model_config.num_hidden_layers:
            raise ValueError(f"pipeline_stages={pipeline_stages} exceeds the model's "
                             f"{self.model_config.num_hidden_layers} layers")
        self.token = self.nodes.token or secrets.token_hex(16)  # one host: no one else needs it
        self._mailbox = Mailbox(self.token, *self.nodes.control())
        counts = self._join((1 if colocated else prefill_instances, decode_instances), colocated)
        self.specs = _layout(sum(p for p, _ in counts), sum(d for _, d in counts), pipeline_stages, colocated)
        self.node_of = _place(counts, pipeline_stages, colocated)  # rank -> node
        self.prefill_groups = [s.group_ranks for s in self.specs if s.role == "prefill" and s.stage == 0]
        self.decode_ranks = [s.rank for s in self.specs if s.role in ("decode", "colocated")]
        self.conductor_config = conductor or ConductorConfig(block_size=config.block_size)
        if self.conductor_config.block_size != config.block_size:
            raise ValueError(f"the Conductor's block_size ({self.conductor_config.block_size}) must equal the "
                             f"engine's ({config.block_size}): both name blocks by the same keys")
        self.cost = cost  # None: the default profile of this node's device (_start)
        self.conductor: LiveConductor | None = None  # built once the decode instances said how big they are
        self._prefill_index = {r: i for i, g in enumerate(self.prefill_groups) for r in g}  # rank -> instance
        self._transfer_ids = itertools.count(1)
        self._requests: dict[str, tuple[int, ...]] = {}  # request id -> ranks it touches
        self._lock = threading.Lock()
        self._outputs: queue.Queue = queue.Queue()
        self._stats = {s.rank: dict(EMPTY_STATS) for s in self.specs}
        self._num_blocks: dict[int, int] = {}
        self._dead: dict[int, str] = {}  # rank -> why
        self._closing = False  # set by close(): deaths from then on are expected
        self._stopped = threading.Event()  # the outbox thread ends
        self._processes = Processes(self.nodes, self._mailbox, self.specs, self.node_of, self._joins)
        try:
            self._start(config)
        except BaseException:
            self.close()
            raise

    # --- starting and stopping ---------------------------------------------------------

    def _join(self, here: tuple[int, int], colocated: bool) -> list[tuple[int, int]]:
        """(prefill, decode) instances of every node, this one first, once the others joined."""
        try:
            self._joins = join_nodes(self._mailbox, self.nodes)
            counts = [here] + [(j.num_prefill, j.num_decode) for j in self._joins]
            if not colocated and not (sum(p for p, _ in counts) and sum(d for _, d in counts)):
                raise ValueError(f"the nodes together run {counts} (prefill, decode) instances: "
                                 "a cluster needs at least one of each")
        except BaseException:
            close_nodes(self._mailbox, self.nodes)
            raise
        return counts

    @property
    def procs(self) -> list:
        """This node's instance processes, by rank."""
        return list(self._processes.local.values())

    def _start(self, config: EngineConfig) -> None:
        local = self._processes.ranks_on(0)
        per_node = Counter(self.node_of.values())
        cpus = [os.cpu_count() or 1] + [j.num_cpus for j in self._joins]
        # a prefill instance never runs a decode step: it captures no decode graphs
        self.configs = [replace(config, num_threads=config.num_threads or max(1, cpus[k] // per_node[k]),
                                enforce_eager=config.enforce_eager or s.role == "prefill",
                                kv_pool_blocks=config.kv_pool_blocks if _has_pool(s) else 0)
                        for s, k in ((s, self.node_of[s.rank]) for s in self.specs)]
        placed = fit_to_host([self.configs[r] for r in local], self.model_config, self.max_model_len) if local else []
        for rank, c in zip(local, placed):  # the other nodes place theirs (Launched)
            self.configs[rank] = c
        self.cost = self.cost or default_profile(placed[0].device if placed else "cpu", self.model_config)
        self._processes.start(self.configs, self.token)
        prefill_timings, decode_timings = [], []
        for msg in self._processes.wait_ready(self.configs, START_TIMEOUT_S, self.heartbeat_timeout):
            self._num_blocks[msg.rank] = msg.num_blocks
            log.info("rank %d ready: %d KV blocks, kernels: %s", msg.rank, msg.num_blocks, msg.platform)
            prefill_timings += msg.prefill_timings
            decode_timings += msg.decode_timings
        if self.prefill_groups:
            self.cost, report = calibrate(self.cost, prefill_timings, decode_timings)
            log.info("cost profile %s against this machine's start-up timings: %s; the Conductor "
                     "predicts with the profile so rescaled", self.cost.name, report)
            capacity = [self._num_blocks[r] * config.block_size for r in self.decode_ranks]
            self.conductor = LiveConductor(self.conductor_config, self.cost, len(self.prefill_groups), capacity)
        self._pump_thread = threading.Thread(target=self._pump, name="cluster-outbox", daemon=True)
        self._pump_thread.start()

    def close(self) -> None:
        """End every instance process; returns within a bounded time whatever their state."""
        if self._closing:
            return
        self._closing = True
        self._processes.stop()
        self._stopped.set()
        if hasattr(self, "_pump_thread"):
            self._pump_thread.join(timeout=1.0)
        close_nodes(self._mailbox, self.nodes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- requests --------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Validate (ValueError, nothing changed), ask the Conductor where the request runs
        (RequestRejected when admission control refuses it) and send it to its decode instance."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise ClusterUnavailable(reason)
        self._validate(request_id, prompt_token_ids, params)
        with self._lock:
            group, decode_rank, fetch_from, fetch_blocks = self._route(request_id, prompt_token_ids, params)
            ranks = (*group, decode_rank)
            dead = [r for r in ranks if r in self._dead]
            if dead:
                self._finish_in_conductor(request_id, aborted=True)
                self._outputs.put(StepOutput.aborted(request_id, len(prompt_token_ids), self._dead[dead[0]]))
                return
            self._requests[request_id] = ranks
        msg = NewRequest(request_id, list(prompt_token_ids), params, next(self._transfer_ids), group,
                         fetch_from, fetch_blocks)
        self._mailbox.send(decode_rank, msg)

    def _route(self, request_id: str, prompt: list[int], params: SamplingParams):
        """(prefill group, decode rank, rank to fetch the prefix from or None, blocks to fetch)."""
        if self.conductor is None:  # colocated: one instance does everything
            return (), self.decode_ranks[0], None, 0
        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt))
        d = self.conductor.schedule(request_id, prompt, max_tokens)
        if not d.admitted:
            cfg = self.conductor_config
            if d.unreachable:
                raise SLOUnreachable(f"request {request_id!r} refused by admission control ({cfg.admission}): "
                                     f"{d.reason}, even alone on an idle cluster (predicted alone: TTFT "
                                     f"{d.ttft_s:.2f}s, SLO {cfg.ttft_slo_s:g}s; TBT {d.tbt_s:.3f}s, SLO "
                                     f"{cfg.tbt_slo_s:g}s): retrying cannot help")
            raise RequestRejected(f"request {request_id!r} rejected by admission control ({cfg.admission}): "
                                  f"{d.reason} (predicted TTFT {d.ttft_s:.2f}s, SLO {cfg.ttft_slo_s:g}s; predicted "
                                  f"TBT {d.tbt_s:.3f}s, SLO {cfg.tbt_slo_s:g}s)", self.conductor.retry_after_s(d))
        fetch_from = None if d.fetch_from is None else self.prefill_groups[d.fetch_from][0]
        return self.prefill_groups[d.prefill_id], self.decode_ranks[d.decode_id], fetch_from, d.cached_blocks

    def _finish_in_conductor(self, request_id: str, aborted: bool) -> None:
        if self.conductor is not None:
            self.conductor.on_finish(request_id, aborted)

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(params, SamplingParams):
            replace(params)  # its checks again, for fields set after it was built: each instance rebuilds it so
        check_request(request_id, prompt, params, self.model_config.vocab_size, self.max_model_len,
                      self.config.block_size, min(self._num_blocks.values()))

    def abort_request(self, request_id: str, error: str | None = None) -> None:
        """Free the request's blocks on every instance; get_outputs reports it finished with
        "abort" (and `error`, the reason, when the server rather than its client ends it)."""
        with self._lock:
            ranks = self._requests.pop(request_id, None)
            if ranks is not None:
                self._finish_in_conductor(request_id, aborted=True)
        if ranks is None:
            return
        for rank in ranks:
            if rank not in self._dead:
                self._mailbox.send(rank, Abort(request_id))
        self._outputs.put(StepOutput.aborted(request_id, 0, error))

    def get_outputs(self, timeout: float) -> list[StepOutput]:
        """Every output that arrived, waiting up to `timeout` seconds for the first one."""
        try:
            outputs = [self._outputs.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self._outputs.empty():
            outputs.append(self._outputs.get_nowait())
        return outputs

    def stats(self) -> list[dict]:
        """One dict per instance: role, rank, alive, and its engine's latest stats."""
        return [{"role": s.role, "rank": s.rank, "alive": s.rank not in self._dead, **self._stats[s.rank]}
                for s in self.specs]

    def is_healthy(self) -> bool:
        return not self._dead and not self._closing

    def unavailable_reason(self) -> str | None:
        """None while the cluster can serve a request: one whole prefill group and one decode
        instance (or the colocated one) alive; else why not, naming the dead instances."""
        if self._closing:
            return "the cluster is closed"
        groups_left = not self.prefill_groups or any(not set(g) & set(self._dead) for g in self.prefill_groups)
        if groups_left and any(r not in self._dead for r in self.decode_ranks):
            return None
        return "no instance left to serve requests: " + "; ".join(self._dead[r] for r in sorted(self._dead))

    def health(self) -> dict:
        """status "ok", "degraded" (dead instances, but it still serves) or "unavailable";
        dead_instances: role, rank and reason of each."""
        status = "unavailable" if self.unavailable_reason() else "degraded" if self._dead else "ok"
        dead = [{"role": s.role, "rank": s.rank, "reason": self._dead[s.rank]}
                for s in self.specs if s.rank in self._dead]
        return {"status": status, "dead_instances": dead}

    # --- the outbox thread -----------------------------------------------------------

    def _pump(self) -> None:
        heard = {a: time.monotonic() for a in self._processes.addresses()}  # when each last sent anything
        while not self._stopped.is_set():
            for msg in self._mailbox.receive(timeout=0.1):
                if msg.rank in self._dead:
                    continue  # declared dead: its requests are aborted already, its stats cleared
                heard[msg.rank] = time.monotonic()
                if isinstance(msg, Outputs):
                    self._deliver(msg.outputs)
                elif isinstance(msg, Stats):
                    self._stats[msg.rank] = msg.stats
                elif isinstance(msg, HeldBlocks):
                    with self._lock:
                        self.conductor.on_keys(self._prefill_index[msg.rank], msg.added, msg.removed)
                elif isinstance(msg, Crashed):
                    self._on_death(msg.rank, f"{self.specs[msg.rank].name} crashed: {error_line(msg.error)}")
                elif isinstance(msg, Exited):  # from a node agent
                    self._processes.exited[msg.rank] = msg.code
            self._processes.heartbeat()
            if not self._closing:
                for rank, reason in self._processes.deaths(heard, self.heartbeat_timeout, self._dead):
                    self._on_death(rank, reason)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        with self._lock:
            for out in outputs:
                ranks = self._requests.get(out.request_id)
                if ranks is None:
                    continue  # aborted, or already failed: reported once
                if out.error:
                    out.error = error_line(out.error)  # clients see it: one line, no server paths
                if out.new_token_ids and len(ranks) > 1:  # prefilled: it needs its decode instance only
                    self._requests[out.request_id] = ranks[-1:]
                if self.conductor is not None:
                    self.conductor.on_tokens(out.request_id, len(out.new_token_ids))
                if out.finished:
                    del self._requests[out.request_id]
                    self._finish_in_conductor(out.request_id, aborted=out.finish_reason == "abort")
                self._outputs.put(out)

    def _on_death(self, rank: int, reason: str) -> None:
        with self._lock:
            self._dead[rank] = reason
            self._stats[rank] = dict(EMPTY_STATS)  # a dead instance runs nothing and holds nothing
            hit = [(rid, ranks) for rid, ranks in self._requests.items() if rank in ranks]
            for rid, _ in hit:
                del self._requests[rid]
                self._finish_in_conductor(rid, aborted=True)
            if self.conductor is not None and rank in self._prefill_index:
                self.conductor.on_prefill_death(self._prefill_index[rank])  # its blocks leave the index
            elif self.conductor is not None and rank in self.decode_ranks:
                self.conductor.on_decode_death(self.decode_ranks.index(rank))
        for rid, ranks in hit:
            for r in ranks:
                if r not in self._dead:
                    self._mailbox.send(r, Abort(rid))
            self._outputs.put(StepOutput.aborted(rid, 0, reason))


def _has_pool(spec: InstanceSpec) -> bool:
    """The host KV pool serves prefill, and follows one block manager: not in pipelined groups."""
    return spec.role == "colocated" or (spec.role == "prefill" and len(spec.group_ranks) == 1)


def _place(counts: list[tuple[int, int]], stages: int, colocated: bool) -> dict[int, int]:
    """Rank -> node, for (prefill, decode) instances per node: in `_layout`'s rank order, node 0's
    prefill groups, then node 1's ..., then node 0's decode instances, node 1's ..."""
    if colocated:
        return {0: 0}
    prefill = [k for k, (p, _) in enumerate(counts) for _ in range(p * stages)]
    decode = [k for k, (_, d) in enumerate(counts) for _ in range(d)]
    return dict(enumerate(prefill + decode))


def _layout(num_prefill: int, num_decode: int, stages: int, colocated: bool) -> list[InstanceSpec]:
    """Ranks: prefill group g, stage s is rank g * stages + s; the decode instances follow."""
    if colocated:
        return [InstanceSpec("colocated", 0)]
    groups = [tuple(range(g * stages, (g + 1) * stages)) for g in range(num_prefill)]
    prefill_ranks = tuple(r for g in groups for r in g)
    peers = prefill_ranks if stages == 1 else ()  # single-stage instances pull blocks from each other
    decode_ranks = tuple(range(len(prefill_ranks), len(prefill_ranks) + num_decode))
    specs = [InstanceSpec("prefill", r, stage=s, group_ranks=g, prefill_ranks=tuple(p for p in peers if p != r),
                          decode_ranks=decode_ranks) for g in groups for s, r in enumerate(g)]
    specs += [InstanceSpec("decode", r, prefill_ranks=prefill_ranks) for r in decode_ranks]
    return specs


class ClusterEngine:
    """A `Cluster` behind the four `Engine` methods the offline `LLM` drives, so `LLM` runs
    the same loop over an in-process engine and over instance processes."""

    def __init__(self, cluster: Cluster):
        self.cluster, self.tokenizer = cluster, cluster.tokenizer
        self.unfinished: set[str] = set()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.cluster.add_request(request_id, prompt_token_ids, params)
        self.unfinished.add(request_id)

    def abort_request(self, request_id: str) -> None:
        self.cluster.abort_request(request_id)  # its "abort" output comes out of step()

    def has_unfinished_requests(self) -> bool:
        return bool(self.unfinished)

    def step(self) -> list[StepOutput]:
        outputs = self.cluster.get_outputs(timeout=1.0)
        self.unfinished -= {o.request_id for o in outputs if o.finished}
        return outputs
