"""The two public Mooncake request traces, shipped with minicake (see README.md here).

`conversation` and `synthetic` name them wherever a trace is asked for (`--trace
conversation`); any other name is a path to a trace file, JSON lines, plain or gzipped.
The format: docs/design.md, Traces.
"""
import gzip
from pathlib import Path
from typing import TextIO

HERE = Path(__file__).parent
SHIPPED = {"conversation": HERE / "conversation_trace.jsonl.gz",
           "synthetic": HERE / "synthetic_trace.jsonl.gz"}


def trace_path(name_or_path: str | Path) -> Path:
    """The shipped trace `name_or_path` names, or else that path."""
    return SHIPPED.get(str(name_or_path), Path(name_or_path))


def open_trace(name_or_path: str | Path) -> TextIO:
    """A trace opened for reading text (a `.gz` file is decompressed on the fly); ValueError
    naming it if there is no such file."""
    path = trace_path(name_or_path)
    if not path.is_file():
        raise ValueError(f"trace {name_or_path}: no such file (shipped traces: {', '.join(SHIPPED)})")
    return gzip.open(path, "rt") if path.suffix == ".gz" else path.open()
