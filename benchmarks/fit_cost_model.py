"""Fit a cost-model profile to minicake's own engine on this machine (DESIGN.md 4.3, 4.4).

Times prefills of N prompt tokens of which C are prefix-cache hits, decode steps of B sequences
holding T context tokens, and a gloo send of one KV block (all layers) between two processes;
fits the polynomials of minicake/sched/cost_model.py by least squares and writes the JSON
profile that `python -m minicake.sim --profile FILE` reads. Prints a table, ends with one JSON line.
"""
import argparse
import json
import os
import random
import socket
import sys
import time

import torch
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from minicake.cache.kv_cache import bytes_per_block, free_memory, num_blocks_for
from minicake.config import EngineConfig
from minicake.engine import Engine
from minicake.sampling import SamplingParams
from minicake.sched.cost_model import fit_profile

PREFILL_SHAPES = [(n, c) for n in (32, 64, 128, 256, 512) for c in (0, n // 2)] + [(512, 480)]
DECODE_SHAPES = [(b, ctx) for b in (1, 4, 8) for ctx in (32, 128, 256)]  # batch, prompt tokens per sequence
DECODE_STEPS = 3


def run_to_end(engine: Engine, request_id: str, token_ids: list[int], max_tokens: int) -> int:
    """Run one request alone to its end; returns its prompt tokens served by the prefix cache."""
    engine.add_request(request_id, token_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    cached = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            cached = out.num_cached_tokens
    return cached


def time_prefill(engine: Engine, n: int, c: int, rng: random.Random, vocab: int) -> tuple[int, int, float]:
    """(N, cached tokens, seconds from admission to first token) for a fresh random prompt."""
    tokens = [rng.randrange(vocab) for _ in range(n)]
    if c:
        run_to_end(engine, f"prefix-{n}-{c}-{rng.random()}", tokens[:c], 1)  # leaves its full blocks cached
    start = time.perf_counter()
    cached = run_to_end(engine, f"prefill-{n}-{c}-{rng.random()}", tokens, 1)
    return n, cached, time.perf_counter() - start


def time_decode(engine: Engine, batch: int, ctx: int, steps: int, rng: random.Random,
                vocab: int) -> list[tuple[int, int, float]]:
    """(batch size, context tokens, seconds) of `steps` pure decode steps of `batch` sequences."""
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    ids = [f"decode-{batch}-{ctx}-{i}-{rng.random()}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, [rng.randrange(vocab) for _ in range(ctx)], params)
    generated = dict.fromkeys(ids, 0)
    while not all(generated.values()):  # prefill every sequence first (some decode meanwhile)
        for out in engine.step():
            generated[out.request_id] += 1
    samples = []
    for _ in range(steps):
        context = sum(ctx + g for g in generated.values())
        start = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - start
        assert len(outs) == batch, f"expected a pure decode step of {batch}, got {len(outs)} outputs"
        samples.append((batch, context, elapsed))
        for out in outs:
            generated[out.request_id] += 1
    for request_id in ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    return samples


def _send_blocks(rank: int, port: int, shape: tuple, repeats: int, result) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    payload = torch.zeros(shape)  # [2, num_layers, block_size, num_kv_heads, head_dim]: one block, K and V
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        if rank == 0:
            torch.distributed.send(payload, 1)
        else:
            torch.distributed.recv(payload, 0)
    torch.distributed.barrier()
    if rank == 1:
        result.put((time.perf_counter() - start) / repeats)
    torch.distributed.destroy_process_group()


def time_block_transfer(shape: tuple, repeats: int = 50) -> float:
    """Seconds to send one KV block from one process to another over gloo on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    procs = [ctx.Process(target=_send_blocks, args=(r, port, shape, repeats, result)) for r in (0, 1)]
    for p in procs:
        p.start()
    seconds = result.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    return seconds


def _spin() -> None:
    """A neighbour instance that computes all the time (one thread), until terminated."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    while True:
        a = torch.tanh(a @ a)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least hurt by a busy machine)")
    p.add_argument("--out", default="minicake/sched/profiles/smollm2-135m-cpu.json")
    p.add_argument("--busy-neighbours", type=int, default=0,
                   help="processes kept computing while timing: the other instances of a deployment "
                   "that shares these cores (benchmarks/kvcentric.py runs 3 on 2 cores)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    neighbours = [mp.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(args.busy_neighbours)]
    for n in neighbours:
        n.start()
    engine = Engine(EngineConfig(model=args.model, num_kv_blocks=1024, num_threads=args.threads,
                                 max_num_batched_tokens=1024))
    mc, block_size = engine.model_config, engine.config.block_size
    rng, vocab = random.Random(0), mc.vocab_size
    time_prefill(engine, 64, 0, rng, vocab)  # warm-up
    prefill = [time_prefill(engine, n, c, rng, vocab) for n, c in PREFILL_SHAPES]
    decode = [s for b, ctx in DECODE_SHAPES for s in time_decode(engine, b, ctx, DECODE_STEPS, rng, vocab)]
    transfer = time_block_transfer((2, mc.num_hidden_layers, block_size, mc.num_key_value_heads, mc.head_dim))
    dtype = next(engine.model.parameters()).dtype
    block_bytes = bytes_per_block(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, block_size, dtype)
    kv_tokens = num_blocks_for(int(free_memory(engine.device) * EngineConfig.kv_cache_fraction), block_bytes) * block_size
    name = f"{args.model}-{engine.device.type}-{args.threads}threads"
    profile = fit_profile(name, prefill, decode, transfer, block_size, kv_tokens)
    for n in neighbours:
        n.terminate()
    profile.save(args.out)
    report(profile, prefill, decode, transfer, args.out)
    return 0


def report(profile, prefill, decode, transfer, out) -> None:
    table = Table(title=f"{profile.name}: measured vs fitted")
    for col in ("kind", "shape", "measured ms", "fitted ms"):
        table.add_column(col, justify="right")
    errors = []
    for n, c, t in prefill:
        f = profile.prefill_time(n, min(c, n - 1))
        errors.append(abs(f - t) / t)
        table.add_row("prefill", f"N={n} cached={c}", f"{t * 1e3:.1f}", f"{f * 1e3:.1f}")
    for b, ctx, t in decode[::DECODE_STEPS]:
        f = profile.decode_step_time(b, ctx)
        table.add_row("decode step", f"batch={b} context={ctx}", f"{t * 1e3:.1f}", f"{f * 1e3:.1f}")
    errors += [abs(profile.decode_step_time(b, ctx) - t) / t for b, ctx, t in decode]
    table.add_row("transfer", f"1 block of {profile.block_size} tokens", f"{transfer * 1e3:.3f}", "")
    Console().print(table)
    print(json.dumps({"profile": out, "name": profile.name, "prefill_coef": profile.prefill_coef,
                      "decode_coef": profile.decode_coef, "transfer_s_per_block": transfer,
                      "kv_capacity_tokens": profile.kv_capacity_tokens,
                      "max_relative_error": max(errors), "median_relative_error": sorted(errors)[len(errors) // 2]}))


if __name__ == "__main__":
    sys.exit(main())
