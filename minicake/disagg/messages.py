"""The control plane: small messages between the parent and the instance processes (docs/design.md, Processes).

They travel over ZeroMQ as signed msgpack (`Mailbox`, at the end of this file; codec.py);
K/V and hidden states never do (they go through torch.distributed). A new instance process says
`Hello` to the parent and gets its `Setup`. One request, disaggregated:
parent --NewRequest--> decode reserves blocks --StartPrefill (blocks reserved)--> prefill stage 0,
whose layers and the next stages' send K/V to decode; the last stage samples the first token
--Prefilled--> decode, which streams every token to the parent as `Outputs`.
"""
import logging
import re
import threading
import time
from dataclasses import dataclass

import zmq

from minicake.disagg import codec
from minicake.sampling import SamplingParams


@dataclass
class Hello:  # instance process -> parent, first: where its inbox listens
    rank: int
    address: str


@dataclass
class Setup:  # parent -> instance process, once every rank said Hello: what to run, and where peers listen
    spec: object  # InstanceSpec (minicake/disagg/instance.py)
    config: object  # EngineConfig, sized for this process
    addresses: list[str]  # every rank's inbox, by rank


@dataclass
class NewRequest:  # parent -> decode (or colocated) instance
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    transfer_id: int  # names the request's KV transfer; unique in the cluster
    prefill_ranks: tuple[int, ...]  # the prefill group that computes it, stage order (colocated: none)
    fetch_from: int | None = None  # hot-spot migration: the prefill rank that holds its prefix
    fetch_blocks: int = 0  # ... and how many leading blocks of it (the Conductor's decision)


@dataclass
class StartPrefill:  # decode -> prefill stage 0, once the blocks are reserved: compute this prompt
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    transfer_id: int
    decode_rank: int
    first_block: int  # the decode instance holds blocks 0..first_block-1 already: not sent
    fetch_from: int | None = None  # pull blocks from this prefill rank first (minicake/disagg/migration.py)
    fetch_blocks: int = 0


@dataclass
class Prefilled:  # last prefill stage -> decode: every K/V send of the prompt has started
    transfer_id: int
    first_token: int
    num_cached_tokens: int  # prompt tokens the prefill instance found in its prefix cache
    sent_at: float  # time.time() when the last stage finished computing the prompt


@dataclass
class PrefillFailed:  # prefill -> decode: the request cannot be prefilled (a send failed, aborted)
    transfer_id: int
    error: str


@dataclass
class HeldBlocks:  # prefill stage 0 -> parent, on change: block keys gained and lost (device + pool)
    rank: int
    added: list[int]
    removed: list[int]


@dataclass
class Heartbeat:  # prefill stage 0 -> decode, about once a second while it computes the decode's requests
    rank: int  # silence, not slow compute, is what times a transfer out


@dataclass
class Abort:  # parent -> every instance: free the request's blocks, report nothing more
    request_id: str


@dataclass
class Shutdown:  # parent -> every instance and node agent
    pass


@dataclass
class Ready:  # instance -> parent, once its model and KV cache are allocated
    rank: int
    num_blocks: int
    platform: str  # the kernels it runs (minicake/platforms): "cpu", "triton" or "torch"
    # start-up timings (minicake/disagg/calibration.py) that check the cost profile:
    prefill_timings: list[tuple[int, int, float]]  # (prompt tokens, cached tokens, seconds)
    decode_timings: list[tuple[int, int, float]]  # (batch size, context tokens, seconds of a step)


@dataclass
class Outputs:  # instance -> parent: StepOutputs (an aborted request carries `error`)
    rank: int
    outputs: list


@dataclass
class Stats:  # instance -> parent, whenever it changed (at most a few times a second)
    rank: int
    stats: dict


@dataclass
class Alive:  # every ALIVE_PERIOD_S, the sender's heartbeat: instance -> parent, node agent <-> node 0
    rank: int


@dataclass
class Crashed:  # instance -> parent: an exception ended the instance loop
    rank: int
    error: str  # one line (error_line); the traceback went to the instance's log


@dataclass
class Join:  # node agent -> node 0 (several hosts, minicake/disagg/node.py): what this node runs
    node: int
    num_prefill: int
    num_decode: int
    address: str  # the agent's inbox
    host: str  # the node's address (--bind-addr)
    num_cpus: int


@dataclass
class Assign:  # node 0 -> node agent: run these ranks
    specs: list  # InstanceSpec of each
    configs: list  # EngineConfig of each, KV budget still to size for the node's memory
    world_size: int
    master_addr: str  # torch.distributed's store: on the node of rank 0
    master_port: int


@dataclass
class Launched:  # node agent -> node 0: the configs it sized, before starting their processes
    node: int
    configs: list


