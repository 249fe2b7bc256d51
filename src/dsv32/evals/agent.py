"""`dsv32 eval agent`: agents on synthesized environments, and a function-calling check in the style of BFCL.

    dsv32 eval agent --model M --envs DIR --num N --samples k --json F
    dsv32 eval agent --base-url http://127.0.0.1:8000/v1 --envs DIR --num N --samples k --json F

Environment tasks (issue 13 item 4): each of the first N tasks (taken round-robin over the environments under
DIR, sorted by name) runs k times through the agent loop (`dsv32.agents.loop`; tools and verifiers in the
sandbox). Reported: success pass@1 and pass@k (the unbiased estimator 1 - C(n-c, k) / C(n, k) of Chen et al.
2021, averaged over tasks), the valid tool-call rate (a call is valid when it names an offered function and its
arguments parse and satisfy the function's JSON schema; a completion whose call block does not parse counts as
one invalid call), tool calls and generated tokens per trajectory, and how trajectories ended.

Function calling (`--bfcl N`, N cases per category): single-turn cases built from generated function schemas,
scored by matching the calls (name and argument values; strings case- and space-insensitive, numbers by
value): `simple` (one function offered, one call), `multiple` (one right function among four), `parallel`
(two calls in one reply) and `irrelevance` (no offered function fits: the right reply has no call). A reply
cut off by `--max-tokens` fails its case.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dsv32 import chat
from dsv32.agents.cli import Session, add_model_args, config_from_args, open_session
from dsv32.agents.envs.base import find_environments, read_tasks
from dsv32.agents.loop import AgentConfig, call_errors, run_env_task
from dsv32.evals.common import pass_at_k, write_json


def environments(root: Path) -> list[Path]:
    """Environment directories under `root` (or `root` itself), sorted by name."""
    try:
        return find_environments(root)
    except (OSError, ValueError) as e:
        raise SystemExit(f"dsv32 eval agent: --envs {e}") from None


def pick_tasks(envs: Sequence[Path], num: int) -> list[tuple[Path, dict]]:
    """The first `num` tasks, one per environment in turn (round-robin), so a small N spans the categories."""
    queues = [[(e, t) for t in read_tasks(e)] for e in envs]
    out: list[tuple[Path, dict]] = []
    depth = 0
    while len(out) < num and any(depth < len(q) for q in queues):
        out += [q[depth] for q in queues if depth < len(q)][: num - len(out)]
        depth += 1
    return out


def ks_for(samples: int) -> list[int]:
    return sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 100) if k <= samples} | {samples})


def eval_tasks(session: Session, cfg: AgentConfig, envs_dir: Path, num: int, samples: int, *, unsafe: bool,
               tools: Sequence[str] = (), log=print) -> dict[str, Any]:
    picked = pick_tasks(environments(envs_dir), num)
    per_task = []
    t0 = time.perf_counter()
    for env, task in picked:
        runs = []
        for j in range(samples):
            traj = run_env_task(session.backend, env, task, replace(cfg, seed=cfg.seed + j), toolbox_tools=tools,
                                unsafe=unsafe)
            runs.append({"verdict": traj.verdict, "stop": traj.stop, "turns": traj.turns, "calls": len(traj.calls),
                         "valid_calls": sum(c["valid"] for c in traj.calls), "malformed": traj.malformed,
                         "completion_tokens": traj.completion_tokens, "context_tokens": traj.context_tokens,
                         "answer": traj.answer})
        c = sum(r["verdict"] == "correct" for r in runs)
        per_task.append({"id": task["id"], "env": env.name, "category": task.get("category", env.name.split("-")[0]),
                         "difficulty": task.get("difficulty"), "n": samples, "correct": c, "runs": runs})
        log(f"{task['id']:24s} {c}/{samples} correct; stops {dict(Counter(r['stop'] for r in runs))}")
    runs = [r for t in per_task for r in t["runs"]]
    attempted = sum(r["calls"] + r["malformed"] for r in runs)
    by_cat: dict[str, list[float]] = {}
    for t in per_task:
        by_cat.setdefault(t["category"], []).append(t["correct"] / t["n"])
    n_tr = max(1, len(runs))
    return {
        "tasks": len(per_task), "samples": samples, "trajectories": len(runs),
        **{f"pass@{k}": sum(pass_at_k(t["n"], t["correct"], k) for t in per_task) / max(1, len(per_task))
           for k in ks_for(samples)},
        "valid_call_rate": sum(r["valid_calls"] for r in runs) / attempted if attempted else None,
        "tool_calls": sum(r["calls"] for r in runs), "attempted_calls": attempted,
        "tool_calls_per_task": sum(r["calls"] for r in runs) / n_tr,
        "tokens_per_task": sum(r["completion_tokens"] for r in runs) / n_tr,
        "context_tokens_per_task": sum(r["context_tokens"] for r in runs) / n_tr,
        "turns_per_task": sum(r["turns"] for r in runs) / n_tr,
        "stops": dict(Counter(r["stop"] for r in runs)), "verdicts": dict(Counter(r["verdict"] for r in runs)),
        "pass@1_by_category": {k: sum(v) / len(v) for k, v in sorted(by_cat.items())},
        "seconds": time.perf_counter() - t0, "per_task": per_task,
    }


# ---------------------------------------------------------------------------------- function calling (BFCL-style)


def _fn(name: str, description: str, params: dict[str, dict], required: Sequence[str] | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": params, "required": list(params if required is None else required)}}}


S, I, N = {"type": "string"}, {"type": "integer"}, {"type": "number"}
CITIES = ["Paris", "Lima", "Osaka", "Nairobi", "Oslo", "Denver", "Hanoi", "Porto"]
WORDS = ["budget review", "team lunch", "release notes", "quarterly plan", "travel receipts"]

# (schema, question template, value pools per argument)
FUNCTIONS: list[tuple[dict, str, dict[str, list]]] = [
    (_fn("get_weather", "Current weather in a city.",
         {"city": {**S, "description": "city name"},
          "unit": {**S, "enum": ["celsius", "fahrenheit"], "description": "temperature unit"}}),
     "What is the weather like in {city} right now? Give the temperature in {unit}.",
     {"city": CITIES, "unit": ["celsius", "fahrenheit"]}),
    (_fn("convert_currency", "Convert an amount of money between currencies.",
         {"amount": {**N, "description": "amount to convert"}, "from_currency": {**S, "description": "ISO code"},
          "to_currency": {**S, "description": "ISO code"}}),
     "How much is {amount} {from_currency} in {to_currency}?",
     {"amount": [12.5, 100, 250, 980, 42], "from_currency": ["USD", "EUR", "JPY"], "to_currency": ["GBP", "CHF"]}),
    (_fn("get_stock_price", "Latest trading price of a stock.", {"symbol": {**S, "description": "ticker symbol"}}),
     "What is the latest price of the stock with ticker {symbol}?",
     {"symbol": ["AAPL", "MSFT", "NVDA", "TSLA", "IBM"]}),
    (_fn("book_table", "Reserve a table at a restaurant.",
         {"restaurant": {**S, "description": "restaurant name"}, "people": {**I, "description": "party size"},
          "time": {**S, "description": "time, HH:MM"}}),
     "Book a table at {restaurant} for {people} people at {time}.",
     {"restaurant": ["Chez Lea", "Blue Fin", "Casa Rosa"], "people": [2, 3, 4, 6], "time": ["19:00", "20:30"]}),
    (_fn("get_population", "Population of a country in a given year.",
         {"country": {**S, "description": "country name"}, "year": {**I, "description": "year"}}),
     "What was the population of {country} in {year}?",
     {"country": ["Chile", "Kenya", "Norway", "Vietnam"], "year": [1990, 2000, 2010, 2020]}),
    (_fn("send_email", "Send an email.",
         {"to": {**S, "description": "recipient address"}, "subject": {**S, "description": "subject line"}}),
     "Send an email to {to} with the subject \"{subject}\".",
     {"to": ["ana@example.com", "li@example.org", "sam@example.net"], "subject": WORDS}),
    (_fn("circle_area", "Area of a circle.", {"radius": {**N, "description": "radius in metres"}}),
     "What is the area of a circle with a radius of {radius} metres?", {"radius": [1.5, 2, 7, 10.25]}),
    (_fn("translate_text", "Translate text into another language.",
         {"text": {**S, "description": "text to translate"}, "target_language": {**S, "description": "language"}}),
     "Translate \"{text}\" into {target_language}.",
     {"text": ["good morning", "thank you very much", "where is the station"],
      "target_language": ["German", "Spanish", "Japanese"]}),
    (_fn("find_flights", "Search flights between two cities on a date.",
         {"origin": S, "destination": S, "date": {**S, "description": "YYYY-MM-DD"}}),
     "Find flights from {origin} to {destination} on {date}.",
     {"origin": CITIES[:4], "destination": CITIES[4:], "date": ["2025-10-01", "2025-11-15", "2026-01-09"]}),
    (_fn("set_alarm", "Set an alarm.", {"time": {**S, "description": "HH:MM"}, "label": S}),
     "Set an alarm for {time} labelled \"{label}\".", {"time": ["06:30", "07:15", "22:00"], "label": WORDS}),
]

IRRELEVANT = [
    "Write a two-line poem about the sea.", "Who wrote the play Hamlet?", "Say hello in French.",
    "Explain in one sentence what a prime number is.", "What is the capital of Italy?",
    "Give me a synonym for 'happy'.", "Tell me a short joke about cats.", "How many legs does a spider have?",
]

BFCL_CATEGORIES = ("simple", "multiple", "parallel", "irrelevance")


def _instance(rng: random.Random, k: int) -> tuple[dict, str, dict]:
    schema, template, pools = FUNCTIONS[k]
    args = {name: rng.choice(pool) for name, pool in pools.items()}
    return schema, template.format(**args), {"name": schema["function"]["name"], "arguments": args}


def bfcl_cases(n: int, seed: int = 0) -> list[dict]:
    """`n` cases per category from the generated functions: {category, query, tools, expected calls}."""
    rng = random.Random(f"dsv32-bfcl/{seed}")
    out = []
    for cat in BFCL_CATEGORIES:
        for _ in range(n):
            ks = rng.sample(range(len(FUNCTIONS)), 4)
            if cat == "simple":
                schema, q, call = _instance(rng, ks[0])
                tools, expected = [schema], [call]
            elif cat == "multiple":
                schema, q, call = _instance(rng, ks[0])
                tools, expected = [FUNCTIONS[k][0] for k in ks], [call]
                rng.shuffle(tools)
            elif cat == "parallel":
                a, qa, ca = _instance(rng, ks[0])
                b, qb, cb = _instance(rng, ks[rng.random() < 0.5])  # a second function, or the same one again
                while cb == ca:
                    b, qb, cb = _instance(rng, ks[0])
                q = f"{qa} Also: {qb[0].lower()}{qb[1:]}"
                tools, expected = [a] if b is a else [a, b], [ca, cb]
            else:
                q = rng.choice(IRRELEVANT)
                tools, expected = [FUNCTIONS[k][0] for k in ks[:2]], []
            out.append({"category": cat, "query": q, "tools": tools, "expected": expected})
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, bool) or isinstance(a, bool):
        return a is b
    if isinstance(b, int | float) and isinstance(a, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(b, str) and isinstance(a, str):
        return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()
    return a == b


def calls_match(got: Sequence[dict], expected: Sequence[dict]) -> bool:
    """Same number of calls, and a one-to-one pairing (any order) with equal names and argument values."""
    if len(got) != len(expected):
        return False
    left = list(expected)
    for g in got:
        hit = next((e for e in left if e["name"] == g["name"] and set(e["arguments"]) == set(g["arguments"])
                    and all(_same(g["arguments"][k], v) for k, v in e["arguments"].items())), None)
        if hit is None:
            return False
        left.remove(hit)
    return True


def eval_bfcl(session: Session, cfg: AgentConfig, n: int, *, seed: int = 0, log=print) -> dict[str, Any]:
    """One model turn per case (no system prompt); a case passes when the parsed calls match (module docstring)."""
    results: dict[str, list[bool]] = {c: [] for c in BFCL_CATEGORIES}
    valid = attempted = 0
    examples = []
    for case in bfcl_cases(n, seed):
        messages = [{"role": "user", "content": case["query"]}]
        session.backend.prepare(messages, case["tools"], cfg.thinking)
        reply = session.backend.complete(cfg, 0, cfg.thinking)
        got = []
        if reply.parse_error is not None:
            attempted += 1
        for c in reply.message.get("tool_calls") or []:
            attempted += 1
            errs = call_errors(case["tools"], c)
            valid += not errs
            try:
                got.append({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")})
            except ValueError:
                got.append({"name": c["function"]["name"], "arguments": {}})
        # a reply cut off at max_tokens never finished (and would pass `irrelevance` by saying nothing)
        ok = reply.parse_error is None and reply.finish_reason != "length" and calls_match(got, case["expected"])
        results[case["category"]].append(ok)
        if len(examples) < 8:
            examples.append({"category": case["category"], "query": case["query"], "expected": case["expected"],
                             "got": got, "content": reply.message.get("content", "")[:300], "pass": ok})
    acc = {c: sum(v) / len(v) for c, v in results.items() if v}
    log("function calling: " + ", ".join(f"{c} {a:.2f}" for c, a in acc.items()))
    return {"cases_per_category": n, "accuracy": acc, "overall": sum(acc.values()) / len(acc) if acc else None,
            "valid_call_rate": valid / attempted if attempted else None, "attempted_calls": attempted,
            "examples": examples}


# ---------------------------------------------------------------------------------------------------- CLI


def cli_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv32 eval agent", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--envs", type=Path, help="a directory of environments written by `dsv32 synth`")
    p.add_argument("--num", type=int, default=20, help="tasks to evaluate (round-robin over the environments)")
    p.add_argument("--samples", type=int, default=1, help="trajectories per task (k of pass@k)")
    p.add_argument("--bfcl", type=int, default=10, help="function-calling cases per category (0: skip)")
    p.add_argument("--json", type=Path, help="write the result here (and print it)")
    args = p.parse_args(argv)
    if args.envs is None and not args.bfcl:
        p.error("nothing to evaluate: give --envs and/or --bfcl N")
    tools = [t for t in args.tools.split(",") if t]
    session = open_session(args)
    result: dict[str, Any] = {"eval": "agent", "settings": {}, "results": {}}
    try:
        cfg = config_from_args(args, session, samples=args.samples)
        result["settings"] = {
            "model": args.model or args.base_url, "served_model": getattr(session.backend, "model", None),
            "family": session.family, "thinking": cfg.thinking, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "top_k": cfg.top_k, "max_turns": cfg.max_turns, "max_tokens": cfg.max_tokens, "context": cfg.context,
            "context_strategy": cfg.context_strategy, "context_share": cfg.context_share, "seed": cfg.seed,
            "envs": str(args.envs) if args.envs else None, "num": args.num, "samples": args.samples,
            "tools": tools, "bfcl": args.bfcl, "sandbox": not args.unsafe}
        if args.envs is not None:
            result["results"]["tasks"] = eval_tasks(session, cfg, args.envs, args.num, args.samples,
                                                    unsafe=args.unsafe, tools=tools,
                                                    log=lambda s: print(s, file=sys.stderr))
        if args.bfcl:
            result["results"]["function_calling"] = eval_bfcl(session, replace(cfg, temperature=0.0), args.bfcl,
                                                              seed=args.seed, log=lambda s: print(s, file=sys.stderr))
    except chat.ChatFormatError as e:
        print(f"dsv32 eval agent: {session.name}: {e}", file=sys.stderr)
        return 2
    finally:
        session.close()
    write_json(result, args.json)
    return 0
