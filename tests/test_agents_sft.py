"""`dsv32 agent-sft` (dsv32.agents.sft): reference solutions traced in the sandbox become agent trajectories,
encoded exactly as the agent loop renders them, trained on with an assistant-only mask, and saved where
`dsv32 agent` loads them.

The encoding test forces a real engine (the tiny V3.2 model; a tiny Llama for ChatML) onto the SFT encoding's
assistant tokens through the real agent loop, whose tools run in the sandbox: the loop's own ids and mask
must equal the SFT encoding, and the forced submission must pass the task's verifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agent_fakes import write_shop_env
from dsv32.agents.cli import cli_main as agent_main
from dsv32.agents.envs import CATEGORIES
from dsv32.agents.envs.base import generate, read_tasks, write_tasks
from dsv32.agents.loop import SYSTEM_PROMPT, AgentConfig, EngineBackend, EnvTools, run_env_task
from dsv32.agents.sandbox import sandbox_available
from dsv32.agents.sft import (
    build_examples,
    cli_main,
    encode_trajectory,
    masked_loss,
    tool_content,
    trace_env,
    train,
    trajectory_messages,
)
from dsv32.config import ModelConfig
from dsv32.engine import Engine
from dsv32.llama import LlamaConfig, LlamaModel, save_hf
from dsv32.model import Transformer
from dsv32.registry import load_model
from dsv32.rl.agentic import tool_schemas
from serving_fakes import byte_tokenizer, peaked_tiny_v32

UNSAFE = not sandbox_available()[0]  # the sandbox is used whenever it works here

# the shop env (tools get_price, list_items) with tasks whose solutions call by keyword and by position, catch a
# tool's exception, and loop over a tool's result
SHOP_TASKS = [
    {"id": "shop-a", "prompt": "What do two apples cost in EUR?", "difficulty": 1,
     "solution": "answer = 2 * get_price(item='apples')", "answer": 6, "answer_schema": {"type": "integer"},
     "verifier": "from checks import check\n\ndef verify(answer):\n    return check(answer, 6, 'number')\n"},
    {"id": "shop-b", "prompt": "What do one kiwi (0 if there are none) and one pear cost together?", "difficulty": 1,
     "solution": "try:\n    k = get_price('kiwis')\nexcept ValueError:\n    k = 0\nanswer = k + get_price('pears')",
     "answer": 5, "answer_schema": {"type": "integer"},
     "verifier": "from checks import check\n\ndef verify(answer):\n    return check(answer, 5, 'number')\n"},
    {"id": "shop-c", "prompt": "What does one of every item cost in total?", "difficulty": 1,
     "solution": "answer = sum(get_price(i) for i in list_items())", "answer": 8,
     "answer_schema": {"type": "integer"},
     "verifier": "from checks import check\n\ndef verify(answer):\n    return check(answer, 8, 'number')\n"},
]


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    env = write_shop_env(tmp_path_factory.mktemp("sft-envs") / "shop-0000")
    write_tasks(env, SHOP_TASKS)
    return env


def tiny_llama(vocab: int = 300) -> LlamaModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1000.0,
                      index_n_heads=2, index_head_dim=16, index_rope_head_dim=8, index_topk=16, use_dsa=False)
    return LlamaModel(cfg).eval()


def test_trace_records_the_solution_calls_as_the_loop_returns_them(shop: Path):
    traces = {t["id"]: t for t in trace_env(shop, unsafe=UNSAFE)}
    assert all(t["error"] is None for t in traces.values())
    a, b, c = traces["shop-a"], traces["shop-b"], traces["shop-c"]
    assert [(r["name"], r["arguments"]) for r in a["calls"]] == [("get_price", {"item": "apples"})]
    # positional arguments are bound to their names; the tool's exception is recorded and reaches the solution
    assert [(r["name"], r["arguments"], r["ok"]) for r in b["calls"]] == [
        ("get_price", {"item": "kiwis"}, False), ("get_price", {"item": "pears"}, True)]
    assert [r["name"] for r in c["calls"]] == ["list_items", "get_price", "get_price"]
    assert (a["answer"], b["answer"], c["answer"]) == (6, 5, 8)
    # every result, error included, is what the agent loop's tool executor hands the model for that call
    env = EnvTools(shop, unsafe=UNSAFE)
    try:
        for rec in [*a["calls"], *b["calls"], *c["calls"]]:
            assert tool_content(rec) == env.call(rec["name"], rec["arguments"]).content
    finally:
        env.close()
    assert tool_content(b["calls"][0]) == "Error: ValueError: no item named 'kiwis'"


def test_trajectories_of_a_synthesized_env(tmp_path: Path):
    """A real `dsv32 synth` category: one assistant turn per solution call, each tool result exactly as the
    loop's executor returns it, then the submission of the reference answer; the mask covers only the
    assistant's turns."""
    env = generate(CATEGORIES["courses"], 0, tmp_path, levels=(1, 2), per_level=1).path
    tok = byte_tokenizer("chatml")
    examples, dropped = build_examples(tmp_path, tok, family="chatml", thinking=False, unsafe=UNSAFE,
                                       log=lambda s: None)
    assert not dropped and len(examples) == 2
    tasks = {t["id"]: t for t in read_tasks(env)}
    traces = {t["id"]: t for t in trace_env(env, unsafe=UNSAFE)}
    runner = EnvTools(env, unsafe=UNSAFE)
    try:
        for ex in examples:
            task, tr = tasks[ex.task_id], traces[ex.task_id]
            assert tr["answer"] == task["answer"] and tr["calls"]
            msgs = ex.messages
            assert msgs[:2] == [{"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": task["prompt"]}]
            turns = msgs[2:]
            assert len(turns) == 2 * len(tr["calls"]) + 1
            for k, rec in enumerate(tr["calls"]):
                call, result = turns[2 * k], turns[2 * k + 1]
                fn = call["tool_calls"][0]["function"]
                assert (fn["name"], json.loads(fn["arguments"])) == (rec["name"], rec["arguments"])
                assert result["role"] == "tool"
                assert result["content"] == runner.call(rec["name"], rec["arguments"]).content
            last = turns[-1]["tool_calls"][0]["function"]
            assert last["name"] == "submit_result" and json.loads(last["arguments"]) == {"answer": task["answer"]}
            # the mask: one run of assistant tokens per turn, none of them in tool output or the prompt
            runs, cur = [], []
            for i, m in zip(ex.ids, ex.mask):
                if m:
                    cur.append(i)
                elif cur:
                    runs.append(cur)
                    cur = []
            runs += [cur] if cur else []
            texts = [tok.decode(r) for r in runs]
            assert len(texts) == len(tr["calls"]) + 1
            assert all(t.startswith("<tool_call>") and t.endswith("</tool_call><|im_end|>") for t in texts)
            assert "submit_result" in texts[-1]
            assert ex.mask[: ex.ids.index(tok.token_to_id("<|im_start|>"), 1)] == [0] * ex.ids.index(
                tok.token_to_id("<|im_start|>"), 1)
    finally:
        runner.close()


