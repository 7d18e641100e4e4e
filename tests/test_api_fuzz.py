"""Fuzzing the HTTP API: request bodies over the fields of both request models, each value
either a plausible one or a hostile one (huge ints, NaN, lone surrogates, wrong types, deep
nesting), against a running server. No body may get a 5xx or leave the instances broken."""
import json

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

# JSON text the server must refuse or survive, written raw: json.dumps cannot write most of it
HOSTILE = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "1e999", "-0.0", "1.5", "-1", "0", "true", "null",
    str(2**63 - 1), str(2**63), str(2**64), str(-2**63 - 1), "9" * 5000,
    '"a\\ud800b"', '"\\udfff"', '"\\u0000"', '""', '"x"', "[]", "{}", '[1, "a", null]',
    "[" * 3000 + "]" * 3000, "[" * 200 + "]" * 200, '{"a": ' * 300 + "1" + "}" * 300,
])
SURROGATES = st.characters(categories=["Cs", "Ll"])  # Cs: lone halves of UTF-16 pairs
TEXT = st.text(max_size=12) | st.text(SURROGATES, max_size=6)
TOKEN_IDS = st.lists(st.integers(-2, 520), min_size=1, max_size=8)  # the tiny vocabulary: 512
# no subnormals: once the C kernels (-ffast-math) are loaded in this process, it flushes them
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)
SMALL = st.integers(1, 2)  # max_tokens and n stay small: a valid request answers quickly

SAMPLING_FIELDS = {
    "model": st.sampled_from(["tiny", "gpt-7"]),
    "temperature": st.floats(0, 2, allow_subnormal=False) | ANY_FLOAT,
    "top_p": st.floats(0, 1, allow_subnormal=False) | ANY_FLOAT,
    "top_k": st.integers(-2, 2**65) | st.sampled_from([511, 512, 513]),
    "stop": TEXT | st.lists(TEXT, max_size=20),
    "seed": st.integers(-2**65, 2**65) | st.just(2**63 - 1),  # n > 1 wraps the largest seed
    "n": SMALL,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "max_tokens": SMALL,
    "logprobs": st.sampled_from([None, False, 0, 2]),
    "best_of": st.sampled_from([None, 1, 3]),
    "user": TEXT,
    "frobnicate": st.integers(),
}
COMPLETION_FIELDS = {
    "prompt": TEXT | TOKEN_IDS | st.lists(TEXT, max_size=2) | st.lists(TOKEN_IDS, max_size=2),
}
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "tool"]),
    "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                max_size=2)})
CHAT_FIELDS = {"messages": st.lists(MESSAGE, min_size=1, max_size=3), "max_completion_tokens": SMALL}


def json_value(strategy):
    """A field's JSON text: mostly a value of its own kind, sometimes a hostile one."""
    own = strategy.map(json.dumps)
    return st.sampled_from([own, own, own, HOSTILE]).flatmap(lambda chosen: chosen)


def body(fields: dict, required: tuple[str, ...]):
    """Raw JSON text: an object of the required fields (max_tokens among them, so that a valid
    request answers quickly) and up to three more, or a hostile value instead of an object."""
    def render(items: dict) -> str:
        return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in items.items()) + "}"

    def with_values(names: list[str]):
        return st.fixed_dictionaries({k: json_value(fields[k]) for k in (*required, *names)})

    names = st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)
    obj = names.flatmap(with_values).map(render)
    return st.sampled_from([obj, obj, obj, HOSTILE]).flatmap(lambda chosen: chosen)


REQUESTS = st.one_of(
    st.tuples(st.just("/v1/completions"),
              body({**SAMPLING_FIELDS, **COMPLETION_FIELDS}, ("prompt", "max_tokens"))),
    st.tuples(st.just("/v1/chat/completions"),
              body({**SAMPLING_FIELDS, **CHAT_FIELDS}, ("messages", "max_tokens"))))


def greedy_answer(url: str) -> str:
    reply = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def test_no_request_body_gets_a_5xx_or_breaks_the_server(tiny_server):
    url = tiny_server.url
    before = greedy_answer(url)

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(REQUESTS)
    def request_is_answered(request):
        path, raw = request
        reply = httpx.post(f"{url}{path}", content=raw, timeout=60,
                           headers={"content-type": "application/json"})
        assert reply.status_code < 500, reply.text
        if reply.status_code >= 400:
            assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
        elif not reply.headers["content-type"].startswith("text/event-stream"):
            assert reply.json()["choices"]

    request_is_answered()
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    assert greedy_answer(url) == before
