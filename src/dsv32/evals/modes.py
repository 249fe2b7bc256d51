"""Attention modes of the evaluations (V3.2 paper §2.1 and the comparisons of docs/sparsify.md).

- ``dense``: full causal attention (DSA off);
- ``topk``: DSA, each query attends to its indexer top-k keys (the model's indexer: trained, or random);
- ``window``: the same sparse op with a forced selection, 4 sink tokens + the last k-4 keys (``window_idx``,
  installed with ``ops.override``), the baseline a trained indexer must beat.

``sparse_impl="masked"`` runs Llama-family sparse attention as SDPA under the selection mask
(``masked_sparse_gqa``): the same keys and softmax, faster on CPU. ``mode_context`` sets both up.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from dsv32 import ops
from dsv32.llama import masked_sparse_attention


def attention_mode(args: Any) -> tuple[str, int | None]:
    """("dense" | "topk" | "window", k) from the mutually exclusive CLI flags (default: dense)."""
    if getattr(args, "window", None):
        return "window", int(args.window)
    if getattr(args, "topk", None):
        return "topk", int(args.topk)
    return "dense", None


def forward_kwargs(mode: str, k: int | None) -> dict[str, Any]:
    """Keyword arguments of ``model.forward`` for an attention mode."""
    return {"dense": True} if mode == "dense" else {"topk": k}


def masked_sparse_gqa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, None]:
    """``ops.sparse_gqa``'s output computed as SDPA under a boolean mask built from ``idx`` (same keys, same
    softmax; no lse). On CPU at evaluation lengths the masked dense kernel is several times faster than the
    chunked gather. q [B,S,H,D], k/v [B,T,Hkv,D], idx [B,S,K] -> out."""
    return masked_sparse_attention(q, k, v, idx, scale=scale).to(q.dtype), None


def window_idx(q_pos: torch.Tensor, k: int, sinks: int = 4) -> torch.Tensor:
    """Sliding-window selection in the ``indexer_topk`` format: each query keeps the first ``sinks`` tokens and
    its last ``k - sinks`` keys (itself included); a query with at most k visible keys keeps all of them.

    q_pos [B,S] -> idx [B,S,k] int32, ascending key positions, -1 padded.
    """
    if not 0 <= sinks < k:
        raise ValueError(f"window: need 0 <= sinks ({sinks}) < k ({k})")
    pos = q_pos.long().unsqueeze(-1)  # [B,S,1]
    r = torch.arange(k, device=q_pos.device).view(1, 1, k)
    short = r.expand(*q_pos.shape, k).clone()  # rows with <= k keys: 0..pos, then -1
    short = torch.where(short <= pos, short, torch.full_like(short, -1))
    recent = pos - (k - 1) + r  # candidate for slots >= sinks: pos-(k-1-r)
    long = torch.where(r < sinks, r, recent)
    return torch.where(pos + 1 <= k, short, long).to(torch.int32)


def window_selection(sinks: int = 4) -> Callable[..., torch.Tensor]:
    """An ``ops.override("indexer_topk", ...)`` function: sinks + the most recent keys, ignoring the indexer's
    scores; attention still runs through the same sparse op with the forced idx."""
    def select(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, *, k_scale: Any = None, q_pos: torch.Tensor,
               topk: int, ordered: bool = True) -> torch.Tensor:
        return window_idx(q_pos, topk, sinks)

    return select


def mode_context(mode: str, sparse_impl: str = "op") -> ExitStack:
    """The window mode forces the sparse selection (through the same sparse op); the others run the model as
    is. ``sparse_impl="masked"`` computes Llama-family sparse attention as masked SDPA (``masked_sparse_gqa``)."""
    stack = ExitStack()
    if mode == "window":
        stack.enter_context(ops.override("indexer_topk", window_selection(4)))
    if mode != "dense" and sparse_impl == "masked":
        stack.enter_context(ops.override("sparse_gqa", masked_sparse_gqa))
    return stack


__all__ = ["attention_mode", "forward_kwargs", "masked_sparse_gqa", "window_idx", "window_selection", "mode_context"]
