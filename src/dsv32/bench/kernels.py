"""`dsv32 bench kernels`: achieved TFLOP/s and TB/s of each DSA kernel and of the dense baselines (JSON + table).

The kernels are timed alone on inputs built before the timer, at DeepSeek-V3.2's attention shapes by default
(issue 14, "Measurement conditions"): one sequence of S = 1,024 queries at the end of T = 131,072 keys, H = 128
heads over the 576-wide latent (kv_lora 512 + rope 64; the first 512 dims are the value), k = 2,048 distinct
causal indices per query; the lightning indexer has 64 heads x 128 (paper eq. 1) and reads FP8 e4m3 keys with
one scale per token, as the model's cache stores them. What is timed:

- ``sparse_mla_fwd`` / ``sparse_mla_fwd_bwd``: ``sparse_mla`` (absorbed form over the gathered latent rows, V3.2
  paper §2.1), forward alone and forward + backward (dq, dkv);
- ``indexer_scores``, ``topk``: the indexer's causally masked score rows [S, T] and the deterministic top-k over
  them, timed separately; ``indexer_topk``: the op the model calls (both, chunked);
- ``prefill_dsa``: indexer_topk + sparse MLA for the S-query chunk; ``prefill_dense``: V3.1's dense prefill of
  the same chunk, flash SDPA in the MHA form (Q/K 192 wide, V 128 zero-padded to 192, as ``Attention._mha``
  runs it) with its kernel forced, so a fallback to a slower kernel is an error, not a slower baseline;
- ``decode_*``: 16 sequences at position T - 1: indexer scores, top-k, and DSA (indexer_topk + sparse MLA),
  against ``decode_dense``, dense absorbed-form MLA over all T latent rows (flash-decoding).

FLOPs count multiply-adds twice and follow the issue's formulas: sparse MLA 2*S*H*k*(576 + 512) forward and 3x
that for forward + backward (the backward's dP, dQ and dKV GEMMs are twice the forward; its recomputation of
the scores is not counted); indexer 2*S*T*64*128 (the head weighting and the causal skip left out). Bytes are
the compulsory traffic of each kernel (formulas in each result's ``bytes_formula``). On CUDA each figure is the
median of CUDA-event timings (>= 20 after 5 warm-ups); on the CPU the median of ``time.perf_counter`` timings.
``--scale N`` (or explicit shape flags) shrinks S, T and H for machines where the full shapes take too long;
the JSON then says ``reduced: true``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsv32 import ops
from dsv32.ops import cpu as cpu_ops
from dsv32.quant import FP8_MAX, ue8m0_scale
from dsv32.registry import DTYPES, resolve_placement

BACKENDS = ("auto", "cpu", "triton")


@dataclass(frozen=True)
class Shapes:
    """The benchmark's shapes; the defaults are the issue's (DeepSeek-V3.2 attention, a 128K context)."""

    S: int = 1024  # prefill queries, at positions T-S .. T-1
    T: int = 131072  # keys (context length)
    H: int = 128  # attention heads
    K: int = 2048  # top-k selected keys per query
    D: int = 576  # latent key width: kv_lora_rank 512 + rope 64 (absorbed MLA)
    Dv: int = 512  # latent value width (the first Dv dims of a latent row)
    HI: int = 64  # indexer heads
    dI: int = 128  # indexer head dim
    B_dec: int = 16  # decode sequences, each at position T-1
    Dqk: int = 192  # dense MHA form: q/k head dim (nope 128 + rope 64)
    Dh_v: int = 128  # dense MHA form: v head dim (zero-padded to Dqk for the flash kernel)

    def check(self) -> None:
        if min(self.S, self.T, self.H, self.K, self.B_dec) < 1:
            raise ValueError(f"bench kernels: every shape must be >= 1 ({self})")
        if self.K > self.T - self.S + 1:
            raise ValueError(f"bench kernels: k={self.K} distinct causal keys need T - S + 1 >= k (T={self.T}, "
                             f"S={self.S}); lower --topk or --seq, or raise --ctx")


FULL = Shapes()


def scaled_shapes(scale: int) -> Shapes:
    """The issue's shapes with S, T and H divided by ``scale`` (k, head widths and the indexer unchanged)."""
    return replace(FULL, S=max(1, FULL.S // scale), T=max(1, FULL.T // scale), H=max(1, FULL.H // scale))


# ============================================================================================ timing


@dataclass
class Result:
    name: str
    what: str
    impl: str  # the function(s) timed
    median_s: float
    runs_s: list[float]
    flops: float | None
    bytes: float
    tflops: float | None  # flops / median_s / 1e12
    tbps: float  # bytes / median_s / 1e12
    flops_formula: str | None
    bytes_formula: str
    derived: str | None = None  # how a figure that is not a direct timing was obtained


def time_fn(fn: Callable[[], object], device: torch.device, runs: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn``: CUDA events around each call (no host sync between calls; one at the end),
    or ``time.perf_counter`` on the CPU. ``warmup`` untimed calls first."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for start, end in ev:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in ev]
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _result(name: str, what: str, impl: str, runs: list[float], flops: float | None, nbytes: float,
            flops_formula: str | None, bytes_formula: str, derived: str | None = None) -> Result:
    med = statistics.median(runs)
    return Result(name, what, impl, med, runs, flops, nbytes, flops / med / 1e12 if flops else None,
                  nbytes / med / 1e12, flops_formula, bytes_formula, derived)


# ============================================================================================ inputs


def _module(backend: str, probe: torch.Tensor, op: str) -> ModuleType:
    """The ops module that runs ``op``: the dispatcher's choice for ``probe``'s device (``auto``) or a named one."""
    if backend == "auto":
        return ops.backend_for(probe, op)
    if backend == "triton" and probe.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--backend triton on the CPU needs TRITON_INTERPRET=1 in the environment (Triton's "
                         "interpreter; set it before starting)")
    try:
        return importlib.import_module(f"dsv32.ops.{backend}")  # deliberately lazy: triton is optional
    except ImportError as e:
        raise ValueError(f"--backend {backend}: dsv32.ops.{backend} cannot be imported ({e})") from None


def _impl(mod: ModuleType, name: str) -> str:
    """``module.function`` of a timed op, named by the module it was taken from (the Triton backend's
    ``sparse_mla`` is built by a factory in ``cpu.py``, so the function's own ``__module__`` would mislead)."""
    return f"{mod.__name__}.{name}"


def fp8_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer keys k [B,T,dI] -> (e4m3 [B,T,dI], fp32 scale [B,T]): one power-of-two scale per token, as the
    model's cache (``MLACache.update``) stores them."""
    scale = ue8m0_scale(k.float().abs().amax(-1).clamp_min(1e-4))  # [B,T]
    return (k.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def causal_topk_idx(q_pos: torch.Tensor, T: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """K distinct random visible key positions per query (t <= q_pos), in random order: q_pos [B,S] -> [B,S,K]
    int32. Every query must see at least K keys."""
    B, S = q_pos.shape
    out = torch.empty(B, S, K, dtype=torch.int32, device=q_pos.device)
    keys = torch.arange(T, device=q_pos.device)
    for b in range(B):
        for s0 in range(0, S, 64):  # [64, T] random rows at a time
            pos = q_pos[b, s0:s0 + 64]
            r = torch.rand(pos.shape[0], T, generator=gen, device=q_pos.device)
            r.masked_fill_(keys.view(1, T) > pos.view(-1, 1), -1.0)
            out[b, s0:s0 + 64] = r.topk(K, dim=-1).indices.to(torch.int32)
    return out


def _check_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() + 1e-6
    if not err <= tol * scale:
        raise RuntimeError(f"bench kernels: {name} disagrees with its fp32 check (max error {err:.3g}, "
                           f"values up to {scale:.3g}, tolerance {tol:.0e} relative)")


def dense_prefill_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Callable[[], torch.Tensor]:
    """V3.1's dense prefill of S queries at the end of T keys, flash SDPA forced: q [1,H,S,Dqk], k/v [1,H,T,Dqk]
    (v zero-padded). On CUDA the causal mask is bottom-right aligned (``causal_lower_right``, run by the flash
    kernel itself); on the CPU it is the boolean mask ``Attention._mha`` builds (the CPU flash kernel takes it).
    Outside the flash kernel SDPA raises ("No available kernel"), so a silent fallback cannot happen."""
    S, T = q.shape[2], k.shape[2]
    if q.is_cuda:
        from torch.nn.attention.bias import causal_lower_right  # deliberately lazy: it imports torch._dynamo (~5 s)

        if not can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, True, False), debug=True):
            raise RuntimeError(f"bench kernels: flash SDPA cannot run q {tuple(q.shape)} {q.dtype} (see the "
                               "warning above); the dense baseline must not fall back to another kernel")
        mask: Any = causal_lower_right(S, T)
    else:
        pos = torch.arange(T - S, T, device=q.device)
        mask = (torch.arange(T, device=q.device).view(1, T) <= pos.view(S, 1)).view(1, 1, S, T)

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    return run


def _check_overlap(got: torch.Tensor, want: torch.Tensor, min_share: float = 0.98) -> None:
    """The first rows of two top-k selections [R,K] share at least ``min_share`` of their keys (scores summed
    in another order may swap keys whose scores differ by a rounding error at the k-th place)."""
    g, w = got[:4].long(), want[:4].long()
    share = torch.isin(g, w).float().mean().item()  # rows of one sequence: a key is in both or not
    if share < min_share:
        raise RuntimeError(f"bench kernels: indexer_topk shares only {share:.1%} of its keys with the top-k of the "
                           "fp32 scores")


def _dense_prefill_check(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
    """The flash output of 2 heads x (first, last) queries against plain fp32 softmax attention (checks the
    bottom-right causal alignment too)."""
    S, T = q.shape[2], k.shape[2]
    rows = torch.tensor([0, S - 1], device=q.device)
    qs = q[0, :2, rows].float()  # [2,2,D]
    s = torch.einsum("hsd,htd->hst", qs, k[0, :2].float()) * scale  # [2,2,T]
    vis = torch.arange(T, device=q.device).view(1, T) <= (T - S + rows).view(2, 1)  # [2,T]
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1)
    want = torch.einsum("hst,htd->hsd", p, v[0, :2].float())
    _check_close("prefill_dense (flash SDPA)", out[0, :2, rows], want, 2e-2 if q.dtype != torch.float32 else 1e-4)


# ============================================================================================ the benchmark


def run(shapes: Shapes, *, device: torch.device, dtype: torch.dtype, backend: str = "auto", runs: int = 20,
        warmup: int = 5, index_keys: str = "fp8", skip: tuple[str, ...] = (), seed: int = 0,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every kernel at ``shapes`` -> ``{"results": [...], "ratios": {...}, "settings": {...}}``."""
    shapes.check()
    sh = shapes
    log = log or (lambda line: print(line, flush=True))  # flushed: long CPU runs are followed through a log file
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *size, dt=dtype: torch.randn(*size, generator=gen, device=device, dtype=torch.float32).to(dt)  # noqa: E731
    e = torch.finfo(dtype).bits // 8  # bytes per element of q / latents
    scale = sh.D ** -0.5
    results: dict[str, Result] = {}

    def add(r: Result) -> None:
        results[r.name] = r
        tf = f"{r.tflops:>9.4g}" if r.tflops is not None else f"{'-':>9}"
        log(f"{r.name:<22} {r.median_s * 1e3:>11.4g} {tf} {r.tbps:>9.4g}  {r.impl}")

    def timed(fn: Callable[[], object]) -> list[float]:
        return time_fn(fn, device, runs, warmup)

    log(f"# bench kernels: {device} {str(dtype).removeprefix('torch.')}, backend {backend}, {asdict(sh)}")
    log(f"{'kernel':<22} {'median ms':>11} {'TFLOP/s':>9} {'TB/s':>9}  implementation")

    # ---- prefill inputs: one sequence, S queries at the end of T keys
    q_pos = torch.arange(sh.T - sh.S, sh.T, device=device).view(1, sh.S)  # [1,S]
    q = rnd(1, sh.S, sh.H, sh.D)  # [1,S,H,D]
    kv = rnd(1, sh.T, sh.D)  # [1,T,D]
    idx = causal_topk_idx(q_pos, sh.T, sh.K, gen)  # [1,S,K]
    qi = rnd(1, sh.S, sh.HI, sh.dI)  # [1,S,HI,dI]
    wi = rnd(1, sh.S, sh.HI, dt=torch.float32) * sh.HI ** -0.5  # [1,S,HI]
    ki = rnd(1, sh.T, sh.dI)  # [1,T,dI]
    ks: torch.Tensor | None = None
    if index_keys == "fp8":
        ki, ks = fp8_keys(ki)
    ek = ki.element_size()
    ek_scale = 4 if ks is not None else 0

    mla = _module(backend, q, "sparse_mla")
    idx_mod = _module(backend, qi, "indexer_topk")
    dense_mod = _module(backend, q, "dense_mla")
    if not hasattr(dense_mod, "dense_mla"):
        dense_mod = cpu_ops  # the plain-torch flash-decoding: correct on any device
    topk_mod = idx_mod if hasattr(idx_mod, "select_topk") else cpu_ops
    select_topk = topk_mod.select_topk
    scores_fn = getattr(idx_mod, "indexer_scores", None) if idx_mod is not ops.reference else None
    n_mla, n_it, n_topk = _impl(mla, "sparse_mla"), _impl(idx_mod, "indexer_topk"), _impl(topk_mod, "select_topk")
    n_sc, n_dense = _impl(idx_mod, "indexer_scores"), _impl(dense_mod, "dense_mla")

    f_mla = 2.0 * sh.S * sh.H * sh.K * (sh.D + sh.Dv)
    b_mla = e * (sh.S * sh.H * sh.D + sh.S * sh.K * sh.D + sh.S * sh.H * sh.Dv) + 4 * (sh.S * sh.K + sh.S * sh.H)
    f_idx = 2.0 * sh.S * sh.T * sh.HI * sh.dI
    b_scores = e * sh.S * sh.HI * sh.dI + 4 * sh.S * sh.HI + (ek * sh.dI + ek_scale) * sh.T + 4 * sh.S * sh.T
    b_topk = 4.0 * sh.S * sh.T + 4 * sh.S * sh.K

    with torch.no_grad():
        if "sparse_mla" not in skip:
            fn = lambda: mla.sparse_mla(q, kv, idx, v_dim=sh.Dv, scale=scale)  # noqa: E731
            out, _ = fn()
            sub = slice(0, 2)  # a 2-query check against the fp32 reference: right inputs, right op
            ref, _ = ops.reference.sparse_mla(q[:, sub].float(), kv.float(), idx[:, sub], v_dim=sh.Dv, scale=scale)
            _check_close("sparse_mla", out[:, sub], ref, 2e-2 if dtype != torch.float32 else 1e-4)
            add(_result("sparse_mla_fwd", "sparse MLA forward, S queries x k keys", n_mla,
                        timed(fn), f_mla, b_mla, "2*S*H*k*(D+Dv)",
                        "e*(S*H*D [q] + S*k*D [gathered rows] + S*H*Dv [out]) + 4*(S*k [idx] + S*H [lse])"))

        # ---- indexer: scores, top-k, and the op the model calls
        if "indexer" not in skip:
            fn_it = lambda: idx_mod.indexer_topk(qi, wi, ki, k_scale=ks, q_pos=q_pos, topk=sh.K)  # noqa: E731
            ref_scores = _scores_for_topk(qi, wi, ki, ks, q_pos, scores_fn)  # [S,T], -inf past each position
            n_vis = (q_pos.view(-1) + 1).clamp(max=sh.T)
            _check_overlap(fn_it().view(sh.S, sh.K), cpu_ops.select_topk(ref_scores, n_vis, sh.K))
            t_topk = timed(lambda: select_topk(ref_scores, n_vis, sh.K))
            t_it = timed(fn_it)
            if scores_fn is not None:
                t_sc = timed(lambda: scores_fn(qi, wi, ki, k_scale=ks, q_pos=q_pos))
                sc_impl, derived = n_sc, None
            else:  # no separate scores function (plain-torch backend): its indexer_topk minus its top-k
                t_sc = [max(a - statistics.median(t_topk), 1e-9) for a in t_it]
                sc_impl = n_it
                derived = "indexer_topk runs minus the top-k median (this backend has no separate scores function)"
            add(_result("indexer_scores", "indexer score rows [S,T] (ReLU, head weights, causal mask)", sc_impl,
                        t_sc, f_idx, b_scores, "2*S*T*HI*dI",
                        "e*S*HI*dI [q] + 4*S*HI [w] + T*(ek*dI + 4) [keys + scales] + 4*S*T [scores]", derived))
            add(_result("topk", "deterministic top-k of S score rows of T", n_topk, t_topk, None,
                        b_topk, None, "4*S*T [scores read] + 4*S*k [idx]"))
            add(_result("indexer_topk", "indexer scores + top-k (the model's op)", n_it,
                        t_it, f_idx, b_scores + b_topk, "2*S*T*HI*dI", "indexer_scores + topk bytes"))

        # ---- a prefill chunk: DSA (indexer + top-k + sparse MLA) vs dense flash SDPA in the MHA form
        if "prefill" not in skip:
            def dsa_prefill() -> torch.Tensor:
                sel = idx_mod.indexer_topk(qi, wi, ki, k_scale=ks, q_pos=q_pos, topk=sh.K)
                return mla.sparse_mla(q, kv, sel, v_dim=sh.Dv, scale=scale)[0]

            add(_result("prefill_dsa", "indexer_topk + sparse MLA, S queries at T",
                        f"{n_it} + {n_mla}", timed(dsa_prefill),
                        f_idx + f_mla, b_scores + b_topk + b_mla, "2*S*T*HI*dI + 2*S*H*k*(D+Dv)",
                        "indexer_topk + sparse_mla_fwd bytes"))
            qm = rnd(1, sh.H, sh.S, sh.Dqk)  # [1,H,S,Dqk]
            km = rnd(1, sh.H, sh.T, sh.Dqk)  # [1,H,T,Dqk]
            vm = torch.zeros(1, sh.H, sh.T, sh.Dqk, device=device, dtype=dtype)  # V in the first Dh_v dims
            vm[..., :sh.Dh_v] = rnd(1, sh.H, sh.T, sh.Dh_v)
            sdpa = dense_prefill_fn(qm, km, vm, sh.Dqk ** -0.5)
            _dense_prefill_check(sdpa(), qm, km, vm, sh.Dqk ** -0.5)
            keys = sh.S * (sh.T - sh.S) + sh.S * (sh.S + 1) / 2  # sum over queries of the keys each sees
            add(_result("prefill_dense", "flash SDPA (forced), MHA form, V padded, S queries at T",
                        "F.scaled_dot_product_attention [flash]", timed(sdpa),
                        2.0 * sh.H * (sh.Dqk + sh.Dh_v) * keys, e * sh.H * (2 * sh.S + 2 * sh.T) * sh.Dqk,
                        "2*H*(Dqk+Dv_mha)*sum_i T_i (useful work; the padded V adds 2*H*(Dqk-Dv_mha)*sum_i T_i)",
                        "e*H*(S [q] + T [k] + T [v, padded] + S [out])*Dqk"))

        # ---- sparse MLA forward + backward (training, sparsify stage 2)
        if "sparse_mla_bwd" not in skip:
            qg, kvg = q.clone().requires_grad_(True), kv.clone().requires_grad_(True)
            dout = rnd(1, sh.S, sh.H, sh.Dv)

            def fwd_bwd() -> tuple[torch.Tensor, ...]:
                with torch.enable_grad():
                    out, _ = mla.sparse_mla(qg, kvg, idx, v_dim=sh.Dv, scale=scale)
                    return torch.autograd.grad(out, (qg, kvg), dout)

            t = timed(fwd_bwd)
            b_bwd = e * (sh.S * sh.H * sh.D + sh.S * sh.K * sh.D + 2 * sh.S * sh.H * sh.Dv + sh.S * sh.H * sh.D) + 4 * (
                sh.S * sh.K * sh.D + sh.S * sh.H)
            add(_result("sparse_mla_fwd_bwd", "sparse MLA forward + backward (dq, dkv)",
                        n_mla, t, 3 * f_mla, b_mla + b_bwd, "3*2*S*H*k*(D+Dv)",
                        "forward bytes + e*(S*H*D [q] + S*k*D [rows] + 2*S*H*Dv [out, dout] + S*H*D [dq]) "
                        "+ 4*(S*k*D [dkv adds] + S*H [lse])"))

        # ---- decode: B sequences, one query each at position T-1
        if "decode" not in skip:
            B = sh.B_dec
            pos_d = torch.full((B, 1), sh.T - 1, device=device)
            qd = rnd(B, 1, sh.H, sh.D)
            kvd = rnd(B, sh.T, sh.D)
            qid = rnd(B, 1, sh.HI, sh.dI)
            wid = rnd(B, 1, sh.HI, dt=torch.float32) * sh.HI ** -0.5
            kid = rnd(B, sh.T, sh.dI)
            ksd: torch.Tensor | None = None
            if index_keys == "fp8":
                kid, ksd = fp8_keys(kid)
            f_didx = 2.0 * B * sh.T * sh.HI * sh.dI
            f_dmla = 2.0 * B * sh.H * sh.K * (sh.D + sh.Dv)
            b_dsc = e * B * sh.HI * sh.dI + 4 * B * sh.HI + B * sh.T * (ek * sh.dI + ek_scale) + 4 * B * sh.T
            b_dtk = 4.0 * B * sh.T + 4 * B * sh.K
            b_dmla = e * (B * sh.H * sh.D + B * sh.K * sh.D + B * sh.H * sh.Dv) + 4 * (B * sh.K + B * sh.H)
            dec_scores = _scores_for_topk(qid, wid, kid, ksd, pos_d, scores_fn)  # [B,T]
            n_vis = torch.full((B,), sh.T, device=device)
            if scores_fn is not None:
                add(_result("decode_indexer_scores", "indexer score rows, B sequences at T-1", n_sc,
                            timed(lambda: scores_fn(qid, wid, kid, k_scale=ksd, q_pos=pos_d)), f_didx, b_dsc,
                            "2*B*T*HI*dI", "e*B*HI*dI + 4*B*HI + B*T*(ek*dI + 4) + 4*B*T"))
            add(_result("decode_topk", "top-k of B score rows of T", n_topk,
                        timed(lambda: select_topk(dec_scores, n_vis, sh.K)), None, b_dtk, None,
                        "4*B*T + 4*B*k"))

            def dsa_decode() -> torch.Tensor:
                sel = idx_mod.indexer_topk(qid, wid, kid, k_scale=ksd, q_pos=pos_d, topk=sh.K)
                return mla.sparse_mla(qd, kvd, sel, v_dim=sh.Dv, scale=scale)[0]

            add(_result("decode_dsa", "indexer_topk + sparse MLA, B sequences at T-1",
                        f"{n_it} + {n_mla}", timed(dsa_decode),
                        f_didx + f_dmla, b_dsc + b_dtk + b_dmla, "2*B*T*HI*dI + 2*B*H*k*(D+Dv)",
                        "decode indexer scores + top-k + sparse MLA bytes"))
            dense_fn = lambda: dense_mod.dense_mla(qd, kvd, pos_d, v_dim=sh.Dv, scale=scale)  # noqa: E731
            o_dense, _ = dense_fn()
            ref, _ = ops.reference.dense_mla(qd[:1].float(), kvd[:1].float(), pos_d[:1], v_dim=sh.Dv, scale=scale)
            _check_close("decode_dense", o_dense[:1], ref, 2e-2 if dtype != torch.float32 else 1e-4)
            add(_result("decode_dense", "dense absorbed MLA over all T latent rows, B sequences at T-1",
                        n_dense, timed(dense_fn), 2.0 * B * sh.H * sh.T * (sh.D + sh.Dv),
                        e * (B * sh.T * sh.D + B * sh.H * sh.D + B * sh.H * sh.Dv),
                        "2*B*H*T*(D+Dv)", "e*(B*T*D [latent rows] + B*H*D [q] + B*H*Dv [out])"))

    ratios: dict[str, float] = {}
    if "prefill_dense" in results and "prefill_dsa" in results:
        ratios["prefill_dense_over_dsa"] = results["prefill_dense"].median_s / results["prefill_dsa"].median_s
    if "decode_dense" in results and "decode_dsa" in results:
        ratios["decode_dense_over_dsa"] = results["decode_dense"].median_s / results["decode_dsa"].median_s
    for name, r in ratios.items():
        log(f"# {name}: {r:.2f}x")
    return {"results": [asdict(r) for r in results.values()], "ratios": ratios,
            "settings": _settings(sh, device, dtype, backend, runs, warmup, index_keys)}


def _scores_for_topk(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor | None,
                     q_pos: torch.Tensor, scores_fn: Callable[..., torch.Tensor] | None) -> torch.Tensor:
    """Causally masked fp32 score rows [B*S, T] (-inf past each query's position), the top-k's input: from the
    backend's scores kernel where it has one, else from the reference 16 queries at a time."""
    B, S = q.shape[:2]
    T = k.shape[1]
    if scores_fn is not None:
        return scores_fn(q, w, k, k_scale=k_scale, q_pos=q_pos).reshape(B * S, T)
    rows = []
    for s0 in range(0, S, 16):
        sc = ops.reference.indexer_scores(q[:, s0:s0 + 16], w[:, s0:s0 + 16], k, k_scale=k_scale)  # [B,c,T]
        vis = ops.reference.causal_mask(q_pos[:, s0:s0 + 16], T)
        rows.append(sc.masked_fill(~vis, float("-inf")))
    return torch.cat(rows, dim=1).reshape(B * S, T)


def _settings(sh: Shapes, device: torch.device, dtype: torch.dtype, backend: str, runs: int, warmup: int,
              index_keys: str) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "shapes": asdict(sh),
        "full_shapes": asdict(FULL),
        "reduced": sh != FULL,
        "device": str(device),
        "gpu": gpu,
        "dtype": str(dtype).removeprefix("torch."),
        "index_keys": "float8_e4m3fn + fp32 per-token scale" if index_keys == "fp8" else "same dtype as q",
        "backend": backend,
        "runs": runs,
        "warmup": warmup,
        "statistic": "median of CUDA-event timings" if device.type == "cuda" else "median of time.perf_counter",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "dsv32 bench kernels " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "kernels"] else None,
    }


def _triton_version() -> str | None:
    try:
        return importlib.import_module("triton").__version__  # deliberately lazy: an optional dependency
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsv32 bench kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="q, latents, indexer q (auto: bfloat16 on CUDA, float32 on the CPU)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="ops backend: auto (the dispatcher's choice), cpu (plain torch) or triton")
    ap.add_argument("--index-keys", choices=("fp8", "same"), default="fp8",
                    help="indexer keys in FP8 e4m3 + per-token scale (the model's cache), or in --dtype")
    ap.add_argument("--scale", type=int, default=1, help="divide S, T and H by this (reduced shapes)")
    ap.add_argument("--seq", type=int, help=f"S: prefill queries (default {FULL.S})")
    ap.add_argument("--ctx", type=int, help=f"T: context keys (default {FULL.T})")
    ap.add_argument("--heads", type=int, help=f"H: attention heads (default {FULL.H})")
    ap.add_argument("--topk", type=int, help=f"k: selected keys per query (default {FULL.K})")
    ap.add_argument("--index-heads", type=int, help=f"indexer heads (default {FULL.HI})")
    ap.add_argument("--decode-batch", type=int, help=f"decode sequences (default {FULL.B_dec})")
    ap.add_argument("--runs", type=int, help="timed calls per kernel (default 20 on CUDA, 5 on the CPU)")
    ap.add_argument("--warmup", type=int, help="untimed calls first (default 5 on CUDA, 1 on the CPU)")
    ap.add_argument("--skip", nargs="+", default=[],
                    choices=["sparse_mla", "sparse_mla_bwd", "indexer", "prefill", "decode"], help="parts to leave out")
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    ap.add_argument("--json", metavar="FILE", help="write {results, ratios, settings}")
    args = ap.parse_args(argv)
    try:
        device, dtype = resolve_placement(args.device, args.dtype)
    except ValueError as e:
        ap.error(str(e))
    if args.scale < 1:
        ap.error("--scale must be >= 1")
    sh = scaled_shapes(args.scale)
    over = {"S": args.seq, "T": args.ctx, "H": args.heads, "K": args.topk, "HI": args.index_heads,
            "B_dec": args.decode_batch}
    sh = replace(sh, **{k: v for k, v in over.items() if v is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    runs = args.runs or (20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    try:
        result = run(sh, device=device, dtype=dtype, backend=args.backend, runs=runs, warmup=warmup,
                     index_keys=args.index_keys, skip=tuple(args.skip))
    except ValueError as e:
        print(f"dsv32 bench kernels: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Shapes", "FULL", "Result", "scaled_shapes", "time_fn", "fp8_keys", "causal_topk_idx", "dense_prefill_fn",
           "run", "main"]
