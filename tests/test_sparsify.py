"""Sparsify (V3.2 paper §2.1.1): stage-1 dense warm-up, stage-2 sparse training, recall.

Tiny random models of both families; weights are scaled up so that attention and indexer scores are far from
uniform (otherwise every KL is ~0).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsv32 import ops
from dsv32.config import ModelConfig
from dsv32.evals import window_idx, window_selection
from dsv32.gguf import find_smollm2_gguf
from dsv32.llama import LlamaAttnAux, LlamaConfig, LlamaModel
from dsv32.model import AttnAux, Transformer
from dsv32.ops.reference import causal_mask, indexer_scores
from dsv32.registry import SMOLLM2_INDEXER, indexer_params, load_indexer, load_model, save_indexer
from dsv32.train import indexer_loss as il
from dsv32.train import sparsify as sp


def _scale_weights(m: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return m


def tiny_llama(seed: int = 0, topk: int = 8) -> LlamaModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1000.0,
                      index_n_heads=2, index_head_dim=16, index_rope_head_dim=8, index_topk=topk)
    return _scale_weights(LlamaModel(cfg))


def tiny_v32(seed: int = 0, topk: int = 8) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig.from_name("tiny").replace(index_topk=topk))
    return _scale_weights(m, 0.15)


FAMILIES = [pytest.param(tiny_llama, id="llama"), pytest.param(tiny_v32, id="v32")]


def _ids(m: torch.nn.Module, B: int, S: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, m.config.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ stage 1


@pytest.mark.parametrize("make", FAMILIES)
def test_stage1_kl_falls_and_only_indexers_train(make) -> None:
    m = make()
    ind, trunk = sp.set_trainable(m, 1)
    assert not trunk and ind and all(".indexer." in n for n in indexer_params(m))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(ind, lr=3e-3)
    ids = _ids(m, 2, 40)
    kls = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        res = sp.stage1_step(m, ids, topk=8, chunk=16)
        opt.step()
        kls.append(res.kl)
    assert kls[0] > 0.05, kls
    assert kls[-1] < 0.8 * kls[0], kls
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in indexer_params(m)), n
    assert res.recall is not None and 0.0 <= res.recall <= 1.0
    assert len(res.layers) == m.config.num_hidden_layers


def _dense_target(aux) -> torch.Tensor:
    """Unchunked reference: p[t] = sum_h softmax_h / ||.||_1 over causal keys -> [B,S,T]."""
    logits = aux.main_logits(slice(None)).transpose(1, 2)  # [B,S,H,T]
    vis = causal_mask(aux.q_pos, logits.shape[-1]).unsqueeze(2)
    A = torch.softmax(logits.masked_fill(~vis, float("-inf")), dim=-1).sum(2)
    return A / A.sum(-1, keepdim=True)


@pytest.mark.parametrize("make", FAMILIES)
def test_stage1_chunked_kl_and_grad_match_direct(make) -> None:
    """Chunks + leaf backward == the whole-sequence formula of eq. 3 (value and indexer gradients)."""
    m = make()
    ind, _ = sp.set_trainable(m, 1)
    ids = _ids(m, 2, 24)
    out = m.forward(ids, dense=True, return_indexer=True, compute_logits=False)
    stats = il.indexer_loss(out.indexer, topk=8, sparse=False, chunk=5, backward=True)
    g_chunked = [p.grad.clone() for p in ind]
    for p in ind:
        p.grad = None
    out = m.forward(ids, dense=True, return_indexer=True, compute_logits=False)
    total = 0.0
    for st, aux in zip(stats, out.indexer):
        p = _dense_target(aux)
        vis = causal_mask(aux.q_pos, p.shape[-1])
        logq = torch.log_softmax(indexer_scores(aux.index_q, aux.index_w, aux.index_k).masked_fill(~vis, -math.inf), -1)
        kl = (torch.xlogy(p, p) - p * logq.masked_fill(~vis, 0)).sum(-1).mean()
        assert st.kl == pytest.approx(float(kl.detach()), rel=1e-4, abs=1e-6)
        total = total + kl
    total.backward()
    for a, p in zip(g_chunked, ind):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ stage 2


def _grads(params: list[torch.nn.Parameter]) -> float:
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


@pytest.mark.parametrize("make", FAMILIES)
def test_stage2_gradient_separation(make) -> None:
    """LM loss alone reaches the trunk only; the restricted KL alone reaches the indexers only (sparse stage)."""
    m = make()
    ind, trunk = sp.set_trainable(m, 2)
    batch = _ids(m, 2, 33)
    m.zero_grad(set_to_none=True)
    res = sp.stage2_step(m, batch, topk=8, kl_backward=False)
    assert res.lm_loss is not None and _grads(trunk) > 0 and _grads(ind) == 0
    m.zero_grad(set_to_none=True)
    res = sp.stage2_step(m, batch, topk=8, lm_backward=False, recall=True)
    assert _grads(ind) > 0 and _grads(trunk) == 0 and res.kl > 0
    assert res.recall is not None and 0 < res.recall <= 1 + 1e-6


@pytest.mark.parametrize("make", FAMILIES)
def test_stage2_restricted_kl_matches_direct(make) -> None:
    """KL over S_t with the target rebuilt from the sparse op's lse == the same from a full softmax over S_t."""
    m = make()
    sp.set_trainable(m, 2)
    ids = _ids(m, 1, 30)
    with sp.detach_indexer_inputs(m):
        out = m.forward(ids, topk=8, return_indexer=True, compute_logits=False)
    aux = out.indexer[0]
    assert aux.topk_idx is not None
    st, _ = il.layer_kl(aux, topk=8, sparse=True, chunk=7, recall=True)
    idx = aux.topk_idx.long()
    valid = idx >= 0
    logits = aux.main_logits(slice(None)).transpose(1, 2)  # [B,S,H,T]
    at = logits.gather(-1, idx.clamp_min(0).unsqueeze(2).expand(-1, -1, logits.shape[2], -1))
    A = torch.softmax(at.masked_fill(~valid.unsqueeze(2), -math.inf), -1).sum(2)
    p = A / A.sum(-1, keepdim=True)
    I = indexer_scores(aux.index_q, aux.index_w, aux.index_k).gather(-1, idx.clamp_min(0))
    logq = torch.log_softmax(I.masked_fill(~valid, -math.inf), -1).masked_fill(~valid, 0)
    kl = (torch.xlogy(p, p) - p * logq).sum(-1).mean()
    assert st.kl == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    # stage-2 recall = dense mass inside the attended set
    vis = causal_mask(aux.q_pos, 30).unsqueeze(2)
    dense = torch.softmax(logits.masked_fill(~vis, -math.inf), -1).mean(2)  # [B,S,T]
    mass = dense.gather(-1, idx.clamp_min(0)).masked_fill(~valid, 0).sum(-1)
    rows = (aux.q_pos + 1) > 8
    assert st.recall == pytest.approx(float(mass[rows].mean()), rel=1e-4)


