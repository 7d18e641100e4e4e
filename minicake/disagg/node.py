"""Where the instance processes run: node 0 starts and watches them all (`Processes`), on several
hosts through a small node agent on each other node (`run_node`).

Each node is one command with torchrun's flags (`--nnodes`, `--node-rank`, `--master-addr`,
`--master-port`) and its own `--prefill N --decode M`. A node agent joins node 0's control inbox at
master-addr:master-port+1 (`Join`: its instance counts, cores and inbox), gets its ranks, specs and
configs (`Assign`), sizes its instances' KV caches for its own memory (`Launched` returns them),
starts its instance processes (they say Hello to node 0 directly and join torch.distributed, whose
store listens on the node of rank 0 at master-port), reports their exits (`Exited`), and stops them
and exits when node 0 says `Shutdown` or stays silent for the heartbeat timeout. Every message is
signed with the shared cluster token (codec.py). On one host `Processes` launches every rank itself.
"""
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, replace

from minicake.cache.kv_cache import host_kv_budgets
from minicake.disagg.launcher import free_port, launch, stop
from minicake.disagg.messages import (ALIVE_PERIOD_S, PARENT, Alive, Assign, Crashed, Exited, Hello, Join, Kill,
                                     Launched, Mailbox, Ready, Setup, Shutdown)
from minicake.disagg.worker import TOKEN_ENV
from minicake.model.config import ModelConfig
from minicake.model.loader import resolve_model
from minicake.platforms.devices import assign_devices

JOIN_TIMEOUT_S = 120.0
NODE_QUIET_S = 1.0  # a node agent reports every ALIVE_PERIOD_S: quieter than this, its silent instances may be its own
log = logging.getLogger("minicake.node")


@dataclass
class Nodes:
    """Where a cluster's processes run: `nnodes` hosts, this one `node_rank`; one host by default."""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # node 0's address, as the others reach it
    master_port: int = 29500  # torch.distributed's store; node 0's control inbox listens at the next port
    bind_addr: str = "127.0.0.1"  # this node's address: its control-plane listeners bind here
    token: str | None = None  # shared by every node; None: one host, a fresh one
    join_timeout: float = JOIN_TIMEOUT_S  # node 0 waits this long for the others to join

    def __post_init__(self):
        if not (isinstance(self.nnodes, int) and self.nnodes >= 1 and 0 <= self.node_rank < self.nnodes):
            raise ValueError(f"node_rank must be in [0, nnodes), nnodes >= 1: got node_rank {self.node_rank!r}, "
                             f"nnodes {self.nnodes!r}")
        if self.nnodes > 1 and not self.token:
            raise ValueError("several nodes need a shared cluster token (--cluster-token or MINICAKE_CLUSTER_TOKEN)")
        if not 0 < self.join_timeout < float("inf"):
            raise ValueError(f"join_timeout must be a positive number of seconds, got {self.join_timeout!r}")

    def control(self) -> tuple[str, int]:
        """(host, port) of node 0's control inbox; port 0 (the OS picks) on a single host."""
        return (self.master_addr, self.master_port + 1) if self.nnodes > 1 else (self.bind_addr, 0)


def node_address(node: int) -> int:
    """The mailbox address of node `node`'s agent (node 0's is the parent's)."""
    return PARENT - node


def join_nodes(mailbox: Mailbox, nodes: Nodes) -> list[Join]:
    """Node 0: every other node's Join, by node rank; TimeoutError naming the nodes missing."""
    joined: dict[int, Join] = {}
    deadline = time.monotonic() + nodes.join_timeout
    while len(joined) < nodes.nnodes - 1:
        for msg in mailbox.receive(timeout=0.5):
            if isinstance(msg, Join) and 0 < msg.node < nodes.nnodes:
                joined[msg.node] = msg
                mailbox.connect({node_address(msg.node): msg.address})
                log.info("node %d joined from %s: %d prefill, %d decode", msg.node, msg.host, msg.num_prefill,
                         msg.num_decode)
        if time.monotonic() > deadline:
            missing = [k for k in range(1, nodes.nnodes) if k not in joined]
            raise TimeoutError(f"node(s) {', '.join(map(str, missing))} of --nnodes {nodes.nnodes} did not join "
                               f"within {nodes.join_timeout:g}s: run `python -m minicake.serve --nnodes "
                               f"{nodes.nnodes} --node-rank K --master-addr {nodes.master_addr} --master-port "
                               f"{nodes.master_port}` with the same token there")
    return [joined[k] for k in sorted(joined)]


def close_nodes(mailbox: Mailbox, nodes: Nodes) -> None:
    """Tell the node agents to stop their instances and exit, then close the mailbox."""
    for k in range(1, nodes.nnodes):
        mailbox.send(node_address(k), Shutdown())
    mailbox.close()


