"""`dsv32 rl` end to end on the tiny V3.2 preset (MLA + DSA + MoE) with a byte-level tokenizer: metrics,
exact resume after SIGKILL, what each ablation switch changes, and the Llama-family export round trip."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsv32.llama import LlamaConfig, LlamaModel, save_hf
from dsv32.registry import load_model
from dsv32.rl import rollout as rollout_io
from dsv32.rl.cli import TaskMix, build_parser, cli_main, grpo_config
from dsv32.train import checkpointing as ckpt
from dsv32.train.plot import cli_main as plot_main
from serving_fakes import byte_tokenizer

METRIC_KEYS = ("step", "reward_mean", "accuracy", "kl", "clip_frac", "masked_frac", "route_flip_rate", "mismatch_kl",
               "tokens", "seconds", "t_rollout", "t_reference", "t_train")
COMPARED = ("reward_mean", "accuracy", "loss", "ratio_mean", "kl", "clip_frac", "masked_frac", "route_flip_rate",
            "mismatch_kl", "tokens", "completion_len")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bytes_tok")
    byte_tokenizer().save(d)
    return d


def flags(tok_dir: Path, out: Path, *extra: str) -> list[str]:
    """A small off-policy setting: 2 prompts x 4 completions, 2 mini-batches, top-p truncation, OPSM with a
    threshold that drops every negative-advantage sequence (so that the switch has something to do).

    An untrained model never writes an answer block, so the outcome is 0 for every completion; the
    language-consistency reward towards CJK (a real reward setting) tells its completions apart: a completion
    with no Latin letter scores 0.1 above one with letters, which gives the groups advantages to learn from."""
    return ["--model", "preset:tiny", "--tokenizer", str(tok_dir), "--task", "chain_sum", "--pool-size", "8",
            "--reward-script", "cjk",
            "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "6", "--minibatches", "2",
            "--top-p", "0.9", "--lr", "1e-2", "--delta", "-1", "--threads", "1", "--no-progress", "--out", str(out),
            *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in COMPARED:
            if ra[k] is None or rb[k] is None:
                assert ra[k] is rb[k], (ra["step"], k)
            else:
                assert abs(ra[k] - rb[k]) <= 1e-6 * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])


def test_prompts_are_a_function_of_seed_and_step():
    mix = TaskMix.build(["chain_sum:1", "basic_arithmetic:3"], {}, 8, seed=0)
    a, b = mix.draw(6, 0, 3), mix.draw(6, 0, 3)
    assert [x.question for x in a] == [x.question for x in b]
    assert [x.question for x in a] != [x.question for x in mix.draw(6, 0, 4)]
    assert all(x.split == "train" for x in a)
    many = [x.task for s in range(40) for x in mix.draw(4, 0, s)]
    assert 0.6 < many.count("basic_arithmetic") / len(many) < 0.9  # weight 3 of 4


@pytest.fixture(scope="module")
def base_run(tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-step run with every measure on (a checkpoint after each step), shared by the tests below."""
    out = tmp_path_factory.mktemp("rl") / "base"
    assert cli_main(flags(tok_dir, out, "--max-steps", "2", "--save-every", "1", "--save-rollouts")) == 0
    return out


def test_run_writes_every_metric_plots_and_exports(base_run: Path):
    out = base_run
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        missing = [k for k in METRIC_KEYS if k not in r]
        assert not missing, missing
        assert r["tokens"] > 0 and r["seconds"] >= r["t_rollout"] > 0 and r["t_reference"] > 0
    # step 1 samples from the weights it trains: the replayed, mask-renormalised forward is the sampler
    assert abs(recs[0]["mismatch_kl"]) < 1e-5 and 0 <= recs[0]["route_flip_rate"] <= 1
    assert recs[0]["masked_frac"] > 0  # delta -1 drops negative-advantage sequences
    assert recs[1]["kl"] > 0  # the policy moved away from the reference
    assert (out / "rollouts" / "step_000002.jsonl").is_file()
    assert "ray" not in sys.modules  # the default single-process run never imports Ray
    # the export is the checkpoint's weights, in a form dsv32.load_model reloads
    final = load_model(out / "final")
    saved = ckpt.load_parts(ckpt.list_checkpoints(out / "ckpt")[0])["model"]  # newest first
    for k, v in final.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert plot_main([str(out)]) == 0 and (out / "metrics.png").stat().st_size > 0


