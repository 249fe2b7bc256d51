"""Agentic RL (dsv32.rl.agentic, `dsv32 rl --task env:DIR`): multi-turn trajectories through the agent loop
become GRPO rollouts whose loss mask holds exactly the model's own tokens, rewarded by the environment's
verifier in the sandbox; the env task spec and its directory are validated with errors naming the bad path.

Model: the real tiny V3.2 (MLA + DSA + MoE). Its turns are constrained by an engine logits mask (the hook a
grammar uses) to a scripted tool call and a scripted submission whose answer digit is left to the model among
5, 6 and 7: the verifier accepts only 6, so a group's rewards differ and GRPO has a real gradient, at the digit
(the only position with more than one allowed id: Keep Sampling Mask makes every other position's
log-probability exactly 0 for sampler and trainer alike).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from agent_fakes import TASK, write_shop_env
from dsv32 import chat
from dsv32.agents.loop import AgentConfig
from dsv32.agents.sandbox import sandbox_available
from dsv32.engine import Engine
from dsv32.rl.agentic import load_env_tasks, parse_env_spec, sample_env_groups
from dsv32.rl.batch import collate, policy_logprobs
from dsv32.rl.cli import TaskMix, cli_main
from dsv32.rl.step import GRPOConfig, frozen_copy, grpo_update
from serving_fakes import byte_tokenizer, peaked_tiny_v32

UNSAFE = not sandbox_available()[0]  # our own test environment's code is trusted; the sandbox is used when it works
TOK = byte_tokenizer()
EOS = TOK.eos_id
DIGITS = [TOK.encode(d)[0] for d in "567"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("envs")
    write_shop_env(root / "shop-0000", ("shop-0", "shop-1"))
    return root


def calls(*pairs: tuple[str, dict]) -> str:
    return chat.render_tool_calls([{"name": n, "arguments": a} for n, a in pairs])


REPLY0 = ("I need the price of apples." + chat.END_THINK + "Let me look it up."
          + calls(("get_price", {"item": "apples"}), ("get_price", {"item": "kiwis"})))


def reply1(answer: int) -> str:
    return "Two apples at 3 each." + chat.END_THINK + calls(("submit_result", {"answer": answer}))


def script1() -> list[set[int]]:
    """Turn 2's allowed ids per step: the submission, with the answer digit left open among 5, 6, 7."""
    a, b = TOK.encode(reply1(6)), TOK.encode(reply1(7))
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    return [set(DIGITS) if x != y else {x} for x, y in zip(a, b)]


class ScriptMask:
    """An engine `LogitsMask`: at step k only ``script[k]`` may be sampled, then EOS."""

    def __init__(self, script: list[set[int]]):
        self.script, self.k = script, 0

    def fill_mask(self, allowed: torch.Tensor) -> None:
        keep = torch.zeros_like(allowed)
        keep[sorted(self.script[self.k] if self.k < len(self.script) else {EOS})] = True
        allowed &= keep

    def accept(self, token: int) -> None:
        self.k += 1


def scripted_turns(turn: int):
    script = [{t} for t in TOK.encode(REPLY0)] if turn == 0 else script1()
    return lambda: ScriptMask(script)


G = 4


@pytest.fixture(scope="module")
def step_run(env_root):
    """One agentic GRPO step: a group of G trajectories of one task, then the update; plus the log-probs of
    one right and one wrong trajectory (the first of each) before and after it."""
    torch.manual_seed(0)
    policy = peaked_tiny_v32()
    ref = frozen_copy(policy)
    engine = Engine(policy, max_slots=G, max_len=4096, prefix_reuse=False, num_threads=1)
    try:
        (item,) = [it for it in load_env_tasks(env_root) if it.id == "shop-0"]
        cfg = AgentConfig(max_turns=3, max_tokens=400, temperature=1.0, thinking=True, context=4096, system=None)
        # numbered as a step's third group, whose seeds draw the digits 5, 6, 7, 5: both verdicts in one group
        groups = sample_env_groups(engine, TOK, "deepseek-v3.2", [item], G, cfg, run_seed=0, step=0, first_group=2,
                                   logits_mask=scripted_turns, unsafe=UNSAFE)
    finally:
        engine.shutdown()
    ros = groups.rollouts
    pair = [next(r for r in ros if r.reward == 1.0), next(r for r in ros if r.reward == 0.0)]
    probe = collate(pair, policy.config.vocab_size)
    with torch.no_grad():
        before = policy_logprobs(policy, probe)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    stats = grpo_update(policy, ref, opt, ros, G, GRPOConfig(max_grad_norm=1.0))
    with torch.no_grad():
        after = policy_logprobs(policy, probe)
    return groups, collate(ros, policy.config.vocab_size), probe, before, after, stats


