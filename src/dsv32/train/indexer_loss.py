"""The lightning indexer's training loss: KL to the main attention, and the recall diagnostic (V3.2 paper §2.1.1).

The target, per layer and query t, is the main attention's per-head softmax probabilities summed over heads and
L1-normalised, ``p[t,:] = sum_h A_h[t,:] / ||sum_h A_h[t,:]||_1`` (a constant: no gradient reaches the model
through it), and the indexer's distribution is ``softmax(I[t,:])`` of its logits (paper eq. 1).

- **Dense form** (stage 1, the dense warm-up; paper eq. 3): ``sum_t KL(p[t,:] || softmax(I[t,:]))`` over the
  causal keys.
- **Restricted form** (stage 2, sparse training; eq. 4): ``sum_t KL(p[t,S_t] || softmax(I[t,S_t]))`` over the
  selected set S_t the model attended to, with p rebuilt over S_t from the sparse attention op's log-sum-exp.

Both model families go through the same code: the per-layer aux record of ``forward(return_indexer=True)``
(``model.AttnAux`` for the V3.2 ``Transformer``: absorbed MLA queries/latents; ``llama.LlamaAttnAux`` for
``LlamaModel``: post-RoPE GQA q/k) gives the main logits through its ``main_logits`` / ``main_logits_at`` /
``sparse_lse`` methods.

Memory: nothing builds a [S, T] tensor for the whole sequence. Each layer is processed in query chunks; the KL
of a chunk is back-propagated at once into *leaf copies* of the indexer outputs (q, w, k), and one final
backward (``finish_backward``) carries the accumulated leaf gradients into the indexer parameters.

Targets beyond the paper (``Target``, ``dsv32 sparsify --target``; issue 15): the head-summed target lets a
retrieval head that puts most of its attention on a far needle count for only 1/H of the target, next to the
local and sink keys every head attends to (docs/sparsify.md, "Why the passkeys are lost"). With A_h the
per-head probabilities of row t (over the causal keys; stage 2: over S_t, each head renormalised there):

- ``head-sum`` (default, the paper): ``p = sum_h A_h / ||.||_1``; loss ``KL(p || q)``.
- ``head-max``: the union of the heads' attention, ``p = max_h A_h / ||.||_1``: a key that one head attends to
  strongly keeps that weight whatever the other heads do; loss ``KL(p || q)``.
- ``per-head-kl``: ``sum_h w_h KL(A_h || q)`` with per-row head weights ``w = softmax_h(beta * peak_h)``,
  ``peak_h = max_s A_h[s]`` over the keys past the first ``sinks`` (attention sinks make every head look
  peaked): the more a head concentrates on one non-sink key, the more its distribution counts. ``beta = 0``
  gives uniform weights, whose gradient equals head-sum's (only the constant entropy term differs).

Independently of the target, ``far_weight`` (``--far-weight``) weights each row's loss by
``1 + far_weight * m_t``, m_t = the target's mass on keys a sliding window of k would drop (past the first
``sinks``, before the last k - sinks): retrieval rows are rare in text, and a uniform mean over rows lets the
indexer fit the local rows and miss them (docs/sparsify.md, "Recipe variants"). The logged KL is then the
weighted loss.

All are pure functions of the aux records (targets are constants), computed in the same chunks.

Diagnostic: the indexer recall, the share of the dense attention mass inside the selected set,
``mean_h exp(lse_h(S_t) - lse_h(all))``, averaged only over rows with more than k causal keys (the others attend
to every key whatever the indexer says).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv32.llama import LlamaAttnAux
from dsv32.model import AttnAux, gather_keys
from dsv32.ops.reference import causal_mask

#: Floats one chunk's [B, C, H, T] main-attention logits may hold (64 MB in fp32).
CHUNK_FLOATS = 16 << 20

#: One layer's aux record, either family (same methods).
Aux = AttnAux | LlamaAttnAux

# ============================================================================================ indexer views


def index_logits(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Indexer logits (paper eq. 1) of a query chunk: q [B,C,HI,dI], w [B,C,HI], k [B,T,dI] -> [B,C,T] fp32."""
    B, C, HI, dI = q.shape
    r = torch.relu(torch.bmm(q.float().reshape(B, C * HI, dI), k.float().transpose(1, 2)))  # [B,C*HI,T]
    return torch.bmm(w.float().reshape(B * C, 1, HI), r.view(B * C, HI, -1)).view(B, C, -1)


