"""Process launch for instances: programs of their own, env:// rendezvous, shutdown, no orphans (docs/design.md, Processes).

Each instance is a program, `python -m minicake.disagg.worker`, started with subprocess and this
Python (`sys.executable`): nothing of the caller's `__main__` is imported again, so a script without
a main guard, `python - < script.py` or a notebook can start a cluster. A rank joins one
torch.distributed group through env:// (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE), the
variables torchrun sets, so ranks started on several hosts join the same way. A child dies with
its parent even when the parent is SIGKILLed: first thing, it asks the kernel for SIGKILL when the
parent goes (PR_SET_PDEATHSIG, `die_with_parent`), and a watchdog thread that compares the parent
pid covers the moment before prctl ran. PR_SET_PDEATHSIG fires when the *thread* that started the
child exits: launch from a thread that lives as long as the instances (the main thread, or the
event-loop thread).
"""
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
GROUP_TIMEOUT = timedelta(days=1)  # the default group only rendezvous and barriers at start-up; K/V waits are on transfer.py's channels
PARENT_PID = "MINICAKE_PARENT_PID"  # the environment variable that names the process a child dies with
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds this minicake


def free_port() -> int:
    """A TCP port of this host's loopback that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, ranks: list[int], world_size: int, master_addr: str, master_port: int,
           args: tuple[str, ...] = (), env: dict | None = None) -> list[subprocess.Popen]:
    """Start `python -m module *args` once per rank, with the env:// variables of a group of
    `world_size` ranks and `env` added. Returns the processes, in the order of `ranks`."""
    assert ranks, "launch at least one rank"
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, (env or {}).get("PYTHONPATH"), os.environ.get("PYTHONPATH")) if p)
    common = os.environ | (env or {}) | {
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "WORLD_SIZE": str(world_size),
        PARENT_PID: str(os.getpid()), "PYTHONPATH": path}  # the child imports this same minicake
    return [subprocess.Popen([sys.executable, "-m", module, *args], env=common | {"RANK": str(rank)})
            for rank in ranks]


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


def stop(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait up to `timeout` seconds for the processes to exit, then SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + timeout
    for p in procs:
        _wait(p, max(0.0, deadline - time.monotonic()))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            p.send_signal(sig)
        for p in alive:
            _wait(p, 2.0)
    assert all(p.poll() is not None for p in procs), "an instance process survived SIGKILL"


def _wait(p: subprocess.Popen, timeout: float) -> None:
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
