"""Fit a cost-model profile to minicake's own engine on this machine (docs/design.md, Cost models).

Times prefills of N prompt tokens of which C are prefix-cache hits, decode steps of B sequences
holding T context tokens as a decode instance runs them (the gaps between tokens at the client
of a cluster shaped like the deployment, --prefill prefill instances with host KV pools and one
decode instance: the step and its loop's own work; a decode instance's batch-1 steps measured
26-32 ms here where `Engine.step()` alone in a process measured 36 ms, cause unknown),
and a gloo send of one KV block (all layers) between two processes;
fits the polynomials of minicake/conductor/cost_model.py by least squares and writes the JSON
profile that `python -m minicake.sim --profile FILE` reads. Then times one prefill and one decode
shape again next to 0, 1, ... neighbour processes that prefill all the time (the other instances of
a cluster on these cores), against the simulator's model of shared cores (SimConfig.cpu_cores:
n computing processes on c cores each run max(1, n / c) times slower). Prints a table, ends with
one JSON line.

With --device cuda it fits the GPU's profile instead: prefill and decode steps of one engine on
the GPU (synchronized around every timing), one KV block over NCCL from cuda:0 to cuda:1 where
there are two GPUs (else the analytic profile's assumed link, reported as such), no neighbours.
"""
import argparse
import itertools
import json
import math
import os
import random
import socket
import statistics
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
from minicake.conductor.cost_model import GPU_LINK_BYTES_S, fit_profile
from minicake.disagg.cluster import Cluster

