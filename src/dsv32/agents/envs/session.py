"""Running an environment's code in the sandbox: batches of runner jobs (`run_jobs`, one sandboxed process
for all the tasks of an environment), a policy's interactive access (`ToolSession`), and the paper's pass@k
filter (§3.3: a task is kept only if some policy solves it at least once in k tries; V3.2 used k = 100).

`ToolSession` runs the environment's tools.py inside a sandboxed notebook kernel (`agents.notebook`), so the
host never imports untrusted tool code: each call is checked against the tool's schema on the host
(`agents.tools.check_arguments`), executed in the kernel, and comes back as JSON. A policy is any callable
`policy(task, session, rng) -> answer` (the agent loop plugs in here); `random_policy` is the floor used by
`dsv32 synth`'s measurements.
"""

from __future__ import annotations

import functools
import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsv32.agents.envs.base import read_tasks, write_tasks
from dsv32.agents.envs.runner import random_episode
from dsv32.agents.sandbox import run_python
from dsv32.agents.tools import EnvironmentTools, ToolError, check_arguments

RUNNER_SOURCE = Path(__file__).with_name("runner.py").read_text(encoding="utf-8")

#: stdout kept per runner job. All results share one stream, so the sandbox's cap grows with the job count: at
#: its 64 KiB default, 48 `trip` validations (1.3 KB each: answers, random episodes) lost their last result.
JOB_OUTPUT_CAP = 256 * 1024
TRUNCATED = "[... output truncated:"


def run_jobs(env_dir: Path, jobs: list[dict], *, job_timeout: float = 20.0, unsafe: bool = False,
             memory_mb: int = 1024, job_output_cap: int = JOB_OUTPUT_CAP) -> list[dict]:
    """Run runner jobs for one environment in ONE sandboxed process; one result per job, in order (a job
    the process never answered, e.g. after a crash or past the output cap, comes back as {"fatal": why}).
    ``job_output_cap``: stdout bytes allowed per job (the stream's cap is that times the number of jobs)."""
    env_dir = Path(env_dir).resolve()
    if len({j["id"] for j in jobs}) != len(jobs):
        raise ValueError("run_jobs: job ids must be unique (results are matched to jobs by id)")
    spec = json.dumps({"env": str(env_dir), "timeout": job_timeout, "jobs": jobs})
    with tempfile.TemporaryDirectory(prefix="dsv32-synth-") as scratch:
        res = run_python(RUNNER_SOURCE, scratch=Path(scratch), ro_paths=[env_dir], stdin=spec,
                         timeout=30 + job_timeout * len(jobs), memory_mb=memory_mb, unsafe=unsafe,
                         output_cap=job_output_cap * max(1, len(jobs)))
    got: dict[str, dict] = {}
    for line in res.stdout.splitlines():
        try:
            out = json.loads(line)
        except ValueError:
            continue
        if isinstance(out, dict) and "id" in out:
            got[out["id"]] = out
    why = res.error or (res.stderr.strip()[-1500:] or f"exit status {res.returncode}")
    if TRUNCATED in res.stdout[-200:]:
        why = f"the runner's output passed its cap of {job_output_cap} bytes per job and was cut ({why})"
    return [got.get(j["id"], {"id": j["id"], "op": j["op"], "fatal": f"runner gave no result: {why}"})
            for j in jobs]


class ToolCallError(Exception):
    """A tool call failed (bad arguments, the tool raised, the sandbox stopped it): tell the policy."""


