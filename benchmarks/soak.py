"""Soak: minutes of mixed traffic against one `python -m minicake.serve`; nothing may fail that
should not, and no process may keep growing.

Starts the server (default: 1 prefill + 1 decode instance, the bundled model) on a free
loopback port and runs `--clients` concurrent clients for `--duration` seconds: completions and
chat, streaming and not, short and long prompts, n = 1 and 2, clients that hang up mid-stream
and bad requests that must get a 4xx. It samples the RSS of the server and of every process
under it every `--sample-every` seconds, stops the server, prints RSS after the warm-up vs at
the end and the requests by outcome, then one JSON line. Exit code 1 if anything unexpected.

    python benchmarks/soak.py                       # 5 minutes
    python benchmarks/soak.py --duration 30 --warmup 10
"""
import argparse
import asyncio
import itertools
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import httpx
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from minicake.disagg.launcher import free_port

START_TIMEOUT_S = 600  # the bundled model is converted on first use; instances start on busy cores
REQUEST_TIMEOUT_S = 180  # a request that takes longer is an unexpected error
STOP_TIMEOUT_S = 60  # the server drains, then stops its instances
DRAIN_TIMEOUT_S = 30  # after the traffic, every instance's queues must empty within this
MAX_REQUESTS_PER_CLIENT = 100_000
MB = 2 ** 20
WORDS = "the quick brown fox jumps over a lazy dog while two cats watch from the warm window".split()
KINDS = ("completion", "completion stream", "chat", "chat stream", "hang up mid-stream", "bad request")
OUTCOMES = ("ok", "hung up", "4xx as expected", "unexpected")
BAD_REQUESTS = [  # (path, JSON body or raw bytes): each must get a 4xx
    ("/v1/completions", {"model": "no-such-model", "prompt": "hi"}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}),
    ("/v1/completions", {"prompt": "hi", "logprobs": 3}),
    ("/v1/completions", {"prompt": [10 ** 9]}),
    ("/v1/completions", {"prompt": "word " * 20_000}),  # longer than max_model_len
    ("/v1/chat/completions", {"messages": "hi"}),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}'),
    ("/v1/completions", b'{"prompt": "hi", '),
    ("/v1/completions", b"[" * 100_000),
]


class Unexpected(Exception):
    """A response the server should not have given; the message says what came back."""


def start_server(flags: list[str], port: int, log_path: str) -> subprocess.Popen:
    """The server's output goes to `log_path`; it is ready when it says where it listens."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "minicake.serve", "--host", "127.0.0.1",
                                 "--port", str(port), *flags], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if "minicake serves" in open(log_path).read():
            return proc
        time.sleep(0.5)
    stop_server(proc)
    sys.exit(f"the server did not start, see {log_path}:\n" + open(log_path).read()[-3000:])


def stop_server(proc: subprocess.Popen) -> int | None:
    """SIGTERM (the server drains, then stops its instances), SIGKILL after STOP_TIMEOUT_S; any
    process left under it is killed too. The server's exit code, None where it was killed."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)
        code = None
    for p in psutil.wait_procs(family, timeout=10)[1]:
        p.kill()
    return code


def prompt(rng, words: int) -> str:
    return " ".join(rng.choice(WORDS, words))


def check_choices(resp: httpx.Response, n: int) -> None:
    if resp.status_code != 200:
        raise Unexpected(f"HTTP {resp.status_code}: {resp.text[:200]}")
    choices = resp.json().get("choices", [])
    if len(choices) != n or any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        raise Unexpected(f"{len(choices)} choices for n={n}: {resp.text[:200]}")


