"""The HTTP app of `dsv32 serve`: an OpenAI-compatible API (plus DeepSeek's extensions) and a chat page.

The engine works on token ids only; this module owns everything textual: prompts (chat encoding by
`dsv32.chat`), incremental detokenisation (`dsv32.tokenizer.Detokenizer`), stop strings, the assistant
message as it streams (`dsv32.chat.ChatView`: reasoning / content / tool calls) and SSE framing. A stream
whose client goes away cancels its request, which frees the slot at the engine's next step.

Nothing a single request does may stall the others or fail the batch: tokenising and chat rendering run
in worker threads (the event loop keeps streaming), a prompt whose length in characters alone proves it
cannot fit the context is refused before it is tokenised, and prompt ids are checked against the model's
vocabulary before they reach the engine. Without an API key, requests addressed to a non-loopback `Host`
are refused when the server listens on loopback (DNS rebinding), and so are cross-origin POSTs.

Endpoints: `GET /v1/models`, `GET /v1/models/{name}`, `POST /v1/chat/completions`, `POST /v1/completions`,
`GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize` (vLLM's), `GET /health`, `GET /` (the chat page,
`web/`). Build the app in-process with :func:`create_app`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from dsv32 import chat, grammar
from dsv32.engine import (
    FINISH_STOP,
    Engine,
    EngineClosed,
    EngineOverloaded,
    Output,
    PromptLogprobs,
    RequestHandle,
    RequestTooLarge,
    SamplingParams,
    UnsupportedRequest,
)
from dsv32.serve.protocol import (
    MAX_BODY_BYTES,
    MAX_STOPS,
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeChatRequest,
    TokenizeRequest,
    bad_request,
    parse,
    read_json_body,
)
from dsv32.tokenizer import Detokenizer

log = logging.getLogger("dsv32.serve")
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
FAMILY_ALIASES = {"dsv32": "deepseek-v3.2", "llama": "chatml"}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# -------------------------------------------------------------------------------------- host checks


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.x.x.x and ::1, with or without a port (`[::1]:8000`, `localhost:80`)."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host[1:]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()


class _RequestGuard:
    """ASGI middleware run before routing: the Host check (DNS rebinding) and the cross-origin check.

    A web page can make a browser send requests to 127.0.0.1 (a form POST, or a DNS name it rebinds to
    127.0.0.1); the browser then sends the page's Host name and Origin. Without a key, a server on loopback
    answers only requests addressed to a loopback name, and no POST may carry a foreign Origin.
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.state.check_request_origin(scope)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------ app state