class ToolSession:
    """A host-side policy's access to one environment: the tools run through `agents.tools.EnvironmentTools`
    (their own sandboxed kernel, env dir read-only); this adds the schema check of every call, JSON results,
    and the task's verifier run in that same kernel (no process start per verification)."""

    def __init__(self, env_dir: str | Path, *, timeout: float = 20.0, unsafe: bool = False):
        self.env = Path(env_dir).resolve()
        self.tools = EnvironmentTools(self.env, timeout=timeout, unsafe=unsafe)
        self.schemas: list[dict] = list(self.tools.schemas.values())
        self.tool_names = list(self.tools.schemas)
        self._booted = False

    def call(self, name: str, arguments: dict | str | None = None) -> Any:
        """Run tool `name`; raises ToolCallError with the message a model would see."""
        if name not in self.tools.schemas:
            raise ToolCallError(f"unknown tool {name!r}; tools: {', '.join(self.tool_names)}")
        try:
            args = check_arguments(self.tools.schemas[name], arguments)
            return json.loads(self.tools.call(name, args).content)
        except ToolError as e:
            raise ToolCallError(f"{name}: {e}") from None

    def verify(self, task: dict, answer: Any) -> tuple[bool, str]:
        """The task's verifier on a submitted answer, in the tools' kernel (it may call the tools)."""
        nb = self.tools.session
        if not (self._booted and nb.alive):          # first use, or the kernel restarted: load the runner
            setup = (f"import json, sys, types\nsys.path.insert(0, {str(self.env)!r})\n"
                     "_runner = types.ModuleType('dsv32_env_runner')\n"
                     f"exec(compile({RUNNER_SOURCE!r}, 'runner.py', 'exec'), _runner.__dict__)\n"
                     f"_TOOLS, _ = _runner.load_tools({str(self.env)!r})\n")
            r = nb.execute(setup)
            if not r.ok:
                return False, f"verifier could not start: {r.error}"
            self._booted = True
        payload = json.dumps(json.dumps(answer, default=str))
        r = nb.execute(f"print(json.dumps(_runner.verify(_TOOLS, {task['verifier']!r}, json.loads({payload}), "
                       f"{task['id']!r})))")
        if not r.ok or not r.output.strip():
            self._booted = self._booted and not r.restarted
            return False, f"verifier failed: {r.error}"
        ok, why = json.loads(r.output.strip().splitlines()[-1])
        return bool(ok), str(why)

    def close(self) -> None:
        self.tools.close()

    def __enter__(self) -> ToolSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Policy = Callable[[dict, ToolSession, random.Random], Any]


def _forward(session: ToolSession, name: str, **kwargs) -> Any:
    return session.call(name, kwargs)


def random_policy(task: dict, session: ToolSession, rng: random.Random) -> Any:
    """1-8 schema-valid tool calls with arguments drawn from values seen so far, then a random answer of the
    task's answer schema (the same policy `dsv32 synth` measures inside its batch runner)."""
    tools = {n: functools.partial(_forward, session, n) for n in session.tool_names}
    answer, _ = random_episode(tools, session.schemas, task["prompt"], task["answer_schema"], rng, rng.randint(1, 8))
    return answer


POLICIES: dict[str, Policy] = {"random": random_policy}


def pass_at_k(env_dir: str | Path, policy: Policy, k: int, *, seed: int = 0, stop_at_first: bool = True,
              unsafe: bool = False) -> dict[str, dict]:
    """Per task: up to `k` tries of `policy`, each verified. With `stop_at_first` (all the filter needs) a
    task stops at its first success. Returns {task id: {"k", "tries", "solved"}}."""
    out: dict[str, dict] = {}
    with ToolSession(env_dir, unsafe=unsafe) as session:
        for t in read_tasks(env_dir):
            tries = solved = 0
            for i in range(k):
                rng = random.Random(f"{seed}-{t['id']}-{i}")
                try:
                    answer = policy(t, session, rng)
                except Exception:  # noqa: BLE001 - a crashing try is a failed try
                    answer = None
                tries += 1
                solved += session.verify(t, answer)[0]
                if solved and stop_at_first:
                    break
            out[t["id"]] = {"k": k, "tries": tries, "solved": solved}
    return out


def filter_pass_k(env_dir: str | Path, policy: Policy, k: int, **kwargs) -> tuple[list[dict], list[dict]]:
    """The paper's filter: record each task's `pass_k` and keep only tasks the policy solved at least once
    (tasks.jsonl is rewritten with the kept ones). Returns (kept, dropped)."""
    results = pass_at_k(env_dir, policy, k, **kwargs)
    kept, dropped = [], []
    for t in read_tasks(env_dir):
        t["pass_k"] = results[t["id"]]
        (kept if t["pass_k"]["solved"] else dropped).append(t)
    write_tasks(Path(env_dir), kept)
    return kept, dropped
