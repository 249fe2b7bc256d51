"""Test doubles for the agent tests: a one-task environment in `dsv32 synth`'s layout (its tools and verifier
run in the real sandbox), and a real HTTP server speaking OpenAI's chat API with scripted replies (the stand-in
for "any OpenAI-compatible endpoint")."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dsv32.agents.envs.base import CHECKS_SOURCE, SUBMIT_TOOL, schemas_from_source

TOOLS_PY = '''
PRICES = {"apples": 3, "pears": 5}


def get_price(item: str) -> int:
    """Price of one item in EUR.

    Args:
        item: the item's name
    """
    if item not in PRICES:
        raise ValueError(f"no item named {item!r}")
    return PRICES[item]


def list_items() -> list[str]:
    """All the item names."""
    return sorted(PRICES)
'''

TASK = {"id": "shop-0", "prompt": "What do two apples cost in EUR?", "difficulty": 1,
        "solution": "answer = 2 * get_price('apples')", "answer": 6, "answer_schema": {"type": "integer"},
        "verifier": "from checks import check\n\ndef verify(answer):\n    return check(answer, 6, 'number')\n"}


def write_shop_env(path: Path, task_ids: tuple[str, ...] = ("shop-0",)) -> Path:
    """An environment in the layout `dsv32 synth` writes (tools.py, env.json, checks.py, tasks.jsonl); every
    task is TASK under another id."""
    path.mkdir(parents=True)
    (path / "tools.py").write_text(TOOLS_PY)
    shutil.copyfile(CHECKS_SOURCE, path / "checks.py")
    meta = {"category": "shop", "seed": 0, "tools": schemas_from_source(TOOLS_PY), "submit_tool": SUBMIT_TOOL}
    (path / "env.json").write_text(json.dumps(meta))
    (path / "tasks.jsonl").write_text("".join(json.dumps({**TASK, "id": t}) + "\n" for t in task_ids))
    for p in [path.parent, path, *path.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path


class FakeEndpoint:
    """A real HTTP server speaking OpenAI's chat API with canned replies: `script(request) -> message`."""

    def __init__(self, script, max_model_len: int = 4096, total_tokens=None):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, body: dict):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "fake", "object": "model", "created": 0,
                                                        "owned_by": "test", "max_model_len": max_model_len}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(req)
                msg = {"role": "assistant", **script(req)}
                used = total_tokens(req) if total_tokens else 10 * len(req["messages"])
                self._send({"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                            "choices": [{"index": 0, "message": msg,
                                         "finish_reason": "tool_calls" if msg.get("tool_calls") else "stop"}],
                            "usage": {"prompt_tokens": used - 5, "completion_tokens": 5, "total_tokens": used}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def tc(i: int, name: str, args) -> dict:
    return {"id": f"c{i}", "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