def test_trajectories_are_the_encoders_conversation_with_tool_output_masked(step_run, env_root):
    groups, *_ = step_run
    meta = json.loads((env_root / "shop-0000" / "env.json").read_text())
    schemas = [*meta["tools"], meta["submit_tool"]]
    for ro, traj in zip(groups.rollouts, groups.trajectories):
        assert traj.stop == "submit" and traj.turns == 2 and len(traj.calls) == 3
        # the ids are the chat encoder's for the conversation the model saw (the submit result never fed back)
        ids, mask = chat.encode_chat(traj.messages[:-1], tools=schemas, thinking=True, tokenizer=TOK)
        assert ro.prompt_ids + ro.completion_ids == ids and ro.token_mask == mask[len(ro.prompt_ids):]
        # the user's task (and the system prompt, the tool schemas) are prompt: nothing of it is trained
        task_ids = TOK.encode(TASK["prompt"])
        assert any(ro.prompt_ids[i:i + len(task_ids)] == task_ids for i in range(len(ro.prompt_ids)))
        # by ids: the trained tokens are exactly the two sampled turns, each ending with EOS
        sampled = [t for t, m in zip(ro.completion_ids, ro.token_mask) if m]
        assert sampled == TOK.encode(REPLY0) + [EOS] + TOK.encode(reply1(traj.answer)) + [EOS]
        # ... and the untrained ones are the tool results between them (a price and a tool error)
        tool = TOK.decode([t for t, m in zip(ro.completion_ids, ro.token_mask) if not m])
        assert tool.startswith("\n\n<function_results>\n<result>3</result>\n<result>Error:") and "kiwis" in tool
        assert all(lp == 0.0 for lp, m in zip(ro.logprobs, ro.token_mask) if not m)
        assert len(ro.routes) == 2 and ro.routes[0].shape[0] == len(ids) - 1  # MoE routes: Keep Routing


def test_reward_is_the_verifiers_verdict(step_run):
    groups, *_ = step_run
    answers = [t.answer for t in groups.trajectories]
    assert set(answers) <= {5, 6, 7} and 6 in answers and len(set(answers)) > 1, answers
    for ro, traj in zip(groups.rollouts, groups.trajectories):
        assert (ro.verdict, ro.reward) == (("correct", 1.0) if traj.answer == 6 else ("wrong", 0.0))
        assert ro.task == "env:" + str(Path(ro.meta["env"]).parent) and ro.meta["task_id"] == "shop-0"
    assert [(r.group, r.sample) for r in groups.rollouts] == [(2, j) for j in range(G)]
    assert len({r.seed for r in groups.rollouts}) == G


def test_grpo_step_trains_the_answer_digit_only(step_run):
    groups, batch, probe, before, after, stats = step_run
    m = batch.token_mask
    assert stats["tokens"] == m.sum().item()
    assert abs(stats["mismatch_kl"]) < 1e-4  # replayed routes + kept sets: the trainer sees the sampler's numbers
    # one free choice per trajectory: every other trained token has a one-id kept set (log-prob 0)
    free = torch.isin(batch.targets, torch.tensor(DIGITS)) & m & (batch.kept.sum(-1) == 3)
    assert free.sum(1).tolist() == [1] * G and (batch.kept.sum(-1)[m & ~free] == 1).all()
    assert torch.equal(batch.logp_old[m & ~free], torch.zeros(int((m & ~free).sum())))
    # the trainer's forward reproduces the sampler's log-probs (right, then wrong trajectory) ...
    pm = probe.token_mask
    pfree = torch.isin(probe.targets, torch.tensor(DIGITS)) & pm & (probe.kept.sum(-1) == 3)
    assert torch.allclose(before[pm], probe.logp_old[pm], atol=1e-5)
    assert torch.equal(before[pm & ~pfree], torch.zeros(int((pm & ~pfree).sum())))
    # ... and the update moved the digit towards the verifier's answer: 6 up, the wrong digit down
    right, wrong = (after - before)[pfree].tolist()
    assert right > 0 > wrong, (right, wrong)


# ------------------------------------------------------------------------------------ the CLI and the spec


