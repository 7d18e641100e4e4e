"""The OpenAI wire format of the server: request models, their validation, the error envelope.

Requests are parsed here (not by FastAPI) so that every bad input becomes an OpenAI error
`{"error": {"message", "type", "param", "code"}}` with HTTP 400 and the parameter named.
The sampling fields map onto `SamplingParams`, which range-checks them again for the offline
API (docs/serving.md, Limits and hostile input); the models' JSON schemas document the request
in /openapi.json.
"""
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

from minicake.sampling import INT64_MAX, INT64_MIN, SamplingParams


class APIError(Exception):
    """An error the client caused or must see, rendered as the OpenAI error envelope."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


# Parameters minicake does not implement, accepted only at their neutral value so that
# clients which always send defaults keep working; anything else is refused by name.
# `user` (an end-user id for abuse tracking) is accepted with any value and ignored.
NEUTRAL_VALUES = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
                  "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                  "best_of": (None, 1), "logit_bias": (None, {}), "suffix": (None, ""),
                  "user": None}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)  # extension, as in vLLM
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # int64, as OpenAI documents it
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension, as in vLLM

    def sampling_params(self, max_tokens: int, max_tokens_param: str) -> SamplingParams:
        """One SamplingParams per choice is built from this; a ValueError from its own
        validation names the parameter, which becomes the error's `param`."""
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                 "seed": self.seed, "max_tokens": max_tokens, "ignore_eos": self.ignore_eos,
                 "stop": [self.stop] if isinstance(self.stop, str) else self.stop}
        try:
            return SamplingParams(**{k: v for k, v in given.items() if v is not None})
        except ValueError as e:
            param = next((name for name in given if str(e).startswith(f"SamplingParams.{name} ")),
                         None)
            raise APIError(400, str(e), max_tokens_param if param == "max_tokens" else param)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)  # OpenAI's default for completions


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # max_tokens is deprecated by OpenAI, still sent by many clients
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)


# A lone surrogate reaches a str only through a JSON escape of one: "\ud800" ... "\udfff"
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_request(model: type[BaseModel], raw: bytes) -> BaseModel:
    """Parse and validate a JSON body into `model`, raising APIError(400) naming the first bad
    field."""
    try:
        text = raw.decode("utf-8-sig")  # JSON over HTTP is UTF-8: no raw surrogate gets past it
        body = json.loads(text)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to parse") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if SURROGATE_ESCAPE.search(text):  # rare (an escaped pair is fine): only then look closer
        for name, value in body.items():
            check_encodable(name, value)
    for name, neutral in NEUTRAL_VALUES.items():
        if name in body and (neutral is None or body[name] in neutral):
            body = {k: v for k, v in body.items() if k != name}
        elif name in body:
            raise APIError(400, f"minicake does not support '{name}'", name)
    if body.get("stream_options") is not None and not body.get("stream"):
        raise APIError(400, "stream_options is only allowed when stream is true",
                       "stream_options")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # union members appear in loc as type tags ("str", "list[int]"): not parameter names
        param = ".".join(str(p) for p in err["loc"] if p not in ("str", "int") and "[" not in str(p))
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param)
        raise APIError(400, f"{param}: {err['msg']}", param)


def check_encodable(name: str, value) -> None:
    """Refuse a field that JSON can carry but the tokenizer cannot take: a lone surrogate (an
    escape like "\\ud800", half of a UTF-16 pair, which no UTF-8 text holds), or nesting deeper
    than Python's recursion limit."""
    try:
        json.dumps([name, value], ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise APIError(400, f"{name!a} is not valid Unicode: it holds a lone surrogate (half of a "
                       "UTF-16 pair)", name) from None
    except RecursionError:
        raise APIError(400, f"{name!a} is nested too deeply", name) from None


def request_schemas() -> dict:
    """JSON schemas of the request bodies (and the models they use), for /openapi.json's
    components: FastAPI documents only the bodies it parses itself."""
    models = [(m, "validation") for m in (CompletionRequest, ChatCompletionRequest)]
    _, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}")
    return schemas["$defs"]