ABLATIONS = {"--no-unbiased-kl": "unbiased_kl", "--no-opsm": "opsm", "--no-keep-routing": "keep_routing",
             "--no-keep-sampling-mask": "keep_sampling_mask"}


def test_each_ablation_flag_turns_off_its_measure_only(tok_dir: Path, tmp_path: Path):
    on = grpo_config(build_parser().parse_args(flags(tok_dir, tmp_path)), moe=True)
    assert all(getattr(on, f) for f in ABLATIONS.values())
    for flag, field in ABLATIONS.items():
        off = grpo_config(build_parser().parse_args(flags(tok_dir, tmp_path, flag)), moe=True)
        assert off == dataclasses.replace(on, **{field: False}), flag
    assert not grpo_config(build_parser().parse_args(flags(tok_dir, tmp_path)), moe=False).keep_routing


def test_all_ablations_in_one_run(tok_dir: Path, base_run: Path, tmp_path: Path):
    """Every measure off at once samples the same tokens (the same rewards) as the base run's first step; what
    each switch leaves in the metrics shows (each switch alone: the slow test below)."""
    assert cli_main(flags(tok_dir, tmp_path / "off", "--max-steps", "1", "--no-export", *ABLATIONS)) == 0
    off, base = metrics(tmp_path / "off")[0], metrics(base_run)[0]
    assert off["reward_mean"] == base["reward_mean"] and off["tokens"] == base["tokens"]
    assert off["masked_frac"] == 0  # no OPSM
    assert off["route_flip_rate"] is None  # no Keep Routing
    assert off["mismatch_kl"] > 1e-3  # no Keep Sampling Mask: the full softmax is not the top-p sampler
    assert off["kl"] > 0


@pytest.mark.slow  # five runs; the default run covers the flags with the two tests above
def test_ablation_switches_change_what_they_should(tok_dir: Path, tmp_path: Path):
    def one_step(name: str, *extra: str) -> dict:
        assert cli_main(flags(tok_dir, tmp_path / name, "--max-steps", "1", "--no-export", *extra)) == 0
        return metrics(tmp_path / name)[0]

    base = one_step("base")
    assert base["masked_frac"] > 0 and base["route_flip_rate"] is not None and abs(base["mismatch_kl"]) < 1e-5
    no_opsm = one_step("no_opsm", "--no-opsm")
    assert no_opsm["masked_frac"] == 0 and no_opsm["reward_mean"] == base["reward_mean"]
    no_mask = one_step("no_mask", "--no-keep-sampling-mask")
    assert no_mask["mismatch_kl"] > 1e-3  # the full softmax is not the top-p sampler: about -ln(kept mass)
    no_route = one_step("no_route", "--no-keep-routing")
    assert no_route["route_flip_rate"] is None and no_route["reward_mean"] == base["reward_mean"]
    k3 = one_step("k3", "--no-unbiased-kl")
    # the second mini-batch is off-policy: plain K3 lacks the pi_theta/pi_old ratio of the unbiased estimate
    assert k3["kl"] > 0 and abs(k3["kl"] - base["kl"]) > 1e-4 * base["kl"]


def _cmd(tok_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsv32", "rl", *flags(tok_dir, out, "--max-steps", "6", "--save-every", "2",
                                                        "--no-export", *extra)]


def test_stop_then_resume_matches_uninterrupted(tok_dir: Path, base_run: Path, tmp_path: Path):
    """In-process: the base run's directory cut back to its step-1 checkpoint (as if stopped after step 1) and
    resumed to step 2 logs what the uninterrupted run logged."""
    b = tmp_path / "b"
    shutil.copytree(base_run, b)
    shutil.rmtree(ckpt.list_checkpoints(b / "ckpt")[0])  # the step-2 one (newest first)
    assert cli_main(flags(tok_dir, b, "--max-steps", "2", "--save-every", "0", "--no-export", "--resume")) == 0
    assert_same(metrics(base_run), metrics(b))
    assert len({r["reward_mean"] for r in metrics(b)}) > 1


