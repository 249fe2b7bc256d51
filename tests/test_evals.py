"""`dsv32 eval ppl|passkey`: result JSON shape and settings, held-out split, passkey construction, modes."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from dsv32 import evals, ops
from dsv32.checkpoint import save_model
from dsv32.data import load_split_texts
from dsv32.evals import passkey, ppl
from dsv32.evals.selection import needle_selection
from dsv32.gguf import find_smollm2_gguf
from dsv32.llama import LlamaConfig, LlamaModel
from dsv32.registry import (
    SMOLLM2_INDEXER,
    indexer_params,
    load_indexer,
    load_model,
    read_indexer_file,
    save_indexer,
)
from dsv32.train.indexer_loss import Target


class CharTok:
    """Byte-level stand-in tokenizer: id = byte + 2; BOS 0, EOS 1."""

    bos_id, eos_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode(errors="replace")


def tiny_model() -> LlamaModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000.0, index_n_heads=2,
                      index_head_dim=16, index_rope_head_dim=8, index_topk=16)
    return LlamaModel(cfg).eval()


@pytest.fixture()
def text_root(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north"]
    for src in ("prose", "verse"):
        d = tmp_path / "raw" / src
        d.mkdir(parents=True)
        for i in range(6):
            (d / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words, 9)) for _ in range(60)))
    return tmp_path / "raw"


def test_split_texts_are_disjoint(text_root) -> None:
    val, vn = load_split_texts([text_root], "val")
    train, tn = load_split_texts([text_root], "train")
    assert vn and tn and not set(vn) & set(tn)
    assert {n.split("/")[0] for n in vn} == {"prose", "verse"}  # every source keeps a held-out document


@pytest.mark.parametrize("flags,mode", [([], "dense"), (["--topk", "16"], "topk"), (["--window", "16"], "window")])
def test_ppl_cli_json_shape(tmp_path, text_root, monkeypatch, flags, mode) -> None:
    monkeypatch.setattr(ppl, "prepare_model", lambda args, mode, k: (tiny_model(), CharTok()))
    out = tmp_path / "ppl.json"
    argv = ["--model", "tiny-test", "--context", "64", "--num-seqs", "2", "--text", str(text_root),
            "--json", str(out), "--recall", *flags]
    assert ppl.cli_main(argv) == 0
    r = json.loads(out.read_text())
    assert r["eval"] == "ppl" and set(r) == {"eval", "settings", "results"}
    s, res = r["settings"], r["results"]
    assert s["model"] == "tiny-test" and s["context"] == 64 and s["mode"] == mode and s["seed"] == 0
    assert s["data"]["split"] == "val" and s["data"]["tokens"] > 64
    assert (s["topk"], s["window"]) == {"dense": (None, None), "topk": (16, None), "window": (None, 16)}[mode]
    assert res["tokens"] == 128 and res["sequences"] == 2 and 1 < res["ppl"] < 1e4
    if mode == "dense":
        assert res["ppl_beyond_k"] is None
    else:
        assert res["tokens_beyond_k"] == 2 * (64 - 16) and res["recall"] is not None


def test_dense_equals_topk_when_k_covers_the_context(text_root) -> None:
    m = tiny_model()
    stream = np.arange(2, 200, dtype=np.int64) % 250
    a = ppl.eval_ppl(m, stream, context=32, mode="dense", k=None, num_seqs=2, progress=False)
    b = ppl.eval_ppl(m, stream, context=32, mode="topk", k=32, num_seqs=2, progress=False)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    c = ppl.eval_ppl(m, stream, context=32, mode="window", k=8, num_seqs=2, progress=False)
    assert c["ppl"] != pytest.approx(a["ppl"], rel=1e-6)  # the forced window really is sparse


@pytest.mark.parametrize("mode,k", [("topk", 8), ("window", 8)])
def test_masked_sparse_impl_matches_the_op(mode, k) -> None:
    m = tiny_model()
    stream = (np.arange(2, 300, dtype=np.int64) * 7) % 250
    a = ppl.eval_ppl(m, stream, context=40, mode=mode, k=k, num_seqs=2, progress=False, sparse_impl="op")
    b = ppl.eval_ppl(m, stream, context=40, mode=mode, k=k, num_seqs=2, progress=False, sparse_impl="masked")
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    assert a["per_sequence"][1]["nll"] == pytest.approx(b["per_sequence"][1]["nll"], rel=1e-5)


def test_passkey_items_and_json(tmp_path, text_root, monkeypatch) -> None:
    tok = CharTok()
    stream = np.asarray(tok.encode("the quick brown fox jumps over the lazy dog. " * 40))
    items = passkey.passkey_items(tok, stream, context=300, num=5, seed=3)
    assert len(items) == 5 and all(len(it.ids) == 300 for it in items)
    again = passkey.passkey_items(tok, stream, context=300, num=5, seed=3)
    assert [it.ids for it in items] == [it.ids for it in again]  # a fixed set for a seed
    for it in items:
        text = tok.decode(it.ids[1:])
        assert f"The pass key is {it.answer}." in text and text.endswith(f"The pass key is {it.answer}")
        assert tok.decode(it.ids[it.needle_pos : it.needle_pos + 20]).startswith("\nThe pass key is")
    assert [it.depth for it in items] == sorted(it.depth for it in items)

    monkeypatch.setattr(passkey, "prepare_model", lambda args, mode, k: (tiny_model(), tok))
    out = tmp_path / "pk.json"
    assert passkey.cli_main(["--model", "tiny-test", "--context", "200", "--num", "3", "--window", "16",
                             "--text", str(text_root), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["eval"] == "passkey" and r["settings"]["window"] == 16 and r["settings"]["task"] == "passkey"
    res = r["results"]
    assert res["items"] == 3 and 0 <= res["accuracy"] <= 1 and len(res["per_item"]) == 3
    assert {"depth", "needle_pos", "correct", "needle_in_window"} <= res["per_item"][0].keys()
    assert res["per_item"][-1]["needle_in_window"] is False or res["per_item"][-1]["depth"] > 0.9


def test_unknown_eval_name() -> None:
    assert evals.cli_main(["nope"]) == 2


def test_needle_selection_diagnostic() -> None:
    """evals.selection: per-layer needle tokens in the indexer's top-k, and the max-head attention mass on them."""
    m = tiny_model()
    tok = CharTok()
    stream = np.array(tok.encode("the river runs north past the old stone mill " * 40))
    it = passkey.passkey_items(tok, stream, context=300, num=3, seed=0)[1]
    n = len(tok.encode(passkey.NEEDLE.format(key=12345)))
    needle = range(it.needle_pos, it.needle_pos + n)
    small = needle_selection(m, it.ids, it.answer_len, needle, topk=16)
    assert len(small["needle_tokens_selected"]) == len(small["max_head_mass"]) == m.config.num_hidden_layers
    assert all(0 <= s <= 16 for s in small["needle_tokens_selected"])
    assert all(0 < x < 1 for x in small["max_head_mass"])
    full = needle_selection(m, it.ids, it.answer_len, needle, topk=400)  # k covers every key: all of the needle
    assert full["needle_tokens_selected"] == [float(n)] * m.config.num_hidden_layers
    assert full["max_head_mass"] == small["max_head_mass"]  # the dense side does not depend on k
    targets = [Target("head-sum"), Target("head-max"), Target("per-head-kl")]
    tgt = needle_selection(m, it.ids, it.answer_len, needle, topk=16, targets=targets)
    for t in targets:
        assert all(0 <= x <= 16 for x in tgt[f"target_{t.kind}_needle_tokens"])
    tgt = needle_selection(m, it.ids, it.answer_len, needle, topk=400, targets=targets)
    assert all(tgt[f"target_{t.kind}_needle_tokens"] == [float(n)] * 2 for t in targets)