@dataclass
class Exited:  # node agent -> node 0: one of its instance processes ended
    rank: int
    code: int


@dataclass
class Kill:  # node 0 -> node agent: SIGKILL a hung instance
    rank: int


ALIVE_PERIOD_S = 0.25
MAX_FRAME_BYTES = 64 * 2**20  # far above any message (a prompt of 128k token ids is under 1 MB)
LINGER_MS = 2000  # a closing mailbox waits this long for its queued messages to leave
log = logging.getLogger("minicake.control")
_PATH = re.compile(r"(?<![\w.~-])(?:/[\w.~+-]+){2,}(?::\d+)?")  # /a/b..., a source line's :123 too


def error_line(text: str) -> str:
    """An error as clients may see it: its first line, every absolute path replaced by <path>."""
    lines = str(text).strip().splitlines()
    return _PATH.sub("<path>", lines[0] if lines else "unknown error")


PARENT = -1  # the mailbox address of the parent process; instances are addressed by rank


class Mailbox:
    """One process's end of the control plane: a ZeroMQ PULL socket that is its inbox, bound to
    this node's address on a port the OS picks, and a PUSH socket to each peer's inbox.

    Peers learn each other's inbox through the parent: an instance tells it `Hello` (its
    address), and the parent sends every instance the whole address book in `Setup`. Every
    message is two frames, an HMAC of the payload with the cluster's token, then the payload
    (codec.py); one that fails either check is dropped, logged once per sending host and reason,
    and a frame over MAX_FRAME_BYTES ends its sender's connection.
    A send never blocks: ZeroMQ queues for a peer that is slow or not connected yet. A dead peer
    gives no EOF, as a pipe did: the parent sees deaths by watching processes and heartbeats.
    """

    def __init__(self, token: str, host: str = "127.0.0.1", port: int = 0):
        self.token = token.encode()
        self.context = zmq.Context()
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # ZeroMQ drops a peer that sends more
        if port:
            self.inbox.bind(f"tcp://{host}:{port}")
        else:
            self.inbox.bind_to_random_port(f"tcp://{host}")
        self.address = self.inbox.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peers: dict[int, str] = {}  # address -> inbox endpoint
        self._outboxes: dict[int, zmq.Socket] = {}
        self._lock = threading.Lock()  # the parent sends from several threads; a ZeroMQ socket is not thread-safe
        self._logged: set[tuple[str, str]] = set()
        self._closed = False

    def connect(self, peers: dict[int, str]) -> None:
        """Learn where peers listen (address -> endpoint); sends to them may start at once."""
        self.peers.update(peers)

    def send(self, dst: int, msg) -> None:
        """Deliver in order; a message to a dead process is dropped (its death is noticed elsewhere)."""
        payload = codec.encode(msg)
        frames = [codec.sign(self.token, payload), payload]
        with self._lock:
            if self._closed or dst not in self.peers:  # closing, or a process that never said Hello
                return
            out = self._outboxes.get(dst)
            if out is None:
                out = self._outboxes[dst] = self.context.socket(zmq.PUSH)
                out.setsockopt(zmq.SNDHWM, 0)  # no limit: queue rather than block or drop
                out.setsockopt(zmq.LINGER, LINGER_MS)
                out.connect(self.peers[dst])
            out.send_multipart(frames)

    def receive(self, timeout: float) -> list:
        """Every message waiting now, after waiting up to `timeout` seconds for the first."""
        msgs = []
        if not self.inbox.poll(int(timeout * 1000)):
            return msgs
        while True:
            try:
                frames = self.inbox.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return msgs
            msg = self._check(frames)
            if msg is not None:
                msgs.append(msg)

    def wait_for(self, kind: type, timeout: float):
        """The first message of class `kind` within `timeout` seconds (others are dropped), or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.receive(timeout=0.5):
                if isinstance(msg, kind):
                    return msg
        return None

    def _check(self, frames):
        """The message the frames carry, or None (logged) when they are not from the cluster."""
        if len(frames) != 2:
            reason = "not the 2 frames of a message"
        elif not codec.verify(self.token, frames[1].bytes, frames[0].bytes):
            reason = "bad signature: not signed with this cluster's token"
        else:
            try:
                return codec.decode(frames[1].bytes)
            except codec.DecodeError as e:
                reason = str(e)
        sender = frames[0].get("Peer-Address")
        if (sender, reason) not in self._logged:  # once: a flood must not flood the log
            self._logged.add((sender, reason))
            log.warning("control plane: dropped a message from %s: %s", sender, reason)
        return None

    def close(self) -> None:
        """Close the sockets; queued messages get LINGER_MS to leave."""
        with self._lock:
            self._closed = True
            for sock in [self.inbox, *self._outboxes.values()]:
                sock.close()
            self.context.term()
