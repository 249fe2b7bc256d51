"""Schema-driven fuzzing of the OpenAI-compatible server: no request, valid or not, may get a 5xx.

Schemathesis generates requests for every operation in the app's own OpenAPI document (`app.openapi()`) and
sends them through its in-process ASGI transport; the check is `not_a_server_error` (status < 500).

The endpoints read their JSON bodies by hand (`read_json_body` + pydantic's `model_validate`, so that every
refusal is an OpenAI-shaped 400 and not FastAPI's 422), so the OpenAPI document declares *no* request body
for `POST /v1/chat/completions` and `POST /v1/completions`. Fuzzing that document alone would only ever send
bodiless POSTs. The test therefore adds, for the fuzz run only, the JSON Schemas of the server's own request
models (`ChatRequest`, `CompletionRequest`) as those operations' bodies, with OpenAI's shapes spelled out for
the fields the models keep as free-form objects (`tool_choice`, `response_format`, an assistant turn's
`tool_calls`), so that positive cases reach the chat renderer and negative cases (wrong types, bounds, missing
fields) reach the server's error paths.

The model is the scripted fake (instant replies, byte tokenizer); the engine, chat encoding, detokenising,
stop strings, reasoning/tool-call splitting and SSE are the real ones. Generation stays short: positive cases ask
for at most 64 tokens, a request without `max_tokens` gets 32 (the server's `--max-tokens`), and nothing can
pass the 2048-token slot.

A request that kills the engine thread would leave its own and every later request waiting for ever; the app is
wrapped in a watchdog that fails such a request at once (`guarded`).
"""

from __future__ import annotations

import asyncio
import copy
import os
from typing import Any

import pytest

for _dep in ("fastapi", "httpx"):
    pytest.importorskip(_dep, reason="the server needs fastapi and httpx (pip install -e '.[serve,test]')")
pytest.importorskip("schemathesis", reason="fuzzing needs schemathesis (pip install -e '.[test]')")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from dsv32 import chat  # noqa: E402
from dsv32.serve import create_app  # noqa: E402
from dsv32.serve.protocol import (  # noqa: E402
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeRequest,
)
from serving_fakes import byte_tokenizer, scripted  # noqa: E402

MODEL = "test-model"
TOK = byte_tokenizer()
# the reply exercises the parsers: reasoning, then content, then a DSML tool call
DSML = chat.DSML
REPLY = (
    "Let me think." + chat.END_THINK + "Calling."
    f'\n\n<{DSML}function_calls>\n<{DSML}invoke name="f">\n'
    f'<{DSML}parameter name="x" string="true">1</{DSML}parameter>\n'
    f"</{DSML}invoke>\n</{DSML}function_calls>"
)
# Fixed seed, derandomised: the same requests every run. For a longer hunt, e.g.
#   DSV32_FUZZ_SEED=7 DSV32_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_server_fuzz.py
SEED = int(os.environ.get("DSV32_FUZZ_SEED", "20261130"))
FUZZ_EXAMPLES = int(os.environ.get("DSV32_FUZZ_EXAMPLES", "300"))  # per operation and mode, after the coverage phase
OPERATIONS = {
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{name}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/tokenizer_info"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
}

# The request models keep `tool_choice` (as an object), `response_format` and an assistant turn's `tool_calls`
# free-form, so any JSON passes validation there. The fuzz schema offers OpenAI's shapes, so that generated
# requests get past the first checks into the chat renderer, and other values next to them. Those are not `{}`:
# an anyOf branch that allows everything absorbs the shaped branches before generation, and the shapes are lost.
ANY = {"type": ["string", "integer", "boolean", "null"]}
NULL = {"type": "null"}
TOOL_CALL = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"type": "string", "maxLength": 16}, "arguments": {"type": "string"}},
                    "required": ["name", "arguments"],
                },
                ANY,
            ]
        },
    },
    "required": ["type", "function"],
}
TOOL_CALLS = {"anyOf": [{"type": "array", "items": {"anyOf": [TOOL_CALL, ANY]}, "maxItems": 2}, ANY]}
NAMED_TOOL_CHOICE = {
    "type": "object",
    "properties": {
        "type": {"const": "function"},
        "function": {"anyOf": [{"type": "object", "properties": {"name": {"type": "string"}}}, ANY]},
    },
    "required": ["type", "function"],
}
TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto", "required"]}, NAMED_TOOL_CHOICE]}
RESPONSE_FORMAT = {
    "anyOf": [
        {
            "type": "object",
            "properties": {
                "type": {"enum": ["text", "json_object", "json_schema"]},
                "json_schema": {
                    "anyOf": [{"type": "object", "properties": {"name": {"type": "string"}, "schema": {}}}, ANY]
                },
            },
            "required": ["type"],
        },
    ]
}

