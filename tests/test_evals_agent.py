"""`dsv32 eval agent`: pass@k by hand, the task picking, the generated function-calling cases and their
scoring, and the whole command against scripted OpenAI-compatible endpoints (environment tasks whose tools
and verifiers run in the sandbox)."""

from __future__ import annotations

import json

import pytest

from agent_fakes import FakeEndpoint, tc, write_shop_env
from dsv32.agents.loop import call_errors
from dsv32.agents.sandbox import sandbox_available
from dsv32.evals import cli_main as eval_main
from dsv32.evals.agent import BFCL_CATEGORIES, bfcl_cases, calls_match, pick_tasks
from dsv32.evals.common import pass_at_k

UNSAFE = ["--unsafe"] if not sandbox_available()[0] else []


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0 and pass_at_k(3, 3, 1) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert pass_at_k(4, 1, 1) == pytest.approx(1 / 4) and pass_at_k(3, 2, 2) == 1.0
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(2, 3, 1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(2, 1, 3)


def test_pick_tasks_round_robin(tmp_path):
    a = write_shop_env(tmp_path / "a-0000", ("a0", "a1", "a2"))
    b = write_shop_env(tmp_path / "b-0000", ("b0",))
    assert [t["id"] for _, t in pick_tasks([a, b], 3)] == ["a0", "b0", "a1"]
    assert [t["id"] for _, t in pick_tasks([a, b], 10)] == ["a0", "b0", "a1", "a2"]


def test_bfcl_cases_are_well_formed():
    cases = bfcl_cases(6, seed=1)
    assert cases == bfcl_cases(6, seed=1) and cases != bfcl_cases(6, seed=2)
    assert [c["category"] for c in cases] == [c for c in BFCL_CATEGORIES for _ in range(6)]
    for c in cases:
        for e in c["expected"]:  # every expected call is valid for the offered tools, and its values are asked for
            call = {"function": {"name": e["name"], "arguments": json.dumps(e["arguments"])}}
            assert call_errors(c["tools"], call) == []
            assert all(str(v) in c["query"] for v in e["arguments"].values()), c
        n = {"simple": 1, "multiple": 1, "parallel": 2, "irrelevance": 0}[c["category"]]
        assert len(c["expected"]) == n
        assert len(c["tools"]) == {"simple": 1, "multiple": 4, "irrelevance": 2}.get(c["category"], len(c["tools"]))
        if n == 2:
            assert c["expected"][0] != c["expected"][1]


def test_calls_match():
    exp = [{"name": "f", "arguments": {"city": "Paris", "n": 2}}, {"name": "g", "arguments": {"x": 1.5}}]
    got = [{"name": "g", "arguments": {"x": 1.5}}, {"name": "f", "arguments": {"city": " paris", "n": 2.0}}]
    assert calls_match(got, exp)
    assert not calls_match([{"name": "f", "arguments": {"city": "Paris", "n": 2}}], exp)
    assert not calls_match([{"name": "f", "arguments": {"city": "Paris", "n": 3}}, exp[1]], exp)
    assert not calls_match([{"name": "f", "arguments": {"city": "Paris", "n": 2, "extra": 0}}, exp[1]], exp)
    assert calls_match([], []) and not calls_match([exp[0]], [])


def bfcl_solver(cases, *, wrong: bool = False):
    """Answers each case's query with its expected calls (or, `wrong`, the first tool with no arguments)."""
    by_query = {c["query"]: c for c in cases}

    def script(req):
        case = by_query[req["messages"][-1]["content"]]
        if wrong:
            return {"content": "", "tool_calls": [tc(0, req["tools"][0]["function"]["name"], {})]}
        if not case["expected"]:
            return {"content": "I can answer that without tools."}
        return {"content": "", "tool_calls": [tc(i, e["name"], e["arguments"]) for i, e in enumerate(case["expected"])]}
    return script


def test_eval_agent_end_to_end(tmp_path):
    envs = tmp_path / "envs"
    write_shop_env(envs / "shop-0000", ("shop-0", "shop-1"))
    served = {"n": 0}

    def script(req):
        """Tasks: look the price up, then answer right on even trajectories and wrong on odd ones."""
        if "tools" in req and any(t["function"]["name"] == "submit_result" for t in req["tools"]):
            if req["messages"][-1]["role"] == "user":
                return {"content": "", "tool_calls": [tc(0, "get_price", {"item": "apples"})]}
            served["n"] += 1
            return {"content": "6" if served["n"] % 2 else "7"}
        return bfcl_solver(bfcl_cases(3, seed=0))(req)

    ep = FakeEndpoint(script)
    try:
        out = tmp_path / "r.json"
        rc = eval_main(["agent", "--base-url", ep.url, "--envs", str(envs), "--num", "2", "--samples", "2",
                        "--bfcl", "3", "--json", str(out), *UNSAFE])
    finally:
        ep.close()
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["eval"] == "agent" and res["settings"]["samples"] == 2 and res["settings"]["temperature"] == 1.0
    t = res["results"]["tasks"]
    assert (t["tasks"], t["trajectories"]) == (2, 4)
    assert t["pass@1"] == pytest.approx(0.5) and t["pass@2"] == pytest.approx(1.0)  # 1 of 2 right on each task
    assert t["valid_call_rate"] == 1.0 and t["tool_calls_per_task"] == 1.0 and t["turns_per_task"] == 2.0
    assert t["verdicts"] == {"correct": 2, "wrong": 2} and t["tokens_per_task"] == 10.0  # 5 per reply
    fc = res["results"]["function_calling"]
    assert fc["accuracy"] == {c: 1.0 for c in BFCL_CATEGORIES} and fc["valid_call_rate"] == 1.0


def test_eval_bfcl_scores_wrong_calls(tmp_path):
    ep = FakeEndpoint(bfcl_solver(bfcl_cases(4, seed=0), wrong=True))
    try:
        out = tmp_path / "r.json"
        assert eval_main(["agent", "--base-url", ep.url, "--bfcl", "4", "--json", str(out)]) == 0
    finally:
        ep.close()
    fc = json.loads(out.read_text())["results"]["function_calling"]
    # every case gets one call of the first tool with no arguments: never right, and invalid whenever the
    # function has required parameters (all the generated ones do)
    assert fc["accuracy"] == {c: 0.0 for c in BFCL_CATEGORIES} and fc["valid_call_rate"] == 0.0
    assert fc["attempted_calls"] == 16
