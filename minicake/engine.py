"""One serving instance: model, paged KV cache, scheduler, sampler; one `step()` at a time.

`step()` reads as nano-vllm's: schedule → run → postprocess. Postprocessing appends the
sampled tokens, keys the newly full blocks for prefix caching, detokenizes incrementally,
checks the stop conditions and releases finished sequences' blocks. It is the step of every
role: a prefill instance plugs its stage into it (`serve_as_prefill`) and its requests end once
their prompt is computed; a decode instance admits prompts computed elsewhere (`add_prefilled`).
Requests are refused before any work starts if they can never run (empty, too long, larger
than the cache).
"""
import os
import weakref
from dataclasses import dataclass

import torch

from minicake.cache.block_manager import BlockManager
from minicake.cache.kv_cache import allocate_kv_caches, bytes_per_block, free_memory, num_blocks_for
from minicake.cache.kv_pool import KVPool
from minicake.config import EngineConfig
from minicake.model.config import ModelConfig
from minicake.model.loader import load_model, resolve_model
from minicake.model.runner import ModelRunner
from minicake.model.tokenizer import IncrementalDetokenizer, Tokenizer
from minicake.platforms import apply_platform
from minicake.platforms.cpu import kernels as cpu_kernels
from minicake.platforms.cpu.decode_graph import DecodeGraphs
from minicake.platforms.cuda_graph import CudaGraphs, warm_up
from minicake.sampling import SamplingParams
from minicake.request_state import RequestState
from minicake.sched.scheduler import Scheduler
from minicake.sched.sequence import Sequence

