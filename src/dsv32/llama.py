"""Llama-family (GQA) models with a retrofitted DSA lightning indexer, built from GGUF files (SmolLM2-135M-Instruct).

The model is HF's ``LlamaForCausalLM`` written out plainly (RMSNorm, rotate-half RoPE, grouped-query attention,
SwiGLU, optionally tied embeddings) plus one DeepSeek-style lightning indexer per layer, so that a dense
pretrained model can be turned into a DSA model by training only the indexers (V3.2 paper §2.1.1, dense warm-up) and
then running attention over each query's top-k keys (the sparse stage).

Layout decisions (docs/llama.md):
- Weights are kept in **HF's layout**: GGUF stores Q/K rows permuted so that llama.cpp can rotate adjacent
  pairs (2i, 2i+1); ``load_gguf`` undoes that permutation, and RoPE is the rotate-half form over (i, i+Dh/2).
  Same numbers, and the parameters can be written out as an HF checkpoint unchanged.
- Parameter names mirror HF minus the ``model.`` prefix; the indexer lives at ``layers.{i}.indexer.*`` so it
  can be saved, loaded and trained on its own (``indexer_state_dict``; files: ``registry.save_indexer``).
- The indexer reads the layer's normed hidden state **detached**: as in V3.2's sparse stage it is trained only
  by its KL loss, and its top-k selection carries no gradient to the trunk anyway.

Shape legend:
    B batch, S new tokens (queries), T context tokens (keys), D hidden_size, V vocab, H attention heads,
    Hkv KV heads, Dh head_dim, F intermediate_size, HI indexer heads, dI indexer head dim,
    R indexer RoPE dims, K top-k.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dsv32 import ops
from dsv32.cache import RowCache
from dsv32.gguf import gguf_metadata, read_gguf_arrays, resolve_gguf
from dsv32.model import MLP, ForwardOutput, FP32LayerNorm, RMSNorm, apply_rope_half, gather_keys, rope_cos_sin

# ======================================================================================== config


@dataclass
class LlamaConfig:
    """HF ``LlamaConfig`` field names (defaults: SmolLM2-135M) plus the retrofitted indexer's settings."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    initializer_range: float = 0.041666666666666664
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 2
    # --- DSA (not in HF's LlamaConfig): V3.2's indexer shape, scaled down to a 9-head model
    use_dsa: bool = True  # sparse attention once a query sees more than index_topk keys
    index_n_heads: int = 4
    index_head_dim: int = 64
    index_rope_head_dim: int = 32  # RoPE on the first R dims of indexer q/k (V3.2: 64 of 128)
    index_topk: int = 512

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"LlamaConfig: {msg}")

        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads {self.num_attention_heads} must be a multiple of num_key_value_heads "
             f"{self.num_key_value_heads}")
        need(self.head_dim is not None and self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even (RoPE)")
        need(0 < self.index_rope_head_dim <= self.index_head_dim and self.index_rope_head_dim % 2 == 0,
             f"index_rope_head_dim {self.index_rope_head_dim} must be even and in (0, index_head_dim]")
        need(self.index_topk >= 1 and self.index_n_heads >= 1, "index_topk and index_n_heads must be >= 1")

    def replace(self, **changes: Any) -> LlamaConfig:
        return LlamaConfig(**{**asdict(self), **changes})

    # -------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        """From an HF ``config.json`` dict (either rope spelling); unsupported Llama variants are an error."""
        if d.get("hidden_act", "silu") != "silu" or d.get("mlp_bias", False):
            raise ValueError("LlamaConfig.from_hf: only SiLU MLPs without bias are supported")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or {}
        kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if kind != "default":
            raise ValueError(f"LlamaConfig.from_hf: rope type {kind!r} is not supported (plain RoPE only)")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """An HF ``config.json`` dict (``LlamaForCausalLM``) with the indexer fields alongside."""
        d = asdict(self)
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            mlp_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        return d


# ======================================================================================== RoPE


def rope_inv_freq(dim: int, base: float) -> torch.Tensor:
    """Per-pair frequencies [dim/2]: ``base^(-2i/dim)`` (HF's default rope, no scaling)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


# ======================================================================================== indexer


class LlamaIndexer(nn.Module):
    """Lightning indexer retrofitted onto a Llama layer (V3.2 paper eq. 1): ``I[t,s] = sum_j w[t,j] ReLU(q[t,j].k[s])``.

    V3.2 takes the indexer query from MLA's query latent; a Llama layer has none, so the query comes from the
    layer's normed hidden state through ``wq``. Everything else follows V3.2: one shared key per token from
    ``wk`` + LayerNorm, half-split RoPE on the first R dims of q and k, head weights from ``weights_proj`` in
    fp32 with the constant scales dI^-0.5 * HI^-0.5 folded in. No Hadamard/FP8 simulation (fp32 here).
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.index_rope_head_dim
        self.wq = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = FP32LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.scale = self.head_dim**-0.5 * self.n_heads**-0.5

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        R = self.rope_dim
        return torch.cat([apply_rope_half(x[..., :R], cos, sin), x[..., R:]], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B,S,D] (normed hidden), cos/sin [B,S,R/2] -> k [B,S,dI]: what the cache stores per token."""
        return self._rope(self.k_norm(self.wk(x.detach())), cos, sin)

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,S,D] -> q [B,S,HI,dI], w [B,S,HI] fp32 (scales folded in)."""
        B, S, _ = x.shape
        x = x.detach()
        q = self._rope(self.wq(x).view(B, S, self.n_heads, self.head_dim), cos, sin)
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.scale
        return q, w


# ======================================================================================== attention


def dense_gqa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, *, scale: float, causal_fast: bool
) -> torch.Tensor:
    """Causal GQA through SDPA: q [B,S,H,Dh], k/v [B,T,Hkv,Dh], q_pos [B,S] -> [B,S,H,Dh].

    Key t is visible to query s iff t <= q_pos[s] (cache rows beyond that hold stale data, never read).
    ``causal_fast``: the caller knows S == T and q_pos == 0..S-1, so SDPA's built-in causal mask applies.
    Query head h uses KV head h // (H/Hkv), as HF's ``repeat_kv`` and ``ops.sparse_gqa`` do.
    """
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if causal_fast:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = ops.reference.causal_mask(q_pos, k.shape[1]).unsqueeze(1)  # [B,1,S,T]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(1, 2)