class Forced:
    """An engine logits mask that allows exactly the next id of a script (the turn's SFT tokens)."""

    def __init__(self, ids: list[int]):
        self.ids, self.k = ids, 0

    def fill_mask(self, allowed: torch.Tensor) -> None:
        allowed[:] = False
        allowed[self.ids[min(self.k, len(self.ids) - 1)]] = True

    def accept(self, token: int) -> None:
        self.k += 1


def assistant_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, (t, m) in enumerate(zip(ids, mask)):
        if m:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(t)
    return runs


@pytest.mark.parametrize("family,thinking", [("deepseek-v3.2", True), ("deepseek-v3.2", False), ("chatml", False)])
def test_sft_encoding_is_what_the_loop_produces(shop: Path, family: str, thinking: bool):
    tok = byte_tokenizer(family)
    task = read_tasks(shop)[1]  # shop-b: an erroring call, then a good one, then the submission
    tr = {t["id"]: t for t in trace_env(shop, unsafe=UNSAFE)}[task["id"]]
    msgs = trajectory_messages(task, tr["calls"])
    ids, mask = encode_trajectory(msgs, tool_schemas(shop), tok, family=family, thinking=thinking)
    script = assistant_runs(ids, mask)
    model = peaked_tiny_v32() if family == "deepseek-v3.2" else tiny_llama(tok.vocab_size + 4)
    engine = Engine(model, max_slots=1, max_len=4096)
    try:
        backend = EngineBackend(engine, tok, family=family,
                                logits_mask=lambda turn: (lambda: Forced(script[turn])) if turn < len(script) else None)
        traj = run_env_task(backend, shop, task, AgentConfig(max_turns=6, max_tokens=400, thinking=thinking,
                                                             temperature=0.0), unsafe=UNSAFE)
    finally:
        engine.shutdown()
    assert traj.stop == "submit" and traj.verdict == "correct"
    assert [c["name"] for c in traj.calls] == ["get_price", "get_price", "submit_result"]
    assert traj.messages[-1]["content"] == "Answer submitted."  # the loop's last tool message, never fed back
    ro = traj.rollout
    assert ro.prompt_ids + ro.completion_ids == ids
    assert [0] * len(ro.prompt_ids) + ro.token_mask == mask


