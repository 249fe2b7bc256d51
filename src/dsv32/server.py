"""`dsv32 serve`: an OpenAI-compatible HTTP API (plus DeepSeek's extensions) and a chat page, over the engine.

The engine works on token ids only; this module owns everything textual: chat encoding (`dsv32.chat`),
incremental detokenisation, stop strings, splitting a V3.2 completion into `reasoning_content`, `content`
and `tool_calls` while it streams, and OpenAI-shaped errors. Every refusal is a JSON error with the
status a client can act on (400 bad input, 401 key, 404 model, 429 busy + Retry-After, 503 draining);
a stream whose client goes away cancels its request, which frees the slot at the engine's next step.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `GET /health`, `GET /`.
Build the app in-process with :func:`create_app`; :func:`cli_main` is `dsv32 serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv32 import chat
from dsv32.engine import (
    FINISH_STOP,
    Engine,
    EngineClosed,
    EngineOverloaded,
    Output,
    RequestHandle,
    RequestTooLarge,
    SamplingParams,
)

log = logging.getLogger("dsv32.server")
WEB_DIR = Path(__file__).resolve().parent / "web"
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4
_FAMILY_ALIASES = {"dsv32": "deepseek-v3.2", "llama": "chatml"}


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

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
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


class _Sampling(_Body):
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
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # accepted, not applied (as in thinking mode)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    thinking: Thinking | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msgs = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()[:5])
        raise _bad(f"invalid request: {msgs}", param=loc or None) from None


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


# ------------------------------------------------------------------------------------ text streaming


class _Detokenizer:
    """Incremental decoding that emits only complete characters. Decodes a short window (the previous
    piece as context + the new ids) instead of the whole text, so each token costs O(1), and tokenizers
    that drop a leading space at the start of a decode still get it right."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        new = self.tok.decode(self.ids[self.prefix :])
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new[len(prev) :]
        return ""

    def flush(self) -> str:
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        new = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return new[len(prev) :] if len(new) > len(prev) else ""