# Bytes of gathered K/V rows one ``ops.sparse_gqa`` call may build; longer inputs go in query chunks.
SPARSE_CHUNK_BYTES = 256 << 20


# Prefills whose [B,S,T] selection mask stays below this many entries run DSA as masked dense SDPA (the V3.2
# paper's "masked MHA mode" for short prefill): the same selected keys and softmax, on the fast dense kernel.
MASKED_PREFILL_MAX = 1 << 27


def masked_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Sparse attention as SDPA under a boolean mask built from ``idx``: q [B,S,H,Dh], k/v [B,T,Hkv,Dh]."""
    B, S = idx.shape[:2]
    T = k.shape[1]
    cols = torch.where(idx >= 0, idx.long(), torch.full_like(idx, T, dtype=torch.long))
    mask = torch.zeros(B, S, T + 1, dtype=torch.bool, device=q.device).scatter_(2, cols, True)[..., :T]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.unsqueeze(1), scale=scale,
        enable_gqa=True,
    )
    return o.transpose(1, 2)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Each query attends to its selected keys only: q [B,S,H,Dh], k/v [B,T,Hkv,Dh], idx [B,S,K] -> [B,S,H,Dh].

    Queries go to ``ops.sparse_gqa`` in chunks so that the gathered [B,C,K,Hkv,Dh] rows stay bounded whatever
    backend runs it (the reference gathers every query's rows at once).
    """
    B, S, _, Dh = q.shape
    K, Hkv = idx.shape[-1], k.shape[2]
    T = k.shape[1]
    if S > 1 and B * S * T <= MASKED_PREFILL_MAX:
        return masked_sparse_attention(q, k, v, idx, scale=scale)
    C = max(1, SPARSE_CHUNK_BYTES // (B * K * Hkv * 2 * Dh * 4))
    outs = [ops.sparse_gqa(q[:, s0 : s0 + C], k, v, idx[:, s0 : s0 + C], scale=scale)[0] for s0 in range(0, S, C)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@dataclass
class LlamaAttnAux:
    """Per-layer tensors for the sparsify trainer (``return_indexer=True``): enough to rebuild the main
    attention distribution in query chunks (softmax(q.k * scale), summed over heads) and the indexer's.

    Nothing is detached except the indexer inputs: the ``main_*`` / ``sparse_lse`` views detach q/k themselves
    (they are KL targets). Same methods as the V3.2 ``model.AttnAux``, so the indexer loss needs no type test.
    """

    index_q: torch.Tensor  # [B,S,HI,dI]
    index_w: torch.Tensor  # [B,S,HI] fp32, scales folded in
    index_k: torch.Tensor  # [B,T,dI]
    topk_idx: torch.Tensor | None  # [B,S,K] int32 (-1 padded), None when attention ran dense
    q: torch.Tensor  # [B,S,H,Dh] after RoPE
    k: torch.Tensor  # [B,T,Hkv,Dh] after RoPE (query head h uses KV head h // (H/Hkv))
    q_pos: torch.Tensor  # [B,S]; key t visible to query s iff t <= q_pos[s]
    scale: float  # softmax scale Dh^-0.5

    @property
    def num_heads(self) -> int:
        return self.q.shape[2]

    def main_logits(self, sl: slice | torch.Tensor) -> torch.Tensor:
        """Main attention logits (scaled, unmasked) of the queries ``sl`` over every key -> [B,H,C,T] fp32.

        Head-major, so each KV group's product is one batched GEMM written in place (no copy of [C,T] blocks).
        """
        q, k = self.q[:, sl].detach().float(), self.k.detach().float()  # [B,C,H,D], [B,T,Hkv,D]
        B, C, H, D = q.shape
        Hkv = k.shape[2]
        qh = q.permute(0, 2, 1, 3).reshape(B * Hkv, (H // Hkv) * C, D)  # head h uses KV head h // (H/Hkv)
        kh = k.permute(0, 2, 3, 1).reshape(B * Hkv, D, -1)  # [B*Hkv,D,T]
        return torch.bmm(qh, kh).view(B, H, C, -1).mul_(self.scale)

    def main_logits_at(self, sl: slice | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Main attention logits of the queries ``sl`` at the keys ``idx`` [B,C,K] (>= 0) -> [B,C,H,K] fp32."""
        q = self.q[:, sl].detach().float()
        B, C, H, D = q.shape
        k_sel = gather_keys(self.k.detach().float(), idx)  # [B,C,K,Hkv,D]
        Hkv = k_sel.shape[3]
        s = torch.einsum("bsngd,bsknd->bsngk", q.view(B, C, Hkv, H // Hkv, D), k_sel)
        return s.reshape(B, C, H, -1) * self.scale

    @torch.no_grad()
    def sparse_lse(self, sl: slice | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Per-head log-sum-exp over the selected keys ``idx`` [B,C,K], from the sparse op itself -> [B,C,H].

        Calls the backend's op directly, not ``ops.sparse_gqa``: an ``ops.override`` of that (the masked SDPA
        form of ``--sparse-impl masked``) returns no lse.
        """
        q, k = self.q[:, sl].detach(), self.k.detach()
        return ops.backend_for(q, "sparse_gqa").sparse_gqa(q, k, k[..., :1], idx, scale=self.scale)[1].float()


@dataclass
class _Ctx:
    """Per-forward state threaded through the layers."""

    positions: torch.Tensor  # [B,S]
    cos: torch.Tensor  # [B,S,Dh/2] main RoPE
    sin: torch.Tensor
    icos: torch.Tensor  # [B,S,R/2] indexer RoPE
    isin: torch.Tensor
    T: int  # keys visible to the furthest query: max(positions) + 1
    causal_fast: bool  # no cache offset: positions are 0..S-1 in every row
    cache: LlamaCache | None
    cache_rows: torch.Tensor | None
    use_dsa: bool
    topk: int
    want_aux: bool
    aux: list[LlamaAttnAux] = field(default_factory=list)


class LlamaAttention(nn.Module):
    """Grouped-query attention (H query heads share Hkv K/V heads), dense or DSA-sparse."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(D, self.n_heads * Dh, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, self.n_kv * Dh, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, self.n_kv * Dh, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * Dh, D, bias=cfg.attention_bias)
        self.scale = Dh**-0.5

    def forward(self, x: torch.Tensor, ctx: _Ctx, indexer: LlamaIndexer, layer_id: int) -> torch.Tensor:
        """x [B,S,D] (normed) -> [B,S,D]. Sparse when DSA is on and some query sees more than top-k keys."""
        B, S, _ = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv, self.head_dim
        q = apply_rope_half(self.q_proj(x).view(B, S, H, Dh), ctx.cos, ctx.sin)
        k = apply_rope_half(self.k_proj(x).view(B, S, Hkv, Dh), ctx.cos, ctx.sin)
        v = self.v_proj(x).view(B, S, Hkv, Dh)
        sparse = ctx.use_dsa and ctx.T > ctx.topk
        # Indexer keys are cached whenever there is a cache (a later call may be sparse); otherwise computed
        # only when this call selects keys or the caller asked for the indexer tensors.
        ik = indexer.keys(x, ctx.icos, ctx.isin) if (ctx.cache is not None or sparse or ctx.want_aux) else None
        if ctx.cache is not None:
            ctx.cache.update(layer_id, k, v, ik, ctx.positions, ctx.cache_rows)
            k, v, ik = ctx.cache.read(layer_id, ctx.T, ctx.cache_rows)  # [B,T,...]
        iq = iw = idx = None
        if sparse or ctx.want_aux:
            iq, iw = indexer.queries(x, ctx.icos, ctx.isin)
        if sparse:
            idx = ops.indexer_topk(iq, iw, ik, q_pos=ctx.positions, topk=ctx.topk)  # [B,S,K]
            o = sparse_attention(q, k, v, idx, scale=self.scale)
        else:
            o = dense_gqa(q, k, v, ctx.positions, scale=self.scale, causal_fast=ctx.causal_fast)
        if ctx.want_aux:
            ctx.aux.append(LlamaAttnAux(iq, iw, ik, idx, q, k, ctx.positions, self.scale))
        return self.o_proj(o.reshape(B, S, H * Dh))


class LlamaBlock(nn.Module):
    """Pre-norm decoder layer: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``; the indexer sits beside attn."""

    def __init__(self, cfg: LlamaConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.indexer = LlamaIndexer(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)  # SwiGLU: down(silu(gate(x)) * up(x))

    def forward(self, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx, self.indexer, self.layer_id)
        return h + self.mlp(self.post_attention_layernorm(h))


@torch.no_grad()
def copy_exact(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], *, where: str) -> None:
    """Copy ``sd`` into the tensors ``own`` in place; the key sets and every shape must match exactly.

    Raises KeyError naming missing/unexpected keys and ValueError naming a mis-shaped one (``where`` prefixes both).
    """
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise KeyError(f"{where}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k, t in own.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise ValueError(f"{where}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)}")
        t.copy_(sd[k])


# ======================================================================================== cache


class LlamaCache(RowCache):
    """Per-layer K/V (per KV head) and indexer keys; the same public methods as ``dsv32.cache.MLACache``.

    Legend: L layers, B slots (rows), T max tokens. Buffers: k/v [B,T,Hkv,Dh] (model dtype), index_k [B,T,dI]
    fp32. Rows are independent slots with their own length; writes may start at any position (chunked prefill,
    prefix reuse) and a reset row is reused as is: keys past a query's position are masked, never read.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        index_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_layers, self.batch_size, self.max_len = num_layers, batch_size, max_len
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.index_k = [
            torch.zeros(batch_size, max_len, index_dim, dtype=torch.float32, device=device) for _ in range(num_layers)
        ]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] tokens held per row

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.index_k)

    def update(
        self,
        layer: int,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        index_k_new: torch.Tensor | None,
        positions: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Write k/v [B',S,Hkv,Dh] and indexer keys [B',S,dI] at ``positions`` [B',S] of ``rows`` [B']."""
        self._write(self.k[layer], k_new, positions, rows)
        self._write(self.v[layer], v_new, positions, rows)
        if index_k_new is not None:
            self._write(self.index_k[layer], index_k_new, positions, rows)

    def read(
        self, layer: int, T: int, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first T positions -> (k [B',T,Hkv,Dh], v [B',T,Hkv,Dh], index_k [B',T,dI])."""
        r = self.row_index(rows)
        return self.k[layer][r, :T], self.v[layer][r, :T], self.index_k[layer][r, :T]


# ======================================================================================== model


class LlamaModel(nn.Module):
    """Llama-family decoder with a DSA indexer per layer, following the model protocol (docs/design.md).

    ``model(input_ids) -> logits [B,S,V]``; ``model.forward(input_ids, cache=..., positions=..., last_only=...,
    **extras)``; ``model.new_cache(batch_size, max_len)``. Attention is dense SDPA until some query sees more
    than ``index_topk`` keys (and ``use_dsa`` is on), then each query attends to its indexer top-k only.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaBlock(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)
        self.register_buffer(
            "index_inv_freq", rope_inv_freq(cfg.index_rope_head_dim, cfg.rope_theta), persistent=False
        )
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_parameters()

    # -------------------------------------------------------------- set-up
    def reset_buffers(self) -> None:
        """Recompute the RoPE tables (after building on the meta device and ``to_empty``)."""
        dev = self.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta).to(dev)
        self.index_inv_freq = rope_inv_freq(self.config.index_rope_head_dim, self.config.rope_theta).to(dev)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None, *, only: str | None = None) -> None:
        """Random init (of the parameters whose name contains ``only``, if given): normal(0, initializer_range)
        for matrices, ones for norm weights, zeros for biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if only is not None and only not in name:
                continue
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)

    def reset_indexer(self, seed: int | None = 0) -> None:
        """Fresh random indexers (every layer), e.g. before the dense warm-up (V3.2 paper §2.1.1)."""
        self.reset_parameters(seed, only=".indexer.")

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self, *, exclude_embeddings: bool = False, indexer: bool = True) -> int:
        n = sum(p.numel() for name, p in self.named_parameters() if indexer or ".indexer." not in name)
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None) -> LlamaCache:
        """Inference state for ``batch_size`` rows of up to ``max_len`` tokens each."""
        cfg = self.config
        return LlamaCache(
            num_layers=cfg.num_hidden_layers,
            batch_size=batch_size,
            max_len=max_len,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            index_dim=cfg.index_head_dim,
            dtype=dtype or self.embed_tokens.weight.dtype,
            device=self.embed_tokens.weight.device,
        )

    # -------------------------------------------------------------- indexer I/O
    def indexer_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the indexer parameters (``layers.{i}.indexer.*``), the part sparsify trains and ships."""
        return {k: v for k, v in self.state_dict().items() if ".indexer." in k}

    @torch.no_grad()
    def load_indexer_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load indexer parameters; the key set and every shape must match exactly."""
        copy_exact(self.indexer_state_dict(), sd, where="indexer state dict")

    # -------------------------------------------------------------- forward
    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.head_weight).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: LlamaCache | None = None,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
        cache_rows: torch.Tensor | None = None,
        dense: bool = False,
        topk: int | None = None,
        return_hidden: bool = False,
        return_indexer: bool = False,
        compute_logits: bool = True,
    ) -> torch.Tensor | ForwardOutput:
        """input_ids [B,S] -> logits [B,S,V] (fp32), or a ``ForwardOutput`` when any ``return_*`` is set.

        With a cache, tokens are written at ``positions`` [B,S] (default: appended after each row's length)
        and ``cache_rows`` [B] maps input rows to cache slots; without one, key t of this call sits at
        position t. ``dense`` turns DSA off for this call, ``topk`` overrides ``index_topk``.
        ``return_indexer`` adds per-layer ``LlamaAttnAux`` (indexer q/w/k, selection, post-RoPE q/k).
        """
        B, S = input_ids.shape
        device = input_ids.device
        if positions is None:
            if cache is not None:
                positions = cache.positions_for(S, cache_rows)
            else:
                positions = torch.arange(S, device=device).unsqueeze(0).expand(B, S)
        if cache is not None:
            cache.check_positions(positions)
        T = int(positions.max()) + 1 if positions.numel() else 0
        causal_fast = T == S and bool((positions == torch.arange(S, device=device)).all())
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        icos, isin = rope_cos_sin(self.index_inv_freq, positions)
        ctx = _Ctx(
            positions=positions, cos=cos, sin=sin, icos=icos, isin=isin, T=T, causal_fast=causal_fast,
            cache=cache, cache_rows=cache_rows, use_dsa=self.config.use_dsa and not dense,
            topk=topk if topk is not None else self.config.index_topk, want_aux=return_indexer,
        )
        x = self.embed_tokens(input_ids)  # [B,S,D]
        for layer in self.layers:
            x = layer(x, ctx)
        if cache is not None:
            cache.advance(positions, cache_rows)
        h = self.norm(x)
        logits = self.logits_from_hidden(h[:, -1:] if last_only else h) if compute_logits else None
        if not (return_hidden or return_indexer):
            return logits
        return ForwardOutput(
            logits=logits, hidden=h if return_hidden else None, indexer=ctx.aux if return_indexer else None
        )