def test_detach_hook_stops_kl_reaching_v32_trunk() -> None:
    """Without the hook the V3.2 indexer's KL would reach q_a_proj (its c_q input): the hook is what detaches."""
    m = tiny_v32()
    ind, trunk = sp.set_trainable(m, 2)
    ids = _ids(m, 1, 20)
    out = m.forward(ids, topk=8, return_indexer=True, compute_logits=False)
    il.indexer_loss(out.indexer, topk=8, sparse=True, backward=True, recall=False)
    assert _grads(trunk) > 0  # no hook: leaks
    m.zero_grad(set_to_none=True)
    with sp.detach_indexer_inputs(m):
        out = m.forward(ids, topk=8, return_indexer=True, compute_logits=False)
    il.indexer_loss(out.indexer, topk=8, sparse=True, backward=True, recall=False)
    assert _grads(trunk) == 0 and _grads(ind) > 0


# ------------------------------------------------------------------------------------------ recall by hand


def _hand_aux(selected: torch.Tensor | None) -> LlamaAttnAux:
    """One head, T = S = 4, identity keys: main logits = L, indexer scores = J (both hand-set)."""
    L = torch.tensor([[0.0, 0, 0, 0], [1.0, 0, 0, 0], [0.0, math.log(2), 0, 0], [0.0, math.log(3), math.log(2), 0]])
    J = torch.tensor([[1.0, 0, 0, 0], [1.0, 2, 0, 0], [3.0, 1, 2, 0], [1.0, 4, 3, 2]])
    eye = torch.eye(4)
    return LlamaAttnAux(
        index_q=J.view(1, 4, 1, 4), index_w=torch.ones(1, 4, 1), index_k=eye.view(1, 4, 4), topk_idx=selected,
        q=L.view(1, 4, 1, 4), k=eye.view(1, 4, 1, 4), q_pos=torch.arange(4).view(1, 4), scale=1.0)