def _held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into one of ``markers``."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class _Choice:
    """One sequence's text as it streams: decoded text (after any forced prefix), stop strings, counts,
    and the OpenAI logprob entries."""

    def __init__(
        self,
        index: int,
        tokenizer: Any,
        *,
        stops: Sequence[str],
        stop_ids: set[int],
        forced: str = "",
        thinking: bool = False,
        want_logprobs: bool = False,
    ) -> None:
        self.index = index
        self.tok = tokenizer
        self.detok = _Detokenizer(tokenizer)
        self.stops = [s for s in stops if s]
        self.stop_ids = stop_ids
        self.forced = forced
        self.text = forced
        self.finish: str | None = None
        self.tokens = 0
        self.reasoning_tokens = 0
        self._thinking_now = thinking
        self.want_logprobs = want_logprobs
        self.logprobs: list[dict[str, Any]] = []
        self.token_outputs: list[Output] = []

    def feed(self, out: Output) -> tuple[bool, list[Output]]:
        """Take one engine event; returns (this choice finished now, new token events with visible text)."""
        if self.finish is not None:
            return False, []
        new: list[Output] = []
        if out.token is not None:
            self.tokens += 1
            if self._thinking_now:
                self.reasoning_tokens += 1
                if out.token == getattr(self.tok, "end_think_id", None):
                    self._thinking_now = False
            if out.token not in self.stop_ids or out.finish_reason != FINISH_STOP:
                before = len(self.text)
                self.text += self.detok.add(out.token)
                new.append(out)
                self.token_outputs.append(out)
                if self._check_stops(before):
                    return True, new
        if out.finish_reason is not None:
            self.text += self.detok.flush()
            self._check_stops(len(self.forced))
            if self.finish is None:
                self.finish = out.finish_reason
            return True, new
        return False, new

    def _check_stops(self, before: int) -> bool:
        if not self.stops:
            return False
        start = max(len(self.forced), before - max(len(s) for s in self.stops) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.finish = FINISH_STOP
        return True

    def visible(self) -> str:
        """Text that can be shown now: everything once finished, else minus a possible stop-string start."""
        if self.finish is not None:
            return self.text
        return self.text[: len(self.text) - _held_suffix(self.text, self.stops)]

    def token_str(self, t: int) -> str:
        return self.tok.decode([t])


class _ChatView:
    """Splits a V3.2 completion into reasoning / content / tool calls while it grows, holding back any
    text that might be the start of `</think>` or a DSML function-calls block."""

    CALLS = (chat.CALLS_OPEN, "\n\n" + chat.CALLS_OPEN)

    def __init__(self, *, thinking: bool, family: str) -> None:
        self.thinking, self.family = thinking, family
        self.sent_reasoning = self.sent_content = 0

    def split(self, text: str, final: bool) -> tuple[str, str]:
        if self.family == "chatml":
            body = text.removesuffix(chat.IM_END)
            return "", body if final else body[: len(body) - _held_suffix(body, (chat.IM_END,))]
        reasoning, body = "", text
        if self.thinking:
            reasoning, sep, body = text.removeprefix(chat.THINK).partition(chat.END_THINK)
            if not sep:
                body = ""
                if not final:
                    reasoning = reasoning[: len(reasoning) - _held_suffix(reasoning, (chat.END_THINK,))]
        k = body.find(chat.CALLS_OPEN)
        if k >= 0:
            body = body[:k].removesuffix("\n\n")
        elif not final:
            body = body[: len(body) - _held_suffix(body, self.CALLS)]
        return reasoning, body

    def deltas(self, text: str, final: bool = False) -> tuple[str, str]:
        reasoning, content = self.split(text, final)
        dr, dc = reasoning[self.sent_reasoning :], content[self.sent_content :]
        self.sent_reasoning, self.sent_content = (
            max(self.sent_reasoning, len(reasoning)),
            max(self.sent_content, len(content)),
        )
        return dr, dc

    def message(self, text: str) -> dict[str, Any]:
        """The final assistant message; text that does not parse is returned as content."""
        try:
            msg = chat.parse_completion(text, thinking=self.thinking, family=self.family)
        except chat.ChatFormatError as e:  # e.g. a malformed tool call: keep the raw text as content
            log.info("completion did not parse (%s); returning it as content", e)
            reasoning, content = None, text
            if self.thinking:
                reasoning, _, content = text.removeprefix(chat.THINK).partition(chat.END_THINK)
            msg = {"content": content.removesuffix(chat.EOS), "reasoning_content": reasoning, "tool_calls": []}
        return msg


# ------------------------------------------------------------------------------------------ app state


class _State:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        model_name: str,
        family: str,
        api_key: str | None,
        default_max_tokens: int | None,
    ) -> None:
        self.engine, self.tok, self.model_name, self.family = engine, tokenizer, model_name, family
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        im_end = tokenizer.token_to_id(chat.IM_END) if family == "chatml" else None
        self.stop_ids = {int(t) for t in [*eos, im_end] if t is not None}
        self.vocab = int(getattr(tokenizer, "vocab_size", 0) or 0)

    # -------------------------------------------------------------- checks shared by endpoints
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(
                401,
                "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                param="model",
                code="model_not_found",
            )

    def budget(self, prompt_len: int, asked: int | None) -> int:
        ctx = self.engine.max_len
        if prompt_len >= ctx:
            raise _bad(
                f"This model's maximum context length is {ctx} tokens. However, your prompt has {prompt_len} "
                "tokens (and at least one token must be generated). Please shorten it.",
                param="messages",
                code="context_length_exceeded",
            )
        room = ctx - prompt_len
        if asked is not None and asked > room:
            raise _bad(
                f"This model's maximum context length is {ctx} tokens. However, you requested {prompt_len + asked} "
                f"tokens ({prompt_len} in the prompt, {asked} for the completion). Please reduce the length.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if asked is None:
            return room if self.default_max_tokens is None else min(room, self.default_max_tokens)
        return asked

    def stops(self, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS:
            raise _bad(f"at most {MAX_STOPS} stop sequences are allowed", param="stop")
        if any(not s for s in stops):
            raise _bad("stop sequences must be non-empty strings", param="stop")
        return stops

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestHandle:
        try:
            return self.engine.submit(prompt, params)
        except EngineOverloaded as e:
            raise APIError(
                429,
                f"The server is busy ({e}); retry after {e.retry_after:.0f} s.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(int(e.retry_after))},
            ) from None
        except EngineClosed:
            raise APIError(503, "The server is shutting down.", type="server_error", code="unavailable") from None
        except RequestTooLarge as e:
            raise _bad(str(e), code="context_length_exceeded") from None

    def logprob_entry(self, out: Output) -> dict[str, Any]:
        def item(t: int, lp: float) -> dict[str, Any]:
            s = self.tok.decode([t])
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        entry = item(out.token, out.model_logprob if out.model_logprob is not None else out.logprob)  # type: ignore[arg-type]
        entry["top_logprobs"] = [item(t, lp) for t, lp in (out.top_logprobs or [])]
        return entry


def _usage(handles: Sequence[RequestHandle], choices: Sequence[_Choice]) -> dict[str, Any]:
    prompt = sum(h.prompt_len for h in handles)
    cached = sum(h.cached_tokens for h in handles)
    completion = sum(c.tokens for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": sum(c.reasoning_tokens for c in choices)},
        "prompt_cache_hit_tokens": cached,  # DeepSeek's names
        "prompt_cache_miss_tokens": prompt - cached,
    }


class _EngineStream(StreamingResponse):
    """A streaming response that cancels its engine requests however it ends (finished, client gone,
    server shutting down): the generator's own ``finally`` is not guaranteed to run promptly."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _cancel_all(handles: Sequence[RequestHandle]) -> Callable[[], None]:
    def close() -> None:
        for h in handles:
            if not h.done:
                h.cancel()

    return close


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _until_done(request: Request, handles: Sequence[RequestHandle], work: Awaitable[Any]) -> Any:
    """Await ``work`` but give up (cancelling the requests) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client closed the request", code="client_closed")
    finally:
        _cancel_all(handles)()


# ------------------------------------------------------------------------------------------ endpoints


def _chat_prompt(st: _State, req: ChatRequest) -> tuple[list[int], str, bool]:
    """-> (prompt ids, forced completion prefix, thinking)."""
    thinking = req.thinking is not None and req.thinking.type == "enabled"
    if thinking and st.family == "chatml":
        raise _bad("this model has no thinking mode", param="thinking")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    forced = ""
    if choice is not None and choice != "none" and not tools:
        raise _bad("tool_choice needs tools", param="tool_choice")
    if choice == "none":
        tools = None
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if choice.get("type") == "function" and isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools or []}:
            raise _bad("tool_choice must name one of the given tools", param="tool_choice")
        tools = [t for t in tools or [] if t["function"]["name"] == name]
        if not thinking:  # force the call by writing its opening ourselves (not possible before reasoning)
            forced = f'\n\n{chat.CALLS_OPEN}\n<{chat.DSML}invoke name="{name}">\n'
    elif choice == "required" and not thinking:
        forced = f'\n\n{chat.CALLS_OPEN}\n<{chat.DSML}invoke name="'
    rf = req.response_format
    schema = None
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise _bad("response_format.json_schema.schema must be a JSON Schema object", "response_format")
        elif kind != "text":
            raise _bad("response_format.type must be 'text', 'json_object' or 'json_schema'", "response_format")
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    kw: dict[str, Any] = {"response_format": schema} if schema is not None else {}
    try:
        ids, _ = chat.encode_chat(messages, tools=tools, thinking=thinking, family=st.family, tokenizer=st.tok, **kw)
    except chat.ChatFormatError as e:
        raise _bad(f"messages: {e}", param="messages") from None
    if forced:
        ids = ids + st.tok.encode(forced)
    return ids, forced, thinking


def _params(st: _State, req: _Sampling, max_tokens: int, *, thinking: bool, logprobs: bool, top: int) -> SamplingParams:
    extra = [int(t) for t in req.stop_token_ids or []]
    if thinking:  # DeepSeek: temperature / top_p are ignored in thinking mode
        temperature, top_p, top_k = 1.0, 1.0, 0
    else:
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p, top_k = req.top_p or 1.0, req.top_k or 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=req.seed,
        n=req.n,
        stop_token_ids=tuple(sorted((set() if req.ignore_eos else st.stop_ids) | set(extra))),
        logprobs=logprobs,
        top_logprobs=top,
    )