async def stream(client: httpx.AsyncClient, path: str, body: dict, hang_up_after: int | None = None) -> str:
    """A streamed request read to its [DONE], or left after `hang_up_after` chunks."""
    chunks = 0
    async with client.stream("POST", path, json=body | {"stream": True}) as resp:
        if resp.status_code != 200:
            raise Unexpected(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                if chunks == 0:
                    raise Unexpected(f"a stream of {path} ended with no choices")
                return "ok"
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise Unexpected(f"error event: {event['error'].get('message', '')[:200]}")
            chunks += bool(event.get("choices"))
            if hang_up_after is not None and chunks >= hang_up_after:
                return "hung up"  # leaving the block closes the connection mid-stream
    raise Unexpected(f"a stream of {path} ended without [DONE]")


async def one_request(client: httpx.AsyncClient, model: str, kind: str, rng, bad_requests) -> str:
    """Sends one request of `kind` (a bad one: the next of `bad_requests`); its outcome, or Unexpected."""
    n, words = int(rng.choice([1, 2])), int(rng.choice([8, 600]))  # short and long prompts
    sampling = {"model": model, "max_tokens": 16, "n": n, "temperature": 0.8, "seed": int(rng.integers(2 ** 31))}
    chat = {"messages": [{"role": "user", "content": prompt(rng, words)}]}
    if kind == "completion":
        check_choices(await client.post("/v1/completions", json=sampling | {"prompt": prompt(rng, words)}), n)
        return "ok"
    if kind == "chat":
        check_choices(await client.post("/v1/chat/completions", json=sampling | chat), n)
        return "ok"
    if kind == "completion stream":
        return await stream(client, "/v1/completions", sampling | {"prompt": prompt(rng, words),
                                                                   "stream_options": {"include_usage": True}})
    if kind == "chat stream":
        return await stream(client, "/v1/chat/completions", sampling | chat)
    if kind == "hang up mid-stream":
        return await stream(client, "/v1/completions", sampling | {"prompt": prompt(rng, words), "max_tokens": 64,
                                                                   "ignore_eos": True}, hang_up_after=2)
    path, body = next(bad_requests)
    resp = await (client.post(path, content=body, headers={"content-type": "application/json"})
                  if isinstance(body, bytes) else client.post(path, json={"model": model} | body))
    if not 400 <= resp.status_code < 500:
        raise Unexpected(f"a bad request to {path} got HTTP {resp.status_code}: {resp.text[:200]}")
    return "4xx as expected"


async def client_loop(client: httpx.AsyncClient, model: str, first: int, rng, bad_requests, deadline: float,
                      outcomes: Counter, errors: list[str]) -> None:
    """Sends one request of each kind in turn, starting at KINDS[first], until the deadline."""
    for i in range(first, first + MAX_REQUESTS_PER_CLIENT):
        if time.monotonic() >= deadline:
            return
        kind = KINDS[i % len(KINDS)]
        try:
            outcome = await asyncio.wait_for(one_request(client, model, kind, rng, bad_requests), REQUEST_TIMEOUT_S)
        except Exception as e:  # anything at all is the soak's finding, not its end
            outcome = "unexpected"
            errors.append(f"{kind}: {type(e).__name__}: {e}"[:300])
        outcomes[kind, outcome] += 1


def rss_by_process(server: psutil.Process) -> dict[str, int]:
    """RSS of the server and of every process under it, by a label with its pid."""
    rss = {}
    for p in [server] + server.children(recursive=True):
        try:
            cmdline = " ".join(p.cmdline())
            role = ("server" if p.pid == server.pid else "instance" if "minicake.disagg.worker" in cmdline
                    else p.name())
            rss[f"{role} {p.pid}"] = p.memory_info().rss
        except psutil.NoSuchProcess:
            continue  # it ended between the listing and the reading
    return rss


async def sample_rss(server: psutil.Process, every: float, deadline: float, samples: list) -> None:
    start = time.monotonic()
    for _ in range(int((deadline - start) / every) + 2):
        samples.append((time.monotonic() - start, rss_by_process(server)))
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))


async def queued_after_drain(client: httpx.AsyncClient) -> int:
    """Requests still running or waiting on any instance DRAIN_TIMEOUT_S after the traffic
    (hung-up clients included: their requests must be aborted, not run on)."""
    left, deadline = -1, time.monotonic() + DRAIN_TIMEOUT_S
    while left != 0 and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        text = (await client.get("/metrics")).text
        left = sum(int(s.value) for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name in ("minicake:num_requests_running", "minicake:num_requests_waiting"))
    return left


async def soak(base_url: str, server: psutil.Process, args) -> dict:
    outcomes, errors, samples = Counter(), [], []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        deadline, bad_requests = time.monotonic() + args.duration, itertools.cycle(BAD_REQUESTS)
        await asyncio.gather(sample_rss(server, args.sample_every, deadline, samples),
                             *(client_loop(client, model, i, np.random.default_rng([args.seed, i]), bad_requests,
                                           deadline, outcomes, errors) for i in range(args.clients)))
        left = await queued_after_drain(client)
        health = (await client.get("/health")).status_code
    samples.append((args.duration, rss_by_process(server)))  # at the end: after the drain
    return {"outcomes": outcomes, "errors": errors, "samples": samples, "left": left, "health": health}


