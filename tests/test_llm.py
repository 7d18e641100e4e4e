"""The offline LLM API end to end: greedy outputs equal transformers' token for token, whatever
the batch, the chunking of prompts or the preemptions; prefix hits; stop conditions."""
import pytest
import torch
from model_fixtures import hf_greedy

from minicake.llm import LLM
from minicake.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPT_LENS = (3, 17, 40, 9, 26)


@pytest.fixture(scope="module")
def hf_models(tiny_checkpoint):
    from transformers import AutoModelForCausalLM
    return {arch: AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch)).eval()
            for arch in ("llama", "qwen2", "qwen3")}


def prompts(lens=PROMPT_LENS, vocab=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lens]


def tiny_llm(tiny_checkpoint, arch="llama", **settings):
    settings = {"block_size": 4, "num_kv_blocks": 128, "num_threads": 1, **settings}
    return LLM(str(tiny_checkpoint(arch)), device="cpu", **settings)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_batch_of_mixed_lengths_equals_transformers(tiny_checkpoint, hf_models, arch):
    outputs = tiny_llm(tiny_checkpoint, arch).generate(prompts(), GREEDY)
    for p, out in zip(prompts(), outputs):
        assert out.token_ids == hf_greedy(hf_models[arch], p, 12)
        assert out.finish_reason == "length" and out.prompt_token_ids == p


def test_chunked_prefill_changes_no_token(tiny_checkpoint, hf_models):
    llm = tiny_llm(tiny_checkpoint, max_num_batched_tokens=8)  # the 40-token prompt takes 5+ steps
    for p, out in zip(prompts(), llm.generate(prompts(), GREEDY)):
        assert out.token_ids == hf_greedy(hf_models["llama"], p, 12)


def test_preemption_changes_no_token(tiny_checkpoint, hf_models):
    llm = tiny_llm(tiny_checkpoint, num_kv_blocks=16, enable_prefix_caching=False)  # 64 slots for ~150 tokens
    outputs = llm.generate(prompts(), GREEDY)
    assert llm.engine.stats()["num_preemptions"] > 0
    for p, out in zip(prompts(), outputs):
        assert out.token_ids == hf_greedy(hf_models["llama"], p, 12)


def test_bundled_model_greedy_equals_transformers(bundled_model_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(bundled_model_dir).eval()
    llm = LLM(str(bundled_model_dir), device="cpu", num_kv_blocks=64, num_threads=1)
    texts = ["The capital of France is", "def fibonacci(n):\n    "]
    outputs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for out in outputs:
        assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, 16)
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_a_repeated_prompt_hits_the_prefix_cache_and_changes_nothing(tiny_checkpoint):
    llm = tiny_llm(tiny_checkpoint)
    [p] = prompts([38])
    first, second = llm.generate([p], GREEDY)[0], llm.generate([p], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 36  # 9 full blocks; the last prompt token is recomputed
    assert second.token_ids == first.token_ids
    stats = llm.engine.stats()
    assert (stats["prefix_queries_tokens"], stats["prefix_hits_tokens"]) == (76, 36)


def test_prompt_forms_and_per_prompt_params(tiny_checkpoint):
    llm = tiny_llm(tiny_checkpoint)
    [single] = llm.generate("The quick brown fox", GREEDY)
    assert single.prompt == "The quick brown fox"
    assert single.prompt_token_ids == llm.tokenizer.encode("The quick brown fox")
    outs = llm.generate(prompts([5, 6]), [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 5)])
    assert [len(o.token_ids) for o in outs] == [2, 5]
    with pytest.raises(ValueError, match="2 sampling_params for 3 prompts"):
        llm.generate(prompts([5, 6, 7]), [GREEDY, GREEDY])


def test_chat_applies_the_template(tiny_checkpoint):
    llm = tiny_llm(tiny_checkpoint)
    [out] = llm.chat([{"role": "user", "content": "hi"}], GREEDY)
    assert out.prompt.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)
    assert len(llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], GREEDY)) == 2


def test_stop_string_ends_the_text_before_it(tiny_checkpoint):
    llm = tiny_llm(tiny_checkpoint)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    [full] = llm.generate(prompts([10]), params)
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    [cut] = llm.generate(prompts([10]), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]


