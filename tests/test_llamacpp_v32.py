"""llama.cpp (arch ``deepseek32``, through ``llama-cpp-python``) as an independent DeepSeek-V3.2 oracle.

A tiny V3.2 written by transformers' ``save_pretrained`` is converted to an f32 GGUF with the converter vendored
in the llama-cpp-python sdist (:mod:`dsv32.bench.llamacpp_v32`), evaluated by llama.cpp with every position's
logits, and compared with our model loading the same directory.

* Dense regime (S < index_topk: DSA selects every key): the logits must agree to fp32 rounding. llama.cpp runs
  with an fp32 KV cache; its default fp16 cache alone costs about 3e-4 relative.
* Sparse regime (S > index_topk): the overall agreement is printed, not asserted. Random weights give exact
  indexer-score ties at the top-k boundary (ReLU zeros: a key every indexer head scores negative has score 0),
  and which tied key is kept is implementation-defined. Rows that no tie can reach (no tie in the last layer at
  that row, and no tie in an earlier layer at or before it) are checked to fp32 rounding: that exercises the
  lightning indexer and the top-k selection of both implementations where the selection is well defined.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
pytest.importorskip("transformers", reason="transformers is not installed")

from dsv32.bench import llamacpp_v32 as L  # noqa: E402
from dsv32.config import ModelConfig  # noqa: E402

DENSE_TOL = 1e-5  # relative logit error, fp32 vs fp32 (measured: 6e-7)
TIE_REL = 1e-5  # a k-th / (k+1)-th indexer score gap below this (relative to the row's scale) is a tie

@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def converter() -> L.Converter:
    try:
        return L.find_converter()
    except L.ConverterUnavailable as e:
        pytest.skip(f"llama.cpp converter unavailable: {e}")


def _hf_checkpoint(path: Path, cfg: ModelConfig, seed: int) -> None:
    """transformers' DeepseekV32ForCausalLM from ``cfg``, random weights with non-trivial norms/biases, saved."""
    from transformers.utils import logging

    from dsv32.bench.train import hf_model

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = hf_model(cfg, "eager").eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)  # changes the routes: llama.cpp must apply it (noaux_tc)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # norm weights / indexer k_norm bias away from 1 / 0
    model.save_pretrained(path)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def _tied_rows(model: torch.nn.Module, ids: torch.Tensor) -> list[list[int]]:
    """Per layer, the rows whose k-th and (k+1)-th best indexer scores (ours, float64) are (nearly) equal."""
    out = model.forward(ids, return_indexer=True)
    k, S = model.config.index_topk, ids.shape[1]
    future = torch.ones(S, S, dtype=torch.bool).triu(1)
    rows = []
    for aux in out.indexer:
        q, w, key = aux.index_q.double(), aux.index_w.double(), aux.index_k.double()
        scores = torch.einsum("bsht,bsh->bst", torch.einsum("bshd,btd->bsht", q, key).relu(), w)[0]
        scale = scores.abs().masked_fill(future, 0).amax(-1)
        v = scores.masked_fill(future, float("-inf")).sort(dim=-1, descending=True).values
        gap = v[:, k - 1] - v[:, k] if S > k else torch.full((S,), float("inf"), dtype=torch.float64)
        rows.append([r for r in (gap <= TIE_REL * scale).nonzero().flatten().tolist() if r >= k])
    return rows


def _clean_rows(tied: list[list[int]], S: int) -> np.ndarray:
    """Rows no tie can reach: a tie at row r of the last layer affects row r only; one in an earlier layer
    changes row r's hidden state, hence the keys of every later row."""
    ok = np.ones(S, dtype=bool)
    for layer, rows in enumerate(tied):
        for r in rows:
            if layer == len(tied) - 1:
                ok[r] = False
            else:
                ok[r:] = False
    return ok


