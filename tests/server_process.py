"""`python -m minicake.serve` as a real process on a free port, for the server and bench tests.

The server is started exactly as a user starts it; it is ready when it prints where it
listens. Its output is kept so that a failing start shows why.
"""
import os
import signal
import subprocess
import sys
import threading

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from minicake.disagg.launcher import free_port

START_TIMEOUT_S = 300  # spawning instance processes on 2 busy cores takes a while


class ServerProcess:
    def __init__(self, *flags: str):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minicake.serve", "--port", str(port), "--device", "cpu", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S) or self.proc.poll() is not None:
            self.stop(signal.SIGKILL)
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("minicake serves"):
                self._ready.set()
        self._ready.set()  # the process ended: stop waiting

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def metrics(self) -> dict[tuple, float]:
        """Every sample of /metrics, keyed by (name, sorted label items)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}
