"""`dsv32 bench kernels` on the CPU at tiny shapes: the JSON's fields, the FLOP formulas of issue 14's measurement
conditions, the forced flash baseline, and the Triton backend under the interpreter."""

import json
import os
import sys

import pytest
import torch

from dsv32.bench import kernels

TINY = ["--device", "cpu", "--dtype", "float32", "--seq", "4", "--ctx", "256", "--heads", "4", "--topk", "32",
        "--index-heads", "4", "--decode-batch", "2", "--runs", "2", "--warmup", "0"]
NAMES = {"sparse_mla_fwd", "sparse_mla_fwd_bwd", "indexer_scores", "topk", "indexer_topk", "prefill_dsa",
         "prefill_dense", "decode_topk", "decode_dsa", "decode_dense"}


def _run(tmp_path, extra=()) -> dict:
    path = tmp_path / "kernels.json"
    assert kernels.main([*TINY, *extra, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_bench_kernels_cpu_json_and_flop_formulas(tmp_path, capsys):
    out = _run(tmp_path)
    table = capsys.readouterr().out
    res = {r["name"]: r for r in out["results"]}
    assert NAMES <= set(res)
    for name in res:
        assert name in table  # the printed table lists every kernel
    st = out["settings"]
    assert st["reduced"] is True and st["device"] == "cpu" and st["dtype"] == "float32"
    assert st["full_shapes"] == {**st["full_shapes"], "S": 1024, "T": 131072, "H": 128, "K": 2048, "HI": 64,
                                 "dI": 128, "D": 576, "Dv": 512, "B_dec": 16}
    assert st["runs"] == 2 and st["backend"] == "auto"
    S, T, H, K, HI, dI, B = 4, 256, 4, 32, 4, 128, 2
    assert res["sparse_mla_fwd"]["flops"] == 2 * S * H * K * (576 + 512)
    assert res["sparse_mla_fwd_bwd"]["flops"] == 3 * 2 * S * H * K * (576 + 512)
    assert res["indexer_scores"]["flops"] == 2 * S * T * HI * dI
    assert res["indexer_topk"]["flops"] == 2 * S * T * HI * dI
    assert res["topk"]["flops"] is None and res["topk"]["bytes"] == 4 * S * T + 4 * S * K
    assert res["prefill_dsa"]["flops"] == 2 * S * T * HI * dI + 2 * S * H * K * (576 + 512)
    keys = sum(T - S + i + 1 for i in range(S))  # causal: query i (position T-S+i) sees T-S+i+1 keys
    assert res["prefill_dense"]["flops"] == 2 * H * (192 + 128) * keys
    assert res["decode_dsa"]["flops"] == 2 * B * T * HI * dI + 2 * B * H * K * (576 + 512)
    assert res["decode_dense"]["flops"] == 2 * B * H * T * (576 + 512)
    assert res["decode_dense"]["bytes"] == 4 * (B * T * 576 + B * H * 576 + B * H * 512)
    # the CPU backend has no separate scores function: the figure says how it was derived
    assert res["indexer_scores"]["derived"] and res["sparse_mla_fwd"]["derived"] is None
    for r in res.values():
        assert len(r["runs_s"]) == 2 and r["median_s"] > 0
        assert r["tbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e12)
        if r["flops"] is not None:
            assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)
    ratios = out["ratios"]
    assert ratios["prefill_dense_over_dsa"] == pytest.approx(res["prefill_dense"]["median_s"]
                                                             / res["prefill_dsa"]["median_s"])
    assert ratios["decode_dense_over_dsa"] == pytest.approx(res["decode_dense"]["median_s"]
                                                            / res["decode_dsa"]["median_s"])


def test_scaled_shapes_and_full_defaults():
    assert kernels.scaled_shapes(1) == kernels.FULL
    s = kernels.scaled_shapes(8)
    assert (s.S, s.T, s.H, s.K, s.HI) == (128, 16384, 16, 2048, 64)
    with pytest.raises(ValueError, match="distinct causal keys"):
        kernels.Shapes(S=4, T=16, K=32).check()


def test_dense_baseline_refuses_a_fallback():
    """V as wide as Q/K runs the flash kernel; the unpadded 128-wide V cannot, and that is an error."""
    H, S, T = 2, 4, 64
    q, k = torch.randn(1, H, S, 192), torch.randn(1, H, T, 192)
    v = torch.zeros(1, H, T, 192)
    v[..., :128] = torch.randn(1, H, T, 128)
    out = kernels.dense_prefill_fn(q, k, v, 192**-0.5)()
    kernels._dense_prefill_check(out, q, k, v, 192**-0.5)  # the same numbers as plain softmax attention
    with pytest.raises(RuntimeError):
        kernels.dense_prefill_fn(q, k, v[..., :128].contiguous(), 192**-0.5)()


def test_bench_kernels_rejects_cuda_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        kernels.main(["--device", "cuda"])
    assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_bench_kernels_triton_backend_under_the_interpreter(tmp_path):
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("triton was imported without TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    out = _run(tmp_path, ["--backend", "triton", "--skip", "sparse_mla_bwd", "prefill", "--runs", "1"])
    res = {r["name"]: r for r in out["results"]}
    assert res["sparse_mla_fwd"]["impl"] == "dsv32.ops.triton.sparse_mla"
    assert res["indexer_scores"]["impl"] == "dsv32.ops.triton.indexer_scores"
    assert res["indexer_scores"]["derived"] is None
    assert "decode_indexer_scores" in res and "prefill_dense" not in res