USER = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
# What fuzzing (and reading the code while writing this test) found, sent as they are on every run.
REGRESSIONS = [
    (
        "tool_choice.function not an object: AttributeError, 500",
        "chat",
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": "f"}},
    ),
    (
        "json_schema not an object: AttributeError, 500",
        "chat",
        {"response_format": {"type": "json_schema", "json_schema": "x"}},
    ),
    (
        "tool_calls a string: AttributeError in the renderer, 500",
        "chat",
        {"messages": [{"role": "assistant", "content": "x", "tool_calls": "bad"}, *USER]},
    ),
    (
        "tool_calls an int: TypeError in the renderer, 500",
        "chat",
        {"messages": [{"role": "assistant", "content": "x", "tool_calls": 3}, *USER]},
    ),
    (
        "tool_calls items not objects: AttributeError, 500",
        "chat",
        {"messages": [{"role": "assistant", "content": "x", "tool_calls": [1]}, *USER]},
    ),
    ("seed past 64 bits: killed the engine thread, every request hung", "chat", {"seed": 2**64}),
    ("seed below int64: killed the engine thread", "chat", {"seed": -(2**63) - 1, "n": 2}),
    (
        "seed past 64 bits, streamed completion: killed the engine thread",
        "completions",
        {"prompt": "x", "seed": 2**70, "stream": True},
    ),
]


def request_body(model: type, components: dict[str, Any]) -> dict[str, Any]:
    """The pydantic model's JSON Schema as an OpenAPI request body; its $defs go to the components."""
    js = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(js.pop("$defs", {}))
    js["properties"]["model"] = {"type": "string", "enum": [MODEL]}  # else almost everything is a 404
    return {"required": True, "content": {"application/json": {"schema": js}}}


def fuzz_spec(app) -> dict[str, Any]:
    spec = copy.deepcopy(app.openapi())
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for path, model in (("/v1/chat/completions", ChatRequest), ("/v1/completions", CompletionRequest),
                        ("/detokenize", DetokenizeRequest)):
        op = spec["paths"][path]["post"]
        if "requestBody" not in op:  # see the module docstring: the server reads the body by hand
            op["requestBody"] = request_body(model, components)
    text, conv = (request_body(m, components) for m in (TokenizeRequest, TokenizeChatRequest))
    schemas = [b["content"]["application/json"]["schema"] for b in (text, conv)]
    for js in schemas:  # /tokenize takes either shape
        js["properties"]["model"] = {"anyOf": [js["properties"]["model"], NULL]}
    text["content"]["application/json"]["schema"] = {"anyOf": schemas}
    spec["paths"]["/tokenize"]["post"].setdefault("requestBody", text)
    chat_body, completion_body = (
        spec["paths"][p]["post"]["requestBody"]["content"]["application/json"]["schema"]
        for p in ("/v1/chat/completions", "/v1/completions")
    )
    chat_props = chat_body["properties"]
    chat_props["tool_choice"] = TOOL_CHOICE
    chat_props["response_format"] = RESPONSE_FORMAT
    for body in (chat_body, completion_body):  # short generations: 1-64 tokens, or the app's default of 32
        for key in ("max_tokens", "max_completion_tokens"):
            if key in body["properties"]:
                body["properties"][key] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 64}, NULL]}
    chat_body["dependentRequired"] = {"tool_choice": ["tools"]}  # else most positive cases are that one 400
    # a "tool" turn needs the assistant's pending call before it: left out, or most cases would be that 400
    components["Message"]["properties"]["role"]["enum"].remove("tool")
    components["Message"]["properties"]["tool_calls"] = TOOL_CALLS
    return spec


