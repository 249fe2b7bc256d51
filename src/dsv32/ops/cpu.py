"""Fast DSA ops in plain torch: fp32, chunked, bounded memory. The CPU path (and the fallback on any device).

Same contracts as ``reference.py`` (design.md "DSA ops"); the differences are only how the work is cut up:

- ``indexer_topk``: queries in chunks, keys in blocks. The [rows, HI, key-block] ReLU logits are the only large
  temporary (never [S, HI, T]); the per-chunk score row [C, T] feeds one ``torch.topk``. Keys past the chunk's
  last position are never scored (causal skipping halves a full prefill's indexer work).
- ``sparse_mla``: gathers the K selected latent rows per query (shared by all H heads: the MQA form) and runs
  two batched GEMMs per chunk of queries. A custom autograd Function recomputes the probabilities from the
  saved ``lse`` in backward, so training never stores [B,S,H,K] probabilities.
- ``dense_mla``: absorbed-form dense attention with queries in chunks and keys in blocks merged by log-sum-exp
  (flash-decoding style), so a 128K-token decode never builds a [B,H,T] score tensor at once.

Every hot loop is over chunks/blocks of work, never over heads or tokens; the GEMMs, gathers and reductions
inside run on all intra-op threads. Nothing here is ``torch.compile``d: profiles of full-size DSA prefill and
decode on the 2-core dev box are dominated by GEMMs, row gathers and ``topk``, which compilation does not speed
up; the few elementwise passes left (softmax statistics, ReLU) are cache-sized blocks.

Shape legend: B batch, S queries, T keys, H heads, HI indexer heads, dI indexer head dim, D (=Dqk) latent
query/key dim, Dv value dim (first Dv dims of a latent row), K top-k, R = B*S flattened query rows,
C queries per chunk, Tb keys per block.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Work-block sizes, measured on the 2-core dev box when idle (2026-11-29, 2 threads; DeepSeek-V3.2 shapes):
# cache-resident blocks win on every path. Under heavy load from other processes (load average 8-10) larger
# blocks had measured better (fewer parallel regions, each waiting for both threads), hence the old 64-192 MB.
# Bytes of one sparse-MLA chunk's gathered rows and scores: decode of 8 sequences at 128K, 8 MB 0.034 s,
# 48 MB 0.037 s, 192 MB 0.044 s.
WORK_BYTES = 8 << 20
# Bytes of the indexer's ReLU-logits block (GEMM -> ReLU -> head-weight GEMV per block): decode, 8 sequences x
# 128K keys: 1 MB 0.175 s, 2 MB 0.166 s, 8 MB 0.235 s, 64 MB 0.254 s; prefill, 256 queries x 32K keys: 2 MB
# 0.98 s, 8 MB 1.02 s, 64 MB 1.62 s.
INDEX_BLOCK_BYTES = 2 << 20
# Bytes of dense_mla's [B, C*H, Tb] score block: decode of 8 sequences at 128K: 1 MB 2.30 s, 4 MB 2.08 s, 8 MB
# 2.05 s, 64 MB 2.81 s. This is the dense baseline the benchmarks compare against, so it is tuned as carefully.
DENSE_BLOCK_BYTES = 8 << 20
# Bytes for the per-chunk [C, T] indexer score rows (one torch.topk per chunk).
SCORE_BYTES = 256 << 20
MAX_QUERY_CHUNK = 256


def supports(t: torch.Tensor, op: str) -> bool:
    """Plain torch: correct on any device (on CUDA it is the fallback when Triton is missing)."""
    return True


# ============================================================================================ indexer + top-k


def _indexer_scores_chunk(
    q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None, T: int
) -> torch.Tensor:
    """Indexer logits for one query chunk over keys [0, T): q [B,C,HI,dI], w [B,C,HI] fp32 -> [B,C,T] fp32.

    Keys are processed ``Tb`` at a time so the ReLU temporary stays bounded (<= INDEX_BLOCK_BYTES) whatever T
    is; the head-weighted sum is a batched GEMV over it. A chunk of several queries
    uses [C*HI, Tb] logits (q-major, a clean [1,HI] x [HI,Tb] GEMV per query); a single query (decode) uses
    [Tb, HI] (key-major: one tall GEMM per sequence, far faster than a 64-row one on this CPU).
    """
    B, C, HI, dI = q.shape
    out = torch.empty(B, C, T, dtype=torch.float32, device=q.device)
    Tb = max(64, INDEX_BLOCK_BYTES // (4 * B * C * HI))
    if C == 1:
        qt = q.reshape(B, HI, dI).transpose(1, 2)  # [B,dI,HI]
        wc = w.reshape(B, HI, 1)  # [B,HI,1]
    else:
        qf = q.reshape(B, C * HI, dI)  # [B,C*HI,dI]
        wf = w.reshape(B * C, 1, HI)  # [B*C,1,HI]
    for t0 in range(0, T, Tb):
        t1 = min(T, t0 + Tb)
        kb = k[:, t0:t1].float()  # [B,Tb,dI] (dequantises an FP8 block here, in cache)
        if k_scale is not None:
            kb = kb * k_scale[:, t0:t1, None].float()
        if C == 1:
            logits = torch.bmm(kb, qt).relu_()  # [B,Tb,HI]
            out[:, 0, t0:t1] = torch.bmm(logits, wc).view(B, t1 - t0)
        else:
            logits = torch.bmm(qf, kb.transpose(1, 2)).relu_()  # [B,C*HI,Tb]
            out[:, :, t0:t1] = torch.bmm(wf, logits.view(B * C, HI, t1 - t0)).view(B, C, t1 - t0)
    return out


def _topk_lowest_tied(rows: torch.Tensor, thr: torch.Tensor, k: int) -> torch.Tensor:
    """rows [A,T] whose k-th largest value ``thr`` [A,1] is tied across the top-k boundary -> the k positions
    [A,k] (ascending) above ``thr`` plus the lowest-positioned tied ones: the reference's stable-sort rule."""
    above, tied = rows > thr, rows == thr
    n_tied_needed = k - above.sum(-1, keepdim=True)  # [A,1]
    keep = above | (tied & (tied.cumsum(-1) <= n_tied_needed))  # exactly k per row
    return keep.nonzero()[:, 1].view(-1, k)


