"""The Triton kernels of ``ops/triton_*.py`` against the reference oracle (``ops/reference.py``), docs/kernels.md.

Without a GPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py before
anything imports triton), fp32 only (the interpreter mishandles bf16), at small shapes with tiles chosen so that
every loop runs several times and every mask bites: odd head counts and widths, -1 slots, repeated keys, ties.
The ``cuda`` test times the kernels over a few tile configurations on a GPU (skipped without one).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from dsv32.ops import cpu
from dsv32.ops import reference as ref


def _import(name: str):
    """dsv32.ops.<name>; without a GPU, under Triton's interpreter (TRITON_INTERPRET must precede triton)."""
    if not torch.cuda.is_available():
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton was imported earlier in this process without TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    return importlib.import_module(f"dsv32.ops.{name}")


@pytest.fixture(scope="module")
def dev():
    """The device the kernels run on; TRITON_INTERPRET is restored afterwards so other modules are unaffected."""
    before = os.environ.get("TRITON_INTERPRET")
    try:
        _import("triton")
        yield torch.device("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def _sparse_inputs(B=2, S=3, T=40, H=20, D=40, K=20, seed=0):
    """q, kv and idx with a row of only -1, a half-empty row, scattered -1 slots and one key repeated."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g)
    kv = torch.randn(B, T, D, generator=g)
    rows = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B * S)]).int()  # [B*S,K]
    rows[0] = -1
    rows[1, K // 2 :] = -1
    rows[2, ::3] = -1
    rows[3, :] = rows[3, 0]
    return q, kv, rows.view(B, S, K)


# ============================================================================================ sparse MLA


@pytest.mark.parametrize("D,v_dim", [(40, 24), (32, 32)])  # a masked tail (rope part); no tail at all
def test_sparse_mla_forward_matches_reference(dev, D, v_dim):
    m = _import("triton_sparse_mla")
    q, kv, idx = _sparse_inputs(D=D)
    cfg = m.TileConfig(block_h=16, block_k=16)  # 20 heads: 2 head blocks; K 20: 2 tiles, the second partial
    out, lse = m.sparse_mla_forward(q.to(dev), kv.to(dev), idx.to(dev), v_dim, 0.3, cfg)
    out_r, lse_r = ref.sparse_mla(q, kv, idx, v_dim=v_dim, scale=0.3)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu(), lse_r, rtol=1e-5, atol=1e-5)
    assert torch.all(out[0, 0] == 0) and torch.all(lse[0, 0] == float("-inf"))  # the all -1 row


def _grad_loss(out, lse, d_out, d_lse):
    return (out * d_out).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * d_lse).sum()


@pytest.mark.parametrize("D,v_dim", [(40, 24), (32, 32)])
def test_sparse_mla_backward_matches_autograd_through_reference(dev, D, v_dim):
    """dq and dkv (atomics, repeated keys included) from the kernel, gradients through out and lse."""
    m = _import("triton_sparse_mla")
    q, kv, idx = _sparse_inputs(D=D, seed=1)
    out, lse = m.sparse_mla_forward(q.to(dev), kv.to(dev), idx.to(dev), v_dim, 0.3)
    g = torch.Generator().manual_seed(9)
    d_out, d_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    cfg = m.TileConfig(block_h=16, block_k=16)
    dq, dkv = m.sparse_mla_backward(q.to(dev), kv.to(dev), idx.to(dev), out, lse, d_out.to(dev), d_lse.to(dev),
                                    v_dim, 0.3, cfg)
    q2, kv2 = q.clone().requires_grad_(), kv.clone().requires_grad_()
    _grad_loss(*ref.sparse_mla(q2, kv2, idx, v_dim=v_dim, scale=0.3), d_out, d_lse).backward()
    torch.testing.assert_close(dq.cpu(), q2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dkv.cpu(), kv2.grad, rtol=1e-4, atol=1e-5)


def test_sparse_mla_autograd_function_and_backend_switch(dev):
    """``ops.triton.sparse_mla`` (default tiles) is differentiable; the first kernel ("rows") agrees with it."""
    tr = _import("triton")
    q, kv, idx = _sparse_inputs(B=1, S=4, T=30, H=5, D=24, K=12, seed=2)
    results = []
    for choice in ("heads", "rows"):
        q1, kv1 = q.clone().to(dev).requires_grad_(), kv.clone().to(dev).requires_grad_()
        with tr.use_kernels(sparse_mla=choice):
            out, lse = tr.sparse_mla(q1, kv1, idx.to(dev), v_dim=16, scale=0.5)
        _grad_loss(out, lse, torch.ones_like(out), torch.ones_like(lse)).backward()
        results.append((out.detach().cpu(), q1.grad.cpu(), kv1.grad.cpu()))
    q2, kv2 = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out_r, lse_r = ref.sparse_mla(q2, kv2, idx, v_dim=16, scale=0.5)
    _grad_loss(out_r, lse_r, torch.ones_like(out_r), torch.ones_like(lse_r)).backward()
    for out, dq, dkv in results:
        torch.testing.assert_close(out, out_r.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dq, q2.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dkv, kv2.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="sparse_mla"):
        with tr.use_kernels(sparse_mla="nope"):
            pass


# ============================================================================================ indexer


def _indexer_inputs(B=2, S=5, T=70, HI=3, dI=24, seed=7):
    g = torch.Generator().manual_seed(seed)
    q, w = torch.randn(B, S, HI, dI, generator=g), torch.randn(B, S, HI, generator=g)
    k = torch.randn(B, T, dI, generator=g)
    q_pos = torch.stack([torch.arange(S), torch.arange(T - S, T)])[:B]  # a prefill from 0; a chunk at the end
    return q, w, k, q_pos


def _masked(scores: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(~ref.causal_mask(q_pos, scores.shape[-1]), float("-inf"))


def test_indexer_scores_fp32_and_fp8_codes_with_scales(dev):
    """fp32 inputs; then e4m3 codes for q and k with per-(token, head) and per-key scales (DeepGEMM's
    fp8_mqa_logits semantics), against the reference on the dequantised values."""
    m = _import("triton_indexer")
    q, w, k, q_pos = _indexer_inputs()
    T = k.shape[1]
    cfg = m.IndexerConfig(block_q=2, block_t=16, tiles=2)  # 3 query blocks (the last partial), 3 key chunks
    got = m.indexer_scores(q.to(dev), w.to(dev), k.to(dev), q_pos=q_pos.to(dev), config=cfg).cpu()
    torch.testing.assert_close(got, _masked(ref.indexer_scores(q, w, k), q_pos), rtol=1e-5, atol=1e-5)
    q8, qs = m.quantize_e4m3(q)  # [B,S,HI,dI] codes, [B,S,HI]
    k8, ks = m.quantize_e4m3(k)  # [B,T,dI], [B,T]
    assert q8.dtype == torch.float8_e4m3fn and qs.shape == q.shape[:3] and ks.shape == k.shape[:2]
    got = m.indexer_scores(q8.to(dev), w.to(dev), k8.to(dev), k_scale=ks.to(dev), q_scale=qs.to(dev),
                           q_pos=q_pos.to(dev), T=T - 3, config=cfg).cpu()
    want = ref.indexer_scores(q8.float() * qs.unsqueeze(-1), w, k8.float()[:, : T - 3], k_scale=ks[:, : T - 3])
    torch.testing.assert_close(got, _masked(want, q_pos), rtol=1e-5, atol=1e-5)
    # the quantisation itself is e4m3's rounding, no worse
    torch.testing.assert_close(k8.float() * ks.unsqueeze(-1), k, rtol=0.07, atol=1e-6)


def _tied_scores(R: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Score rows with many exact ties (small integers, -0.0 beside 0.0, negatives) and -inf past n_visible."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (R, T), generator=g).float()
    scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    n_visible = torch.randint(0, T + 1, (R,), generator=g)
    n_visible[0], n_visible[1], n_visible[2] = T, 3, 0  # a full row; fewer visible keys than topk; none
    scores[torch.arange(T).view(1, T) >= n_visible.view(R, 1)] = float("-inf")
    return scores, n_visible


@pytest.mark.parametrize("radix_bits,block,programs", [(8, 128, 1), (2, 16, 12)])
def test_topk_select_ties_padding_and_order(dev, radix_bits, block, programs):
    """The radix threshold select equals the reference's stable sort: ties to the lower position, -1 padding,
    canonical order when ``ordered`` and the same set otherwise. One program per row, and rows cut into three
    segments (ties spread over several segments, a row seeing none)."""
    m = _import("triton_indexer")
    R, T, topk = 4, 45, 10
    scores, n_visible = _tied_scores(R, T, seed=radix_bits)
    cfg = m.IndexerConfig(topk_block=block, radix_bits=radix_bits, topk_min_programs=programs)
    visible = torch.arange(T).view(1, 1, T) < n_visible.view(1, R, 1)
    want = ref.topk_from_scores(scores.view(1, R, T), visible, topk)[0]  # [R,topk]
    got = m.topk_select(scores.to(dev), n_visible.to(dev), topk, True, cfg).cpu()
    assert torch.equal(got, want)
    unordered = m.topk_select(scores.to(dev), n_visible.to(dev), topk, False, cfg).cpu()
    assert torch.equal(unordered.sort(-1).values, want.sort(-1).values)
    assert torch.equal(m.topk_select(scores.to(dev), n_visible.to(dev), T + 5, True, cfg).cpu(),
                       ref.topk_from_scores(scores.view(1, R, T), visible, T + 5)[0])  # topk > T


def test_topk_select_random_floats_match_cpu_select(dev):
    m = _import("triton_indexer")
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 300, generator=g) * 1e3
    n_visible = torch.tensor([300, 120, 7])
    scores[torch.arange(300).view(1, -1) >= n_visible.view(-1, 1)] = float("-inf")
    cfg = m.IndexerConfig(topk_block=256, radix_bits=8)
    got = m.topk_select(scores.to(dev), n_visible.to(dev), 16, True, cfg).cpu()
    assert torch.equal(got, cpu.select_topk(scores, n_visible, 16))


def test_indexer_topk_end_to_end_exact_ties(dev):
    """Integer inputs make every score exact with many ties at the boundary; FP8 keys with scales as well."""
    m = _import("triton_indexer")
    g = torch.Generator().manual_seed(1)
    B, S, T, HI, dI, topk = 2, 6, 40, 3, 8, 9
    q = torch.randint(-1, 2, (B, S, HI, dI), generator=g).float()
    w = torch.randint(0, 3, (B, S, HI), generator=g).float()
    k = torch.randint(-1, 2, (B, T, dI), generator=g).float()
    q_pos = torch.stack([torch.arange(S), torch.arange(T - S, T)])
    cfg = m.IndexerConfig(block_q=4, block_t=16, tiles=2, topk_block=64, radix_bits=8)
    got = m.indexer_topk(q.to(dev), w.to(dev), k.to(dev), q_pos=q_pos.to(dev), topk=topk, config=cfg, chunk=4)
    assert torch.equal(got.cpu(), ref.indexer_topk(q, w, k, q_pos=q_pos, topk=topk))
    k_scale = torch.full((B, T), 0.5)  # exact in e4m3: the same ties after quantisation
    k8 = (k / 0.5).to(torch.float8_e4m3fn)
    got = m.indexer_topk(q.to(dev), w.to(dev), k8.to(dev), k_scale=k_scale.to(dev), q_pos=q_pos.to(dev), topk=topk,
                         config=cfg)
    assert torch.equal(got.cpu(), ref.indexer_topk(q, w, k8, k_scale=k_scale, q_pos=q_pos, topk=topk))


def test_backend_indexer_switches_and_fp8_queries(dev):
    """``ops.triton.indexer_topk`` with each kernel choice, and with queries quantised to e4m3: entries in
    {-1.75, 0, 1.75}, each row holding 1.75, quantise exactly (scale 2^-8, codes +-448), so ties stay exact."""
    tr = _import("triton")
    g = torch.Generator().manual_seed(4)
    B, S, T, HI, dI, topk = 2, 3, 30, 2, 16, 8
    q = torch.randint(-1, 2, (B, S, HI, dI), generator=g).float() * 1.75
    q[..., 0] = 1.75
    w = torch.randint(0, 3, (B, S, HI), generator=g).float()
    k = torch.randint(-1, 2, (B, T, dI), generator=g).float()
    q_pos = torch.stack([torch.arange(S), torch.arange(T - S, T)])
    want = ref.indexer_topk(q, w, k, q_pos=q_pos, topk=topk)
    for choice in ({"indexer": "tiled"}, {"indexer": "rows"}, {"indexer": "tiled", "fp8_queries": True}):
        with tr.use_kernels(**choice):
            got = tr.indexer_topk(q.to(dev), w.to(dev), k.to(dev), q_pos=q_pos.to(dev), topk=topk)
            assert torch.equal(got.cpu(), want), choice


# ============================================================================================ dense MLA


@pytest.mark.parametrize("D,v_dim", [(40, 24), (32, 32)])
def test_dense_mla_flash_decoding_matches_reference(dev, D, v_dim):
    """Split-K over the keys (empty slices included: a query at position 0) merged by log-sum-exp; several
    launches when the partials' byte budget is small."""
    m = _import("triton_dense_mla")
    g = torch.Generator().manual_seed(6)
    B, S, T, H = 2, 3, 100, 20
    q, kv = torch.randn(B, S, H, D, generator=g), torch.randn(B, T, D, generator=g)
    q_pos = torch.tensor([[0, 50, 99], [3, 77, 5]])
    out_r, lse_r = ref.dense_mla(q, kv, q_pos, v_dim=v_dim, scale=0.25)
    for cfg in (m.DenseConfig(block_h=16, block_t=16, num_splits=3),
                m.DenseConfig(block_h=32, block_t=32, num_splits=2, partial_bytes=4 * H * 2 * v_dim * 2)):
        out, lse = m.dense_mla_forward(q.to(dev), kv.to(dev), q_pos.to(dev), v_dim, 0.25, cfg)
        torch.testing.assert_close(out.cpu(), out_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.cpu(), lse_r, rtol=1e-5, atol=1e-5)


def test_backend_dense_mla_uses_torch_for_gradients(dev):
    tr = _import("triton")
    g = torch.Generator().manual_seed(8)
    q, kv = torch.randn(1, 1, 3, 20, generator=g), torch.randn(1, 50, 20, generator=g)
    q_pos = torch.tensor([[49]])
    out_r, _ = ref.dense_mla(q, kv, q_pos, v_dim=16, scale=0.3)
    out, _ = tr.dense_mla(q.to(dev), kv.to(dev), q_pos.to(dev), v_dim=16, scale=0.3)  # the kernel
    torch.testing.assert_close(out.cpu(), out_r, rtol=1e-5, atol=1e-5)
    q1 = q.clone().to(dev).requires_grad_()
    out, _ = tr.dense_mla(q1, kv.to(dev), q_pos.to(dev), v_dim=16, scale=0.3)  # torch path: differentiable
    out.sum().backward()
    torch.testing.assert_close(out.detach().cpu(), out_r, rtol=1e-5, atol=1e-5)
    assert q1.grad is not None and torch.isfinite(q1.grad).all()


# ============================================================================================ 64-bit offsets


def test_dense_and_sparse_backward_offsets_past_2g_elements(dev):
    """int8 latents whose last batch starts past 2^31 elements (virtual memory, backed only where written):
    the flash-decoding kernel and the sparse backward read them through int64 offsets."""
    if dev.type != "cpu":
        pytest.skip("lazily backed host buffer: interpreter only")
    dm, sm = _import("triton_dense_mla"), _import("triton_sparse_mla")
    B, T, D, Dv, stride = 3, 24, 40, 32, 2**30 + 64
    buf = torch.empty((B - 1) * stride + T * D, dtype=torch.int8)
    kv = buf.as_strided((B, T, D), (stride, D, 1))
    kv.copy_(torch.randint(-100, 100, (B, T, D), generator=torch.Generator().manual_seed(1), dtype=torch.int8))
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, 2, 3, D, generator=g) / 32
    q_pos = torch.tensor([[23, 5], [0, 23], [17, 23]])
    cfg = dm.DenseConfig(block_h=16, block_t=16, num_splits=2)
    out, lse = dm.dense_mla_forward(q, kv, q_pos, Dv, 0.1, cfg)
    out_r, lse_r = ref.dense_mla(q, kv.float(), q_pos, v_dim=Dv, scale=0.1)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse, lse_r, rtol=1e-5, atol=1e-4)
    idx = torch.stack([torch.randperm(T, generator=g)[:8] for _ in range(B * 2)]).int().view(B, 2, 8)
    out, lse = sm.sparse_mla_forward(q, kv, idx, Dv, 0.1)
    d_out = torch.randn(out.shape, generator=g)
    dq, _ = sm.sparse_mla_backward(q, kv, idx, out, lse, d_out, None, Dv, 0.1, sm.TileConfig(16, 16))
    q2 = q.clone().requires_grad_()
    (ref.sparse_mla(q2, kv.float(), idx, v_dim=Dv, scale=0.1)[0] * d_out).sum().backward()
    torch.testing.assert_close(dq, q2.grad, rtol=1e-4, atol=1e-4)