def _max_token_chars(tokenizer: Any) -> int | None:
    """Most characters of text one token can stand for: the longest vocabulary entry (a byte-level entry spells
    one byte per character, a byte is at most one character). This assumes the normalizer deletes nothing
    (true of the byte-level and Metaspace tokenizers here). None when the tokenizer cannot say."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "get_vocab"):
        return None
    return max((len(s) for s in backend.get_vocab(with_added_tokens=True)), default=1) or 1


def _model_vocab(model: Any, tokenizer: Any) -> int:
    """The number of rows of the model's embedding (what a prompt id must be below): the model config's
    ``vocab_size``, else the model's own attribute, else the tokenizer's vocabulary."""
    size = getattr(getattr(model, "config", None), "vocab_size", None) or getattr(model, "vocab_size", None)
    return int(size or tokenizer.vocab_size)


class ServerState:
    """What every handler needs: the engine, tokenizer, limits, and the checks shared by the endpoints."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        model_name: str,
        family: str | None,
        api_key: str | None,
        default_max_tokens: int | None,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        host_check: bool | None = None,
    ) -> None:
        self.engine, self.tok, self.model_name, self.family = engine, tokenizer, model_name, family
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.host_check = host_check
        self.created = int(time.time())
        eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        im_end = tokenizer.token_to_id(chat.IM_END) if family == "chatml" else None
        self.stop_ids = {int(t) for t in [*eos, im_end] if t is not None}
        self.vocab = _model_vocab(engine.model, tokenizer)
        self.grammar = grammar.GrammarCompiler(tokenizer, self.vocab)  # builds on the first constrained request
        self.max_token_chars = _max_token_chars(tokenizer)

    # -------------------------------------------------------------- checks shared by endpoints
    def check_request_origin(self, scope: Scope) -> APIError | None:
        """The Host and Origin checks of :class:`_RequestGuard`; None when the request may go on."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self._loopback_only(scope) and not is_loopback_host(host):
            return APIError(
                403,
                f"Host {host!r} is not a loopback name. This server listens on loopback without an API key, so "
                "it answers only requests addressed to localhost, 127.0.0.1 or [::1] (a guard against DNS "
                "rebinding); start it with an API key (DSV32_API_KEY) to serve other names.",
                param="Host",
                code="host_not_allowed",
            )
        # with a key, a foreign page cannot authenticate anyway (a browser never adds the Bearer header by
        # itself), and a proxy that rewrites Host must keep working; without one, Origin is what is left
        origin = headers.get("origin")
        foreign = origin is not None and not _same_origin(origin, host)
        if self.api_key is None and foreign and scope.get("method") not in _SAFE_METHODS:
            return APIError(
                403,
                f"Cross-origin request from {origin!r} refused: this server does not serve other web origins.",
                param="Origin",
                code="cross_origin",
            )
        return None

    def _loopback_only(self, scope: Scope) -> bool:
        if self.host_check is not None:
            return self.host_check
        # decided per connection: no key, and the connection arrived on a loopback address
        server = scope.get("server")
        return self.api_key is None and server is not None and is_loopback_host(str(server[0]))

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

    def check_chars(self, chars: int, param: str) -> None:
        """Refuse, before tokenising, a prompt whose character count alone proves it cannot fit: a token
        spells at most ``max_token_chars`` characters, so it has at least chars / max_token_chars tokens."""
        if self.max_token_chars is None:
            return
        at_least = math.ceil(chars / self.max_token_chars)
        if at_least >= self.engine.max_len:
            raise bad_request(
                f"This model's maximum context length is {self.engine.max_len} tokens. However, your prompt has "
                f"{chars} characters, which is at least {at_least} tokens. Please shorten it.",
                param=param,
                code="context_length_exceeded",
            )

    def check_ids(self, ids: Sequence[int], param: str) -> None:
        """Every prompt id must index the model's embedding; a bad id fails this request only (in the
        engine it would fail the step, and with it every request in the batch)."""
        if ids and (min(ids) < 0 or max(ids) >= self.vocab):
            bad = next(t for t in ids if not 0 <= t < self.vocab)
            raise bad_request(
                f"token id {bad} is outside the model's vocabulary (ids 0..{self.vocab - 1})", param=param
            )

    def budget(self, prompt_len: int, asked: int | None, param: str = "messages") -> int:
        ctx = self.engine.max_len
        if asked == 0 and prompt_len <= ctx:  # scoring the prompt only: it may fill the context
            return 0
        if prompt_len >= ctx:
            raise bad_request(
                f"This model's maximum context length is {ctx} tokens. However, your prompt has {prompt_len} "
                "tokens (and at least one token must be generated). Please shorten it.",
                param=param,
                code="context_length_exceeded",
            )
        room = ctx - prompt_len
        if asked is not None and asked > room:
            raise bad_request(
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
            raise bad_request(f"at most {MAX_STOPS} stop sequences are allowed", param="stop")
        if any(not s for s in stops):
            raise bad_request("stop sequences must be non-empty strings", param="stop")
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
            raise bad_request(str(e), code="context_length_exceeded") from None
        except UnsupportedRequest as e:
            raise bad_request(str(e), param="logprobs") from None

    def logprob_entry(self, out: Output) -> dict[str, Any]:
        def item(t: int, lp: float) -> dict[str, Any]:
            s = self.tok.decode([t])
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        entry = item(out.token, out.model_logprob if out.model_logprob is not None else out.logprob)  # type: ignore[arg-type]
        entry["top_logprobs"] = [item(t, lp) for t, lp in (out.top_logprobs or [])]
        return entry


# ------------------------------------------------------------------------------------ text streaming


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
        self.detok = Detokenizer(tokenizer)
        self.stops = [s for s in stops if s]
        self.stop_ids = stop_ids
        self.forced = forced
        self.text = forced
        self.finish: str | None = None
        self.tokens = 0
        self.reasoning_tokens = 0
        self._thinking_now = thinking
        self.want_logprobs = want_logprobs
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
        return self.text[: len(self.text) - chat.held_suffix(self.text, self.stops)]


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


# ------------------------------------------------------------------------------------------ prompts


def _content_chars(req: ChatRequest) -> int:
    """Characters of message text (a lower bound on the rendered prompt's length)."""
    total = 0
    for m in req.messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif isinstance(m.content, list):
            total += sum(len(p["text"]) for p in m.content if isinstance(p.get("text"), str))
    return total


def _thinking(st: ServerState, req: ChatRequest | TokenizeChatRequest) -> bool:
    """Thinking on or off, from DeepSeek's ``thinking`` or OpenAI's ``reasoning_effort``. V3.2 has one
    thinking mode, so the effort levels are not told apart: "none" / "minimal" turn it off, the others on."""
    thinking = req.thinking is not None and req.thinking.type == "enabled"
    effort = req.reasoning_effort
    if effort is not None:
        wants = effort not in ("none", "minimal")
        if req.thinking is not None and wants != thinking:
            raise bad_request(f"reasoning_effort={effort!r} contradicts thinking={req.thinking.type!r}",
                              param="reasoning_effort")
        if wants and st.family == "chatml":
            raise bad_request(f"this model has no thinking mode (reasoning_effort={effort!r})",
                              param="reasoning_effort")
        thinking = wants
    if thinking and st.family == "chatml":
        raise bad_request("this model has no thinking mode", param="thinking")
    return thinking


def _require_chat(st: ServerState) -> None:
    """A server started without a chat format (a base model whose tokenizer has no turn markers) serves
    completions only; say so instead of rendering a conversation the model was never trained on."""
    if st.family is None:
        raise APIError(400, f"model {st.model_name!r} has no chat format (its tokenizer carries no chat markers); "
                       "use /v1/completions", param="messages")


def _chat_prompt(st: ServerState, req: ChatRequest) -> tuple[list[int], bool, dict[str, Any] | None]:
    """-> (prompt ids, thinking, the grammar format that constrains the reply or None). Tokenises: call it in
    a worker thread. A forced tool call (``tool_choice`` naming a function, or "required") and a JSON
    response format are enforced by constrained decoding (`dsv32.grammar`), for every chat family."""
    _require_chat(st)
    thinking = _thinking(st, req)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise bad_request("tool_choice needs tools", param="tool_choice")
    forced_tools = None
    if choice == "none":
        tools = None
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if choice.get("type") == "function" and isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools or []}:
            raise bad_request("tool_choice must name one of the given tools", param="tool_choice")
        tools = forced_tools = [t for t in tools or [] if t["function"]["name"] == name]
    elif choice == "required":
        forced_tools = tools
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
                raise bad_request("response_format.json_schema.schema must be a JSON Schema object", "response_format")
        elif kind != "text":
            raise bad_request("response_format.type must be 'text', 'json_object' or 'json_schema'", "response_format")
    try:
        if schema is not None:
            grammar.check_schema(schema, "response_format.json_schema.schema")
        for t in tools or []:
            grammar.check_schema(grammar.tool_parameters(t), f"tools[{t['function']['name']}].parameters")
    except grammar.SchemaError as e:
        raise bad_request(str(e), param="response_format" if schema is not None else "tools") from None
    fmt = None
    parallel = req.parallel_tool_calls is not False
    if forced_tools:
        fmt = grammar.tool_call_format(forced_tools, st.family, parallel=parallel and not isinstance(choice, dict))
    elif schema is not None:
        fmt = grammar.json_format(schema)
        if tools:  # the reply is either JSON or tool calls
            fmt = {"type": "or", "elements": [fmt, grammar.tool_call_format(tools, st.family, parallel=parallel)]}
    if fmt is not None and thinking:
        fmt = grammar.after_reasoning(fmt)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    kw: dict[str, Any] = {"response_format": schema} if schema is not None else {}
    try:
        ids, _ = chat.encode_chat(messages, tools=tools, thinking=thinking, family=st.family, tokenizer=st.tok, **kw)
    except chat.ChatFormatError as e:
        raise bad_request(f"messages: {e}", param="messages") from None
    st.check_ids(ids, "messages")
    return ids, thinking, fmt


