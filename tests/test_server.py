"""The OpenAI-compatible server, driven by the official `openai` client against a real
`python -m minicake.serve` on a tiny model: one colocated server and one disaggregated
(1 prefill + 1 decode) server per module, compared with the offline `LLM`."""
import asyncio
import json
import re
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from server_process import ServerProcess
from starlette.testclient import TestClient

from minicake.llm import LLM
from minicake.model.tokenizer import Tokenizer
from minicake.sampling import SamplingParams
from minicake.serve.api import create_app
from minicake.serve.metrics import ServerMetrics

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


def post(server, body, path="/v1/completions") -> httpx.Response:
    """A raw JSON POST: the body goes out as given (huge ints, NaN, lone surrogates as \\u
    escapes), where the openai client would refuse or change it."""
    return httpx.post(f"{server.url}{path}", content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/json"})


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    return error


def test_values_beyond_what_the_engine_holds_are_400s_and_no_instance_dies(disaggregated, llm):
    # each of these killed the decode or the prefill process (torch overflows on them)
    for body, param in [({"seed": 2**64}, "seed"), ({"seed": -2**63 - 1}, "seed"),
                        ({"top_k": 2**63}, "top_k"),
                        ({"top_k": 513}, "top_k"),  # the tiny model's vocabulary has 512 tokens
                        ({"temperature": float("nan")}, "temperature"),
                        ({"temperature": float("inf")}, "temperature")]:
        assert_error(post(disaggregated, {"prompt": "Hello", "max_tokens": 4, **body}), 400, param)
    # the largest seed with n=2: choice 1's seed wraps around to the smallest int64
    reply = post(disaggregated, {"prompt": "Hello", "max_tokens": 4, "seed": 2**63 - 1, "n": 2})
    assert reply.status_code == 200 and len(reply.json()["choices"]) == 2
    assert httpx.get(f"{disaggregated.url}/health", timeout=10).json()["status"] == "ok"
    reply = client(disaggregated).completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == greedy(llm, PROMPTS[:1])[0]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "\udc00"]}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "stop": "\ud800"}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"),
])
def test_a_lone_surrogate_is_400_naming_the_field(colocated, path, body, param):
    error = assert_error(post(colocated, body, path), 400, param)
    assert "lone surrogate" in error["message"]


@pytest.mark.parametrize("raw, param", [
    ("[" * 100_000 + "]" * 100_000, None),  # too deep for the JSON parser
    ('{"prompt": ' + "[" * 5000 + "]" * 5000 + "}", None),
    ('{"prompt": ' + "[" * 500 + "]" * 500 + "}", "prompt"),  # parsed: not a prompt
])
def test_deeply_nested_json_is_400(colocated, raw, param):
    response = httpx.post(f"{colocated.url}/v1/completions", content=raw, timeout=60)
    assert_error(response, 400, param)


def test_a_body_over_the_size_limit_is_413_with_or_without_a_content_length(colocated):
    assert_error(post(colocated, {"prompt": "x" * 17_000_000}), 413)

    def chunked():  # no Content-Length: the server counts the bytes as they arrive
        yield b'{"prompt": "'
        for _ in range(17):
            yield b"x" * 2**20
        yield b'"}'

    response = httpx.post(f"{colocated.url}/v1/completions", content=chunked(), timeout=60)
    assert assert_error(response, 413)["code"] == "request_too_large"
    assert httpx.get(f"{colocated.url}/health", timeout=10).status_code == 200


def test_a_prompt_longer_than_any_that_fits_is_400_before_it_is_tokenized(colocated):
    # 7 MB fits the body limit; its length in characters refuses it, not its token count
    error = assert_error(post(colocated, {"prompt": "x" * 7_000_000}), 400, "prompt")
    assert "7000000 characters" in error["message"]
    messages = [{"role": "user", "content": "x" * 7_000_000}]
    error = assert_error(post(colocated, {"messages": messages}, "/v1/chat/completions"), 400,
                         "messages")
    assert "7000000 characters" in error["message"]


def test_a_wrong_method_is_405_with_its_allow_header_and_the_envelope(colocated):
    response = httpx.get(f"{colocated.url}/v1/completions", timeout=10)
    assert_error(response, 405)
    assert response.headers["allow"] == "POST"


def test_openapi_documents_both_request_bodies(colocated):
    schema = httpx.get(f"{colocated.url}/openapi.json", timeout=10).json()
    for path, model in [("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatCompletionRequest")]:
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{model}"}
    components = schema["components"]["schemas"]
    assert "prompt" in components["CompletionRequest"]["properties"]
    assert "messages" in components["ChatCompletionRequest"]["properties"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/(\w+)"', json.dumps(schema)))
    assert refs <= set(components), "every reference resolves"


def test_unsupported_parameters_at_their_neutral_value_are_accepted(colocated):
    body = {"prompt": "Hi", "max_tokens": 2, "logprobs": 0, "echo": False, "best_of": 1,
            "logit_bias": {}, "presence_penalty": 0, "user": "someone"}
    assert post(colocated, body).status_code == 200


def test_an_unexpected_exception_is_a_500_envelope_that_names_no_server_path(checkpoint):
    class BrokenCluster:  # what create_app reads, and an add_request that fails unexpectedly
        max_model_len = MAX_MODEL_LEN
        model_config = SimpleNamespace(vocab_size=512)
        tokenizer = Tokenizer.from_dir(checkpoint)

        def add_request(self, request_id, prompt, params):
            raise RuntimeError(f"{__file__} is broken")

    app = create_app(BrokenCluster(), "tiny", ServerMetrics())
    response = TestClient(app, raise_server_exceptions=False).post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert assert_error(response, 500)["message"] == "internal server error"
    assert __file__ not in response.text


def test_concurrent_requests_are_tokenized_in_one_thread_off_the_event_loop(checkpoint):
    # not in asyncio's default pool, which grows under concurrent clients: each of its threads
    # gets a malloc arena that keeps the peak of what it tokenized (docs/results.md, Soak)
    tokenizing_threads = set()

    class RecordingTokenizer(Tokenizer):
        def encode(self, text, add_special_tokens=True):
            tokenizing_threads.add(threading.get_ident())
            return super().encode(text, add_special_tokens)

    class ClusterThatRefusesAll:  # what create_app reads; every request ends at add_request
        max_model_len = MAX_MODEL_LEN
        model_config = SimpleNamespace(vocab_size=512)
        tokenizer = RecordingTokenizer.from_dir(checkpoint)

        def add_request(self, request_id, prompt, params):
            raise ValueError("this cluster refuses every request")

    async def sixteen_at_once():
        app = create_app(ClusterThatRefusesAll(), "tiny", ServerMetrics())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tiny") as client:
            return await asyncio.gather(*(
                client.post("/v1/completions", json={"prompt": f"The quick brown fox {i}"})
                for i in range(8)), *(
                client.post("/v1/chat/completions", json={"messages": [
                    {"role": "user", "content": f"Hi {i}"}]}) for i in range(8)))

    responses = asyncio.run(sixteen_at_once())
    assert [r.status_code for r in responses] == [400] * 16
    assert len(tokenizing_threads) == 1
    assert threading.get_ident() not in tokenizing_threads


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