async def _chat(st: _State, request: Request) -> Response:
    st.check_auth(request)
    body = await _json_body(request)
    req: ChatRequest = _parse(ChatRequest, body)
    st.check_model(req.model)
    if req.n > st.engine.max_slots:
        raise _bad(f"n={req.n} exceeds this server's {st.engine.max_slots} concurrent sequences", param="n")
    if req.top_logprobs and not req.logprobs:
        raise _bad("top_logprobs needs logprobs=true", param="top_logprobs")
    stops = st.stops(req.stop)
    ids, forced, thinking = _chat_prompt(st, req)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = st.budget(len(ids), asked)
    params = _params(st, req, max_tokens, thinking=thinking, logprobs=req.logprobs, top=req.top_logprobs or 0)
    handle = st.submit(ids, params)
    choices = [
        _Choice(
            i,
            st.tok,
            stops=stops,
            stop_ids=set(params.stop_token_ids),
            forced=forced,
            thinking=thinking,
            want_logprobs=req.logprobs,
        )
        for i in range(req.n)
    ]
    views = [_ChatView(thinking=thinking, family=st.family) for _ in choices]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": st.model_name, "system_fingerprint": None}

    def final_message(c: _Choice, v: _ChatView) -> tuple[dict[str, Any], str]:
        msg = v.message(c.text)
        for call in msg["tool_calls"]:  # unique ids: clients match results to calls across turns by id
            call["id"] = f"call_{uuid.uuid4().hex[:24]}"
        reason = c.finish or "stop"
        if msg["tool_calls"] and reason == FINISH_STOP:
            reason = "tool_calls"
        return msg, reason

    if not req.stream:

        async def collect() -> None:
            async for out in handle:
                c = choices[out.seq]
                done, _ = c.feed(out)
                if done and out.finish_reason is None:
                    handle.cancel(out.seq)  # a stop string ended it

        await _until_done(request, [handle], collect())
        if handle.error:
            raise APIError(500, f"generation failed: {handle.error}", type="server_error")
        result = []
        for c, v in zip(choices, views):
            msg, reason = final_message(c, v)
            message: dict[str, Any] = {"role": "assistant", "content": msg["content"]}
            if thinking:
                message["reasoning_content"] = msg["reasoning_content"]
            if msg["tool_calls"]:
                message["tool_calls"] = msg["tool_calls"]
                message["content"] = msg["content"] or None
            lp = None
            if req.logprobs:
                lp = {"content": [st.logprob_entry(o) for o in c.token_outputs], "refusal": None}
            result.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": reason})
        return JSONResponse(
            {**head, "object": "chat.completion", "choices": result, "usage": _usage([handle], choices)}
        )

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> str:
        ch = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return _sse({**head, "object": "chat.completion.chunk", "choices": [ch]})

    async def events() -> AsyncIterator[str]:
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for out in handle:
            c, v = choices[out.seq], views[out.seq]
            was_done = c.finish is not None
            done, new = c.feed(out)
            if was_done:
                continue
            if done and out.finish_reason is None:
                handle.cancel(out.seq)
            lp = {"content": [st.logprob_entry(o) for o in new], "refusal": None} if req.logprobs and new else None
            if not done:
                dr, dc = v.deltas(c.visible())
                delta = {k: s for k, s in (("reasoning_content", dr), ("content", dc)) if s}
                if delta or lp:
                    yield chunk(c.index, delta, lp=lp)
                continue
            msg, reason = final_message(c, v)
            delta: dict[str, Any] = {}
            rest = (msg["reasoning_content"] or "")[v.sent_reasoning :]
            if rest:
                delta["reasoning_content"] = rest
            rest = (msg["content"] or "")[v.sent_content :]
            if rest:
                delta["content"] = rest
            if msg["tool_calls"]:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(msg["tool_calls"])]
            yield chunk(c.index, delta, finish=reason, lp=lp)
        if include_usage:
            yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage([handle], choices)})
        yield "data: [DONE]\n\n"

    return _EngineStream(events(), _cancel_all([handle]))


