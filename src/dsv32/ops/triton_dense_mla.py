"""Dense MLA in the absorbed form, flash-decoding style, in Triton: the dense baseline DSA's decode is measured
against (docs/kernels.md).

Every head of a query reads the same latent rows kv [B, T, 576] (MQA form), so one program takes one query, a block
of ``block_h`` heads and one of ``num_splits`` slices of the keys it can see (t <= q_pos): each [block_t, D] tile
of the slice is read once for all the block's heads (scores on tensor cores, online softmax in fp32, base 2).
The slices write a partial (out, lse) each; a second kernel merges them by log-sum-exp. With split-K a decode of a
few sequences still fills the GPU: 16 sequences x 2 head blocks x 32 slices = 1,024 programs.

Forward only (no autograd): ``triton.dense_mla`` uses it when no gradient is needed and the chunked torch path
otherwise. Queries go ``partial_bytes`` worth at a time, which bounds the [rows, H, splits, Dv] fp32 partials.
Tiles and split count come from a ``DenseConfig``, never from the input sizes; offsets are int64. Nothing here has
been timed on a GPU.

Shape legend: B batch, S queries, T keys, H heads, D latent dim, Dv value dim, R = B*S query rows, NS splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsv32.ops.triton_sparse_mla import LOG2E, _dims, _precision


@dataclass(frozen=True)
class DenseConfig:
    """Tiles, split count and launch shape of the flash-decoding kernel (compile-time constants)."""

    block_h: int = 64  # heads per program (>= 16)
    block_t: int = 64  # keys per tile
    num_splits: int = 32  # key slices per query (split-K), merged by log-sum-exp
    num_warps: int = 8
    num_stages: int = 2
    partial_bytes: int = 256 << 20  # bound on the fp32 partials of one launch (query rows per launch follow)
    combine_h: int = 8  # heads per program of the merge (no tensor cores: [combine_h, Dv] fp32 in registers)


# A starting point for the H200 sweep (unmeasured): of the configurations compiled for sm_90 without a GPU
# (triton_sweep.compile_report), the one with the fewest register spills among those on wgmma (HGMMA).
CONFIG = DenseConfig(block_h=64, block_t=16, num_warps=8, num_stages=2)


@triton.jit
def _dense_mla_split_kernel(
    Q, KV, POS, PO, PL,  # q [R,H,D], kv [B,T,D], q_pos [R]; partials of rows [r0, r0+n): [n,H,NS,Dv], [n,H,NS]
    qk_scale, r0, S, T, H, D, DV, keys_per_split,
    stride_qr, stride_qh, stride_kvb, stride_kvt, stride_por, stride_poh, stride_pos, stride_plr, stride_plh,
    BH: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr, HAS_TAIL: tl.constexpr,
    PREC: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)  # row of this launch; r is the query row
    r = r0 + i
    b = r // S
    offs_h = tl.program_id(1) * BH + tl.arange(0, BH)
    split = tl.program_id(2)
    h_ok = offs_h < H
    h64 = offs_h[:, None].to(tl.int64)
    offs_v = tl.arange(0, BV)
    v_ok = offs_v < DV
    offs_e = DV + tl.arange(0, BR)
    e_ok = offs_e < D
    q_rows = Q + r * stride_qr + h64 * stride_qh
    qv = tl.load(q_rows + offs_v[None, :], mask=h_ok[:, None] & v_ok[None, :], other=0.0)  # [BH,BV]
    if HAS_TAIL:
        qe = tl.load(q_rows + offs_e[None, :], mask=h_ok[:, None] & e_ok[None, :], other=0.0)  # [BH,BR]
    pos = tl.load(POS + r)
    t_lo = split * keys_per_split
    t_hi = tl.minimum(tl.minimum(t_lo + keys_per_split, pos + 1), T)  # this slice's visible keys
    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BV], tl.float32)
    kv_b = KV + b * stride_kvb
    for t0 in range(t_lo, t_hi, BT):
        offs_t = t0 + tl.arange(0, BT)
        t_ok = offs_t < t_hi
        rows = kv_b + offs_t.to(tl.int64) * stride_kvt  # [BT]
        kvv = tl.load(rows[:, None] + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        kvv = kvv.to(qv.dtype)
        s = tl.dot(qv, tl.trans(kvv), input_precision=PREC)  # [BH,BT]
        if HAS_TAIL:
            kve = tl.load(rows[:, None] + offs_e[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0)
            s += tl.dot(qe, tl.trans(kve.to(qe.dtype)), input_precision=PREC)
        s = tl.where(t_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(kvv.dtype), kvv, acc * alpha[:, None], input_precision=PREC)  # rescale, accumulate in place
        m_i = m_new
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))  # base 2; -inf for an empty slice
    tl.store(PO + i * stride_por + h64 * stride_poh + split * stride_pos + offs_v[None, :], acc / l_safe[:, None],
             mask=h_ok[:, None] & v_ok[None, :])
    tl.store(PL + i * stride_plr + offs_h * stride_plh + split, lse, mask=h_ok)


@triton.jit
def _dense_mla_combine_kernel(
    PO, PL, OUT, LSE,  # partials [R,H,NS,Dv], [R,H,NS] (base-2 lse); out [R,H,Dv], lse [R,H] natural
    H, DV, NS,
    stride_por, stride_poh, stride_pos, stride_plr, stride_plh, stride_or, stride_oh, stride_lr,
    BH: tl.constexpr, BV: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BH + tl.arange(0, BH)
    h_ok = offs_h < H
    h64 = offs_h[:, None].to(tl.int64)
    offs_v = tl.arange(0, BV)
    hv = h_ok[:, None] & (offs_v[None, :] < DV)
    m = tl.full([BH], float("-inf"), tl.float32)
    for j in range(NS):
        m = tl.maximum(m, tl.load(PL + r * stride_plr + offs_h * stride_plh + j, mask=h_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, BV], tl.float32)
    for j in range(NS):
        wj = tl.exp2(tl.load(PL + r * stride_plr + offs_h * stride_plh + j, mask=h_ok, other=float("-inf")) - m_safe)
        oj = tl.load(PO + r * stride_por + h64 * stride_poh + j * stride_pos + offs_v[None, :], mask=hv, other=0.0)
        total += wj
        acc += wj[:, None] * oj
    has = total > 0
    t_safe = tl.where(has, total, 1.0)
    tl.store(OUT + r * stride_or + h64 * stride_oh + offs_v[None, :], (acc / t_safe[:, None]).to(OUT.dtype.element_ty),
             mask=hv)
    lse = tl.where(has, (m_safe + tl.log2(t_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + r * stride_lr + offs_h, lse, mask=h_ok)


def dense_mla_forward(
    q: torch.Tensor, kv: torch.Tensor, q_pos: torch.Tensor, v_dim: int, scale: float, config: DenseConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal absorbed-form attention: q [B,S,H,D], kv [B,T,D], q_pos [B,S] -> (out [B,S,H,Dv] in q's dtype,
    lse [B,S,H] fp32). Key t is visible to query s iff t <= q_pos[b, s]; no gradient."""
    cfg = config or CONFIG
    B, S, H, D = q.shape
    T = kv.shape[1]
    out_dtype = q.dtype if q.is_floating_point() else torch.float32
    out = torch.zeros(B * S, H, v_dim, dtype=out_dtype, device=q.device)
    lse = torch.full((B * S, H), float("-inf"), dtype=torch.float32, device=q.device)
    if B * S == 0 or T == 0 or H == 0:
        return out.view(B, S, H, v_dim), lse.view(B, S, H)
    qf = q.reshape(B * S, H, D)
    qf = qf if qf.stride(-1) == 1 else qf.contiguous()
    kvc = kv if kv.stride(-1) == 1 else kv.contiguous()
    pos = q_pos.reshape(B * S).to(torch.int64).contiguous()
    BV, BR, has_tail = _dims(D, v_dim)
    NS = cfg.num_splits
    T_eff = min(T, int(pos.max()) + 1)
    per_split = triton.cdiv(max(T_eff, 1), NS * cfg.block_t) * cfg.block_t  # whole tiles per slice
    rows = max(1, min(B * S, cfg.partial_bytes // (4 * H * NS * v_dim)))
    for r0 in range(0, B * S, rows):  # query rows per launch: bounds the [rows, H, NS, Dv] partials
        n = min(B * S, r0 + rows) - r0
        po = torch.empty(n, H, NS, v_dim, dtype=torch.float32, device=q.device)
        pl = torch.empty(n, H, NS, dtype=torch.float32, device=q.device)
        _dense_mla_split_kernel[(n, triton.cdiv(H, cfg.block_h), NS)](
            qf, kvc, pos, po, pl,
            float(scale) * LOG2E, r0, S, T, H, D, v_dim, per_split,
            qf.stride(0), qf.stride(1), kvc.stride(0), kvc.stride(1), po.stride(0), po.stride(1), po.stride(2),
            pl.stride(0), pl.stride(1),
            BH=cfg.block_h, BT=cfg.block_t, BV=BV, BR=BR, HAS_TAIL=has_tail, PREC=_precision(qf),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        o_c, l_c = out[r0 : r0 + n], lse[r0 : r0 + n]
        _dense_mla_combine_kernel[(n, triton.cdiv(H, cfg.combine_h))](
            po, pl, o_c, l_c, H, v_dim, NS,
            po.stride(0), po.stride(1), po.stride(2), pl.stride(0), pl.stride(1), o_c.stride(0), o_c.stride(1),
            l_c.stride(0),
            BH=cfg.combine_h, BV=BV, num_warps=4,
        )
    return out.view(B, S, H, v_dim), lse.view(B, S, H)


__all__ = ["DenseConfig", "CONFIG", "dense_mla_forward"]
