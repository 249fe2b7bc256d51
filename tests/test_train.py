"""Trainer tests (CPU, `tiny` preset): losses against their plain definitions, the schedule and optimiser groups,
an end-to-end run with eval/plot/export, exact resume (in-process and after SIGKILL of a real process),
corrupt-checkpoint fallback, SIGTERM, continued training and SFT.

Token data is built through ``dsv32.data.prepare`` with a byte-level tokenizer defined here (hermetic).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsv32.chat import encode_chat
from dsv32.checkpoint import load_model
from dsv32.config import PRESETS, ModelConfig
from dsv32.model import Transformer
from dsv32.tokenizer import load_tokenizer
from dsv32.train import checkpointing as ckpt
from dsv32.train.losses import (
    chunked_cross_entropy,
    expert_load,
    sequence_balance_loss,
    update_router_bias,
)
from dsv32.train.plot import cli_main as plot_main
from dsv32.train.run import RunLoop, lr_at
from dsv32.train.trainer import SFTBatches, cli_main, flops_per_token, param_groups
from train_fixtures import WideByteTok, prepare_word_corpus

# Flags every run here shares: a tiny batch, one thread (runs are compared across processes), quiet.
COMMON = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--threads", "1", "--lr", "3e-3",
          "--warmup", "2", "--eval-batches", "2", "--no-progress", "--peak-flops", "1e10"]
COMPARED = ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "val_loss")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = "the cat sat on a mat while dogs ran far away from home and back again"
    return prepare_word_corpus(tmp_path_factory.mktemp("train_data"), words, n_docs=20, seed=0, val_fraction=0.1)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a: list[dict], b: list[dict], tol: float = 1e-6, note: str = "") -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b], note
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert (k in ra) == (k in rb), (ra["step"], k)
            if k in ra:
                assert abs(ra[k] - rb[k]) <= tol * max(1.0, abs(ra[k])), (note, ra["step"], k, ra[k], rb[k])


# ------------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("use_mask", [False, True])
def test_chunked_cross_entropy_equals_plain_loss_and_gradient(use_mask: bool) -> None:
    g = torch.Generator().manual_seed(0)
    B, S, D, V = 3, 11, 16, 53
    h = torch.randn(B, S, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (B, S), generator=g)
    mask = torch.rand(B, S, generator=g) > 0.4 if use_mask else None

    loss = chunked_cross_entropy(h, w, y, mask, chunk=7)  # 33 rows: chunks of 7 do not divide evenly
    gh, gw = torch.autograd.grad(loss, (h, w))
    logits = h @ w.t()
    keep = mask if mask is not None else torch.ones(B, S, dtype=torch.bool)
    ref = F.cross_entropy(logits[keep], y[keep])
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
    total = chunked_cross_entropy(h, w, y, mask, chunk=4, reduction="sum")
    torch.testing.assert_close(total, ref * keep.sum(), rtol=1e-5, atol=1e-5)


def test_sequence_balance_loss_matches_v3_equations() -> None:
    """Eq. 17-20 written out with loops: f_i = E/(K T) sum_t 1[i in topK(t)], P_i = 1/T sum_t s'_{i,t}."""
    g = torch.Generator().manual_seed(1)
    B, T, E, K = 2, 5, 6, 2
    scores = torch.rand(B * T, E, generator=g)
    routes = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T)])
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 3:] = False
    got = sequence_balance_loss(scores, routes, B, valid)
    for b in range(B):
        ts = [t for t in range(T) if valid[b, t]]
        want = 0.0
        for i in range(E):
            f = E / (K * len(ts)) * sum(int(i in routes[b * T + t].tolist()) for t in ts)
            P = sum(float(scores[b * T + t, i] / scores[b * T + t].sum()) for t in ts) / len(ts)
            want += f * P
        assert abs(float(got[b]) - want) < 1e-5
    # perfectly uniform routing and affinities give exactly 1 (the loss's minimum scale)
    uni = sequence_balance_loss(torch.ones(E, E), torch.arange(E).view(E, 1).repeat(1, 1), 1)
    assert abs(float(uni[0]) - 1.0) < 1e-6


