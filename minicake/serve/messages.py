"""The control plane: small messages between the parent and the instance processes (DESIGN.md 2).

They travel on multiprocessing queues, one inbox per instance and one outbox to the parent;
K/V and hidden states never do (they go through torch.distributed). One request, disaggregated:
parent --NewRequest--> decode reserves blocks --Prefill (the reserve-ack)--> prefill stage 0,
whose layers and the next stages' send K/V to decode; the last stage samples the first token
--Prefilled--> decode, which streams every token to the parent as `Outputs`.
"""
from dataclasses import dataclass

from minicake.sampling import SamplingParams


@dataclass
class NewRequest:  # parent -> decode (or colocated) instance
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    xfer_id: int  # names the request's KV transfer; unique in the cluster
    prefill_ranks: tuple[int, ...]  # the prefill group that computes it, stage order (colocated: none)


@dataclass
class Prefill:  # decode -> prefill stage 0, once the blocks are reserved: the reserve-ack
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    xfer_id: int
    decode_rank: int
    first_block: int  # the decode instance holds blocks 0..first_block-1 already: not sent


@dataclass
class Prefilled:  # last prefill stage -> decode: every K/V send of the prompt has started
    xfer_id: int
    first_token: int
    generator_state: bytes | None  # a seeded request's generator after the first sample
    num_cached_tokens: int  # prompt tokens the prefill instance found in its prefix cache


@dataclass
class PrefillFailed:  # prefill -> decode: the request cannot be prefilled (a send failed, aborted)
    xfer_id: int
    error: str


@dataclass
class Abort:  # parent -> every instance: free the request's blocks, report nothing more
    request_id: str


@dataclass
class Shutdown:  # parent -> every instance
    pass


@dataclass
class Ready:  # instance -> parent, once its model and KV cache are allocated
    rank: int
    num_blocks: int


@dataclass
class Outputs:  # instance -> parent: StepOutputs (an aborted request carries `error`)
    rank: int
    outputs: list


@dataclass
class Stats:  # instance -> parent, whenever it changed (at most a few times a second)
    rank: int
    stats: dict


@dataclass
class Crashed:  # instance -> parent: an exception ended the instance loop
    rank: int
    error: str
