"""Hardening of `dsv32 serve`, against live servers: body cap (413), JSON Content-Type (415), JSON nesting
(400), the loopback Host guard (DNS rebinding), cross-origin POSTs, prompt ids checked against the model's
vocabulary, the character-length check before tokenising, tokenising off the event loop, and the warning for
a server exposed without a key.

Most tests share one `dsv32 serve` process (a saved tiny V3.2 checkpoint whose embedding is one row smaller
than the byte tokenizer's vocabulary, so that a tokenizer-valid id can still be out of the model's range);
the two that need to look inside (a counting tokenizer, a slow scripted model) run the app in-process on
uvicorn over loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

for _dep in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_dep, reason="the server needs fastapi, uvicorn and httpx (pip install -e '.[serve,test]')")

import httpx  # noqa: E402

from dsv32 import ModelConfig, Transformer, save_model  # noqa: E402
from dsv32.serve import create_app  # noqa: E402
from dsv32.serve.cli import exposure_warning  # noqa: E402
from dsv32.serve.protocol import MAX_JSON_DEPTH  # noqa: E402
from dsv32.tokenizer import load_tokenizer  # noqa: E402
from serving_fakes import LiveServer, byte_tokenizer, scripted  # noqa: E402

TOK = byte_tokenizer()
MODEL_VOCAB = TOK.vocab_size - 1  # the last tokenizer id (the DSML marker) has no embedding row
BODY_CAP = 65536
USER = [{"role": "user", "content": "Hi there"}]


def _start(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            return proc, line.split("listening on")[1].strip()
    proc.kill()
    raise RuntimeError(f"dsv32 serve did not start: {proc.stdout.read()}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`dsv32 serve` on 127.0.0.1 without a key -> (base url, port)."""
    ckpt = tmp_path_factory.mktemp("hardening") / "m"
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.from_name("tiny").replace(vocab_size=MODEL_VOCAB)), ckpt)
    TOK.save(ckpt)
    env = {k: v for k, v in os.environ.items() if k != "DSV32_API_KEY"}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "dsv32", "serve", "--model", str(ckpt), "--port", "0", "--max-slots", "2",
           "--max-len", "256", "--max-body-bytes", str(BODY_CAP), "--threads", "1", "--log-level", "warning"]
    proc, url = _start(cmd, env)
    try:
        yield url, int(url.rsplit(":", 1)[1])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def chat_body(**kw) -> dict:
    return {"model": "m", "messages": USER, "max_tokens": 4, **kw}


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_body_cap_is_413(served):
    url, _ = served
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * BODY_CAP}]))
    r = httpx.post(url + "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    err = error(r, 413)
    assert err["code"] == "request_too_large" and str(BODY_CAP) in err["message"]

    def chunks():  # no Content-Length: the cap holds while the body streams in
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192].encode()

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert error(r, 413)["code"] == "request_too_large"
    ok = httpx.post(url + "/v1/chat/completions", json=chat_body())
    assert ok.status_code == 200, ok.text


