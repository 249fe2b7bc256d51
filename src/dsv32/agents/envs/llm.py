"""LLM-driven environment synthesis: the paper's loop (§3.3, general agent) against any OpenAI-compatible
chat endpoint. Given a category, the model

1. writes a program that builds the data as `db.sqlite` (run in the sandbox, its scratch dir the only
   writable place);
2. writes the tools as Python functions over that db (`tools.py`; schemas read from the source by `ast`);
3. proposes a simple task with a Python solution (tools only) and a Python verifier; we run solution ->
   verifier in the sandbox, also check that empty answers fail, and send any failure back for repair until
   they agree (or the repair budget is spent);
4. raises the difficulty step by step, each harder task validated the same way.

Everything the model writes is untrusted and runs only through the sandbox. The result is an environment
directory in the same layout as the programmatic generator's (`env.json` marks `"generator": "llm"`).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv32.agents.envs.base import CHECKS_SOURCE, SUBMIT_TOOL, TOOLS_PREAMBLE, schemas_from_source, write_tasks
from dsv32.agents.envs.session import run_jobs
from dsv32.agents.sandbox import run_python

Chat = Callable[[list[dict]], str]          # messages -> the assistant's reply text

SYSTEM = """You build environments for training tool-using agents: a SQLite database, tools over it, and tasks
that are hard to solve but easy to verify. Everything you write runs in a sandbox with Python's standard library
only and no network. Reply with exactly one fenced code block of the language asked for."""

DATA_PROMPT = """Category: {category}.
Write a Python program that creates the file db.sqlite in the current directory with sqlite3 and fills it with
realistic, varied, made-up data for this category (several related tables, 20-200 rows each, unique names).
Reply with one ```python block."""

TOOLS_PROMPT = """The database has this schema:
{schema}
Write the environment's tools: plain top-level Python functions with type-annotated parameters (str, int,
float, bool, list[str]) and a docstring (a one-line description, then an "Args:" section with one "name:
description" line per parameter). They return JSON-like values and raise ValueError for unknown names. Use
only these helpers, already defined above your code: _rows(sql, args) -> list[dict], _col(sql, args) -> list,
_get(table, key, value) -> dict. No imports of your own, no writes. Write 4-10 tools that let an agent explore
the data step by step. Reply with one ```python block holding only the functions."""

TASK_PROMPT = """Tools available to solutions (call them as plain functions):
{tools}
Propose {what} task for this environment. Reply with one ```json block holding an object with:
"prompt": the task for the agent (say exactly what form the answer takes),
"solution": Python that may only call the tools and plain Python logic and sets the variable `answer`,
"verifier": Python defining verify(answer) -> bool that checks a submitted answer robustly (normalise strings,
  tolerate float round-off, ignore order where it does not matter; for open-ended tasks check the constraints
  through the tools); `from checks import check, norm, same_number, same_set, same_list, field` is available,
"answer_schema": a JSON schema of the answer's type."""

HARDER = ("a harder version of the last task: keep its idea and add one more constraint or step, so that it "
          "needs more tool calls and more reasoning. The previous task was:\n{previous}\n\nPropose")


def http_chat(base_url: str, model: str, api_key: str | None = None, *, temperature: float = 0.7,
              timeout: float = 300.0) -> Chat:
    """A `Chat` for an OpenAI-compatible `/chat/completions` endpoint (standard library HTTP)."""
    url = base_url.rstrip("/") + "/chat/completions"

    def chat(messages: list[dict]) -> str:
        body = json.dumps({"model": model, "messages": messages, "temperature": temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:      # noqa: S310 - the user's own endpoint
            reply = json.loads(r.read())
        return reply["choices"][0]["message"].get("content") or ""
    return chat


def last_block(text: str, lang: str) -> str:
    """The last fenced ```lang block of a reply (or the last unlabelled one); ValueError if none."""
    blocks = re.findall(r"```([A-Za-z0-9_-]*)[ \t]*\n(.*?)```", text, flags=re.S)
    for want in (lang, ""):
        found = [body for tag, body in blocks if tag.lower() == want]
        if found:
            return found[-1]
    raise ValueError(f"the reply has no ```{lang} block")


@dataclass
class LLMEnvResult:
    path: Path | None
    tasks: list[dict] = field(default_factory=list)
    log: list[str] = field(default_factory=list)       # what happened, one line per step (repairs included)


class LLMEnvBuilder:
    """Runs the loop for one category; `repairs` bounds the fix-up rounds of each step."""

    def __init__(self, chat: Chat, *, repairs: int = 3, unsafe: bool = False, timeout: float = 60.0):
        self.chat, self.repairs, self.unsafe, self.timeout = chat, repairs, unsafe, timeout

    def _ask(self, messages: list[dict], lang: str, check: Callable[[str], str | None], log: list[str],
             step: str) -> str | None:
        """Ask, extract the block, check it; on failure send the problem back (up to `repairs` times)."""
        for attempt in range(self.repairs + 1):
            reply = self.chat(messages)
            messages.append({"role": "assistant", "content": reply})
            try:
                block = last_block(reply, lang)
                problem = check(block)
            except ValueError as e:
                problem = str(e)
            if problem is None:
                log.append(f"{step}: ok after {attempt} repair(s)")
                return block
            log.append(f"{step}: attempt {attempt} rejected: {problem[:300]}")
            messages.append({"role": "user", "content": f"That did not work:\n{problem[:4000]}\nFix it and reply "
                                                        f"with the corrected ```{lang} block."})
        return None

    def build(self, category: str, out_dir: Path, name: str, levels: int = 3, seed: int = 0) -> LLMEnvResult:
        res = LLMEnvResult(None)
        env = Path(out_dir) / name
        work = Path(tempfile.mkdtemp(prefix="dsv32-llmenv-"))
        try:
            msgs = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": DATA_PROMPT.format(category=category)}]

            def data_ok(program: str) -> str | None:
                for p in work.iterdir():
                    (shutil.rmtree if p.is_dir() else Path.unlink)(p)
                r = run_python(program, scratch=work, timeout=self.timeout, unsafe=self.unsafe)
                if not r.ok or not (work / "db.sqlite").is_file():
                    return f"the program failed ({r.error or r.returncode}):\n{(r.stderr or r.stdout)[-3000:]}"
                return None

            if self._ask(msgs, "python", data_ok, res.log, "data") is None:
                return res
            schema = run_python("import sqlite3\nfor (s,) in sqlite3.connect('db.sqlite').execute("
                                "\"SELECT sql FROM sqlite_master WHERE type='table'\"):\n    print(s)\n",
                                scratch=work, timeout=self.timeout, unsafe=self.unsafe).stdout
            env.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / "db.sqlite", env / "db.sqlite")
            shutil.copyfile(CHECKS_SOURCE, env / "checks.py")

            msgs.append({"role": "user", "content": TOOLS_PROMPT.format(schema=schema)})
            schemas: list[dict] = []

            def tools_ok(body: str) -> str | None:
                source = TOOLS_PREAMBLE + "\n\n" + body
                try:
                    schemas[:] = schemas_from_source(source)
                except (SyntaxError, ValueError) as e:
                    return f"tools.py is not usable: {e}"
                if not schemas:
                    return "no public tool functions found"
                self._write_env(env, category, seed, source, schemas, levels)
                r = run_python(f"import sys\nsys.path.insert(0, {str(env.resolve())!r})\nimport tools\n",
                               scratch=work, ro_paths=[env], timeout=self.timeout, unsafe=self.unsafe)
                return None if r.ok else f"importing tools.py failed:\n{(r.stderr or r.error or '')[-3000:]}"

            if self._ask(msgs, "python", tools_ok, res.log, "tools") is None:
                return res
            listing = "\n".join(f"- {s['function']['name']}({', '.join(s['function']['parameters']['properties'])})"
                                f": {s['function']['description']}" for s in schemas)
            previous = None
            for level in range(1, levels + 1):
                what = "a simple" if previous is None else HARDER.format(previous=previous["prompt"])
                msgs.append({"role": "user", "content": TASK_PROMPT.format(tools=listing, what=what)})
                task: dict[str, Any] = {}

                def task_ok(text: str, level: int = level, task: dict = task) -> str | None:
                    try:
                        t = json.loads(text)
                    except ValueError as e:
                        return f"not valid JSON: {e}"
                    missing = [k for k in ("prompt", "solution", "verifier", "answer_schema") if k not in t]
                    if missing:
                        return f"missing keys: {missing}"
                    tid = f"{name}-{len(res.tasks):02d}"
                    job = {"op": "validate", "id": tid, "solution": t["solution"], "verifier": t["verifier"],
                           "reference": None, "prompt": t["prompt"], "answer_schema": t["answer_schema"],
                           "random": 0}
                    (out,) = run_jobs(env, [job], job_timeout=self.timeout, unsafe=self.unsafe)
                    if out.get("fatal") or out.get("error"):
                        return f"the solution failed:\n{out.get('fatal') or out.get('error')}"
                    if not out.get("solution_ok"):
                        return (f"the solution's answer {json.dumps(out.get('answer'))[:1000]} fails the verifier "
                                f"({out.get('solution_reason')}); fix whichever is wrong")
                    if any(out.get("empty_ok", [])):
                        return "the verifier accepts an empty answer (None, '', [] or {})"
                    task.update(id=tid, category=category, difficulty=level, kind="llm", prompt=t["prompt"],
                                answer_schema=t["answer_schema"], solution=t["solution"], verifier=t["verifier"],
                                answer=out["answer"], pass_k=None)
                    return None

                if self._ask(msgs, "json", task_ok, res.log, f"task level {level}") is None:
                    break
                res.tasks.append(task)
                previous = task
            write_tasks(env, res.tasks)
            res.path = env
            return res
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _write_env(self, env: Path, category: str, seed: int, source: str, schemas: list[dict], levels: int) -> None:
        (env / "tools.py").write_text(source, encoding="utf-8")
        meta = {"category": category, "generator": "llm", "seed": seed, "difficulty": [1, levels], "tools": schemas,
                "submit_tool": SUBMIT_TOOL}
        (env / "env.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        env.chmod(0o755)
        for f in env.iterdir():
            f.chmod(0o644)