def _completion_prompts(st: ServerState, prompt: Any) -> list[tuple[list[int], str]]:
    """OpenAI's four prompt shapes -> [(ids, text)]. Tokenises: call it in a worker thread."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt must not be empty", param="prompt")
    for p in items:
        if isinstance(p, str):
            st.check_chars(len(p), "prompt")
        elif not p:
            raise bad_request("token prompts must be non-empty lists of token ids", param="prompt")
        else:
            st.check_ids(p, "prompt")
    texts = [p for p in items if isinstance(p, str)]
    encoded = iter(st.tok.encode_batch(texts)) if texts else iter(())  # batched: releases the GIL
    out = []
    for p in items:
        if isinstance(p, str):
            ids = next(encoded)
            if st.family == "deepseek-v3.2" and st.tok.bos_id is not None and (not ids or ids[0] != st.tok.bos_id):
                ids = [st.tok.bos_id, *ids]
            st.check_ids(ids, "prompt")
            out.append((ids, p))
        else:
            out.append((list(p), st.tok.decode(p)))
    return out


def _logit_bias(st: ServerState, bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's ``logit_bias``: token ids as strings, biases in [-100, 100]; ids must exist in the model."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            tid = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key[:32]!r}", param="logit_bias") from None
        if not 0 <= tid < st.vocab:
            raise bad_request(f"logit_bias: token id {tid} is outside the model's vocabulary (0..{st.vocab - 1})",
                              param="logit_bias")
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise bad_request(f"logit_bias values must lie in [-100, 100], got {value}", param="logit_bias")
        out[tid] = float(value)
    return out


def _params(
    st: ServerState,
    req: SamplingFields,
    max_tokens: int,
    *,
    thinking: bool,
    logprobs: bool,
    top: int,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    extra = [int(t) for t in req.stop_token_ids or []]
    if thinking:  # DeepSeek: temperature, top_p and the OpenAI penalties are ignored in thinking mode
        temperature, top_p, top_k, presence, frequency = 1.0, 1.0, 0, 0.0, 0.0
    else:
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p, top_k = req.top_p or 1.0, req.top_k or 0
        presence, frequency = req.presence_penalty or 0.0, req.frequency_penalty or 0.0
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
        prompt_logprobs=prompt_logprobs,
        min_tokens=req.min_tokens or 0,
        logit_bias=_logit_bias(st, req.logit_bias),
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=req.repetition_penalty or 1.0,
    )


# ------------------------------------------------------------------------------------------ endpoints


async def _chat(st: ServerState, request: Request) -> Response:
    st.check_auth(request)
    body = await read_json_body(request, st.max_body_bytes)
    req: ChatRequest = parse(ChatRequest, body)
    st.check_model(req.model)
    if req.n > st.engine.max_slots:
        raise bad_request(f"n={req.n} exceeds this server's {st.engine.max_slots} concurrent sequences", param="n")
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs is not available when streaming", param="prompt_logprobs")
    stops = st.stops(req.stop)
    st.check_chars(_content_chars(req), "messages")
    ids, thinking, fmt = await asyncio.to_thread(_chat_prompt, st, req)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = st.budget(len(ids), asked)
    params = _params(st, req, max_tokens, thinking=thinking, logprobs=req.logprobs, top=req.top_logprobs or 0,
                     prompt_logprobs=req.prompt_logprobs)
    if fmt is not None:  # compiled (or found in the cache) off the event loop; a bad grammar is a 400
        try:
            mask = await asyncio.to_thread(st.grammar.mask_factory, fmt, params.stop_token_ids)
        except grammar.SchemaError as e:
            raise bad_request(str(e), param="response_format") from None
        params = dataclasses.replace(params, logits_mask=mask)
    handle = st.submit(ids, params)
    choices = [
        _Choice(
            i,
            st.tok,
            stops=stops,
            stop_ids=set(params.stop_token_ids),
            thinking=thinking,
            want_logprobs=req.logprobs,
        )
        for i in range(req.n)
    ]
    views = [chat.ChatView(thinking=thinking, family=st.family) for _ in choices]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": st.model_name, "system_fingerprint": None}

    def final_message(c: _Choice, v: chat.ChatView) -> tuple[dict[str, Any], str]:
        msg = v.message(c.text)
        if req.parallel_tool_calls is False:  # OpenAI: at most one call per turn
            msg["tool_calls"] = msg["tool_calls"][:1]
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
        body = {**head, "object": "chat.completion", "choices": result, "usage": _usage([handle], choices)}
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = _vllm_prompt_logprobs(st, ids, handle.prompt_logprobs, req.prompt_logprobs)
        return JSONResponse(body)

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


async def _completions(st: ServerState, request: Request) -> Response:
    st.check_auth(request)
    body = await read_json_body(request, st.max_body_bytes)
    req: CompletionRequest = parse(CompletionRequest, body)
    st.check_model(req.model)
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (use n)", param="best_of")
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs is not available when streaming (use echo with logprobs)",
                          param="prompt_logprobs")
    stops = st.stops(req.stop)
    prompts = await asyncio.to_thread(_completion_prompts, st, req.prompt)
    if req.n * len(prompts) > st.engine.max_slots * 4 or req.n > st.engine.max_slots:
        raise bad_request("too many sequences requested at once", param="n")
    asked = 16 if req.max_tokens is None else req.max_tokens
    max_tokens = [st.budget(len(ids), asked, param="prompt") for ids, _ in prompts]
    want_lp = req.logprobs is not None
    echo_lp = req.echo and want_lp  # OpenAI's legacy prompt scoring: the prompt tokens' logprobs, echoed
    plp = max(req.logprobs if echo_lp else -1, -1 if req.prompt_logprobs is None else req.prompt_logprobs)
    handles: list[RequestHandle] = []
    stop_ids: set[int] = set()
    try:
        for (ids, _), mt in zip(prompts, max_tokens):
            params = _params(st, req, mt, thinking=False, logprobs=want_lp, top=req.logprobs or 0,
                             prompt_logprobs=plp if plp >= 0 else None)
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

    def lp_block(outs: Sequence[Output], offset: int, pi: int | None = None) -> dict[str, Any]:
        """OpenAI's legacy logprobs; with ``pi``, prompt ``pi``'s tokens come first (echo)."""
        block = (_echo_logprobs(st, prompts[pi][0], handles[pi].prompt_logprobs, req.logprobs or 0)
                 if pi is not None else {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
        for o in outs:
            s = st.tok.decode([o.token])
            block["tokens"].append(s)
            block["token_logprobs"].append(o.model_logprob)
            block["top_logprobs"].append({st.tok.decode([t]): lp for t, lp in (o.top_logprobs or [])})
            block["text_offset"].append(offset)
            offset += len(s)
        return block

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
                lp = lp_block(c.token_outputs, len(echo[pi]), pi if echo_lp else None) if want_lp else None
                choice = {
                    "index": c.index, "text": echo[pi] + c.text, "logprobs": lp, "finish_reason": c.finish or "stop"
                }
                if req.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = _vllm_prompt_logprobs(
                        st, prompts[pi][0], handles[pi].prompt_logprobs, req.prompt_logprobs
                    )
                result.append(choice)
        allc = [c for g in groups for c in g]
        return JSONResponse({**head, "choices": result, "usage": _usage(handles, allc)})

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        for pi, (h, group) in enumerate(zip(handles, groups)):
            sent = [0] * len(group)
            echoed = not echo[pi]
            async for out in h:
                if not echoed:  # after the first event: the prompt's logprobs are complete by then
                    echoed = True
                    for c in group:
                        lp = lp_block([], 0, pi) if echo_lp else None
                        ch = {"index": c.index, "text": echo[pi], "logprobs": lp, "finish_reason": None}
                        yield _sse({**head, "choices": [ch]})
                c = group[out.seq]
                was_done = c.finish is not None
                done, new = c.feed(out)
                if was_done:
                    continue
                if done and out.finish_reason is None:
                    h.cancel(out.seq)
                vis = c.visible()
                piece = vis[sent[out.seq] :]
                lp = lp_block(new, len(echo[pi]) + sent[out.seq]) if want_lp and new else None
                sent[out.seq] = max(sent[out.seq], len(vis))
                if piece or lp or done:
                    ch = {"index": c.index, "text": piece, "logprobs": lp, "finish_reason": c.finish if done else None}
                    yield _sse({**head, "choices": [ch]})
        if include_usage:
            allc = [c for g in groups for c in g]
            yield _sse({**head, "choices": [], "usage": _usage(handles, allc)})
        yield "data: [DONE]\n\n"

    return _EngineStream(events(), _cancel_all(handles))


def _echo_logprobs(st: ServerState, ids: Sequence[int], plp: PromptLogprobs | None, k: int) -> dict[str, Any]:
    """The prompt's part of OpenAI's legacy logprobs: per prompt token its text, its log-probability given the
    tokens before it (null for the first), its ``k`` most likely alternatives plus itself (as vLLM and
    OpenAI's "up to logprobs + 1"), and its character offset."""
    assert plp is not None and len(plp.logprobs) == len(ids)
    toks = [st.tok.decode([t]) for t in ids]
    tops: list[dict[str, float] | None] = [None]
    for i in range(1, len(ids)):
        top: dict[str, float] = {}
        for t, lp in (plp.top[i] or [])[:k]:  # most likely first: ids that decode alike keep the best value
            top.setdefault(st.tok.decode([t]), lp)
        top.setdefault(toks[i], plp.logprobs[i])  # type: ignore[arg-type]
        tops.append(top)
    offsets = [0, *itertools.accumulate(len(t) for t in toks)][: len(toks)]
    return {"tokens": toks, "token_logprobs": list(plp.logprobs), "top_logprobs": tops, "text_offset": offsets}


def _vllm_prompt_logprobs(
    st: ServerState, ids: Sequence[int], plp: PromptLogprobs | None, k: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs`` extension: per prompt position None (the first) or ``{id: {"logprob", "rank",
    "decoded_token"}}`` holding the prompt token and the ``k`` most likely ids."""
    assert plp is not None and len(plp.logprobs) == len(ids)
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for i in range(1, len(ids)):
        tok = ids[i]
        entry = {str(tok): {"logprob": plp.logprobs[i], "rank": plp.ranks[i], "decoded_token": st.tok.decode([tok])}}
        for rank, (t, lp) in enumerate((plp.top[i] or [])[:k], start=1):
            entry.setdefault(str(t), {"logprob": lp, "rank": rank, "decoded_token": st.tok.decode([t])})
        out.append(entry)
    return out


# ------------------------------------------------------------------------------ tokenizer endpoints


def _tokenizer_info(st: ServerState) -> dict[str, Any]:
    """What vLLM's `GET /tokenizer_info` reports that a client needs to tokenise like the server (lm-eval's
    remote tokenizer reads ``eos_token``). ``add_bos_token``: whether a text prompt gets BOS in front."""
    tok = st.tok
    return {
        "tokenizer_class": type(tok).__name__,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "unk_token": None,
        "add_bos_token": st.family == "deepseek-v3.2" and tok.bos_id is not None,
        "model_max_length": st.engine.max_len,
        "vocab_size": tok.vocab_size,
        "chat_format": st.family,
    }


def _tokenize_text(st: ServerState, req: TokenizeRequest) -> list[int]:
    """A text prompt's ids; ``add_special_tokens`` adds what `/v1/completions` adds to a text prompt (BOS for
    the V3.2 family, nothing for ChatML)."""
    ids = st.tok.encode_batch([req.prompt])[0]  # batched: releases the GIL
    if req.add_special_tokens and st.family == "deepseek-v3.2" and st.tok.bos_id is not None:
        if not ids or ids[0] != st.tok.bos_id:
            ids = [st.tok.bos_id, *ids]
    return ids


def _tokenize_chat(st: ServerState, req: TokenizeChatRequest) -> list[int]:
    """A conversation's ids, rendered as the chat endpoint renders it (tools, thinking)."""
    _require_chat(st)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        ids, _ = chat.encode_chat(messages, tools=tools, thinking=_thinking(st, req), family=st.family,
                                  tokenizer=st.tok, add_generation_prompt=req.add_generation_prompt)
    except chat.ChatFormatError as e:
        raise bad_request(f"messages: {e}", param="messages") from None
    return ids


