"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health,
metrics (docs/design.md, Processes: the parent).

A handler validates and tokenizes (chat template included), fans the request out into one
engine request per (prompt, choice), and answers with one JSON body or server-sent events
ending in `data: [DONE]`. A client that goes away cancels its handler, which aborts the
engine requests (frontend.py). No request can take the server down: the body and the prompt
are bounded before anything reads them whole, tokenizing runs in the app's one tokenizer thread
(never on the event loop), and every error, unexpected ones included, is the OpenAI error envelope.
"""
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from minicake.sampling import INT64_MIN
from minicake.conductor.live import RequestRejected, SLOUnreachable
from minicake.disagg.cluster import ClusterUnavailable
from minicake.serve.frontend import Frontend
from minicake.serve.metrics import ServerMetrics
from minicake.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request, request_schemas

log = logging.getLogger("minicake.serve")

MAX_BODY_BYTES = 8 * 2**20  # a longer request body is refused (413) before it is read whole
MAX_PROMPTS = 64  # prompts in one completions request (each then has n choices)


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nobody is left to answer."""


def create_app(cluster, served_model_name: str, metrics: ServerMetrics) -> FastAPI:
    """The app serves `cluster` under the model name `served_model_name`; the caller owns the
    cluster (and closes it after the server stops)."""
    frontend = Frontend(cluster, metrics)
    # One thread tokenizes every request, not asyncio's default pool: under concurrent clients
    # that pool grows to min(32, cores + 4) threads, glibc gives each new thread an arena of its
    # own, and each arena keeps the peak of the longest prompt tokenized in it. The server's RSS
    # grew 33 MB that way; with this one thread it stays flat (docs/results.md, Soak). One thread
    # tokenizes a 100 000-character prompt in about 30 ms.
    tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    async def in_tokenizer_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizer_thread, fn, *args)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        frontend.start()
        yield
        frontend.stop()
        tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="minicake", lifespan=lifespan)
    app.state.frontend = frontend
    add_request_schemas(app)
    max_chars = max_prompt_chars(cluster)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request, e):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # 404, 405 (its Allow header kept)
        return error_response(APIError(e.status_code, str(e.detail), headers=e.headers))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        # Starlette re-raises `e` after this answer: uvicorn logs its traceback, the client
        # never sees it
        return error_response(APIError(500, "internal server error", type="server_error"))

    @app.get("/health")
    async def health():
        """200 while requests can be served: status "ok", or "degraded" naming the dead
        instances; 503 (the error envelope, naming them) when not, or while shutting down."""
        refusal = frontend.refusal or cluster.unavailable_reason()
        if refusal is not None:
            raise APIError(503, refusal, type="server_error", code="unavailable")
        return cluster.health()

    @app.get("/v1/models")
    async def models():
        card = {"id": served_model_name, "object": "model", "created": 0, "owned_by": "minicake",
                "max_model_len": cluster.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", openapi_extra=json_request_body(CompletionRequest))
    async def completions(request: Request):
        req = parse_request(CompletionRequest, await read_body(request))
        check_model(req.model, served_model_name)
        prompts = await in_tokenizer_thread(tokenize_prompt, req.prompt, cluster, max_chars)
        limits = [req.max_tokens if req.max_tokens is not None else
                  max(1, cluster.max_model_len - len(p)) for p in prompts]
        return await respond(request, frontend, req, prompts, limits, "max_tokens", "prompt",
                             served_model_name)

    @app.post("/v1/chat/completions", openapi_extra=json_request_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        req = parse_request(ChatCompletionRequest, await read_body(request))
        check_model(req.model, served_model_name)
        prompt = await in_tokenizer_thread(apply_chat_template, req, cluster, max_chars)
        limit_param, limit = next(
            ((name, getattr(req, name)) for name in ("max_completion_tokens", "max_tokens")
             if getattr(req, name) is not None),
            ("max_tokens", max(1, cluster.max_model_len - len(prompt))))
        return await respond(request, frontend, req, [prompt], [limit], limit_param, "messages",
                             served_model_name)

    return app


def error_response(e: APIError) -> Response:
    # ASCII JSON: a message may quote input that is not valid Unicode (a lone surrogate)
    return Response(json.dumps(e.body()), e.status, e.headers, media_type="application/json")


def add_request_schemas(app: FastAPI) -> None:
    """The handlers parse their own bodies (every bad field is a 400 naming it, not FastAPI's
    422), so FastAPI does not see the request models: /openapi.json gets their schemas here,
    which each POST route's requestBody refers to (json_request_body)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            components = FastAPI.openapi(app).setdefault("components", {})
            components.setdefault("schemas", {}).update(request_schemas())
        return app.openapi_schema
    app.openapi = openapi


def json_request_body(model) -> dict:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def max_prompt_chars(cluster) -> int:
    """No token stands for more characters than the longest token's text (+1: a decoder may
    drop a token's leading space), so a prompt longer than this never fits in max_model_len
    tokens: it is refused before it is tokenized."""
    tok = cluster.tokenizer
    longest = max(len(tok.decode([i], skip_special_tokens=False)) for i in range(tok.vocab_size))
    return cluster.max_model_len * (longest + 1)


async def read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it is known to exceed MAX_BODY_BYTES: from its
    Content-Length, or while it streams in (a chunked body has none)."""
    too_large = APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise too_large
    except ClientDisconnect:
        raise ClientDisconnected() from None
    return bytes(body)


def check_model(model: str | None, served_model_name: str) -> None:
    if model is not None and model != served_model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves "
                       f"'{served_model_name}'", "model", code="model_not_found")


def tokenize_prompt(prompt, cluster, max_chars: int) -> list[list[int]]:
    """A completions prompt is a string, a list of strings, token ids, or lists of them.
    Runs in the tokenizer thread, as every step that walks a whole prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"prompt is a list of {len(prompt)} prompts; at most {MAX_PROMPTS} "
                       "are taken per request", "prompt")
    for p in prompt:
        if isinstance(p, str):
            check_chars(len(p), max_chars, "prompt")
    prompts = [cluster.tokenizer.encode(p) if isinstance(p, str) else p for p in prompt]
    vocab_size = cluster.model_config.vocab_size
    for ids in prompts:
        check_tokens(ids, cluster, "prompt")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is outside the vocabulary "
                           f"[0, {vocab_size})", "prompt")
    return prompts


def apply_chat_template(req: ChatCompletionRequest, cluster, max_chars: int) -> list[int]:
    """Runs in the tokenizer thread, as tokenize_prompt."""
    tokenizer = cluster.tokenizer
    if not tokenizer.has_chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions with a "
                       "plain prompt", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    check_chars(sum(len(m["content"]) for m in messages), max_chars, "messages")
    _, ids = tokenizer.encode_chat(messages)
    check_tokens(ids, cluster, "messages")
    return ids


def check_chars(num_chars: int, max_chars: int, param: str) -> None:
    if num_chars > max_chars:
        raise APIError(400, f"the prompt has {num_chars} characters; no prompt of more than "
                       f"{max_chars} fits in this server's max_model_len", param)


def check_tokens(ids: list[int], cluster, param: str) -> None:
    """check_request refuses it too, but on the event loop, after walking every token id:
    millions of ids are refused here first, in the tokenizer thread."""
    if len(ids) >= cluster.max_model_len:
        raise APIError(400, f"the prompt has {len(ids)} tokens but max_model_len is "
                       f"{cluster.max_model_len} (at least one token must be left to "
                       "generate)", param)


@dataclasses.dataclass
class Reply:
    """What the response builders need to know about the request being answered."""
    head: dict  # id, created, model
    chat: bool
    n: int  # choices per prompt; choice k answers prompt k // n
    num_choices: int
    include_usage: bool

    def usage(self, prompt_tokens: list[int], cached: list[int], tokens: list[int]) -> dict:
        # the n choices of one prompt share it: count it once, as OpenAI does
        prompt, cached = sum(prompt_tokens[::self.n]), sum(cached[::self.n])
        return {"prompt_tokens": prompt, "completion_tokens": sum(tokens),
                "total_tokens": prompt + sum(tokens), "prompt_tokens_details": {"cached_tokens": cached}}

    def choice(self, index: int, text: str, finish_reason, stream: bool) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        key, message = ("delta", {"content": text}) if stream else (
            "message", {"role": "assistant", "content": text})
        return {"index": index, key: message, "logprobs": None, "finish_reason": finish_reason}


async def respond(request, frontend, req, prompts, max_tokens, max_tokens_param, prompt_param,
                  model):
    # choice j of a prompt gets seed + j (wrapped within int64), so that n seeded choices differ
    params = []
    for limit in max_tokens:
        base = req.sampling_params(limit, max_tokens_param)
        params += [dataclasses.replace(base, seed=None if base.seed is None else
                                       (base.seed + j - INT64_MIN) % 2**64 + INT64_MIN)
                   for j in range(req.n)]
    prompts = [p for p in prompts for _ in range(req.n)]
    chat = isinstance(req, ChatCompletionRequest)
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    reply = Reply({"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                   "created": int(time.time()), "model": model}, chat, req.n, len(prompts),
                  include_usage)
    outputs = frontend.generate(prompts, params)
    try:  # add_request runs before the first output: bad input and rejections surface here
        first = await cancel_on_disconnect(request, anext(outputs))
    except SLOUnreachable as e:  # 400, not 429: no wait helps, and clients retry a 429 by themselves
        frontend.metrics.rejected.inc()
        raise APIError(400, str(e), prompt_param, code="slo_unreachable")
    except ValueError as e:  # check_request: top_k is the one field it checks beyond the prompt
        raise APIError(400, str(e), "top_k" if "top_k=" in str(e) else prompt_param)
    except RequestRejected as e:
        frontend.metrics.rejected.inc()
        raise APIError(429, str(e), type="rate_limit_error", code="rejected",
                       headers={"Retry-After": str(math.ceil(e.retry_after_s))})
    except ClusterUnavailable as e:
        raise APIError(503, str(e), type="server_error", code="unavailable")
    if first[1].error:  # failed before its first token: an error envelope, not a stream
        await outputs.aclose()  # aborts the request's other choices
        unavailable = frontend.refusal or frontend.cluster.unavailable_reason()
        raise APIError(503 if unavailable else 500, f"the request failed: {first[1].error}",
                       type="server_error", code="unavailable" if unavailable else None)
    if req.stream:  # from here on Starlette cancels the stream when the client leaves
        return StreamingResponse(sse(reply, first, outputs), media_type="text/event-stream")
    return JSONResponse(await cancel_on_disconnect(request, collect(reply, first, outputs)))


async def cancel_on_disconnect(request: Request, awaitable):
    """Await `awaitable` unless the client disconnects first; then cancel it (which aborts
    its engine requests) and raise ClientDisconnected."""
    task = asyncio.ensure_future(awaitable)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it run its cleanup: the abort
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


def raise_if_failed(out) -> None:
    if out.error:  # its first line says what failed; a traceback below it stays in the log
        log.error("request %s failed: %s", out.request_id, out.error)
        raise APIError(500, f"the request failed in the engine: {out.error.splitlines()[0]}",
                       type="server_error")


async def prepend(first, outputs):
    yield first
    async for item in outputs:
        yield item


async def collect(reply: Reply, first, outputs) -> dict:
    k = reply.num_choices
    texts, tokens, finish = [[] for _ in range(k)], [0] * k, [None] * k
    prompt_tokens, cached = [0] * k, [0] * k
    async with contextlib.aclosing(outputs):
        async for i, out in prepend(first, outputs):
            raise_if_failed(out)
            texts[i].append(out.new_text)
            tokens[i] += len(out.new_token_ids)
            if out.finished:
                finish[i], prompt_tokens[i], cached[i] = (
                    out.finish_reason, out.num_prompt_tokens, out.num_cached_tokens)
    choices = [reply.choice(i, "".join(texts[i]), finish[i], False) for i in range(k)]
    return {**reply.head, "object": "chat.completion" if reply.chat else "text_completion",
            "choices": choices, "usage": reply.usage(prompt_tokens, cached, tokens)}


async def sse(reply: Reply, first, outputs):
    """Server-sent events as OpenAI streams them; an error mid-stream becomes one error event,
    and the stream still ends with `data: [DONE]`."""
    obj = {**reply.head, "object": "chat.completion.chunk" if reply.chat else "text_completion"}
    extra = {"usage": None} if reply.include_usage else {}
    k = reply.num_choices
    tokens, prompt_tokens, cached = [0] * k, [0] * k, [0] * k

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    try:
        async with contextlib.aclosing(outputs):
            if reply.chat:  # OpenAI's first chat chunk of a choice carries the role
                for i in range(k):
                    delta = {"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}
                    yield event({**obj, "choices": [delta], **extra})
            async for i, out in prepend(first, outputs):
                raise_if_failed(out)
                tokens[i] += len(out.new_token_ids)
                if out.finished:
                    prompt_tokens[i], cached[i] = out.num_prompt_tokens, out.num_cached_tokens
                if out.new_token_ids or out.finished:  # one chunk per token, text or not
                    reason = out.finish_reason if out.finished else None
                    yield event({**obj, "choices": [reply.choice(i, out.new_text, reason, True)],
                                 **extra})
        if reply.include_usage:
            yield event({**obj, "choices": [], "usage": reply.usage(prompt_tokens, cached, tokens)})
    except APIError as e:
        yield event(e.body())
    except Exception:  # noqa: BLE001 - the client must hear about it before [DONE]
        log.exception("a stream failed")
        yield event(APIError(500, "internal server error", type="server_error").body())
    yield "data: [DONE]\n\n"