def test_content_type_must_be_json(served):
    url, _ = served
    body = json.dumps(chat_body())
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(url + "/v1/chat/completions", content=body, headers=headers)
        assert error(r, 415)["code"] == "unsupported_media_type", ctype
    headers = {"Content-Type": "application/json; charset=utf-8"}
    r = httpx.post(url + "/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 200


def test_cross_origin_post_never_reaches_the_engine(served):
    url, port = served
    body = json.dumps(chat_body())
    # what a page on another site can make a browser send without a CORS preflight: text/plain
    r = httpx.post(url + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert r.status_code in (403, 415)
    r = httpx.post(url + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json", "Origin": "http://evil.example"})
    assert error(r, 403)["code"] == "cross_origin"
    r = httpx.post(url + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json", "Origin": "null"})
    assert error(r, 403)["code"] == "cross_origin"
    same = httpx.post(url + "/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{port}"})
    assert same.status_code == 200, same.text  # the chat page at / posts from its own origin


def test_deep_json_is_400(served):
    url, _ = served
    deep = '{"model": "m", "messages": ' + "[" * 20_000 + "]" * 20_000 + "}"  # past json's recursion limit
    r = httpx.post(url + "/v1/chat/completions", content=deep, headers={"Content-Type": "application/json"})
    assert error(r, 400)["type"] == "invalid_request_error"
    nested: dict = {"type": "object"}
    for _ in range(MAX_JSON_DEPTH):
        nested = {"type": "object", "properties": {"x": nested}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": nested}}]
    r = httpx.post(url + "/v1/chat/completions", json=chat_body(tools=tools))
    assert "nests JSON deeper" in error(r, 400)["message"]


def test_host_must_be_loopback(served):
    url, port = served
    for host in ("evil.example", f"evil.example:{port}", "192.168.1.10", "localhost.evil.example"):
        r = httpx.get(url + "/v1/models", headers={"Host": host})
        assert error(r, 403)["code"] == "host_not_allowed", host
        r = httpx.post(url + "/v1/chat/completions", json=chat_body(), headers={"Host": host})
        assert r.status_code == 403, host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.2", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host


def test_token_ids_checked_against_the_models_vocabulary(served):
    """An id the tokenizer knows but the model has no row for is a 400 for that request alone: a request
    streaming at the same time finishes normally (in the engine the id would fail the whole batch)."""
    url, _ = served
    assert TOK.vocab_size == MODEL_VOCAB + 1
    body = {"model": "m", "prompt": "Once upon", "max_tokens": 40, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=60) as client, client.stream("POST", "/v1/completions", json=body) as s:
        lines = s.iter_lines()
        assert next(lines).startswith("data: ")
        for bad in ([MODEL_VOCAB], [TOK.bos_id, 5, MODEL_VOCAB + 10**6], [-1]):
            r = client.post("/v1/completions", json={"model": "m", "prompt": bad, "max_tokens": 2})
            err = error(r, 400)
            assert err["param"] == "prompt" and "outside the model's vocabulary" in err["message"], err
        events = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    ok = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": [MODEL_VOCAB - 1], "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    # a text prompt that tokenises to the missing id is refused the same way
    r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "a ｜DSML｜ b", "max_tokens": 2})
    assert "vocabulary" in error(r, 400)["message"]


def test_exposure_warning(tmp_path: Path):
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", "a-key") is None
    env = {k: v for k, v in os.environ.items() if k != "DSV32_API_KEY"}
    # the warning comes before the model loads, so a missing checkpoint ends the run before anything binds
    cmd = [sys.executable, "-m", "dsv32", "serve", "--host", "0.0.0.0", "--model", str(tmp_path / "none")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "WARNING: listening on 0.0.0.0 without an API key: anyone who can reach this address" in out.stderr


# ------------------------------------------------------------------------------ in-process, loopback


def test_with_a_key_other_hosts_and_origins_are_the_keys_business():
    """A key replaces the Host and Origin guards (a proxy may rewrite Host; a foreign page has no key)."""
    app = create_app(scripted(TOK, "Hi"), TOK, model_name="m", api_key="k", max_slots=1, max_len=256)
    headers = {"Host": "api.example", "Origin": "https://app.example"}
    with LiveServer(app) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body(), headers=headers)
        assert error(r, 401)["code"] == "invalid_api_key"
        headers["Authorization"] = "Bearer k"
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body(), headers=headers)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hi"


def test_no_chat_format_serves_completions_and_refuses_chat():
    """family=None (a base model's tokenizer without turn markers): completions run, chat and chat
    tokenising get a 400 that says why, instead of a start-up refusal of the whole server."""
    app = create_app(scripted(TOK, "Hi"), TOK, model_name="m", family=None, max_slots=1, max_len=256)
    with LiveServer(app) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "m", "messages": USER})
        assert "no chat format" in error(r, 400)["message"]
        r = httpx.post(srv.url + "/tokenize", json={"model": "m", "messages": USER})
        assert "no chat format" in error(r, 400)["message"]
        r = httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": "abc", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_prompt_longer_than_the_context_in_characters_is_not_tokenised(monkeypatch):
    tok = byte_tokenizer()
    calls = []
    real = tok.encode_batch
    monkeypatch.setattr(tok, "encode_batch", lambda texts, **kw: calls.append(len(texts)) or real(texts, **kw))
    app = create_app(scripted(tok, "Hi"), tok, model_name="m", max_slots=1, max_len=256)
    longest = max(len(s) for s in tok.backend.get_vocab(with_added_tokens=True))
    with LiveServer(app) as srv:
        huge = "x" * (256 * longest)  # at least 256 tokens whatever the text: cannot fit 256
        for path, body in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}),
            ("/v1/completions", {"prompt": ["short", huge]}),
        ):
            r = httpx.post(srv.url + path, json={"model": "m", **body})
            assert error(r, 400)["code"] == "context_length_exceeded"
            assert "characters" in r.json()["error"]["message"]
        assert calls == []  # refused before any tokenising
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "m", "messages": USER})
        assert r.status_code == 200 and calls


def test_a_huge_prompt_does_not_stall_other_streams():
    """A prompt of ~2 MB tokenises for seconds in a worker thread (encode_batch releases the GIL); a small
    stream keeps receiving its tokens meanwhile. (Tokenised on the event loop, it stalled every stream.)"""
    tok = load_tokenizer()
    app = create_app(scripted(tok, "word " * 300, delay=0.02), tok, model_name="m", max_slots=2, max_len=65536)
    huge = "The quick brown fox jumps over the lazy dog, 12345 times. " * 35_000  # ~2 MB, ~500K tokens
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as client:
        result: dict = {}

        def post_huge() -> None:
            t0 = time.monotonic()
            result["r"] = httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": huge}, timeout=120)
            result["s"] = time.monotonic() - t0

        body = {"model": "m", "messages": USER, "stream": True, "max_tokens": 300}
        with client.stream("POST", "/v1/chat/completions", json=body) as s:
            lines = s.iter_lines()
            next(lines)
            worker = threading.Thread(target=post_huge)
            worker.start()
            gaps, last = [], time.monotonic()
            for ln in lines:
                now = time.monotonic()
                if ln.startswith("data: ") and worker.is_alive():
                    gaps.append(now - last)
                last = now
            worker.join()
    # too long in tokens (it passed the character bound), refused after tokenising
    assert error(result["r"], 400)["code"] == "context_length_exceeded"
    assert len(gaps) > 10, (gaps, result["s"])
    assert max(gaps) < 1.0, f"a stream stalled {max(gaps):.2f}s while a {result['s']:.1f}s request tokenised"
