"""Reference DSA ops: slow, obviously right. The oracle every fast path (``cpu.py``, ``triton.py``) is tested against.

Pure functions on tensors (no modules, no configs). Shape legend:
    B batch, S queries, T keys (context), H attention heads, HI indexer heads, dI indexer head dim,
    Dqk query/key dim (absorbed MLA: kv_lora_rank + rope dims), K top-k, Hkv KV heads (GQA).

Conventions (design.md, "DSA ops"):
- ``q_pos[b, s]`` is the absolute position of query s; key t is visible to it iff ``t <= q_pos[b, s]``.
- ``idx`` entries are key positions; ``-1`` marks an empty slot (a row with fewer than K visible keys).
- Ties in the indexer score are broken toward the lower position (a stable descending sort).
"""

from __future__ import annotations

import torch

# Queries per block in the chunked reference top-k: bounds memory to chunk x T scores.
DEFAULT_QUERY_CHUNK = 256


def indexer_scores(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, *, k_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Lightning-indexer logits ``I[b,s,t] = sum_j w[b,s,j] * relu(q[b,s,j] . k[b,t])`` (paper eq. 1).

    q [B,S,HI,dI], w [B,S,HI] (all constant scales already folded in), k [B,T,dI],
    k_scale [B,T] optional per-key dequantisation scale (FP8 cache) -> I [B,S,T] fp32, no causal mask.
    """
    q, w, k = q.float(), w.float(), k.float()
    if k_scale is not None:
        k = k * k_scale.float().unsqueeze(-1)
    logits = torch.einsum("bshd,btd->bsht", q, k)  # [B,S,HI,T]
    return torch.einsum("bsht,bsh->bst", torch.relu(logits), w)  # [B,S,T]


def causal_mask(q_pos: torch.Tensor, T: int) -> torch.Tensor:
    """[B,S,T] bool: key t visible to query s iff t <= q_pos[b,s]."""
    t = torch.arange(T, device=q_pos.device)
    return t.view(1, 1, T) <= q_pos.unsqueeze(-1)


def topk_from_scores(scores: torch.Tensor, visible: torch.Tensor, topk: int) -> torch.Tensor:
    """Deterministic top-k over the visible keys of each row -> idx [B,S,topk] int32 (-1 padded).

    A stable descending sort keeps equal scores in position order, so ties go to the lower position.
    """
    T = scores.shape[-1]
    masked = scores.masked_fill(~visible, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices  # [B,S,T]
    if T < topk:
        pad = order.new_full((*order.shape[:-1], topk - T), -1)
        order = torch.cat([order, pad], dim=-1)
    idx = order[..., :topk]
    n_visible = visible.sum(-1, keepdim=True)  # [B,S,1]
    rank = torch.arange(topk, device=idx.device).view(1, 1, topk)
    return torch.where(rank < n_visible, idx, torch.full_like(idx, -1)).to(torch.int32)


def indexer_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    q_pos: torch.Tensor,
    topk: int,
    chunk: int = DEFAULT_QUERY_CHUNK,
    ordered: bool = True,
) -> torch.Tensor:
    """Top-k key positions per query by indexer score, computed ``chunk`` queries at a time.

    q [B,S,HI,dI], w [B,S,HI], k [B,T,dI], q_pos [B,S] -> idx [B,S,topk] int32, -1 where fewer than
    ``topk`` keys are visible. Never builds the whole [S,T] score tensor for long inputs. ``ordered`` is part of
    the common interface; the reference always returns the canonical (score desc, position asc) order.
    """
    B, S = q.shape[:2]
    T = k.shape[1]
    out = []
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        scores = indexer_scores(q[:, s0:s1], w[:, s0:s1], k, k_scale=k_scale)  # [B,C,T]
        out.append(topk_from_scores(scores, causal_mask(q_pos[:, s0:s1], T), topk))
    return torch.cat(out, dim=1) if out else q.new_empty((B, 0, topk), dtype=torch.int32)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B,T,...], idx [B,S,K] (>= 0) -> [B,S,K,...]."""
    B, S, K = idx.shape
    flat = idx.reshape(B, S * K).long()
    g = torch.gather(x, 1, flat.view(B, S * K, *([1] * (x.dim() - 2))).expand(B, S * K, *x.shape[2:]))
    return g.view(B, S, K, *x.shape[2:])


def _masked_softmax_out(scores: torch.Tensor, valid: torch.Tensor, values_fn) -> tuple[torch.Tensor, torch.Tensor]:
    scores = scores.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [...]
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - safe_lse.unsqueeze(-1))  # exp(-inf) = 0 on masked slots
    return values_fn(p), lse


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, *, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention in MLA's absorbed (MQA) form over gathered latent rows (paper §2.1, FlashMLA's layout).

    q [B,S,H,Dqk], kv [B,T,Dqk] (one shared latent key per token; its first ``v_dim`` dims are the value),
    idx [B,S,K] -> out [B,S,H,v_dim] (zeros for a row with no valid key), lse [B,S,H] (natural log,
    -inf for such rows). Differentiable in q and kv.
    """
    valid = idx >= 0  # [B,S,K]
    kv_sel = _gather_rows(kv, idx.clamp_min(0))  # [B,S,K,Dqk]
    scores = torch.einsum("bshd,bskd->bshk", q.float(), kv_sel.float()) * scale  # [B,S,H,K]
    out, lse = _masked_softmax_out(
        scores,
        valid.unsqueeze(2),
        lambda p: torch.einsum("bshk,bskv->bshv", p, kv_sel[..., :v_dim].float()),
    )
    return out.to(q.dtype), lse


def sparse_gqa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse GQA attention for Llama-family models: every head of a query attends to the same selected keys.

    q [B,S,H,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv], idx [B,S,K] -> out [B,S,H,Dv], lse [B,S,H].
    """
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    valid = idx >= 0
    k_sel = _gather_rows(k, idx.clamp_min(0))  # [B,S,K,Hkv,D]
    v_sel = _gather_rows(v, idx.clamp_min(0))  # [B,S,K,Hkv,Dv]
    qg = q.float().view(B, S, Hkv, g, D)
    scores = torch.einsum("bsngd,bsknd->bsngk", qg, k_sel.float()) * scale  # [B,S,Hkv,g,K]
    out, lse = _masked_softmax_out(
        scores,
        valid.view(B, S, 1, 1, -1),
        lambda p: torch.einsum("bsngk,bsknv->bsngv", p, v_sel.float()),
    )
    return out.reshape(B, S, H, -1).to(q.dtype), lse.reshape(B, S, H)


def dense_mla(
    q: torch.Tensor, kv: torch.Tensor, q_pos: torch.Tensor, *, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention in the absorbed form: q [B,S,H,Dqk], kv [B,T,Dqk] -> (out, lse)."""
    T = kv.shape[1]
    scores = torch.einsum("bshd,btd->bsht", q.float(), kv.float()) * scale  # [B,S,H,T]
    visible = causal_mask(q_pos, T).unsqueeze(2)  # [B,S,1,T]
    out, lse = _masked_softmax_out(
        scores, visible, lambda p: torch.einsum("bsht,btv->bshv", p, kv[..., :v_dim].float())
    )
    return out.to(q.dtype), lse
