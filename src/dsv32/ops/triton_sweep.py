"""GPU timing sweep of the Triton kernels over tile configurations (issue 14's measurement conditions).

``run(shapes)`` checks each kernel once against the fp32 reference on a slice, then times every configuration in
``SWEEP``: the median of >= 20 CUDA-event timings after 5 warm-ups, the kernel only (inputs allocated before).
Sparse MLA and the dense kernel in bf16, the indexer scores on e4m3 queries and keys with per-row scales, the
top-k select on fp32 score rows. A configuration that does not compile or run (e.g. too much shared memory) is
reported with its error, not dropped. Nothing here runs without CUDA; ``tests/test_ops_triton_kernels.py`` calls
it (marked ``cuda``) and ``python -m dsv32.ops.triton_sweep [--quick] [--json PATH]`` runs it by hand.

FLOP conventions: sparse MLA forward 2·S·H·k·(D + Dv); forward + backward 3x that (the backward's recomputed
scores not counted); indexer scores 2·S·T·HI·dI; dense decode 2·B·H·T·(D + Dv).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

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
    "sparse_mla_fwd": [smla.TileConfig(64, 64, 8, 2), smla.TileConfig(64, 32, 8, 2), smla.TileConfig(64, 64, 8, 1),
                       smla.TileConfig(128, 32, 8, 1), smla.TileConfig(32, 64, 4, 2), smla.TileConfig(64, 64, 4, 3)],
    "sparse_mla_bwd": [smla.TileConfig(32, 32, 8, 1), smla.TileConfig(64, 32, 8, 1), smla.TileConfig(16, 64, 4, 1),
                       smla.TileConfig(32, 64, 8, 2)],
    "indexer_scores": [indexer.IndexerConfig(), indexer.IndexerConfig(block_q=1, block_t=128),
                       indexer.IndexerConfig(block_q=2, block_t=64, tiles=16),
                       indexer.IndexerConfig(block_q=4, block_t=64, num_warps=8),
                       indexer.IndexerConfig(block_q=2, block_t=128, tiles=32, num_stages=3)],
    "topk": [indexer.IndexerConfig(), indexer.IndexerConfig(topk_block=2048, radix_bits=8),
             indexer.IndexerConfig(topk_block=4096, radix_bits=4, topk_warps=16),
             indexer.IndexerConfig(topk_block=1024, radix_bits=2, topk_warps=4)],
    "dense_decode": [dense.DenseConfig(), dense.DenseConfig(num_splits=64), dense.DenseConfig(block_t=32),
                     dense.DenseConfig(num_splits=128, block_t=32, num_warps=4)],
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
        runs: int = 20, warmup: int = 5) -> list[dict]:
    """Check, then time, every kernel x configuration -> rows {kernel, config, median_ms, tflops, tbps, error}.

    ``device="cpu"`` with fp32 runs the same code under Triton's interpreter (the harness's own test; its
    timings mean nothing)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    bf = dtype
    configs = SWEEP if sweep is None else sweep
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv32.ops.triton_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="S 256, T 32K, 4 decode sequences")
    p.add_argument("--kernels", nargs="*", default=list(SWEEP), choices=list(SWEEP))
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    rows = run(QUICK if a.quick else FULL, kernels=tuple(a.kernels))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