# ------------------------------------------------------------------------------------------ ops.override, load_model


def test_ops_override_routes_nests_and_restores_even_on_error() -> None:
    q = torch.randn(1, 5, 2, 8)
    k = torch.randn(1, 5, 8)
    w = torch.ones(1, 5, 2)
    pos = torch.arange(5).view(1, 5)
    real = ops.indexer_topk(q, w, k, q_pos=pos, topk=2)
    calls: list[str] = []

    def fixed(tag: str):
        def select(q, w, k, *, k_scale=None, q_pos, topk, ordered=True):
            calls.append(tag)
            return evals.window_idx(q_pos, topk, 1)
        return select

    with ops.override("indexer_topk", fixed("outer")):
        assert torch.equal(ops.indexer_topk(q, w, k, q_pos=pos, topk=2), evals.window_idx(pos, 2, 1))
        with pytest.raises(RuntimeError, match="boom"), ops.override("indexer_topk", fixed("inner")):
            ops.indexer_topk(q, w, k, q_pos=pos, topk=2)
            raise RuntimeError("boom")
        ops.indexer_topk(q, w, k, q_pos=pos, topk=2)  # the outer override is back after the inner one failed
    assert calls == ["outer", "inner", "outer"]
    assert torch.equal(ops.indexer_topk(q, w, k, q_pos=pos, topk=2), real)  # and the real op after both
    with pytest.raises(ValueError, match="unknown op"):
        with ops.override("indexer_top_k", fixed("x")):
            pass