# ============================================================================================ GPU timing


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="times the kernels on a GPU")
def test_kernel_timings_on_gpu(capsys):
    """Each kernel at reduced V3.2 shapes over a few tile configurations, bf16 (indexer FP8), correctness checked
    on a slice against the fp32 reference first; prints what it measured (docs/kernels.md: the full sweep)."""
    sweep = _import("triton_sweep")
    rows = sweep.run(sweep.QUICK, log=print, max_configs=2)  # bf16; the indexer on e4m3 codes
    assert rows and all(r["median_ms"] > 0 for r in rows)


def test_sweep_harness_runs_under_the_interpreter(dev):
    """The GPU sweep's own code (inputs, reference checks, every kernel's call) at tiny shapes, one small
    configuration each, so the scarce GPU session does not find its bugs. Its timings here mean nothing."""
    sw = _import("triton_sweep")
    sm, ix, dm = _import("triton_sparse_mla"), _import("triton_indexer"), _import("triton_dense_mla")
    tiny = sw.Shapes(S=4, T=48, H=20, K=16, D=40, Dv=24, HI=3, dI=24, B_dec=2)
    small = {"sparse_mla_fwd": [sm.TileConfig(16, 16)], "sparse_mla_bwd": [sm.TileConfig(16, 16)],
             "indexer_scores": [ix.IndexerConfig(block_q=4, block_t=16, tiles=2)],
             "topk": [ix.IndexerConfig(topk_block=64, radix_bits=8)],
             "dense_decode": [dm.DenseConfig(block_h=16, block_t=16, num_splits=2)]}
    rows = sw.run(tiny, device=dev.type, dtype=torch.float32, sweep=small, runs=1, warmup=0, log=lambda _: None)
    assert [r["kernel"] for r in rows] == ["sparse_mla_fwd", "sparse_mla_bwd", "indexer_scores", "topk_prefill",
                                           "topk_decode", "dense_decode"]
    assert all("error" not in r and r["median_ms"] > 0 for r in rows), rows


@pytest.mark.slow
def test_kernels_compile_for_sm90_on_tensor_cores():
    """Every kernel compiles for Hopper without a GPU (a separate process: the interpreter is off there), and the
    matrix kernels' SASS holds tensor-core instructions (wgmma, or mma.sync for the backward's 32-head blocks), and
    every swept configuration fits Hopper's shared memory per block."""
    pytest.importorskip("triton")
    import json
    import subprocess
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "report.json")
        subprocess.run([sys.executable, "-m", "dsv32.ops.triton_sweep", "--compile-report", "--json", path,
                        "--kernels", "sparse_mla_fwd", "sparse_mla_bwd", "indexer_scores", "dense_decode"],
                       env=env, check=True, capture_output=True, timeout=1800)
        rows = json.load(open(path))["rows"]
    assert rows and all("error" not in r for r in rows), [r.get("error") for r in rows]
    for r in rows:
        assert r["fits_shared"], r  # else the launch fails on the GPU
        if r["kernel"] != "dense_combine":
            assert r["wgmma"] + r["mma_sync"] > 0, r
