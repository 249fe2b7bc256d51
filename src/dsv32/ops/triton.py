"""Triton GPU kernels for DSA (optional import): the ops' CUDA backend (docs/kernels.md).

Importing this module raises ImportError when ``triton`` is missing; ``dsv32.ops`` then falls back to the
plain-torch path (``cpu.py``), which runs on any device. On CUDA tensors the dispatcher picks these kernels
first. Correctness is tested on CPU with Triton's interpreter (``TRITON_INTERPRET=1``) at small shapes.

``KERNELS`` says which kernel each op runs (``use_kernels`` switches them for a block, e.g. for A/B timing):

- sparse MLA, ``"heads"`` (default): ``triton_sparse_mla``, FlashMLA's formulation (one program per query and
  block of heads, each gathered tile read once for all of them) with a Triton backward (dq in registers, dkv by
  atomics). ``"rows"``: the first kernel here, one program per (query, head tile) with BH 16, and the chunked
  torch backward of ``cpu.py``.
- indexer, ``"tiled"`` (default): ``triton_indexer``, (query block x heads) rows per tensor-core product, FP8
  e4m3 codes with per-row scales where given (``fp8_queries`` quantises the queries too), then a radix
  threshold select that never sorts a whole row. ``"rows"``: the first scores kernel here (one program per
  query) and ``cpu.select_topk`` (``torch.topk``).
- dense MLA, ``"split"`` (default): ``triton_dense_mla``, flash decoding (split-K over the keys, log-sum-exp
  merge) when no gradient is needed, else the chunked torch path; ``"torch"``: always ``cpu.dense_mla``.

Every row x stride product is formed in int64 (program ids and gathered row indices are cast first): a 64-sequence
decode at 128K puts a batch's latent rows 4.7e9 elements into the cache, and a long prefill's q rows pass 2^31
elements too. Query and key tensors are read through their strides (a cache view is not copied); temporaries
are the caller's to bound (the model runs the absorbed form in query chunks).

Nothing here has been timed on a GPU; docs/kernels.md lists what is unmeasured.

Shape legend: B batch, S queries, T keys, H heads, HI indexer heads, dI indexer head dim, D latent dim,
Dv value dim, K top-k; tiles: BH heads, BT keys, BK selected keys, BD/BV feature dims.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from dsv32.ops import cpu, triton_dense_mla, triton_indexer, triton_sparse_mla

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Kernels:
    """Which kernel each op of this backend runs (module docstring); a behaviour switch, not a size test."""

    sparse_mla: str = "heads"  # "heads" | "rows"
    indexer: str = "tiled"  # "tiled" | "rows"
    fp8_queries: bool = False  # tiled indexer: quantise q to e4m3 per (token, head), the scale into the weights
    dense_mla: str = "split"  # "split" | "torch"


KERNELS = Kernels()
_CHOICES = {"sparse_mla": ("heads", "rows"), "indexer": ("tiled", "rows"), "dense_mla": ("split", "torch")}


@contextmanager
def use_kernels(**choices: object) -> Iterator[Kernels]:
    """Run the block with some ``Kernels`` fields changed (process-global, like ``ops.override``)."""
    global KERNELS
    for name, value in choices.items():
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ValueError(f"ops.triton.use_kernels: {name}={value!r} (one of {', '.join(_CHOICES[name])})")
    saved = KERNELS
    KERNELS = replace(KERNELS, **choices)
    try:
        yield KERNELS
    finally:
        KERNELS = saved


def supports(t: torch.Tensor, op: str) -> bool:
    """Real kernels need a CUDA tensor (tests call the functions directly under the interpreter)."""
    return t.is_cuda


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _precision(t: torch.Tensor) -> str:
    """fp32 inputs multiply in IEEE fp32 (selection must match the fp32 reference); bf16/fp16 use tensor cores."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


# ============================================================================================ indexer


