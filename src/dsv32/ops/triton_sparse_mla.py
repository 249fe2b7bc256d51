"""Sparse MLA in Triton, forward and backward, in FlashMLA's formulation (paper §2.1; docs/kernels.md).

In the absorbed (MQA) form every head of a query attends to the same K gathered latent rows, so one program takes
one query and a block of ``block_h`` heads (FlashMLA: 64) and streams the query's top-k rows in tiles of
``block_k``: each gathered [block_k, D] tile is read from memory once for all those heads and feeds two tensor-core
products, scores [BH, BK] = q · kvᵀ and out += p · v, where v is the tile's first ``v_dim`` columns (the same
registers: a latent row is both key and value). Softmax is online, in fp32, in base 2 (the scale carries log2 e).

The latent dim D (576 in V3.2) is not a power of two, so a row is read as two column blocks: the value part
[0, Dv) padded to ``BV`` = next power of two of Dv (512) and the tail [Dv, D) padded to ``BR`` (64 for the rope
dims). Both are masked, so any D >= Dv works.

Backward (``sparse_mla_backward``): the same program layout recomputes p = exp(s - lse) from the forward's lse,
forms dS = p · (dO vᵀ - delta) with delta = rowsum(dO · O) - dlse, accumulates dq in registers, and adds each
tile's dkv rows (scale · dSᵀ q, plus pᵀ dO on the value columns) into one fp32 [B, T, D] buffer with atomics:
no [S, K, D] per-query temporary. Summing over the program's heads happens in the product before the atomic,
so a 128-head model with ``block_h`` 64 issues two atomic adds per (query, selected row, column).

All row × stride products are int64 (program ids and gathered indices are cast first). Tile sizes are
constexpr, chosen by a ``TileConfig`` (the default, or the caller's, e.g. from an autotune sweep), never from
the input sizes. Nothing here has been timed on a GPU (docs/kernels.md lists what is unmeasured).

Shape legend: B batch, S queries, T keys, H heads, D latent dim, Dv value dim, K top-k, R = B*S query rows;
tiles: BH heads, BK selected rows, BV value columns, BR tail columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclass(frozen=True)
class TileConfig:
    """Tiles and launch shape of one sparse-MLA kernel (compile-time constants)."""

    block_h: int = 64  # heads per program; >= 16 (tensor-core M); one gathered tile serves all of them
    block_k: int = 64  # gathered latent rows per tile
    num_warps: int = 8
    num_stages: int = 2


# Defaults for the H200 sweep to start from (unmeasured): of the configurations compiled for sm_90 without a GPU
# (``triton_sweep.compile_report``, V3.2 shapes), those with the fewest register spills. The forward keeps
# FlashMLA's 64 heads on wgmma (the [64, 512] fp32 accumulator alone is 128 registers a thread at 8 warps); the
# backward, which also keeps dq [BH, 576] and dO [BH, 512] live, takes 32 heads on mma.sync.
FWD_CONFIG = TileConfig(block_h=64, block_k=16, num_warps=8, num_stages=2)
BWD_CONFIG = TileConfig(block_h=32, block_k=16, num_warps=8, num_stages=1)


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _precision(t: torch.Tensor) -> str:
    """fp32 inputs multiply in IEEE fp32 (tests compare with the fp32 reference); bf16/fp16 on tensor cores."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _dims(D: int, v_dim: int) -> tuple[int, int, bool]:
    """(BV, BR, has_tail): padded widths of the value columns [0, Dv) and the tail [Dv, D)."""
    if not 0 < v_dim <= D:
        raise ValueError(f"triton_sparse_mla: v_dim {v_dim} must be in (0, D={D}]")
    return _p2(v_dim), _p2(max(1, D - v_dim)), D > v_dim


