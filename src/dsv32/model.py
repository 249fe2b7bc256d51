"""DeepSeek-V3.2 in one readable file: RMSNorm, YaRN RoPE, MLA (MHA and absorbed forms), the lightning indexer
(DSA), DeepSeekMoE, dense FFN, decoder block, MTP module and the model.

Paper map: V3.2 = V3.1-Terminus (DeepSeek-V3 architecture: MLA §2.1.1, DeepSeekMoE §2.1.2, MTP §2.2 of the V3
report) + DeepSeek Sparse Attention (V3.2 paper §2.1: a lightning indexer scores earlier tokens, each query
attends to its top-k). Exact math, constants and decisions: ``docs/design.md``.

Shape legend:
    B batch, S new tokens (queries), T context tokens (keys), D hidden_size, V vocab,
    H attention heads, Dn qk_nope_head_dim, R qk_rope_head_dim, Dv v_head_dim, Dl kv_lora_rank, Dq q_lora_rank,
    HI indexer heads, dI indexer head dim, K top-k, E routed experts, I expert intermediate size, N = B*S tokens.

Parameter names mirror the HF checkpoint (minus the ``model.`` prefix) so checkpoint I/O is a renaming-free copy,
except the routed experts, which are stacked per layer ([E, ...]) so MoE runs batched by expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv32 import ops
from dsv32.cache import MLACache
from dsv32.config import ModelConfig
from dsv32.quant import fp8_roundtrip, hadamard_matrix

# ======================================================================================== norms


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (the reference keeps norm weights in fp32 too)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm with bias computed in fp32: the indexer's ``k_norm`` (eps 1e-6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


# ======================================================================================== RoPE (YaRN)


def yarn_correction_range(cfg: ModelConfig) -> tuple[float, float]:
    """Pair indices (low, high) between which YaRN blends original and interpolated frequencies.

    A pair keeps its frequency when it turns more than ``beta_fast`` times over the original context and is
    fully interpolated below ``beta_slow`` turns. For V3.2 (R=64, base 1e4, 4096, 32/1): (10, 23).
    """
    y = cfg.yarn
    assert y is not None
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    orig = int(y["original_max_position_embeddings"])

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(float(y.get("beta_fast", 32)))), 0)
    high = min(math.ceil(correction_dim(float(y.get("beta_slow", 1)))), dim - 1)
    return float(low), float(high) if high != low else high + 0.001  # avoid a zero-width ramp


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies [R/2] with DeepSeek's YaRN blend (V3 report §2.1.1; DeepSeek's reference code).

    Frequencies of pairs below ``low`` are kept, those above ``high`` are divided by ``factor``, and the ones
    in between are blended linearly. mscale is not applied here: it goes into the softmax scale only.
    """
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.yarn is None:
        return freqs
    low, high = yarn_correction_range(cfg)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    return freqs / float(cfg.yarn["factor"]) * (1 - smooth) + freqs * smooth


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B,S] -> cos, sin [B,S,R/2] (fp32)."""
    angles = positions.float().unsqueeze(-1) * inv_freq  # [B,S,R/2]
    return angles.cos(), angles.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """MLA RoPE: rotate pairs (2i, 2i+1) as complex numbers. x [B,S,(H,)R], cos/sin [B,S,R/2]."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Indexer RoPE (the fixed V3.2 release): non-interleaved, pairs (i, i + R/2), rotate-half/NeoX style."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    xf = x.float()
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# ======================================================================================== lightning indexer