def indexer_at(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Indexer logits at selected keys (paper eq. 1): q [B,C,HI,dI], w [B,C,HI], k [B,T,dI], idx [B,C,K]
    (>= 0) -> [B,C,K] fp32."""
    k_sel = gather_keys(k.float(), idx)  # [B,C,K,dI]
    return torch.einsum("bchk,bch->bck", torch.relu(torch.einsum("bchd,bckd->bchk", q.float(), k_sel)), w.float())


def chunk_size(aux: Aux, chunk: int | None = None) -> int:
    """Queries per chunk so that one [B,C,H,T] logits block stays within ``CHUNK_FLOATS``."""
    if chunk:
        return chunk
    B, T = aux.index_k.shape[:2]
    return max(1, min(512, CHUNK_FLOATS // max(1, B * aux.num_heads * T)))


# ============================================================================================ targets

TARGETS = ("head-sum", "head-max", "per-head-kl")


@dataclass(frozen=True)
class Target:
    """Which distribution over keys the indexer is trained towards (module docstring)."""

    kind: str = "head-sum"
    peak_beta: float = 8.0  # per-head-kl: head weights softmax_h(peak_beta * peak_h)
    sinks: int = 4  # the first ``sinks`` key positions: not a head's peak, not "far" (they are a window's sinks)
    far_weight: float = 0.0  # rows weighted 1 + far_weight * (target mass a k-window would miss); 0: unweighted

    def __post_init__(self) -> None:
        if self.kind not in TARGETS:
            raise ValueError(f"indexer target {self.kind!r}: not one of {', '.join(TARGETS)}")
        if self.sinks < 0 or self.far_weight < 0:
            raise ValueError(f"indexer target: sinks ({self.sinks}) and far_weight ({self.far_weight}) must be >= 0")


HEAD_SUM = Target()


def target_dist(P: torch.Tensor, target: Target, key_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target of one chunk from its per-head probabilities.

    P [B,H,C,N]: each head's attention over the N candidate keys (0 at keys it cannot see); ``key_pos``
    [B|1,C|1,N]: those keys' positions. Returns (p [B,C,N], summing to 1 over N; c [B,C]) such that the
    loss of a row is ``c - sum_n p[n] log q[n]``: ``c = sum p log p`` (KL(p || q)) or, for per-head-kl,
    ``c = sum_h w_h sum_n A_h log A_h`` (sum_h w_h KL(A_h || q)).
    """
    if target.kind == "per-head-kl":
        is_sink = (key_pos < target.sinks).unsqueeze(1)  # [B|1,1,C|1,N]
        peak = P.masked_fill(is_sink, 0.0).amax(-1)  # [B,H,C]
        w = torch.softmax(target.peak_beta * peak, dim=1)  # [B,H,C]
        Pn = P / P.sum(-1, keepdim=True).clamp_min(1e-30)  # rows of exactly 1 (stage 2 rebuilds them from lse)
        p = torch.einsum("bhc,bhcn->bcn", w, Pn)
        c = (w * torch.xlogy(Pn, Pn).sum(-1)).sum(1)
        return p, c
    s = P.sum(1) if target.kind == "head-sum" else P.amax(1)  # [B,C,N]
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
    return p, torch.xlogy(p, p).sum(-1)


def far_row_weights(p: torch.Tensor, key_pos: torch.Tensor, q_pos: torch.Tensor, topk: int,
                    target: Target) -> torch.Tensor:
    """Row weights ``1 + far_weight * m_t``, m_t = the target mass on keys that a sliding window of ``topk`` keys
    (the first ``sinks`` + the last ``topk - sinks``) would drop: rows that retrieve from far back count more.

    p [B,C,N] (constant), key_pos [B|1,C|1,N], q_pos [B,C] -> [B,C]."""
    far = (key_pos >= target.sinks) & (key_pos <= q_pos.unsqueeze(-1) - (topk - target.sinks))
    return 1.0 + target.far_weight * (p * far).sum(-1)


# ============================================================================================ losses


@dataclass
class LayerStats:
    """One layer's indexer diagnostics for one batch."""

    kl: float  # mean over query rows of the loss, KL(p || softmax(I)) (per-head-kl: the head-weighted KLs)
    recall: float | None  # mean over rows with > k causal keys of the dense attention mass inside S_t
    rows: int  # query rows in the KL mean
    recall_rows: int  # rows in the recall mean


def _kl_rows(p: torch.Tensor, c: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``c - sum p log softmax(logits)`` per row over the ``valid`` slots (KL(p || q) when c = sum p log p); p is 0
    outside them. [..., N] -> [...]."""
    logq = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1).masked_fill(~valid, 0.0)
    return c - (p * logq).sum(-1)


def _recall_rows(lse_sel: torch.Tensor, lse_all: torch.Tensor) -> torch.Tensor:
    """Share of the head-averaged dense attention mass inside the selected set: ``mean_h exp(lse_S - lse)``.

    (p is the head *mean* of the per-head probabilities, since each head's row sums to 1.) [B,C,H] -> [B,C].
    """
    return torch.exp(lse_sel - lse_all).mean(-1)


def layer_kl(
    aux: Aux,
    *,
    topk: int | None,
    sparse: bool,
    chunk: int | None = None,
    backward: bool = False,
    recall: bool = True,
    rows: torch.Tensor | None = None,
    target: Target = HEAD_SUM,
) -> tuple[LayerStats, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The indexer loss of one layer, in query chunks; optionally back-propagated chunk by chunk.

    ``sparse=False`` (stage 1, eq. 3): KL over every causal key against the dense target; the selected set for
    the recall is the indexer's own top-``topk``. ``sparse=True`` (stage 2, eq. 4): KL over ``aux.topk_idx``
    (the set the model attended to) with the target rebuilt from the sparse op's lse; a layer that ran dense
    (every row sees at most k keys) falls back to the dense form, where S_t is every causal key.
    ``backward``: each chunk's ``KL / rows`` is back-propagated into leaf copies of the indexer outputs; the
    returned (tensor, grad) pairs finish the backward into the indexer parameters (``finish_backward``).
    ``recall``: also compute the recall (stage 2 needs an extra dense pass for it).
    ``rows``: only these query positions (sorted 1-D indices; an unbiased subsample of the sum over t).
    ``target``: the KL target (module docstring); the recall is always the head-mean mass, whatever the target.
    """
    q0, w0, k0 = aux.index_q, aux.index_w, aux.index_k
    grad_on = backward and (q0.requires_grad or w0.requires_grad or k0.requires_grad)
    q, w, k = (t.detach().requires_grad_(grad_on) for t in (q0, w0, k0))
    B, S = q.shape[:2]
    T = k.shape[1]
    q_pos = aux.q_pos
    idx_all = aux.topk_idx if sparse else None
    C = chunk_size(aux, chunk)
    kl_sum, rec_sum, rec_rows = 0.0, 0.0, 0
    n_q = S if rows is None else len(rows)
    n_rows = B * n_q
    for c0 in range(0, n_q, C):
        sl = slice(c0, min(n_q, c0 + C)) if rows is None else rows[c0 : c0 + C]
        pos = q_pos[:, sl]
        with torch.set_grad_enabled(grad_on):
            if idx_all is None:  # dense KL (stage 1, or a stage-2 layer that ran dense)
                with torch.no_grad():
                    vis = causal_mask(pos, T)  # [B,C,T]
                    bias = torch.zeros(vis.shape, dtype=torch.float32, device=vis.device).masked_fill_(~vis, -math.inf)
                    A = aux.main_logits(sl).add_(bias.unsqueeze(1))  # [B,H,C,T]
                    A = A.sub_(torch.logsumexp(A, dim=-1, keepdim=True)).exp_()  # per-head softmax
                    if target.kind == "head-sum":  # the paper's: p = head mean (each head's row sums to 1)
                        p = pm = A.mean(1)  # [B,C,T]
                        ent = torch.xlogy(p, p).sum(-1)
                    else:
                        p, ent = target_dist(A, target, torch.arange(T, device=A.device).view(1, 1, T))
                        pm = A.mean(1) if recall else None  # the recall stays the head-mean mass
                    del A
                logits = index_logits(q[:, sl], w[:, sl], k)  # [B,C,T]
                # loss = ent - sum p I + logsumexp(I) over the causal keys (p = 0 elsewhere)
                kl = ent - (p * logits).sum(-1) + torch.logsumexp(logits + bias, dim=-1)
                if target.far_weight and topk is not None:
                    kl = kl * far_row_weights(p, torch.arange(T, device=p.device).view(1, 1, T), pos, topk, target)
                sel = None
                if recall and topk is not None:
                    with torch.no_grad():
                        sel = torch.topk(logits.detach() + bias, min(topk, T), dim=-1).indices  # [B,C,K]
                        mass = pm.gather(-1, sel).sum(-1)  # rows with > k keys: no -inf among the top k
            else:  # restricted KL over S_t (stage 2)
                sel = idx_all[:, sl]
                valid = sel >= 0
                safe = sel.clamp_min(0)
                with torch.no_grad():
                    lse_sel = aux.sparse_lse(sl, sel)  # [B,C,H] from the sparse op
                    at = aux.main_logits_at(sl, safe)  # [B,C,H,K]
                    P = torch.exp(at - lse_sel.unsqueeze(-1)).masked_fill(~valid.unsqueeze(2), 0.0)  # heads over S_t
                    p, ent = target_dist(P.transpose(1, 2), target, safe)  # p [B,C,K], L1-normalised over S_t
                kl = _kl_rows(p, ent, indexer_at(q[:, sl], w[:, sl], k, safe), valid)
                if target.far_weight and topk is not None:
                    kl = kl * far_row_weights(p, safe, pos, topk, target)
                if recall:
                    with torch.no_grad():
                        vis = causal_mask(pos, T).unsqueeze(1)
                        lse_all = torch.logsumexp(aux.main_logits(sl).masked_fill_(~vis, -math.inf), dim=-1)
                        mass = _recall_rows(lse_sel, lse_all.transpose(1, 2))  # [B,C]
            if grad_on:
                (kl.sum() / n_rows).backward()
        kl_sum += float(kl.detach().sum())
        if recall and sel is not None and topk is not None:
            long_rows = (pos + 1) > topk
            rec_sum += float(mass[long_rows].sum())
            rec_rows += int(long_rows.sum())
    stats = LayerStats(kl_sum / n_rows, rec_sum / rec_rows if rec_rows else None, n_rows, rec_rows)
    pairs = [(t0, t.grad) for t0, t in ((q0, q), (w0, w), (k0, k)) if grad_on and t.grad is not None
             and t0.requires_grad]
    return stats, pairs


def finish_backward(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Carry the leaf gradients of the indexer outputs into the indexer parameters (one backward)."""
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def indexer_loss(
    auxes: list[Aux], *, topk: int | None, sparse: bool, chunk: int | None = None, backward: bool = False,
    recall: bool = True, rows: torch.Tensor | None = None, target: Target = HEAD_SUM,
) -> list[LayerStats]:
    """``layer_kl`` over every layer; with ``backward`` the gradient of ``sum_layers mean_t KL`` reaches the
    indexer parameters (and nothing else: the targets are constants)."""
    stats, pairs = [], []
    for aux in auxes:
        st, pr = layer_kl(aux, topk=topk, sparse=sparse, chunk=chunk, backward=backward, recall=recall, rows=rows,
                          target=target)
        stats.append(st)
        pairs.extend(pr)
    if backward:
        finish_backward(pairs)
    return stats


__all__ = ["CHUNK_FLOATS", "TARGETS", "Target", "HEAD_SUM", "target_dist", "far_row_weights", "LayerStats",
           "chunk_size", "index_logits", "indexer_at", "layer_kl", "finish_backward", "indexer_loss"]
