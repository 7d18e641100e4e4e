"""Prefix hit rate of one global KV pool against its capacity, LRU vs LFU (docs/design.md, KV pool).

Replays a Mooncake trace's requests in arrival order through one KVPoolModel: each request
reuses the leading blocks the pool holds, then stores all its blocks. No timing is involved:
this is the cache alone, as in the paper's capacity study. Prints a table, ends with one JSON line.
"""
import argparse
import json
import sys
import time

from rich.console import Console
from rich.table import Table

from minicake.sim.pool_model import KVPoolModel
from minicake.sim.trace import TRACE_BLOCK_SIZE, load_trace

CAPACITIES = [1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, None]  # blocks; None: unlimited


def hit_rate(trace, capacity_blocks: int | None, policy: str) -> tuple[float, float]:
    """(block-weighted, token-weighted) prefix hit rate of the whole trace."""
    capacity = None if capacity_blocks is None else capacity_blocks * TRACE_BLOCK_SIZE
    pool = KVPoolModel(capacity, TRACE_BLOCK_SIZE, policy)
    hit_blocks = all_blocks = hit_tokens = all_tokens = 0
    for e in trace:
        keys, n = e.request.block_keys, e.request.prompt_len
        hit = pool.match_len(keys)
        hit_blocks += hit
        hit_tokens += min(hit * TRACE_BLOCK_SIZE, n - 1)  # the last token is always computed
        all_blocks += len(keys)
        all_tokens += n
        pool.access(keys)
    return hit_blocks / all_blocks, hit_tokens / all_tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", action="append", required=True,
                   help="conversation, synthetic (shipped) or a trace file; repeat for several")
    args = p.parse_args()
    try:
        traces = {path: load_trace(path) for path in args.trace}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = []
    for path, trace in traces.items():
        for blocks in CAPACITIES:
            (lru_b, lru_t), (lfu_b, lfu_t) = hit_rate(trace, blocks, "lru"), hit_rate(trace, blocks, "lfu")
            rows.append({"trace": path.split("/")[-1], "capacity_blocks": blocks or "unlimited",
                         "lru_block": lru_b, "lfu_block": lfu_b, "lru_token": lru_t, "lfu_token": lfu_t})
    table = Table(title="prefix hit rate of one global pool (block-weighted / token-weighted)")
    for col in ("trace", "capacity (blocks)", "LRU", "LFU"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["trace"], str(r["capacity_blocks"]), f"{r['lru_block']:.3f} / {r['lru_token']:.3f}",
                      f"{r['lfu_block']:.3f} / {r['lfu_token']:.3f}")
    Console().print(table)
    print(json.dumps({"rows": rows, "wall_s": round(time.perf_counter() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
