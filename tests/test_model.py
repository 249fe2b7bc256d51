"""Model-level agreement tests: every fast/alternative path against its slow reference (CPU, fp32, tiny config)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsv32 import ops
from dsv32.config import ModelConfig
from dsv32.model import Transformer, yarn_correction_range
from dsv32.ops import reference as ref
from dsv32.quant import fp8_roundtrip, hadamard_matrix


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def make_model(seed: int = 0, **changes) -> Transformer:
    """A tiny model with weights large enough that attention and routing are far from uniform."""
    cfg = ModelConfig.from_name("tiny").replace(**changes)
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
            elif "bias" not in name:
                p.normal_(1.0, 0.1)
        for mod in m.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0, 0.05)
    return m


def ids_for(m: Transformer, B: int, S: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, m.config.vocab_size, (B, S), generator=g)


# ----------------------------------------------------------------------------- config


def test_deepseek_preset_is_the_released_config():
    c = ModelConfig.from_name("deepseek-v3.2")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (129280, 7168, 61, 128)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
        1536, 512, 128, 64, 128)
    assert (c.index_n_heads, c.index_head_dim, c.index_topk) == (64, 128, 2048)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group, c.first_k_dense_replace) == (
        256, 8, 8, 4, 3)
    assert c.routed_scaling_factor == 2.5 and c.num_nextn_predict_layers == 1
    assert c.rope_scaling["factor"] == 40 and c.rope_scaling["original_max_position_embeddings"] == 4096
    assert c.quantization_config["weight_block_size"] == [128, 128]
    assert yarn_correction_range(c) == (10.0, 23.0)
    assert c.softmax_scale == pytest.approx(0.1352338, abs=1e-7)


def test_config_json_round_trip_and_both_rope_spellings(tmp_path):
    c = ModelConfig.from_name("tiny")
    c.to_hf(tmp_path)
    c2 = ModelConfig.from_hf(tmp_path)
    assert c2 == c
    d = json.loads((tmp_path / "config.json").read_text())
    rs = d.pop("rope_scaling")
    d["rope_parameters"] = {"rope_type": rs.pop("type"), "rope_theta": d.pop("rope_theta"), **rs}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c3 = ModelConfig.from_hf(tmp_path)
    assert c3.rope_scaling == c.rope_scaling and c3.rope_theta == c.rope_theta
    assert torch.equal(Transformer(c3).inv_freq, Transformer(c).inv_freq)


def test_small_preset_size():
    n = Transformer(ModelConfig.from_name("small")).num_params()
    assert 10e6 <= n <= 40e6


def test_bad_config_names_field():
    with pytest.raises(ValueError, match="n_group"):
        ModelConfig.from_name("tiny").replace(n_group=3)


# ----------------------------------------------------------------------------- attention forms and caching


@torch.no_grad()
def test_absorbed_equals_mha_dense():
    m = make_model()
    ids = ids_for(m, 2, 24)
    a = m.forward(ids, dense=True, form="mha")
    b = m.forward(ids, dense=True, form="absorbed")
    assert rel(b, a) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("dense", [True, False])
def test_cached_decode_equals_full_forward(dense):
    m = make_model()
    ids = ids_for(m, 2, 48)  # well above index_topk=16
    full = m.forward(ids, dense=dense)
    cache = m.new_cache(2, 64)
    outs = [m.forward(ids[:, :20], cache=cache, dense=dense)]
    for t in range(20, 48):
        outs.append(m.forward(ids[:, t : t + 1], cache=cache, dense=dense))  # absorbed single-token decode
    assert rel(torch.cat(outs, 1), full) < 1e-5
    assert cache.lengths.tolist() == [48, 48]


@torch.no_grad()
def test_chunked_prefill_equals_one_prefill():
    m = make_model()
    ids = ids_for(m, 1, 50)
    one = m.forward(ids, cache=m.new_cache(1, 64))
    cache = m.new_cache(1, 64)
    chunks = [m.forward(ids[:, s : s + 13], cache=cache) for s in range(0, 50, 13)]
    assert rel(torch.cat(chunks, 1), one) < 1e-5


@torch.no_grad()
def test_ragged_batch_decode_matches_single_rows():
    m = make_model()
    a, b = ids_for(m, 1, 30, seed=2), ids_for(m, 1, 19, seed=3)
    cache = m.new_cache(2, 40)
    m.forward(a[:, :-1], cache=cache, cache_rows=torch.tensor([0]))
    m.forward(b[:, :-1], cache=cache, cache_rows=torch.tensor([1]))
    step = m.forward(torch.cat([a[:, -1:], b[:, -1:]]), cache=cache)  # rows at positions 29 and 18
    assert rel(step[0, -1], m(a)[0, -1]) < 1e-5
    assert rel(step[1, -1], m(b)[0, -1]) < 1e-5


@torch.no_grad()
def test_cache_row_reset_reuses_slot():
    m = make_model()
    a, b = ids_for(m, 1, 25, seed=4), ids_for(m, 1, 9, seed=5)
    cache = m.new_cache(1, 32)
    m.forward(a, cache=cache)
    cache.reset([0])
    out = m.forward(b, cache=cache)
    assert rel(out, m(b)) < 1e-5


def test_cache_overflow_is_an_error():
    m = make_model()
    cache = m.new_cache(1, 8)
    with pytest.raises(ValueError, match="max_len"):
        m.forward(ids_for(m, 1, 9), cache=cache)


@torch.no_grad()
def test_last_only_logits():
    m = make_model()
    ids = ids_for(m, 2, 30)
    assert torch.allclose(m.forward(ids, last_only=True), m(ids)[:, -1:], atol=1e-6)


# ----------------------------------------------------------------------------- DSA


@torch.no_grad()
def test_dsa_with_topk_at_least_T_is_dense():
    m = make_model()
    ids = ids_for(m, 2, 40)
    assert torch.equal(m.forward(ids, topk=40), m.forward(ids, dense=True))
    assert rel(m.forward(ids, topk=40, form="absorbed"), m.forward(ids, dense=True)) < 1e-5


@torch.no_grad()
def test_dsa_changes_output_when_topk_below_T():
    m = make_model()
    ids = ids_for(m, 1, 40)
    assert rel(m(ids), m.forward(ids, dense=True)) > 1e-3


def _masked_dense(q, kv, idx, q_pos, *, v_dim, scale):
    """Dense absorbed attention under an explicit [S,T] top-k mask: the definition sparse_mla must match."""
    T = kv.shape[1]
    sel = torch.zeros(*idx.shape[:2], T + 1, dtype=torch.bool)
    sel.scatter_(-1, torch.where(idx < 0, T, idx).long(), True)
    visible = sel[..., :T] & ref.causal_mask(q_pos, T)
    scores = torch.einsum("bshd,btd->bsht", q, kv) * scale
    scores = scores.masked_fill(~visible.unsqueeze(2), float("-inf"))
    p = scores.softmax(-1)
    return torch.einsum("bsht,btv->bshv", p, kv[..., :v_dim])


def test_gathered_sparse_attention_equals_masked_dense_values_and_grads():
    torch.manual_seed(0)
    B, S, T, H, D, V, K = 2, 12, 30, 3, 20, 16, 8
    q_pos = torch.arange(T - S, T).expand(B, S)
    q = torch.randn(B, S, H, D, requires_grad=True)
    kv = torch.randn(B, T, D, requires_grad=True)
    qi, wi, ki = torch.randn(B, S, 2, 8), torch.randn(B, S, 2), torch.randn(B, T, 8)
    idx = ref.indexer_topk(qi, wi, ki, q_pos=q_pos, topk=K)
    out, lse = ref.sparse_mla(q, kv, idx, v_dim=V, scale=0.3)
    want = _masked_dense(q, kv, idx, q_pos, v_dim=V, scale=0.3)
    assert rel(out, want) < 1e-6
    g = torch.randn_like(out)
    gq, gkv = torch.autograd.grad((out * g).sum(), (q, kv))
    wq, wkv = torch.autograd.grad((want * g).sum(), (q, kv))
    assert rel(gq, wq) < 1e-5 and rel(gkv, wkv) < 1e-5
    # lse rebuilds the probabilities over the selected set (the sparsify KL needs them)
    sel_kv = kv[0][idx[0, 0].long()]
    p = torch.exp(torch.einsum("hd,kd->hk", q[0, 0], sel_kv) * 0.3 - lse[0, 0].unsqueeze(-1))
    assert torch.allclose(p.sum(-1), torch.ones(H), atol=1e-5)


@pytest.mark.parametrize("block", [256, 12])
def test_masked_mha_form_equals_gathered_dsa_values_and_grads(block, monkeypatch):
    """The paper's masked-MHA mode (dense SDPA under the top-k mask) = the gathered absorbed form; also with
    the masked form cut into query blocks whose keys stop at the block's last row (block 12 < S = 40)."""
    import dsv32.model as model_mod

    monkeypatch.setattr(model_mod, "MASKED_QUERY_BLOCK", block)
    m = make_model()
    ids = ids_for(m, 2, 40)  # index_topk 16 < 40: rows past 16 are sparse
    outs, grads = [], []
    for form in ("masked", "absorbed"):
        m.zero_grad()
        logits = m.forward(ids, form=form)
        (logits.square().mean()).backward()
        outs.append(logits.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert rel(outs[0], outs[1]) < 1e-5
    assert rel(grads[0], grads[1]) < 1e-4
    # "auto" picks the masked form under masked_mha_max_len, with the same result; chunked prefill too
    m.config.masked_mha_max_len = 64
    with torch.no_grad():
        assert rel(m.forward(ids), outs[1]) < 1e-5
        cache = m.new_cache(2, 48)
        chunks = [m.forward(ids[:, s : s + 13], cache=cache) for s in range(0, 40, 13)]
        assert rel(torch.cat(chunks, 1), outs[1]) < 1e-5
    m.config.masked_mha_max_len = 0


def test_indexer_topk_rules():
    torch.manual_seed(0)
    B, S, T = 1, 6, 6
    q_pos = torch.arange(S).unsqueeze(0)
    q, w, k = torch.randn(B, S, 2, 4), torch.rand(B, S, 2), torch.randn(B, T, 4)
    idx = ref.indexer_topk(q, w, k, q_pos=q_pos, topk=4)
    assert idx.dtype == torch.int32 and idx.shape == (1, 6, 4)
    for s in range(S):
        n = min(s + 1, 4)
        assert (idx[0, s, n:] == -1).all() and (idx[0, s, :n] >= 0).all() and (idx[0, s, :n] <= s).all()
    # ties go to the lower position: all-zero queries give equal scores everywhere
    idx0 = ref.indexer_topk(torch.zeros(1, 1, 2, 4), w[:, :1], k, q_pos=torch.tensor([[5]]), topk=3)
    assert idx0[0, 0].tolist() == [0, 1, 2]
    # chunking does not change the result
    q2, w2, k2 = torch.randn(2, 40, 3, 8), torch.randn(2, 40, 3), torch.randn(2, 40, 8)
    pos = torch.arange(40).expand(2, 40)
    a = ref.indexer_topk(q2, w2, k2, q_pos=pos, topk=7, chunk=5)
    b = ref.indexer_topk(q2, w2, k2, q_pos=pos, topk=7, chunk=1000)
    assert torch.equal(a, b)


@torch.no_grad()
def test_indexer_hadamard_keeps_scores_and_fp8_is_close():
    h = hadamard_matrix(16)
    assert torch.allclose(h @ h, torch.eye(16), atol=1e-6)
    m = make_model()
    ids = ids_for(m, 1, 40)
    m_h = make_model(indexer_hadamard=True)
    a = m.forward(ids, return_indexer=True).indexer[0]  # layer 0: same input in all three models
    b = m_h.forward(ids, return_indexer=True).indexer[0]
    sa = ref.indexer_scores(a.index_q, a.index_w, a.index_k)
    sb = ref.indexer_scores(b.index_q, b.index_w, b.index_k)
    assert rel(sb, sa) < 1e-5
    m8 = make_model(indexer_hadamard=True, indexer_fp8=True)
    c = m8.forward(ids, return_indexer=True).indexer[0]
    sc = ref.indexer_scores(c.index_q, c.index_w, c.index_k)
    assert 0 < rel(sc, sa) < 0.1  # FP8 rounding only


def test_fp8_roundtrip_uses_power_of_two_scales():
    x = torch.randn(3, 256) * 7
    y = fp8_roundtrip(x, 128)
    for blk in range(2):
        xb, yb = x[:, blk * 128 : (blk + 1) * 128], y[:, blk * 128 : (blk + 1) * 128]
        scale = 2.0 ** torch.ceil(torch.log2(xb.abs().amax(-1) / 448))
        assert torch.equal(yb, (xb / scale[:, None]).to(torch.float8_e4m3fn).float() * scale[:, None])


@torch.no_grad()
def test_fp8_index_cache_gives_the_same_selection_as_simulated_fp8():
    m = make_model(indexer_fp8=True)
    ids = ids_for(m, 1, 40)
    full = m(ids)
    cache = m.new_cache(1, 48, index_fp8=True)
    outs = [m.forward(ids[:, :30], cache=cache)] + [
        m.forward(ids[:, t : t + 1], cache=cache) for t in range(30, 40)
    ]
    assert rel(torch.cat(outs, 1), full) < 1e-5
    assert cache.index_k[0].dtype == torch.float8_e4m3fn


# ----------------------------------------------------------------------------- MoE


@torch.no_grad()
def test_batched_moe_equals_per_token_loop():
    m = make_model()
    moe = m.layers[1].mlp
    x = torch.randn(2, 9, m.config.hidden_size)
    out, ids, _ = moe(x)
    flat = x.reshape(-1, x.shape[-1])
    cfg = m.config
    loop = []
    for n in range(flat.shape[0]):
        xn = flat[n]
        s = torch.sigmoid(moe.gate.weight @ xn)
        b = (s + moe.gate.e_score_correction_bias).view(cfg.n_group, -1)
        gs = b.topk(2, -1).values.sum(-1)
        keep = gs.topk(cfg.topk_group).indices
        bm = torch.full_like(b, float("-inf"))
        bm[keep] = b[keep]
        e = bm.flatten().topk(cfg.num_experts_per_tok).indices
        w = s[e] / s[e].sum() * cfg.routed_scaling_factor
        y = moe.shared_experts(xn)
        for wi, ei in zip(w, e):
            h = torch.nn.functional.silu(moe.experts.gate_proj[ei] @ xn) * (moe.experts.up_proj[ei] @ xn)
            y = y + wi * (moe.experts.down_proj[ei] @ h)
        assert sorted(e.tolist()) == sorted(ids[n].tolist())
        loop.append(y)
    assert rel(out.reshape(-1, out.shape[-1]), torch.stack(loop)) < 1e-5


@torch.no_grad()
def test_forced_routes_reproduce_recorded_routes():
    m = make_model()
    ids = ids_for(m, 2, 20)
    rec = m.forward(ids, return_routes=True, return_mtp=True)
    assert len(rec.routes) == 3  # two MoE layers + the MTP layer, in that order
    again = m.forward(ids, forced_routes=rec.routes, return_routes=True, return_mtp=True)
    assert torch.equal(again.logits, rec.logits)
    assert all(torch.equal(a, b) for a, b in zip(again.routes, rec.routes))
    # forcing other experts changes the output: the routes are really used
    other = [(r + 1) % m.config.n_routed_experts for r in rec.routes]
    assert rel(m.forward(ids, forced_routes=other), rec.logits) > 1e-4


@torch.no_grad()
def test_bias_steers_selection_not_weights():
    m = make_model()
    gate = m.layers[1].mlp.gate
    x = torch.randn(5, m.config.hidden_size)
    w0, ids0, s0 = gate(x)
    gate.e_score_correction_bias[3] = 100.0  # expert 3 now always chosen
    w1, ids1, _ = gate(x)
    assert (ids1 == 3).any(-1).all()
    pos = (ids1 == 3).nonzero()
    wsum = s0.gather(1, ids1).sum(-1)
    expected = s0[pos[:, 0], 3] / wsum[pos[:, 0]] * m.config.routed_scaling_factor
    assert torch.allclose(w1[pos[:, 0], pos[:, 1]], expected, atol=1e-6)


# ----------------------------------------------------------------------------- MTP and training


def test_mtp_and_gradients_flow():
    m = make_model()
    m.train()
    ids = ids_for(m, 2, 24)
    out = m.forward(ids, return_mtp=True)
    assert out.mtp_hidden[0].shape == (2, 23, m.config.hidden_size)
    mtp_logits = m.logits_from_hidden(out.mtp_hidden[0])
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + (
        torch.nn.functional.cross_entropy(mtp_logits[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
    )
    loss.backward()
    assert math.isfinite(loss.item())
    assert m.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert m.layers[2].self_attn.kv_b_proj.weight.grad.abs().sum() > 0
    assert m.layers[1].mlp.experts.gate_proj.grad.abs().sum() > 0


def test_ops_backend_forced_reference_matches_auto():
    m = make_model()
    ids = ids_for(m, 1, 40)
    with torch.no_grad():
        auto = m(ids)
        ops.set_backend("reference")
        try:
            refd = m(ids)
        finally:
            ops.set_backend(None)
    assert rel(auto, refd) < 1e-5


def test_full_size_parameter_count_matches_the_release():
    """Built on the meta device: 671B main model (incl. 0.85B indexers) + 11.6B MTP; HF lists 685B because the
    MTP layer stores its own copies of the embedding and head (2 x 129280 x 7168)."""
    with torch.device("meta"):
        m = Transformer(ModelConfig.from_name("deepseek-v3.2"))
    total = m.num_params()
    mtp = sum(p.numel() for p in m.mtp.parameters())
    indexers = sum(p.numel() for n, p in m.named_parameters() if ".indexer." in n and not n.startswith("mtp"))
    assert 671.0e9 < total - mtp < 672.5e9
    assert 11.4e9 < mtp < 11.8e9
    assert indexers == 61 * (64 * 128 * 1536 + 128 * 7168 + 64 * 7168 + 256)
    assert 685.0e9 < total + 2 * 129280 * 7168 < 685.6e9


def test_chunked_cpu_sparse_gqa_matches_reference_values_and_grads(monkeypatch):
    from dsv32.ops import cpu_gqa

    monkeypatch.setattr(cpu_gqa, "BLOCK_BYTES", 4096)  # force many query blocks
    torch.manual_seed(0)
    B, S, T, H, Hkv, D, K = 2, 9, 20, 4, 2, 8, 6
    q = torch.randn(B, S, H, D, requires_grad=True)
    k, v = torch.randn(B, T, Hkv, D, requires_grad=True), torch.randn(B, T, Hkv, D, requires_grad=True)
    idx = ref.indexer_topk(torch.randn(B, S, 2, 4), torch.rand(B, S, 2), torch.randn(B, T, 4),
                           q_pos=torch.arange(T - S, T).expand(B, S), topk=K)
    idx[0, 0] = -1  # a row with no valid key
    a, la = cpu_gqa.sparse_gqa(q, k, v, idx, scale=0.4)
    b, lb = ref.sparse_gqa(q, k, v, idx, scale=0.4)
    assert torch.allclose(a, b, atol=1e-6) and torch.equal(torch.isinf(la), torch.isinf(lb))
    g = torch.randn_like(a)
    ga = torch.autograd.grad((a * g).sum(), (q, k, v))
    gb = torch.autograd.grad((b * g).sum(), (q, k, v))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))
