"""The control plane: small messages between the parent and the instance processes (docs/design.md, Processes).

They travel on one-way pipes, one per pair of processes (`Mailbox`, at the end of this file);
K/V and hidden states never do (they go through torch.distributed). One request, disaggregated:
parent --NewRequest--> decode reserves blocks --StartPrefill (blocks reserved)--> prefill stage 0,
whose layers and the next stages' send K/V to decode; the last stage samples the first token
--Prefilled--> decode, which streams every token to the parent as `Outputs`.
"""
import re
import threading
import time
from dataclasses import dataclass
from multiprocessing import connection

from minicake.sampling import SamplingParams


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
class Shutdown:  # parent -> every instance
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
class Alive:  # instance -> parent, every ALIVE_PERIOD_S from its loop: the parent's heartbeat
    rank: int


@dataclass
class Crashed:  # instance -> parent: an exception ended the instance loop
    rank: int
    error: str  # one line (error_line); the traceback went to the instance's log


ALIVE_PERIOD_S = 0.25
_PATH = re.compile(r"(?<![\w.~-])(?:/[\w.~+-]+){2,}(?::\d+)?")  # /a/b..., a source line's :123 too


def error_line(text: str) -> str:
    """An error as clients may see it: its first line, every absolute path replaced by <path>."""
    lines = str(text).strip().splitlines()
    return _PATH.sub("<path>", lines[0] if lines else "unknown error")


PARENT = -1  # the mailbox address of the parent process; instances are addressed by rank


class Mailbox:
    """One process's ends of the control pipes: a one-way pipe per (sender, receiver) pair.

    Not one shared queue: a queue's writers share a lock, and a process killed while it holds
    that lock (or mid-message) would silence every other writer. A pipe has one writer, so a
    dead process breaks only its own pipes, and its readers see EOF.
    """

    def __init__(self, incoming: dict, outgoing: dict):
        self.incoming, self.outgoing = dict(incoming), dict(outgoing)  # address -> Connection
        self._locks = {dst: threading.Lock() for dst in outgoing}  # the parent sends from two threads

    def send(self, dst: int, msg) -> None:
        """Deliver in order; a message to a dead process is dropped (its death is noticed elsewhere)."""
        with self._locks[dst]:
            try:
                self.outgoing[dst].send(msg)
            except OSError:  # BrokenPipeError: the reader is gone
                pass

    def receive(self, timeout: float) -> list:
        """Every message waiting now, after waiting up to `timeout` seconds for the first."""
        msgs = []
        if not self.incoming:  # every writer is gone
            time.sleep(timeout)
        for conn in connection.wait(list(self.incoming.values()), timeout):
            try:
                while conn.poll():
                    msgs.append(conn.recv())
            except (EOFError, OSError):  # the writer died: never read this pipe again
                self.incoming = {k: c for k, c in self.incoming.items() if c is not conn}
        return msgs

    def close(self) -> None:
        for conn in [*self.incoming.values(), *self.outgoing.values()]:
            conn.close()


def make_pipes(ctx, addresses: list[int]) -> dict[int, tuple[dict, dict]]:
    """A pipe for every ordered pair of addresses; returns each address's (incoming, outgoing)
    ends, from which the process that owns them builds its `Mailbox` (locks do not pickle)."""
    pipes = {(a, b): ctx.Pipe(duplex=False) for a in addresses for b in addresses if a != b}  # (reader, writer)
    return {x: ({a: pipes[a, x][0] for a in addresses if a != x}, {b: pipes[x, b][1] for b in addresses if b != x})
            for x in addresses}