@triton.jit
def _indexer_scores_kernel(
    Q, W, Kc, KS, POS, OUT,  # q [R,HI,dI], w [R,HI], k [B,T,dI], k_scale [B,T], q_pos [R], out [R,T]
    S, T, HI, DI,
    stride_qr, stride_qh, stride_wr, stride_kb, stride_kt, stride_sb, stride_st, stride_or,
    HAS_SCALE: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # query row in [0, B*S); int64: every row x stride below is 64-bit
    b = r // S
    offs_t = tl.program_id(1) * BT + tl.arange(0, BT)
    offs_h = tl.arange(0, BH)
    offs_d = tl.arange(0, BD)
    q = tl.load(
        Q + r * stride_qr + offs_h[:, None] * stride_qh + offs_d[None, :],
        mask=(offs_h[:, None] < HI) & (offs_d[None, :] < DI), other=0.0,
    )  # [BH,BD]
    k = tl.load(
        Kc + b * stride_kb + offs_t[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
        mask=(offs_t[:, None] < T) & (offs_d[None, :] < DI), other=0.0,
    ).to(q.dtype)  # [BT,BD]
    logits = tl.dot(q, tl.trans(k), input_precision=PREC)  # [BH,BT] fp32
    if HAS_SCALE:
        ks = tl.load(KS + b * stride_sb + offs_t * stride_st, mask=offs_t < T, other=0.0)
        logits = logits * ks[None, :]
    w = tl.load(W + r * stride_wr + offs_h, mask=offs_h < HI, other=0.0).to(tl.float32)
    scores = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)  # [BT]
    pos = tl.load(POS + r)
    scores = tl.where(offs_t <= pos, scores, float("-inf"))
    tl.store(OUT + r * stride_or + offs_t, scores, mask=offs_t < T)


def indexer_scores_rows(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    q_pos: torch.Tensor,
    T: int | None = None,
) -> torch.Tensor:
    """The first scores kernel (one program per query and key tile). Causally masked indexer logits:
    q [B,S,HI,dI], w [B,S,HI], k [B,T',dI], q_pos [B,S] -> [B,S,T] fp32.

    ``T`` (<= T') limits the keys scored; keys t > q_pos are -inf. k may be FP8 e4m3 with k_scale [B,T'].
    """
    B, S, HI, dI = q.shape
    T = k.shape[1] if T is None else T
    out = torch.empty(B, S, T, dtype=torch.float32, device=q.device)
    if B * S == 0 or T == 0:
        return out
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        q = q.float()
    if k.dtype == torch.float8_e4m3fn and (_INTERPRET or not q.is_cuda):
        k = k.float()  # the interpreter has no fp8 loads
    q = q.reshape(B * S, HI, dI)  # a view where the strides allow (no copy of a strided cache or query)
    q = q if q.stride(-1) == 1 else q.contiguous()
    w = w.reshape(B * S, HI).float().contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    pos = q_pos.reshape(B * S).to(torch.int64).contiguous()
    ks = k_scale.float() if k_scale is not None else out  # dummy pointer when unused
    BT = 64
    grid = (B * S, triton.cdiv(T, BT))
    _indexer_scores_kernel[grid](
        q, w, k, ks, pos, out,
        S, T, HI, dI,
        q.stride(0), q.stride(1), w.stride(0), k.stride(0), k.stride(1), ks.stride(0), ks.stride(-1), T,
        HAS_SCALE=k_scale is not None, BH=_p2(HI), BD=_p2(dI), BT=BT, PREC=_precision(q),
    )
    return out.view(B, S, T)


def indexer_topk_rows(
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
    """``reference.indexer_topk``'s contract; scores from the first kernel, [C,T] per query chunk, torch top-k."""
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
        scores = indexer_scores_rows(q[:, s0:s1], w[:, s0:s1], k, k_scale=k_scale, q_pos=pos, T=T_eff)  # [B,C,T_eff]
        n_visible = (pos + 1).clamp(0, T_eff)
        out[:, s0:s1] = cpu.select_topk(scores.view(-1, T_eff), n_visible.reshape(-1), topk, ordered).view(B, -1, topk)
    return out


# ============================================================================================ sparse MLA


@triton.jit
def _sparse_mla_fwd_kernel(
    Q, KV, IDX, OUT, LSE,  # q [R,H,D], kv [B,T,D], idx [R,K], out [R,H,Dv] fp32, lse [R,H] fp32
    scale, S, T, H, D, DV, K,
    stride_qr, stride_qh, stride_kvb, stride_kvt, stride_ir, stride_or, stride_oh, stride_lr,
    BH: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, ND: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # query row in [0, B*S); int64: every row x stride below is 64-bit
    b = r // S
    offs_h = tl.program_id(1) * BH + tl.arange(0, BH)
    h_ok = offs_h < H
    offs_v = tl.arange(0, BV)
    m_i = tl.full([BH], float("-inf"), tl.float32)  # running max of the scaled scores
    l_i = tl.zeros([BH], tl.float32)  # running sum of exp(s - m_i)
    acc = tl.zeros([BH, BV], tl.float32)
    q_row = Q + r * stride_qr + offs_h[:, None] * stride_qh
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        idx = tl.load(IDX + r * stride_ir + offs_k, mask=offs_k < K, other=-1)
        valid = (idx >= 0) & (idx < T)
        rows = KV + b * stride_kvb + tl.where(valid, idx, 0).to(tl.int64) * stride_kvt  # [BK] row pointers
        s = tl.zeros([BH, BK], tl.float32)
        for dc in tl.static_range(ND):
            offs_d = dc * BD + tl.arange(0, BD)
            qd = tl.load(q_row + offs_d[None, :], mask=h_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            kd = tl.load(rows[:, None] + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
            s += tl.dot(qd, tl.trans(kd.to(qd.dtype)), input_precision=PREC)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])  # [BH,BK], 0 on -1 slots
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(rows[:, None] + offs_v[None, :], mask=valid[:, None] & (offs_v[None, :] < DV), other=0.0)
        v = v.to(Q.dtype.element_ty)  # latents stored narrower than q (FP8/int8) are upcast in registers
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(
        OUT + r * stride_or + offs_h[:, None] * stride_oh + offs_v[None, :], out,
        mask=h_ok[:, None] & (offs_v[None, :] < DV),
    )
    tl.store(LSE + r * stride_lr + offs_h, lse, mask=h_ok)


def sparse_mla_forward_rows(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first forward (one program per query and 16-head tile): q [B,S,H,D], kv [B,T,D], idx [B,S,K]
    -> (out [B,S,H,Dv] fp32, lse [B,S,H] fp32)."""
    B, S, H, D = q.shape
    T, K = kv.shape[1], idx.shape[-1]
    out = torch.zeros(B * S, H, v_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((B * S, H), float("-inf"), dtype=torch.float32, device=q.device)
    if B * S == 0 or K == 0:
        return out.view(B, S, H, v_dim), lse.view(B, S, H)
    qf = q.reshape(B * S, H, D)  # a view where the strides allow
    qf = qf if qf.stride(-1) == 1 else qf.contiguous()
    kvc = kv if kv.stride(-1) == 1 else kv.contiguous()  # a strided cache view is read in place
    ic = idx.reshape(B * S, K).to(torch.int32).contiguous()
    BV = _p2(v_dim)
    BH = max(16, min(_p2(H), 8192 // BV))  # the [BH,BV] fp32 accumulator lives in registers: 16 heads at Dv 512
    BD = min(64, _p2(D))
    grid = (B * S, triton.cdiv(H, BH))
    _sparse_mla_fwd_kernel[grid](
        qf, kvc, ic, out, lse,
        float(scale), S, T, H, D, v_dim, K,
        qf.stride(0), qf.stride(1), kvc.stride(0), kvc.stride(1), ic.stride(0), out.stride(0), out.stride(1),
        lse.stride(0),
        BH=BH, BK=32, BD=BD, ND=triton.cdiv(D, BD), BV=BV, PREC=_precision(qf),
    )
    return out.view(B, S, H, v_dim), lse.view(B, S, H)


# The first forward with the chunked torch backward recomputing from the saved lse (``cpu.sparse_mla_backward``).
SparseMLARows, sparse_mla_rows = cpu.make_sparse_mla(sparse_mla_forward_rows)


# ============================================================================================ the ops


def indexer_scores(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    q_pos: torch.Tensor,
    T: int | None = None,
) -> torch.Tensor:
    """Causally masked indexer logits: q [B,S,HI,dI], w [B,S,HI], k [B,T',dI], q_pos [B,S] -> [B,S,T] fp32.

    ``T`` (<= T') limits the keys scored; keys t > q_pos are -inf. k may be FP8 e4m3 with k_scale [B,T'].
    """
    if KERNELS.indexer == "rows":
        return indexer_scores_rows(q, w, k, k_scale=k_scale, q_pos=q_pos, T=T)
    q_scale = None
    if KERNELS.fp8_queries:
        q, q_scale = triton_indexer.quantize_e4m3(q)
    return triton_indexer.indexer_scores(q, w, k, k_scale=k_scale, q_scale=q_scale, q_pos=q_pos, T=T)


def select_topk(scores: torch.Tensor, n_visible: torch.Tensor, topk: int, ordered: bool = True) -> torch.Tensor:
    """``cpu.select_topk``'s contract: scores [R,T] (-inf where invisible), n_visible [R] -> [R,topk] int32."""
    if KERNELS.indexer == "rows":
        return cpu.select_topk(scores, n_visible, topk, ordered)
    return triton_indexer.topk_select(scores, n_visible, topk, ordered)


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
    """Same contract as ``reference.indexer_topk`` (ties to the lower position, -1 padding)."""
    if KERNELS.indexer == "rows":
        return indexer_topk_rows(q, w, k, k_scale=k_scale, q_pos=q_pos, topk=topk, chunk=chunk, ordered=ordered)
    q_scale = None
    if KERNELS.fp8_queries:
        q, q_scale = triton_indexer.quantize_e4m3(q)  # [B,S,HI,dI] codes, [B,S,HI] scales
    return triton_indexer.indexer_topk(q, w, k, k_scale=k_scale, q_scale=q_scale, q_pos=q_pos, topk=topk,
                                       chunk=chunk, ordered=ordered)


def sparse_mla_forward(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-autograd forward: q [B,S,H,D], kv [B,T,D], idx [B,S,K] -> (out [B,S,H,Dv], lse [B,S,H] fp32)."""
    if KERNELS.sparse_mla == "rows":
        return sparse_mla_forward_rows(q, kv, idx, v_dim, scale)
    return triton_sparse_mla.sparse_mla_forward(q, kv, idx, v_dim, scale)


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, *, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.sparse_mla``'s contract, differentiable in q and kv: (out [B,S,H,Dv] in q's dtype, lse)."""
    if KERNELS.sparse_mla == "rows":
        return sparse_mla_rows(q, kv, idx, v_dim=v_dim, scale=scale)
    return triton_sparse_mla.sparse_mla(q, kv, idx, v_dim=v_dim, scale=scale)


def dense_mla(
    q: torch.Tensor, kv: torch.Tensor, q_pos: torch.Tensor, *, v_dim: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.dense_mla``'s contract: the flash-decoding kernel where no gradient is needed (it has no
    backward), the chunked torch path otherwise."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad)
    if KERNELS.dense_mla == "torch" or needs_grad:
        return cpu.dense_mla(q, kv, q_pos, v_dim=v_dim, scale=scale)
    return triton_dense_mla.dense_mla_forward(q, kv, q_pos, v_dim, scale)


__all__ = ["Kernels", "KERNELS", "use_kernels", "indexer_scores", "indexer_topk", "select_topk", "sparse_mla",
           "sparse_mla_forward", "dense_mla", "supports", "indexer_scores_rows", "indexer_topk_rows",
           "sparse_mla_forward_rows", "sparse_mla_rows"]