@pytest.mark.slow  # two fresh processes: about a minute on the shared 2-core machine
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tok_dir: Path, tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    b_out = tmp_path / "b"
    b = subprocess.Popen(_cmd(tok_dir, b_out), env=env, stderr=subprocess.PIPE, text=True)
    try:
        a_out = tmp_path / "a"  # the uninterrupted run, in this process meanwhile
        assert cli_main(flags(tok_dir, a_out, "--max-steps", "6", "--save-every", "2", "--no-export")) == 0
        path = b_out / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (path.exists() and path.read_text().count("\n") >= 3):  # step 2 saved, step 4 in flight
            assert b.poll() is None, b.stderr.read()
            assert time.monotonic() < deadline, "no third step in time"
            time.sleep(0.01)
        b.send_signal(signal.SIGKILL)
        b.wait()
    finally:
        if b.poll() is None:
            b.kill()
    assert b.returncode == -signal.SIGKILL
    assert len(metrics(b_out)) < 6
    resumed = subprocess.run(_cmd(tok_dir, b_out, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    ra, rb = metrics(a_out), metrics(b_out)
    assert len(ra) == 6
    assert_same(ra, rb)
    with pytest.raises(SystemExit, match="other"):  # a resumed run must keep what a step computes
        cli_main(flags(tok_dir, b_out, "--max-steps", "7", "--resume", "--beta", "0.1"))


def test_llama_family_rl_exports_and_reloads(tmp_path: Path):
    """A dense Llama-family model (SmolLM2's architecture, tiny) through `dsv32 rl`: HF Llama format out,
    `dsv32.load_model` back in, the same weights and logits."""
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000.0,
                      index_n_heads=2, index_head_dim=16, index_rope_head_dim=8, index_topk=16, use_dsa=False)
    torch.manual_seed(0)
    model = LlamaModel(cfg).eval()
    save_hf(model, tmp_path / "base")
    back = load_model(tmp_path / "base")
    assert isinstance(back, LlamaModel) and back.config == cfg
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(back(ids), model(ids))

    tok = tmp_path / "tok"
    byte_tokenizer("chatml").save(tok)
    out = tmp_path / "rl"
    assert cli_main(["--model", str(tmp_path / "base"), "--tokenizer", str(tok), "--task", "chain_sum",
                     "--pool-size", "4", "--reward-script", "cjk", "--group-size", "4", "--prompts-per-step", "2",
                     "--max-new-tokens", "5",
                     "--lr", "1e-2", "--max-steps", "1", "--threads", "1", "--no-progress",
                     "--out", str(out)]) == 0
    rec = metrics(out)[0]
    assert rec["route_flip_rate"] is None and abs(rec["mismatch_kl"]) < 1e-5
    final = load_model(out / "final")
    assert isinstance(final, LlamaModel)
    saved = ckpt.load_parts(ckpt.list_checkpoints(out / "ckpt")[-1])["model"]
    assert all(torch.equal(v, saved[k]) for k, v in final.state_dict().items())
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in final.state_dict().items())


@pytest.mark.slow  # Ray's start-up alone takes 20-40 s on the shared 2-core machine
def test_ray_rollout_workers_match_single_process(tok_dir: Path, tmp_path: Path):
    """Two Ray actors, each with its own engine and weights refreshed after every update, sample the same
    tokens as the in-process engine; the losses agree within 1e-5."""
    ray = pytest.importorskip("ray")
    common = ("--max-steps", "2", "--save-every", "0", "--no-export", "--save-rollouts", "--prompts-per-step", "3")
    assert cli_main(flags(tok_dir, tmp_path / "local", *common)) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert cli_main(flags(tok_dir, tmp_path / "ray", *common, "--rollout-workers", "2")) == 0
    finally:
        ray.shutdown()
    for step in (1, 2):
        a = rollout_io.load(tmp_path / "local" / "rollouts" / f"step_{step:06d}.jsonl")
        b = rollout_io.load(tmp_path / "ray" / "rollouts" / f"step_{step:06d}.jsonl")
        assert [(r.group, r.sample, r.seed, r.completion_ids) for r in a] == \
            [(r.group, r.sample, r.seed, r.completion_ids) for r in b]
        assert all(torch.equal(x, y) for ra, rb in zip(a, b) for x, y in zip(ra.routes, rb.routes))
    la, lb = metrics(tmp_path / "local"), metrics(tmp_path / "ray")
    for ra, rb in zip(la, lb):
        for k in ("loss", "kl", "ratio_mean", "reward_mean", "mismatch_kl"):
            assert abs(ra[k] - rb[k]) <= 1e-5, (ra["step"], k, ra[k], rb[k])
    assert lb[1]["kl"] > 0  # the second step sampled from updated weights in both