def _rows(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A [R, ...] view of ``x`` with unit stride in its last dim (a copy only where the strides demand it)."""
    y = x.reshape(shape)
    if y.stride(-1) != 1:
        y = y.contiguous()
    return y


# ============================================================================================ forward


@triton.jit
def _sparse_mla_fwd_kernel(
    Q, KV, IDX, OUT, LSE,  # q [R,H,D], kv [B,T,D], idx [R,K], out [R,H,Dv], lse [R,H] fp32
    qk_scale, S, T, H, D, DV, K,
    stride_qr, stride_qh, stride_kvb, stride_kvt, stride_ir, stride_or, stride_oh, stride_lr,
    BH: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr, HAS_TAIL: tl.constexpr,
    PREC: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # query row in [0, B*S)
    b = r // S
    offs_h = tl.program_id(1) * BH + tl.arange(0, BH)
    h_ok = offs_h < H
    offs_v = tl.arange(0, BV)
    v_ok = offs_v < DV
    offs_e = DV + tl.arange(0, BR)  # tail columns (rope dims)
    e_ok = offs_e < D
    q_rows = Q + r * stride_qr + offs_h[:, None].to(tl.int64) * stride_qh
    qv = tl.load(q_rows + offs_v[None, :], mask=h_ok[:, None] & v_ok[None, :], other=0.0)  # [BH,BV]
    if HAS_TAIL:
        qe = tl.load(q_rows + offs_e[None, :], mask=h_ok[:, None] & e_ok[None, :], other=0.0)  # [BH,BR]
    m_i = tl.full([BH], float("-inf"), tl.float32)  # running max of the base-2 scores
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BV], tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        idx = tl.load(IDX + r * stride_ir + offs_k, mask=offs_k < K, other=-1)
        valid = (idx >= 0) & (idx < T)
        rows = KV + b * stride_kvb + tl.where(valid, idx, 0).to(tl.int64) * stride_kvt  # [BK]
        # the tile is loaded once and serves every head of the block, as key (both parts) and value (first part)
        kvv = tl.load(rows[:, None] + offs_v[None, :], mask=valid[:, None] & v_ok[None, :], other=0.0)
        kvv = kvv.to(qv.dtype)  # latents stored narrower than q (FP8/int8) are upcast in registers
        s = tl.dot(qv, tl.trans(kvv), input_precision=PREC)  # [BH,BK] fp32
        if HAS_TAIL:
            kve = tl.load(rows[:, None] + offs_e[None, :], mask=valid[:, None] & e_ok[None, :], other=0.0)
            s += tl.dot(qe, tl.trans(kve.to(qe.dtype)), input_precision=PREC)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep p = 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])  # [BH,BK], 0 on -1 slots
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(kvv.dtype), kvv, acc * alpha[:, None], input_precision=PREC)  # rescale, accumulate in place
        m_i = m_new
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # natural log
    tl.store(
        OUT + r * stride_or + offs_h[:, None].to(tl.int64) * stride_oh + offs_v[None, :],
        out.to(OUT.dtype.element_ty), mask=h_ok[:, None] & v_ok[None, :],
    )
    tl.store(LSE + r * stride_lr + offs_h, lse, mask=h_ok)


def sparse_mla_forward(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, v_dim: int, scale: float,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,S,H,D], kv [B,T,D] (any float/int8 dtype, read through its strides), idx [B,S,K] (-1 = empty)
    -> (out [B,S,H,Dv] in q's dtype, zeros for a row with no valid key; lse [B,S,H] fp32, -inf for such rows)."""
    cfg = config or FWD_CONFIG
    B, S, H, D = q.shape
    T, K = kv.shape[1], idx.shape[-1]
    if kv.shape[0] != B or kv.shape[2] != D or idx.shape[:2] != (B, S):
        raise ValueError(
            f"triton_sparse_mla: q {tuple(q.shape)}, kv {tuple(kv.shape)}, idx {tuple(idx.shape)} disagree")
    out_dtype = q.dtype if q.is_floating_point() else torch.float32
    out = torch.zeros(B * S, H, v_dim, dtype=out_dtype, device=q.device)
    lse = torch.full((B * S, H), float("-inf"), dtype=torch.float32, device=q.device)
    if B * S == 0 or K == 0 or H == 0:
        return out.view(B, S, H, v_dim), lse.view(B, S, H)
    qf = _rows(q, (B * S, H, D))
    kvc = kv if kv.stride(-1) == 1 else kv.contiguous()  # a strided cache view is read in place
    ic = idx.reshape(B * S, K).to(torch.int32).contiguous()
    BV, BR, has_tail = _dims(D, v_dim)
    grid = (B * S, triton.cdiv(H, cfg.block_h))
    _sparse_mla_fwd_kernel[grid](
        qf, kvc, ic, out, lse,
        float(scale) * LOG2E, S, T, H, D, v_dim, K,
        qf.stride(0), qf.stride(1), kvc.stride(0), kvc.stride(1), ic.stride(0), out.stride(0), out.stride(1),
        lse.stride(0),
        BH=cfg.block_h, BK=cfg.block_k, BV=BV, BR=BR, HAS_TAIL=has_tail, PREC=_precision(qf),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.view(B, S, H, v_dim), lse.view(B, S, H)


# ============================================================================================ backward


@triton.jit
def _sparse_mla_bwd_kernel(
    Q, KV, IDX, O, DO, LSE, DLSE, DQ, DKV,  # q [R,H,D], kv [B,T,D], idx [R,K], o/do [R,H,Dv], lse/dlse [R,H],
    qk_scale, scale, S, T, H, D, DV, K,  # dq [R,H,D], dkv [B,T,D] fp32 (zeroed; atomics)
    stride_qr, stride_qh, stride_kvb, stride_kvt, stride_ir, stride_or, stride_oh, stride_dr, stride_dh,
    stride_lr, stride_gr, stride_gh, stride_db, stride_dt,
    HAS_DLSE: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr,
    HAS_TAIL: tl.constexpr, PREC: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    b = r // S
    offs_h = tl.program_id(1) * BH + tl.arange(0, BH)
    h_ok = offs_h < H
    h64 = offs_h[:, None].to(tl.int64)
    offs_v = tl.arange(0, BV)
    v_ok = offs_v < DV
    offs_e = DV + tl.arange(0, BR)
    e_ok = offs_e < D
    hv = h_ok[:, None] & v_ok[None, :]
    q_rows = Q + r * stride_qr + h64 * stride_qh
    qv = tl.load(q_rows + offs_v[None, :], mask=hv, other=0.0)  # [BH,BV]
    if HAS_TAIL:
        qe = tl.load(q_rows + offs_e[None, :], mask=h_ok[:, None] & e_ok[None, :], other=0.0)  # [BH,BR]
    do = tl.load(DO + r * stride_dr + h64 * stride_dh + offs_v[None, :], mask=hv, other=0.0)  # [BH,BV]
    o = tl.load(O + r * stride_or + h64 * stride_oh + offs_v[None, :], mask=hv, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # [BH]
    if HAS_DLSE:
        delta -= tl.load(DLSE + r * stride_lr + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    lse = tl.load(LSE + r * stride_lr + offs_h, mask=h_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)  # base 2, as the scores
    do = do.to(qv.dtype)
    dqv = tl.zeros([BH, BV], tl.float32)
    if HAS_TAIL:
        dqe = tl.zeros([BH, BR], tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        idx = tl.load(IDX + r * stride_ir + offs_k, mask=offs_k < K, other=-1)
        valid = (idx >= 0) & (idx < T)
        row_off = tl.where(valid, idx, 0).to(tl.int64)
        rows = KV + b * stride_kvb + row_off * stride_kvt  # [BK]
        kvv = tl.load(rows[:, None] + offs_v[None, :], mask=valid[:, None] & v_ok[None, :], other=0.0)
        kvv = kvv.to(qv.dtype)
        s = tl.dot(qv, tl.trans(kvv), input_precision=PREC)  # [BH,BK]
        if HAS_TAIL:
            kve = tl.load(rows[:, None] + offs_e[None, :], mask=valid[:, None] & e_ok[None, :], other=0.0)
            kve = kve.to(qe.dtype)
            s += tl.dot(qe, tl.trans(kve), input_precision=PREC)
        keep = h_ok[:, None] & valid[None, :]
        p = tl.where(keep, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)  # [BH,BK] probabilities
        dp = tl.dot(do, tl.trans(kvv), input_precision=PREC)  # [BH,BK]
        ds = p * (dp - delta[:, None])  # [BH,BK]; the softmax scale is applied once, below
        dsc = ds.to(qv.dtype)
        dqv += tl.dot(dsc, kvv, input_precision=PREC)
        # this tile's latent-row gradients, summed over the block's heads by the products themselves
        dkv_v = tl.dot(tl.trans(dsc), qv, input_precision=PREC) * scale  # [BK,BV]
        dkv_v += tl.dot(tl.trans(p.to(qv.dtype)), do, input_precision=PREC)
        g_rows = DKV + b * stride_db + row_off * stride_dt  # [BK]
        tl.atomic_add(g_rows[:, None] + offs_v[None, :], dkv_v, mask=valid[:, None] & v_ok[None, :], sem="relaxed")
        if HAS_TAIL:
            dqe += tl.dot(dsc, kve, input_precision=PREC)
            dkv_e = tl.dot(tl.trans(dsc), qe, input_precision=PREC) * scale  # [BK,BR]
            tl.atomic_add(g_rows[:, None] + offs_e[None, :], dkv_e, mask=valid[:, None] & e_ok[None, :],
                          sem="relaxed")
    dq_rows = DQ + r * stride_gr + h64 * stride_gh
    tl.store(dq_rows + offs_v[None, :], (dqv * scale).to(DQ.dtype.element_ty), mask=hv)
    if HAS_TAIL:
        tl.store(dq_rows + offs_e[None, :], (dqe * scale).to(DQ.dtype.element_ty), mask=h_ok[:, None] & e_ok[None, :])


def sparse_mla_backward(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dout: torch.Tensor, dlse: torch.Tensor | None, v_dim: int, scale: float, config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients from the forward's (out, lse): dS = p (dO vᵀ - rowsum(dO O) + dlse), dq = scale dS kv,
    dkv[idx] += scale dSᵀ q (+ pᵀ dO on the value columns). Returns (dq [B,S,H,D] in q's dtype, dkv [B,T,D] fp32)."""
    cfg = config or BWD_CONFIG
    B, S, H, D = q.shape
    T, K = kv.shape[1], idx.shape[-1]
    dq = torch.zeros(B * S, H, D, dtype=q.dtype, device=q.device)
    dkv = torch.zeros(B, T, D, dtype=torch.float32, device=q.device)
    if B * S == 0 or K == 0 or H == 0:
        return dq.view(B, S, H, D), dkv
    qf = _rows(q, (B * S, H, D))
    of = _rows(out, (B * S, H, v_dim))
    dof = _rows(dout, (B * S, H, v_dim))
    kvc = kv if kv.stride(-1) == 1 else kv.contiguous()
    ic = idx.reshape(B * S, K).to(torch.int32).contiguous()
    lf = lse.reshape(B * S, H).float().contiguous()
    dl = dlse.reshape(B * S, H).float().contiguous() if dlse is not None else lf  # dummy pointer when unused
    BV, BR, has_tail = _dims(D, v_dim)
    grid = (B * S, triton.cdiv(H, cfg.block_h))
    _sparse_mla_bwd_kernel[grid](
        qf, kvc, ic, of, dof, lf, dl, dq, dkv,
        float(scale) * LOG2E, float(scale), S, T, H, D, v_dim, K,
        qf.stride(0), qf.stride(1), kvc.stride(0), kvc.stride(1), ic.stride(0), of.stride(0), of.stride(1),
        dof.stride(0), dof.stride(1), lf.stride(0), dq.stride(0), dq.stride(1), dkv.stride(0), dkv.stride(1),
        HAS_DLSE=dlse is not None, BH=cfg.block_h, BK=cfg.block_k, BV=BV, BR=BR, HAS_TAIL=has_tail,
        PREC=_precision(qf), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq.view(B, S, H, D), dkv


class SparseMLA(torch.autograd.Function):
    """Triton forward and backward; saves (q, kv, idx, out, lse), never the [S, H, K] probabilities."""

    @staticmethod
    def forward(ctx, q, kv, idx, v_dim: int, scale: float):  # type: ignore[override]
        out, lse = sparse_mla_forward(q, kv, idx, v_dim, scale)
        ctx.save_for_backward(q, kv, idx, out, lse)
        ctx.v_dim, ctx.scale = v_dim, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, kv, idx, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dkv = sparse_mla_backward(q, kv, idx, out, lse, dout, dlse, ctx.v_dim, ctx.scale)
        return dq, dkv.to(kv.dtype), None, None, None


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, *, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.sparse_mla``'s contract with Triton forward and backward: q [B,S,H,D], kv [B,T,D], idx [B,S,K]
    -> (out [B,S,H,Dv] in q's dtype, lse [B,S,H] fp32); differentiable in q and kv."""
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        return SparseMLA.apply(q, kv, idx, v_dim, scale)
    return sparse_mla_forward(q, kv, idx, v_dim, scale)


__all__ = ["TileConfig", "FWD_CONFIG", "BWD_CONFIG", "SparseMLA", "sparse_mla", "sparse_mla_forward",
           "sparse_mla_backward"]