def _completion_prompts(st: _State, prompt: Any) -> list[tuple[list[int], str]]:
    """OpenAI's four prompt shapes -> [(ids, text)]."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise _bad("prompt must not be empty", param="prompt")
    out = []
    for p in items:
        if isinstance(p, str):
            ids = st.tok.encode(p)
            if st.family == "deepseek-v3.2" and st.tok.bos_id is not None and (not ids or ids[0] != st.tok.bos_id):
                ids = [st.tok.bos_id, *ids]
            out.append((ids, p))
        else:
            if not p or any(not (0 <= t < (st.vocab or 2**31)) for t in p):
                raise _bad("token prompts must be non-empty lists of valid token ids", param="prompt")
            out.append((list(p), st.tok.decode(p)))
    return out


async def _completions(st: _State, request: Request) -> Response:
    st.check_auth(request)
    body = await _json_body(request)
    req: CompletionRequest = _parse(CompletionRequest, body)
    st.check_model(req.model)
    if req.suffix:
        raise _bad("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise _bad("best_of is not supported (use n)", param="best_of")
    if req.echo and req.logprobs is not None:
        raise _bad("echo with logprobs is not supported", param="echo")
    stops = st.stops(req.stop)
    prompts = _completion_prompts(st, req.prompt)
    if req.n * len(prompts) > st.engine.max_slots * 4 or req.n > st.engine.max_slots:
        raise _bad("too many sequences requested at once", param="n")
    max_tokens = [st.budget(len(ids), 16 if req.max_tokens is None else req.max_tokens) for ids, _ in prompts]
    want_lp = req.logprobs is not None
    handles: list[RequestHandle] = []
    stop_ids: set[int] = set()
    try:
        for (ids, _), mt in zip(prompts, max_tokens):
            params = _params(st, req, mt, thinking=False, logprobs=want_lp, top=req.logprobs or 0)
            stop_ids = set(params.stop_token_ids)
            handles.append(st.submit(ids, params))
    except APIError:
        _cancel_all(handles)()
        raise
    groups = [
        [_Choice(pi * req.n + i, st.tok, stops=stops, stop_ids=stop_ids, want_logprobs=want_lp) for i in range(req.n)]
        for pi in range(len(prompts))
    ]
    echo = [text if req.echo else "" for _, text in prompts]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": st.model_name}

    def lp_block(c: _Choice, outs: Sequence[Output], offset: int) -> dict[str, Any]:
        toks, lps, tops, offs = [], [], [], []
        for o in outs:
            s = st.tok.decode([o.token])
            toks.append(s)
            lps.append(o.model_logprob)
            tops.append({st.tok.decode([t]): lp for t, lp in (o.top_logprobs or [])})
            offs.append(offset)
            offset += len(s)
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    if not req.stream:

        async def collect() -> None:
            for h, group in zip(handles, groups):
                async for out in h:
                    done, _ = group[out.seq].feed(out)
                    if done and out.finish_reason is None:
                        h.cancel(out.seq)

        await _until_done(request, handles, collect())
        if any(h.error for h in handles):
            raise APIError(500, f"generation failed: {next(h.error for h in handles if h.error)}", type="server_error")
        result = []
        for pi, group in enumerate(groups):
            for c in group:
                lp = lp_block(c, c.token_outputs, len(echo[pi])) if want_lp else None
                result.append(
                    {"index": c.index, "text": echo[pi] + c.text, "logprobs": lp, "finish_reason": c.finish or "stop"}
                )
        allc = [c for g in groups for c in g]
        return JSONResponse({**head, "choices": result, "usage": _usage(handles, allc)})

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        for pi, (h, group) in enumerate(zip(handles, groups)):
            sent = [0] * len(group)
            if echo[pi]:
                for c in group:
                    yield _sse(
                        {
                            **head,
                            "choices": [{"index": c.index, "text": echo[pi], "logprobs": None, "finish_reason": None}],
                        }
                    )
            async for out in h:
                c = group[out.seq]
                was_done = c.finish is not None
                done, new = c.feed(out)
                if was_done:
                    continue
                if done and out.finish_reason is None:
                    h.cancel(out.seq)
                vis = c.visible()
                piece = vis[sent[out.seq] :]
                lp = lp_block(c, new, len(echo[pi]) + sent[out.seq]) if want_lp and new else None
                sent[out.seq] = max(sent[out.seq], len(vis))
                if piece or lp or done:
                    ch = {"index": c.index, "text": piece, "logprobs": lp, "finish_reason": c.finish if done else None}
                    yield _sse({**head, "choices": [ch]})
        if include_usage:
            allc = [c for g in groups for c in g]
            yield _sse({**head, "choices": [], "usage": _usage(handles, allc)})
        yield "data: [DONE]\n\n"

    return _EngineStream(events(), _cancel_all(handles))


# ------------------------------------------------------------------------------------------------ app


def create_app(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    family: str = "deepseek-v3.2",
    api_key: str | None = None,
    engine: Engine | None = None,
    default_max_tokens: int | None = None,
    web: bool = True,
    **engine_kwargs: Any,
) -> FastAPI:
    """The FastAPI app. Starts an :class:`Engine` over ``model`` (or uses ``engine``); ``engine_kwargs``
    go to it (max_slots, max_len, memory_budget, max_waiting, ...). The engine stops with the app's
    lifespan, or call ``app.state.engine.shutdown()`` when the app runs without one (ASGI test clients).
    """
    family = _FAMILY_ALIASES.get(family.lower(), family.lower())
    if family not in chat.FAMILIES:
        raise ValueError(f"unknown chat format {family!r}; choose one of {', '.join(chat.FAMILIES)}")
    engine = engine or Engine(model, **engine_kwargs)
    st = _State(engine, tokenizer, model_name, family, api_key, default_max_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.shutdown, 0.0)

    app = FastAPI(title="dsv32", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.dsv32 = st

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = not engine.closed
        body = {"status": "ok" if ok else "draining", "model": model_name, **engine.load(), **engine.capacity}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        st.check_auth(request)
        return JSONResponse({"object": "list", "data": [_model_card(st)]})

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str, request: Request) -> JSONResponse:
        st.check_auth(request)
        st.check_model(name)
        return JSONResponse(_model_card(st))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _chat(st, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completions(st, request)

    if web and (WEB_DIR / "index.html").is_file():
        csp = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": csp})

        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app


def _model_card(st: _State) -> dict[str, Any]:
    return {
        "id": st.model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "dsv32",
        "max_model_len": st.engine.max_len,
        "chat_format": st.family,
    }


# ------------------------------------------------------------------------------------------- running


def serve(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout: float = 10.0,
    log_level: str = "info",
    ready: Callable[[str], None] | None = None,
) -> int:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM. On the signal, uvicorn stops accepting connections
    and the engine gets ``drain_timeout`` seconds to finish in-flight requests before it cancels the rest
    (their streams end with finish_reason "abort"), so the process exits cleanly and promptly."""
    import uvicorn

    engine: Engine = app.state.engine
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound = sock.getsockname()[1]

    class _Server(uvicorn.Server):
        _drainer: threading.Thread | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn's own handler also re-raises the signal after shutdown (exit status -15); a drained
            # server has shut down cleanly, so `dsv32 serve` exits 0 instead.
            if self._drainer is None:
                self._drainer = threading.Thread(target=engine.shutdown, args=(drain_timeout,), daemon=True)
                self._drainer.start()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting
            self.should_exit = True

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            url = f"http://{host}:{bound}"
            print(f"dsv32 serve: listening on {url}", flush=True)
            if ready is not None:
                ready(url)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=int(drain_timeout) + 5, lifespan="on")
    server = _Server(config)
    server.run(sockets=[sock])
    engine.shutdown(0.0)
    return 0