class Processes:
    """Node 0's side of every instance process, wherever it runs: it starts this node's (`launch`)
    and has the other nodes' agents start theirs (`Assign`), sends each its `Setup` once all said
    Hello, tells which died or went silent, and stops them."""

    def __init__(self, nodes: Nodes, mailbox: Mailbox, specs: list, node_of: dict[int, int], joins: list[Join]):
        self.nodes, self.mailbox, self.specs, self.node_of, self.joins = nodes, mailbox, specs, node_of, joins
        self.local: dict[int, subprocess.Popen] = {}  # this node's, by rank
        self.exited: dict[int, int] = {}  # rank on another node -> its exit code, as its agent reported
        self._alive_sent = 0.0

    def ranks_on(self, node: int) -> list[int]:
        return [r for r, k in self.node_of.items() if k == node]

    def start(self, configs: list, token: str) -> None:
        """Start this node's instances; the other nodes' agents start theirs on Assign."""
        hosts = [self.nodes.bind_addr] + [j.host for j in self.joins]
        master = (hosts[self.node_of[0]], self.nodes.master_port if self.nodes.nnodes > 1 else free_port())
        for j in self.joins:
            ranks = self.ranks_on(j.node)
            self.mailbox.send(node_address(j.node), Assign([self.specs[r] for r in ranks], [configs[r] for r in ranks],
                                                           len(self.specs), *master))
        local = self.ranks_on(0)
        if local:
            procs = launch("minicake.disagg.worker", local, len(self.specs), *master, env={TOKEN_ENV: token},
                           args=("--control", self.mailbox.address, "--bind-addr", self.nodes.bind_addr))
            self.local = dict(zip(local, procs))

    def wait_ready(self, configs: list, timeout: float, silence: float) -> list[Ready]:
        """Every instance's Ready, by rank. Each says Hello first, and gets its Setup once all have
        and the other nodes sized their configs (Launched). RuntimeError if one fails to start, or
        if a node that launched its instances sends nothing for `silence` seconds (it is gone)."""
        deadline = time.monotonic() + timeout
        ready, addresses, launched, setup_sent = {}, {}, {}, False  # launched: node -> last heard
        while len(ready) < len(self.specs):
            for msg in self.mailbox.receive(timeout=0.5):
                if isinstance(msg, Hello):
                    addresses[msg.rank] = msg.address
                elif isinstance(msg, Launched):
                    for rank, config in zip(self.ranks_on(msg.node), msg.configs):
                        configs[rank] = config
                    launched[msg.node] = time.monotonic()
                elif isinstance(msg, Alive) and msg.rank < PARENT:  # a node agent's (node_address), once launched
                    launched[PARENT - msg.rank] = time.monotonic()
                elif isinstance(msg, Exited):
                    self.exited[msg.rank] = msg.code
                elif isinstance(msg, Ready):
                    ready[msg.rank] = msg
                elif isinstance(msg, Crashed):
                    raise RuntimeError(f"instance rank {msg.rank} failed to start:\n{msg.error}")
            if not setup_sent and len(addresses) == len(self.specs) and len(launched) == len(self.joins):
                self.mailbox.connect(addresses)
                book = [addresses[s.rank] for s in self.specs]
                for spec in self.specs:
                    self.mailbox.send(spec.rank, Setup(spec, configs[spec.rank], book))
                setup_sent = True
            for spec in self.specs:
                if self.exit_code(spec.rank) is not None:
                    raise RuntimeError(f"{spec.name} exited with code {self.exit_code(spec.rank)} while starting")
            for node, heard in launched.items():
                if time.monotonic() - heard > silence:
                    raise RuntimeError(f"node {node} ({self.joins[node - 1].host}) went silent while its instances "
                                       f"started: its agent sent nothing for {silence:g}s")
            if time.monotonic() > deadline:
                raise TimeoutError(f"instances did not start within {timeout:.0f}s")
        return [ready[s.rank] for s in self.specs]

    def exit_code(self, rank: int) -> int | None:
        return self.local[rank].poll() if self.node_of[rank] == 0 else self.exited.get(rank)

    def addresses(self) -> list[int]:
        """The mailbox addresses whose silence `deaths` judges: every rank, every node agent."""
        return [s.rank for s in self.specs] + [node_address(k) for k in range(1, self.nodes.nnodes)]

    def deaths(self, heard: dict[int, float], timeout: float, dead) -> list[tuple[int, str]]:
        """(rank, why) of each instance not in `dead` that exited, is gone with its node (its agent
        silent for `timeout`), or was silent itself for `timeout` (then it is killed)."""
        found, now = [], time.monotonic()
        for spec in self.specs:
            rank, node = spec.rank, self.node_of[spec.rank]
            if rank in dead:
                continue
            code = self.exit_code(rank)
            node_silent = now - heard[node_address(node)] if node else 0.0
            if code is not None:
                found.append((rank, f"{spec.name} died with exit code {code}"))
            elif node_silent > timeout:
                found.append((rank, f"{spec.name} is gone with node {node} ({self.joins[node - 1].host}): "
                                    f"its agent sent nothing for {timeout:g}s"))
            elif now - heard[rank] > timeout and node_silent < NODE_QUIET_S:  # a quiet node: its own verdict comes
                self.kill(rank)
                found.append((rank, f"{spec.name} sent no heartbeat for {timeout:g}s: hung, killed"))
        return found

    def kill(self, rank: int) -> None:
        """SIGKILL, which works on a stopped process too: it cannot come back half-alive."""
        if self.node_of[rank] == 0:
            self.local[rank].kill()
        else:
            self.mailbox.send(node_address(self.node_of[rank]), Kill(rank))

    def heartbeat(self) -> None:
        """Tell the node agents, every ALIVE_PERIOD_S, that node 0 is alive (else they stop)."""
        if time.monotonic() - self._alive_sent >= ALIVE_PERIOD_S:
            for k in range(1, self.nodes.nnodes):
                self.mailbox.send(node_address(k), Alive(PARENT))
            self._alive_sent = time.monotonic()

    def stop(self) -> None:
        """Shutdown to every instance; this node's processes end within a bounded time."""
        for spec in self.specs:  # a send never blocks, not even to a frozen instance
            self.mailbox.send(spec.rank, Shutdown())
        stop(list(self.local.values()), timeout=10.0)


