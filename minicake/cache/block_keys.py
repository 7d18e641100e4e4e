"""Chained block keys (docs/design.md, Block keys): the one function that names a prefix.

A prompt is cut into blocks of `block_size` tokens. The key of block i hashes (key of
block i-1, tokens of block i), so equal key i means equal prefix up to the end of block i
and a prefix match is a walk over keys that stops at the first miss. Only full blocks get
keys. The local prefix cache, the KV pool and the Conductor all call this module; callers
keep the token ids next to a key so that a hash collision is detected, never served.

Keys are Python's hash of a tuple of ints: deterministic across processes (no per-process
salt applies to ints), so a prefill instance and the Conductor agree on every key.
"""
from collections.abc import Sequence


def block_key(parent: int | None, token_ids: Sequence[int]) -> int:
    """Key of one full block given the key of the block before it (None for block 0)."""
    if parent is None:
        return hash(tuple(token_ids))
    return hash((parent, *token_ids))


def block_keys(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Keys of every full block of `token_ids`; a trailing partial block gets none.

    A Mooncake trace names its 512-token blocks by `hash_ids`; chaining them is
    `block_keys(hash_ids, block_size=1)`.
    """
    keys = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_key(parent, token_ids[start:start + block_size])
        keys.append(parent)
    return keys