def test_router_bias_moves_towards_balance() -> None:
    routes = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    load = expert_load(routes, 4)
    assert load.tolist() == [4.0, 2.0, 1.0, 1.0]
    bias = torch.zeros(4)
    update_router_bias([bias], [load], 0.01)
    assert bias.tolist() == pytest.approx([-0.01, 0.0, 0.01, 0.01])  # mean load is 2: expert 1 stays


def test_lr_schedule_warmup_then_cosine_to_min() -> None:
    kw = dict(lr=1.0, min_lr=0.1, warmup=4, max_steps=20)
    lrs = [lr_at(i, **kw) for i in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_param_groups_skip_decay_on_norms_biases_embeddings() -> None:
    model = Transformer(ModelConfig.from_name("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert "embed_tokens.weight" in no and "norm.weight" in no and "layers.0.input_layernorm.weight" in no
    assert "lm_head.weight" in yes and "layers.1.mlp.experts.gate_proj" in yes
    assert all(p.dim() >= 2 for p in decay["params"])
    assert len(no) + len(yes) == len(list(model.parameters()))


def test_flops_per_token_is_six_times_active_params_plus_attention() -> None:
    """Cross-check the closed form against the real model's parameters (dense attention: S <= index_topk)."""
    cfg = ModelConfig.from_name("tiny")
    model = Transformer(cfg)
    S = cfg.index_topk
    active = 0.0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name == "embed_tokens.weight" or ".indexer." in name:
            continue  # norms (elementwise), the lookup table, the indexer (unused below index_topk)
        scale = cfg.num_experts_per_tok / cfg.n_routed_experts if ".experts." in name else 1.0
        active += p.numel() * scale
    active += cfg.num_nextn_predict_layers * cfg.vocab_size * cfg.hidden_size  # the head, reused by MTP
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    H = cfg.num_attention_heads
    attention = layers * 6 * H * (cfg.qk_head_dim + cfg.v_head_dim) * (S + 1) / 2
    assert flops_per_token(cfg, S) == pytest.approx(6 * active + attention, rel=1e-9)
    assert flops_per_token(cfg, S, mtp=False) < flops_per_token(cfg, S)


# ------------------------------------------------------------------------------------------------ the run loop


def _toy_run(out: Path, max_steps: int, *, resume: bool = False, stop_after: int | None = None) -> tuple[bool, int]:
    """A third stage plugged into RunLoop the way RL plugs in: a step function, state() and load(). Noisy SGD on
    a linear model; the noise comes from the global torch RNG, so exact resume needs the loop's RNG restore."""
    torch.manual_seed(0)  # every run starts the same way; a resumed one then takes the checkpoint's RNG
    with RunLoop(out, name="toy", max_steps=max_steps, save_every=2, keep=None, resume=resume,
                 progress=False) as loop:
        w = torch.zeros(3)
        extra = {"seen": 0}
        if loop.resume_parts is not None:
            w = loop.resume_parts["model"]["w"].clone()

        def step(i: int) -> dict:
            nonlocal w
            x = torch.randn(8, 3)
            y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(8)
            grad = 2 * x.t() @ (x @ w - y) / 8
            w = w - lr_at(i, lr=0.1, min_lr=0.01, warmup=1, max_steps=max_steps) * grad
            extra["seen"] += 8
            if stop_after is not None and i + 1 == stop_after:
                loop.request_stop()  # as SIGTERM would
            return {"loss": float(((x @ w - y) ** 2).mean()), "seen": extra["seen"]}

        def load(parts: dict) -> None:
            extra["seen"] = parts["trainer"]["seen"]

        result = loop.run(step, state=lambda: {"model": {"w": w}, "trainer": {"seen": extra["seen"]}}, load=load)
    return result.stopped, result.step


def test_run_loop_stop_and_resume_reproduce_an_uninterrupted_run(tmp_path: Path) -> None:
    assert _toy_run(tmp_path / "a", 7) == (False, 7)
    assert _toy_run(tmp_path / "b", 7, stop_after=3) == (True, 3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "ckpt")] == ["step_000003", "step_000002"]
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.0}\n{"step": 5')  # lines past the checkpoint, one torn: dropped
    with pytest.raises(SystemExit, match="--resume"):
        _toy_run(tmp_path / "b", 7)
    assert _toy_run(tmp_path / "b", 7, resume=True) == (False, 7)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 8)) and a == b
    assert ckpt.load_parts(tmp_path / "b" / "ckpt" / "step_000007")["trainer"]["seen"] == 7 * 8


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def base_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps, validation and a checkpoint every 3 steps (kept: 3 and 6), HF export."""
    out = tmp_path_factory.mktemp("base") / "run"
    rc = cli_main([*COMMON, "--data", str(data_dir), "--out", str(out), "--max-steps", "6", "--save-every", "3",
                   "--eval-every", "3"])
    assert rc == 0
    return out


def test_run_writes_metrics_checkpoints_and_export(base_run: Path) -> None:
    recs = read_metrics(base_run)
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:
        for k in ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens",
                  "tokens_per_s", "mfu"):
            assert k in r and math.isfinite(r[k]), k
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.3 * r["mtp_loss"] + r["balance_loss"], rel=1e-9)
    assert [r["step"] for r in recs if "val_loss" in r] == [3, 6]
    assert recs[0]["lm_loss"] == pytest.approx(math.log(512), abs=0.1)  # random init: uniform over the vocab
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 1.0
    assert recs[-1]["tokens"] == 6 * 2 * 32
    assert [p.name for p in ckpt.list_checkpoints(base_run / "ckpt")] == ["step_000006", "step_000003"]
    for p in ckpt.list_checkpoints(base_run / "ckpt"):
        assert ckpt.verify_checkpoint(p) is None

    # the router biases moved (aux-loss-free balancing) and are saved with the model
    state = ckpt.load_parts(base_run / "ckpt" / "step_000006", ["model"])["model"]
    biases = [v for k, v in state.items() if k.endswith("e_score_correction_bias")]
    assert len(biases) == 3 and all(b.abs().sum() > 0 for b in biases)

    # OUT/final is an HF-format directory that loads back to the same weights
    final = load_model(base_run / "final")
    for k, v in final.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_plot_writes_png(base_run: Path) -> None:
    pytest.importorskip("matplotlib")
    assert plot_main([str(base_run), "--out", str(base_run / "curves.png")]) == 0
    assert (base_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_with_checkpoints_needs_resume(base_run: Path, data_dir: Path) -> None:
    with pytest.raises(SystemExit, match="--resume"):
        cli_main([*COMMON, "--data", str(data_dir), "--out", str(base_run), "--max-steps", "6"])


@pytest.mark.parametrize("damage", ["checksum", "missing_file", "no_manifest", "leftover_tmp"])
def test_resume_detects_corrupt_checkpoint_and_uses_previous(
    base_run: Path, data_dir: Path, tmp_path: Path, damage: str
) -> None:
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    newest = out / "ckpt" / "step_000006"
    expect_from = 3
    if damage == "checksum":
        blob = bytearray((newest / "model.pt").read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        (newest / "model.pt").write_bytes(bytes(blob))
    elif damage == "missing_file":
        (newest / "optimizer.pt").unlink()
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:  # a save of step 9 killed half-way: the tmp dir is ignored and removed, step 6 is good
        gone = subprocess.Popen(["true"])
        gone.wait()  # a process id that no longer runs, as a killed writer's
        tmp = out / "ckpt" / f".tmp-step_{9:06d}-{gone.pid}"
        tmp.mkdir()
        (tmp / "model.pt").write_bytes(b"partial")
        expect_from = 6
    # metrics of steps past the checkpoint (and a torn line) must be dropped and redone
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.0')
    with pytest.warns(ckpt.CheckpointWarning):
        rc = cli_main([*COMMON, "--data", str(data_dir), "--out", str(out), "--max-steps", "6", "--save-every",
                       "3", "--eval-every", "3", "--resume"])
    assert rc == 0
    assert_same_metrics(read_metrics(out), read_metrics(base_run))
    assert not list((out / "ckpt").glob(".tmp-*"))
    assert ckpt.verify_checkpoint(out / "ckpt" / "step_000006") is None
    if expect_from == 3:
        assert len(list((out / "ckpt").glob("corrupt-step_000006-*"))) == 1


_HANGING_RESAVE = """
import os, sys, time
import torch
from dsv32.train import checkpointing as ckpt

