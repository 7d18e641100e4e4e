"""A request inside the engine: its tokens, how many of them are in the KV cache, its blocks.

The scheduler moves a `Sequence` between WAITING, RUNNING and FINISHED. Lengths obey, at
all times: num_cached_tokens <= num_computed_tokens <= len(token_ids), and the block table
holds exactly the blocks that the computed tokens (and the ones scheduled now) occupy.
Preemption by recompute sets num_computed_tokens back to 0: the output tokens so far become
part of the prompt that is prefilled again.
"""
from enum import Enum, auto

from minicake.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        assert prompt_token_ids, "a sequence needs at least one prompt token"
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)  # prompt + output; the last one is not computed yet
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []  # block ids, in token order
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.num_scheduled_tokens = 0  # new tokens the current step computes
        self.admitted = False  # scheduled at least once (prefix counters count the first time only)
        self.finish_reason: str | None = None
        # the sampler's noise depends on (seed, position) only (sampling.py); an unseeded request
        # gets a seed from the engine's own when it is first sampled (model/runner.py)
        self.seed: int | None = params.seed

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_uncomputed_tokens(self) -> int:
        assert 0 <= self.num_computed_tokens <= len(self), "computed tokens exceed the sequence"
        return len(self) - self.num_computed_tokens

    def step_reaches_end(self) -> bool:
        """True when this step computes the sequence's last token: its next token is sampled (or, on
        a prefill instance, its prompt is done)."""
        return self.num_computed_tokens + self.num_scheduled_tokens == len(self)

    def append_token(self, token_id: int) -> None:
        assert self.num_computed_tokens == len(self), "append only after every token is computed"
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preempted: blocks are already freed; everything is prefilled again later."""
        assert not self.block_table, "free the blocks before resetting"
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0