async def _tokenize(st: ServerState, request: Request) -> JSONResponse:
    st.check_auth(request)
    body = await read_json_body(request, st.max_body_bytes)
    req = parse(TokenizeChatRequest, body) if "messages" in body else parse(TokenizeRequest, body)
    if req.model is not None:
        st.check_model(req.model)
    fn = _tokenize_chat if isinstance(req, TokenizeChatRequest) else _tokenize_text
    ids = await asyncio.to_thread(fn, st, req)
    return JSONResponse({"count": len(ids), "max_model_len": st.engine.max_len, "tokens": ids, "token_strs": None})


async def _detokenize(st: ServerState, request: Request) -> JSONResponse:
    st.check_auth(request)
    req: DetokenizeRequest = parse(DetokenizeRequest, await read_json_body(request, st.max_body_bytes))
    if req.model is not None:
        st.check_model(req.model)
    size = st.tok.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the tokenizer's vocabulary (ids 0..{size - 1})", param="tokens")
    return JSONResponse({"prompt": await asyncio.to_thread(st.tok.decode, req.tokens)})


def _model_card(st: ServerState) -> dict[str, Any]:
    return {
        "id": st.model_name,
        "object": "model",
        "created": st.created,
        "owned_by": "dsv32",
        "max_model_len": st.engine.max_len,
        "chat_format": st.family,
    }