def test_stop_token_id_ends_generation_and_is_kept_in_token_ids(tiny_checkpoint):
    llm = tiny_llm(tiny_checkpoint)
    [full] = llm.generate(prompts([10]), GREEDY)
    stop_id = full.token_ids[4]
    [cut] = llm.generate(prompts([10]), SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]


def test_a_seeded_request_samples_the_same_tokens_in_any_batch(tiny_checkpoint):
    llm = tiny_llm(tiny_checkpoint)
    seeded = SamplingParams(temperature=1.0, max_tokens=10, seed=42, ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    [alone] = llm.generate(prompts([12]), seeded)
    batch = llm.generate(prompts([7]) + prompts([12]) + prompts([20]), [others, seeded, others])
    assert batch[1].token_ids == alone.token_ids


def test_max_model_len_beyond_the_models_positions_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="max_model_len 300 is more than the model's max_position_embeddings 256"):
        tiny_llm(tiny_checkpoint, max_model_len=300)


def test_max_model_len_ends_generation_with_length(tiny_checkpoint):
    llm = tiny_llm(tiny_checkpoint, max_model_len=20)
    [out] = llm.generate(prompts([15]), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert (len(out.token_ids), out.finish_reason) == (5, "length")


@pytest.mark.parametrize("prompt, params, message", [
    ([], GREEDY, "prompt is empty"),
    ([1] * 64, GREEDY, "64 tokens but max_model_len is 64"),
    ([1] * 40, SamplingParams(max_tokens=30), "need 16 KV blocks of 4 tokens, but the cache has only 12"),
    ([1, 99999], GREEDY, r"token ids must be integers in \[0, 512\)"),
])
def test_a_request_that_can_never_run_is_refused_before_any_work(tiny_checkpoint, prompt, params, message):
    llm = tiny_llm(tiny_checkpoint, num_kv_blocks=12, max_model_len=64)
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("r", prompt, params)
    assert llm.engine.stats()["num_waiting"] == 0


def test_a_failing_prompt_in_a_batch_leaves_nothing_behind(tiny_checkpoint):
    llm = tiny_llm(tiny_checkpoint, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(prompts([5, 100]), GREEDY)  # the first was already queued: it is aborted


def test_duplicate_request_id_is_refused(tiny_checkpoint):
    engine = tiny_llm(tiny_checkpoint).engine
    engine.add_request("a", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="'a' is already in use"):
        engine.add_request("a", [4, 5], GREEDY)
    engine.abort_request("a")
    engine.step()


def test_abort_frees_the_blocks_and_reports_abort(tiny_checkpoint):
    engine = tiny_llm(tiny_checkpoint).engine
    engine.add_request("a", prompts([30])[0], GREEDY)
    engine.step()
    assert engine.stats()["num_free_blocks"] < engine.stats()["num_blocks"]
    engine.abort_request("a")
    engine.abort_request("never-seen")  # a no-op
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_blocks"]
    [report] = engine.step()
    assert (report.request_id, report.finished, report.finish_reason) == ("a", True, "abort")
    assert not engine.has_unfinished_requests()


def test_streamed_text_adds_up_to_the_decoded_tokens(tiny_checkpoint):
    engine = tiny_llm(tiny_checkpoint).engine
    engine.add_request("a", prompts([8])[0], GREEDY)
    tokens, text = [], ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
            text += out.new_text
    assert text == engine.tokenizer.decode(tokens)


def test_bad_engine_settings_name_the_field(tiny_checkpoint):
    with pytest.raises(ValueError, match="block_size"):
        tiny_llm(tiny_checkpoint, block_size=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        tiny_llm(tiny_checkpoint, max_num_seqs=-1)


def test_the_offline_api_imports_from_the_package(tiny_checkpoint):
    from minicake import LLM, EngineConfig, RequestOutput, SamplingParams
    with LLM(str(tiny_checkpoint("llama")), device="cpu", block_size=4, num_kv_blocks=32, num_threads=1) as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert isinstance(out, RequestOutput) and len(out.token_ids) == 4
    assert isinstance(llm.engine.config, EngineConfig)