def test_cli_env_task_runs_a_step_and_logs_agent_metrics(env_root, tmp_path):
    tok_dir = tmp_path / "tok"
    TOK.save(tok_dir)
    out = tmp_path / "run"
    argv = ["--model", "preset:tiny", "--tokenizer", str(tok_dir), "--task", f"env:{env_root}:2",
            "--group-size", "2", "--prompts-per-step", "1", "--max-new-tokens", "4", "--max-turns", "2",
            "--max-steps", "1", "--threads", "1", "--no-progress", "--no-export", "--save-rollouts", "--out", str(out)]
    if UNSAFE:
        argv.append("--unsafe")
    assert cli_main(argv) == 0
    (rec,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward_mean", "accuracy", "kl", "tokens", "t_rollout", "t_score", "t_reference", "t_train",
                "agent_turns", "agent_tool_calls", "agent_submitted", "agent_tool_tokens"):
        assert key in rec, key
    # an untrained model's 4-token turn is cut by the limit: no answer, reward 0, 4 trained tokens a trajectory
    assert rec["agent_turns"] == 1 and rec["reward_mean"] == 0 and rec["tokens"] == 8
    trajs = [json.loads(line) for line in (out / "rollouts" / "step_000001.agent.jsonl").read_text().splitlines()]
    assert [t["stop"] for t in trajs] == ["length", "length"] and trajs[0]["verdict"] == "no_answer"


def test_env_spec_parsing(tmp_path):
    assert parse_env_spec("env:envs") == (Path("envs"), 1.0)
    assert parse_env_spec("env:envs:2.5") == (Path("envs"), 2.5)
    odd = tmp_path / "a:3"
    odd.mkdir()
    assert parse_env_spec(f"env:{odd}") == (odd, 1.0)  # an existing path wins over a weight
    for bad in ("env:", "env:envs:0", "env:envs:-1"):
        with pytest.raises(ValueError, match="env:"):
            parse_env_spec(bad)


def bad_mix(spec: str) -> str:
    with pytest.raises(SystemExit) as e:
        TaskMix.build([spec], {}, 8, seed=0)
    return str(e.value)


def test_env_dir_errors_name_the_bad_path(tmp_path, env_root):
    assert f"{tmp_path / 'nope'}: no such directory" in bad_mix(f"env:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'}: no environment here" in bad_mix(f"env:{tmp_path / 'empty'}")

    def broken(name: str) -> Path:
        d = tmp_path / name / "shop-0000"
        shutil.copytree(env_root / "shop-0000", d)
        return d

    d = broken("json")
    (d / "env.json").write_text("{not json")
    assert f"{d.resolve() / 'env.json'}: not JSON" in bad_mix(f"env:{d.parent}")
    d = broken("fields")
    (d / "tasks.jsonl").write_text(json.dumps(TASK) + "\n" + json.dumps({**TASK, "id": "x", "verifier": ""}) + "\n")
    assert f"{d.resolve() / 'tasks.jsonl'}:2: task without verifier" in bad_mix(f"env:{d.parent}")
    d = broken("dup")
    (d / "tasks.jsonl").write_text(json.dumps(TASK) + "\n" + json.dumps(TASK) + "\n")
    assert f"{d.resolve() / 'tasks.jsonl'}:2: task id 'shop-0' is also in" in bad_mix(f"env:{d.parent}")
    d = broken("lines")
    (d / "tasks.jsonl").write_text(json.dumps(TASK) + "\n[1, 2\n")
    assert f"{d.resolve() / 'tasks.jsonl'}:2: not JSON" in bad_mix(f"env:{d.parent}")
    d = broken("tools")
    (d / "tools.py").unlink()
    assert f"{d.resolve() / 'tools.py'}: missing" in bad_mix(f"env:{d.parent}")
    # a good directory: its tasks form the pool, mixed with a weight
    mix = TaskMix.build([f"env:{env_root}:3"], {}, 8, seed=0)
    assert mix.weights == {f"env:{env_root}": 3.0}
    assert [it.id for it in mix.pools[f"env:{env_root}"]] == ["shop-0", "shop-1"]
    assert all(it.id in ("shop-0", "shop-1") for it in mix.draw(5, 0, 0))


def test_env_tasks_refuse_ray_workers(env_root, tmp_path):
    with pytest.raises(SystemExit, match="--rollout-workers 0 for env: tasks"):
        cli_main(["--model", "preset:tiny", "--tokenizer", "unused", "--task", f"env:{env_root}",
                  "--rollout-workers", "1", "--out", str(tmp_path / "r"), "--no-progress"])
