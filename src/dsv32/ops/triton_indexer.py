"""Lightning indexer in Triton: FP8-style scores and a top-k that never sorts a whole row (docs/kernels.md).

Scores (paper eq. 1 with DeepGEMM's ``fp8_mqa_logits`` semantics): q and k arrive as e4m3 codes with per-row
scales, the query scales folded into the head weights (as V3.2's inference code does), so
``logits[s, t] = k_scale[t] · Σ_j w[s, j] · relu(q[s, j] · k[t])``. One program takes ``block_q`` queries and all
their indexer heads as the rows of one tensor-core product (rows = (query, head) pairs, [BQ·HP, dI] x [dI, BT]) and
walks ``tiles`` key tiles of ``block_t`` keys: ReLU, head weighting and the sum over heads happen in registers,
keys past a query's position come out as -inf, and a tile past every query of the block skips the product.
With FP8 inputs on a GPU the product runs on e4m3 tensor cores with fp32 accumulation; under Triton's
interpreter (no fp8 loads) the codes are passed as the fp32 values they encode, the scales applied the same way.

Top-k (``topk_select``): per row, the k-th largest score is found exactly by a radix search over the float's
order-preserving 32-bit key, ``radix_bits`` bits per pass (each pass counts, for the 2^bits candidate prefixes,
how many keys are >= each), then one pass gathers every position above that threshold plus the lowest-positioned
ties, in position order (ties go to the lower position, as the reference's stable sort). Only the k picks are
then sorted, for the canonical (score desc, position asc) order. Work per row: (32 / radix_bits + 2) reads of
the row, no sort of it. Few rows (decode) are cut into segments, one program each, so that rows x segments
reaches ``topk_min_programs``: then each pass is a launch whose programs add their counts atomically (and rebuild
the threshold so far from the earlier passes' counts), and a tally and exclusive sums give each segment its
first output slot and its share of the ties.

Tile sizes are constexpr from an ``IndexerConfig`` (the default, or the caller's), never from input sizes; offsets
are int64. Nothing here has been timed on a GPU.

Shape legend: B batch, S queries, T keys, HI indexer heads (HP padded), dI head dim, R = B*S score rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsv32.ops import cpu

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
E4M3_MAX = 448.0


@dataclass(frozen=True)
class IndexerConfig:
    """Tiles of the scores kernel and of the top-k select (compile-time constants)."""

    block_q: int = 2  # queries per program; rows of the product = block_q x padded heads (2 x 64 = 128)
    block_t: int = 128  # keys per tile
    tiles: int = 8  # key tiles per program (the query block stays in registers across them)
    num_warps: int = 8
    num_stages: int = 2
    topk_block: int = 1024  # scores per step of the top-k passes
    radix_bits: int = 4  # bits of the threshold found per pass: 1, 2, 4 or 8
    topk_warps: int = 8
    # Work split of the top-k: a row is cut into segments (one program each, counts merged by atomics, one launch
    # per pass) until rows x segments reaches this many programs; 1 keeps one program per row and one launch.
    # A 16-sequence decode otherwise runs on 16 SMs.
    topk_min_programs: int = 264


CONFIG = IndexerConfig()  # a starting point for the H200 sweep (unmeasured)


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation over the last dim: x [..., d] -> (codes [..., d] float8_e4m3fn, scale [...] fp32)
    with x ≈ codes · scale (the row's absolute maximum maps to 448)."""
    scale = x.float().abs().amax(-1).clamp_min(1e-12) / E4M3_MAX
    codes = (x.float() / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


# ============================================================================================ scores


@triton.jit
def _scores_kernel(
    Q, W, Kc, KS, POS, OUT,  # q [B,S,HI,dI], w [B,S,HI] fp32, k [B,T,dI], k_scale [B,T], q_pos [B,S], out [B,S,Tout]
    S, T, HI, DI,
    stride_qb, stride_qs, stride_qh, stride_wb, stride_ws, stride_kb, stride_kt, stride_sb, stride_st,
    stride_pb, stride_ob, stride_os,
    HAS_SCALE: tl.constexpr, BQ: tl.constexpr, HP: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
    TILES: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s0 = tl.program_id(1) * BQ
    offs_m = tl.arange(0, BQ * HP)  # row m = (query s0 + m // HP, head m % HP)
    qi = s0 + offs_m // HP
    hi = offs_m % HP
    m_ok = (qi < S) & (hi < HI)
    offs_d = tl.arange(0, BD)
    q = tl.load(
        Q + b * stride_qb + qi[:, None].to(tl.int64) * stride_qs + hi[:, None] * stride_qh + offs_d[None, :],
        mask=m_ok[:, None] & (offs_d[None, :] < DI), other=0.0,
    )  # [BQ*HP, BD]
    w = tl.load(W + b * stride_wb + qi.to(tl.int64) * stride_ws + hi, mask=m_ok, other=0.0)  # [BQ*HP]
    offs_q = s0 + tl.arange(0, BQ)
    pos = tl.load(POS + b * stride_pb + offs_q, mask=offs_q < S, other=-1)  # [BQ]
    pos_max = tl.max(pos, axis=0)
    out_rows = OUT + b * stride_ob + offs_q[:, None].to(tl.int64) * stride_os  # [BQ,1]
    t_begin = tl.program_id(2) * (TILES * BT)
    for i in range(TILES):
        offs_t = t_begin + i * BT + tl.arange(0, BT)
        t_ok = offs_t < T
        scores = tl.full([BQ, BT], float("-inf"), tl.float32)
        if t_begin + i * BT <= pos_max:  # a tile past every query of the block is -inf without a product
            k = tl.load(
                Kc + b * stride_kb + offs_t[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                mask=t_ok[:, None] & (offs_d[None, :] < DI), other=0.0,
            ).to(q.dtype)  # [BT,BD]
            logits = tl.dot(q, tl.trans(k), input_precision=PREC)  # [BQ*HP, BT] fp32
            weighted = tl.maximum(logits, 0.0) * w[:, None]
            summed = tl.sum(tl.reshape(weighted, (BQ, HP, BT)), axis=1)  # [BQ,BT]: the sum over heads
            if HAS_SCALE:
                ks = tl.load(KS + b * stride_sb + offs_t.to(tl.int64) * stride_st, mask=t_ok, other=0.0)
                summed = summed * ks[None, :]
            scores = tl.where(offs_t[None, :] <= pos[:, None], summed, float("-inf"))
        tl.store(out_rows + offs_t[None, :], scores, mask=(offs_q[:, None] < S) & t_ok[None, :])


def indexer_scores(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    q_pos: torch.Tensor,
    T: int | None = None,
    config: IndexerConfig | None = None,
) -> torch.Tensor:
    """Causally masked indexer logits -> [B,S,T] fp32 (keys t > q_pos are -inf).

    q [B,S,HI,dI] (bf16/fp16/fp32, or e4m3 codes with q_scale [B,S,HI]), w [B,S,HI], k [B,T',dI] (any float, e.g.
    e4m3 codes with k_scale [B,T']), q_pos [B,S]; ``T`` (<= T') limits the keys scored. The query scales are folded
    into the weights (relu(c·x) = c·relu(x) for c > 0), the key scales applied after the head sum.
    """
    cfg = config or CONFIG
    B, S, HI, dI = q.shape
    T = k.shape[1] if T is None else T
    out = torch.empty(B, S, T, dtype=torch.float32, device=q.device)
    if B * S == 0 or T == 0:
        return out
    fp8 = torch.float8_e4m3fn
    if _INTERPRET or not q.is_cuda:  # the interpreter has no fp8 loads: the fp32 values the codes encode
        q = q.float() if q.dtype == fp8 else q
        k = k.float() if k.dtype == fp8 else k
    if q.dtype == fp8 and k.dtype != fp8:
        q = q.to(k.dtype)  # e4m3 x e4m3 only; a wider key gets a wider query
    if q.dtype not in (fp8, torch.float32, torch.bfloat16, torch.float16):
        q = q.float()
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    w = w.float() if q_scale is None else w.float() * q_scale.float()
    w = w.contiguous()
    pos = q_pos.to(torch.int64).contiguous()
    ks = k_scale.float() if k_scale is not None else out  # dummy pointer when unused
    grid = (B, triton.cdiv(S, cfg.block_q), triton.cdiv(T, cfg.block_t * cfg.tiles))
    _scores_kernel[grid](
        q, w, k, ks, pos, out,
        S, T, HI, dI,
        q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k.stride(0), k.stride(1),
        ks.stride(0), ks.stride(-1), pos.stride(0), out.stride(0), out.stride(1),
        # padded heads (weight 0) also lift the product's rows to the 16 tl.dot needs
        HAS_SCALE=k_scale is not None, BQ=cfg.block_q, HP=max(_p2(HI, 1), 16 // cfg.block_q), BD=_p2(dI),
        BT=cfg.block_t,
        TILES=cfg.tiles, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# ============================================================================================ top-k select


@triton.jit
def _order_key(x):
    """fp32 -> int32 whose signed order is the float order (-0 counts as +0, so they tie as in a sort)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _topk_select_kernel(
    SC, KK, OUT,  # scores [R,T] fp32, k per row [R] int32 (<= visible keys), out [R,topk] int32 (pre-filled -1)
    T, stride_sr, stride_or,
    BT: tl.constexpr, RB: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    kk = tl.load(KK + r)
    row = SC + r * stride_sr
    NB: tl.constexpr = 1 << RB
    if kk > 0:
        # the k-th largest key, in offset form u = key + 2^31 in [0, 2^32), RB bits per pass from the top:
        # the largest candidate prefix with at least kk keys >= it
        prefix = tl.zeros([1], tl.int64)
        digits = tl.arange(0, NB).to(tl.int64)
        for p in tl.static_range(32 // RB):
            shift = 32 - RB * (p + 1)  # a compile-time constant (static_range)
            cand = (prefix + (digits << shift) - 2147483648).to(tl.int32)  # [NB] as signed keys
            counts = tl.zeros([NB], tl.int32)
            for t0 in range(0, T, BT):
                offs = t0 + tl.arange(0, BT)
                ok = offs < T
                key = _order_key(tl.load(row + offs, mask=ok, other=float("-inf")))
                ge = (key[None, :] >= cand[:, None]) & ok[None, :]  # [NB,BT]
                counts += tl.sum(ge.to(tl.int32), axis=1)
            digit = tl.sum((counts >= kk).to(tl.int64), axis=0) - 1  # candidate 0 (the prefix) always qualifies
            prefix += digit << shift
        thr = (prefix - 2147483648).to(tl.int32)  # [1]
        n_gt = tl.zeros([1], tl.int32)
        for t0 in range(0, T, BT):
            offs = t0 + tl.arange(0, BT)
            key = _order_key(tl.load(row + offs, mask=offs < T, other=float("-inf")))
            n_gt += tl.sum(((key > thr) & (offs < T)).to(tl.int32), axis=0)
        need_eq = kk - n_gt  # ties at the threshold taken, lowest positions first
        base = tl.zeros([1], tl.int32)
        eq_base = tl.zeros([1], tl.int32)
        for t0 in range(0, T, BT):
            offs = t0 + tl.arange(0, BT)
            ok = offs < T
            key = _order_key(tl.load(row + offs, mask=ok, other=float("-inf")))
            eq = (key == thr) & ok
            eq_rank = eq_base + tl.cumsum(eq.to(tl.int32), axis=0) - 1
            sel = ((key > thr) & ok) | (eq & (eq_rank < need_eq))
            slot = base + tl.cumsum(sel.to(tl.int32), axis=0) - 1
            tl.store(OUT + r * stride_or + slot, offs.to(tl.int32), mask=sel)
            base += tl.sum(sel.to(tl.int32), axis=0)
            eq_base += tl.sum(eq.to(tl.int32), axis=0)


@triton.jit
def _prefix_after(COUNTS, r, kk, n_passes, stride_cp, stride_cr, RB: tl.constexpr):
    """The threshold's top RB * n_passes bits (offset form, int64) from the counts of the passes done: each pass's
    digit is the largest candidate with at least kk keys >= it. Every program recomputes it (a few loads) instead
    of a launch or a host step between passes."""
    NB: tl.constexpr = 1 << RB
    prefix = tl.zeros([1], tl.int64)
    for j in range(n_passes):
        c = tl.load(COUNTS + j * stride_cp + r * stride_cr + tl.arange(0, NB))
        digit = tl.sum((c >= kk).to(tl.int64), axis=0) - 1  # candidate 0 (the prefix) always qualifies
        prefix += digit << (32 - RB * (j + 1))
    return prefix


@triton.jit
def _radix_count_kernel(
    SC, KK, COUNTS,  # scores [R,T], k per row [R] int32, counts of every pass [passes,R,NB] int32 (zeroed)
    T, seg_len, pass_no, stride_sr, stride_cp, stride_cr,
    BT: tl.constexpr, RB: tl.constexpr,
):
    """Pass ``pass_no`` over one segment of a row: how many keys are >= each of the 2^RB candidate prefixes."""
    r = tl.program_id(0).to(tl.int64)
    kk = tl.load(KK + r)
    NB: tl.constexpr = 1 << RB
    if kk > 0:
        row = SC + r * stride_sr
        digits = tl.arange(0, NB).to(tl.int64)
        prefix = _prefix_after(COUNTS, r, kk, pass_no, stride_cp, stride_cr, RB)
        shift = 32 - RB * (pass_no + 1)
        cand = (prefix + (digits << shift) - 2147483648).to(tl.int32)  # [NB] as signed keys
        t_lo = tl.program_id(1).to(tl.int64) * seg_len
        t_hi = tl.minimum(t_lo + seg_len, T)
        counts = tl.zeros([NB], tl.int32)
        for t0 in range(t_lo, t_hi, BT):
            offs = t0 + tl.arange(0, BT)
            ok = offs < t_hi
            key = _order_key(tl.load(row + offs, mask=ok, other=float("-inf")))
            counts += tl.sum(((key[None, :] >= cand[:, None]) & ok[None, :]).to(tl.int32), axis=1)
        tl.atomic_add(COUNTS + pass_no * stride_cp + r * stride_cr + tl.arange(0, NB), counts, sem="relaxed")


@triton.jit
def _segment_tally_kernel(
    SC, KK, COUNTS, NGT, NEQ,  # ..., keys above / equal to the threshold per segment: [R,P] int32 each
    T, seg_len, stride_sr, stride_cp, stride_cr, stride_nr,
    BT: tl.constexpr, RB: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    kk = tl.load(KK + r)
    if kk > 0:
        row = SC + r * stride_sr
        thr = (_prefix_after(COUNTS, r, kk, 32 // RB, stride_cp, stride_cr, RB) - 2147483648).to(tl.int32)
        t_lo = seg.to(tl.int64) * seg_len
        t_hi = tl.minimum(t_lo + seg_len, T)
        n_gt = tl.zeros([BT], tl.int32)
        n_eq = tl.zeros([BT], tl.int32)
        for t0 in range(t_lo, t_hi, BT):
            offs = t0 + tl.arange(0, BT)
            ok = offs < t_hi
            key = _order_key(tl.load(row + offs, mask=ok, other=float("-inf")))
            n_gt += ((key > thr) & ok).to(tl.int32)
            n_eq += ((key == thr) & ok).to(tl.int32)
        tl.store(NGT + r * stride_nr + seg, tl.sum(n_gt, axis=0))
        tl.store(NEQ + r * stride_nr + seg, tl.sum(n_eq, axis=0))


@triton.jit
def _segment_gather_kernel(
    SC, KK, COUNTS, OUT_BASE, EQ_BASE, NEED_EQ, OUT,  # per segment: first output slot, ties before it [R,P];
    T, seg_len, stride_sr, stride_cp, stride_cr, stride_nr, stride_or,  # ties to take per row [R]; out [R,topk]
    BT: tl.constexpr, RB: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    kk = tl.load(KK + r)
    if kk > 0:
        row = SC + r * stride_sr
        thr = (_prefix_after(COUNTS, r, kk, 32 // RB, stride_cp, stride_cr, RB) - 2147483648).to(tl.int32)
        need_eq = tl.load(NEED_EQ + r)
        base = tl.load(OUT_BASE + r * stride_nr + seg)
        eq_base = tl.load(EQ_BASE + r * stride_nr + seg)
        t_lo = seg.to(tl.int64) * seg_len
        t_hi = tl.minimum(t_lo + seg_len, T)
        for t0 in range(t_lo, t_hi, BT):
            offs = t0 + tl.arange(0, BT)
            ok = offs < t_hi
            key = _order_key(tl.load(row + offs, mask=ok, other=float("-inf")))
            eq = (key == thr) & ok
            eq_rank = eq_base + tl.cumsum(eq.to(tl.int32), axis=0) - 1  # rank among the row's ties
            sel = ((key > thr) & ok) | (eq & (eq_rank < need_eq))
            slot = base + tl.cumsum(sel.to(tl.int32), axis=0) - 1
            tl.store(OUT + r * stride_or + slot, offs.to(tl.int32), mask=sel)
            base += tl.sum(sel.to(tl.int32), axis=0)
            eq_base += tl.sum(eq.to(tl.int32), axis=0)


def _topk_segmented(sc: torch.Tensor, kk: torch.Tensor, out: torch.Tensor, P: int, cfg: IndexerConfig) -> None:
    """The radix select with each row cut into P segments: one launch per pass (segments add their counts
    atomically; each program rebuilds the threshold so far from the earlier passes' counts, so nothing runs
    between launches and nothing waits on the host), then a tally of each segment's keys above / at the
    threshold, exclusive sums for every segment's first output slot and share of the ties, and a gather."""
    R, T = sc.shape
    n_pass = 32 // cfg.radix_bits
    seg_len = triton.cdiv(triton.cdiv(T, P), cfg.topk_block) * cfg.topk_block
    P = triton.cdiv(T, seg_len)
    grid = (R, P)
    counts = torch.zeros(n_pass, R, 1 << cfg.radix_bits, dtype=torch.int32, device=sc.device)
    for p in range(n_pass):
        _radix_count_kernel[grid](sc, kk, counts, T, seg_len, p, sc.stride(0), counts.stride(0), counts.stride(1),
                                  BT=cfg.topk_block, RB=cfg.radix_bits, num_warps=cfg.topk_warps)
    n_gt = torch.zeros(R, P, dtype=torch.int32, device=sc.device)
    n_eq = torch.zeros(R, P, dtype=torch.int32, device=sc.device)
    _segment_tally_kernel[grid](sc, kk, counts, n_gt, n_eq, T, seg_len, sc.stride(0), counts.stride(0),
                                counts.stride(1), n_gt.stride(0), BT=cfg.topk_block, RB=cfg.radix_bits,
                                num_warps=cfg.topk_warps)
    need_eq = kk - n_gt.sum(1, dtype=torch.int32)  # [R] ties taken, lowest positions first
    eq_before = n_eq.cumsum(1, dtype=torch.int32) - n_eq  # [R,P] ties in earlier segments
    taken = n_gt + (need_eq.unsqueeze(1) - eq_before).clamp(min=0).minimum(n_eq)  # [R,P] picks per segment
    out_base = (taken.cumsum(1, dtype=torch.int32) - taken).contiguous()
    _segment_gather_kernel[grid](sc, kk, counts, out_base, eq_before.contiguous(), need_eq.contiguous(), out,
                                 T, seg_len, sc.stride(0), counts.stride(0), counts.stride(1), out_base.stride(0),
                                 out.stride(0), BT=cfg.topk_block, RB=cfg.radix_bits, num_warps=cfg.topk_warps)


def topk_select(
    scores: torch.Tensor, n_visible: torch.Tensor, topk: int, ordered: bool = True, config: IndexerConfig | None = None
) -> torch.Tensor:
    """``cpu.select_topk``'s contract without sorting rows: scores [R,T] fp32 (-inf where invisible),
    n_visible [R] -> [R,topk] int32, -1 past the visible keys. ``ordered``: (score desc, position asc);
    otherwise position order."""
    cfg = config or CONFIG
    R, T = scores.shape
    out = torch.full((R, topk), -1, dtype=torch.int32, device=scores.device)
    if R == 0 or T == 0 or topk == 0:
        return out
    if 32 % cfg.radix_bits:
        raise ValueError(f"IndexerConfig.radix_bits must divide 32, got {cfg.radix_bits}")
    sc = scores if scores.stride(-1) == 1 else scores.contiguous()
    kk = n_visible.to(torch.int64).clamp(0, min(T, topk)).to(torch.int32).contiguous()
    segments = min(triton.cdiv(cfg.topk_min_programs, R), triton.cdiv(T, cfg.topk_block))
    if segments > 1:
        _topk_segmented(sc, kk, out, segments, cfg)
    else:
        _topk_select_kernel[(R,)](
            sc, kk, out, T, sc.stride(0), out.stride(0), BT=cfg.topk_block, RB=cfg.radix_bits,
            num_warps=cfg.topk_warps,
        )
    if ordered:  # the picks are in position order: a stable sort by score of only those k gives the canonical order
        vals = sc.gather(-1, out.clamp_min(0).long()).masked_fill(out < 0, float("-inf"))
        out = out.gather(-1, vals.sort(dim=-1, descending=True, stable=True).indices)
    return out


def indexer_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    q_pos: torch.Tensor,
    topk: int,
    chunk: int | None = None,
    ordered: bool = True,
    config: IndexerConfig | None = None,
) -> torch.Tensor:
    """``reference.indexer_topk``'s contract: q [B,S,HI,dI] (or e4m3 codes + q_scale [B,S,HI]), w [B,S,HI],
    k [B,T,dI] (+ k_scale [B,T]), q_pos [B,S] -> idx [B,S,topk] int32 (-1 padded, ties to the lower position).
    Queries in chunks so the [C, T] score block stays under ``cpu.SCORE_BYTES``."""
    B, S = q.shape[:2]
    T = k.shape[1]
    out = torch.full((B, S, topk), -1, dtype=torch.int32, device=q.device)
    if S == 0 or T == 0:
        return out
    C = chunk or max(1, min(4096, cpu.SCORE_BYTES // (4 * B * T)))
    for s0 in range(0, S, C):
        s1 = min(S, s0 + C)
        pos = q_pos[:, s0:s1]
        T_eff = min(T, int(pos.max()) + 1)
        if T_eff <= 0:
            continue
        qs = q_scale[:, s0:s1] if q_scale is not None else None
        scores = indexer_scores(q[:, s0:s1], w[:, s0:s1], k, k_scale=k_scale, q_scale=qs, q_pos=pos, T=T_eff,
                                config=config)  # [B,C,T_eff]
        n_visible = (pos + 1).clamp(0, T_eff)
        sel = topk_select(scores.view(-1, T_eff), n_visible.reshape(-1), topk, ordered, config)
        out[:, s0:s1] = sel.view(B, s1 - s0, topk)
    return out


__all__ = ["IndexerConfig", "CONFIG", "quantize_e4m3", "indexer_scores", "topk_select", "indexer_topk"]