LIVE_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()  # the tests' leak check walks these


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "prefilled" (a prefill instance's) | None
    num_prompt_tokens: int
    num_cached_tokens: int
    error: str | None = None  # why an aborted request failed (a dead instance, a timeout)

    @staticmethod
    def aborted(request_id: str, num_prompt_tokens: int, error: str | None) -> "StepOutput":
        """The last output of a request that ended before its tokens (`error`: why, or None)."""
        return StepOutput(request_id, [], "", True, "abort", num_prompt_tokens, 0, error=error)


def check_request(request_id: str, prompt: list[int], params: SamplingParams, vocab_size: int,
                  max_model_len: int, block_size: int, num_blocks: int) -> None:
    """Raise ValueError naming what is wrong if the request can never run on a cache of
    `num_blocks` blocks. The engine and the cluster (before any process sees it) both call it."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    if len(prompt) == 0:
        raise ValueError(f"request {request_id!r}: the prompt is empty")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
        raise ValueError(f"request {request_id!r}: prompt token ids must be integers in [0, {vocab_size})")
    if params.top_k > vocab_size:  # SamplingParams cannot know the vocabulary
        raise ValueError(f"request {request_id!r}: top_k={params.top_k} is more than the "
                         f"vocabulary size {vocab_size}")
    n = len(prompt)
    if n >= max_model_len:
        raise ValueError(f"request {request_id!r}: the prompt has {n} tokens but max_model_len is "
                         f"{max_model_len} (at least one token must be left to generate)")
    needed = -(-min(n + params.max_tokens, max_model_len) // block_size)
    if needed > num_blocks:
        raise ValueError(f"request {request_id!r}: {n} prompt tokens + max_tokens={params.max_tokens} need "
                         f"{needed} KV blocks of {block_size} tokens, but the cache has only {num_blocks}")


class Engine:
    def __init__(self, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or os.cpu_count())
        self.model_dir = path = resolve_model(config.model)
        self.model_config = ModelConfig.from_dir(path)
        self.max_model_len = config.max_model_len_for(self.model_config)
        self.tokenizer = Tokenizer.from_dir(path)
        dtype = getattr(torch, config.dtype) if config.dtype else None
        self.model = load_model(path, self.device, dtype)
        self.platform = apply_platform(self.model, self.device, config.kernels)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        self.kv_caches = self._allocate_kv_caches(next(self.model.parameters()).dtype)
        num_blocks = self.kv_caches[0][0].shape[0]
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.kv_caches, config.block_size, self.device, config.seed,
                                  decode_graphs=self._decode_graphs())
        if config.kv_pool_blocks and config.enable_prefix_caching:
            self.block_manager.pool = self.runner.pool = KVPool(config.kv_pool_blocks, self.kv_caches)
        if self.platform == "triton" and self.device.type == "cuda":  # before ready: no request waits for a compile
            warm_up(self.model, self.kv_caches, config.max_num_seqs, config.max_num_batched_tokens,
                    self._max_blocks_per_seq())
            if self.runner.decode_graphs is not None:
                self.runner.decode_graphs.capture()
        self.requests: dict[str, RequestState] = {}
        self.aborted: list[StepOutput] = []  # reported by the next step()
        LIVE_ENGINES.add(self)

    def _allocate_kv_caches(self, dtype: torch.dtype):
        mc, cfg = self.model_config, self.config
        num_blocks = cfg.num_kv_blocks
        if num_blocks is None:
            block_bytes = bytes_per_block(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim,
                                          cfg.block_size, dtype)
            budget = cfg.kv_cache_memory or int(free_memory(self.device) * cfg.kv_cache_fraction)
            num_blocks = num_blocks_for(budget, block_bytes)
        return allocate_kv_caches(mc.num_hidden_layers, num_blocks, cfg.block_size,
                                  mc.num_key_value_heads, mc.head_dim, dtype, self.device)

    def _decode_graphs(self):
        """Recorded decode steps: CUDA graphs for the Triton platform on a GPU (captured once
        warmed up), the CPU platform's decode graphs where its C kernels take the KV cache."""
        if self.config.enforce_eager:
            return None
        if self.platform == "triton" and self.device.type == "cuda":
            return CudaGraphs(self.model, self.kv_caches, self.config.max_num_seqs, self._max_blocks_per_seq())
        if self.platform == "cpu" and cpu_kernels.usable(self.kv_caches[0][0]):
            return DecodeGraphs(self.model, self.kv_caches)
        return None

    def _max_blocks_per_seq(self) -> int:
        return min(self.kv_caches[0][0].shape[0], self.block_manager.blocks_needed(self.max_model_len))

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue a request and return its sequence; raises ValueError, having changed nothing, if
        it can never run."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        check_request(request_id, prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len,
                      self.config.block_size, self.block_manager.num_blocks)
        seq = Sequence(request_id, prompt_token_ids, params)
        self.requests[request_id] = RequestState(seq, IncrementalDetokenizer(self.tokenizer))
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> None:
        """Free the request's blocks now; the next step() reports it finished with "abort"."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        self.scheduler.finish(state.seq, "abort")
        self.aborted.append(self._output(state, [], state.flush(), "abort"))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.aborted)

    def step(self) -> list[StepOutput]:
        """schedule → run → postprocess: the only place where sequences advance, for every role."""
        seqs = self.scheduler.schedule()
        tokens = self.runner.execute(seqs) if seqs else []
        return self._postprocess(seqs, tokens)

    def _postprocess(self, seqs: list[Sequence], tokens: list[int]) -> list[StepOutput]:
        outputs, self.aborted = self.aborted, []
        reached_end = self.scheduler.advance(seqs)  # prompt chunks in the middle of a prompt are not here
        if self.runner.stage is not None:  # a prefill instance: the prompts are done, their requests move on
            assert len(tokens) in (0, len(reached_end)), "a token for every finished prompt, or none here"
            for i, seq in enumerate(reached_end):
                state = self.requests.pop(seq.request_id)
                self.scheduler.finish(seq, "prefilled")
                outputs.append(self._output(state, tokens[i:i + 1], "", "prefilled"))
            return outputs
        assert len(tokens) == len(reached_end), "one sampled token per sequence that reached its end"
        for seq, token in zip(reached_end, tokens):
            outputs.append(self._append_token(self.requests[seq.request_id], token))
        return outputs

    def _append_token(self, state: RequestState, token: int) -> StepOutput:
        """The request's new token: append it, check the stop conditions, release it if finished."""
        seq = state.seq
        seq.append_token(token)
        reason, text = state.add_token(token, self.eos_token_ids, self.max_model_len)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.requests[seq.request_id]
        return self._output(state, [token], text, reason)

    # --- what the roles of a disaggregated deployment plug in (minicake/disagg) ----------------

    def serve_as_prefill(self, stage) -> None:
        """A prefill instance's engine: a request ends once its prompt is computed (finish reason
        "prefilled", with its first token where this process sampled it), and `stage`
        (disagg/prefill_instance.py) runs inside every step: it ships each layer's new K/V to the
        decode instance and, in a pipelined group, hands the hidden states on instead of sampling."""
        self.runner.stage = stage

    def add_prefilled(self, seq: Sequence, first_token: int) -> StepOutput:
        """A decode instance's request whose prompt a prefill instance computed: `seq` holds its
        blocks, now filled with the prompt's K/V. It joins the running batch with its first token;
        returns that token's output."""
        assert seq.request_id not in self.requests, f"request id {seq.request_id!r} is already in use"
        seq.num_computed_tokens = len(seq)
        self.block_manager.cache_full_blocks(seq)
        self.scheduler.add_running(seq)
        state = self.requests[seq.request_id] = RequestState(seq, IncrementalDetokenizer(self.tokenizer))
        return self._append_token(state, first_token)

    def _output(self, state: RequestState, token_ids: list[int], text: str, reason: str | None) -> StepOutput:
        seq = state.seq
        return StepOutput(seq.request_id, token_ids, text, reason is not None, reason,
                          seq.num_prompt_tokens, seq.num_cached_tokens)

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": bm.usage(),
            "num_free_blocks": bm.num_free_blocks,
            "num_blocks": bm.num_blocks,
            "prefix_queries_tokens": bm.prefix_queries_tokens,
            "prefix_hits_tokens": bm.prefix_hits_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_pool_blocks": len(bm.pool) if bm.pool is not None else 0,
        }
