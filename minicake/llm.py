"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`.

It feeds every prompt to one `Engine` and steps it until all are done, so the whole batch
shares continuous batching, chunked prefill and the prefix cache; with `prefill_instances` the
same loop drives a `Cluster` of instance processes (disagg/cluster.py, `ClusterEngine`).
Outputs come back in prompt order, whatever order the requests finished in.
"""
import sys
from dataclasses import dataclass, field
from itertools import count

from minicake.config import EngineConfig
from minicake.engine import Engine
from minicake.sampling import SamplingParams


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, model: str = "smollm2-135m", device: str | None = None, prefill_instances: int = 0,
                 decode_instances: int = 1, pipeline_stages: int = 1, conductor=None, cost=None,
                 **engine_settings):
        """prefill_instances=0: one engine in this process. prefill_instances >= 1: that many
        prefill groups of `pipeline_stages` processes and `decode_instances` decode processes
        (minicake.disagg.cluster), routed by the Conductor (`conductor`: a ConductorConfig, `cost`:
        a CostModel); call close() or use `with LLM(...) as llm:` to end them. A request that
        admission control refuses raises minicake.conductor.live.RequestRejected."""
        config = EngineConfig(model=model, device=device, **engine_settings)
        if prefill_instances:
            from minicake.disagg.cluster import Cluster, ClusterEngine
            self.engine = ClusterEngine(Cluster(config, prefill_instances, decode_instances, pipeline_stages,
                                                conductor=conductor, cost=cost))
        else:
            self.engine = Engine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = count()

    def close(self) -> None:
        """End the instance processes, if any (an in-process engine needs nothing)."""
        if hasattr(self.engine, "cluster"):
            self.engine.cluster.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists. sampling_params:
        None (defaults), one SamplingParams for all, or a list with one per prompt."""
        texts, token_lists = self._normalize(prompts)
        return self._generate(texts, token_lists, sampling_params, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of them."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts, or a list of such lists")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        texts, token_lists = zip(*(self.tokenizer.encode_chat(c) for c in conversations))
        return self._generate(texts, token_lists, sampling_params, use_tqdm)

    def _generate(self, texts, token_lists, sampling_params, use_tqdm) -> list[RequestOutput]:
        params = self._params_per_prompt(sampling_params, len(token_lists))
        outputs: dict[str, RequestOutput] = {}
        try:
            for text, ids, p in zip(texts, token_lists, params):
                request_id = f"llm-{next(self._ids)}"
                self.engine.add_request(request_id, ids, p)  # validates before adding
                outputs[request_id] = RequestOutput(request_id, text, ids)
            self._run(outputs, use_tqdm and sys.stdout.isatty())
        finally:  # an error (or Ctrl-C) leaves no request behind in the engine
            for request_id, out in outputs.items():
                if out.finish_reason is None:
                    self.engine.abort_request(request_id)
            while self.engine.has_unfinished_requests():  # only the abort reports are left
                self.engine.step()
        return list(outputs.values())

    def _run(self, outputs: dict[str, RequestOutput], show_progress: bool) -> None:
        progress = None
        if show_progress:
            from rich.progress import Progress
            progress = Progress(transient=True)
            task = progress.add_task("generating", total=len(outputs))
            progress.start()
        try:
            while self.engine.has_unfinished_requests():
                for step in self.engine.step():
                    out = outputs.get(step.request_id)
                    if out is None:
                        continue
                    out.token_ids += step.new_token_ids
                    out.text += step.new_text
                    out.num_cached_tokens = step.num_cached_tokens
                    if step.finished:
                        out.finish_reason = step.finish_reason
                        if progress:
                            progress.advance(task)
        finally:
            if progress:
                progress.stop()

    def _normalize(self, prompts) -> tuple[list[str | None], list[list[int]]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list):
            raise TypeError(f"prompts must be a string, a list of strings or a list of token-id lists, "
                            f"got {type(prompts).__name__}")
        if all(isinstance(p, str) for p in prompts):
            return list(prompts), [self.tokenizer.encode(p) for p in prompts]
        if all(isinstance(p, list) for p in prompts):
            return [None] * len(prompts), [list(p) for p in prompts]
        raise TypeError("prompts must be all strings or all token-id lists")

    @staticmethod
    def _params_per_prompt(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if len(sampling_params) != n:
            raise ValueError(f"{len(sampling_params)} sampling_params for {n} prompts: pass one, or one per prompt")
        return list(sampling_params)