# ======================================================================================== GGUF


def read_gguf_tensors(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file (None: SmolLM2) as fp32 torch tensors, GGUF names and layout (``gguf.py``)."""
    return {name: torch.from_numpy(a) for name, a in read_gguf_arrays(path).items()}


def config_from_gguf(meta: dict[str, Any], *, tied: bool = True, **overrides: Any) -> LlamaConfig:
    """LlamaConfig from GGUF metadata (``llama.*`` keys); ``tied`` = the file has no ``output.weight``."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported (plain RoPE only)")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"llama.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", get("rope.dimension_count", hidden // heads)))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("GGUF: partial RoPE (rope.dimension_count < head dim) is not supported")
    eps = float(np.float32(get("attention.layer_norm_rms_epsilon", 1e-5)))
    kw: dict[str, Any] = dict(
        vocab_size=int(get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(f"{eps:.6g}"),  # the fp32 value back to the decimal HF config.json holds (1e-05)
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings=tied,
        initializer_range=hidden**-0.5,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GGUF -> HF row order of a Q or K projection (weight [n_heads*Dh, D] or bias [n_heads*Dh]).

    llama.cpp's converter reorders each head's rows from HF's halves (i, i+Dh/2) into adjacent pairs
    (2i, 2i+1) for its interleaved RoPE; this is the inverse, so rotate-half RoPE applies.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_state_dict(tensors: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """GGUF-named tensors -> ``LlamaModel`` state dict (HF names minus ``model.``, HF layout, no indexer)."""
    sd: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name == "token_embd.weight":
            sd["embed_tokens.weight"] = t
        elif name == "output_norm.weight":
            sd["norm.weight"] = t
        elif name == "output.weight":
            sd["lm_head.weight"] = t
        elif name.startswith("blk."):
            _, i, base, kind = name.split(".")  # blk.{i}.{base}.{weight|bias}
            if base not in _GGUF_NAMES:
                raise ValueError(f"GGUF tensor {name}: not a plain Llama tensor (unsupported variant)")
            if base == "attn_q":
                t = unpermute_qk(t, cfg.num_attention_heads)
            elif base == "attn_k":
                t = unpermute_qk(t, cfg.num_key_value_heads)
            sd[f"layers.{i}.{_GGUF_NAMES[base]}.{kind}"] = t
        else:
            raise ValueError(f"GGUF tensor {name}: not a plain Llama tensor (unsupported variant)")
    return sd


def load_gguf(
    path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **overrides: Any,
) -> LlamaModel:
    """A Llama GGUF file (None: SmolLM2-135M-Instruct) as a ``LlamaModel``, weights dequantised to fp32.

    The indexers are random (seeded) and DSA is off unless ``use_dsa=True`` is passed; ``overrides`` set other
    ``LlamaConfig`` fields (e.g. ``index_topk``, ``index_n_heads``). Shipped names and trained indexers are
    ``dsv32.load_model``'s (``registry.py``).
    """
    path = str(resolve_gguf(path))
    tensors = read_gguf_tensors(path)
    overrides.setdefault("use_dsa", False)
    cfg = config_from_gguf(gguf_metadata(path), tied="output.weight" not in tensors, **overrides)
    sd = gguf_to_state_dict(tensors, cfg)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.to_empty(device="cpu")
    result = model.load_state_dict(sd, strict=False)
    if result.unexpected_keys or any(".indexer." not in k for k in result.missing_keys):
        raise ValueError(f"{path}: tensors do not fit the config: {result}")
    model.reset_buffers()
    model.reset_indexer(seed)
    model = model.to(device=device, dtype=dtype).eval()
    model.reset_buffers()  # keep the RoPE tables fp32 whatever the weight dtype
    return model


# ======================================================================================== HF format

HF_WEIGHTS = "model.safetensors"


def _hf_name(key: str) -> str:
    """``LlamaModel`` state-dict name -> HF ``LlamaForCausalLM`` name (the head sits outside ``model.``)."""
    return key if key == "lm_head.weight" else f"model.{key}"


def save_hf(model: LlamaModel, path: str | Path) -> Path:
    """Write ``model`` as an HF Llama directory: ``config.json`` (``LlamaConfig.to_hf``, indexer fields included)
    and ``model.safetensors`` in HF names. The indexers go along as ``model.layers.{i}.indexer.*`` (HF's
    ``LlamaForCausalLM`` ignores them), so an RL- or sparsify-trained model reloads exactly with
    ``dsv32.load_model(path)``. Files are written under temporary names and renamed into place."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {_hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (HF_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    cfg_tmp = out / "config.json.tmp"
    cfg_tmp.write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")
    tmp.replace(out / HF_WEIGHTS)
    cfg_tmp.replace(out / "config.json")
    return out


def is_hf_llama(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` declares ``model_type: llama``."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "llama"


def load_hf(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LlamaModel:
    """Read what :func:`save_hf` writes (or a plain HF Llama checkpoint in one safetensors file, whose missing
    indexers are then random, seeded 0). Every non-indexer tensor must be present with its exact shape."""
    path = Path(path)
    cfg = LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    weights = path / HF_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {HF_WEIGHTS} (sharded HF Llama checkpoints are not supported)")
    sd = {k.removeprefix("model."): v for k, v in load_file(str(weights)).items()}
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.to_empty(device="cpu")
    own = model.state_dict()
    unknown = sorted(set(sd) - set(own))
    if unknown:
        raise ValueError(f"{weights}: tensors {unknown[:4]} are not in a LlamaModel of this config.json")
    missing = sorted(k for k in own if k not in sd)
    if any(".indexer." not in k for k in missing):
        raise ValueError(f"{weights}: missing tensors {[k for k in missing if '.indexer.' not in k][:4]}")
    with torch.no_grad():
        if missing:
            model.reset_indexer(0)
        copy_exact({k: own[k] for k in sd}, sd, where=str(weights))
    model = model.to(device=device, dtype=dtype).eval()
    model.reset_buffers()  # RoPE tables in fp32 whatever the weight dtype
    return model
