"""The chat page at `/`, driven in headless Chromium over the DevTools protocol (pipe transport: no extra
packages). A scripted model replies with reasoning, HTML-looking content and a tool call; the page must
stream it, put the reasoning in a collapsed block, show the tool call, and render markup as plain text.

Needs Debian's `chromium` (apt-get install -y chromium); skipped with that reason when it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

for _dep in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_dep, reason="the server needs fastapi, uvicorn and httpx (pip install -e '.[serve,test]')")

import httpx  # noqa: E402

from dsv32 import chat  # noqa: E402
from dsv32.serve import create_app  # noqa: E402
from serving_fakes import LiveServer, byte_tokenizer, scripted  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
TOK = byte_tokenizer()
REASONING = "Is <b>this</b> bold? No."
CONTENT = '<img src=x onerror="window.__pwned=1"> & <script>window.__pwned=2</script> done'
CALL = (
    f'\n\n<{chat.DSML}function_calls>\n<{chat.DSML}invoke name="get_time">\n'
    f'<{chat.DSML}parameter name="tz" string="true">UTC</{chat.DSML}parameter>\n'
    f"</{chat.DSML}invoke>\n</{chat.DSML}function_calls>"
)
TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


class DevTools:
    """Minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-framed)."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="dsv32-chromium-")
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: its end of each pipe becomes fd 3 / fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={self.profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            [binary, *flags], pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def call(self, method: str, timeout: float = 30.0, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                if time.monotonic() > deadline:
                    raise TimeoutError(method)
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(expression)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def server():
    model = scripted(TOK, REASONING + chat.END_THINK + CONTENT + CALL, delay=0.002)
    app = create_app(model, TOK, model_name="web-test", max_slots=2, max_len=3072)
    with LiveServer(app) as srv:
        yield srv


def test_page_is_served_with_a_strict_csp(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "dsv32" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "'unsafe-inline'" not in r.headers["content-security-policy"]
    js = httpx.get(server.url + "/web/app.js").text
    assert ".innerHTML" not in js and "insertAdjacentHTML" not in js and "textContent" in js


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)")
def test_chat_page_streams_reasoning_tools_and_escapes_html(server):
    dt = DevTools(CHROMIUM)
    try:
        dt.open(server.url + "/")
        dt.wait_for("document.body && document.body.dataset.state === 'idle' && window.dsv32Chat !== undefined")
        assert dt.js("document.getElementById('model').textContent").startswith("web-test")
        dt.js(
            f"document.getElementById('thinking').checked = true;"
            f"document.getElementById('tools').value = {json.dumps(json.dumps(TOOLS))};"
            # count how often the streamed text changes, to see it arrive piece by piece
            "window.__updates = 0; new MutationObserver(() => window.__updates++)"
            ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});"
            "window.dsv32Chat.send('What time is it?'); true"
        )
        dt.wait_for("document.body.dataset.state === 'streaming'", timeout=10)
        dt.wait_for("document.body.dataset.state !== 'streaming'", timeout=60)
        state = dt.js("""(() => {
            const a = document.querySelector('.msg.assistant');
            const d = a.querySelector('details.reasoning');
            return {
              state: document.body.dataset.state,
              content: a.querySelector('.content').textContent,
              reasoning: d.querySelector('.text').textContent,
              reasoningShown: !d.hidden, reasoningOpen: d.open,
              tools: [...a.querySelectorAll('.tool-call')].map(e => e.textContent),
              meta: a.querySelector('.meta').textContent,
              injected: document.querySelectorAll('#log img, #log script, #log b').length,
              pwned: window.__pwned === undefined ? null : window.__pwned,
              updates: window.__updates,
              history: window.dsv32Chat.state.messages,
            };
        })()""")
        assert state["state"] == "idle", state
        assert state["content"] == CONTENT  # the markup is shown as text
        assert state["injected"] == 0 and state["pwned"] is None
        assert state["reasoning"] == REASONING and state["reasoningShown"] and not state["reasoningOpen"]
        assert len(state["tools"]) == 1 and "get_time" in state["tools"][0] and '"tz": "UTC"' in state["tools"][0]
        assert "finish: tool_calls" in state["meta"]
        assert state["updates"] > 10  # streamed, not one final paint
        assert state["history"][-1]["tool_calls"][0]["function"]["name"] == "get_time"
        # the next message answers the tool call; the conversation goes on
        dt.js("window.dsv32Chat.send('12:00'); true")
        dt.wait_for(
            "document.querySelectorAll('.msg.assistant').length === 2 && document.body.dataset.state === 'idle'",
            timeout=60,
        )
        roles = dt.js("window.dsv32Chat.state.messages.map(m => m.role)")
        assert roles == ["user", "assistant", "tool", "assistant"]
    finally:
        dt.close()
