"""OpenAI-compatible server: chat (stream and not, thinking, tools, logprobs, n, stop), completions, errors,
429 under load, client disconnects, the official `openai` client against a live uvicorn on loopback, and a
clean SIGTERM drain of `dsv32 serve`.

Most tests use a scripted model (exact, known replies) with a byte-level tokenizer; one runs the real tiny
V3.2 model with the bundled DeepSeek tokenizer end to end.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

for _dep in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_dep, reason="the server needs fastapi, uvicorn and httpx (pip install -e '.[serve,test]')")

import httpx  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from dsv32 import ModelConfig, Transformer, chat, load_tokenizer, save_model  # noqa: E402
from dsv32.generate import stream_text  # noqa: E402
from dsv32.serve import create_app  # noqa: E402
from dsv32.tokenizer import Detokenizer  # noqa: E402
from serving_fakes import LiveServer, byte_tokenizer, scripted  # noqa: E402

TOK = byte_tokenizer()
DSML = chat.DSML
CALL = (
    f'\n\n<{DSML}function_calls>\n<{DSML}invoke name="get_weather">\n'
    f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>\n'
    f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>\n'
    f"</{DSML}invoke>\n</{DSML}function_calls>"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
USER = [{"role": "user", "content": "Hi there"}]


@pytest.fixture
def make_client():
    """make_client(reply_text, **create_app kwargs) -> TestClient; engines are shut down afterwards."""
    apps = []

    def make(text: str = "Hello world!", *, tok=TOK, delay: float = 0.0, **kw) -> TestClient:
        kw.setdefault("max_slots", 4)
        kw.setdefault("max_len", 3072)
        app = create_app(scripted(tok, text, delay=delay), tok, model_name="test-model", **kw)
        apps.append(app)
        return TestClient(app)

    yield make
    for app in apps:
        app.state.engine.shutdown()


def chat_body(**kw) -> dict:
    return {"model": "test-model", "messages": USER, **kw}


def sse(text: str) -> list:
    """SSE body -> list of decoded events ('[DONE]' kept as a string); checks the framing."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def joined(events: list, field: str, index: int = 0) -> str:
    return "".join(
        ch["delta"].get(field) or ""
        for e in events
        if isinstance(e, dict)
        for ch in e["choices"]
        if ch["index"] == index
    )


# ------------------------------------------------------------------------------------------ chat


