"""Fast DSA ops (``ops/cpu.py``, ``ops/triton.py``) against the reference oracle (``ops/reference.py``).

Small shapes, CPU only. The chunk/block budgets are shrunk so that every loop (query chunks, key blocks,
row chunks) runs several times even at these sizes. Triton kernels run under TRITON_INTERPRET=1 unless a GPU
is present, and are skipped when triton cannot be imported.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from dsv32 import ops
from dsv32.ops import cpu
from dsv32.ops import reference as ref


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several query chunks, key blocks and row chunks at test sizes."""
    monkeypatch.setattr(cpu, "WORK_BYTES", 16 << 10)
    monkeypatch.setattr(cpu, "SCORE_BYTES", 8 << 10)
    monkeypatch.setattr(cpu, "INDEX_BLOCK_BYTES", 4 << 10)


def _ragged_positions(B: int, S: int, T: int) -> torch.Tensor:
    """Row 0: a prefill from 0 (many rows see < topk keys); row 1: a chunk deep in the context; row 2 (if any):
    decreasing positions with a gap (nothing assumes sorted positions)."""
    rows = [torch.arange(S), torch.arange(T - S, T)]
    if B > 2:
        rows.append(torch.arange(S).flip(0) * 3 % T)
    return torch.stack(rows[:B])


def _assert_same_selection(idx: torch.Tensor, want: torch.Tensor, scores: torch.Tensor) -> None:
    """Exact equality, or (float rounding at a near-tie) the same multiset of selected scores."""
    if torch.equal(idx, want):
        return
    assert torch.equal(idx < 0, want < 0), "different -1 slots"
    got_s = scores.gather(-1, idx.clamp_min(0).long()).masked_fill(idx < 0, 0).sort(-1).values
    want_s = scores.gather(-1, want.clamp_min(0).long()).masked_fill(want < 0, 0).sort(-1).values
    torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5)


# ============================================================================================ indexer top-k


@pytest.mark.parametrize("B,S,T,topk", [(2, 37, 150, 16), (3, 5, 64, 80), (1, 1, 40, 8)])
def test_indexer_topk_matches_reference(small_blocks, B, S, T, topk):
    g = torch.Generator().manual_seed(B * 100 + S)
    HI, dI = 4, 16
    q, w = torch.randn(B, S, HI, dI, generator=g), torch.randn(B, S, HI, generator=g)
    k = torch.randn(B, T, dI, generator=g)
    q_pos = _ragged_positions(B, S, T)
    want = ref.indexer_topk(q, w, k, q_pos=q_pos, topk=topk)
    got = cpu.indexer_topk(q, w, k, q_pos=q_pos, topk=topk)
    assert got.dtype == torch.int32 and got.shape == (B, S, topk)
    scores = ref.indexer_scores(q, w, k)
    _assert_same_selection(got, want, scores)
    # rows with fewer than topk visible keys: exactly the visible ones, then -1
    n_valid = (got >= 0).sum(-1)
    assert torch.equal(n_valid, (q_pos + 1).clamp(max=T).clamp(max=topk))


def test_indexer_topk_exact_ties_go_to_lower_position(small_blocks):
    """Integer-valued inputs make every score exact, with many equal values at the top-k boundary."""
    g = torch.Generator().manual_seed(1)
    B, S, T, HI, dI, topk = 2, 24, 96, 3, 8, 20
    q = torch.randint(-1, 2, (B, S, HI, dI), generator=g).float()
    w = torch.randint(0, 3, (B, S, HI), generator=g).float()
    k = torch.randint(-1, 2, (B, T, dI), generator=g).float()
    q_pos = _ragged_positions(B, S, T)
    want = ref.indexer_topk(q, w, k, q_pos=q_pos, topk=topk)
    assert torch.equal(cpu.indexer_topk(q, w, k, q_pos=q_pos, topk=topk), want)
    # all-equal rows: the first topk positions, in order (invisible keys are -inf, as indexer_topk passes them)
    flat = torch.zeros(3, 50)
    flat[1, 7:] = flat[2] = float("-inf")
    got = cpu.select_topk(flat, torch.tensor([50, 7, 0]), 10)
    assert got[0].tolist() == list(range(10))
    assert got[1].tolist() == list(range(7)) + [-1] * 3
    assert got[2].tolist() == [-1] * 10


