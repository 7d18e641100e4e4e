"""The control plane's wire format: msgpack, signed, and only the message classes named here.

A message is a dataclass; on the wire it is a map {"type": its class name, field: value, ...},
nested the same way (a NewRequest's SamplingParams, an Outputs' StepOutputs), tuples as a msgpack
extension so that they come back as tuples. Decoding constructs only the classes of `_classes()`,
with their fields as keyword arguments, so their own checks run (SamplingParams validates
itself); an unknown type or field is refused. Nothing from the network is unpickled, and no
code but those constructors runs. `sign` and `verify` are HMAC-SHA256 with the cluster's shared
token: the token itself never travels.
"""
import hashlib
import hmac
from dataclasses import fields, is_dataclass

import msgpack

TUPLE = 1  # msgpack extension code of a tuple (its items packed as an array)


class DecodeError(ValueError):
    """Bytes that are not a message of the control plane."""


def _classes() -> dict[str, type]:
    """Every class that may cross the control plane, by name (imported here: they import this module's users)."""
    from minicake.config import EngineConfig
    from minicake.disagg import messages
    from minicake.disagg.instance import InstanceSpec
    from minicake.disagg.migration import FetchBlocks, FetchReply
    from minicake.disagg.pipeline import SampleRow, SendPlan, StageBatch
    from minicake.engine import StepOutput
    from minicake.sampling import SamplingParams
    found = [c for c in vars(messages).values() if is_dataclass(c) and c.__module__ == messages.__name__]
    found += [EngineConfig, InstanceSpec, FetchBlocks, FetchReply, SampleRow, SendPlan, StageBatch, StepOutput,
              SamplingParams]
    return {c.__name__: c for c in found}


_registry: dict[str, type] = {}


def registry() -> dict[str, type]:
    if not _registry:
        _registry.update(_classes())
    return _registry


def encode(msg) -> bytes:
    return msgpack.packb(_to_wire(msg), use_bin_type=True)


def decode(data: bytes):
    """The message `data` encodes; DecodeError (naming what is wrong) for anything else."""
    try:
        msg = msgpack.unpackb(data, raw=False, ext_hook=_ext, object_hook=_construct)
    except DecodeError:
        raise
    except Exception as e:  # malformed bytes: msgpack's own errors, ValueError, TypeError ...
        raise DecodeError(f"not msgpack ({type(e).__name__}{': ' if str(e) else ''}{e})") from None
    if type(msg).__name__ not in registry() or type(msg) is not registry()[type(msg).__name__]:
        raise DecodeError(f"not a message: a {type(msg).__name__}")
    return msg


def sign(token: bytes, payload: bytes) -> bytes:
    return hmac.new(token, payload, hashlib.sha256).digest()


def verify(token: bytes, payload: bytes, mac: bytes) -> bool:
    return hmac.compare_digest(sign(token, payload), mac)


def _to_wire(x):
    if is_dataclass(x) and not isinstance(x, type):
        name = type(x).__name__
        if registry().get(name) is not type(x):
            raise TypeError(f"{name} is not a message class of the control plane")
        return {"type": name, **{f.name: _to_wire(getattr(x, f.name)) for f in fields(x)}}
    if isinstance(x, tuple):
        return msgpack.ExtType(TUPLE, msgpack.packb([_to_wire(v) for v in x], use_bin_type=True))
    if isinstance(x, list):
        return [_to_wire(v) for v in x]
    if isinstance(x, dict):
        if "type" in x:
            raise ValueError("a plain dict on the control plane may not have a 'type' key (it names classes)")
        return {k: _to_wire(v) for k, v in x.items()}
    return x  # None, bool, int, float, str, bytes: msgpack's own (it refuses anything else)


def _ext(code: int, data: bytes):
    if code != TUPLE:
        raise DecodeError(f"unknown msgpack extension {code}")
    return tuple(msgpack.unpackb(data, raw=False, ext_hook=_ext, object_hook=_construct))


def _construct(d: dict):
    if "type" not in d:
        return d
    name = d.pop("type")
    cls = registry().get(name) if isinstance(name, str) else None
    if cls is None:
        raise DecodeError(f"unknown message type {name!r}")
    allowed = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise DecodeError(f"{name} has no field(s) {', '.join(map(repr, unknown))}")
    try:
        return cls(**d)
    except Exception as e:  # a missing field, or a value the class refuses
        raise DecodeError(f"bad {name}: {type(e).__name__}: {e}") from None