def detect_family(tokenizer: Any) -> str:
    if tokenizer.token_to_id(chat.USER) is not None:
        return "deepseek-v3.2"
    if tokenizer.token_to_id(chat.IM_START) is not None:
        return "chatml"
    raise ValueError("cannot tell the model's chat format from its tokenizer; pass --chat-format")


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv32 serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF-format checkpoint directory or shipped model name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start-up)")
    p.add_argument(
        "--api-key", default=os.environ.get("DSV32_API_KEY"), help="require this Bearer key (env DSV32_API_KEY)"
    )
    p.add_argument("--model-name", default=None, help="the id clients send as 'model' (default: the model's name)")
    p.add_argument("--chat-format", default="auto", choices=["auto", *chat.FAMILIES])
    p.add_argument("--max-slots", type=int, default=8, help="concurrent sequences (cache rows)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per sequence (default: context, <= 4096)")
    p.add_argument("--memory-budget", default=None, help="cache bytes, e.g. 2GiB (lowers slots, then length)")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before answering 429")
    p.add_argument("--max-tokens", type=int, default=None, help="default completion cap when a request sets none")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--dense", action="store_true", help="turn DSA off (dense MLA)")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds in-flight requests get at SIGTERM")
    p.add_argument("--no-web", action="store_true", help="do not serve the chat page at /")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)

    from dsv32 import load_model, load_tokenizer

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    model = load_model(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    family = detect_family(tokenizer) if args.chat_format == "auto" else args.chat_format
    name = args.model_name or Path(str(args.model).rstrip("/")).name or str(args.model)
    try:
        app = create_app(
            model,
            tokenizer,
            model_name=name,
            family=family,
            api_key=args.api_key,
            default_max_tokens=args.max_tokens,
            web=not args.no_web,
            max_slots=args.max_slots,
            max_len=args.max_len,
            memory_budget=args.memory_budget,
            max_waiting=args.max_waiting,
            num_threads=args.threads,
            forward_kwargs={"dense": True} if args.dense else None,
        )
    except ValueError as e:
        print(f"dsv32 serve: {e}", file=sys.stderr)
        return 2
    cap = app.state.engine.capacity
    print(
        f"dsv32 serve: model {name!r} ({family}), {cap['max_slots']} slots x {cap['max_len']} tokens, "
        f"cache {cap['cache_bytes'] / 2**20:.1f} MiB",
        flush=True,
    )
    return serve(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout, log_level=args.log_level)