PREFILL_SHAPES = ([(n, c) for n in (32, 64, 128, 256, 512) for c in (0, n // 2)] + [(512, 480)]
                  + [(n, n - n // 4) for n in (64, 128, 256, 384)] + [(n, n - 16) for n in (128, 256)])
PREFILL_REPEATS = 3  # each shape timed this often, the median kept
DECODE_BATCHES, DECODE_CONTEXTS = (1, 2, 4, 8), (32, 128, 256)  # batch, prompt tokens per sequence
DECODE_STEPS = 20  # steps timed per decode shape: their spread is the profile's decode_step_cv
SHARING_PREFILL, SHARING_DECODE, SHARING_REPEATS = (128, 0), (2, 128), 9  # shapes timed next to neighbours
NEIGHBOUR_PROMPT = 64  # tokens of each prefill a neighbour runs, about a replay's uncached prompt


def run_to_end(engine: Engine, request_id: str, token_ids: list[int], max_tokens: int) -> int:
    """Run one request alone to its end; returns its prompt tokens served by the prefix cache."""
    engine.add_request(request_id, token_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    cached = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            cached = out.num_cached_tokens
    return cached


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_prefill(engine: Engine, n: int, c: int, rng: random.Random, vocab: int) -> tuple[int, int, float]:
    """(N, cached tokens, seconds from admission to first token) for a fresh random prompt."""
    tokens = [rng.randrange(vocab) for _ in range(n)]
    if c:
        run_to_end(engine, f"prefix-{n}-{c}-{rng.random()}", tokens[:c], 1)  # leaves its full blocks cached
    start = clock(engine.device)
    cached = run_to_end(engine, f"prefill-{n}-{c}-{rng.random()}", tokens, 1)
    return n, cached, clock(engine.device) - start


def median_prefill(engine: Engine, n: int, c: int, rng: random.Random, vocab: int) -> tuple[int, int, float]:
    timings = [time_prefill(engine, n, c, rng, vocab) for _ in range(PREFILL_REPEATS)]
    return timings[0][0], timings[0][1], statistics.median(t for *_, t in timings)


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
        start = clock(engine.device)
        outs = engine.step()
        elapsed = clock(engine.device) - start
        assert len(outs) == batch, f"expected a pure decode step of {batch}, got {len(outs)} outputs"
        samples.append((batch, context, elapsed))
        for out in outs:
            generated[out.request_id] += 1
    for request_id in ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    return samples


def time_decode_instance(model: str, block_size: int, num_prefill: int, max_batch: int, steps: int,
                         rng: random.Random, vocab: int) -> tuple[list[tuple[int, int, float]], float]:
    """(batch size, context tokens, seconds) of the decode steps of a decode instance (b requests
    enter together; each step's gap is the median over them once all b decode), and the spread
    of steps of one shape: the root mean square of step / mean of its shape - 1."""
    config = EngineConfig(model=model, device="cpu", block_size=block_size, num_kv_blocks=16384 // block_size,
                          kv_pool_blocks=16384 // block_size, max_num_batched_tokens=1024, num_threads=1)
    samples, deviations = [], []
    with Cluster(config, prefill_instances=num_prefill, decode_instances=1) as cluster:
        for b in [b for b in DECODE_BATCHES if b <= max_batch]:
            for ctx in DECODE_CONTEXTS:
                params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
                ids = [f"{b}-{ctx}-{i}" for i in range(b)]
                for request_id in ids:
                    cluster.add_request(request_id, [rng.randrange(3, vocab) for _ in range(ctx)], params)
                times = {request_id: [] for request_id in ids}
                while any(len(t) < steps + 2 for t in times.values()):
                    for out in cluster.get_outputs(timeout=60):
                        times[out.request_id] += [time.perf_counter()] * len(out.new_token_ids)
                gaps = [statistics.median(t[k] - t[k - 1] for t in times.values()) for k in range(2, steps + 2)]
                samples += [(b, b * (ctx + k), gap) for k, gap in zip(range(2, steps + 2), gaps)]  # all b decode
                deviations += [gap / statistics.mean(gaps) - 1 for gap in gaps]
    return samples, math.sqrt(statistics.mean(d * d for d in deviations))


def time_decode_engine(engine: Engine, max_batch: int, steps: int, rng: random.Random,
                       vocab: int) -> tuple[list[tuple[int, int, float]], float]:
    """As time_decode_instance, from this process's engine (on a GPU: a decode instance's step)."""
    samples, deviations = [], []
    for b in [b for b in DECODE_BATCHES if b <= max_batch]:
        for ctx in DECODE_CONTEXTS:
            shape = time_decode(engine, b, ctx, steps, rng, vocab)
            mean = statistics.mean(t for *_, t in shape)
            samples += shape
            deviations += [t / mean - 1 for *_, t in shape]
    return samples, math.sqrt(statistics.mean(d * d for d in deviations))


def _send_blocks(rank: int, port: int, shape: tuple, repeats: int, result, device: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=2)
    # [2, num_layers, block_size, num_kv_heads, head_dim]: one block, K and V
    payload = torch.zeros(shape, device=f"cuda:{rank}" if device == "cuda" else "cpu")
    torch.distributed.barrier()
    start = clock(payload.device)
    for _ in range(repeats):
        if rank == 0:
            torch.distributed.send(payload, 1)
        else:
            torch.distributed.recv(payload, 0)
    torch.distributed.barrier()
    if rank == 1:
        result.put((clock(payload.device) - start) / repeats)
    torch.distributed.destroy_process_group()


def time_block_transfer(shape: tuple, device: str = "cpu", repeats: int = 50) -> float:
    """Seconds to send one KV block from one process to another on this machine: over gloo, or
    over NCCL from cuda:0 to cuda:1 (device "cuda")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    procs = [ctx.Process(target=_send_blocks, args=(r, port, shape, repeats, result, device)) for r in (0, 1)]
    for p in procs:
        p.start()
    seconds = result.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    return seconds


def _neighbour(model: str, ready) -> None:
    """A neighbour instance that prefills fresh prompts all the time (one thread), until terminated."""
    torch.set_num_threads(1)
    engine = Engine(EngineConfig(model=model, num_kv_blocks=256, num_threads=1, enable_prefix_caching=False))
    rng = random.Random(1)
    ready.put(True)
    for i in itertools.count():
        run_to_end(engine, f"n{i}", [rng.randrange(3, 1000) for _ in range(NEIGHBOUR_PROMPT)], 1)


def time_sharing(engine: Engine, model: str, max_neighbours: int, rng: random.Random,
                 vocab: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(prefill, decode) slowdowns with 0..max_neighbours neighbours prefilling: median time / alone."""
    ctx = mp.get_context("spawn")
    prefill, decode = [], []
    for k in range(max_neighbours + 1):
        ready = ctx.Queue()
        neighbours = [ctx.Process(target=_neighbour, args=(model, ready), daemon=True) for _ in range(k)]
        for n in neighbours:
            n.start()
        for _ in neighbours:
            ready.get(timeout=300)
        time.sleep(0.5)  # every neighbour is computing
        prefill.append(statistics.median(time_prefill(engine, *SHARING_PREFILL, rng, vocab)[2]
                                         for _ in range(SHARING_REPEATS)))
        decode.append(statistics.median(t for *_, t in time_decode(engine, *SHARING_DECODE, SHARING_REPEATS, rng, vocab)))
        for n in neighbours:
            n.terminate()
            n.join(timeout=30)
    return tuple(t / prefill[0] for t in prefill), tuple(t / decode[0] for t in decode)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least hurt by a busy machine)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: fit the profile of this machine's GPU")
    p.add_argument("--out", help="the profile's path (default: minicake/conductor/profiles/<model>-<device>.json)")
    p.add_argument("--block-size", type=int, default=EngineConfig.block_size,
                   help="tokens per KV block, as in the deployment the profile is for")
    p.add_argument("--prefill", type=int, default=2, help="prefill instances beside the decode instance timed")
    p.add_argument("--max-batch", type=int, default=8, choices=DECODE_BATCHES,
                   help="fit decode steps of batches up to this (4: the C kernels' small-batch regime)")
    p.add_argument("--neighbours", type=int, default=2,
                   help="sharing slowdowns measured with up to this many neighbour processes computing "
                   "(benchmarks/kvcentric.py runs 3 instances on these cores: 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model=args.model, device=args.device, block_size=args.block_size,
                                 num_kv_blocks=16384 // args.block_size, num_threads=args.threads,
                                 max_num_batched_tokens=1024))
    cuda = engine.device.type == "cuda"
    mc, block_size = engine.model_config, engine.config.block_size
    rng, vocab = random.Random(0), mc.vocab_size
    time_prefill(engine, 64, 0, rng, vocab)  # warm-up
    prefill = [median_prefill(engine, n, c, rng, vocab) for n, c in PREFILL_SHAPES]
    if cuda:
        decode, decode_cv = time_decode_engine(engine, args.max_batch, DECODE_STEPS, rng, vocab)
    else:
        decode, decode_cv = time_decode_instance(args.model, args.block_size, args.prefill, args.max_batch,
                                                 DECODE_STEPS, rng, vocab)
    dtype = next(engine.model.parameters()).dtype
    block_bytes = bytes_per_block(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, block_size, dtype)
    block_shape = (2, mc.num_hidden_layers, block_size, mc.num_key_value_heads, mc.head_dim)
    if cuda and torch.cuda.device_count() < 2:
        transfer, transfer_how = block_bytes / GPU_LINK_BYTES_S, "assumed (one GPU: no NCCL peer)"
    else:
        transfer, transfer_how = time_block_transfer(block_shape, engine.device.type), "measured"
    kv_tokens = num_blocks_for(int(free_memory(engine.device) * EngineConfig.kv_cache_fraction), block_bytes) * block_size
    sharing = time_sharing(engine, args.model, 0 if cuda else args.neighbours, rng, vocab)
    where = torch.cuda.get_device_name(engine.device).replace(" ", "-") if cuda else "cpu"
    name = f"{args.model}-{where}" + ("" if cuda else f"-{args.threads}threads")
    args.out = args.out or f"minicake/conductor/profiles/{args.model}-{where if cuda else 'cpu'}.json"
    profile = fit_profile(name, prefill, decode, transfer, block_size, kv_tokens, decode_cv)
    profile.save(args.out)
    report(profile, prefill, decode, transfer, transfer_how, sharing, args.out)
    return 0


def report(profile, prefill, decode, transfer, transfer_how, sharing, out) -> None:
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
    table.add_row("decode step spread", f"{DECODE_STEPS} steps per shape", f"cv {profile.decode_step_cv:.1%}", "")
    table.add_row(f"transfer, {transfer_how}", f"1 block of {profile.block_size} tokens", f"{transfer * 1e3:.3f}", "")
    cores = os.cpu_count()
    for kind, shape, slowdowns in (("prefill", "N={} cached={}".format(*SHARING_PREFILL), sharing[0]),
                                   ("decode step", "batch={} context={}".format(*SHARING_DECODE), sharing[1])):
        for k, slowdown in enumerate(slowdowns[1:], 1):
            table.add_row(f"{kind}, {k} neighbour(s) prefilling", shape, f"x{slowdown:.2f} of alone",
                          f"x{max(1, (k + 1) / cores):.2f} ({cores} cores)")
    Console().print(table)
    print(json.dumps({"profile": out, "name": profile.name, "prefill_coef": profile.prefill_coef,
                      "decode_coef": profile.decode_coef, "transfer_s_per_block": transfer, "transfer": transfer_how,
                      "kv_capacity_tokens": profile.kv_capacity_tokens, "decode_step_cv": profile.decode_step_cv,
                      "prefill_sharing": sharing[0],
                      "decode_sharing": sharing[1], "cpu_cores": cores,
                      "max_relative_error": max(errors), "median_relative_error": sorted(errors)[len(errors) // 2]}))


if __name__ == "__main__":
    sys.exit(main())
