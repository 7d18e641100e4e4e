"""Mooncake request traces (docs/design.md, Traces) read into Conductor requests.

One JSON object per line: `timestamp` (ms from start), `input_length` and `output_length`
(tokens) and `hash_ids` (one id per 512-token block, a trailing partial block included).
Hash ids become chained block keys with the same function the engine uses.
"""
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

from minicake.cache.block_keys import block_keys
from minicake.conductor.conductor import Request
from minicake.traces import open_trace, trace_path

TRACE_BLOCK_SIZE = 512
MAX_NUMBER = 2 ** 53  # trace numbers stay below it: exact as floats, finite


@dataclass
class TraceEntry:
    arrival_s: float
    request: Request


def _field(obj: dict, name: str, where: str, minimum: int) -> int | float:
    value = obj.get(name)
    # the chained comparison is False for NaN and infinities too
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value < MAX_NUMBER:
        raise ValueError(f"{where}: '{name}' must be a finite number >= {minimum} and < 2**53, "
                         f"got {repr(value)[:40]}")
    return value


def _not_a_number(constant: str):
    raise ValueError(f"{constant} is not a finite number")


def parse_line(line: str, where: str) -> tuple[float, int, int, list[int]]:
    """(timestamp ms, input tokens, output tokens, hash ids) of one trace line, or ValueError.
    Every number in it is finite: Python's json would accept NaN and Infinity."""
    try:
        obj = json.loads(line, parse_constant=_not_a_number)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # NaN/Infinity, a 4300-digit int, [[[[...
        raise ValueError(f"{where}: not a trace line ({str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    ts = _field(obj, "timestamp", where, 0)
    n_in, n_out = _field(obj, "input_length", where, 1), _field(obj, "output_length", where, 1)
    if not isinstance(n_in, int) or not isinstance(n_out, int):
        raise ValueError(f"{where}: 'input_length' and 'output_length' must be integers")
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in ids):
        raise ValueError(f"{where}: 'hash_ids' must be a list of non-negative integers")
    if len(ids) != math.ceil(n_in / TRACE_BLOCK_SIZE):
        raise ValueError(f"{where}: {len(ids)} hash_ids for {n_in} input tokens, expected "
                         f"{math.ceil(n_in / TRACE_BLOCK_SIZE)} (one per {TRACE_BLOCK_SIZE}-token block)")
    return float(ts), n_in, n_out, ids


def read_trace(path: str | Path, limit: int | None = None) -> list[tuple[float, int, int, list[int]]]:
    """`parse_line` of each of the first `limit` requests of a trace (a path, or a shipped
    trace's name: minicake/traces), in order. Raises ValueError naming the file and line of
    anything malformed or unreadable, or of a timestamp that goes back in time."""
    path = trace_path(path)
    lines, last_ts, lineno = [], 0.0, 0
    with open_trace(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(lines) >= limit:
                    break
                if not line.strip():
                    continue
                ts, n_in, n_out, ids = parse_line(line, f"{path}:{lineno}")
                if ts < last_ts:
                    raise ValueError(f"{path}:{lineno}: timestamp {ts} goes back in time (previous {last_ts})")
                last_ts = ts
                lines.append((ts, n_in, n_out, ids))
        except (UnicodeDecodeError, OSError, EOFError, zlib.error) as e:  # binary, or a corrupt .gz
            raise ValueError(f"{path}:{lineno + 1}: unreadable ({e})") from None
    if not lines:
        raise ValueError(f"trace {path}: no requests")
    return lines


def load_trace(path: str | Path, limit: int | None = None, speed: float = 1.0,
               max_output: int | None = None) -> list[TraceEntry]:
    """Requests of a trace (`read_trace`) in arrival order, replayed `speed` times faster,
    outputs capped at `max_output`."""
    if not 0 < speed < math.inf:
        raise ValueError(f"speed must be a finite number > 0, got {speed}")
    entries = []
    for ts, n_in, n_out, ids in read_trace(path, limit):
        n_out = n_out if max_output is None else min(n_out, max_output)
        req = Request(len(entries), n_in, n_out, block_keys(ids, block_size=1))
        entries.append(TraceEntry(ts / 1000.0 / speed, req))
    return entries
