"""Training losses: chunked cross-entropy, DeepSeek-V3's balance terms, and the MTP objective.

- ``chunked_cross_entropy``: the LM head and softmax over row chunks, forward *and* backward, so a long
  sequence never materialises a [B, S, V] logits tensor (with V = 129,280 a single 4K-token row of fp32 logits
  is 2 GB). Backward recomputes each chunk's logits from the saved log-sum-exp.
- ``sequence_balance_loss``: the complementary sequence-wise balance loss (V3 report §2.1.2, eq. 17-20).
- ``expert_load`` / ``update_router_bias``: auxiliary-loss-free balancing (V3 report §2.1.2, eq. 16): after each
  step every expert's bias moves by ``speed`` towards the mean load; the bias only steers *which* experts are
  chosen, never the gating weights, so it needs no gradient.
- ``mtp_targets``: which tokens each MTP depth predicts (V3 report §2.2, eq. 21-25).

Shape legend: N tokens (B*S flattened), D hidden, V vocab, E routed experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Bytes of fp32 logits one chunk may hold ([rows, V]): ~32 MB keeps the temporaries small next to the model.
CHUNK_BYTES = 32 << 20


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about ``CHUNK_BYTES``."""
    return max(16, CHUNK_BYTES // (4 * vocab_size))


class _ChunkedCE(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W^T, y_i), computed ``chunk`` rows at a time; logits are recomputed in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,  # [N,D]
        weight: torch.Tensor,  # [V,D]
        targets: torch.Tensor,  # [N] int64
        row_weight: torch.Tensor,  # [N] fp32 (0 for ignored rows)
        chunk: int,
    ) -> torch.Tensor:
        w32 = weight.float()
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = hidden[s : s + chunk].float() @ w32.t()  # [C,V]
            lse_c = torch.logsumexp(logits, dim=-1)
            tgt = logits.gather(1, targets[s : s + chunk, None]).squeeze(1)
            total += (row_weight[s : s + chunk] * (lse_c - tgt)).sum()
            lse[s : s + chunk] = lse_c
        ctx.save_for_backward(hidden, weight, targets, row_weight, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        hidden, weight, targets, row_weight, lse = ctx.saved_tensors
        chunk = ctx.chunk
        w32 = weight.float()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w32) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].float()
            # d(lse - logit_y)/dlogits = softmax - onehot(y), scaled by the row weight and the incoming grad
            g = torch.exp(h @ w32.t() - lse[s : s + chunk, None])  # [C,V] softmax
            rows = torch.arange(g.shape[0], device=g.device)
            g[rows, targets[s : s + chunk]] -= 1.0
            g *= (row_weight[s : s + chunk] * grad_out)[:, None]
            if need_h:
                grad_h[s : s + chunk] = (g @ w32).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.t(), h)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ head_weight.T`` against ``targets`` without the full logits tensor.

    hidden [..., D] (any float dtype; the head runs in fp32), head_weight [V, D], targets [...] int,
    mask [...] (bool or 0/1: which positions count). ``reduction="mean"`` averages over the counted positions
    (like ``F.cross_entropy``), ``"sum"`` returns their sum (callers that normalise by a global token count).
    Equal to ``F.cross_entropy(hidden @ W.T, targets)`` in value and gradient (tested).
    """
    D = hidden.shape[-1]
    h = hidden.reshape(-1, D)
    y = targets.reshape(-1).long()
    if mask is None:
        w = torch.ones(h.shape[0], dtype=torch.float32, device=h.device)
    else:
        w = mask.reshape(-1).to(device=h.device, dtype=torch.float32)
        y = torch.where(w > 0, y, torch.zeros_like(y))  # ignored rows may hold any id (padding, -100)
    total = _ChunkedCE.apply(h, head_weight, y, w, int(chunk or default_chunk(head_weight.shape[0])))
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / w.sum().clamp_min(1.0)
    raise ValueError(f"reduction={reduction!r}: use 'mean' or 'sum'")


# ------------------------------------------------------------------------------------------ MoE balancing


def sequence_balance_loss(
    scores: torch.Tensor, routes: torch.Tensor, batch_size: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sequence ``sum_i f_i * P_i`` of V3's complementary sequence-wise balance loss (eq. 17-20), [B].

    scores [N, E]: the router's sigmoid affinities s_{i,t} (differentiable); routes [N, K]: chosen experts;
    N = batch_size * T. For each sequence of T tokens:
        f_i = E / (K T) * #{t : expert i in TopK(t)}      (a count: no gradient)
        P_i = 1/T * sum_t s_{i,t} / sum_j s_{j,t}          (normalised affinities)
    ``valid`` [B, T] (bool) excludes padding tokens from T and from both sums. The caller multiplies by the
    balance factor alpha (V3: 1e-4, "extremely small") and averages over sequences; it is summed over layers.
    """
    N, E = scores.shape
    K = routes.shape[1]
    T = N // batch_size
    s = scores.view(batch_size, T, E)
    s = s / s.sum(-1, keepdim=True)  # s'_{i,t}
    chosen = torch.zeros(batch_size, T, E, device=scores.device, dtype=s.dtype)
    chosen.scatter_(2, routes.view(batch_size, T, K).long(), 1.0)
    if valid is None:
        n_tok = torch.full((batch_size, 1), float(T), device=scores.device, dtype=s.dtype)
    else:
        v = valid.reshape(batch_size, T, 1).to(s.dtype)
        s, chosen = s * v, chosen * v
        n_tok = v.sum(1).clamp_min(1.0)  # [B,1]
    f = chosen.sum(1) * (E / K) / n_tok  # [B,E]
    P = s.sum(1) / n_tok  # [B,E]
    return (f * P).sum(-1)


def expert_load(routes: torch.Tensor, num_experts: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """How many (token, slot) assignments each expert got: [E] fp32 (padding excluded when ``valid`` given)."""
    flat = routes.reshape(-1).long()
    w = None
    if valid is not None:
        w = valid.reshape(-1, 1).expand(-1, routes.shape[-1]).reshape(-1).to(torch.float32)
    return torch.bincount(flat, weights=w, minlength=num_experts).to(torch.float32)


@torch.no_grad()
def update_router_bias(biases: list[torch.Tensor], loads: list[torch.Tensor], speed: float) -> None:
    """Auxiliary-loss-free balancing (V3 §2.1.2): ``b_i += speed * sign(mean_load - load_i)`` in every MoE layer.

    Overloaded experts become less likely to be picked, underloaded ones more. ``loads`` must be the step's
    loads over the *global* batch (all micro-batches and ranks) so every rank applies the identical update.
    V3 used speed 0.001 for the first 14.3T tokens and 0 afterwards.
    """
    if speed == 0:
        return
    for b, load in zip(biases, loads, strict=True):
        b += speed * torch.sign(load.mean() - load).to(device=b.device, dtype=b.dtype)


# ------------------------------------------------------------------------------------------ MTP


def mtp_targets(labels: torch.Tensor, depth: int) -> torch.Tensor:
    """Targets of MTP depth ``depth`` (0-based): position t predicts token t+2+depth (V3 §2.2).

    labels [B, S] are the next tokens (labels[:, t] = input[:, t+1]); the depth-j module's hidden state at t
    sees inputs up to t+1+j, so its target is labels[:, t+1+j], for t < S-1-j: [B, S-1-j].
    """
    return labels[:, depth + 1 :]
