"""Agentic RL (issue 13 item 5): GRPO on synthesized agent environments, rolled out through the agent loop.

V3.2 trains its agents with the same GRPO stage as its reasoning (report §3.2-3.3): each task is an
<environment, tools, task, verifier> tuple, a rollout is a multi-turn trajectory that calls the environment's
tools, and the verifier's verdict is the reward. Here:

- ``env:DIR`` names every task of the environments ``dsv32 synth`` wrote at or under DIR (`load_env_tasks`
  validates them and names the file at fault).
- `sample_env_groups` runs G trajectories per task through `dsv32.agents.loop` on the policy's own engine, many
  at once in threads (the engine batches their turns; a tool call blocks only its own trajectory). The
  environment's tools and verifier run in the sandbox. Each trajectory is one `Rollout`: the prompt is the
  system prompt, the tool schemas and the user's task; the completion is the model's turns (``token_mask`` 1,
  with the sampler's log-probs, kept sets and MoE routes) interleaved with the tool results and the chat
  template around them (``token_mask`` 0: they are not the policy's actions and get no gradient).
- Thinking retention (§3.2): within one task there is one user message, so the model's earlier reasoning
  stays in its context across tool rounds; the sequence only grows, and what is trained is exactly what was
  sampled. Test-time context management (§4.4) is never applied in RL.
- The reward is the verifier's outcome: 1 for "correct", 0 otherwise (wrong, no answer, a malformed call block
  or a turn cut by the token limit, which end the trajectory). Each trajectory's seed is
  `completion_seed(run seed, step, group, sample)`, so a redone step samples the same tokens.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dsv32 import chat
from dsv32.agents.envs.base import SUBMIT_TOOL, find_environments, read_tasks
from dsv32.agents.loop import AgentConfig, EngineBackend, Trajectory, run_env_task, score_many
from dsv32.engine import Engine, LogitsMask
from dsv32.rl.rollout import Rollout, completion_seed

ENV_PREFIX = "env:"
TASK_FIELDS = ("id", "prompt", "verifier")  # what a task needs to be rolled out and rewarded


@dataclass(frozen=True)
class EnvTask:
    """One task of one synthesized environment: an entry of the pool of an ``env:DIR`` task set."""

    source: str  # the task-mix name, "env:DIR"
    env_dir: Path
    task: dict[str, Any] = field(compare=False, hash=False, repr=False)

    @property
    def id(self) -> str:
        return str(self.task["id"])


def is_env_spec(spec: str) -> bool:
    return spec.startswith(ENV_PREFIX)


def parse_env_spec(spec: str) -> tuple[Path, float]:
    """``env:DIR`` or ``env:DIR:WEIGHT`` -> (DIR, weight). A trailing ``:NUMBER`` is the weight unless DIR with
    it exists as a path."""
    body = spec[len(ENV_PREFIX):]
    if not is_env_spec(spec) or not body:
        raise ValueError(f"--task {spec!r}: expected env:DIR[:WEIGHT]")
    path, weight = Path(body), 1.0
    head, sep, tail = body.rpartition(":")
    if sep and head and not path.exists():
        try:
            path, weight = Path(head), float(tail)
        except ValueError:
            pass
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"--task {spec!r}: the weight must be a number > 0")
    return path, weight


def load_env_tasks(root: str | Path, source: str | None = None) -> list[EnvTask]:
    """Every task of the environments at or under ``root`` (sorted by environment, then file order), checked
    so that a bad directory fails before any model runs: each env.json is a JSON object with a ``tools`` list,
    tasks.jsonl exists and its tasks carry ``id``, ``prompt`` and ``verifier`` strings with unique ids.
    Errors (FileNotFoundError / ValueError) name the path at fault."""
    root = Path(root)
    source = source or f"{ENV_PREFIX}{root}"
    out: list[EnvTask] = []
    seen: dict[str, Path] = {}
    for env in find_environments(root):
        env = env.resolve()
        meta_file = env / "env.json"
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{meta_file}: not JSON ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("tools"), list):
            raise ValueError(f"{meta_file}: needs a 'tools' list (the environment's tool schemas)")
        if not (env / "tools.py").is_file():
            raise FileNotFoundError(f"{env / 'tools.py'}: missing (the environment's tools)")
        if not (env / "tasks.jsonl").is_file():
            raise FileNotFoundError(f"{env / 'tasks.jsonl'}: missing (the environment's tasks)")
        for n, task in enumerate(read_tasks(env), 1):
            bad = [k for k in TASK_FIELDS if not isinstance(task.get(k), str) or not task[k]]
            if bad:
                raise ValueError(f"{env / 'tasks.jsonl'}:{n}: task without {', '.join(bad)} (a non-empty string)")
            if task["id"] in seen:
                raise ValueError(f"{env / 'tasks.jsonl'}:{n}: task id {task['id']!r} is also in {seen[task['id']]}")
            seen[task["id"]] = env / "tasks.jsonl"
            out.append(EnvTask(source, env, task))
    if not out:
        raise ValueError(f"{root}: its environments hold no tasks (empty tasks.jsonl)")
    return out


def tool_schemas(env_dir: Path) -> list[dict[str, Any]]:
    """The functions a trajectory in ``env_dir`` is offered: its tools and its submit tool (as `EnvTools`)."""
    meta = json.loads((env_dir / "env.json").read_text(encoding="utf-8"))
    return [*meta["tools"], meta.get("submit_tool") or SUBMIT_TOOL]


def prompt_length(item: EnvTask, tokenizer: Any, family: str, cfg: AgentConfig) -> int:
    """Tokens of the first prompt of a trajectory on ``item`` (system, tool schemas, task): the shortest context
    its rollouts need."""
    msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
        {"role": "user", "content": item.task["prompt"]}]
    return len(chat.encode_chat(msgs, tools=tool_schemas(item.env_dir), thinking=cfg.thinking, family=family,
                                tokenizer=tokenizer)[0])


@dataclass
class EnvGroups:
    """What `sample_env_groups` returns: rollouts prompt-major (group, sample), their trajectories in the same
    order, and where the time went (``t_agents``: the trajectories, tool calls included; ``t_verify``: the
    verifiers)."""

    rollouts: list[Rollout]
    trajectories: list[Trajectory]
    t_agents: float
    t_verify: float


def sample_env_groups(
    engine: Engine,
    tokenizer: Any,
    family: str,
    items: Sequence[EnvTask],
    group_size: int,
    cfg: AgentConfig,
    *,
    run_seed: int,
    step: int,
    first_group: int = 0,
    threads: int = 0,
    unsafe: bool = False,
    logits_mask: Callable[[int], Callable[[], LogitsMask] | None] | None = None,
) -> EnvGroups:
    """``group_size`` trajectories of every task in ``items``, rewarded by the tasks' verifiers.

    ``cfg`` holds the per-trajectory settings (turns, tokens per turn, sampling, thinking); its seed is replaced
    by each trajectory's `completion_seed` (groups numbered from ``first_group``, as the step numbers them).
    ``threads``: trajectories run at once (0: all of them). ``logits_mask``: per turn, an engine mask factory
    (`EngineBackend`). Every trajectory ends as one `Rollout` (context management is off: ``cfg`` must say
    "none")."""
    if cfg.context_strategy != "none":
        raise ValueError("agentic RL rolls out without context management (it rewrites the trajectory)")
    if cfg.temperature <= 0:
        raise ValueError("RL sampling needs temperature > 0 (greedy rollouts have no log-probabilities)")
    jobs = [(g, j, it) for g, it in enumerate(items, start=first_group) for j in range(group_size)]

    def one(job: tuple[int, int, EnvTask]) -> Trajectory:
        g, j, it = job
        seed = completion_seed(run_seed, step, g, j)
        backend = EngineBackend(engine, tokenizer, family=family, logits_mask=logits_mask)
        return run_env_task(backend, it.env_dir, it.task, replace(cfg, seed=seed), unsafe=unsafe, verify=False)

    t0 = time.perf_counter()
    workers = min(len(jobs), threads or len(jobs))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="dsv32-agent") as pool:
        trajs = list(pool.map(one, jobs))
    t1 = time.perf_counter()
    by_env: dict[Path, list[tuple[dict, Trajectory]]] = defaultdict(list)
    for (_, _, it), traj in zip(jobs, trajs):
        by_env[it.env_dir].append((it.task, traj))
    for env_dir, pairs in by_env.items():  # one sandboxed verifier process per environment
        score_many(env_dir, pairs, unsafe=unsafe)
    t2 = time.perf_counter()
    rollouts = []
    for (g, j, it), traj in zip(jobs, trajs):
        ro = traj.rollout
        if ro is None:  # cannot happen without context management; say so rather than train on a gap
            raise RuntimeError(f"task {it.id}: the agent loop returned no rollout (stop: {traj.stop})")
        ro.group, ro.sample, ro.step = g, j, step
        ro.task = it.source
        ro.meta.update(task_id=it.id, stop=traj.stop, reason=traj.reason[:300], answer=traj.answer,
                       valid_calls=sum(c["valid"] for c in traj.calls))
        rollouts.append(ro)
    return EnvGroups(rollouts, trajs, t1 - t0, t2 - t1)


def agent_metrics(trajs: Sequence[Trajectory], rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Per-step agent figures: turns, tool calls and the share of them that were valid (a completion whose call
    block did not parse counts as one invalid call, as in `dsv32 eval agent`), the share of trajectories that
    submitted an answer, and the tool-output tokens per trajectory (``token_mask`` 0, out of the loss)."""
    n = max(len(trajs), 1)
    attempted = sum(len(t.calls) + t.malformed for t in trajs)
    valid = sum(sum(c["valid"] for c in t.calls) for t in trajs)
    return {
        "agent_turns": sum(t.turns for t in trajs) / n,
        "agent_tool_calls": sum(len(t.calls) for t in trajs) / n,
        "agent_valid_call_rate": valid / attempted if attempted else None,
        "agent_submitted": sum(t.stop == "submit" for t in trajs) / n,
        "agent_malformed": sum(t.stop == "malformed" for t in trajs) / n,
        "agent_tool_tokens": sum(len(r.token_mask) - r.num_trained for r in rollouts) / n,
    }
