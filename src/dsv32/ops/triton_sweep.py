"""GPU timing sweep of the Triton kernels over tile configurations (issue 14's measurement conditions).

``run(shapes)`` checks each kernel once against the fp32 reference on a slice, then times every configuration in
``SWEEP``: the median of >= 20 CUDA-event timings after 5 warm-ups, the kernel only (inputs allocated before).
Sparse MLA and the dense kernel in bf16, the indexer scores on e4m3 queries and keys with per-row scales, the
top-k select on fp32 score rows. A configuration that does not compile or run (e.g. too much shared memory) is
reported with its error, not dropped. Nothing here runs without CUDA; ``tests/test_ops_triton_kernels.py`` calls
it (marked ``cuda``) and ``python -m dsv32.ops.triton_sweep [--quick] [--json PATH]`` runs it by hand.

``compile_report`` (``--compile-report``) needs no GPU: it compiles the same configurations for sm_90 and reads
registers, spill instructions and tensor-core instructions (wgmma / mma.sync) off the SASS.

FLOP conventions: sparse MLA forward 2·S·H·k·(D + Dv); forward + backward 3x that (the backward's recomputed
scores not counted); indexer scores 2·S·T·HI·dI; dense decode 2·B·H·T·(D + Dv).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import triton

from dsv32.ops import reference as ref
from dsv32.ops import triton_dense_mla as dense
from dsv32.ops import triton_indexer as indexer
from dsv32.ops import triton_sparse_mla as smla


@dataclass(frozen=True)
class Shapes:
    S: int = 1024  # prefill queries at positions T-S .. T-1
    T: int = 131072  # keys
    H: int = 128  # heads
    K: int = 2048  # top-k
    D: int = 576  # latent width (512 + 64 rope)
    Dv: int = 512
    HI: int = 64  # indexer heads
    dI: int = 128
    B_dec: int = 16  # decode sequences at position T-1


FULL = Shapes()
QUICK = Shapes(S=256, T=32768, B_dec=4)

# The tile configurations tried (a sweep, not autotuning at run time: the defaults in each module are what the
# ops use until a measured sweep replaces them).
SWEEP: dict[str, list] = {
    "sparse_mla_fwd": [smla.FWD_CONFIG, smla.TileConfig(64, 32, 8, 2), smla.TileConfig(64, 64, 8, 2),
                       smla.TileConfig(64, 32, 8, 3), smla.TileConfig(64, 32, 8, 1), smla.TileConfig(32, 64, 8, 2)],
    "sparse_mla_bwd": [smla.BWD_CONFIG, smla.TileConfig(16, 16, 4, 1), smla.TileConfig(32, 32, 8, 1),
                       smla.TileConfig(16, 32, 4, 1)],
    "indexer_scores": [indexer.CONFIG, indexer.IndexerConfig(block_q=1, block_t=128),
                       indexer.IndexerConfig(block_q=2, block_t=64, tiles=16),
                       indexer.IndexerConfig(block_q=4, block_t=64, num_warps=8),
                       indexer.IndexerConfig(block_q=2, block_t=128, tiles=32, num_stages=3)],
    "topk": [indexer.CONFIG, indexer.IndexerConfig(topk_block=2048, topk_warps=16),
             indexer.IndexerConfig(topk_min_programs=1), indexer.IndexerConfig(topk_min_programs=1024),
             indexer.IndexerConfig(topk_block=1024, radix_bits=2, topk_warps=4)],
    "dense_decode": [dense.CONFIG, replace(dense.CONFIG, num_splits=64), replace(dense.CONFIG, block_t=32),
                     replace(dense.CONFIG, num_splits=128, num_stages=1)],
}


def time_cuda(fn: Callable[[], object], runs: int = 20, warmup: int = 5) -> list[float]:
    """Seconds per call, one CUDA-event pair around each call, synchronised once after all of them."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # the harness's own test under the interpreter: wall-clock, not a figure
        t = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return t
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for a, b in pairs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in pairs]


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got.float() - want.float()).abs().max().item()
    if not err <= tol * max(1.0, want.float().abs().max().item()):
        raise AssertionError(f"triton_sweep: {name} differs from the reference by {err:.3g}")