class Indexer(nn.Module):
    """DSA lightning indexer (V3.2 paper §2.1, eq. 1): ``I[t,s] = sum_j w[t,j] * ReLU(q[t,j] . k[s])``.

    It reuses MLA's query latent ``c_q``; one key per token is shared by all indexer heads (MQA), so its cache
    is a single dI-vector per token. Constant scales dI^-0.5 and HI^-0.5 are folded into the head weights w.
    Optional Hadamard rotation + FP8 simulation of q/k reproduce the reference's selection exactly; without
    them the scores are the same up to FP8 rounding (the rotation is orthonormal).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.hadamard, self.fp8 = cfg.indexer_hadamard, cfg.indexer_fp8
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = FP32LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)  # kept and run in fp32
        self.scale = self.head_dim**-0.5 * self.n_heads**-0.5

    def _rotate_quantise(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard:
            x = x @ hadamard_matrix(self.head_dim, dtype=x.dtype, device=x.device)
        if self.fp8:
            x = fp8_roundtrip(x, 128)
        return x

    def forward(
        self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,S,D], c_q [B,S,Dq] -> q [B,S,HI,dI], w [B,S,HI] (scales folded in), k [B,S,dI]."""
        B, S, _ = x.shape
        R = self.rope_dim
        q = self.wq_b(c_q).view(B, S, self.n_heads, self.head_dim)  # [B,S,HI,dI]
        q = torch.cat([apply_rope_half(q[..., :R], cos, sin), q[..., R:]], dim=-1)  # RoPE on the FIRST R dims
        k = self.k_norm(self.wk(x))  # [B,S,dI]
        k = torch.cat([apply_rope_half(k[..., :R], cos, sin), k[..., R:]], dim=-1)
        q, k = self._rotate_quantise(q), self._rotate_quantise(k)
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.scale  # [B,S,HI] fp32
        return q, w, k


# ======================================================================================== MLA + DSA