def fit_to_host(configs: list, model_config: ModelConfig, max_model_len: int) -> list:
    """The configs of this host's instance processes, in rank order, placed on this host: a GPU
    each (assign_devices: a one-line error where there are too few), and on a CPU their KV
    budgets, which share the host's memory (refused here, before any starts, if they do not fit;
    on CUDA each sizes its cache on its own GPU). An explicit budget or block count is kept."""
    devices = assign_devices(configs[0].device, len(configs))
    configs = [replace(c, device=d) for c, d in zip(configs, devices)]
    c = configs[0]
    if devices[0] != "cpu" or c.num_kv_blocks is not None or c.kv_cache_memory is not None:
        return configs
    budgets = host_kv_budgets(configs, model_config, max_model_len)
    return [replace(c, kv_cache_memory=b) for c, b in zip(configs, budgets)]


def run_node(nodes: Nodes, num_prefill: int, num_decode: int, heartbeat_timeout: float) -> int:
    """Node k > 0: join node 0, run the instances it assigns, until it says Shutdown (0) or is gone (1)."""
    me = node_address(nodes.node_rank)
    mailbox = Mailbox(nodes.token, nodes.bind_addr)
    control = "tcp://{}:{}".format(*nodes.control())
    mailbox.connect({PARENT: control})
    mailbox.send(PARENT, Join(nodes.node_rank, num_prefill, num_decode, mailbox.address, nodes.bind_addr,
                              os.cpu_count() or 1))
    log.info("node %d: joining node 0 at %s", nodes.node_rank, control)
    procs, code = {}, 1
    try:
        assign = mailbox.wait_for(Assign, nodes.join_timeout)
        if assign is None:
            log.error("node %d: node 0 at %s did not answer within %gs", nodes.node_rank, control, nodes.join_timeout)
            return 1
        path = resolve_model(assign.configs[0].model)
        model_config = ModelConfig.from_dir(path)
        configs = fit_to_host(assign.configs, model_config, assign.configs[0].max_model_len_for(model_config))
        mailbox.send(PARENT, Launched(nodes.node_rank, configs))
        ranks = [s.rank for s in assign.specs]
        procs = dict(zip(ranks, launch("minicake.disagg.worker", ranks, assign.world_size, assign.master_addr,
                                       assign.master_port, args=("--control", control, "--bind-addr", nodes.bind_addr),
                                       env={TOKEN_ENV: nodes.token})))
        log.info("node %d: started ranks %s", nodes.node_rank, ranks)
        code = _serve(mailbox, me, procs, heartbeat_timeout)
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C: stop the instances, then exit
        code = 0
    finally:
        stop(list(procs.values()), timeout=10.0)
        mailbox.close()
    return code


def _serve(mailbox: Mailbox, me: int, procs: dict, heartbeat_timeout: float) -> int:
    """Report exits and heartbeats until node 0 says Shutdown (0) or goes silent (1)."""
    heard, alive_sent, reported = time.monotonic(), 0.0, set()
    while True:
        for msg in mailbox.receive(timeout=0.1):
            heard = time.monotonic()
            if isinstance(msg, Shutdown):
                return 0
            if isinstance(msg, Kill) and msg.rank in procs:
                procs[msg.rank].kill()
        for rank, p in procs.items():
            if rank not in reported and p.poll() is not None:
                mailbox.send(PARENT, Exited(rank, p.returncode))
                reported.add(rank)
        if time.monotonic() - alive_sent >= ALIVE_PERIOD_S:
            mailbox.send(PARENT, Alive(me))
            alive_sent = time.monotonic()
        if time.monotonic() - heard > heartbeat_timeout:
            log.error("node 0 sent nothing for %gs: gone; stopping this node's instances", heartbeat_timeout)
            return 1


def main(nodes: Nodes, num_prefill: int, num_decode: int, heartbeat_timeout: float) -> None:
    """`python -m minicake.serve --node-rank K` (K > 0) lands here."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise SystemExit(run_node(nodes, num_prefill, num_decode, heartbeat_timeout))
