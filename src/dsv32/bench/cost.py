"""`dsv32 bench cost`: one layer's attention cost by token position, dense MLA vs DSA (V3.2 paper, Figure 3).

One ``dsv32.model.Attention`` layer with DeepSeek-V3.2's real shapes (hidden 7168, 128 heads, q_lora 1536,
kv_lora 512, rope 64, nope 128, v 128, indexer 64 x 128, top-k 2048), random weights, fp32, all threads
(``--weights-format`` packs both sides' projections in a CPU inference format of ``dsv32.quant``):

- prefill: a chunk of C=256 new queries at positions P..P+C-1.
  * dense (V3.1's MHA form): the chunk's projections (incl. its own K/V expansion: each token's per-token
    cost, paid once as in a full prefill), SDPA over the context's expanded K/V, built before the timer, and
    o_proj. The SDPA call is the model's own (``Attention._mha``): V zero-padded to the 192-wide Q/K head so
    SDPA runs its flash kernel, forced with ``sdpa_kernel(FLASH_ATTENTION)`` (a fallback to the ~1.6x slower
    math kernel is an error, not a slower baseline). Where the 128-head K/V does not fit in ``--kv-budget-gb``,
    SDPA runs on a subset of heads and its time is scaled by 128/heads (attention is independent per head;
    the table says which).
  * DSA: ``Attention.forward`` over a latent cache holding the context: projections, indexer, top-k, sparse
    MLA in the absorbed form, o_proj - the model's own code path.
- decode: one new token for each of 8 sequences at position P, weights shared by the batch:
  ``Attention.forward`` with the cache, ``use_dsa=False`` (dense, absorbed form) vs ``use_dsa=True``.

Each time is the median of ``--runs`` calls after one warm-up call; dense and DSA calls alternate, so both
sides see the same background load. ``model_ratio`` comes from one FLOP-and-bytes model (``cost_model``;
written out in docs/benchmarks.md) applied to both sides, with the machine's GEMM rate and memory bandwidth
measured at start-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsv32.cache import MLACache
from dsv32.config import ModelConfig
from dsv32.model import Attention, apply_rope_interleaved, rope_cos_sin, yarn_inv_freq
from dsv32.quant import WEIGHT_FORMATS, pack_linears

POSITIONS = [4096, 8192, 16384, 32768, 65536, 131072]
QUICK_MAX = 32768
QUICK_HEADS = 32  # --quick times the dense-prefill SDPA on this many heads (scaled to 128)
PREFILL_CHUNK = 256
DECODE_BATCH = 8
KV_BUDGET_BYTES = 4 << 30  # expanded K/V (V padded) of the dense-prefill context (fp32); beyond, fewer heads


@dataclass
class Point:
    phase: str  # "prefill" | "decode"
    position: int  # P: tokens of context before the new token(s)
    dense_s: float  # seconds per call (prefill: one chunk of C queries; decode: one token for each sequence)
    dsa_s: float
    ratio: float  # dense_s / dsa_s
    model_ratio: float  # the same ratio predicted by cost_model
    dense_model_s: float
    dsa_model_s: float
    dense_heads_timed: int  # prefill: heads SDPA ran on (time scaled to all heads); decode: all heads
    dense_runs: list[float]
    dsa_runs: list[float]


# ============================================================================================ the cost model


@dataclass
class Shapes:
    """The attention shapes the model and the cost model need (from a ModelConfig)."""

    D: int  # hidden
    H: int  # heads
    dq: int  # q_lora_rank
    dl: int  # kv_lora_rank (latent, = absorbed value dim)
    R: int  # rope dims
    dn: int  # nope dims
    dv: int  # value head dim
    HI: int  # indexer heads
    dI: int  # indexer head dim
    K: int  # top-k

    @classmethod
    def of(cls, cfg: ModelConfig) -> Shapes:
        return cls(cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank,
                   cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.index_n_heads,
                   cfg.index_head_dim, cfg.index_topk)


def cost_model(s: Shapes, phase: str, side: str, P: int, n: int) -> tuple[float, float, float]:
    """(FLOPs, bytes, weight bytes) of one call: ``n`` new tokens at positions P.. (prefill: one sequence;
    decode: n sequences).

    FLOPs count every matmul (2 per multiply-add); bytes count compulsory fp32 traffic: the context's keys once
    per sequence, DSA's score rows (written, read by top-k) and gathered rows; weight bytes are the projection
    weights, read once per call (charged at the measured weight-streaming rate of a few-row ``nn.Linear``, which
    is well below the copy bandwidth: the GEMM packs the weight first). Elementwise work (norms, RoPE, softmax,
    ReLU) is left out on both sides.
    """
    Lq = s.dl + s.R  # absorbed query/key dim (576)
    w_common = s.D * s.dq + s.dq * s.H * (s.dn + s.R) + s.D * (s.dl + s.R) + s.H * s.dv * s.D  # q_a q_b kv_a o
    w_kvb = s.dl * s.H * (s.dn + s.dv)  # MHA: the new tokens' K/V expansion; absorbed: W_UK and W_UV
    w_index = s.dq * s.HI * s.dI + s.D * s.dI + s.D * s.HI  # indexer wq_b, wk, weights_proj
    if phase == "prefill":
        keys = [P + i + 1 for i in range(n)]  # keys visible to each query of the chunk
        n_seq, T = 1, P + n
    else:
        keys = [P + 1] * n
        n_seq, T = n, P + 1
    weights = w_common + w_kvb + (w_index if side == "dsa" else 0)
    flops = 2.0 * n * weights
    nbytes = 0.0
    if side == "dense" and phase == "prefill":  # MHA form: q.k over dn+R, p.v over dv, per head
        flops += 2.0 * s.H * (s.dn + s.R + s.dv) * sum(keys)
        nbytes += 4.0 * T * s.H * (s.dn + s.R + s.dv)
    elif side == "dense":  # absorbed form over the latent rows: q.k over dl+R, p.v over dl
        flops += 2.0 * s.H * (Lq + s.dl) * sum(keys)
        nbytes += 4.0 * n_seq * T * Lq
    else:  # indexer (logits + head weighting), top-k over score rows, sparse attention over <= K rows
        flops += 2.0 * s.HI * (s.dI + 1) * sum(keys)
        flops += 2.0 * s.H * (Lq + s.dl) * sum(min(s.K, t) for t in keys)
        nbytes += 4.0 * n_seq * T * s.dI + 2 * 4.0 * sum(keys) + 4.0 * Lq * sum(min(s.K, t) for t in keys)
    return flops, nbytes, 4.0 * weights


def calibrate(rows: int = DECODE_BATCH, weights_format: str = "fp32") -> tuple[float, float, float]:
    """This machine's fp32 GEMM rate (FLOP/s), copy bandwidth (bytes/s, read + write) and the rate at which a
    ``rows``-row linear in ``weights_format`` (``dsv32.quant``) streams a 128 MB fp32 weight (fp32-equivalent
    bytes/s), medians of 3."""
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    t_mm = _median_time(lambda: a @ b, 3).median
    x = torch.rand(64 << 20)
    y = torch.empty_like(x)
    t_cp = _median_time(lambda: y.copy_(x), 3).median
    proj, h = torch.nn.Sequential(torch.nn.Linear(4096, 8192, bias=False)), torch.rand(rows, 4096)
    pack_linears(proj, weights_format)
    with torch.inference_mode():
        t_w = _median_time(lambda: proj(h), 3).median
    return 2 * 2048**3 / t_mm, 2 * (64 << 20) * 4 / t_cp, proj[0].weight.numel() * 4 / t_w


# ============================================================================================ timing


@dataclass
class Timing:
    median: float
    runs: list[float]


def _median_time(fn: Callable[[], object], runs: int, warmup: int = 1) -> Timing:
    return _interleaved({"fn": fn}, runs, warmup)["fn"]


def _interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several functions in turn (a, b, a, b, ...) so that they share whatever else loads the machine."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    return {name: Timing(statistics.median(v), v) for name, v in ts.items()}


def build_attention(cfg: ModelConfig, seed: int = 0) -> Attention:
    """One Attention layer (incl. its indexer) with random weights (nn.Linear's default init), frozen."""
    torch.manual_seed(seed)
    attn = Attention(cfg).eval()
    attn.requires_grad_(False)
    return attn


def _filled_cache(cfg: ModelConfig, batch: int, P: int, extra: int) -> MLACache:
    """A one-layer latent + indexer-key cache whose rows hold P random context tokens."""
    cache = MLACache(num_layers=1, batch_size=batch, max_len=P + extra,
                     latent_dim=cfg.kv_lora_rank + cfg.qk_rope_head_dim, index_dim=cfg.index_head_dim)
    cache.kv[0][:, :P].uniform_(-1, 1)
    cache.index_k[0][:, :P].uniform_(-1, 1)
    cache.lengths.fill_(P)
    return cache


def _rope(attn: Attention, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_cos_sin(yarn_inv_freq(attn.cfg), positions)


def time_prefill(
    attn: Attention, P: int, C: int, runs: int, max_heads: int | None = None, kv_budget: int = KV_BUDGET_BYTES
) -> tuple[Timing, Timing, Timing, int]:
    """One chunk of C queries at P -> (DSA, dense per-token part, dense SDPA part, heads SDPA ran on).

    DSA is the model's own path over a latent cache of P tokens. Dense is the MHA form: the context's expanded
    K/V is built before the timer for ``heads`` heads (all 128 when it fits in ``kv_budget`` bytes), V padded
    to the Q/K width as ``Attention._mha`` pads it; the SDPA time is for those heads only and the caller scales
    it by 128/heads. The three parts are timed in turn.
    """
    cfg = attn.cfg
    H, dn, R, dv, dl = attn.n_heads, attn.nope, attn.rope, attn.v_dim, attn.kv_rank
    positions = torch.arange(P, P + C).unsqueeze(0)  # [1,C]
    cos, sin = _rope(attn, positions)
    x = torch.randn(1, C, cfg.hidden_size)
    cache = _filled_cache(cfg, 1, P, C)
    T = P + C
    heads = min(H, max_heads or H)
    while heads > 1 and 4 * T * heads * 2 * (dn + R) > kv_budget:
        heads //= 2
    k_ctx = torch.empty(1, heads, T, dn + R).uniform_(-1, 1)  # [1,h,T,Dn+R]
    v_ctx = torch.zeros(1, heads, T, dn + R)  # [1,h,T,Dn+R]: V in the first Dv dims, zero padding after
    v_ctx[..., :dv].uniform_(-1, 1)
    mask = (torch.arange(T).view(1, T) <= positions.view(C, 1)).view(1, 1, C, T)  # as Attention._mha builds it

    def dsa() -> torch.Tensor:
        return attn(x, positions, cos, sin, cache=cache, use_dsa=True)[0]

    def per_token() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything per token, all heads: q, the chunk's latents and their K/V expansion, o_proj."""
        c_q = attn.q_a_layernorm(attn.q_a_proj(x))
        q = attn.q_b_proj(c_q).view(1, C, H, dn + R)
        q = torch.cat([q[..., :dn], apply_rope_interleaved(q[..., dn:], cos, sin)], dim=-1)  # [1,C,H,Dn+R]
        kv = attn.kv_a_proj_with_mqa(x)
        c_kv = attn.kv_a_layernorm(kv[..., :dl])
        k_pe = apply_rope_interleaved(kv[..., dl:], cos, sin)  # [1,C,R]
        kvx = attn.kv_b_proj(c_kv).view(1, C, H, dn + dv)  # this chunk's expanded K/V
        k_new = torch.cat([kvx[..., :dn], k_pe.unsqueeze(2).expand(1, C, H, R)], dim=-1)  # [1,C,H,Dn+R]
        attn.o_proj(torch.zeros(1, C, H * dv))  # the output projection (its input values do not matter)
        return q.transpose(1, 2), k_new.transpose(1, 2), kvx[..., dn:].transpose(1, 2)

    q_all, k_new, v_new = per_token()

    def sdpa() -> torch.Tensor:
        """The chunk's K/V rows written into the expanded cache, then flash SDPA (``heads`` heads)."""
        k_ctx[:, :, P:] = k_new[:, :heads]
        v_ctx[:, :, P:, :dv] = v_new[:, :heads]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q_all[:, :heads], k_ctx, v_ctx, attn_mask=mask,
                                               scale=attn.softmax_scale)
        return o[..., :dv]

    t = _interleaved({"dsa": dsa, "per_token": per_token, "sdpa": sdpa}, runs)
    return t["dsa"], t["per_token"], t["sdpa"], heads


def time_decode(attn: Attention, P: int, batch: int, runs: int) -> tuple[Timing, Timing]:
    """(dense, DSA) timings of one token for each of ``batch`` sequences at position P (the model's path)."""
    cfg = attn.cfg
    cache = _filled_cache(cfg, batch, P, 1)
    positions = torch.full((batch, 1), P)
    cos, sin = _rope(attn, positions)
    x = torch.randn(batch, 1, cfg.hidden_size)
    t = _interleaved({
        "dense": lambda: attn(x, positions, cos, sin, cache=cache, use_dsa=False),
        "dsa": lambda: attn(x, positions, cos, sin, cache=cache, use_dsa=True),
    }, runs)
    return t["dense"], t["dsa"]


# ============================================================================================ report


def run(positions: list[int], *, runs: int, phases: list[str], chunk: int, batch: int,
        max_heads: int | None = None, kv_budget: int = KV_BUDGET_BYTES, weights_format: str = "fp32",
        log: Callable[[str], None] = print) -> dict:
    cfg = ModelConfig.from_name("deepseek-v3.2")
    shapes = Shapes.of(cfg)
    flops_rate, bandwidth, weight_rate = calibrate(batch, weights_format)
    log(f"# calibration: fp32 GEMM {flops_rate / 1e9:.1f} GFLOP/s, copy {bandwidth / 1e9:.1f} GB/s, "
        f"{batch}-row {weights_format} linear streams weights at {weight_rate / 1e9:.1f} GB/s (fp32-equivalent), "
        f"{torch.get_num_threads()} threads")
    attn = build_attention(cfg)
    pack_linears(attn, weights_format)  # both sides run the same (packed) projections
    points: list[Point] = []

    def predict(phase: str, side: str, P: int, n: int) -> float:
        fl, by, wb = cost_model(shapes, phase, side, P, n)  # weights: a decode step's few rows stream them at
        return fl / flops_rate + by / bandwidth + wb / (weight_rate if phase == "decode" else bandwidth)  # the
        # measured skinny-GEMM rate; a 256-row prefill chunk is compute-bound, its weight reads at copy speed

    log(f"{'phase':<8} {'P':>7} {'dense_s':>9} {'dsa_s':>9} {'ratio':>7} {'model':>7} {'r/model':>8}  note")
    with torch.inference_mode():
        for phase in phases:
            for P in positions:
                if phase == "prefill":
                    dsa, proj, core, heads = time_prefill(attn, P, chunk, runs, max_heads, kv_budget)
                    dense_runs = [p + c * shapes.H / heads for p, c in zip(proj.runs, core.runs)]
                    dense_s = proj.median + core.median * shapes.H / heads
                    n = chunk
                else:
                    dense, dsa = time_decode(attn, P, batch, runs)
                    dense_runs, dense_s, heads, n = dense.runs, dense.median, shapes.H, batch
                m_dense, m_dsa = predict(phase, "dense", P, n), predict(phase, "dsa", P, n)
                pt = Point(phase, P, dense_s, dsa.median, dense_s / dsa.median, m_dense / m_dsa, m_dense, m_dsa,
                           heads, dense_runs, dsa.runs)
                points.append(pt)
                note = f"SDPA on {heads}/{shapes.H} heads, scaled" if heads < shapes.H else ""
                log(f"{phase:<8} {P:>7} {pt.dense_s:>9.3f} {pt.dsa_s:>9.3f} {pt.ratio:>6.2f}x {pt.model_ratio:>6.2f}x "
                    f"{pt.ratio / pt.model_ratio:>7.0%}  {note}")
    settings = {
        "model": "deepseek-v3.2 attention (one layer, random weights, fp32 activations)",
        "shapes": asdict(shapes),
        "prefill_chunk": chunk,
        "decode_batch": batch,
        "runs": runs,
        "dense_prefill_max_heads": max_heads,
        "dense_prefill_kv_budget_bytes": kv_budget,
        "dense_prefill_sdpa": "flash (forced), V padded to the Q/K head width as in Attention._mha",
        "weights_format": weights_format,
        "statistic": "median after one warm-up call",
        "threads": torch.get_num_threads(),
        "gemm_flops_per_s": flops_rate,
        "copy_bytes_per_s": bandwidth,
        "weight_stream_bytes_per_s": weight_rate,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return {"points": [asdict(p) for p in points], "settings": settings}


def plot(result: dict, path: str) -> None:
    """Time per token vs position, dense vs DSA, measured (solid) and cost model (dashed), one panel per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    phases = [ph for ph in ("prefill", "decode") if any(p["phase"] == ph for p in result["points"])]
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.5), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        pts = [p for p in result["points"] if p["phase"] == phase]
        n = s["prefill_chunk"] if phase == "prefill" else s["decode_batch"]
        x = [p["position"] / 1024 for p in pts]
        for side, color in (("dense", "tab:red"), ("dsa", "tab:blue")):
            label = "dense MLA (V3.1)" if side == "dense" else "DSA (V3.2)"
            ax.plot(x, [1e3 * p[f"{side}_s"] / n for p in pts], "o-", color=color, label=f"{label}, measured")
            ax.plot(x, [1e3 * p[f"{side}_model_s"] / n for p in pts], "--", color=color, alpha=0.6,
                    label=f"{label}, cost model")
        for p, xi in zip(pts, x):
            ax.annotate(f"{p['ratio']:.1f}x", (xi, 1e3 * p["dense_s"] / n), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{int(v)}K" for v in x])
        ax.set_xlabel("token position")
        ax.set_ylabel("ms per token (one attention layer)")
        what = f"chunk of {n} queries" if phase == "prefill" else f"batch of {n} sequences"
        ax.set_title(f"{phase} ({what})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"DeepSeek-V3.2 attention, dense vs DSA, CPU fp32, {s['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsv32 bench cost", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"positions <= {QUICK_MAX // 1024}K, 2 runs, dense SDPA timed on <= {QUICK_HEADS} heads")
    ap.add_argument("--positions", type=int, nargs="+", help="override the positions P")
    ap.add_argument("--phase", choices=["prefill", "decode", "both"], default="both")
    ap.add_argument("--runs", type=int, default=None, help="timed calls per point (default 5, quick 2)")
    ap.add_argument("--dense-heads", type=int, default=None,
                    help="at most this many heads in the dense-prefill SDPA (time scaled to all heads)")
    ap.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="prefill queries per call")
    ap.add_argument("--batch", type=int, default=DECODE_BATCH, help="decode sequences per call")
    ap.add_argument("--kv-budget-gb", type=float, default=KV_BUDGET_BYTES / 2**30,
                    help="GiB of expanded dense-prefill K/V; beyond it SDPA runs on fewer heads (scaled)")
    ap.add_argument("--weights-format", choices=WEIGHT_FORMATS, default="fp32",
                    help="projection weights of both sides (dsv32.quant.pack_linears; CPU inference formats)")
    ap.add_argument("--json", metavar="FILE", help="write {points: [...], settings: {...}}")
    ap.add_argument("--plot", metavar="FILE", help="write a PNG plot (matplotlib)")
    args = ap.parse_args(argv)
    positions = args.positions or [p for p in POSITIONS if not args.quick or p <= QUICK_MAX]
    runs = args.runs or (2 if args.quick else 5)
    max_heads = args.dense_heads or (QUICK_HEADS if args.quick else None)
    phases = ["prefill", "decode"] if args.phase == "both" else [args.phase]
    result = run(positions, runs=runs, phases=phases, chunk=args.chunk, batch=args.batch, max_heads=max_heads,
                 kv_budget=int(args.kv_budget_gb * 2**30), weights_format=args.weights_format)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError:
            print("dsv32 bench cost: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Point", "Shapes", "Timing", "cost_model", "calibrate", "run", "plot", "main"]
