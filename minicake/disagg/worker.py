"""`python -m minicake.disagg.worker`: one instance process, a program of its own (launcher.py).

Its rank and group come from the env:// variables torchrun also sets (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), the cluster token from MINICAKE_CLUSTER_TOKEN, the parent's inbox from
--control. It binds its own inbox on --bind-addr, says `Hello`, and learns from the parent's
`Setup` what to run (InstanceSpec, EngineConfig) and where its peers listen; then it joins the
torch.distributed group (on CUDA on its own device first: NCCL binds the communicator to the
current device) and serves until `Shutdown`. Any exception is reported as `Crashed`.
"""
import argparse
import faulthandler
import logging
import os
import signal

import torch

from minicake.disagg.instance import serve_instance
from minicake.disagg.launcher import PARENT_PID, die_with_parent, init_rank
from minicake.disagg.messages import PARENT, Crashed, Hello, Mailbox, Setup, error_line

TOKEN_ENV = "MINICAKE_CLUSTER_TOKEN"
SETUP_TIMEOUT_S = 300.0  # the parent sends Setup once every rank said Hello (remote nodes may be slower)
log = logging.getLogger("minicake.worker")


def main() -> None:
    die_with_parent(int(os.environ[PARENT_PID]))
    p = argparse.ArgumentParser(prog="python -m minicake.disagg.worker", description=__doc__)
    p.add_argument("--control", required=True, help="the parent's inbox, tcp://host:port")
    p.add_argument("--bind-addr", default="127.0.0.1", help="the address this process's inbox listens on")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack
    rank = int(os.environ["RANK"])
    mailbox = Mailbox(os.environ[TOKEN_ENV], args.bind_addr)
    mailbox.connect({PARENT: args.control})
    mailbox.send(PARENT, Hello(rank, mailbox.address))
    code = 0
    try:
        setup = mailbox.wait_for(Setup, SETUP_TIMEOUT_S)
        if setup is None:
            raise TimeoutError(f"no Setup from the parent within {SETUP_TIMEOUT_S:.0f}s")
        assert setup.spec.rank == rank, f"launched as rank {rank} for the instance of rank {setup.spec.rank}"
        mailbox.connect(dict(enumerate(setup.addresses)))
        if setup.config.num_threads:  # before anything starts a thread pool
            torch.set_num_threads(setup.config.num_threads)
        cuda = torch.device(setup.config.device or "cpu").type == "cuda"
        if cuda:
            torch.cuda.set_device(setup.config.device)
        init_rank("nccl" if cuda else "gloo")
        serve_instance(setup.spec, setup.config, mailbox)
    except Exception as e:  # noqa: BLE001 - the parent turns this into aborted requests
        log.error("rank %d crashed", rank, exc_info=e)
        mailbox.send(PARENT, Crashed(rank, error_line(f"{type(e).__name__}: {e}")))
        code = 1
    mailbox.close()  # waits for the last messages to leave
    # Leave without tearing gloo down: the KV receive threads are still waiting on peers, and
    # destroying the process group under them aborts the process.
    os._exit(code)


if __name__ == "__main__":
    main()