def _select_topk_set(scores: torch.Tensor, n_visible: torch.Tensor, k: int, topk: int) -> torch.Tensor:
    """``select_topk(..., ordered=False)`` for T > k: the same set from an *unsorted* ``torch.topk`` (about 2x
    cheaper on CPU). Of the k+1 values taken, the smallest is dropped; a row whose two smallest are equal (a tie
    at the boundary) is redone by position, as in the ordered path. -1 marks invisible (-inf) picks."""
    R = scores.shape[0]
    vals, idx = scores.topk(k + 1, dim=-1, sorted=False)  # [R,k+1], any order
    low = vals.topk(2, dim=-1, largest=False)  # the (k+1)-th and k-th largest, [R,2]
    keep = torch.ones_like(vals, dtype=torch.bool)
    keep.scatter_(1, low.indices[:, :1], False)
    idx, vals = idx[keep].view(R, k), vals[keep].view(R, k)
    ambiguous = ((low.values[:, 0] == low.values[:, 1]) & (n_visible > k)).nonzero().squeeze(-1)  # [A]
    if ambiguous.numel():
        rows = scores.index_select(0, ambiguous)  # [A,T]
        idx[ambiguous] = _topk_lowest_tied(rows, low.values[ambiguous, 1:2], k)
        vals[ambiguous] = rows.gather(-1, idx[ambiguous])
    idx = torch.where(torch.isfinite(vals), idx, -1).to(torch.int32)  # a row seeing < k keys: -1 for the rest
    if k < topk:
        idx = torch.cat([idx, idx.new_full((R, topk - k), -1)], dim=-1)
    return idx