def test_recall_hand_made() -> None:
    """k = 2: rows 0, 1 have <= k keys and are left out. Row 2: probs (1, 2, 1)/4, indexer picks {0, 2} -> 1/2.
    Row 3: probs (1, 3, 2, 1)/7, indexer picks {1, 2} -> 5/7. Mean over the two rows = (1/2 + 5/7) / 2."""
    st, _ = il.layer_kl(_hand_aux(None), topk=2, sparse=False)
    assert st.recall_rows == 2
    assert st.recall == pytest.approx((1 / 2 + 5 / 7) / 2, rel=1e-5)
    # the same through the stage-2 path with a forced selection (row 3 keeps {0, 3}: 2/7)
    sel = torch.tensor([[[0, -1], [0, 1], [0, 2], [0, 3]]], dtype=torch.int32)
    st2, _ = il.layer_kl(_hand_aux(sel), topk=2, sparse=True)
    assert st2.recall == pytest.approx((1 / 2 + 2 / 7) / 2, rel=1e-5)


# ------------------------------------------------------------------------------------------ window, I/O, CLI


def test_window_idx() -> None:
    idx = window_idx(torch.arange(10).view(1, 10), 6, sinks=4)
    assert idx.shape == (1, 10, 6) and idx.dtype == torch.int32
    assert idx[0, 3].tolist() == [0, 1, 2, 3, -1, -1]  # 4 keys <= k: all of them
    assert idx[0, 5].tolist() == [0, 1, 2, 3, 4, 5]
    assert idx[0, 6].tolist() == [0, 1, 2, 3, 5, 6]  # sinks + the last k - 4 = 2
    assert idx[0, 9].tolist() == [0, 1, 2, 3, 8, 9]
    with pytest.raises(ValueError):
        window_idx(torch.arange(4).view(1, 4), 4, sinks=4)


def test_forced_window_selection_reaches_the_model() -> None:
    m = tiny_llama()
    ids = _ids(m, 1, 20)
    with ops.override("indexer_topk", window_selection(4)):
        out = m.forward(ids, topk=8, return_indexer=True, compute_logits=False)
    want = window_idx(torch.arange(20).view(1, 20), 8)
    for aux in out.indexer:
        assert torch.equal(aux.topk_idx, want)


def test_row_subsample_is_the_same_kl_on_those_rows() -> None:
    m = tiny_llama()
    sp.set_trainable(m, 1)
    out = m.forward(_ids(m, 1, 40), dense=True, return_indexer=True, compute_logits=False)
    rows = sp.sample_rows(40, 8, 10, seed=0, step=3)
    assert rows is not None and len(rows) == 10 and int(rows.min()) >= 8
    assert torch.equal(rows, torch.sort(rows).values)
    sub, _ = il.layer_kl(out.indexer[0], topk=8, sparse=False, rows=rows, chunk=3)
    full, _ = il.layer_kl(out.indexer[0], topk=8, sparse=False, rows=torch.arange(40), chunk=40)
    per_row = []
    for r in rows.tolist():
        st, _ = il.layer_kl(out.indexer[0], topk=8, sparse=False, rows=torch.tensor([r]))
        per_row.append(st.kl)
    assert sub.kl == pytest.approx(sum(per_row) / 10, rel=1e-4)
    assert sub.recall_rows == 10 and full.rows == 40 and sp.sample_rows(40, 8, 0, seed=0, step=0) is None


def test_save_load_indexers(tmp_path) -> None:
    a, b = tiny_llama(0), tiny_llama(1)
    path = save_indexer(a, tmp_path / "ix.safetensors", extra={"steps": "3"})
    load_indexer(b, path)
    for (n, p), q in zip(indexer_params(a).items(), indexer_params(b).values()):
        assert torch.equal(p, q), n