def gather_keys(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-query key rows: x [B,T,...], idx [B,C,K] (>= 0) -> [B,C,K,...]."""
    B, C, K = idx.shape
    flat = idx.reshape(B, C * K).long()
    g = torch.gather(x, 1, flat.view(B, C * K, *([1] * (x.dim() - 2))).expand(B, C * K, *x.shape[2:]))
    return g.view(B, C, K, *x.shape[2:])


@dataclass
class AttnAux:
    """What one attention layer exposes for training diagnostics (sparsify) when asked.

    The ``main_*`` / ``sparse_lse`` views give the main attention's logits in the absorbed MLA form (one shared
    latent key per token); ``llama.LlamaAttnAux`` has the same methods for GQA, so the indexer loss
    (``train/indexer_loss.py``) works on either without a type test. The views detach: they are KL targets.
    """

    index_q: torch.Tensor  # [B,S,HI,dI]
    index_w: torch.Tensor  # [B,S,HI]
    index_k: torch.Tensor  # [B,T,dI]
    topk_idx: torch.Tensor | None  # [B,S,K] or None when every visible key was attended
    q_latent: torch.Tensor  # [B,S,H,Dl+R] absorbed queries
    kv_latent: torch.Tensor  # [B,T,Dl+R]
    q_pos: torch.Tensor  # [B,S]
    scale: float

    @property
    def num_heads(self) -> int:
        return self.q_latent.shape[2]

    def main_logits(self, sl: slice | torch.Tensor) -> torch.Tensor:
        """Main attention logits (scaled, unmasked) of the queries ``sl`` over every key -> [B,H,C,T] fp32.

        Head-major, so the product is one batched GEMM written in place (no copy of the [C,T] blocks).
        """
        q, kv = self.q_latent[:, sl].detach().float(), self.kv_latent.detach().float()  # [B,C,H,D], [B,T,D]
        B, C, H, D = q.shape
        out = torch.bmm(q.transpose(1, 2).reshape(B, H * C, D), kv.transpose(1, 2))  # [B,H*C,T]
        return out.view(B, H, C, -1).mul_(self.scale)

    def main_logits_at(self, sl: slice | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Main attention logits of the queries ``sl`` at the keys ``idx`` [B,C,K] (>= 0) -> [B,C,H,K] fp32."""
        kv_sel = gather_keys(self.kv_latent.detach().float(), idx)  # [B,C,K,D]
        return torch.einsum("bshd,bskd->bshk", self.q_latent[:, sl].detach().float(), kv_sel) * self.scale

    @torch.no_grad()
    def sparse_lse(self, sl: slice | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Per-head log-sum-exp over the selected keys ``idx`` [B,C,K], from the sparse op itself -> [B,C,H]."""
        q, kv = self.q_latent[:, sl].detach(), self.kv_latent.detach()
        return ops.sparse_mla(q, kv, idx, v_dim=1, scale=self.scale)[1].float()  # only lse is used


MASKED_QUERY_BLOCK = 256  # masked DSA form: query rows per SDPA call, each with keys cut at its last row
ABSORBED_QUERY_BYTES = 1 << 30  # absorbed form: fp32 bytes of one query chunk's latent queries + outputs


class Attention(nn.Module):
    """Multi-head Latent Attention with DSA (V3 report §2.1.1; V3.2 paper §2.1).

    Two equivalent forms:
    - MHA form (training / dense prefill): decompress every context token's latent into per-head K/V.
    - absorbed MQA form (decode, and every sparse path): fold W_UK into the query and W_UV into the output so
      attention runs directly over the cached 576-d latent rows, shared by all heads — the form DSA is
      instantiated on (paper §2.1) and that FlashMLA's sparse kernels use.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim, self.kv_rank = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # latent norms: eps fixed at 1e-6 (reference, HF)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.indexer = Indexer(cfg)
        self.softmax_scale = cfg.softmax_scale

    # -------------------------------------------------------------- absorbed-form weights
    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        return w[:, : self.nope], w[:, self.nope :]  # W_UK [H,Dn,Dl], W_UV [H,Dv,Dl]

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        cache: MLACache | None = None,
        layer_id: int = 0,
        cache_rows: torch.Tensor | None = None,
        use_dsa: bool = True,
        topk: int | None = None,
        form: str = "auto",
        want_aux: bool = False,
    ) -> tuple[torch.Tensor, AttnAux | None]:
        """x [B,S,D], positions [B,S] -> out [B,S,D] (and diagnostics when ``want_aux``)."""
        B, S, _ = x.shape
        H, R = self.n_heads, self.rope
        # --- queries
        c_q = self.q_a_layernorm(self.q_a_proj(x))  # [B,S,Dq]
        q = self.q_b_proj(c_q).view(B, S, H, self.nope + R)
        q_nope, q_pe = q[..., : self.nope], apply_rope_interleaved(q[..., self.nope :], cos, sin)  # RoPE on LAST R
        # --- this step's latent rows and indexer keys
        kv = self.kv_a_proj_with_mqa(x)  # [B,S,Dl+R]
        c_kv = self.kv_a_layernorm(kv[..., : self.kv_rank])
        if self.cfg.mla_cache_fp8:
            c_kv = fp8_roundtrip(c_kv, 128)  # the final reference caches an FP8 round-trip of c_kv
        k_pe = apply_rope_interleaved(kv[..., self.kv_rank :], cos, sin)  # [B,S,R]
        latent = torch.cat([c_kv, k_pe], dim=-1)  # [B,S,Dl+R]
        iq, iw, ik = self.indexer(x, c_q, cos, sin)
        # --- context (cache or this call only)
        if cache is not None:
            cache.update(layer_id, latent, ik, positions, cache_rows)
            T = int(positions.max()) + 1
            latent_ctx, ik_ctx, ik_scale = cache.read(layer_id, T, cache_rows)
        else:
            T = S
            latent_ctx, ik_ctx, ik_scale = latent, ik, None
        # --- DSA selection: only needed when some query sees more than k keys
        k_sel = topk if topk is not None else self.cfg.index_topk
        need_sparse = use_dsa and int(positions.max()) + 1 > k_sel
        if form == "auto":
            if need_sparse and S > 1 and T <= self.cfg.masked_mha_max_len:
                form = "masked"
            else:
                form = "absorbed" if (need_sparse or (cache is not None and S == 1)) else "mha"
        idx = None
        if need_sparse:  # [B,S,K]; a mask needs only the set, not the canonical order
            idx = ops.indexer_topk(iq, iw, ik_ctx, k_scale=ik_scale, q_pos=positions, topk=k_sel,
                                   ordered=form != "masked")
        # --- attention
        w_uk, w_uv = self._w_uk_uv()
        q_lat = None
        if form in ("mha", "masked"):
            if idx is not None and form == "mha":
                raise ValueError("form='mha' with sparse selection: use form='absorbed' or 'masked'")
            o = self._mha(q_nope, q_pe, latent_ctx, positions, T, idx)  # [B,S,H,Dv]
        else:
            # queries in chunks: a 128K-token prefill's [B,S,H,Dl+R] absorbed queries and [B,S,H,Dl] fp32 latent
            # outputs would be 38 + 34 GB at once; per chunk they stay under ABSORBED_QUERY_BYTES
            C = max(1, ABSORBED_QUERY_BYTES // (4 * B * H * (2 * self.kv_rank + R)))
            outs = []
            for s0 in range(0, S, C):
                sl = slice(s0, min(S, s0 + C))
                q_lat = torch.cat([torch.einsum("bshn,hnl->bshl", q_nope[:, sl], w_uk), q_pe[:, sl]], dim=-1)
                if idx is not None:  # q_lat [B,C,H,Dl+R]
                    o_lat, _ = ops.sparse_mla(q_lat, latent_ctx, idx[:, sl], v_dim=self.kv_rank,
                                              scale=self.softmax_scale)
                else:
                    o_lat, _ = ops.dense_mla(q_lat, latent_ctx, positions[:, sl], v_dim=self.kv_rank,
                                             scale=self.softmax_scale)
                outs.append(torch.einsum("bshl,hvl->bshv", o_lat, w_uv))  # [B,C,H,Dv]
            o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # [B,S,H,Dv]
            q_lat = q_lat if len(outs) == 1 else None  # (want_aux rebuilds the whole one below)
        out = self.o_proj(o.reshape(B, S, H * self.v_dim))
        aux = None
        if want_aux:
            if q_lat is None:
                q_lat = torch.cat([torch.einsum("bshn,hnl->bshl", q_nope, w_uk), q_pe], dim=-1)
            aux = AttnAux(iq, iw, ik_ctx if ik_scale is None else ik_ctx.float() * ik_scale.unsqueeze(-1),
                          idx, q_lat, latent_ctx, positions, self.softmax_scale)
        return out, aux

    def _mha(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent_ctx: torch.Tensor,
        positions: torch.Tensor,
        T: int,
        idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Dense MHA form: expand the context latents to per-head K/V and run SDPA. Returns [B,S,H,Dv].

        With ``idx`` [B,S,K] (DSA selection, -1 = empty) each query sees only its selected keys: masked MHA,
        equal to the gathered absorbed form (tested) at dense cost — cheaper than gathering for short contexts.
        """
        B, S, H, _ = q_nope.shape
        kv = self.kv_b_proj(latent_ctx[..., : self.kv_rank]).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv[..., : self.nope], kv[..., self.nope :]
        k_pe = latent_ctx[..., self.kv_rank :].unsqueeze(2).expand(B, T, H, self.rope)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B,H,S,Dn+R]
        k = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)  # [B,H,T,Dn+R]
        v = v.transpose(1, 2)  # [B,H,T,Dv]
        Dqk = q.shape[-1]
        if self.v_dim < Dqk:  # equal head dims let SDPA use its flash kernel (CPU too) instead of the math one
            v = F.pad(v, (0, Dqk - self.v_dim))
        trivially_causal = S == T and bool((positions == torch.arange(S, device=positions.device)).all())
        if idx is not None:
            sel = torch.zeros(B, S, T + 1, dtype=torch.bool, device=q.device)  # column T catches the -1 slots
            sel.scatter_(2, torch.where(idx < 0, T, idx).long(), True)
            mask = sel[..., :T].unsqueeze(1)  # [B,1,S,T]
            if trivially_causal and S > MASKED_QUERY_BLOCK:
                # query rows [r0, r1) select only among keys < r1: cut each block's keys there, so the
                # masked form skips most of the causal upper triangle (0.63 of the full S x T at 4 blocks)
                o = torch.cat([
                    F.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1],
                                                   attn_mask=mask[..., r0:r1, :r1], scale=self.softmax_scale)
                    for r0, r1 in ((r, min(r + MASKED_QUERY_BLOCK, S)) for r in range(0, S, MASKED_QUERY_BLOCK))
                ], dim=2)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        elif trivially_causal:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            mask = ops.reference.causal_mask(positions, T).unsqueeze(1)  # [B,1,S,T]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return o[..., : self.v_dim].transpose(1, 2)


# ======================================================================================== FFN / MoE


class MLP(nn.Module):
    """SwiGLU FFN: dense layers and the shared experts. ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """DeepSeekMoE router, ``noaux_tc`` (V3 report §2.1.2): sigmoid affinities; the correction bias steers the
    choice of experts only (auxiliary-loss-free balancing), never their weights. Group-limited: keep the
    ``topk_group`` groups with the largest sum of their top-2 biased scores, then pick the top-k experts."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(
        self, x: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N,D] -> (weights [N,K], expert ids [N,K] int64, affinities [N,E]); ``forced`` fixes the ids."""
        cfg = self.cfg
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # [N,E] fp32 "original scores"
        if forced is None:
            biased = scores.detach() + self.e_score_correction_bias  # selection only
            N, E, G = biased.shape[0], cfg.n_routed_experts, cfg.n_group
            if G > 1:
                grouped = biased.view(N, G, E // G)
                per = min(2, E // G)
                group_score = grouped.topk(per, dim=-1).values.sum(-1)  # [N,G]
                keep = group_score.topk(cfg.topk_group, dim=-1).indices
                group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
                biased = biased.masked_fill(~group_mask.repeat_interleave(E // G, dim=1), float("-inf"))
            ids = biased.topk(cfg.num_experts_per_tok, dim=-1).indices  # [N,K]
        else:
            ids = forced.to(device=x.device, dtype=torch.long)
        w = scores.gather(1, ids)  # unbiased affinities
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * cfg.routed_scaling_factor, ids, scores


class Experts(nn.Module):
    """Routed experts stacked as [E, ...] tensors; computed batched by expert (tokens grouped per expert)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N,D], weights/ids [N,K] -> [N,D]."""
        N, K = ids.shape
        flat = ids.reshape(-1)  # [N*K]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        token_of = order // K  # token index of each sorted (token, slot) pair
        xs = x[token_of]  # [N*K,D] grouped by expert
        ws = weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        # unbind once: indexing a stacked parameter per expert would make each expert's backward write a
        # full-size zero gradient; unbind's backward stacks the per-expert gradients once
        w1, w3, w2 = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
        # split, not per-expert slices: a slice's backward writes a zero-filled [N*K,D] gradient per expert,
        # split's backward is one concatenation
        ys = []
        for e, (xe, we) in enumerate(zip(xs.split(counts), ws.split(counts), strict=True)):
            if counts[e] == 0:
                continue
            h = F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())
            ys.append((h @ w2[e].t()) * we)
        out = torch.zeros_like(x)
        return out.index_add_(0, token_of, torch.cat(ys)) if ys else out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(
        self, x: torch.Tensor, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,S,D] -> (out [B,S,D], expert ids [N,K], affinities [N,E])."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        w, ids, scores = self.gate(flat, forced)
        out = self.experts(flat, w, ids) + self.shared_experts(flat)
        return out.view(shape), ids, scores


# ======================================================================================== blocks


class Block(nn.Module):
    """Pre-norm decoder layer: ``h = x + MLA(norm(x)); out = h + FFN(norm(h))``."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.mlp: nn.Module = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        a, aux = self.self_attn(
            self.input_layernorm(x),
            ctx.positions,
            ctx.cos,
            ctx.sin,
            cache=ctx.cache,
            layer_id=self.layer_id,
            cache_rows=ctx.cache_rows,
            use_dsa=ctx.use_dsa,
            topk=ctx.topk,
            form=ctx.form,
            want_aux=ctx.want_aux,
        )
        if aux is not None:
            ctx.aux.append(aux)
        h = x + a
        f = self.post_attention_layernorm(h)
        if self.is_moe:
            forced = ctx.forced_routes[ctx.moe_i] if ctx.forced_routes is not None else None
            f, ids, scores = self.mlp(f, forced)
            ctx.moe_i += 1
            ctx.routes.append(ids)
            if ctx.want_scores:
                ctx.router_scores.append(scores)
        else:
            f = self.mlp(f)
        return h + f


class MTPLayer(Block):
    """Multi-token prediction module (V3 report §2.2): combines the main model's hidden state at t with the
    embedding of token t+1, runs one full decoder layer and predicts token t+2 through the shared head."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__(cfg, layer_id)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward_mtp(
        self, h: torch.Tensor, next_emb: torch.Tensor, ctx: _Ctx
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B,S,D] previous depth's hidden (before any final norm), next_emb [B,S,D] = embed(token t+1+j)
        -> (this depth's hidden [B,S,D] for the next depth, its ``shared_head.norm`` [B,S,D] for logits).

        Every parameter of the module is used inside this one call (FSDP2 gathers them around it)."""
        x = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(h)], dim=-1))
        h = super().forward(x, ctx)
        return h, self.shared_head.norm(h)


# ======================================================================================== model


class _Ctx:
    """Per-forward state threaded through the blocks (positions, RoPE tables, cache, options, outputs).

    A plain class, not a dataclass: FSDP2 rebuilds dataclass arguments that hold grad-requiring tensors
    (to hook them), and the blocks' appends to ``routes``/``router_scores``/``aux`` would land in the copy.
    """

    def __init__(self, *, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: MLACache | None,
                 cache_rows: torch.Tensor | None, use_dsa: bool, topk: int | None, form: str, want_aux: bool,
                 want_scores: bool, forced_routes: list[torch.Tensor] | None, moe_i: int = 0) -> None:
        self.positions, self.cos, self.sin = positions, cos, sin
        self.cache, self.cache_rows = cache, cache_rows
        self.use_dsa, self.topk, self.form = use_dsa, topk, form
        self.want_aux, self.want_scores = want_aux, want_scores
        self.forced_routes, self.moe_i = forced_routes, moe_i
        self.routes: list[torch.Tensor] = []
        self.router_scores: list[torch.Tensor] = []
        self.aux: list[AttnAux] = []


@dataclass
class ForwardOutput:
    """Returned by ``Transformer.forward`` when any ``return_*`` extra is set."""

    logits: torch.Tensor | None  # [B,S,V] ([B,1,V] with last_only; None with compute_logits=False)
    hidden: torch.Tensor | None = None  # [B,S,D] after the final norm
    routes: list[torch.Tensor] | None = None  # per MoE layer (MTP last): expert ids [N,K]
    router_scores: list[torch.Tensor] | None = None  # per MoE layer: sigmoid affinities [N,E] (balance loss)
    indexer: list[AttnAux] | None = None  # per layer
    mtp_hidden: list[torch.Tensor] | None = None  # per MTP module: [B,S-1-j,D] (normed) predicting t+2+j


class Transformer(nn.Module):
    """DeepSeek-V3.2: embeddings, ``num_hidden_layers`` blocks, final norm, LM head, optional MTP modules.

    Model protocol (docs/design.md): ``model(input_ids) -> logits [B,S,V]``; ``model.forward(input_ids, cache=...,
    positions=..., last_only=..., **extras)``; ``model.new_cache(batch_size, max_len)``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(  # _weight: skip nn.Embedding's own init (slow on meta)
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            [MTPLayer(cfg, cfg.num_hidden_layers + j) for j in range(cfg.num_nextn_predict_layers)]
        )
        self.register_buffer("inv_freq", yarn_inv_freq(cfg), persistent=False)
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_parameters()

    # -------------------------------------------------------------- set-up
    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device and ``to_empty``)."""
        self.inv_freq = yarn_inv_freq(self.config).to(self.embed_tokens.weight.device)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Random init: normal(0, initializer_range) for matrices, ones for norms, zero biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for m in self.modules():
            if isinstance(m, Gate):
                m.e_score_correction_bias.zero_()

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(
        self, batch_size: int, max_len: int, *, index_fp8: bool | None = None, dtype: torch.dtype | None = None
    ) -> MLACache:
        """Inference state for ``batch_size`` rows of up to ``max_len`` tokens each (main layers only)."""
        cfg = self.config
        return MLACache(
            num_layers=cfg.num_hidden_layers,
            batch_size=batch_size,
            max_len=max_len,
            latent_dim=cfg.kv_lora_rank + cfg.qk_rope_head_dim,
            index_dim=cfg.index_head_dim,
            dtype=dtype or self.embed_tokens.weight.dtype,
            device=self.embed_tokens.weight.device,
            index_fp8=cfg.indexer_fp8 if index_fp8 is None else index_fp8,
        )

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    # -------------------------------------------------------------- forward
    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.head_weight).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: MLACache | None = None,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
        cache_rows: torch.Tensor | None = None,
        dense: bool = False,
        topk: int | None = None,
        form: str = "auto",
        forced_routes: list[torch.Tensor] | None = None,
        compute_logits: bool = True,
        return_hidden: bool = False,
        return_routes: bool = False,
        return_router_scores: bool = False,
        return_indexer: bool = False,
        return_mtp: bool = False,
    ) -> torch.Tensor | ForwardOutput:
        """input_ids [B,S] -> logits [B,S,V] (fp32), or a ``ForwardOutput`` when any ``return_*`` is set.

        cache/positions: with a cache, tokens are written at ``positions`` [B,S] (default: appended after each
        row's length); ``cache_rows`` [B] maps input rows to cache slots. ``dense`` turns DSA off for this call;
        ``topk`` overrides ``index_topk``; ``form`` forces "mha", "masked" (DSA as masked MHA) or "absorbed".
        ``forced_routes`` replays recorded MoE routes (RL "Keep Routing"); MTP routes come last.
        """
        B, S = input_ids.shape
        if positions is None:
            if cache is not None:
                positions = cache.positions_for(S, cache_rows)
            else:
                positions = torch.arange(S, device=input_ids.device).unsqueeze(0).expand(B, S)
        if cache is not None:
            cache.check_positions(positions)
            if return_mtp:
                raise ValueError("return_mtp is a training output; it is not computed with a cache")
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        want_extra = return_hidden or return_routes or return_router_scores or return_indexer or return_mtp
        ctx = _Ctx(
            positions=positions,
            cos=cos,
            sin=sin,
            cache=cache,
            cache_rows=cache_rows,
            use_dsa=self.config.use_dsa and not dense,
            topk=topk,
            form=form,
            want_aux=return_indexer,
            want_scores=return_router_scores,
            forced_routes=forced_routes,
        )
        x = self.embed_tokens(input_ids)  # [B,S,D]
        for layer in self.layers:
            x = layer(x, ctx)
        if cache is not None:
            cache.advance(positions, cache_rows)
        h = self.norm(x)
        mtp_hidden = None
        if return_mtp:
            mtp_hidden = self._mtp(x, input_ids, ctx)
        hl = h[:, -1:] if last_only else h
        logits = self.logits_from_hidden(hl) if compute_logits else None
        if not want_extra:
            return logits
        return ForwardOutput(
            logits=logits,
            hidden=h if return_hidden else None,
            routes=ctx.routes if return_routes else None,
            router_scores=ctx.router_scores if return_router_scores else None,
            indexer=ctx.aux if return_indexer else None,
            mtp_hidden=mtp_hidden,
        )

    def _mtp(self, x: torch.Tensor, input_ids: torch.Tensor, ctx: _Ctx) -> list[torch.Tensor]:
        """Run the MTP modules in sequence (depth j predicts token t+2+j from position t)."""
        outs = []
        h = x
        for j, m in enumerate(self.mtp):
            S = h.shape[1] - 1
            if S <= 0:
                break
            sub = _Ctx(
                positions=ctx.positions[:, :S],
                cos=ctx.cos[:, :S],
                sin=ctx.sin[:, :S],
                cache=None,
                cache_rows=None,
                use_dsa=ctx.use_dsa,
                topk=ctx.topk,
                form=ctx.form,
                want_aux=False,
                want_scores=ctx.want_scores,
                forced_routes=ctx.forced_routes,
                moe_i=ctx.moe_i,
            )
            next_emb = self.embed_tokens(input_ids[:, 1 + j : 1 + j + S])
            h, normed = m.forward_mtp(h[:, :S], next_emb, sub)
            ctx.routes.extend(sub.routes)
            ctx.router_scores.extend(sub.router_scores)
            ctx.moe_i = sub.moe_i
            outs.append(normed)
        return outs