def select_topk(scores: torch.Tensor, n_visible: torch.Tensor, topk: int, ordered: bool = True) -> torch.Tensor:
    """Deterministic top-k of each row: scores [R,T] (-inf where invisible), n_visible [R] -> [R,topk] int32.

    Same result as the reference's stable descending sort, for the price of one ``torch.topk``: ``topk`` is
    asked for k+1 values, and only a row whose (k+1)-th value equals its k-th (a tie across the boundary, where
    ``topk`` may pick any of the tied keys) is redone by position. The k picks are then put in (score desc,
    position asc) order (``ordered=False`` skips that: same set, order unspecified — masked attention needs only
    the set). Slots at rank >= n_visible become -1.
    """
    R, T = scores.shape
    k = min(topk, T)
    if k == 0:
        return torch.full((R, topk), -1, dtype=torch.int32, device=scores.device)
    if not ordered and T > k:
        return _select_topk_set(scores, n_visible, k, topk)
    vals, idx = scores.topk(min(k + 1, T), dim=-1, sorted=True)  # [R,k(+1)] descending
    if T > k:
        # (a row seeing <= k keys keeps them all, whatever topk did with its -inf slots)
        ambiguous = ((vals[:, k] == vals[:, k - 1]) & (n_visible > k)).nonzero().squeeze(-1)  # [A]
        idx = idx[:, :k]
        if ambiguous.numel():
            idx[ambiguous] = _topk_lowest_tied(scores.index_select(0, ambiguous), vals[ambiguous, k - 1 : k], k)
    # canonical order (score desc, position asc): topk's order already is, except inside runs of equal scores,
    # so only rows holding a tie (or redone above) pay for the two sorts
    redo = (vals[:, 1:k] == vals[:, : k - 1]).any(-1) if ordered else vals.new_zeros(R, dtype=torch.bool)  # [R]
    if T > k and ambiguous.numel():
        redo[ambiguous] = True
    rows = redo.nonzero().squeeze(-1)
    if rows.numel():
        sub = idx[rows].sort(dim=-1).values
        order = scores[rows].gather(-1, sub).sort(dim=-1, descending=True, stable=True).indices
        idx[rows] = sub.gather(-1, order)
    rank = torch.arange(k, device=idx.device)
    idx = torch.where(rank < n_visible.unsqueeze(-1), idx, -1).to(torch.int32)
    if k < topk:
        idx = torch.cat([idx, idx.new_full((R, topk - k), -1)], dim=-1)
    return idx