def test_models_health_and_auth(make_client):
    c = make_client(api_key="sekrit")
    assert c.get("/health").json()["status"] == "ok"
    assert c.get("/v1/models").status_code == 401
    bad = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    ok = c.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "test-model"
    r = c.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = c.post(
        "/v1/chat/completions", json={**chat_body(), "model": "gpt-9"}, headers={"Authorization": "Bearer sekrit"}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert c.get("/no/such/route").json()["error"]["code"] == "not_found"


def test_chat_plain_and_stream_agree(make_client):
    c = make_client("Hello, wörld! 🙂")
    r = c.post("/v1/chat/completions", json=chat_body()).json()
    msg = r["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "Hello, wörld! 🙂"}
    assert r["choices"][0]["finish_reason"] == "stop" and r["object"] == "chat.completion"
    u = r["usage"]
    n_reply = len(TOK.encode("Hello, wörld! 🙂"))
    assert u["completion_tokens"] == n_reply + 1  # + EOS
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    s = c.post("/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True}))
    assert s.headers["content-type"].startswith("text/event-stream")
    ev = sse(s.text)
    assert ev[-1] == "[DONE]" and ev[0]["choices"][0]["delta"]["role"] == "assistant"
    assert joined(ev, "content") == "Hello, wörld! 🙂"
    assert [e["choices"][0]["finish_reason"] for e in ev[1:-2]][-1] == "stop"
    assert ev[-2]["choices"] == [] and ev[-2]["usage"]["completion_tokens"] == n_reply + 1
    # the same conversation again: its prompt is in the cache
    assert ev[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == u["prompt_tokens"] - 1


def test_thinking_reasoning_and_tool_calls(make_client):
    reasoning, content = "I should look up <b>Paris</b>.", "Checking."
    c = make_client(reasoning + chat.END_THINK + content + CALL)
    body = chat_body(thinking={"type": "enabled"}, tools=TOOLS, temperature=0.0)
    r = c.post("/v1/chat/completions", json=body).json()
    ch = r["choices"][0]
    assert ch["finish_reason"] == "tool_calls"
    msg = ch["message"]
    assert msg["reasoning_content"] == reasoning and msg["content"] == content
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 3}
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(TOK.encode(reasoning)) + 1
    ev = sse(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert joined(ev, "reasoning_content") == reasoning
    assert joined(ev, "content") == content  # nothing of the DSML block leaks into content
    last = ev[-2]["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    assert last["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert last["delta"]["tool_calls"][0]["index"] == 0
    # the follow-up turn with the tool result renders and runs
    follow = USER + [
        {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": msg["tool_calls"]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'},
    ]
    r2 = c.post("/v1/chat/completions", json={**body, "messages": follow})
    assert r2.status_code == 200


def test_tool_choice(make_client):
    c = make_client(CALL)  # the call is forced by constrained decoding (dsv32.grammar) from its first token
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.post("/v1/chat/completions", json=chat_body(tools=TOOLS, tool_choice=named)).json()
    (call,) = r["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert r["usage"]["completion_tokens"] == len(TOK.encode(CALL)) + 1
    auto = c.post("/v1/chat/completions", json=chat_body(tools=TOOLS)).json()
    none = c.post("/v1/chat/completions", json=chat_body(tools=TOOLS, tool_choice="none")).json()
    assert none["usage"]["prompt_tokens"] < auto["usage"]["prompt_tokens"]  # no tools block in the prompt
    for bad in ({"type": "function", "function": {"name": "nope"}}, "sometimes"):
        e = c.post("/v1/chat/completions", json=chat_body(tools=TOOLS, tool_choice=bad))
        assert e.status_code == 400, bad
    assert c.post("/v1/chat/completions", json=chat_body(tool_choice="required")).status_code == 400


def test_stop_strings(make_client):
    c = make_client("Hello world, hello moon")
    r = c.post("/v1/chat/completions", json=chat_body(stop=["o w", "moon"])).json()
    assert r["choices"][0]["message"]["content"] == "Hell" and r["choices"][0]["finish_reason"] == "stop"
    ev = sse(c.post("/v1/chat/completions", json=chat_body(stop="moon", stream=True)).text)
    assert joined(ev, "content") == "Hello world, hello "
    assert ev[-2]["choices"][0]["finish_reason"] == "stop"


def test_logprobs_n_and_seed(make_client):
    c = make_client("Yes")
    r = c.post("/v1/chat/completions", json=chat_body(n=2, logprobs=True, top_logprobs=2, seed=1)).json()
    assert [ch["index"] for ch in r["choices"]] == [0, 1]
    for ch in r["choices"]:
        assert ch["message"]["content"] == "Yes"
        entries = ch["logprobs"]["content"]
        assert [e["token"] for e in entries] == ["Y", "e", "s"]
        assert all(abs(e["logprob"]) < 1e-6 and len(e["top_logprobs"]) == 2 for e in entries)
        assert entries[0]["bytes"] == [ord("Y")]
    ev = sse(c.post("/v1/chat/completions", json=chat_body(n=2, stream=True, logprobs=True)).text)
    assert joined(ev, "content", 0) == joined(ev, "content", 1) == "Yes"
    assert c.post("/v1/chat/completions", json=chat_body(top_logprobs=2)).status_code == 400
    assert c.post("/v1/chat/completions", json=chat_body(n=5)).status_code == 400  # above the 4 slots


def test_response_format(make_client):
    c = make_client('{"a": 1}')
    plain = c.post("/v1/chat/completions", json=chat_body()).json()
    js = c.post("/v1/chat/completions", json=chat_body(response_format={"type": "json_object"})).json()
    assert js["choices"][0]["message"]["content"] == '{"a": 1}'
    assert js["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]  # the schema block was added
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert c.post("/v1/chat/completions", json=chat_body(response_format=schema)).status_code == 200
    assert c.post("/v1/chat/completions", json=chat_body(response_format={"type": "yaml"})).status_code == 400


BAD_BODIES = [
    ("not json", b"{'model': 1"),
    ("array", b"[1, 2]"),
    ("no messages", {"model": "test-model"}),
    ("empty messages", {"model": "test-model", "messages": []}),
    ("bad role", {"model": "test-model", "messages": [{"role": "robot", "content": "x"}]}),
    ("message not object", {"model": "test-model", "messages": ["hi"]}),
    ("temperature", chat_body(temperature=7)),
    ("top_p", chat_body(top_p=0)),
    ("n", chat_body(n=0)),
    ("max_tokens", chat_body(max_tokens=0)),
    ("stream type", chat_body(stream="yes")),
    ("stop count", chat_body(stop=["a", "b", "c", "d", "e"])),
    ("empty stop", chat_body(stop=[""])),
    ("tools shape", chat_body(tools=[{"type": "function"}])),
    ("thinking", chat_body(thinking={"type": "sometimes"})),
    ("tool without call", {"model": "test-model", "messages": [{"role": "tool", "content": "x"}]}),
    (
        "bad tool args",
        {
            "model": "test-model",
            "messages": USER
            + [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{not json"}}],
                }
            ],
        },
    ),
    ("huge max_tokens", chat_body(max_tokens=10**6)),
    ("too long", {"model": "test-model", "messages": [{"role": "user", "content": "x" * 4000}]}),
]


@pytest.mark.parametrize("name,body", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_requests_are_400(make_client, name, body):
    c = make_client()
    if isinstance(body, bytes):
        r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if name in ("too long", "huge max_tokens"):
        assert err["code"] == "context_length_exceeded"


def test_follow_up_turn_reuses_the_cache(make_client):
    c = make_client("Sure thing.")
    r1 = c.post("/v1/chat/completions", json=chat_body()).json()
    turn2 = USER + [{"role": "assistant", "content": "Sure thing."}, {"role": "user", "content": "And then?"}]
    r2 = c.post("/v1/chat/completions", json={**chat_body(), "messages": turn2}).json()
    u1, u2 = r1["usage"], r2["usage"]
    # cached: the first prompt and the reply (its EOS was sampled, never fed)
    assert u2["prompt_tokens_details"]["cached_tokens"] == u1["prompt_tokens"] + u1["completion_tokens"] - 1
    assert u2["prompt_cache_miss_tokens"] == u2["prompt_tokens"] - u2["prompt_cache_hit_tokens"]


def test_chatml_family(make_client):
    tok = byte_tokenizer("chatml")
    c = make_client("Hi from ChatML", tok=tok, family="chatml")
    r = c.post("/v1/chat/completions", json=chat_body()).json()
    assert r["choices"][0]["message"]["content"] == "Hi from ChatML"
    assert c.post("/v1/chat/completions", json=chat_body(thinking={"type": "enabled"})).status_code == 400


# ----------------------------------------------------------------------------------- completions


def test_completions(make_client):
    c = make_client("abcdef")
    prompt = f"{chat.USER}x{chat.ASSISTANT}{chat.END_THINK}"
    r = c.post("/v1/completions", json={"model": "test-model", "prompt": prompt, "max_tokens": 4}).json()
    assert r["object"] == "text_completion"
    assert r["choices"][0]["text"] == "abcd" and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["prompt_tokens"] == len(TOK.encode(prompt)) + 1  # + BOS
    ids = [TOK.bos_id, *TOK.encode(prompt)]
    r = c.post(
        "/v1/completions",
        json={"model": "test-model", "prompt": [ids, ids], "logprobs": 1, "echo": False, "max_tokens": 10},
    ).json()
    assert [ch["index"] for ch in r["choices"]] == [0, 1]
    lp = r["choices"][1]["logprobs"]
    assert lp["tokens"] == list("abcdef") and lp["text_offset"] == list(range(6))
    assert r["choices"][1]["finish_reason"] == "stop"
    r = c.post("/v1/completions", json={"model": "test-model", "prompt": prompt, "echo": True, "max_tokens": 3}).json()
    assert r["choices"][0]["text"] == prompt + "abc"
    ev = sse(
        c.post("/v1/completions", json={"model": "test-model", "prompt": prompt, "stream": True, "stop": "de"}).text
    )
    assert "".join(e["choices"][0]["text"] for e in ev[:-1]) == "abc"
    assert ev[-2]["choices"][0]["finish_reason"] == "stop" and ev[-1] == "[DONE]"
    for bad in ({"prompt": []}, {"prompt": [10**9]}, {"prompt": "x", "suffix": "y"}, {"prompt": 3}):
        assert c.post("/v1/completions", json={"model": "test-model", **bad}).status_code == 400, bad


def test_detokenizer_agrees_with_decoding_everything():
    """The incremental detokenizer (server streams, `dsv32 generate`) against its slow reference, one decode
    of all ids: real text (multi-byte characters, markers, runs of spaces) and random id sequences."""
    d = Detokenizer(TOK)
    pieces = [d.add(t) for t in TOK.encode("é🙂x")]
    assert "".join(pieces) == "é🙂x" and "" in pieces  # partial UTF-8 held until complete
    tok = load_tokenizer()
    text = "Héllo wörld 🙂 日本語のテキスト, <｜User｜>  spaced   out\n\ttabs ﬃ 🇫🇷!"
    rng = random.Random(0)
    randoms = [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    cases = [tok.encode(text), *randoms]
    for ids in cases:
        d = Detokenizer(tok)
        assert "".join(d.add(t) for t in ids) + d.flush() == tok.decode(ids), ids
        assert "".join(stream_text(tok, iter(ids))) == tok.decode(ids), ids


# ------------------------------------------------------------------------ live server (loopback)


def _slot_freed(url: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health").json()
        if h["busy_slots"] == 0 and h["running"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_overload_429_and_disconnect_frees_slot():
    long_reply = "word " * 400
    app = create_app(
        scripted(TOK, long_reply, delay=0.01), TOK, model_name="test-model", max_slots=1, max_len=3072, max_waiting=0
    )
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as s:
            lines = s.iter_lines()
            got = [next(lines) for _ in range(8)]  # events and their blank separators
            assert sum('"content"' in ln for ln in got) >= 3
            busy = httpx.post(srv.url + "/v1/chat/completions", json=chat_body(), timeout=30)
            assert busy.status_code == 429
            assert busy.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(busy.headers["Retry-After"]) >= 1
        # leaving the `with` closed the connection mid-stream: the engine must free the slot
        assert _slot_freed(srv.url)
        # and a non-streaming request whose client gives up also frees it
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", json=chat_body(), timeout=0.5)
        assert _slot_freed(srv.url)
        ok = client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "wor"


def test_openai_client_against_live_server():
    openai = pytest.importorskip("openai")
    reasoning, content = "Think.", "Calling."
    app = create_app(
        scripted(TOK, reasoning + chat.END_THINK + content + CALL),
        TOK,
        model_name="test-model",
        api_key="k-123",
        max_slots=2,
        max_len=3072,
    )
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k-123", max_retries=0)
        assert [m.id for m in client.models.list()] == ["test-model"]
        r = client.chat.completions.create(
            model="test-model", messages=USER, tools=TOOLS, extra_body={"thinking": {"type": "enabled"}}
        )
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content == content
        assert msg.tool_calls[0].function.name == "get_weather"
        assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}
        assert msg.model_extra["reasoning_content"] == reasoning
        assert r.usage.completion_tokens_details.reasoning_tokens == len(TOK.encode(reasoning)) + 1
        stream = client.chat.completions.create(
            model="test-model",
            messages=USER,
            stream=True,
            extra_body={"thinking": {"type": "enabled"}},
            stream_options={"include_usage": True},
        )
        parts, think, calls, usage = [], [], [], None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
                think.append((ch.delta.model_extra or {}).get("reasoning_content") or "")
                calls += ch.delta.tool_calls or []
        assert "".join(parts) == content and "".join(think) == reasoning
        assert calls[0].function.name == "get_weather" and usage.total_tokens > 0
        comp = client.completions.create(
            model="test-model", prompt=f"{chat.USER}x{chat.ASSISTANT}<think>", max_tokens=5
        )
        assert comp.choices[0].text == reasoning[:5]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=USER)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="test-model", messages=USER, temperature=9)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_real_tokenizer_and_tiny_model():
    """The real pipeline: bundled V3.2 tokenizer, chat encoding, the tiny V3.2 model (random weights)."""
    tok = load_tokenizer()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny").replace(vocab_size=tok.vocab_size)).eval()
    app = create_app(model, tok, model_name="tiny", max_slots=2, max_len=512)
    try:
        c = TestClient(app)
        body = {"model": "tiny", "messages": USER, "max_tokens": 6, "seed": 0, "logprobs": True}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        out = r.json()
        assert out["usage"]["completion_tokens"] <= 6
        assert len(out["choices"][0]["logprobs"]["content"]) <= 6
        ev = sse(c.post("/v1/chat/completions", json={**body, "stream": True, "thinking": {"type": "enabled"}}).text)
        assert ev[-1] == "[DONE]" and ev[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        app.state.engine.shutdown()


def test_dsv32_serve_drains_on_sigterm(tmp_path: Path):
    """`dsv32 serve` as users run it: loads a checkpoint directory, streams, and on SIGTERM ends the open
    stream (finish_reason "abort", then [DONE]) and exits 0 within the drain timeout."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny").replace(vocab_size=TOK.vocab_size))
    save_model(model, tmp_path / "m")
    TOK.save(tmp_path / "m")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "dsv32",
        "serve",
        "--model",
        str(tmp_path / "m"),
        "--port",
        "0",
        "--max-slots",
        "2",
        "--max-len",
        "4000",
        "--drain-timeout",
        "1",
        "--threads",
        "1",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 90
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "listening on" in line:
                url = line.split("listening on")[1].strip()
        assert url, "server did not start"
        with httpx.Client(base_url=url, timeout=30) as client:
            body = {"model": "m", "messages": USER, "max_tokens": 3000, "stream": True, "ignore_eos": True}
            with client.stream("POST", "/v1/chat/completions", json=body) as s:
                lines = s.iter_lines()
                for _ in range(4):
                    next(lines)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rest = [ln for ln in lines if ln.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            last = json.loads(rest[-2][len("data: ") :])
            assert last["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------- prompt scoring, tokenizer endpoints, parameters


@pytest.fixture(scope="module")
def tiny_app():
    """The real tiny V3.2 model (peaked weights: greedy choices far from ties) behind the byte tokenizer."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny").replace(vocab_size=TOK.vocab_size)).eval()
    with torch.no_grad():  # every id decodes to text; weights as in serving_fakes.peaked_tiny_v32
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
            elif "bias" not in name:
                p.normal_(1.0, 0.1)
    app = create_app(model, TOK, model_name="tiny", max_slots=4, max_len=128, prefill_chunk=16)
    yield app, model
    app.state.engine.shutdown()


def _full_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.forward(torch.tensor([ids])).log_softmax(-1)[0]  # [S, V]


def test_echo_logprobs_score_the_prompt(tiny_app):
    """`echo` + `logprobs` with `max_tokens` 0 (and 1, as lm-eval asks): OpenAI's legacy shape for the prompt
    tokens (null first), equal to a full forward; text and token-id prompts batched in one request."""
    app, model = tiny_app
    c = TestClient(app)
    text = "The cat sat on the mat, the end."
    ids_text = [TOK.bos_id, *TOK.encode(text)]  # the V3.2 family puts BOS in front of a text prompt
    ids_tok = TOK.encode("Another prompt, given as ids.")
    body = {"model": "tiny", "prompt": [text], "echo": True, "logprobs": 2, "max_tokens": 0}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert ch["text"] == text and ch["finish_reason"] == "length"
    lp = ch["logprobs"]
    ref = _full_logprobs(model, ids_text)
    assert lp["tokens"] == [TOK.decode([t]) for t in ids_text]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = ref[:-1].gather(-1, torch.tensor(ids_text[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-5, rtol=0)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids_text))]
    for i in range(1, len(ids_text)):
        top = lp["top_logprobs"][i]
        best = ref[i - 1].topk(2)
        assert {TOK.decode([int(t)]) for t in best.indices} | {lp["tokens"][i]} == set(top)
        assert max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-5)
    # batched: a text prompt and a token-id prompt; max_tokens=1 scores the prompt and samples one token
    body = {"model": "tiny", "prompt": [ids_text, ids_tok], "echo": True, "logprobs": 1, "max_tokens": 1,
            "temperature": 0}
    out = c.post("/v1/completions", json=body).json()["choices"]
    for ch, ids in zip(out, (ids_text, ids_tok)):
        ref = _full_logprobs(model, ids)
        toks = ch["logprobs"]["token_logprobs"]
        assert len(toks) == len(ids) + 1 and toks[0] is None
        want = ref[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(toks[1 : len(ids)]), want, atol=1e-5, rtol=0)
        assert toks[-1] == pytest.approx(float(ref[-1].max()), abs=1e-5)  # greedy: the arg-max
    # streamed: the echo chunk carries the prompt's logprobs
    ev = sse(c.post("/v1/completions", json={**body, "prompt": ids_tok, "stream": True}).text)
    assert ev[0]["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        out[1]["logprobs"]["token_logprobs"][1 : len(ids_tok)], abs=1e-5)


def test_prompt_logprobs_extension(tiny_app):
    """vLLM's `prompt_logprobs` on chat and completions: {id: {logprob, rank, decoded_token}} per position."""
    app, model = tiny_app
    c = TestClient(app)
    ids = TOK.encode("score me")
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": ids, "prompt_logprobs": 1, "max_tokens": 1}).json()
    plp = r["choices"][0]["prompt_logprobs"]
    ref = _full_logprobs(model, ids)
    assert plp[0] is None and len(plp) == len(ids)
    for i in range(1, len(ids)):
        e = plp[i][str(ids[i])]
        assert e["logprob"] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-5)
        assert e["rank"] == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
        assert {v["rank"] for v in plp[i].values()} >= {1}
    r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "prompt_logprobs": 0, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["prompt_logprobs"][0] is None
    assert len(r.json()["prompt_logprobs"]) == r.json()["usage"]["prompt_tokens"]
    r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "prompt_logprobs": 0, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_sampling_parameters_reach_the_engine(tiny_app):
    """logit_bias, the penalties, min_tokens and repetition_penalty over HTTP give exactly what the engine gives
    with the same SamplingParams (the engine's processing is tested against a reference in test_engine)."""
    from dsv32.engine import SamplingParams

    app, model = tiny_app
    c = TestClient(app)
    ids = TOK.encode("penalties")
    eng = app.state.engine
    plain = eng.generate(ids, SamplingParams(max_tokens=8, temperature=0)).sequences[0].tokens
    cases = [
        ({"logit_bias": {str(plain[0]): -100}}, dict(logit_bias={plain[0]: -100.0})),
        ({"logit_bias": {"65": 100}}, dict(logit_bias={65: 100.0})),
        ({"logit_bias": {"66": 6}, "presence_penalty": 1.5, "frequency_penalty": 0.5},
         dict(logit_bias={66: 6.0}, presence_penalty=1.5, frequency_penalty=0.5)),
        ({"logit_bias": {"66": 6}, "repetition_penalty": 1.7}, dict(logit_bias={66: 6.0}, repetition_penalty=1.7)),
        ({"stop_token_ids": [plain[1]], "min_tokens": 3}, dict(stop_token_ids=(plain[1],), min_tokens=3)),
    ]
    for fields, kw in cases:
        body = {"model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **fields}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        want = eng.generate(ids, SamplingParams(max_tokens=8, temperature=0, **kw)).sequences[0].tokens
        assert want != plain and r.json()["choices"][0]["text"] == TOK.decode(want), fields
    a = TOK.encode("A")[0]
    assert c.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 4, "temperature": 0,
                                          "logit_bias": {str(a): 100}}).json()["choices"][0]["text"] == "AAAA"


def test_unsupported_parameters_are_named(make_client):
    c = make_client("ok")
    ok = c.post("/v1/chat/completions", json=chat_body(metadata={"k": "v"}, store=False, user="u1",
                                                       safety_identifier="s", prompt_cache_key="k"))
    assert ok.status_code == 200, ok.text
    for field, value in (("functions", []), ("audio", {}), ("modalities", ["text"]), ("prediction", {}),
                         ("web_search_options", {}), ("guided_json", {}), ("temprature", 0.5)):
        r = c.post("/v1/chat/completions", json=chat_body(**{field: value}))
        assert r.status_code == 400 and r.json()["error"]["param"] == field and field in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"model": "test-model", "prompt": "x", "logit_bias": {"x": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    for bias in ({"99999": 1}, {"5": 101}, {"-1": 1}):
        r = c.post("/v1/completions", json={"model": "test-model", "prompt": "x", "logit_bias": bias})
        assert r.status_code == 400
    r = c.post("/v1/completions", json={"model": "test-model", "prompt": "x", "bogus": 1})
    assert r.json()["error"]["param"] == "bogus" and r.json()["error"]["code"] == "unsupported_parameter"


def test_reasoning_effort_maps_to_thinking(make_client):
    c = make_client("Because.")
    r = c.post("/v1/chat/completions", json=chat_body(reasoning_effort="high")).json()
    assert "reasoning_content" in r["choices"][0]["message"]  # thinking on
    r = c.post("/v1/chat/completions", json=chat_body(reasoning_effort="none")).json()
    assert "reasoning_content" not in r["choices"][0]["message"]
    r = c.post("/v1/chat/completions", json=chat_body(reasoning_effort="low", thinking={"type": "disabled"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"
    assert c.post("/v1/chat/completions", json=chat_body(reasoning_effort="extreme")).status_code == 400
    cm = make_client("Hi", tok=byte_tokenizer("chatml"), family="chatml")
    assert cm.post("/v1/chat/completions", json=chat_body(reasoning_effort="minimal")).status_code == 200
    r = cm.post("/v1/chat/completions", json=chat_body(reasoning_effort="medium"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"


def test_tokenizer_endpoints(make_client):
    """vLLM's /tokenizer_info, /tokenize (text or messages) and /detokenize, behind the same key."""
    c = make_client("ok", api_key="k")
    auth = {"Authorization": "Bearer k"}
    assert c.get("/tokenizer_info").status_code == 401
    assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401
    info = c.get("/tokenizer_info", headers=auth).json()
    assert info["eos_token"] == TOK.eos_token and info["bos_token"] == TOK.bos_token
    assert info["model_max_length"] == 3072 and info["add_bos_token"] is True
    r = c.post("/tokenize", json={"prompt": "héllo", "add_special_tokens": False}, headers=auth).json()
    assert r == {"count": len(TOK.encode("héllo")), "max_model_len": 3072, "tokens": TOK.encode("héllo"),
                 "token_strs": None}
    r = c.post("/tokenize", json={"model": "test-model", "prompt": "hi"}, headers=auth).json()
    assert r["tokens"] == [TOK.bos_id, *TOK.encode("hi")]  # what /v1/completions prefills for "hi"
    chat_ids = c.post("/tokenize", json={"messages": USER}, headers=auth).json()
    usage = c.post("/v1/chat/completions", json=chat_body(), headers=auth).json()["usage"]
    assert chat_ids["count"] == usage["prompt_tokens"]
    cm = make_client("ok", tok=byte_tokenizer("chatml"), family="chatml")
    gen, no_gen = (cm.post("/tokenize", json={"messages": USER, "add_generation_prompt": g}).json()
                   for g in (True, False))
    assert no_gen["count"] == gen["count"] - len(byte_tokenizer("chatml").encode(f"{chat.IM_START}assistant\n"))
    ids = TOK.encode("round trip ✓")
    assert c.post("/detokenize", json={"tokens": ids}, headers=auth).json() == {"prompt": "round trip ✓"}
    for path, body in (("/detokenize", {"tokens": [10**6]}), ("/detokenize", {"tokens": "x"}),
                       ("/tokenize", {}), ("/tokenize", {"prompt": "x", "extra": 1}),
                       ("/tokenize", {"messages": [{"role": "robot"}]})):
        r = c.post(path, json=body, headers=auth)
        assert r.status_code == 400, (path, body, r.text)
    assert c.post("/tokenize", json={"model": "nope", "prompt": "x"}, headers=auth).status_code == 404
    r = c.post("/tokenize", content=b"prompt=x", headers={**auth, "Content-Type": "text/plain"})
    assert r.status_code == 415


def test_parallel_tool_calls_false_keeps_one_call(make_client):
    two = CALL.replace(f"</{DSML}invoke>\n", f'</{DSML}invoke>\n<{DSML}invoke name="get_time">\n</{DSML}invoke>\n')
    c = make_client("Calling." + two)
    calls = c.post("/v1/chat/completions", json=chat_body(tools=TOOLS)).json()["choices"][0]["message"]["tool_calls"]
    assert [x["function"]["name"] for x in calls] == ["get_weather", "get_time"]
    for stream in (False, True):
        r = c.post("/v1/chat/completions", json=chat_body(tools=TOOLS, parallel_tool_calls=False, stream=stream))
        if stream:
            calls = [d for e in sse(r.text)[:-1] for d in e["choices"][0]["delta"].get("tool_calls", [])]
        else:
            calls = r.json()["choices"][0]["message"]["tool_calls"]
        assert [x["function"]["name"] for x in calls] == ["get_weather"]