def test_load_model_preset_dsa_topk_and_indexer_file(tmp_path) -> None:
    m = load_model("preset:tiny", dsa=False, topk=8, seed=1)
    assert not m.config.use_dsa and m.config.index_topk == 8 and not m.training
    same = load_model("preset:tiny", seed=1)
    assert same.config.index_topk != 8 and all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                                               same.state_dict().values()))
    path = save_indexer(m, tmp_path / "ix.safetensors", extra={"step": "3"})
    _, meta = read_indexer_file(path)
    assert meta["index_topk"] == "8" and meta["step"] == "3"
    other = load_model("preset:tiny", seed=2, indexer=path)  # same shape: replaces the random indexers
    assert all(torch.equal(a, b) for a, b in zip(indexer_params(other).values(), indexer_params(m).values()))


def test_indexer_file_with_other_shape_is_refused_before_any_copy(tmp_path) -> None:
    a = tiny_model()
    path = save_indexer(a, tmp_path / "ix.safetensors")
    b = LlamaModel(a.config.replace(index_n_heads=4))
    before = {n: p.clone() for n, p in indexer_params(b).items()}
    with pytest.raises(ValueError, match=r"ix\.safetensors.*index_n_heads=2, this model has 4"):
        load_indexer(b, path)
    assert all(torch.equal(p, before[n]) for n, p in indexer_params(b).items())
    with pytest.raises(ValueError, match="indexer was saved with"):  # the same check on the load_model path
        load_model("preset:tiny", indexer=path)
    load_indexer(LlamaModel(a.config.replace(index_topk=99)), path)  # k is a default, not a shape: accepted


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="`gguf` not installed")
def test_load_model_shipped_dsa_name_with_overrides() -> None:
    """``load_model(name, dsa=..., topk=...)`` on the shipped DSA name: the shipped indexers load, the
    keyword arguments win over the file's default k and the name's DSA default."""
    try:
        find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if not SMOLLM2_INDEXER.is_file():
        pytest.skip("no shipped SmolLM2 indexer in this checkout")
    m = load_model("smollm2-135m-dsa", dsa=False, topk=64)
    assert isinstance(m, LlamaModel) and not m.config.use_dsa and m.config.index_topk == 64
    tensors, _ = read_indexer_file(SMOLLM2_INDEXER)
    for n, p in indexer_params(m).items():
        torch.testing.assert_close(p, tensors[n].float())


def test_load_model_checkpoint_dir_dsa_and_topk_reach_every_layer(tmp_path) -> None:
    """A V3.2 checkpoint directory with ``dsa=``/``topk=``: the new default k is the one attention uses."""
    src = load_model("preset:tiny", seed=0)
    save_model(src, tmp_path / "ckpt")
    m = load_model(tmp_path / "ckpt", dsa=True, topk=4)
    assert m.config.use_dsa and m.config.index_topk == 4
    ids = torch.randint(0, m.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    out = m.forward(ids, return_indexer=True, compute_logits=False)
    assert all(a.topk_idx is not None and a.topk_idx.shape[-1] == 4 for a in out.indexer)
    dense = load_model(tmp_path / "ckpt", dsa=False)
    assert not dense.config.use_dsa
    assert all(a.topk_idx is None for a in dense.forward(ids, return_indexer=True, compute_logits=False).indexer)
