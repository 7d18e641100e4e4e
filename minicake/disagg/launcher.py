"""Process launch for instances: spawn, env:// rendezvous, shutdown, no orphans (docs/design.md, Processes).

Each instance is a process started with torch.multiprocessing's spawn and joined to one
torch.distributed group through env:// (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), the
variables torchrun sets, so the same `init_rank` serves ranks started on several hosts. A child
dies with its parent even when the parent is SIGKILLed: the kernel sends it SIGKILL
(PR_SET_PDEATHSIG), and a watchdog thread that compares the parent pid covers the moment before
prctl ran. PR_SET_PDEATHSIG fires when the *thread* that started the child exits: launch from a
thread that lives as long as the instances (the main thread, or the event-loop thread).
"""
import ctypes
import os
import signal
import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
GROUP_TIMEOUT = timedelta(days=1)  # gloo's default wait; a wait for a header may last as long as idle time, so real timeouts are per transfer (kv_transfer_timeout)


def free_port() -> int:
    """A TCP port that is free now (the OS picks it) for the rendezvous store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(target, args_per_rank: list[tuple], backend: str, num_threads: int,
           master_port: int | None = None) -> list[mp.Process]:
    """Start one process per rank running `target(rank, *args_per_rank[rank])` inside a
    torch.distributed group of world size len(args_per_rank). Returns the processes, started."""
    assert args_per_rank, "launch at least one rank"
    ctx = mp.get_context("spawn")
    port = master_port or free_port()
    procs = []
    for rank, args in enumerate(args_per_rank):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "WORLD_SIZE": str(len(args_per_rank))}
        p = ctx.Process(target=_run_rank, args=(env, os.getpid(), backend, num_threads, target, args),
                        name=f"minicake-rank{rank}", daemon=True)
        p.start()
        procs.append(p)
    return procs


def _run_rank(env: dict, parent_pid: int, backend: str, num_threads: int, target, args) -> None:
    die_with_parent(parent_pid)
    os.environ.update(env)
    torch.set_num_threads(num_threads)
    rank = init_rank(backend)
    try:
        target(rank, *args)
    finally:
        dist.destroy_process_group()  # also ends the receive threads still waiting on peers


def init_rank(backend: str) -> int:
    """Join the group from the env:// variables (the same call works under torchrun)."""
    dist.init_process_group(backend, init_method="env://", timeout=GROUP_TIMEOUT)
    return dist.get_rank()


def die_with_parent(parent_pid: int) -> None:
    """Make this process end when `parent_pid` ends, however it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before prctl ran
        os._exit(1)

    def watchdog():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()


def stop(procs: list[mp.Process], timeout: float) -> None:
    """Wait up to `timeout` seconds for the processes to exit, then SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for sig_fn in (lambda p: p.terminate(), lambda p: p.kill()):
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            sig_fn(p)
        for p in alive:
            p.join(2.0)
    assert not any(p.is_alive() for p in procs), "an instance process survived SIGKILL"
