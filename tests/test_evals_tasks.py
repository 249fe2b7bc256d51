"""`dsv32 eval tasks`: pass@k against hand-computed numbers, a scripted model that answers correctly scores 1
through the real engine and checker, and the CLI end to end on the tiny V3.2 preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv32.evals import cli_main as eval_main
from dsv32.evals.tasks import evaluate, ks_for
from dsv32.rl.tasks import ChatCodec, get_task
from serving_fakes import byte_tokenizer, scripted


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ks_for():  # pass@k itself (evals.common) is checked by hand in test_evals_agent.py
    assert ks_for(8) == [1, 2, 4, 8] and ks_for(6) == [1, 2, 4, 6] and ks_for(1) == [1]


@pytest.mark.parametrize("family", ["deepseek-v3.2", "chatml"])
def test_scripted_perfect_answer_scores_one(family: str):
    tok = byte_tokenizer(family)
    task = get_task("chain_sum")
    items = task.items("heldout", 2, seed=0)
    assert items[0].answer != items[1].answer
    model = scripted(tok, f"Adding up: <answer>{items[0].answer}</answer>")  # right for item 0 only
    out = evaluate(model, ChatCodec.for_tokenizer(tok), task, items[:1], samples=3, max_new_tokens=40)
    r = out["results"]
    assert r["greedy_accuracy"] == 1.0 and r["pass@1"] == 1.0 and r["pass@3"] == 1.0
    assert out["items"][0]["verdict"] == "correct" and out["items"][0]["correct_of_samples"] == 3
    both = evaluate(model, ChatCodec.for_tokenizer(tok), task, items, samples=2, max_new_tokens=40)["results"]
    assert both["greedy_accuracy"] == 0.5 and both["pass@2"] == 0.5 and both["greedy_no_answer"] == 0.0


def test_more_items_than_the_engine_queue():
    """200 held-out items (the issue's size) through 2 slots: everything is queued at once, none refused."""
    tok = byte_tokenizer("chatml")
    task = get_task("chain_sum")
    items = task.items("heldout", 200, seed=0)
    model = scripted(tok, f"<answer>{items[0].answer}</answer>")
    r = evaluate(model, ChatCodec.for_tokenizer(tok), task, items, samples=1, max_new_tokens=2, slots=2)["results"]
    assert r["greedy_completion_len"] == 2.0 and r["greedy_no_answer"] == 1.0 and r["pass@1"] == 0.0


def test_cli_on_tiny_preset(tmp_path: Path):
    byte_tokenizer().save(tmp_path / "tok")
    out = tmp_path / "eval.json"
    assert eval_main(["tasks", "--model", "preset:tiny", "--tokenizer", str(tmp_path / "tok"), "--task", "chain_sum",
                      "--num", "3", "--samples", "2", "--max-new-tokens", "4", "--threads", "1", "--json",
                      str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["eval"] == "tasks" and res["settings"]["split"] == "heldout" and res["settings"]["num"] == 3
    r = res["results"]
    assert r["greedy_accuracy"] == 0.0 and r["pass@1"] == 0.0 and r["pass@2"] == 0.0  # random weights
    assert r["greedy_completion_len"] == 4.0