def test_indexer_topk_random_ties_and_positions(small_blocks):
    """Many small cases with plateaus of exactly equal scores, positions beyond T and below 0, T < topk."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        B, HI, dI = 2, 3, 4
        S, T, topk = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 20), (1, 80), (1, 40)))
        q = torch.randint(-1, 2, (B, S, HI, dI), generator=g).float()
        w = torch.randint(0, 3, (B, S, HI), generator=g).float()
        k = torch.randint(-1, 2, (B, T, dI), generator=g).float()
        q_pos = torch.randint(-2, T + 3, (B, S), generator=g)
        want = ref.indexer_topk(q, w, k, q_pos=q_pos, topk=topk)
        assert torch.equal(cpu.indexer_topk(q, w, k, q_pos=q_pos, topk=topk), want), f"seed {seed}"
        # ordered=False (the masked form's unsorted top-k): the same set in each row, -1 slots included
        unordered = cpu.indexer_topk(q, w, k, q_pos=q_pos, topk=topk, ordered=False)
        assert torch.equal(unordered.sort(-1).values, want.sort(-1).values), f"seed {seed} (unordered)"


def test_indexer_topk_fp8_keys_with_scale(small_blocks):
    g = torch.Generator().manual_seed(2)
    B, S, T, HI, dI, topk = 2, 9, 120, 4, 16, 24
    q, w = torch.randn(B, S, HI, dI, generator=g), torch.randn(B, S, HI, generator=g)
    k = torch.randn(B, T, dI, generator=g) * 3
    k_scale = k.abs().amax(-1) / 448  # one fp32 scale per token
    k8 = (k / k_scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    q_pos = _ragged_positions(B, S, T)
    want = ref.indexer_topk(q, w, k8, k_scale=k_scale, q_pos=q_pos, topk=topk)
    got = cpu.indexer_topk(q, w, k8, k_scale=k_scale, q_pos=q_pos, topk=topk)
    _assert_same_selection(got, want, ref.indexer_scores(q, w, k8, k_scale=k_scale))


def test_indexer_topk_decode_batch_with_different_positions(small_blocks):
    """Batched decode: one query per row, each at its own position in a longer cache (stale tail ignored)."""
    g = torch.Generator().manual_seed(3)
    B, T, HI, dI, topk = 4, 200, 4, 16, 32
    q, w = torch.randn(B, 1, HI, dI, generator=g), torch.randn(B, 1, HI, generator=g)
    k = torch.randn(B, T, dI, generator=g)
    q_pos = torch.tensor([[5], [31], [32], [150]])
    got = cpu.indexer_topk(q, w, k, q_pos=q_pos, topk=topk)
    _assert_same_selection(got, ref.indexer_topk(q, w, k, q_pos=q_pos, topk=topk), ref.indexer_scores(q, w, k))
    assert int(got.max()) <= 150 and (got[0] >= 0).sum() == 6


# ============================================================================================ sparse MLA


def _sparse_inputs(B=2, S=11, T=60, H=3, D=24, K=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g)
    kv = torch.randn(B, T, D, generator=g)
    rows = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B * S)]).int()  # [B*S,K], B*S >= 4
    rows[0] = -1  # a row with no valid key
    rows[1, K // 2 :] = -1  # a partly empty row
    rows[2, ::3] = -1  # scattered -1 slots
    rows[3, :] = rows[3, 0]  # the same key several times
    return q, kv, rows.view(B, S, K)


@pytest.mark.parametrize("v_dim", [16, 24])
def test_sparse_mla_forward_and_grads(small_blocks, v_dim):
    q, kv, idx = _sparse_inputs()
    scale = 0.37
    out_r, lse_r = ref.sparse_mla(q, kv, idx, v_dim=v_dim, scale=scale)
    q1, kv1 = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out, lse = cpu.sparse_mla(q1, kv1, idx, v_dim=v_dim, scale=scale)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_r, rtol=1e-5, atol=1e-5)
    assert torch.all(out[0, 0] == 0) and torch.all(lse[0, 0] == float("-inf"))
    # gradients through out and through lse (finite part), vs the reference's autograd
    g = torch.Generator().manual_seed(9)
    d_out, d_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)

    def loss(o, l_):
        return (o * d_out).sum() + (torch.where(torch.isfinite(l_), l_, 0.0) * d_lse).sum()

    q2, kv2 = q.clone().requires_grad_(), kv.clone().requires_grad_()
    loss(*ref.sparse_mla(q2, kv2, idx, v_dim=v_dim, scale=scale)).backward()
    loss(out, lse).backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kv1.grad, kv2.grad, rtol=1e-4, atol=1e-5)


def test_sparse_mla_gradcheck_double():
    q, kv, idx = _sparse_inputs(B=1, S=4, T=10, H=2, D=6, K=4, seed=4)
    q, kv = q.double().requires_grad_(), kv.double().requires_grad_()
    fn = lambda a, b: cpu.SparseMLA.apply(a, b, idx, 4, 0.5)[0].double()  # noqa: E731
    # fp32 compute inside: loose tolerances, but a wrong formula fails by orders of magnitude
    assert torch.autograd.gradcheck(fn, (q, kv), eps=1e-3, atol=2e-3, rtol=2e-3)


def test_sparse_mla_equals_dense_when_every_key_is_selected():
    """With all visible keys selected, sparse MLA is dense causal MLA (both fast paths)."""
    g = torch.Generator().manual_seed(5)
    B, S, H, D, v = 2, 16, 3, 20, 12
    q, kv = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, D, generator=g)
    q_pos = torch.arange(S).expand(B, S)
    t = torch.arange(S)
    idx = torch.where(t.view(1, 1, S) <= q_pos.unsqueeze(-1), t, -1).int()
    out_s, lse_s = cpu.sparse_mla(q, kv, idx, v_dim=v, scale=0.3)
    out_d, lse_d = cpu.dense_mla(q, kv, q_pos, v_dim=v, scale=0.3)
    torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_s, lse_d, rtol=1e-5, atol=1e-5)


def test_dense_mla_matches_reference(monkeypatch):
    monkeypatch.setattr(cpu, "DENSE_BLOCK_BYTES", 4 << 10)  # several key blocks per query chunk
    g = torch.Generator().manual_seed(6)
    B, S, T, H, D, v = 2, 5, 3000, 2, 16, 8
    q, kv = torch.randn(B, S, H, D, generator=g), torch.randn(B, T, D, generator=g)
    q_pos = torch.tensor([[0, 1, 1500, 2999, 2047], [3, 4, 5, 6, 7]])
    q1 = q.clone().requires_grad_()
    out, lse = cpu.dense_mla(q1, kv, q_pos, v_dim=v, scale=0.25)
    out_r, lse_r = ref.dense_mla(q, kv, q_pos, v_dim=v, scale=0.25)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_r, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert q1.grad is not None and torch.isfinite(q1.grad).all()


def test_dispatch_uses_the_fast_cpu_path():
    t = torch.zeros(1)
    for op in ("indexer_topk", "sparse_mla", "dense_mla"):
        assert ops.backend_for(t, op) is cpu


def test_cost_model_flop_ratios_snapshot():
    """A snapshot of our cost model (``bench/cost.py``), not a check against the paper: the dense/DSA ratio of its
    FLOP part at 4K ... 128K, as written out in docs/benchmarks.md (a change to the model must update both). For
    comparison only, the paper's Figure 3 (H800, measured serving cost) shows about 3.6x cheaper prefill and 8.6x
    cheaper decode at 128K."""
    from dsv32.bench.cost import Shapes, cost_model
    from dsv32.config import ModelConfig

    s = Shapes.of(ModelConfig.from_name("deepseek-v3.2"))
    want = {"prefill": [0.69, 0.95, 1.39, 2.02, 2.80, 3.54], "decode": [1.46, 2.40, 3.97, 6.28, 9.07, 11.76]}
    for phase, n in (("prefill", 256), ("decode", 8)):
        got = [cost_model(s, phase, "dense", P, n)[0] / cost_model(s, phase, "dsa", P, n)[0]
               for P in (4096, 8192, 16384, 32768, 65536, 131072)]
        assert [round(r, 2) for r in got] == want[phase]


def test_cost_dense_prefill_runs_the_flash_kernel():
    """The dense-prefill baseline pads V like ``Attention._mha`` and forces SDPA's flash kernel: a V narrower
    than Q/K (math-kernel fallback) would raise here instead of silently timing a slower baseline."""
    from dsv32.bench.cost import build_attention, time_prefill
    from dsv32.config import ModelConfig

    cfg = ModelConfig.from_name("tiny")
    assert cfg.v_head_dim < cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    dsa, per_token, sdpa, heads = time_prefill(build_attention(cfg), P=40, C=8, runs=1, kv_budget=1 << 20)
    assert heads == cfg.num_attention_heads and sdpa.median > 0


def test_bench_cli_routes_cost():
    from dsv32.bench import cli_main

    assert cli_main(["--help"]) == 0
    assert cli_main(["nope"]) == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["cost", "--help"])
    assert e.value.code == 0


def test_bench_serve_and_peers_smoke(tmp_path, capsys):
    """`dsv32 bench serve --quick` (our engine, tiny model) and `bench peers` (ours vs HF, tiny) run end to end."""
    import json

    from dsv32.bench import cli_main

    out = tmp_path / "serve.json"
    assert cli_main(["serve", "--quick", "--prompt-len", "24", "--new-tokens", "6", "--requests", "4",
                     "--concurrency", "1", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["system"], r["concurrency"], r["new_tokens"]) for r in res["rows"]] == [
        ("dsv32 engine", 1, 24), ("dsv32 engine", 4, 24)]
    assert res["follow_up"]["reuse_cached_tokens"] > 0 and res["follow_up"]["no_reuse_cached_tokens"] == 0
    out = tmp_path / "peers.json"
    assert cli_main(["peers", "--preset", "tiny", "--layers", "2", "--lengths", "40", "--decode-tokens", "2",
                     "--threads", "1", "--json", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    assert {(p["system"], p["phase"]) for p in points if "error" not in p} == {
        ("dsv32", "prefill"), ("hf", "prefill"), ("dsv32", "decode"), ("hf", "decode")}
    assert all(p["peak_rss_gb"] > 0 for p in points)


# ============================================================================================ Triton kernels


def _import_triton_ops():
    """dsv32.ops.triton; without a GPU, under Triton's interpreter. TRITON_INTERPRET is read when triton and each
    @triton.jit function are first imported, so it is set before the first import of triton in this process."""
    if not torch.cuda.is_available():
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton was imported earlier in this process without TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    return importlib.import_module("dsv32.ops.triton")


@pytest.fixture(scope="module")
def tr():
    """(dsv32.ops.triton, device); TRITON_INTERPRET is restored afterwards so other test modules are unaffected."""
    before = os.environ.get("TRITON_INTERPRET")
    try:
        yield _import_triton_ops(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def test_triton_indexer_matches_reference(tr):
    mod, dev = tr
    g = torch.Generator().manual_seed(7)
    B, S, T, HI, dI, topk = 2, 5, 90, 4, 16, 12
    q, w = torch.randn(B, S, HI, dI, generator=g), torch.randn(B, S, HI, generator=g)
    k = torch.randn(B, T, dI, generator=g)
    k_scale = torch.rand(B, T, generator=g) + 0.5
    k8 = (k / k_scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    q_pos = _ragged_positions(B, S, T)
    for kk, ks in ((k, None), (k8, k_scale)):
        scores = mod.indexer_scores(q.to(dev), w.to(dev), kk.to(dev), k_scale=None if ks is None else ks.to(dev),
                                    q_pos=q_pos.to(dev)).cpu()
        want = ref.indexer_scores(q, w, kk, k_scale=ks).masked_fill(~ref.causal_mask(q_pos, T), float("-inf"))
        torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
        got = mod.indexer_topk(q.to(dev), w.to(dev), kk.to(dev), k_scale=None if ks is None else ks.to(dev),
                               q_pos=q_pos.to(dev), topk=topk).cpu()
        _assert_same_selection(got, ref.indexer_topk(q, w, kk, k_scale=ks, q_pos=q_pos, topk=topk), want)


def test_triton_sparse_mla_matches_reference(tr):
    mod, dev = tr
    q, kv, idx = _sparse_inputs(B=2, S=4, T=40, H=3, D=40, K=20)
    out_r, lse_r = ref.sparse_mla(q, kv, idx, v_dim=32, scale=0.3)
    q1, kv1 = q.clone().to(dev).requires_grad_(), kv.clone().to(dev).requires_grad_()
    out, lse = mod.sparse_mla(q1, kv1, idx.to(dev), v_dim=32, scale=0.3)
    torch.testing.assert_close(out.cpu(), out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu(), lse_r, rtol=1e-5, atol=1e-5)
    out.sum().backward()  # torch backward from the saved lse
    q2, kv2 = q.clone().requires_grad_(), kv.clone().requires_grad_()
    ref.sparse_mla(q2, kv2, idx, v_dim=32, scale=0.3)[0].sum().backward()
    torch.testing.assert_close(q1.grad.cpu(), q2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kv1.grad.cpu(), kv2.grad, rtol=1e-4, atol=1e-5)


# ============================================================================================ 64-bit offsets

BIG = 2**30 + 64  # a batch stride below 2^31, so Triton passes it as int32; batch 2 starts past 2^31 elements


def _int8_batches(B: int, T: int, D: int, batch_stride: int, seed: int, fill: torch.Tensor | None = None):
    """[B,T,D] int8 rows at ``batch_stride`` elements apart in one buffer of more than 2^31 one-byte elements.

    Without ``fill`` the buffer comes from ``torch.empty``: the OS backs only the pages written (the B small
    blocks), so the test costs a few KB of memory while every byte offset the kernels form is real."""
    n = (B - 1) * batch_stride + T * D
    assert n > 2**31
    buf = torch.empty(n, dtype=torch.int8) if fill is None else fill
    kv = buf.as_strided((B, T, D), (batch_stride, D, 1))
    kv.copy_(torch.randint(-100, 100, (B, T, D), generator=torch.Generator().manual_seed(seed), dtype=torch.int8))
    return kv


def _check_kernels_past_2g(mod, kv: torch.Tensor, ik: torch.Tensor, T: int) -> None:
    """Indexer scores and sparse MLA over int8 keys/latents whose last batch lies past 2^31 elements, against
    the reference on exactly the rows touched (fp32 copies of the [B,T,.] views)."""
    B, D, dI, dev = kv.shape[0], kv.shape[2], ik.shape[2], kv.device
    g = torch.Generator().manual_seed(3)
    H, S, K, Dv = 2, 2, 8, D - 8
    q = torch.randn(B, S, H, D, generator=g) / 32
    idx = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B * S)]).int().view(B, S, K)
    idx[0, 0, ::2] = -1
    out, lse = mod.sparse_mla_forward(q.to(dev), kv, idx.to(dev), Dv, 0.1)
    out_r, lse_r = ref.sparse_mla(q, kv[:, :T].float().cpu(), idx, v_dim=Dv, scale=0.1)
    torch.testing.assert_close(out.cpu(), out_r, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse.cpu(), lse_r, rtol=1e-5, atol=1e-4)
    HI = 2
    qi, w = torch.randn(B, S, HI, dI, generator=g), torch.randn(B, S, HI, generator=g)
    q_pos = torch.full((B, S), T - 1)
    scores = mod.indexer_scores(qi.to(dev), w.to(dev), ik, q_pos=q_pos.to(dev), T=T).cpu()
    torch.testing.assert_close(scores, ref.indexer_scores(qi, w, ik[:, :T].float().cpu()), rtol=1e-5, atol=1e-3)


def test_triton_kernels_offsets_past_2g_elements(tr):
    """Batch 2 of a latent/indexer-key cache starts 2^31 + 128 elements in (a 32-bit b x stride wraps there);
    the buffer is virtual memory, backed only where written, so this runs in the default suite."""
    mod, dev = tr
    if dev.type != "cpu":
        pytest.skip("lazily backed host buffer: interpreter only")
    T = 24
    kv = _int8_batches(3, T, 40, BIG, seed=1)
    ik = _int8_batches(3, T, 16, BIG, seed=2)
    _check_kernels_past_2g(mod, kv, ik, T)


@pytest.mark.slow
def test_triton_kernels_on_a_real_2gib_latent_buffer(tr):
    """A real, fully written int8 buffer of 16 x 248,600 x 576 = 2.29e9 elements (2.1 GiB): the last batch's
    rows start past 2^31, as in a many-sequence decode at long context. Only a few rows are read."""
    mod, dev = tr
    B, T_all, D = 16, 248_600, 576
    buf = torch.randint(-100, 100, (B * T_all * D,), dtype=torch.int8, device=dev)
    kv = buf.view(B, T_all, D)  # batch 15 starts at 2.148e9 elements
    ik = buf.view(B, T_all * D // 128, 128)  # the same bytes seen as indexer keys: batch 15 at 2.148e9 too
    _check_kernels_past_2g(mod, kv, ik, T=32)


@pytest.mark.parametrize("use_dsa", [True, False])
def test_attention_absorbed_form_in_query_chunks(monkeypatch, use_dsa):
    """The absorbed form runs long prefills in query chunks (bounded temporaries): chunks of 5 queries give the
    same output and gradients as one chunk, sparse (DSA) and dense."""
    from dsv32 import model as M
    from dsv32.config import ModelConfig

    cfg = ModelConfig.from_name("tiny")
    torch.manual_seed(0)
    attn = M.Attention(cfg)
    S = 23  # > index_topk 16: later queries select
    x = torch.randn(2, S, cfg.hidden_size)
    positions = torch.arange(S).expand(2, S)
    cos, sin = M.rope_cos_sin(M.yarn_inv_freq(cfg), positions)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        attn.zero_grad()
        out = attn(x, positions, cos, sin, use_dsa=use_dsa, form="absorbed")[0]
        out.square().sum().backward()
        return out.detach(), attn.q_b_proj.weight.grad.clone()

    out1, g1 = run()
    per_query = 4 * 2 * cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    monkeypatch.setattr(M, "ABSORBED_QUERY_BYTES", 5 * per_query)
    out5, g5 = run()
    torch.testing.assert_close(out5, out1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g5, g1, rtol=1e-4, atol=1e-6)
