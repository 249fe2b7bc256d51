"""`dsv32 synth`: write synthesized environments and keep only tasks whose reference solution passes its
verifier inside the sandbox (issue 13 item 3; paper §3.3, general agent).

For every environment one sandboxed interpreter runs all its tasks (`envs/runner.py`): the solution through
the tools, the verifier on the solution's answer and on the generator's reference answer, the verifier on
empty answers (must all fail), and a random policy (schema-valid tool calls with arguments drawn from values
seen earlier in the episode, then a schema-valid random answer) as a floor that a trivial policy must not
reach. A task is kept when solution and reference pass and no empty answer does; dropped tasks are reported.

    dsv32 synth --out envs/ --categories all --seeds 10 --difficulty 1..3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dsv32.agents.envs import CATEGORIES
from dsv32.agents.envs.base import Environment, generate, write_tasks
from dsv32.agents.envs.llm import LLMEnvBuilder, http_chat
from dsv32.agents.envs.session import POLICIES, Policy, filter_pass_k, run_jobs
from dsv32.agents.sandbox import SandboxUnavailable


@dataclass
class Validation:
    """What validating one environment found."""
    env: Environment
    kept: list[dict] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)      # (task id, why)
    random_ok: list[bool] = field(default_factory=list)                # one per random episode of a kept task
    empty_ok: list[bool] = field(default_factory=list)                 # one per empty answer of a kept task
    solution_ok: int = 0                                               # tasks whose solution passed (of all)
    seconds: float = 0.0


def validate(env: Environment, *, random_tries: int = 5, seed: int = 0, job_timeout: float = 20.0,
             unsafe: bool = False) -> Validation:
    """Run solution -> verifier (and the reference, empty answers, the random policy) for every task of `env`
    in the sandbox; rewrite its tasks.jsonl with the kept tasks (open tasks get the solution's answer)."""
    t0 = time.perf_counter()
    jobs = [{"op": "validate", "id": t["id"], "solution": t["solution"], "verifier": t["verifier"],
             "reference": t["answer"], "prompt": t["prompt"], "answer_schema": t["answer_schema"],
             "random": random_tries, "seed": seed} for t in env.tasks]
    v = Validation(env)
    for task, out in zip(env.tasks, run_jobs(env.path, jobs, job_timeout=job_timeout, unsafe=unsafe)):
        why = out.get("fatal") or out.get("error")
        v.solution_ok += bool(out.get("solution_ok"))
        if not why and not out.get("solution_ok"):
            why = f"solution's answer fails its verifier: {out.get('solution_reason')}"
        if not why and task["answer"] is not None and not out.get("reference_ok"):
            why = f"reference answer fails its verifier: {out.get('reference_reason')}"
        if not why and any(out.get("empty_ok", [])):
            why = "the verifier accepts an empty answer"
        if why:
            v.dropped.append((task["id"], str(why)))
            continue
        if task["answer"] is None:
            task["answer"] = out["answer"]
        v.kept.append(task)
        v.random_ok += out.get("random_ok", [])
        v.empty_ok += out.get("empty_ok", [])
    write_tasks(env.path, v.kept)
    v.env.tasks = v.kept
    v.seconds = time.perf_counter() - t0
    return v


def parse_levels(text: str) -> list[int]:
    """"1..3" -> [1, 2, 3]; "2" -> [2]; "1,3" -> [1, 3]."""
    if ".." in text:
        lo, hi = text.split("..")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",")]


def synthesize(out: Path, categories: Sequence[str], seeds: Sequence[int], levels: Sequence[int], *,
               per_level: int = 2, random_tries: int = 5, job_timeout: float = 20.0, pass_k: int = 0,
               policy: Policy | None = None, unsafe: bool = False, log=print) -> dict:
    """Generate and validate every (category, seed) environment; with `pass_k` > 0 also apply the paper's
    filter with `policy` (keep a task only if it is solved at least once in `pass_k` tries). Returns the
    summary `dsv32 synth` prints."""
    per_cat: dict[str, Counter] = defaultdict(Counter)
    dropped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    sandbox_s = 0.0
    for name in categories:
        cat = CATEGORIES[name]
        for seed in seeds:
            v = validate(generate(cat, seed, out, levels, per_level), random_tries=random_tries, seed=seed,
                         job_timeout=job_timeout, unsafe=unsafe)
            c = per_cat[name]
            c["envs"] += 1
            c["generated"] += len(v.kept) + len(v.dropped)
            c["kept"] += len(v.kept)
            c["solution_pass"] += v.solution_ok
            c["random_pass"] += sum(v.random_ok)
            c["random_runs"] += len(v.random_ok)
            c["empty_pass"] += sum(v.empty_ok)
            c["empty_runs"] += len(v.empty_ok)
            for t in v.kept:
                c[f"level{t['difficulty']}"] += 1
            dropped += v.dropped
            sandbox_s += v.seconds
            if pass_k > 0 and v.kept:
                assert policy is not None, "pass_k needs a policy"
                survived, _ = filter_pass_k(v.env.path, policy, pass_k, seed=seed, unsafe=unsafe)
                c["pass_k_kept"] += len(survived)
        log(f"{name:12s} envs {per_cat[name]['envs']:4d}  kept {per_cat[name]['kept']:5d} / "
            f"{per_cat[name]['generated']:5d}  random pass {per_cat[name]['random_pass']}/"
            f"{per_cat[name]['random_runs']}")
    tot = sum(per_cat.values(), Counter())
    summary = {
        "categories": len(per_cat), "environments": tot["envs"], "tasks_generated": tot["generated"],
        "tasks_kept": tot["kept"],
        # of all generated tasks: the solution's answer passed the verifier (kept tasks pass by construction)
        "solution_pass_rate": tot["solution_pass"] / max(1, tot["generated"]),
        "dropped": [{"id": i, "why": w} for i, w in dropped],
        "random_policy_pass_rate": tot["random_pass"] / max(1, tot["random_runs"]),
        "random_policy_runs": tot["random_runs"],
        "empty_answer_pass_rate": tot["empty_pass"] / max(1, tot["empty_runs"]),
        "by_level": {k: v for k, v in sorted(tot.items()) if k.startswith("level")},
        "per_category": {k: dict(v) for k, v in per_cat.items()},
        "seconds": time.perf_counter() - t0, "sandbox_seconds": sandbox_s,
    }
    if pass_k > 0:
        summary["pass_k"] = {"k": pass_k, "kept": tot["pass_k_kept"], "dropped": tot["kept"] - tot["pass_k_kept"]}
    return summary


