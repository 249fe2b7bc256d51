"""Data parallelism: `torchrun --nproc-per-node 2 -m dsv32 train` (gloo, CPU) gives the same losses as one
process over the same global batch, with and without gradient accumulation, and the ranks stay identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv32.train import checkpointing as ckpt
from train_fixtures import prepare_word_corpus

FLAGS = ["--preset", "tiny", "--seq-len", "32", "--threads", "1", "--lr", "3e-3", "--warmup", "2",
         "--max-steps", "6", "--save-every", "3", "--eval-every", "3", "--no-progress", "--peak-flops", "1e10",
         "--no-export"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = "one two three four five six seven eight nine ten red green blue"
    return prepare_word_corpus(tmp_path_factory.mktemp("ddp_data"), words, n_docs=16, seed=1, val_fraction=0.15)


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_process_at_the_same_global_batch(data_dir: Path, tmp_path: Path) -> None:
    one, accum, two = tmp_path / "one", tmp_path / "accum", tmp_path / "two"
    train = [sys.executable, "-m", "dsv32", "train", "--data", str(data_dir), *FLAGS]
    _run([*train, "--out", str(one), "--batch-size", "4"])
    _run([*train, "--out", str(accum), "--batch-size", "2", "--grad-accum", "2"])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsv32",
          "train", "--data", str(data_dir), *FLAGS, "--out", str(two), "--batch-size", "2"])

    ref = _metrics(one)
    assert len(ref) == 6 and [r["step"] for r in ref if "val_loss" in r] == [3, 6]
    for other in (accum, two):
        got = _metrics(other)
        assert [r["step"] for r in got] == [r["step"] for r in ref]
        for a, b in zip(ref, got):
            assert a["tokens"] == b["tokens"]
            for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "val_loss"):
                if k in a:
                    assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (other.name, a["step"], k, a[k], b[k])

    # rank 0 alone wrote the checkpoints; its weights and router biases match the single process's
    w1 = ckpt.load_parts(one / "ckpt" / "step_000006", ["model"])["model"]
    w2 = ckpt.load_parts(two / "ckpt" / "step_000006", ["model"])["model"]
    for k, v in w1.items():
        if k.endswith("e_score_correction_bias"):
            assert torch.equal(v, w2[k]), k  # sign updates from identical integer loads
        else:
            torch.testing.assert_close(w2[k], v, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_fsdp2_two_ranks_equal_one_process_and_resume_across_layouts(data_dir: Path, tmp_path: Path) -> None:
    """`--fsdp` (FSDP2 over gloo): the same losses and weights as one process, and a checkpoint written by the
    replicated run resumes under FSDP (and the FSDP run's checkpoint holds the same full tensors)."""
    one, fsdp, resumed = tmp_path / "one", tmp_path / "fsdp", tmp_path / "resumed"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsv32",
                "train", "--data", str(data_dir), *FLAGS, "--batch-size", "2", "--fsdp"]
    _run([sys.executable, "-m", "dsv32", "train", "--data", str(data_dir), *FLAGS, "--out", str(one),
          "--batch-size", "4"])
    _run([*torchrun, "--out", str(fsdp)])
    # resume under FSDP from the replicated run's step-3 checkpoint
    resumed.mkdir()
    (resumed / "ckpt").mkdir()
    shutil.copytree(one / "ckpt" / "step_000003", resumed / "ckpt" / "step_000003")
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics(one)[:3]))
    _run([*torchrun, "--out", str(resumed), "--resume"])

    ref = _metrics(one)
    for other in (fsdp, resumed):
        got = _metrics(other)
        assert [r["step"] for r in got] == [r["step"] for r in ref], other.name
        for a, b in zip(ref, got):
            assert a["tokens"] == b["tokens"]
            for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "val_loss", "grad_norm"):
                if k in a:
                    assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (other.name, a["step"], k, a[k], b[k])
    w1 = ckpt.load_parts(one / "ckpt" / "step_000006", ["model", "optimizer"])
    for other in (fsdp, resumed):
        w2 = ckpt.load_parts(other / "ckpt" / "step_000006", ["model", "optimizer"])
        assert w2["model"].keys() == w1["model"].keys()
        for k, v in w1["model"].items():
            torch.testing.assert_close(w2["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        s1, s2 = w1["optimizer"]["state"], w2["optimizer"]["state"]
        assert set(s2) == set(s1), (other.name, set(s2) ^ set(s1))
        for i in s1:
            torch.testing.assert_close(s2[i]["exp_avg_sq"], s1[i]["exp_avg_sq"], rtol=1e-3, atol=1e-9)