real_rename = os.rename
def rename(src, dst):  # hang right after the old copy of the step went to the trash
    real_rename(src, dst)
    if ".trash-" in str(dst):
        time.sleep(600)
os.rename = rename
ckpt.save_checkpoint(sys.argv[1], 5, {"model": {"w": torch.full((4,), 2.0)}}, keep=None)
"""


def test_resave_of_a_step_killed_mid_swap_keeps_that_step(tmp_path: Path) -> None:
    """Re-saving step 5 moves the old step_000005 aside before renaming the new one in; a SIGKILL between the two
    renames must not let the next resume's clean-up delete the only copy of step 5."""
    root = tmp_path / "ckpt"
    ckpt.save_checkpoint(root, 4, {"model": {"w": torch.zeros(4)}}, keep=None)
    ckpt.save_checkpoint(root, 5, {"model": {"w": torch.ones(4)}}, keep=None)
    proc = subprocess.Popen([sys.executable, "-c", _HANGING_RESAVE, str(root)], env=_env(), stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 180
        while not list(root.glob(".trash-step_000005-*")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the child never reached the swap"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (root / "step_000005").exists()  # killed inside the window: step 5 lives only in the trash
    with pytest.warns(ckpt.CheckpointWarning, match="restoring"):
        path, manifest = ckpt.latest_valid(root)
    assert path.name == "step_000005" and manifest["step"] == 5
    assert torch.equal(ckpt.load_parts(path)["model"]["w"], torch.ones(4))
    assert sorted(p.name for p in root.iterdir()) == ["step_000004", "step_000005"]
    ckpt.save_checkpoint(root, 5, {"model": {"w": torch.full((4,), 3.0)}}, keep=None)  # a re-save completes
    assert torch.equal(ckpt.load_parts(root / "step_000005")["model"]["w"], torch.full((4,), 3.0))
    assert sorted(p.name for p in root.iterdir()) == ["step_000004", "step_000005"]


def test_preset_takes_the_vocabulary_of_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dsv32 data prepare` with another tokenizer, then `dsv32 train --preset tiny`: the model's vocab_size
    follows the data's manifest (logged), resume agrees, and --vocab-size overrides it."""
    data = prepare_word_corpus(tmp_path, "alpha beta gamma delta", n_docs=6, seed=0, val_fraction=0.0,
                               tokenizer=WideByteTok())
    flags = [*COMMON, "--data", str(data), "--eval-every", "0", "--no-export", "--save-every", "0"]
    out = tmp_path / "run"
    assert cli_main([*flags, "--out", str(out), "--max-steps", "1"]) == 0
    assert "vocab_size 1000 from" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1000
    model = ckpt.load_parts(out / "ckpt" / "step_000001", ["model"])["model"]
    assert model["embed_tokens.weight"].shape[0] == 1000 and math.isfinite(read_metrics(out)[0]["loss"])
    assert cli_main([*flags, "--out", str(out), "--max-steps", "2", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2]

    assert cli_main([*flags, "--out", str(tmp_path / "wide"), "--max-steps", "1", "--vocab-size", "1024"]) == 0
    assert "vocab_size 1000 from" not in capsys.readouterr().err
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["vocab_size"] == 1024
    with pytest.raises(SystemExit, match="--vocab-size"):
        cli_main([*flags, "--out", str(tmp_path / "small"), "--max-steps", "1", "--vocab-size", "512"])


def test_clean_up_spares_the_temporaries_of_a_live_writer(tmp_path: Path) -> None:
    """A resume or an evaluation of a run that is still saving must not delete that save's temporaries."""
    root = tmp_path / "ckpt"
    ckpt.save_checkpoint(root, 1, {"model": {"w": torch.ones(1)}})
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = [root / f".tmp-step_000002-{writer.pid}", root / f".trash-step_000001-{writer.pid}"]
        for p in live:
            p.mkdir()
        assert ckpt.latest_valid(root)[0].name == "step_000001"
        assert all(p.is_dir() for p in live)
    finally:
        writer.kill()
        writer.wait()
    with pytest.warns(ckpt.CheckpointWarning, match="removing"):
        ckpt.latest_valid(root)
    assert [p.name for p in root.iterdir()] == ["step_000001"]


def test_continued_training_from_exported_model(base_run: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cont"
    rc = cli_main([*[a for a in COMMON if a not in ("--preset", "tiny")], "--init-from", str(base_run / "final"),
                   "--data", str(data_dir), "--out", str(out), "--max-steps", "2", "--eval-every", "0",
                   "--no-export"])
    assert rc == 0
    first = read_metrics(out)[0]["lm_loss"]
    assert first < read_metrics(base_run)[0]["lm_loss"] - 1.0  # starts from the trained weights
    # resuming rebuilds the model from the checkpoint's own config (the export's dtype fields differ)
    rc = cli_main([*[a for a in COMMON if a not in ("--preset", "tiny")], "--init-from", str(base_run / "final"),
                   "--data", str(data_dir), "--out", str(out), "--max-steps", "3", "--eval-every", "0",
                   "--no-export", "--resume"])
    assert rc == 0 and [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_sft_trains_only_on_assistant_tokens(tmp_path: Path) -> None:
    tok = load_tokenizer()
    convs = [
        {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
        for a, b in [(1, 2), (3, 4), (10, 20), (7, 7), (5, 9)]
    ]
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("".join(json.dumps(c) + "\n" for c in convs))

    batches = SFTBatches(jsonl, tok, seed=0, batch_size=2, seq_len=64)
    b = batches.get(0, 0, 1)
    for row in range(2):
        ids = b.ids[row].tolist()
        n = int(b.valid[row].sum()) + 1
        match = next(c for c in convs if encode_chat(c["messages"], tokenizer=tok)[0] == ids[:n])
        want_ids, want_mask = encode_chat(match["messages"], tokenizer=tok)
        labels = torch.tensor(ids[1:n])
        assert labels[b.loss_mask[row, : n - 1]].tolist() == [i for i, m in zip(want_ids[1:], want_mask[1:]) if m]
        assert not b.loss_mask[row, n - 1 :].any()

    cfg = ModelConfig.from_name("tiny").replace(vocab_size=129280)
    cfg.to_hf(tmp_path / "cfg")
    out = tmp_path / "sft"
    rc = cli_main(["--config", str(tmp_path / "cfg"), "--sft", str(jsonl), "--out", str(out), "--max-steps", "3",
                   "--seq-len", "64", "--batch-size", "2", "--threads", "1", "--no-progress", "--peak-flops", "1e10",
                   "--save-every", "0", "--lr", "3e-3", "--warmup", "1"])
    assert rc == 0
    recs = read_metrics(out)
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) for r in recs)
    assert recs[0]["lm_loss"] == pytest.approx(math.log(129280), abs=0.2)
    assert (out / "final" / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------------------ processes


def _train_cmd(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsv32", "train", *COMMON, "--data", str(data_dir), "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


def _wait_for_steps(out: Path, proc: subprocess.Popen, n: int, timeout: float = 120.0) -> bool:
    """Until metrics.jsonl has n complete lines; False when the process ended first."""
    deadline = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError(f"{out}: no step {n} within {timeout}s")


def test_sigkill_at_random_moment_then_resume_matches_uninterrupted(data_dir: Path, tmp_path: Path) -> None:
    seed = int(time.time() * 1000) % 100_000
    rng = random.Random(seed)
    steps = ["--max-steps", "24", "--save-every", "4", "--keep", "2", "--eval-every", "8", "--no-export"]
    a_out, b_out = tmp_path / "a", tmp_path / "b"
    a = subprocess.Popen(_train_cmd(data_dir, a_out, *steps), env=_env(), stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(_train_cmd(data_dir, b_out, *steps), env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        kill_after = rng.randint(5, 16)  # the first checkpoint is at step 4; 8+ steps remain
        assert _wait_for_steps(b_out, b, kill_after), b.stderr.read()
        time.sleep(rng.uniform(0, 0.05))  # somewhere inside a step, an eval or a checkpoint write
        assert b.poll() is None, f"run finished before the kill (seed {seed})"
        b.send_signal(signal.SIGKILL)
        b.wait()
        assert b.returncode == -signal.SIGKILL
        assert ckpt.list_checkpoints(b_out / "ckpt"), "killed before the first checkpoint"
        resumed = subprocess.run(_train_cmd(data_dir, b_out, *steps, "--resume"), env=_env(), capture_output=True,
                                 text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed from" in resumed.stderr
        assert a.wait(timeout=300) == 0, a.stderr.read()
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    ra, rb = read_metrics(a_out), read_metrics(b_out)
    assert len(ra) == 24
    assert_same_metrics(ra, rb, tol=1e-6, note=f"seed {seed}, killed after step {kill_after}")


def test_sigterm_finishes_step_saves_and_exits_zero(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    p = subprocess.Popen(_train_cmd(data_dir, out, "--max-steps", "100000", "--save-every", "0", "--eval-every",
                                    "0", "--no-export"), env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for_steps(out, p, 3), p.stderr.read()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    last = read_metrics(out)[-1]["step"]
    (saved,) = ckpt.list_checkpoints(out / "ckpt")
    assert saved.name == ckpt.step_dir_name(last) and ckpt.verify_checkpoint(saved) is None
    assert "SIGTERM" in err


def test_objective_switches_off_and_bench_smoke(data_dir: Path, tmp_path: Path) -> None:
    """--mtp-weight 0 / --balance-alpha 0 skip those terms (MTP router untouched); the HF bench runs (tiny)."""
    out = tmp_path / "plain"
    rc = cli_main([*COMMON, "--data", str(data_dir), "--out", str(out), "--max-steps", "2", "--mtp-weight", "0",
                   "--balance-alpha", "0", "--eval-every", "0", "--no-export", "--save-every", "0"])
    assert rc == 0
    r = read_metrics(out)[-1]
    assert r["mtp_loss"] == 0 and r["balance_loss"] == 0 and r["loss"] == r["lm_loss"]
    state = ckpt.load_parts(out / "ckpt" / "step_000002", ["model"])["model"]
    assert state["mtp.0.mlp.gate.e_score_correction_bias"].abs().sum() == 0
    assert state["layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0

    pytest.importorskip("transformers")
    from dsv32.bench.train import run  # after the skip: the HF side of this bench needs transformers

    res = run("tiny", seq_len=64, batch_size=1, steps=1, warmup=0, threads=1, hf_attn="sdpa", full=False,
              log=lambda m: None)
    assert set(res["results"]) == {"dsv32", "hf-sdpa"} and res["speedup_vs_hf"] > 0
    assert all(math.isfinite(v["first_loss"]) for v in res["results"].values())


def test_resume_ignores_speed_only_config_switches(base_run: Path, data_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A preset that gained a speed-only switch (e.g. masked_mha_max_len) still resumes its old runs; a real
    architecture change is still refused."""
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    monkeypatch.setitem(PRESETS, "tiny", PRESETS["tiny"].replace(masked_mha_max_len=4096))
    assert cli_main([*COMMON, "--data", str(data_dir), "--out", str(out), "--max-steps", "7", "--resume"]) == 0
    monkeypatch.setitem(PRESETS, "tiny", PRESETS["tiny"].replace(num_hidden_layers=4))
    with pytest.raises(SystemExit, match="different model config"):
        cli_main([*COMMON, "--data", str(data_dir), "--out", str(out), "--max-steps", "8", "--resume"])
