"""dsv32.rl.tasks / rewards: answer extraction, maths equality, the shaped reward's terms by hand, and every
registered task generating disjoint train / held-out items that its own answers score as correct."""

from __future__ import annotations

import pytest

from dsv32.rl.rewards import (
    RewardConfig,
    extract_answer,
    language_consistency,
    math_equal,
    overlong_penalty,
    shaped_reward,
)
from dsv32.rl.rollout import Rollout
from dsv32.rl.tasks import TASKS, get_task, score_rollouts, split_of
from serving_fakes import byte_tokenizer


def test_extract_answer():
    assert extract_answer("think... <answer> 42 </answer>") == "42"
    assert extract_answer("<answer>1</answer> then <ANSWER>2</ answer >") == "2"  # the last block counts
    assert extract_answer("<answer>\n-7\n</answer>\n") == "-7"
    assert extract_answer("<answer>3") is None  # unterminated
    assert extract_answer("<answer>  </answer>") is None
    assert extract_answer("the answer is 3") is None


def test_math_equal():
    assert math_equal("-4.0", "-4") and math_equal("0.5", "1/2") and math_equal("$12$", "12")
    assert not math_equal("4", "-4") and not math_equal("three", "3")
    assert not math_equal("9" * 100, "9" * 100)  # over the length cap: never parsed


def test_reward_terms_by_hand():
    assert overlong_penalty(10, 64, 16) == 0.0 and overlong_penalty(48, 64, 16) == 0.0
    assert overlong_penalty(56, 64, 16) == -0.5 and overlong_penalty(64, 64, 16) == -1.0
    assert overlong_penalty(63, 64, 0) == 0.0 and overlong_penalty(64, 64, 0) == -1.0
    assert language_consistency("the sum is 12") == 1.0 and language_consistency("1 + 2") == 1.0
    assert language_consistency("the 答案 is") == pytest.approx(2 / 3)
    assert language_consistency("答案 is", "cjk") == pytest.approx(1 / 2)
    cfg = RewardConfig(format_weight=0.1, length_weight=0.2, length_soft=16, language_weight=0.1)
    assert shaped_reward(1.0, "<answer>3</answer>", cfg, n_tokens=10, max_tokens=64) == 1.0
    # no answer block (-0.1), 56/64 tokens (0.2 * -0.5), one word of two off-script (0.1 * (0.5 - 1))
    assert shaped_reward(0.0, "so 答案", cfg, n_tokens=56, max_tokens=64) == pytest.approx(-0.1 - 0.1 - 0.05)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_items_disjoint_and_scored(name):
    task = get_task(name)
    train = task.items("train", 40, seed=0)
    held = task.items("heldout", 40, seed=0)
    assert len(train) == len(held) == 40
    assert not {i.question for i in train} & {i.question for i in held}
    assert all(split_of(i.question) == "train" for i in train)
    assert [i.question for i in task.items("train", 40, seed=0)] == [i.question for i in train]  # deterministic
    assert [i.question for i in task.items("train", 40, seed=1)] != [i.question for i in train]
    for item in held[:5]:
        assert "<answer>" in item.prompt
        assert task.score(item, f"Let me think.\n<answer>{item.answer}</answer>") == (1.0, "correct")
        reward, verdict = task.score(item, "<answer>no idea</answer>")
        assert verdict == "wrong" and reward < 1.0
        assert task.score(item, item.answer) == (pytest.approx(-0.1), "no_answer")


def test_get_task_errors_and_config():
    with pytest.raises(KeyError, match="unknown task"):
        get_task("nope")
    short = get_task("chain_sum", min_terms=2, max_terms=2)
    assert all(i.entry["metadata"]["num_terms"] == 2 for i in short.items("train", 10))


def test_score_rollouts_sets_reward_verdict_and_meta():
    tok = byte_tokenizer()
    tasks = {"chain_sum": get_task("chain_sum"), "letter_counting": get_task("letter_counting")}
    items = [tasks["chain_sum"].items("train", 1)[0], tasks["letter_counting"].items("heldout", 1)[0]]
    texts = [f"<answer>{items[0].answer}</answer>", "<answer>nope</answer>", "no tag", f"<answer>{items[1].answer}"
             "</answer>"]
    ros = []
    for j, (g, text) in enumerate(zip([0, 0, 0, 1], texts)):
        ids = tok.encode(text)
        ros.append(Rollout([1], ids, [1] * len(ids), [0.0] * len(ids), group=g, sample=j, max_tokens=256))
    acc = score_rollouts(ros, items, tasks, tok.decode)
    assert [r.verdict for r in ros] == ["correct", "wrong", "no_answer", "correct"]
    assert [r.reward for r in ros] == [1.0, 0.0, pytest.approx(-0.1), 1.0] and acc == 0.5
    assert ros[3].task == "letter_counting" and ros[3].meta == {"split": "heldout", "item": 0,
                                                                 "answer": items[1].answer}
