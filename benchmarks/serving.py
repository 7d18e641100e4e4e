"""Colocated vs disaggregated serving, same requests, same run (docs/design.md, Processes and Metrics).

Starts `python -m minicake.serve` once per mode (one after the other, so they do not share
the CPU), replays the same requests against each with `minicake.bench`, and prints one table
with a column per mode and one JSON line.

    python benchmarks/serving.py --trace conversation \
        --num-requests 40 --scale 0.03 --rate 0.5 --ttft-slo 5 --tbt-slo 0.5
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from rich.console import Console

from minicake import bench

MODES = {"colocated": ["--colocated"], "1P+1D": ["--prefill", "1", "--decode", "1"]}
START_TIMEOUT_S = 600


def start_server(flags: list[str], port: int, log_path: str) -> subprocess.Popen:
    """The server's output goes to `log_path`; it is ready when it says where it listens."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "minicake.serve", "--port", str(port),
                                 *flags], stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if "minicake serves" in open(log_path).read():
            return proc
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"server did not start, see {log_path}:\n" + open(log_path).read()[-3000:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-args", default="", help="extra flags for both servers, one string")
    args, bench_argv = p.parse_known_args()
    bench_args = bench.parse_args(bench_argv)
    requests, what = bench.workload(bench_args)
    console = Console()
    console.print(f"workload: {what}")
    summaries = {}
    for mode, flags in MODES.items():
        port = free_port()
        console.print(f"starting {mode} server ...")
        log_path = os.path.join(tempfile.gettempdir(), f"minicake-serving-{mode}.log")
        proc = start_server(flags + args.server_args.split(), port, log_path)
        try:
            for r in requests[:2]:  # warm-up: first-call overheads stay out of the numbers
                asyncio.run(bench.run(f"http://127.0.0.1:{port}", bench_args.model,
                                      [bench.BenchRequest(r.prompt[:8], 2, 0.0)]))
            results, duration = asyncio.run(bench.run(f"http://127.0.0.1:{port}",
                                                      bench_args.model, requests))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        summaries[mode] = bench.summarize(results, duration, bench_args.ttft_slo,
                                          bench_args.tbt_slo)
    bench.print_report(summaries, console)
    print(json.dumps({"benchmark": "serving", "workload": what, **summaries}), flush=True)


if __name__ == "__main__":
    main()
