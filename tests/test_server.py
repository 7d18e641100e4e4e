"""The OpenAI-compatible server, driven by the official `openai` client against a real
`python -m minicake.serve` on a tiny model: one colocated server and one disaggregated
(1 prefill + 1 decode) server per module, compared with the offline `LLM`."""
import asyncio
import json
import signal
import time

import httpx
import openai
import pytest
from server_process import ServerProcess

from minicake.llm import LLM
from minicake.sampling import SamplingParams

MAX_MODEL_LEN = 128
ENGINE_FLAGS = ("--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64",
                "--served-model-name", "tiny")
PROMPTS = ["The quick brown fox", "Paged attention keeps", "def add(a, b):", "Prefill and decode"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def no_template_checkpoint(checkpoint, tmp_path_factory):
    """The same tiny model with the chat template removed from its tokenizer config."""
    path = tmp_path_factory.mktemp("tiny-no-template")
    for f in checkpoint.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def colocated(tiny_server):
    return tiny_server  # started with the same ENGINE_FLAGS


@pytest.fixture(scope="module")
def disaggregated(no_template_checkpoint):
    server = ServerProcess("--model", str(no_template_checkpoint), "--prefill", "1",
                           "--decode", "1", *ENGINE_FLAGS)
    yield server
    assert server.stop() == 0, "the server did not exit cleanly on SIGTERM"


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), device="cpu", max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def greedy(llm, prompts, max_tokens=12) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [out.text for out in llm.generate(prompts, params)]


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_greedy_completions_equal_llm_generate(mode, request, llm):
    server = request.getfixturevalue(mode)
    reply = client(server).completions.create(model="tiny", prompt=PROMPTS, max_tokens=12,
                                              temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in reply.choices] == greedy(llm, PROMPTS)
    assert [c.finish_reason for c in reply.choices] == ["length"] * len(PROMPTS)
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    assert reply.usage.prompt_tokens == sum(map(len, prompt_ids))
    assert reply.usage.completion_tokens == 12 * len(PROMPTS)


def test_token_id_prompt_gives_the_same_completion_as_its_text(colocated, llm):
    ids = llm.tokenizer.encode(PROMPTS[0])
    reply = client(colocated).completions.create(model="tiny", prompt=ids, max_tokens=12,
                                                 temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == greedy(llm, [PROMPTS[0]])[0]


def test_chat_applies_the_template_and_equals_llm_on_the_templated_prompt(colocated, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    reply = client(colocated).chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=8, temperature=0,
        extra_body={"ignore_eos": True})
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    expected = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert reply.choices[0].message.content == expected[0].text
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(ids)


def test_stream_chunks_add_up_to_the_completion_then_usage_then_done(colocated, llm):
    stream = client(colocated).completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy(llm, PROMPTS[:1])[0]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    raw = httpx.post(f"{colocated.url}/v1/completions", timeout=60, json={
        "prompt": PROMPTS[0], "max_tokens": 3, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_chat_stream_starts_with_the_role_and_streams_the_content(colocated):
    stream = client(colocated).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_streams_each_get_their_own_greedy_tokens(colocated, llm):
    async def stream_one(aclient, prompt):
        stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                                  temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream])

    async def all_at_once():
        aclient = openai.AsyncOpenAI(base_url=f"{colocated.url}/v1", api_key="none",
                                     max_retries=0, timeout=120)
        async with aclient:
            return await asyncio.gather(*(stream_one(aclient, p) for p in PROMPTS))

    assert asyncio.run(all_at_once()) == greedy(llm, PROMPTS)


def test_n_seeded_choices_differ_from_each_other_and_repeat_across_calls(colocated):
    def sample():
        reply = client(colocated).completions.create(
            model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, n=2, seed=7,
            extra_body={"ignore_eos": True})
        return [c.text for c in reply.choices]

    first = sample()
    assert first == sample()
    assert first[0] != first[1]


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"logprobs": 2}, "logprobs"),
    ({"prompt": [100000]}, "prompt"),
    ({"extra_body": {"top_k": -5}}, "top_k"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
])
def test_invalid_parameter_is_400_naming_it(colocated, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(colocated).completions.create(**{"model": "tiny", "prompt": "Hi", **kwargs})
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_is_400_naming_both_lengths(colocated, llm):
    prompt = "The quick brown fox " * 40
    n = len(llm.tokenizer.encode(prompt))
    with pytest.raises(openai.BadRequestError) as e:
        client(colocated).completions.create(model="tiny", prompt=prompt, max_tokens=4)
    assert str(n) in e.value.body["message"] and str(MAX_MODEL_LEN) in e.value.body["message"]
    assert e.value.body["param"] == "prompt"


def test_chat_without_a_template_is_400(disaggregated):
    with pytest.raises(openai.BadRequestError) as e:
        client(disaggregated).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}])
    assert "chat template" in e.value.body["message"] and e.value.body["param"] == "messages"