def rss_growth(samples: list, warmup: float, duration: float) -> dict[str, dict]:
    """RSS in MB of each process after the warm-up, midway through the rest and at the end:
    growth that stops shows as a second half with none, a leak as one with half of it."""
    warm = next((rss for t, rss in samples if t >= warmup), samples[-1][1])
    mid = next((rss for t, rss in samples if t >= (warmup + duration) / 2), samples[-1][1])
    end = samples[-1][1]
    return {name: {"after_warmup_mb": round(warm[name] / MB, 1), "midway_mb": round(mid[name] / MB, 1),
                   "end_mb": round(end[name] / MB, 1), "growth_mb": round((end[name] - warm[name]) / MB, 1),
                   "second_half_growth_mb": round((end[name] - mid[name]) / MB, 1)}
            for name in warm if name in mid and name in end}


def report(result: dict, rss: dict, exit_code: int | None, args, console: Console) -> dict:
    table = Table(title=f"RSS (MB): after {args.warmup:g} s of warm-up, midway and at the end of {args.duration:g} s")
    for column in ("process", "after warm-up", "midway", "end", "growth", "of it in the 2nd half"):
        table.add_column(column, justify="left" if column == "process" else "right")
    for name, r in rss.items():
        table.add_row(name, f"{r['after_warmup_mb']:.1f}", f"{r['midway_mb']:.1f}", f"{r['end_mb']:.1f}",
                      f"{r['growth_mb']:+.1f}", f"{r['second_half_growth_mb']:+.1f}")
    console.print(table)
    outcomes = result["outcomes"]
    table = Table(title=f"requests by outcome ({args.clients} clients)")
    table.add_column("kind")
    for outcome in OUTCOMES:
        table.add_column(outcome, justify="right")
    for kind in KINDS:
        table.add_row(kind, *(str(outcomes[kind, outcome]) for outcome in OUTCOMES))
    console.print(table)
    for error in sorted(set(result["errors"]))[:10]:
        console.print(f"[red]{error}")
    by_outcome = Counter()
    for (_, outcome), count in outcomes.items():
        by_outcome[outcome] += count
    return {"duration_s": args.duration, "warmup_s": args.warmup, "clients": args.clients,
            "requests": sum(outcomes.values()), "errors": by_outcome["unexpected"],
            "outcomes": dict(by_outcome), "left_running_after_drain": result["left"],
            "health_at_end": result["health"], "server_exit_code": exit_code,
            "rss_growth_mb": {name: r["growth_mb"] for name, r in rss.items()}, "rss_mb": rss,
            "error_examples": sorted(set(result["errors"]))[:5]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    p.add_argument("--warmup", type=float, help="seconds before the RSS baseline (default: a fifth of --duration)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--server-args", default="--prefill 1 --decode 1", help="flags for the server, one string")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.warmup = args.duration / 5 if args.warmup is None else args.warmup
    if not 0 < args.duration < 86_400 or not 0 <= args.warmup < args.duration:
        p.error(f"need 0 < --duration < 1 day and 0 <= --warmup < --duration, got {args.duration} and {args.warmup}")
    if args.clients < 1 or not 0.1 <= args.sample_every <= args.duration:
        p.error(f"need --clients >= 1 and 0.1 <= --sample-every <= --duration, got {args.clients} "
                f"and {args.sample_every}")
    return args


def main() -> None:
    args = parse_args()
    port, console = free_port(), Console()
    log_path = tempfile.NamedTemporaryFile(prefix="soak-server-", suffix=".log", delete=False).name
    console.print(f"starting python -m minicake.serve {args.server_args} on 127.0.0.1:{port} (log: {log_path})")
    server = start_server(args.server_args.split(), port, log_path)
    try:
        result = asyncio.run(soak(f"http://127.0.0.1:{port}", psutil.Process(server.pid), args))
    finally:
        exit_code = stop_server(server)
    summary = report(result, rss_growth(result["samples"], args.warmup, args.duration), exit_code, args, console)
    print(json.dumps(summary), flush=True)
    sys.exit(1 if summary["errors"] or summary["left_running_after_drain"] or exit_code != 0 else 0)


if __name__ == "__main__":
    main()