def cli_main(argv: Sequence[str] | None = None) -> int:
    try:
        return _cli(argv)
    except SandboxUnavailable as e:         # tools, solutions and verifiers are untrusted: no sandbox, no run
        print(f"dsv32 synth: {e}", file=sys.stderr)
        return 1


def _cli(argv: Sequence[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="dsv32 synth", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory (one sub-directory per environment)")
    ap.add_argument("--categories", default="all", help=f"comma list or 'all' ({', '.join(CATEGORIES)})")
    ap.add_argument("--seeds", type=int, default=5, help="environments per category (seeds seed-start..)")
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--difficulty", default="1..3", help="levels, e.g. 1..3, 2, 1,3 (default 1..3)")
    ap.add_argument("--per-level", type=int, default=2, help="tasks per difficulty level per environment")
    ap.add_argument("--random", type=int, default=5, help="random-policy episodes per task (0: none)")
    ap.add_argument("--task-timeout", type=float, default=20.0,
                    help="seconds one task's validation may take inside the sandbox (default 20)")
    ap.add_argument("--pass-k", type=int, default=0,
                    help="the paper's filter: keep a task only if --policy solves it at least once in K tries")
    ap.add_argument("--policy", default="random", choices=sorted(POLICIES),
                    help="policy for --pass-k (from Python, filter_pass_k takes any callable, e.g. an agent loop)")
    ap.add_argument("--llm", action="append", metavar="CATEGORY",
                    help="LLM-driven synthesis of one environment for CATEGORY (free text, repeatable) with the model "
                         "at --base-url instead of the programmatic generator")
    ap.add_argument("--base-url", help="OpenAI-compatible endpoint for --llm, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="default", help="model name sent to --base-url")
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    ap.add_argument("--repairs", type=int, default=3, help="--llm: repair rounds per step")
    ap.add_argument("--json", type=Path, help="write the summary (and dropped tasks) here")
    ap.add_argument("--unsafe", action="store_true",
                    help="run tools/solutions/verifiers WITHOUT the sandbox (only if you trust the code)")
    args = ap.parse_args(argv)
    levels = parse_levels(args.difficulty)
    if args.llm:
        if not args.base_url:
            print("dsv32 synth: --llm needs --base-url", file=sys.stderr)
            return 2
        builder = LLMEnvBuilder(http_chat(args.base_url, args.model, os.environ.get(args.api_key_env)),
                                repairs=args.repairs, unsafe=args.unsafe)
        for i, category in enumerate(args.llm):
            name = f"llm-{re.sub(r'[^a-z0-9]+', '-', category.lower()).strip('-')[:40]}-{args.seed_start + i:04d}"
            res = builder.build(category, args.out, name, levels=max(levels), seed=args.seed_start + i)
            print(f"{name}: {len(res.tasks)} validated task(s)" + (f" in {res.path}" if res.path else ""))
            for line in res.log:
                print(f"  {line}")
        return 0
    cats = list(CATEGORIES) if args.categories == "all" else [c.strip() for c in args.categories.split(",")]
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown:
        print(f"dsv32 synth: unknown categories {unknown}; known: {', '.join(CATEGORIES)}", file=sys.stderr)
        return 2
    s = synthesize(args.out, cats, range(args.seed_start, args.seed_start + args.seeds), levels,
                   per_level=args.per_level, random_tries=args.random, job_timeout=args.task_timeout,
                   pass_k=args.pass_k, policy=POLICIES[args.policy], unsafe=args.unsafe)
    print(f"{s['tasks_kept']} verified tasks in {s['environments']} environments, {s['categories']} categories "
          f"({s['tasks_generated'] - s['tasks_kept']} dropped); by level {s['by_level']}; reference solutions pass "
          f"{s['solution_pass_rate']:.2%} of the {s['tasks_generated']} generated")
    print(f"random policy passes {s['random_policy_pass_rate']:.2%} of {s['random_policy_runs']} episodes; "
          f"empty answers pass {s['empty_answer_pass_rate']:.2%}; {s['seconds']:.1f} s")
    if "pass_k" in s:
        print(f"pass@{args.pass_k} filter with the {args.policy} policy: kept {s['pass_k']['kept']}, "
              f"dropped {s['pass_k']['dropped']} (tasks.jsonl holds the kept ones, each with its pass_k)")
    for d in s["dropped"][:20]:
        print(f"  dropped {d['id']}: {d['why'][:300]}")
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))
    return 0
