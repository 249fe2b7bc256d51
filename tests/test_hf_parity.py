"""Parity with transformers' ``DeepseekV32ForCausalLM``: checkpoints written by ``save_pretrained`` load into our
model and give the same fp32 logits (relative error <= 1e-4 over all logits), for sequences shorter than
``index_topk`` (DSA selects everything: dense MLA) and well above it (sparse). Also the reverse direction (HF
loads what ``save_model`` writes) and the FP8 twin (``save_model(fp8=True)``).

Exact ties of indexer scores at the top-k boundary make the selected set implementation-defined (HF keeps
whatever ``torch.topk`` returns, we prefer lower positions). ReLU makes a key's score exactly 0 whenever all
indexer heads score it negative, so with few heads ties are common; the configs use 16 indexer heads and every
case checks our own scores for (near-)ties at the boundary and skips lengths that have them.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from dsv32.checkpoint import dequantize_fp8_blocks, is_fp8_weight, load_model, quantize_fp8_blocks, save_model

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TOL = 1e-4


def _yarn(factor: float, original: int) -> dict:
    return {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }


CONFIGS: dict[str, dict] = {
    # 1 dense + 2 MoE layers, 4 groups of 2 experts, top-2 groups; MTP explicitly absent
    "groups4": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        index_n_heads=16,
        index_head_dim=16,
        index_topk=8,
        max_position_embeddings=256,
        rope_parameters=_yarn(4.0, 64),
        num_nextn_predict_layers=0,
    ),
    # 2 dense + 2 MoE, 8 groups of 2, top-3 groups, 4 experts/token, unnormalised weights, tied embeddings,
    # wider RoPE slice, YaRN factor 8 with positions past the original context; config.json without
    # num_nextn_predict_layers (our default says 1 MTP layer: it loads without MTP, with a warning)
    "groups8-tied": dict(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=160,
        moe_intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=6,
        first_k_dense_replace=2,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=8,
        topk_group=3,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        q_lora_rank=64,
        kv_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=24,
        index_n_heads=16,
        index_head_dim=32,
        index_topk=12,
        max_position_embeddings=256,
        rope_parameters=_yarn(8.0, 32),
        tie_word_embeddings=True,
    ),
}


def _hf_model(name: str, seed: int) -> DeepseekV32ForCausalLM:
    torch.manual_seed(seed)
    cfg = DeepseekV32Config(**CONFIGS[name], attn_implementation="eager")
    model = DeepseekV32ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(
                    0, 0.05
                )  # non-zero, comparable to the sigmoid scores' spread: it changes the routes
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # norm weights/biases away from their 1/0 init
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _boundary_ties(model: torch.nn.Module, ids: torch.Tensor, rel_tol: float = 1e-5) -> int:
    """Rows whose k-th and (k+1)-th best indexer scores are (nearly) equal, over all layers: their selection
    may differ between two correct implementations."""
    out = model.forward(ids, return_indexer=True)
    k = model.config.index_topk
    S = ids.shape[1]
    if S <= k:
        return 0
    future = torch.ones(S, S, dtype=torch.bool).triu(1)
    n = 0
    for aux in out.indexer:
        q, w, key = aux.index_q.double(), aux.index_w.double(), aux.index_k.double()
        scores = torch.einsum("bsht,bsh->bst", torch.einsum("bshd,btd->bsht", q, key).relu(), w)
        scale = scores.abs().masked_fill(future, 0).amax(-1)[:, k:]
        v = (
            scores.masked_fill(future, float("-inf")).sort(dim=-1, descending=True).values[:, k:]
        )  # rows t >= k
        n += int((v[..., k - 1] - v[..., k] <= rel_tol * scale).sum())
    return n


def _lengths(name: str) -> list[int]:
    k = CONFIGS[name]["index_topk"]
    return [k - 3, k, 6 * k]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path: Path, name: str, seed: int) -> None:
    hf = _hf_model(name, seed)
    kw = {"max_shard_size": "200KB"} if seed == 1 else {}  # HF's own shards + index once per config
    hf.save_pretrained(tmp_path, **kw)
    assert (tmp_path / "model.safetensors.index.json").exists() == (seed == 1)
    if "num_nextn_predict_layers" in CONFIGS[name]:
        model = load_model(tmp_path)
    else:
        with pytest.warns(UserWarning, match="MTP"):
            model = load_model(tmp_path)
    assert model.config.num_hidden_layers == CONFIGS[name]["num_hidden_layers"]
    gen = torch.Generator().manual_seed(100 + seed)
    checked, skipped = [], []
    for S in _lengths(name):
        ids = torch.randint(0, CONFIGS[name]["vocab_size"], (2, S), generator=gen)
        with torch.no_grad():
            if _boundary_ties(model, ids):
                skipped.append(S)
                continue
            ref = hf(ids).logits
            ours = model(ids)
        assert ours.shape == ref.shape
        err = _rel(ours, ref)
        assert err <= TOL, f"{name} seed {seed} S={S}: relative error {err:.2e}"
        checked.append((S, err))
    if not checked:
        pytest.skip(f"indexer ties at the top-k boundary for every length {skipped}")
    if skipped:
        logging.getLogger(__name__).warning(
            "skipped lengths %s (indexer ties at the top-k boundary)", skipped
        )


def test_rms_norm_eps_applies_to_block_norms_only(tmp_path: Path) -> None:
    """With rms_norm_eps != 1e-6 the latent norms (q_a_layernorm, kv_a_layernorm) keep eps 1e-6."""
    CONFIGS["eps1e-5"] = dict(CONFIGS["groups4"], rms_norm_eps=1e-5)
    try:
        hf = _hf_model("eps1e-5", 0)
    finally:
        del CONFIGS["eps1e-5"]
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))  # dense: no DSA ties
    with torch.no_grad():
        assert _rel(model(ids), hf(ids).logits) <= TOL


def test_transformers_loads_our_checkpoint(tmp_path: Path) -> None:
    """The reverse direction: what ``save_model`` writes (MTP included) loads into transformers."""
    hf = _hf_model("groups4", 3)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "ours", max_shard_bytes=300_000)
    back = DeepseekV32ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if _boundary_ties(ours, ids):
            pytest.skip("indexer ties at the top-k boundary")
        assert _rel(back(ids).logits, hf(ids).logits) <= TOL
        assert _rel(ours(ids), hf(ids).logits) <= TOL


def test_fp8_twin(tmp_path: Path) -> None:
    """``save_model(fp8=True)`` then ``load_model`` equals a model holding the dequantised weights; and the FP8
    rounding itself stays modest next to the unquantised model."""
    hf = _hf_model("groups4", 0)
    hf.save_pretrained(tmp_path / "hf")
    full = load_model(tmp_path / "hf")
    save_model(full, tmp_path / "fp8", fp8=True)
    fp8 = load_model(tmp_path / "fp8")
    twin = copy.deepcopy(full)
    with torch.no_grad():
        for key, w in twin.state_dict().items():
            if key.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
                for e in range(w.shape[0]):
                    w[e] = dequantize_fp8_blocks(*quantize_fp8_blocks(w[e]))
            elif w.dim() == 2 and is_fp8_weight("model." + key):
                w.copy_(dequantize_fp8_blocks(*quantize_fp8_blocks(w)))
    gen = torch.Generator().manual_seed(7)
    for S in _lengths("groups4"):
        ids = torch.randint(0, 256, (2, S), generator=gen)
        with torch.no_grad():
            a, b = fp8(ids), twin(ids)
            assert _rel(a, b) <= 1e-6, S
            # e4m3 rounds each weight by ~2.6% rms; chains of 2-3 quantised matmuls per sub-layer and the MoE
            # routes that flips give 4-6% on these random weights (8 seeds). With DSA on, long sequences also
            # flip top-k selections (14-17%), so compare with DSA off there.
            assert _rel(fp8(ids, dense=True), full(ids, dense=True)) <= 0.10, S
