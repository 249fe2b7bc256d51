"""`dsv32 bench rl-gain` end to end at toy sizes: every stage runs, hands its output to the next, and the
report's table, JSON and curves describe the three models (the measured run is in docs/rl.md)."""

from __future__ import annotations

import json

from dsv32.bench import rl_gain
from dsv32.rl.tasks import split_of


def test_rl_gain_stages_end_to_end(tmp_path):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--terms", "2", "--hidden", "32", "--layers", "2", "--sft-examples", "16",
            "--eval-items", "8", "--test-items", "6", "--sft-max-steps", "4", "--eval-every", "2", "--patience", "5",
            "--rl-pool", "16",
            "--rl-steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--save-every", "1",
            "--report-samples", "2"]
    assert rl_gain.main(argv) == 0

    args = rl_gain.build_parser().parse_args(argv)
    sft_questions = {json.loads(x)["question"] for x in (out / "sft_items.jsonl").read_text().splitlines()}
    valid = rl_gain.validation_items(args)
    assert len(valid) == 8 and not {it.question for it in valid} & sft_questions  # never labelled in SFT
    assert all(split_of(q) == "train" for q in sft_questions)
    test = rl_gain.test_items(args)
    more = rl_gain.test_items(rl_gain.build_parser().parse_args(argv + ["--test-items", "12"]))
    assert len(test) == 6 and more[:6] == test and all(split_of(it.question) == "heldout" for it in more)

    curve = [json.loads(x) for x in (out / "sft_curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [0, 2, 4]
    metrics = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert "--task-config" in (out / "rl_command.txt").read_text()

    res = json.loads((out / "results.json").read_text())
    assert list(res["test"]) == ["base (random init)", "SFT", "RL"]
    for r in res["test"].values():
        assert 0.0 <= r["greedy_accuracy"] <= 1.0 and "pass@2" in r
    assert res["rl_steps"] == 2 and set(res["rl_step_split_median"]) >= {"t_rollout", "t_reference", "t_train"}
    table = (out / "table.md").read_text()
    assert "| RL |" in table and "(6 items, 6 distinct" in table and "validation (8 items" in table
    rl_curve = [json.loads(x) for x in (out / "rl_curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl_curve] == [0, 1, 2] and all("test_accuracy" in r for r in rl_curve)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # the four-measure ablation from the same SFT checkpoint: one arm per switch, one step each here
    assert rl_gain.main([*argv, "--stage", "ablation", "--abl-steps", "1"]) == 0
    arms = json.loads((out / "ablation.json").read_text())["arms"]
    assert list(arms) == list(rl_gain.ABLATION_ARMS)
    for arm in arms:
        saved = json.loads((out / "abl" / arm / "rl_args.json").read_text())
        assert (saved["minibatches"], saved["top_p"], saved["beta"], saved["max_steps"]) == (8, 0.9, 0.02, 1)
        switched = {"no-unbiased-kl": "unbiased_kl", "no-opsm": "opsm", "no-keep-routing": "keep_routing",
                    "no-keep-sampling-mask": "keep_sampling_mask"}
        for a, key in switched.items():
            assert saved[key] is (a != arm), (arm, key)
    assert len((out / "ablation.md").read_text().splitlines()) == 2 + len(arms)
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
