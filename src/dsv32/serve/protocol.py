"""The wire protocol of `dsv32 serve`: request models, OpenAI-shaped errors, and reading a request body.

Every refusal is an :class:`APIError`, which the app turns into `{"error": {"message", "type", "param",
"code"}}` with a status a client can act on. Bodies are read by hand (not by FastAPI's validation, which
answers 422) so that each bad body is a 400 in that shape, and so that the limits below hold before any
JSON is parsed: the size cap (413), a JSON `Content-Type` (415: this also keeps a browser's cross-origin
"simple" POST, which can only be `text/plain` or a form, away from the engine) and a nesting depth (400).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4
#: Default cap on a request body (bytes). A prompt that fills a 128K-token context is ~0.5 MB of text.
MAX_BODY_BYTES = 8 * 2**20
#: Deepest JSON nesting accepted; real requests (tool schemas included) stay far below it, and it keeps
#: every later recursive walk (pydantic, the chat renderer, json.dumps) far from Python's recursion limit.
MAX_JSON_DEPTH = 64
#: Request fields that are pure metadata: accepted and not used (OpenAI's stored-completion tags and
#: end-user ids, and its prompt-cache routing hint: this server's prefix cache needs no key). Any other
#: field a request model does not declare is refused with a 400 naming it, never silently ignored.
ACCEPTED_UNUSED = frozenset({"metadata", "store", "user", "safety_identifier", "prompt_cache_key"})


# --------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """Becomes `{"error": {"message", "type", "param", "code"}}` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ------------------------------------------------------------------------------------ request models


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class Thinking(_Body):
    type: Literal["enabled", "disabled"]


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class Message(_Body):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # anything else crashed the chat renderer (500)


class SamplingFields(_Body):
    """Fields shared by both generation endpoints."""

    model: str
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64: torch refuses seeds past 64 bits
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: StrictBool = False  # vLLM's extension: generate through EOS (benchmarks, tests)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    min_tokens: int | None = Field(None, ge=0)  # vLLM's extension: no stop token before this many
    repetition_penalty: float | None = Field(None, gt=0, le=10)  # vLLM's extension (CTRL's penalty)
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # vLLM's extension


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    thinking: Thinking | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (echo + logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class TokenizeRequest(_Body):
    """`POST /tokenize` for text (vLLM's shape)."""

    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = True


class TokenizeChatRequest(_Body):
    """`POST /tokenize` for a conversation, rendered as the chat endpoint renders it."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    thinking: Thinking | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False  # accepted for vLLM's shape: the chat format places BOS itself


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate ``body`` into ``model``; the first errors become one 400 naming the fields. A top-level field
    the model does not declare is a 400 naming it (unless it is pure metadata, :data:`ACCEPTED_UNUSED`):
    a parameter this server does not implement must not be silently ignored."""
    if isinstance(body, dict):
        unknown = sorted(k for k in body if k not in model.model_fields and k not in ACCEPTED_UNUSED)
        if unknown:
            names = ", ".join(repr(k[:64]) for k in unknown[:5])
            raise bad_request(
                f"unsupported parameter{'s' if len(unknown) > 1 else ''}: {names} "
                "(this server does not implement it; docs/serving.md lists every supported field)",
                param=unknown[0][:64],
                code="unsupported_parameter",
            )
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msgs = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5])
        raise bad_request(f"invalid request: {msgs}", param=loc or None) from None


# ---------------------------------------------------------------------------------------- request body


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"The request body is larger than this server's limit of {limit} bytes.", code="request_too_large"
    )


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), level by level: no recursion to exhaust."""
    depth, level = 0, [value]
    while True:
        containers = [x for x in level if isinstance(x, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [v for x in containers for v in (x.values() if isinstance(x, dict) else x)]


async def read_json_body(request: Request, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request's JSON object, or an APIError: 415 unless `Content-Type` is JSON, 413 past ``max_bytes``
    (checked on `Content-Length` first, then while the body streams in), 400 for invalid or too deeply
    nested JSON or a non-object."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(
            415,
            f"Content-Type must be application/json (got {ctype or 'none'!r}).",
            param="Content-Type",
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise bad_request(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    return body