def test_sft_steps_lower_the_loss(shop: Path, tmp_path: Path):
    """A few AdamW steps on the trajectories lower the assistant-token loss: the Llama family's masked step and
    the V3.2 Trainer's step (MoE, the tiny preset with dense attention). For speed, on the last 384 (byte)
    tokens of each trajectory."""
    torch.manual_seed(0)
    v32 = Transformer(ModelConfig.from_name("tiny").replace(use_dsa=False))
    for family, model in (("chatml", tiny_llama()), ("deepseek-v3.2", v32)):
        tok = byte_tokenizer(family)
        examples, _ = build_examples(shop, tok, family=family, thinking=False, system=None, unsafe=UNSAFE,
                                     log=lambda s: None)
        rows = [(e.ids[-384:], e.mask[-384:]) for e in examples]  # the tails: calls, results, the submission
        assert all(sum(m) > 20 for _, m in rows)
        before = masked_loss(model, rows)
        result = train(model, rows, tmp_path / family, pad_id=0, max_steps=3, batch_size=3, lr=3e-3,
                       progress=False)
        after = masked_loss(model, rows)
        assert result.step == 3 and after < before - 0.05, (family, before, after)
        lines = (tmp_path / family / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3 and all(json.loads(s)["trained_tokens"] > 0 for s in lines)


def test_cli_saves_a_checkpoint_the_agent_loop_runs(shop: Path, tmp_path: Path, capsys):
    base, out = tmp_path / "base", tmp_path / "sft"
    tok = byte_tokenizer("chatml")
    save_hf(tiny_llama(tok.vocab_size + 4), base)
    tok.save(base)
    assert cli_main(["--model", str(base), "--envs", str(shop.parent), "--out", str(out), "--max-steps", "2",
                     "--batch-size", "2", "--lr", "1e-3", "--threads", "1", "--no-progress"]
                    + (["--unsafe"] if UNSAFE else [])) == 0
    data = json.loads((out / "data.json").read_text())
    assert data["trajectories"] == 3 and data["family"] == "chatml" and not data["thinking"]
    assert len((out / "trajectories.jsonl").read_text().splitlines()) == 3
    final = load_model(out / "final")
    trained = load_model(base)
    assert isinstance(final, LlamaModel)
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in final.state_dict().items())
    capsys.readouterr()
    assert agent_main(["--model", str(out / "final"), "--env", str(shop), "--max-turns", "2", "--max-tokens", "16"]
                      + (["--unsafe"] if UNSAFE else [])) == 0
    printed = capsys.readouterr().out
    assert "[stop]" in printed and "[verdict]" in printed
