"""Mooncake request traces (DESIGN.md section 5) read into Conductor requests.

One JSON object per line: `timestamp` (ms from start), `input_length` and `output_length`
(tokens) and `hash_ids` (one id per 512-token block, a trailing partial block included).
Hash ids become chained block keys with the same function the engine uses.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

from minicake.cache.block_keys import block_keys
from minicake.sched.conductor import Request
from minicake.traces import open_trace, trace_path

TRACE_BLOCK_SIZE = 512


@dataclass
class TraceEntry:
    arrival_s: float
    request: Request


def _field(obj: dict, name: str, where: str, minimum: int) -> int | float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ValueError(f"{where}: '{name}' must be a number >= {minimum}, got {value!r}")
    return value


def parse_line(line: str, where: str) -> tuple[float, int, int, list[int]]:
    """(timestamp ms, input tokens, output tokens, hash ids) of one trace line, or ValueError."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    ts = _field(obj, "timestamp", where, 0)
    n_in, n_out = _field(obj, "input_length", where, 1), _field(obj, "output_length", where, 1)
    if not isinstance(n_in, int) or not isinstance(n_out, int):
        raise ValueError(f"{where}: 'input_length' and 'output_length' must be integers")
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in ids):
        raise ValueError(f"{where}: 'hash_ids' must be a list of integers")
    if len(ids) != math.ceil(n_in / TRACE_BLOCK_SIZE):
        raise ValueError(f"{where}: {len(ids)} hash_ids for {n_in} input tokens, expected "
                         f"{math.ceil(n_in / TRACE_BLOCK_SIZE)} (one per {TRACE_BLOCK_SIZE}-token block)")
    return float(ts), n_in, n_out, ids


def load_trace(path: str | Path, limit: int | None = None, speed: float = 1.0,
               max_output: int | None = None) -> list[TraceEntry]:
    """Requests of a trace (a path, or a shipped trace's name: minicake/traces) in arrival
    order, replayed `speed` times faster, outputs capped at `max_output`. Raises ValueError
    naming the file and line of anything malformed."""
    assert speed > 0, f"speed must be > 0, got {speed}"
    path = trace_path(path)
    entries, last_ts = [], 0.0
    with open_trace(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(entries) >= limit:
                break
            if not line.strip():
                continue
            ts, n_in, n_out, ids = parse_line(line, f"{path}:{lineno}")
            if ts < last_ts:
                raise ValueError(f"{path}:{lineno}: timestamp {ts} goes back in time (previous {last_ts})")
            last_ts = ts
            n_out = n_out if max_output is None else min(n_out, max_output)
            req = Request(len(entries), n_in, n_out, block_keys(ids, block_size=1))
            entries.append(TraceEntry(ts / 1000.0 / speed, req))
    if not entries:
        raise ValueError(f"trace {path}: no requests")
    return entries