def run(sh: Shapes = FULL, *, kernels: tuple[str, ...] = tuple(SWEEP), log: Callable[[str], None] = print,
        seed: int = 0, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, sweep: dict | None = None,
        runs: int = 20, warmup: int = 5, max_configs: int | None = None) -> list[dict]:
    """Check, then time, every kernel x configuration -> rows {kernel, config, median_ms, tflops, tbps, error}.

    ``device="cpu"`` with fp32 runs the same code under Triton's interpreter (the harness's own test; its
    timings mean nothing)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    bf = dtype
    configs = SWEEP if sweep is None else sweep
    if max_configs:  # each configuration is a compilation (seconds each): a quick run takes the first few
        configs = {name: cs[:max_configs] for name, cs in configs.items()}
    e = torch.finfo(dtype).bits // 8
    rows: list[dict] = []

    def rnd(*size: int, dtype: torch.dtype = bf) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=dev).to(dtype)

    def timed(kernel: str, cfg: object, fn: Callable[[], object], flops: float | None, nbytes: float) -> None:
        row = {"kernel": kernel, "config": asdict(cfg), "shapes": asdict(sh)}
        try:
            t = statistics.median(time_cuda(fn, runs, warmup))
            row.update(median_ms=t * 1e3, tflops=flops / t / 1e12 if flops else None, tbps=nbytes / t / 1e12)
            log(f"{kernel:<16} {t * 1e3:9.4f} ms  {row['tflops'] or 0:8.1f} TFLOP/s  {row['tbps']:6.3f} TB/s  {cfg}")
        except Exception as e:  # noqa: BLE001 - a failing configuration is a result too
            row.update(median_ms=None, error=f"{type(e).__name__}: {e}"[:300])
            log(f"{kernel:<16} error {row['error']}  {cfg}")
        rows.append(row)

    scale = sh.D ** -0.5
    with torch.no_grad():
        if {"sparse_mla_fwd", "sparse_mla_bwd"} & set(kernels):
            q, kv = rnd(1, sh.S, sh.H, sh.D), rnd(1, sh.T, sh.D)
            keys = torch.rand(sh.S, sh.T - sh.S + 1, generator=g, device=dev)  # all visible to every query
            idx = keys.topk(sh.K).indices.int().view(1, sh.S, sh.K)  # k distinct random rows per query
            del keys
            out, lse = smla.sparse_mla_forward(q, kv, idx, sh.Dv, scale)
            o_r, l_r = ref.sparse_mla(q[:, :2].float(), kv.float(), idx[:, :2], v_dim=sh.Dv, scale=scale)
            _close("sparse_mla_fwd", out[:, :2], o_r, 2e-2)
            _close("sparse_mla_lse", lse[:, :2], l_r, 1e-2)
            f = 2.0 * sh.S * sh.H * sh.K * (sh.D + sh.Dv)
            nbytes = e * (sh.S * sh.H * sh.D + sh.S * sh.K * sh.D + sh.S * sh.H * sh.Dv) + 4 * sh.S * sh.K
            for cfg in configs["sparse_mla_fwd"] if "sparse_mla_fwd" in kernels else []:
                timed("sparse_mla_fwd", cfg, lambda c=cfg: smla.sparse_mla_forward(q, kv, idx, sh.Dv, scale, c), f,
                      nbytes)
            if "sparse_mla_bwd" in kernels:
                dout = rnd(1, sh.S, sh.H, sh.Dv)
                dq, dkv = smla.sparse_mla_backward(q[:, :2], kv, idx[:, :2], out[:, :2], lse[:, :2], dout[:, :2], None,
                                                   sh.Dv, scale)
                q2, kv2 = q[:, :2].float().requires_grad_(), kv.float().requires_grad_()
                with torch.enable_grad():
                    o2 = ref.sparse_mla(q2, kv2, idx[:, :2], v_dim=sh.Dv, scale=scale)[0]
                    (o2 * dout[:, :2].float()).sum().backward()
                _close("sparse_mla_dq", dq, q2.grad, 3e-2)
                _close("sparse_mla_dkv", dkv, kv2.grad, 3e-2)
                del q2, kv2
                for cfg in configs["sparse_mla_bwd"]:
                    timed("sparse_mla_bwd", cfg, lambda c=cfg: smla.sparse_mla_backward(
                        q, kv, idx, out, lse, dout, None, sh.Dv, scale, c), 2 * f, nbytes + 4 * sh.S * sh.K * sh.D)
            del q, kv, idx, out, lse

        if {"indexer_scores", "topk"} & set(kernels):
            q_pos = torch.arange(sh.T - sh.S, sh.T, device=dev).view(1, sh.S)
            q8, qs = indexer.quantize_e4m3(rnd(1, sh.S, sh.HI, sh.dI))
            k8, ks = indexer.quantize_e4m3(rnd(1, sh.T, sh.dI))
            w = rnd(1, sh.S, sh.HI, dtype=torch.float32) * sh.HI ** -0.5
            sc = indexer.indexer_scores(q8, w, k8, k_scale=ks, q_scale=qs, q_pos=q_pos)  # [1,S,T]
            want = ref.indexer_scores(q8[:, :2].float() * qs[:, :2, :, None], w[:, :2], k8.float(), k_scale=ks)
            vis = ref.causal_mask(q_pos[:, :2], sh.T)
            _close("indexer_scores", sc[:, :2].masked_fill(~vis, 0.0), want.masked_fill(~vis, 0.0), 1e-3)
            if not torch.equal(torch.isinf(sc[:, :2]), ~vis):
                raise AssertionError("triton_sweep: indexer_scores' causal mask differs from the reference's")
            f = 2.0 * sh.S * sh.T * sh.HI * sh.dI
            nbytes = sh.S * sh.HI * sh.dI + sh.T * (sh.dI + 4) + 4 * sh.S * sh.T
            for cfg in configs["indexer_scores"] if "indexer_scores" in kernels else []:
                timed("indexer_scores", cfg, lambda c=cfg: indexer.indexer_scores(
                    q8, w, k8, k_scale=ks, q_scale=qs, q_pos=q_pos, config=c), f, nbytes)
            if "topk" in kernels:
                rows_p = sc.view(sh.S, sh.T)
                n_vis = (q_pos.view(-1) + 1).clamp(max=sh.T)
                got = indexer.topk_select(rows_p[:4], n_vis[:4], sh.K)
                want_idx = ref.topk_from_scores(rows_p[:4].view(1, 4, -1), ref.causal_mask(q_pos[:, :4], sh.T), sh.K)[0]
                if not torch.equal(got, want_idx):
                    raise AssertionError("triton_sweep: topk_select differs from the reference's stable sort")
                dec = rows_p[-1:].expand(sh.B_dec, sh.T).contiguous()  # decode: B rows at position T-1
                n_dec = torch.full((sh.B_dec,), sh.T, device=dev)
                for cfg in configs["topk"]:
                    timed("topk_prefill", cfg, lambda c=cfg: indexer.topk_select(rows_p, n_vis, sh.K, True, c), None,
                          4.0 * sh.S * sh.T)
                    timed("topk_decode", cfg, lambda c=cfg: indexer.topk_select(dec, n_dec, sh.K, True, c), None,
                          4.0 * sh.B_dec * sh.T)
            del sc

        if "dense_decode" in kernels:
            B = sh.B_dec
            qd, kvd = rnd(B, 1, sh.H, sh.D), rnd(B, sh.T, sh.D)
            pos = torch.full((B, 1), sh.T - 1, device=dev)
            out, _ = dense.dense_mla_forward(qd, kvd, pos, sh.Dv, scale)
            o_r, _ = ref.dense_mla(qd[:1].float(), kvd[:1].float(), pos[:1], v_dim=sh.Dv, scale=scale)
            _close("dense_decode", out[:1], o_r, 2e-2)
            f = 2.0 * B * sh.H * sh.T * (sh.D + sh.Dv)
            nbytes = e * (B * sh.T * sh.D + B * sh.H * (sh.D + sh.Dv))
            for cfg in configs["dense_decode"]:
                timed("dense_decode", cfg, lambda c=cfg: dense.dense_mla_forward(qd, kvd, pos, sh.Dv, scale, c), f,
                      nbytes)
    return rows


ALIGNED_INTS = {"D", "DV", "DI", "K", "seg_len", "keys_per_split"}  # multiples of 16 at V3.2 shapes
SHARED_LIMIT = {90: 227 * 1024}  # shared memory one block may use (bytes), by compute capability


def _compile_one(fn, types: dict[str, str], consts: dict[str, object], num_warps: int, num_stages: int,
                 arch: int) -> dict:
    """Compile one kernel for sm_<arch> (no GPU needed) and read its resources and instruction mix off the SASS."""
    from triton.backends.compiler import GPUTarget  # deliberately lazy: only this report compiles ahead of time
    from triton.compiler import ASTSource

    if not hasattr(fn, "arg_names") or os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("triton_sweep.compile_report needs TRITON_INTERPRET unset (compiled, not interpreted)")
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    # what the launcher specialises at V3.2 shapes: 16-byte aligned pointers and strides and widths divisible by
    # 16 (without it the compiler cannot prove rows contiguous and aligned and emits scalar loads)
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if n not in consts and (sig[n].startswith("*") or n.startswith("stride_") or n in ALIGNED_INTS)}
    k = triton.compile(ASTSource(fn, sig, consts, aligned), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bindir, "nvdisasm"), cubin], capture_output=True, text=True,
                              check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    ops = collections.Counter(re.findall(r"\b(HGMMA|QGMMA|HMMA|STL|LDL)\b", sass))
    return {"regs": int(regs.group(1)) if regs else None, "stack_bytes": int(stack.group(1)) if stack else None,
            "shared_bytes": k.metadata.shared, "fits_shared": k.metadata.shared <= SHARED_LIMIT.get(arch, 0),
            "spill_stores": ops["STL"], "spill_loads": ops["LDL"],
            "wgmma": ops["HGMMA"] + ops["QGMMA"], "mma_sync": ops["HMMA"]}


def compile_report(sh: Shapes = FULL, *, kernels: tuple[str, ...] = tuple(SWEEP), arch: int = 90,
                   sweep: dict | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Every kernel x configuration compiled for sm_<arch> on this machine, GPU or not: registers a thread, stack
    (spill) bytes, shared memory, and the tensor-core instructions in the SASS (HGMMA/QGMMA = Hopper wgmma, bf16 /
    e4m3; HMMA = mma.sync). Static evidence only: it says nothing about speed."""
    configs = SWEEP if sweep is None else sweep
    bf, f8, f32 = "*bf16", "*fp8e4nv", "*fp32"
    BV, BR = triton.next_power_of_2(sh.Dv), triton.next_power_of_2(max(1, sh.D - sh.Dv))
    mla = dict(BV=BV, BR=BR, HAS_TAIL=sh.D > sh.Dv, PREC="tf32")
    jobs = []
    for c in configs["sparse_mla_fwd"] if "sparse_mla_fwd" in kernels else []:
        jobs.append(("sparse_mla_fwd", c, smla._sparse_mla_fwd_kernel,
                     dict(Q=bf, KV=bf, IDX="*i32", OUT=bf, LSE=f32, qk_scale="fp32"),
                     dict(BH=c.block_h, BK=c.block_k, **mla), c.num_warps, c.num_stages))
    for c in configs["sparse_mla_bwd"] if "sparse_mla_bwd" in kernels else []:
        jobs.append(("sparse_mla_bwd", c, smla._sparse_mla_bwd_kernel,
                     dict(Q=bf, KV=bf, IDX="*i32", O=bf, DO=bf, LSE=f32, DLSE=f32, DQ=bf, DKV=f32, qk_scale="fp32",
                          scale="fp32"),
                     dict(HAS_DLSE=False, BH=c.block_h, BK=c.block_k, **mla), c.num_warps, c.num_stages))
    for c in configs["indexer_scores"] if "indexer_scores" in kernels else []:
        jobs.append(("indexer_scores", c, indexer._scores_kernel,
                     dict(Q=f8, W=f32, Kc=f8, KS=f32, POS="*i64", OUT=f32),
                     dict(HAS_SCALE=True, BQ=c.block_q, HP=max(triton.next_power_of_2(sh.HI), 16 // c.block_q),
                          BD=triton.next_power_of_2(sh.dI), BT=c.block_t, TILES=c.tiles, PREC="tf32"),
                     c.num_warps, c.num_stages))
    for c in configs["topk"] if "topk" in kernels else []:
        jobs.append(("topk", c, indexer._topk_select_kernel, dict(SC=f32, KK="*i32", OUT="*i32"),
                     dict(BT=c.topk_block, RB=c.radix_bits), c.topk_warps, 1))
        jobs.append(("topk_seg_count", c, indexer._radix_count_kernel,
                     dict(SC=f32, KK="*i32", COUNTS="*i32"), dict(BT=c.topk_block, RB=c.radix_bits),
                     c.topk_warps, 1))
        jobs.append(("topk_seg_tally", c, indexer._segment_tally_kernel,
                     dict(SC=f32, KK="*i32", COUNTS="*i32", NGT="*i32", NEQ="*i32"),
                     dict(BT=c.topk_block, RB=c.radix_bits), c.topk_warps, 1))
        jobs.append(("topk_seg_gather", c, indexer._segment_gather_kernel,
                     dict(SC=f32, KK="*i32", COUNTS="*i32", OUT_BASE="*i32", EQ_BASE="*i32", NEED_EQ="*i32",
                          OUT="*i32"), dict(BT=c.topk_block, RB=c.radix_bits), c.topk_warps, 1))
    for c in configs["dense_decode"] if "dense_decode" in kernels else []:
        jobs.append(("dense_decode", c, dense._dense_mla_split_kernel,
                     dict(Q=bf, KV=bf, POS="*i64", PO=f32, PL=f32, qk_scale="fp32"),
                     dict(BH=c.block_h, BT=c.block_t, **mla), c.num_warps, c.num_stages))
        jobs.append(("dense_combine", c, dense._dense_mla_combine_kernel, dict(PO=f32, PL=f32, OUT=bf, LSE=f32),
                     dict(BH=c.combine_h, BV=BV), 4, 1))
    rows = []
    for name, cfg, fn, types, consts, warps, stages in jobs:
        row = {"kernel": name, "config": asdict(cfg), "arch": f"sm_{arch}"}
        try:
            row.update(_compile_one(fn, types, consts, warps, stages, arch))
            log(f"{name:<16} regs {row['regs']:>3} stack {row['stack_bytes']:>5} B  spills {row['spill_stores']:>4} st "
                f"{row['spill_loads']:>4} ld  wgmma {row['wgmma']:>3}  mma.sync {row['mma_sync']:>3}  shared "
                f"{row['shared_bytes'] >> 10:>3} KiB{'' if row['fits_shared'] else ' (TOO MUCH)'}  {cfg}")
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a result too
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            log(f"{name:<16} error {row['error']}  {cfg}")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv32.ops.triton_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="S 256, T 32K, 4 decode sequences, 2 configurations each")
    p.add_argument("--configs", type=int, help="try only the first N configurations of each kernel")
    p.add_argument("--kernels", nargs="*", default=list(SWEEP), choices=list(SWEEP))
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--compile-report", action="store_true",
                   help="compile for sm_90 (no GPU needed; TRITON_INTERPRET unset) and report registers, spills and "
                        "tensor-core instructions instead of timing")
    a = p.parse_args(argv)
    if a.compile_report:
        rows, device = compile_report(FULL, kernels=tuple(a.kernels)), "none (compiled for sm_90)"
    elif not torch.cuda.is_available():
        p.error("timing needs a CUDA GPU (--compile-report does not)")
    else:
        n = a.configs or (2 if a.quick else None)
        rows = run(QUICK if a.quick else FULL, kernels=tuple(a.kernels), max_configs=n)
        device = torch.cuda.get_device_name()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "triton": triton.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