def make_app():
    """max_len leaves room for a tools block (about 1.2K byte tokens for one tool); a request without
    max_tokens gets at most 32 (`--max-tokens`)."""
    return create_app(
        scripted(TOK, REPLY), TOK, model_name=MODEL, max_slots=2, max_len=2048, max_waiting=8, default_max_tokens=32
    )


def load_schema() -> schemathesis.schemas.BaseSchema:
    """The fuzz schema, built at import time (schemathesis parametrizes at collection). The spec depends on the
    routes only, so a throwaway app provides it; the tests call the `served` fixture's own app.

    (`schemathesis.pytest.from_fixture` would build it lazily, but with pytest 9.2 it fails on a removed
    private attribute, `Node._nodeid`.)"""
    spec_app = make_app()
    try:
        spec = fuzz_spec(spec_app)
    finally:
        spec_app.state.engine.shutdown()
    config = SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "generation": {"max-examples": FUZZ_EXAMPLES, "deterministic": True, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            # the tokenizer endpoints have small bodies and no engine behind them: fewer cases bound the run time
            "operations": [
                {"include-path-regex": "^/(tokenize|detokenize|tokenizer_info)$", "generation": {"max-examples": 60}}
            ],
            "request-timeout": 30,  # in-process: the app is cancelled past it, and the call fails
            "max-stream-events": 100_000,  # read every stream to its end (the default cuts it at 20 events)
        }
    )
    return schemathesis.openapi.from_dict(spec, config=config)


SCHEMA = load_schema()


class EngineDied(AssertionError):
    pass


def guarded(app):
    """The app behind a watchdog: a request the engine thread can no longer answer (the thread died) would
    wait for ever, so it fails at once instead, with the request that caused it still the one reported."""
    engine = app.state.engine

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        task = asyncio.ensure_future(app(scope, receive, send))
        while not task.done():
            await asyncio.wait({task}, timeout=0.05)
            if not task.done() and not engine._thread.is_alive():
                task.cancel()
                raise EngineDied("the engine thread died: every request it holds or gets would hang")
        return task.result()

    asgi.app = app
    return asgi


@pytest.fixture
def served():
    """A fresh app per test: schemathesis runs the app's lifespan around each one, and its end stops the engine."""
    app = make_app()
    yield guarded(app)
    app.state.engine.shutdown()


def test_schema_covers_every_operation():
    ops = {(op.ok().method.upper(), op.ok().path) for op in SCHEMA.get_all_operations()}
    assert ops == OPERATIONS
    # the document as served declares no request bodies: the fuzz spec's bodies come from the request models
    app = make_app()
    app.state.engine.shutdown()
    paths = app.openapi()["paths"]
    assert all("requestBody" not in paths[p]["post"] for p in ("/v1/chat/completions", "/v1/completions"))


@SCHEMA.parametrize()
@settings(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    derandomize=True,
    # no shrinking: it bounds the run time, and the first failing request is the one that broke the server
    phases=[Phase.explicit, Phase.generate],
)
def test_no_server_errors(case, served):
    """Every operation: explicit examples, the coverage phase (boundaries, wrong types, missing fields), then
    FUZZ_EXAMPLES positive and FUZZ_EXAMPLES negative generated cases."""
    response = case.call(app=served)
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code < 500, (response.status_code, response.text[:500])
    # a stream that stalls is returned cut short at the timeout, with its 200: that is a hang, not a pass
    assert not response.stream_cut_short, "the stream did not finish within the request timeout"
    assert served.app.state.engine._thread.is_alive()


@pytest.mark.parametrize("name,endpoint,body", REGRESSIONS, ids=[r[0].split(":")[0] for r in REGRESSIONS])
def test_regressions_are_4xx(name, endpoint, body, served):
    path = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}[endpoint]
    base = {"model": MODEL, "max_tokens": 8, **({"messages": USER} if endpoint == "chat" else {})}
    r = TestClient(served).post(path, json={**base, **body})  # a server exception is raised here, traceback and all
    assert r.status_code == 400, (name, r.status_code, r.text[:300])
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert served.app.state.engine._thread.is_alive()