@pytest.mark.parametrize("index_heads", [4, 8])
def test_llamacpp_matches_ours(tmp_path: Path, converter: L.Converter, index_heads: int) -> None:
    """4 indexer heads: the configuration of the B1.6 survey; its random indexer has many boundary ties. 8: few
    or none, so that the sparse regime is checked on most rows."""
    import dsv32

    t0 = time.perf_counter()
    cfg = L.b16_config(index_n_heads=index_heads)
    hf_dir = tmp_path / "hf"
    _hf_checkpoint(hf_dir, cfg, seed=0)
    t1 = time.perf_counter()
    info = L.convert_v32(hf_dir, tmp_path / "tiny.gguf", converter=converter)
    t2 = time.perf_counter()
    assert info["arch"] == "deepseek32" and info["vocab"] == "deepseek-llm" and not info["mtp"]
    assert info["tensors"] == 44  # 2 layers (1 dense, 1 MoE with merged experts) + embeddings, norm, head

    model = dsv32.load_model(hf_dir).eval()
    k = cfg.index_topk
    gen = torch.Generator().manual_seed(0)
    report = []
    for S in (k - 4, 200):
        ids = torch.randint(0, cfg.vocab_size, (1, S), generator=gen)
        with torch.no_grad():
            ours = model(ids)[0].float().numpy()
            tied = _tied_rows(model, ids)
        theirs = L.llama_logits(info["path"], ids[0].tolist(), n_threads=1)
        assert theirs.shape == ours.shape
        err, agree = _rel(theirs, ours), float((theirs.argmax(-1) == ours.argmax(-1)).mean())
        max_abs = float(np.abs(theirs - ours).max())
        if S <= k:
            report.append(f"dense S={S}: rel {err:.1e}, max abs {max_abs:.1e}, argmax {agree:.1%}")
            assert err <= DENSE_TOL, f"dense regime S={S}: relative logit error {err:.2e}"
            assert agree == 1.0
            continue
        clean = _clean_rows(tied, S)
        clean_err = _rel(theirs[clean], ours[clean])
        report.append(
            f"sparse S={S}: rel {err:.1e}, max abs {max_abs:.1e}, argmax {agree:.1%}; boundary ties at rows "
            f"{tied}; {int(clean[k:].sum())} tie-free rows past top-k: rel {clean_err:.1e}"
        )
        if clean[k:].sum() >= 16:  # else too few rows past top-k to say anything
            assert clean_err <= DENSE_TOL, f"sparse regime, tie-free rows: relative logit error {clean_err:.2e}"
    t3 = time.perf_counter()
    print(f"\nllama.cpp vs ours, {index_heads} indexer heads: {'; '.join(report)}")
    print(f"timings: checkpoint {t1 - t0:.1f} s, convert {t2 - t1:.1f} s, compare {t3 - t2:.1f} s")


def test_small_vocab_and_mtp(tmp_path: Path, converter: L.Converter) -> None:
    """Our own ``save_model`` output (MTP block included, config in DeepSeek's spelling) with a vocabulary smaller
    than deepseek-llm's: converted with llama.cpp's ``none`` tokenizer, MTP kept, logits still match."""
    import dsv32
    from dsv32.checkpoint import save_model
    from dsv32.model import Transformer

    cfg = L.b16_config(vocab_size=512, num_nextn_predict_layers=1)
    torch.manual_seed(1)
    save_model(Transformer(cfg).eval(), tmp_path / "ours")
    info = L.convert_v32(tmp_path / "ours", tmp_path / "ours.gguf", converter=converter)
    assert info["vocab"] == "none" and info["mtp"] and info["tensors"] > 44
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = dsv32.load_model(tmp_path / "ours").eval()(ids)[0].numpy()
    theirs = L.llama_logits(info["path"], ids[0].tolist())
    assert _rel(theirs, ours) <= DENSE_TOL


def test_config_errors(tmp_path: Path) -> None:
    """What the converter cannot take is refused before it runs (no converter needed)."""
    cfg = L.b16_config(vocab_size=512, num_nextn_predict_layers=1)  # as the tiny preset: MTP on
    cfg.to_hf(tmp_path)
    with pytest.raises(ValueError, match="deepseek-llm"):
        L.convert_v32(tmp_path, tmp_path / "x.gguf", vocab="deepseek-llm")
    d = cfg.to_hf()
    d.pop("index_topk")
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="index_topk"):
        L.check_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        L.check_config(tmp_path / "nowhere")
    ModelConfig.from_name("tiny").to_hf(tmp_path)  # index_head_dim 16: llama.cpp would abort the process
    with pytest.raises(ValueError, match="power of two"):
        L.check_config(tmp_path)