# ------------------------------------------------------------------------------------------------ app


def create_app(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    family: str | None = "deepseek-v3.2",
    api_key: str | None = None,
    engine: Engine | None = None,
    default_max_tokens: int | None = None,
    web: bool = True,
    max_body_bytes: int = MAX_BODY_BYTES,
    host_check: bool | None = None,
    **engine_kwargs: Any,
) -> FastAPI:
    """The FastAPI app. Starts an :class:`Engine` over ``model`` (or uses ``engine``); ``engine_kwargs``
    go to it (max_slots, max_len, memory_budget, max_waiting, ...). The engine stops with the app's
    lifespan, or call ``app.state.engine.shutdown()`` when the app runs without one (ASGI test clients).

    family: the chat format (see ``dsv32.chat.FAMILIES``), checked against the tokenizer here; None serves
        completions only (chat requests get 400).
    max_body_bytes: larger request bodies get 413.
    host_check: refuse requests whose `Host` is not a loopback name (True), never (False), or (None)
        whenever there is no ``api_key`` and the connection arrived on a loopback address.
    """
    if family is not None:
        family = FAMILY_ALIASES.get(family.lower(), family.lower())
        if family not in chat.FAMILIES:
            raise ValueError(f"unknown chat format {family!r}; choose one of {', '.join(chat.FAMILIES)}")
        chat.check_tokenizer(family, tokenizer)  # refused at start-up, not on every request
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
    engine = engine or Engine(model, **engine_kwargs)
    st = ServerState(
        engine,
        tokenizer,
        model_name,
        family,
        api_key,
        default_max_tokens,
        max_body_bytes=max_body_bytes,
        host_check=host_check,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.shutdown, 0.0)

    app = FastAPI(title="dsv32", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.dsv32 = st
    app.add_middleware(_RequestGuard, state=st)

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

    # vLLM's tokenizer endpoints, at the server root (where vLLM and lm-eval's remote tokenizer expect them)
    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> JSONResponse:
        st.check_auth(request)
        return JSONResponse(_tokenizer_info(st))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        return await _tokenize(st, request)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        return await _detokenize(st, request)

    if web and (WEB_DIR / "index.html").is_file():
        csp = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": csp})

        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app