def indexer_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    q_pos: torch.Tensor,
    topk: int,
    chunk: int | None = None,
    ordered: bool = True,
) -> torch.Tensor:
    """Top-k key positions per query by lightning-indexer score (paper eq. 1), ties to the lower position.

    q [B,S,HI,dI], w [B,S,HI] (scales folded in), k [B,T,dI] (any float dtype, e.g. FP8 e4m3 with
    k_scale [B,T] its per-token fp32 scale), q_pos [B,S] -> idx [B,S,topk] int32, -1 in empty slots.
    Memory: one [B,C,T] score block plus one WORK_BYTES logits block, whatever S and T are.
    """
    B, S, HI, dI = q.shape
    T = k.shape[1]
    out = torch.full((B, S, topk), -1, dtype=torch.int32, device=q.device)
    if S == 0 or T == 0:
        return out
    C = chunk or max(1, min(MAX_QUERY_CHUNK, SCORE_BYTES // (4 * B * T)))
    keys = torch.arange(T, device=q.device)
    for s0 in range(0, S, C):
        s1 = min(S, s0 + C)
        pos = q_pos[:, s0:s1]  # [B,C]
        T_eff = min(T, int(pos.max()) + 1)  # keys no query in this chunk can see are never scored
        if T_eff <= 0:
            continue
        scores = _indexer_scores_chunk(q[:, s0:s1].float(), w[:, s0:s1].float(), k, k_scale, T_eff)  # [B,C,T_eff]
        t_lo = max(0, int(pos.min()) + 1)  # keys below t_lo are visible to every query of the chunk
        if t_lo < T_eff:
            tail = scores[..., t_lo:]  # [B,C,T_eff-t_lo]
            tail.masked_fill_(keys[t_lo:T_eff].view(1, 1, -1) > pos.unsqueeze(-1), float("-inf"))
        n_visible = (pos + 1).clamp(0, T_eff)  # [B,C]
        idx = select_topk(scores.view(-1, T_eff), n_visible.reshape(-1), topk, ordered)  # [B*C, topk]
        out[:, s0:s1] = idx.view(B, s1 - s0, topk)
    return out


# ============================================================================================ sparse MLA


def _rows_per_chunk(H: int, K: int, D: int, n_hk: int) -> int:
    """Queries per chunk so the gathered [C,K,D] rows plus ``n_hk`` [C,H,K] temporaries fit WORK_BYTES."""
    return max(1, WORK_BYTES // (4 * (K * D * 2 + n_hk * H * K)))


def _flat_rows(idx: torch.Tensor, r0: int, r1: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows [r0, r1) of idx [B,S,K] -> (int64 row ids into the flattened [B*T] key axis, -1 slots pointing
    at their batch's row 0) [n,K], valid [n,K]. Built per chunk: for all B*S rows at once the int64 ids alone
    would be 2 GB at S = 128K, K = 2048."""
    B, S, K = idx.shape
    sel = idx.reshape(B * S, K)[r0:r1]  # [n,K]
    valid = sel >= 0
    base = (torch.arange(r0, r1, device=idx.device) // S * T).view(-1, 1)  # [n,1] int64: b * T
    return torch.where(valid, sel.long() + base, base), valid


def _sparse_fwd_chunk(
    q: torch.Tensor, kv_sel: torch.Tensor, valid: torch.Tensor | None, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [C,H,D], kv_sel [C,K,D], valid [C,K] (None: every slot valid) -> (out [C,H,Dv], lse [C,H]); fp32.

    Four passes over the [C,H,K] scores (max, subtract, exp, sum); the 1/sum goes on the small output.
    """
    s = torch.bmm(q * scale, kv_sel.transpose(1, 2))  # [C,H,K]
    if valid is not None:
        s.masked_fill_(~valid.unsqueeze(1), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # [C,H,1]
    m = torch.where(torch.isfinite(m), m, 0.0)  # a row with no valid key: p = 0 below
    p = s.sub_(m).exp_()  # unnormalised probabilities, 0 on -1 slots
    denom = p.sum(dim=-1, keepdim=True)  # [C,H,1]
    out = torch.bmm(p, kv_sel[..., :v_dim]).div_(denom.clamp_min(torch.finfo(torch.float32).tiny))  # [C,H,Dv]
    lse = (m + denom.log()).squeeze(-1)  # log 0 = -inf for a row with no valid key
    return out, lse


def sparse_mla_forward(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-autograd forward: q [B,S,H,D], kv [B,T,D], idx [B,S,K] -> (out [B,S,H,Dv] fp32, lse [B,S,H] fp32)."""
    B, S, H, D = q.shape
    T, K = kv.shape[1], idx.shape[-1]
    kv_flat = kv.reshape(B * T, D)
    q_flat = q.reshape(B * S, H, D)
    out = torch.empty(B * S, H, v_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(B * S, H, dtype=torch.float32, device=q.device)
    C = _rows_per_chunk(H, K, D, 1)
    for r0 in range(0, B * S, C):
        r1 = min(B * S, r0 + C)
        rows, valid = _flat_rows(idx, r0, r1, T)  # [C,K]
        kv_sel = kv_flat.index_select(0, rows.reshape(-1)).view(r1 - r0, K, D).float()  # [C,K,D]
        v = None if bool(valid.all()) else valid  # the common case past the first K positions: no masking pass
        out[r0:r1], lse[r0:r1] = _sparse_fwd_chunk(q_flat[r0:r1].float(), kv_sel, v, v_dim, scale)
    return out.view(B, S, H, v_dim), lse.view(B, S, H)


def sparse_mla_backward(
    q: torch.Tensor,
    kv: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    v_dim: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sparse MLA from the saved (out, lse): recompute p = exp(s - lse) chunk by chunk.

    With dP = dO V^T and delta = rowsum(dO * O): dS = P * (dP - delta + dlse); dQ = scale * dS KV;
    dKV_sel = scale * dS^T Q (+ P^T dO on the first Dv dims), scattered back by index_add.
    Returns (dq [B,S,H,D], dkv [B,T,D]) in fp32.
    """
    B, S, H, D = q.shape
    T, K = kv.shape[1], idx.shape[-1]
    kv_flat = kv.reshape(B * T, D)
    q_flat, o_flat, do_flat = q.reshape(B * S, H, D), out.reshape(B * S, H, v_dim), dout.reshape(B * S, H, v_dim)
    lse_flat = lse.reshape(B * S, H)
    dlse_flat = dlse.reshape(B * S, H) if dlse is not None else None
    dq = torch.empty(B * S, H, D, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(B * T, D, dtype=torch.float32, device=q.device)
    C = _rows_per_chunk(H, K, D, 3)
    for r0 in range(0, B * S, C):
        r1 = min(B * S, r0 + C)
        n = r1 - r0
        rows, valid = _flat_rows(idx, r0, r1, T)  # [C,K]
        rr = rows.reshape(-1)
        kv_sel = kv_flat.index_select(0, rr).view(n, K, D).float()  # [C,K,D]
        qs = q_flat[r0:r1].float() * scale  # [C,H,D]
        do = do_flat[r0:r1].float()  # [C,H,Dv]
        lse_c = lse_flat[r0:r1]
        s = torch.bmm(qs, kv_sel.transpose(1, 2))  # [C,H,K]
        s.masked_fill_(~valid.unsqueeze(1), float("-inf"))
        p = s.sub_(torch.where(torch.isfinite(lse_c), lse_c, 0.0).unsqueeze(-1)).exp_()  # [C,H,K]
        dp = torch.bmm(do, kv_sel[..., :v_dim].transpose(1, 2))  # [C,H,K]
        delta = (do * o_flat[r0:r1].float()).sum(-1)  # [C,H]
        if dlse_flat is not None:
            delta = delta - dlse_flat[r0:r1].float()
        ds = dp.sub_(delta.unsqueeze(-1)).mul_(p)  # [C,H,K], 0 on -1 slots
        dq[r0:r1] = torch.bmm(ds, kv_sel).mul_(scale)  # [C,H,D]
        dkv_sel = torch.bmm(ds.transpose(1, 2), qs)  # [C,K,D] (qs carries the scale)
        dkv_sel[..., :v_dim] += torch.bmm(p.transpose(1, 2), do)  # [C,K,Dv]
        dkv.index_add_(0, rr, dkv_sel.view(n * K, D))  # -1 slots add exact zeros to row 0 of their batch
    return dq.view(B, S, H, D), dkv.view(B, T, D)


def make_sparse_mla(forward_fn):
    """A differentiable ``sparse_mla`` around a forward ``forward_fn(q, kv, idx, v_dim, scale) -> (out, lse)``.

    The backward is always the chunked torch one (``sparse_mla_backward``), which recomputes the probabilities
    from the saved lse; the CPU path and the Triton forward share it.
    """

    class SparseMLA(torch.autograd.Function):
        """Sparse MLA with a hand-written backward that saves (q, kv, idx, out, lse), not the probabilities."""

        @staticmethod
        def forward(ctx, q, kv, idx, v_dim: int, scale: float):  # type: ignore[override]
            out, lse = forward_fn(q, kv, idx, v_dim, scale)
            out = out.to(q.dtype)
            ctx.save_for_backward(q, kv, idx, out, lse)
            ctx.v_dim, ctx.scale = v_dim, scale
            return out, lse

        @staticmethod
        @once_differentiable
        def backward(ctx, dout, dlse):  # type: ignore[override]
            q, kv, idx, out, lse = ctx.saved_tensors
            if dout is None:
                dout = torch.zeros_like(out)
            dq, dkv = sparse_mla_backward(q, kv, idx, out, lse, dout, dlse, ctx.v_dim, ctx.scale)
            return dq.to(q.dtype), dkv.to(kv.dtype), None, None, None

    def sparse_mla(
        q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, *, v_dim: int, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse attention in MLA's absorbed form over gathered latent rows; differentiable in q and kv.

        q [B,S,H,D], kv [B,T,D], idx [B,S,K] (-1 = empty) -> out [B,S,H,Dv] (q's dtype; zeros for a row with no
        valid key), lse [B,S,H] fp32 (natural log; -inf for such rows). Same contract as ``reference.sparse_mla``.
        """
        if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
            return SparseMLA.apply(q, kv, idx, v_dim, scale)
        out, lse = forward_fn(q, kv, idx, v_dim, scale)
        return out.to(q.dtype), lse

    return SparseMLA, sparse_mla


SparseMLA, sparse_mla = make_sparse_mla(sparse_mla_forward)


def dense_mla(
    q: torch.Tensor, kv: torch.Tensor, q_pos: torch.Tensor, *, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention in the absorbed form, flash-decoding style: q [B,S,H,D], kv [B,T,D] -> (out, lse).

    Queries in chunks, keys in blocks of Tb; each block yields (out_j, lse_j) and blocks merge by log-sum-exp,
    so the largest temporary is [B, C*H, Tb] (<= DENSE_BLOCK_BYTES). Plain torch ops: autograd works.
    """
    B, S, H, D = q.shape
    T = kv.shape[1]
    keys = torch.arange(T, device=q.device)
    C = max(1, min(S, DENSE_BLOCK_BYTES // (4 * B * H * 1024)))
    outs, lses = [], []
    for s0 in range(0, S, C):
        s1 = min(S, s0 + C)
        n = s1 - s0
        pos = q_pos[:, s0:s1]  # [B,C]
        T_eff = max(1, min(T, int(pos.max()) + 1))
        qc = q[:, s0:s1].float().reshape(B, n * H, D) * scale  # [B, C*H, D]
        Tb = max(256, DENSE_BLOCK_BYTES // (4 * B * n * H))
        o_acc = torch.zeros(B, n * H, v_dim, dtype=torch.float32, device=q.device)
        lse_acc = torch.full((B, n * H), float("-inf"), dtype=torch.float32, device=q.device)
        for t0 in range(0, T_eff, Tb):
            t1 = min(T_eff, t0 + Tb)
            kvb = kv[:, t0:t1].float()  # [B,Tb,D]
            s = torch.bmm(qc, kvb.transpose(1, 2)).view(B, n, H, t1 - t0)  # [B,C,H,Tb]
            s = s.masked_fill(keys[t0:t1].view(1, 1, 1, -1) > pos.view(B, n, 1, 1), float("-inf"))
            s = s.view(B, n * H, t1 - t0)
            lse_b = torch.logsumexp(s, dim=-1)  # [B,C*H]
            p = torch.exp(s - torch.where(torch.isfinite(lse_b), lse_b, 0.0).unsqueeze(-1))
            o_b = torch.bmm(p, kvb[..., :v_dim])  # [B,C*H,Dv]
            lse_new = torch.logaddexp(lse_acc, lse_b)
            safe = torch.where(torch.isfinite(lse_new), lse_new, 0.0)
            o_acc = o_acc * torch.exp(lse_acc - safe).unsqueeze(-1) + o_b * torch.exp(lse_b - safe).unsqueeze(-1)
            lse_acc = lse_new
        outs.append(o_acc.view(B, n, H, v_dim))
        lses.append(lse_acc.view(B, n, H))
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(lses, dim=1)


__all__ = ["indexer_topk", "select_topk", "sparse_mla", "sparse_mla_forward", "sparse_mla_backward", "dense_mla",
           "SparseMLA", "supports"]