def test_cli_stage1_then_stage2_with_resume(tmp_path, monkeypatch) -> None:
    """The loop end to end on preset:tiny: metrics, checkpoints, resume, indexer export, PNG."""
    def fake_batches(args, tok):
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, 512, (64, args.seq_len + 1), generator=g)
        return (lambda step: data[step % 64 : step % 64 + args.batch_size]), {"fake": True}

    monkeypatch.setattr(sp, "_batches", fake_batches)
    out1 = tmp_path / "s1"
    base = ["--model", "preset:tiny", "--seq-len", "24", "--batch-size", "1", "--topk", "8", "--no-progress"]
    assert sp.cli_main(["--stage", "1", *base, "--out", str(out1), "--max-steps", "2", "--save-every", "1"]) == 0
    assert sp.cli_main(["--stage", "1", *base, "--out", str(out1), "--max-steps", "3", "--resume"]) == 0
    recs = [json.loads(x) for x in (out1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert {"kl", "recall", "kl_layers", "recall_layers", "lm_loss"} <= recs[0].keys()
    assert (out1 / "indexer.safetensors").is_file()
    pytest.importorskip("matplotlib")
    assert (out1 / "sparsify.png").is_file()
    out2 = tmp_path / "s2"
    assert sp.cli_main(["--stage", "2", *base, "--out", str(out2), "--max-steps", "2", "--diag-every", "1",
                        "--indexer", str(out1 / "indexer.safetensors"), "--lr", "1e-4"]) == 0
    recs = [json.loads(x) for x in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["lm_loss"] > 0 and recs[-1]["recall"] is not None
    args = json.loads((out2 / "sparsify_args.json").read_text())
    assert args["settings"]["stage"] == 2
    shipped = sp.ship_indexers(out1, tmp_path / "ship", topk=64)
    from safetensors import safe_open

    with safe_open(str(shipped), "pt") as f:
        assert f.metadata()["index_topk"] == "64"
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    prov = json.loads((tmp_path / "ship" / "PROVENANCE.json").read_text())
    assert prov["steps"] == 3 and prov["settings"]["stage"] == 1 and prov["last_logged"]["step"] == 3
    # a second stage-1 run started from the first one's indexers: the shipped provenance records both
    out3 = tmp_path / "s1b"
    assert sp.cli_main(["--stage", "1", *base, "--out", str(out3), "--max-steps", "1",
                        "--indexer", str(out1 / "indexer.safetensors")]) == 0
    sp.ship_indexers(out3, tmp_path / "ship2")
    prov = json.loads((tmp_path / "ship2" / "PROVENANCE.json").read_text())
    assert prov["steps"] == 1 and prov["started_from"]["steps"] == 3
    assert prov["tokens_seen_total"] == (1 + 3) * 24


def test_load_smollm2_dsa() -> None:
    """The shipped default: GGUF base weights + the stage-1 indexer file (skips where either is missing)."""
    pytest.importorskip("gguf")
    try:
        find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if not SMOLLM2_INDEXER.is_file():
        pytest.skip("no shipped SmolLM2 indexer in this checkout")
    m = load_model("smollm2-135m-dsa")
    assert m.config.use_dsa and m.config.index_topk == 512
    from safetensors.torch import load_file

    sd = load_file(str(SMOLLM2_INDEXER))
    for n, p in indexer_params(m).items():
        torch.testing.assert_close(p, sd[n].float())
    prov = json.loads((SMOLLM2_INDEXER.parent / "PROVENANCE.json").read_text())
    assert prov["steps"] > 0 and "command" in prov["settings"]
    ids = torch.randint(0, m.config.vocab_size, (1, 24))
    out = m.forward(ids, topk=8, return_indexer=True, compute_logits=False)
    assert out.indexer[0].topk_idx is not None


@pytest.mark.parametrize("make", FAMILIES)
def test_aux_records_share_the_view_methods(make) -> None:
    """Both families' aux records answer the loss's questions themselves (no type test in indexer_loss)."""
    m = make()
    aux = m.forward(_ids(m, 1, 20), topk=8, return_indexer=True, compute_logits=False).indexer[0]
    assert isinstance(aux, (AttnAux, LlamaAttnAux)) and aux.num_heads == m.config.num_attention_heads
    logits = aux.main_logits(slice(2, 5))  # [B,H,C,T]
    assert logits.shape == (1, aux.num_heads, 3, 20)
    idx = aux.topk_idx[:, 2:5].clamp_min(0)
    at = aux.main_logits_at(slice(2, 5), idx)  # [B,C,H,K]
    torch.testing.assert_close(at, logits.transpose(1, 2).gather(-1, idx.long().unsqueeze(2).expand_as(at)))
    assert aux.sparse_lse(slice(2, 5), aux.topk_idx[:, 2:5]).shape == (1, 3, aux.num_heads)


def test_text_batches_mix_in_synthetic_retrieval_docs(tmp_path) -> None:
    """--synthetic-frac adds key-value recall / copy documents built from the train text to the --text windows."""
    import argparse

    from dsv32.tokenizer import load_tokenizer

    words = "the quick brown fox jumps over a lazy dog and then sleeps under the old oak tree".split()
    for src in ("a", "b"):
        (tmp_path / "raw" / src).mkdir(parents=True)
        for i in range(30):
            rows = [" ".join(words[(i + j) % len(words):] + words[: (i + j) % len(words)]) for j in range(40)]
            (tmp_path / "raw" / src / f"doc{i}.txt").write_text("\n".join(rows))
    tok = load_tokenizer("dsv32-small-8k")
    args = argparse.Namespace(data=None, text=[tmp_path / "raw"], max_chars=None, seed=0, batch_size=1, seq_len=64,
                              synthetic_frac=0.5, synthetic_chars=2000)
    batch, info = sp._batches(args, tok)
    assert info["synthetic_docs"] > 0
    seen = " ".join(tok.decode(batch(step)[0].tolist()) for step in range(200))
    assert "secret code for" in seen or "<<<" in seen
    args.synthetic_frac = 0.0
    assert sp._batches(args, tok)[1]["synthetic_docs"] == 0


def test_stage2_masked_sparse_impl_matches_the_op() -> None:
    """`--sparse-impl masked` (SDPA under the top-k mask) gives stage 2 the same LM loss, KL and gradients."""
    from dsv32.evals import mode_context

    runs = []
    for impl in ("op", "masked"):
        m = tiny_llama()
        sp.set_trainable(m, 2)
        m.zero_grad(set_to_none=True)
        with mode_context("topk", impl):
            res = sp.stage2_step(m, _ids(m, 2, 33), topk=8)
        runs.append((res, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = runs
    assert b.lm_loss == pytest.approx(a.lm_loss, rel=1e-5) and b.kl == pytest.approx(a.kl, rel=1e-5)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)


def test_eval_weights_load_a_stage2_run(tmp_path, monkeypatch) -> None:
    """`dsv32 eval --weights RUN`: the newest checkpoint of a stage-2 run (every weight) loads over the model."""
    from dsv32.evals import load_weights

    def fake_batches(args, tok):
        data = torch.randint(0, 512, (8, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
        return (lambda step: data[step % 8 : step % 8 + args.batch_size]), {"fake": True}

    monkeypatch.setattr(sp, "_batches", fake_batches)
    out = tmp_path / "s2"
    assert sp.cli_main(["--stage", "2", "--model", "preset:tiny", "--seq-len", "24", "--batch-size", "1", "--topk",
                        "8", "--no-progress", "--out", str(out), "--max-steps", "2", "--lr", "1e-2"]) == 0
    torch.manual_seed(0)
    fresh = Transformer(ModelConfig.from_name("tiny"))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    load_weights(fresh, out)
    from dsv32.train import checkpointing as ckpt

    saved = ckpt.load_parts(out / "ckpt" / "step_000002", ["model"])["model"]
    changed = [k for k, v in saved.items() if not torch.equal(v, before[k])]
    assert changed and all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        load_weights(fresh, tmp_path / "nope.bin")


# ------------------------------------------------------------------------------------------ targets beyond the paper

TARGET_CASES = [il.Target("head-sum"), il.Target("head-max"), il.Target("per-head-kl", peak_beta=6.0, sinks=2),
                il.Target("per-head-kl", peak_beta=0.0), il.Target("head-sum", far_weight=3.0),
                il.Target("per-head-kl", far_weight=2.0)]


def _reference_loss(A: torch.Tensor, logq: torch.Tensor, key_pos: torch.Tensor, target: il.Target,
                    q_pos: torch.Tensor, k: int) -> torch.Tensor:
    """Slow reference per row, written from the definitions: A [B,S,H,N] per-head probabilities, logq [B,S,N]
    (0 where A is 0), key_pos [B|1,S|1,N], q_pos [B,S], k the window size of the far-row weights."""
    if target.kind == "per-head-kl":
        peak = A.masked_fill((key_pos < target.sinks).unsqueeze(2), 0).amax(-1)  # [B,S,H]
        w = torch.softmax(target.peak_beta * peak, dim=-1)
        kl_h = (torch.xlogy(A, A) - A * logq.unsqueeze(2)).sum(-1)  # each head's own KL(A_h || q)
        loss, p = (w * kl_h).sum(-1), (w.unsqueeze(-1) * A).sum(2)
    else:
        s = A.sum(2) if target.kind == "head-sum" else A.max(2).values
        p = s / s.sum(-1, keepdim=True)
        loss = (torch.xlogy(p, p) - p * logq).sum(-1)
    # a k-window keeps keys < sinks and keys > q_pos - (k - sinks); the rest is "far"
    dropped = (key_pos >= target.sinks) & (key_pos + (k - target.sinks) <= q_pos.unsqueeze(-1))
    return loss * (1 + target.far_weight * (p * dropped).sum(-1))


@pytest.mark.parametrize("target", TARGET_CASES, ids=lambda t: f"{t.kind}-{t.peak_beta:g}-{t.far_weight:g}")
def test_stage1_targets_chunked_match_reference(target) -> None:
    """Every target of --target: chunked + leaf backward == the unchunked definition (value and gradient)."""
    m = tiny_llama()
    ind, _ = sp.set_trainable(m, 1)
    ids = _ids(m, 2, 24)
    out = m.forward(ids, dense=True, return_indexer=True, compute_logits=False)
    stats = il.indexer_loss(out.indexer, topk=8, sparse=False, chunk=5, backward=True, target=target)
    g_chunked = [p.grad.clone() for p in ind]
    for p in ind:
        p.grad = None
    out = m.forward(ids, dense=True, return_indexer=True, compute_logits=False)
    total = 0.0
    for st, aux in zip(stats, out.indexer):
        logits = aux.main_logits(slice(None)).transpose(1, 2)  # [B,S,H,T]
        vis = causal_mask(aux.q_pos, logits.shape[-1])
        A = torch.softmax(logits.masked_fill(~vis.unsqueeze(2), -math.inf), dim=-1)
        I = indexer_scores(aux.index_q, aux.index_w, aux.index_k).masked_fill(~vis, -math.inf)
        logq = torch.log_softmax(I, -1).masked_fill(~vis, 0)
        loss = _reference_loss(A, logq, torch.arange(logits.shape[-1]).view(1, 1, -1), target, aux.q_pos, 8).mean()
        assert st.kl == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-6)
        total = total + loss
    total.backward()
    for a, p in zip(g_chunked, ind):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target", TARGET_CASES[:3] + TARGET_CASES[4:], ids=lambda t: f"{t.kind}-{t.far_weight:g}")
def test_stage2_targets_restricted_match_reference(target) -> None:
    """The same over S_t (stage 2), with the per-head target rebuilt from the sparse op's lse: value and gradient."""
    m = tiny_llama()
    ind, _ = sp.set_trainable(m, 2)
    ids = _ids(m, 1, 30)

    def forward():
        with sp.detach_indexer_inputs(m):
            return m.forward(ids, topk=8, return_indexer=True, compute_logits=False)

    m.zero_grad(set_to_none=True)
    stats = il.indexer_loss(forward().indexer, topk=8, sparse=True, chunk=7, backward=True, recall=False,
                            target=target)
    g_chunked = [p.grad.clone() for p in ind]
    m.zero_grad(set_to_none=True)
    total = 0.0
    for st, aux in zip(stats, forward().indexer):
        idx = aux.topk_idx.long()
        valid = idx >= 0
        logits = aux.main_logits(slice(None)).transpose(1, 2)  # [B,S,H,T]
        at = logits.gather(-1, idx.clamp_min(0).unsqueeze(2).expand(-1, -1, logits.shape[2], -1))
        A = torch.softmax(at.masked_fill(~valid.unsqueeze(2), -math.inf), -1)  # each head over S_t
        I = indexer_scores(aux.index_q, aux.index_w, aux.index_k).gather(-1, idx.clamp_min(0))
        logq = torch.log_softmax(I.masked_fill(~valid, -math.inf), -1).masked_fill(~valid, 0)
        loss = _reference_loss(A, logq, idx.clamp_min(0), target, aux.q_pos, 8).mean()
        assert st.kl == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-6)
        total = total + loss
    total.backward()
    for a, p in zip(g_chunked, ind):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


def test_targets_let_one_peaked_head_count() -> None:
    """Three heads over six keys: two local heads split their mass over keys 4-5, one retrieval head puts 0.9 on
    the needle (key 2). The needle's target share: 0.3 under head-sum, more under head-max and per-head-kl; and
    per-head-kl with beta = 0 has head-sum's gradient (same p, only a constant differs)."""
    local = torch.tensor([0.0, 0, 0, 0, 0.5, 0.5])
    needle = torch.tensor([0.02, 0.02, 0.9, 0.02, 0.02, 0.02])
    P = torch.stack([local, local, needle]).view(1, 3, 1, 6)  # [B,H,C,N]
    pos = torch.arange(6).view(1, 1, 6)
    share = {t.kind + str(t.peak_beta): float(il.target_dist(P, t, pos)[0][0, 0, 2]) for t in TARGET_CASES[:4]}
    assert share["head-sum8.0"] == pytest.approx(0.3)
    assert share["head-max8.0"] > 0.45 and share["per-head-kl6.0"] > 0.6
    assert share["per-head-kl0.0"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="not one of"):
        il.Target("head-mean")


def test_cli_target_flag_reaches_the_loss(tmp_path, monkeypatch) -> None:
    """--target per-head-kl is recorded and changes the logged loss vs the default on the same batch."""
    def fake_batches(args, tok):
        data = torch.randint(0, 512, (4, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
        return (lambda step: data[step % 4 : step % 4 + args.batch_size]), {"fake": True}

    monkeypatch.setattr(sp, "_batches", fake_batches)
    kls = {}
    for tgt in ("head-sum", "per-head-kl"):
        out = tmp_path / tgt
        assert sp.cli_main(["--stage", "1", "--model", "preset:tiny", "--seq-len", "24", "--topk", "8", "--no-progress",
                            "--out", str(out), "--max-steps", "1", "--target", tgt]) == 0
        assert json.loads((out / "sparsify_args.json").read_text())["settings"]["target"] == tgt
        kls[tgt] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["kl"]
    assert kls["head-sum"] != pytest.approx(kls["per-head-kl"], rel=1e-3)


def test_text_batches_leave_out_the_eval_source_and_refuse_eval_needles(tmp_path) -> None:
    """--text: the retrieval evaluation's source is never trained on; --retrieval-frac adds multi-question
    key-value documents; a training document holding an evaluation needle stops the run before any step."""
    import argparse

    from dsv32.evals.needles import EVAL_SOURCE
    from dsv32.tokenizer import load_tokenizer

    words = "the quick brown fox jumps over a lazy dog and then sleeps under the old oak tree".split()
    for src in ("a", EVAL_SOURCE):
        (tmp_path / "raw" / src).mkdir(parents=True)
        for i in range(20):
            rows = [" ".join(words[(i + j) % len(words):] + words[: (i + j) % len(words)]) for j in range(40)]
            (tmp_path / "raw" / src / f"doc{i}.txt").write_text("\n".join(rows))
    tok = load_tokenizer("dsv32-small-8k")
    args = argparse.Namespace(data=None, text=[tmp_path / "raw"], max_chars=None, seed=0, batch_size=1, seq_len=64,
                              synthetic_frac=0.0, retrieval_frac=0.4, synthetic_chars=2000)
    batch, info = sp._batches(args, tok)
    assert info["sources"] == ["a"] and info["excluded_documents"] > 0 and info["retrieval_docs"] > 0
    seen = " ".join(tok.decode(batch(step)[0].tolist()) for step in range(200))
    assert "Question: What is the secret code for" in seen
    (tmp_path / "raw" / "a" / "doc0.txt").write_text("note: the vault combination is 123-4567\n" * 3)
    (tmp_path / "raw" / "a" / "doc1.txt").write_text("note: the vault combination is 123-4567\n" * 3)
    args.retrieval_frac = 0.0
    with pytest.raises(SystemExit, match="evaluation's needles"):
        sp._batches(args, tok)
