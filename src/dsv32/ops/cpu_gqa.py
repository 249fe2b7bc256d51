"""Chunked CPU ``sparse_gqa`` for Llama-family DSA models: the reference math, a block of queries at a time.

The reference gathers the selected K/V rows for every query at once ([B,S,K,Hkv,D]: 1.4 GB per layer for
SmolLM2 at S=3.6K, K=512); here queries run in blocks sized to a fixed byte budget, and under autograd each
block is recomputed in backward (activation checkpointing), so memory stays bounded at any length.
Shapes as in ``reference.sparse_gqa``: q [B,S,H,D], k [B,T,Hkv,D], v [B,T,Hkv,Dv], idx [B,S,K].
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dsv32.ops import reference

# bytes of gathered K+V rows per query block (fp32)
BLOCK_BYTES = 64 * 2**20


def _rows_per_block(K: int, Hkv: int, D: int, Dv: int, B: int) -> int:
    per_query = B * K * Hkv * (D + Dv) * 4
    return max(1, BLOCK_BYTES // max(per_query, 1))


def sparse_gqa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, H, D = q.shape
    C = _rows_per_block(idx.shape[-1], k.shape[2], D, v.shape[-1], B)
    if C >= S:
        return reference.sparse_gqa(q, k, v, idx, scale=scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs, lses = [], []
    for s0 in range(0, S, C):
        qs, ids = q[:, s0 : s0 + C], idx[:, s0 : s0 + C]
        if grad:
            o, lse = checkpoint(
                lambda a, b, c, d: reference.sparse_gqa(a, b, c, d, scale=scale), qs, k, v, ids, use_reentrant=False
            )
        else:
            o, lse = reference.sparse_gqa(qs, k, v, ids, scale=scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)