def test_unknown_model_is_404(colocated):
    with pytest.raises(openai.NotFoundError) as e:
        client(colocated).completions.create(model="gpt-7", prompt="Hi")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_models_lists_the_served_name_and_health_is_ok(colocated):
    assert [m.id for m in client(colocated).models.list()] == ["tiny"]
    assert httpx.get(f"{colocated.url}/health", timeout=10).status_code == 200


def wait_until_idle(server, timeout: float = 30) -> dict:
    """Metrics once every instance has no request and no KV block in use."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        busy = [v for (name, _), v in m.items() if name in (
            "minicake:num_requests_running", "minicake:num_requests_waiting",
            "minicake:kv_cache_usage_perc") and v > 0]
        if not busy or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_client_disconnect_aborts_the_request_and_frees_blocks_on_every_instance(disaggregated):
    aborted = ("minicake:request_success_total", (("finished_reason", "abort"),))
    before = disaggregated.metrics().get(aborted, 0.0)
    body = {"prompt": PROMPTS[0], "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{disaggregated.url}/v1/completions", json=body,
                      timeout=60) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(6)]  # a few tokens arrived, then the client leaves
    m = wait_until_idle(disaggregated)
    assert m[aborted] == before + 1
    instances = {labels for name, labels in m if name == "minicake:kv_cache_usage_perc"}
    assert len(instances) == 2, "one prefill and one decode instance report"
    for labels in instances:
        assert m[("minicake:kv_cache_usage_perc", labels)] == 0.0
        assert m[("minicake:num_requests_running", labels)] == 0.0


def test_metrics_parse_and_counters_move_with_a_request(colocated):
    before = colocated.metrics()
    reply = client(colocated).completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=5,
                                                 extra_body={"ignore_eos": True})
    after = colocated.metrics()

    def moved(name):
        return after.get((name, ()), 0.0) - before.get((name, ()), 0.0)

    assert moved("minicake:prompt_tokens_total") == reply.usage.prompt_tokens
    assert moved("minicake:generation_tokens_total") == 5
    assert moved("minicake:time_to_first_token_seconds_count") == 1
    assert moved("minicake:inter_token_latency_seconds_count") == 4
    assert moved("minicake:e2e_request_latency_seconds_count") == 1
    queries = [v for (name, _), v in after.items() if name == "minicake:prefix_cache_queries_total"]
    assert queries and queries[0] > 0


def test_admission_control_refusal_is_429_with_retry_after(checkpoint):
    # SLOs every request meets alone; the decode instance's 64 blocks of 16 tokens hold 8 requests
    # of 100 + 20 tokens: the 9th of 9 choices finds no KV room now, and is told when to come back
    server = ServerProcess("--model", str(checkpoint), *ENGINE_FLAGS, "--admission", "early",
                           "--ttft-slo", "60", "--tbt-slo", "10")
    prompt = list(range(5, 105))
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client(server).completions.create(model="tiny", prompt=prompt, max_tokens=20, n=9)
        assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert "rejected by admission control (early): no KV room" in e.value.body["message"]
        assert server.metrics()[("minicake:requests_rejected_total", ())] == 1
        reply = client(server).completions.create(model="tiny", prompt=prompt, max_tokens=20, n=8,
                                                  extra_body={"ignore_eos": True})
        assert [c.finish_reason for c in reply.choices] == ["length"] * 8, "the 8 refused with it left room"
    finally:
        assert server.stop() == 0


def test_a_dead_instance_fails_its_stream_then_sigterm_still_ends_every_process(
        no_template_checkpoint):
    server = ServerProcess("--model", str(no_template_checkpoint), *ENGINE_FLAGS)  # 1P + 1D
    instances = [p for p in server.descendants() if "spawn_main" in " ".join(p.cmdline())]
    assert len(instances) == 2, "one prefill and one decode process"
    body = {"prompt": PROMPTS[0], "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        events = response.iter_lines()
        assert next(events).startswith("data: {")  # the first token arrived
        for p in instances:
            p.kill()
        rest = [line for line in events if line]
    assert json.loads(rest[-2][len("data: "):])["error"]["type"] == "server_error"
    assert rest[-1] == "data: [DONE]"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
    children = server.descendants()
    assert server.stop(signal.SIGTERM, timeout=60) == 0
    deadline = time.monotonic() + 10
    while any(c.is_running() and c.status() != "zombie" for c in children) and (
            time.monotonic() < deadline):
        time.sleep(0.1)
    assert not [c.pid for c in children if c.is_running() and c.status() != "zombie"]
