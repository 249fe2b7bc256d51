"""`dsv32 plot OUT [--out PNG]`: training curves from ``OUT/metrics.jsonl`` (matplotlib, Agg backend).

Four panels: train/validation loss, the loss terms (LM, MTP, balance), learning rate and gradient norm,
throughput (tokens/s) and MFU; for a `dsv32 rl` run (records with ``reward_mean``): reward and accuracy, KL and
mismatch, the clipped/masked/flipped shares, and the rollout/reference/train time split. Works on a run in
progress (reads whatever has been logged so far).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a run directory or the file); a torn last line is skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    recs = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            recs.append(rec)
    return recs


def _series(recs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_metrics(recs: list[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Write the four-panel PNG of ``recs`` to ``out``."""
    # Lazy: matplotlib takes about a second to import, and `read_metrics` (used by the trainer and sparsify)
    # needs none of it. The backend must be chosen before pyplot is first imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any("reward_mean" in r for r in recs):
        return _plot_rl(plt, recs, out, title)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    ax = axes[0][0]
    ax.plot(*_series(recs, "loss"), label="train loss (total)", lw=1)
    ax.plot(*_series(recs, "lm_loss"), label="train LM loss", lw=1, alpha=0.7)
    vs, vv = _series(recs, "val_loss")
    if vs:
        ax.plot(vs, vv, "o-", label="validation LM loss", ms=3)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()

    ax = axes[0][1]
    ax.plot(*_series(recs, "mtp_loss"), label="MTP loss (unweighted)", lw=1)
    bs, bv = _series(recs, "balance_loss")
    ax.set(xlabel="step", ylabel="MTP loss", title="MTP and balance losses")
    ax2 = ax.twinx()
    ax2.plot(bs, bv, color="tab:red", lw=1, label="balance loss (x alpha)")
    ax2.set_ylabel("balance loss", color="tab:red")
    ax.legend(loc="upper right")

    ax = axes[1][0]
    ax.plot(*_series(recs, "lr"), color="tab:green", lw=1)
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate and gradient norm")
    ax2 = ax.twinx()
    ax2.plot(*_series(recs, "grad_norm"), color="tab:purple", lw=1, alpha=0.7)
    ax2.set_ylabel("grad norm (before clipping)", color="tab:purple")

    ax = axes[1][1]
    ax.plot(*_series(recs, "tokens_per_s"), lw=1)
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput and MFU")
    ax2 = ax.twinx()
    ms, mv = _series(recs, "mfu")
    ax2.plot(ms, [100 * v for v in mv], color="tab:orange", lw=1, alpha=0.7)
    ax2.set_ylabel("MFU %", color="tab:orange")

    if title:
        fig.suptitle(title)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_rl(plt: Any, recs: list[dict[str, Any]], out: str | Path, title: str) -> Path:
    """The four panels of a `dsv32 rl` run: reward and accuracy; KL to the reference and the sampler/trainer
    mismatch; the shares the stability measures act on (clipped tokens, OPSM-masked sequences, routes that
    would flip without Keep Routing); seconds per step split into rollout / reference / train."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    ax = axes[0][0]
    ax.plot(*_series(recs, "reward_mean"), label="reward (mean)", lw=1)
    ax.plot(*_series(recs, "accuracy"), label="accuracy (sampled)", lw=1)
    ax.set(xlabel="step", title="reward")
    ax.legend()

    ax = axes[0][1]
    ax.plot(*_series(recs, "kl"), label="KL to the reference", lw=1)
    ax.plot(*_series(recs, "mismatch_kl"), label="mismatch: mean logp_old - logp", lw=1)
    ax.set(xlabel="step", title="KL and mismatch")
    ax.legend()

    ax = axes[1][0]
    for key, label in (("clip_frac", "clipped tokens"), ("masked_frac", "OPSM-masked sequences"),
                       ("route_flip_rate", "routes that would flip")):
        ax.plot(*_series(recs, key), label=label, lw=1)
    ax.set(xlabel="step", ylabel="share", title="stability measures at work")
    ax.legend()

    ax = axes[1][1]
    for key in ("t_rollout", "t_reference", "t_train"):
        ax.plot(*_series(recs, key), label=key.removeprefix("t_"), lw=1)
    ax.set(xlabel="step", ylabel="seconds", title="time per step")
    ax.legend()

    if title:
        fig.suptitle(title)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv32 plot", description="plot OUT/metrics.jsonl to a PNG")
    p.add_argument("run", type=Path, help="training output directory (or a metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN/metrics.png)")
    args = p.parse_args(argv)
    try:
        recs = read_metrics(args.run)
    except FileNotFoundError as e:
        print(f"dsv32 plot: {e}", file=sys.stderr)
        return 1
    if not recs:
        print(f"dsv32 plot: {args.run}: no metrics yet", file=sys.stderr)
        return 1
    run_dir = args.run if args.run.is_dir() else args.run.parent
    out = args.out or run_dir / "metrics.png"
    plot_metrics(recs, out, title=str(run_dir))
    print(out)
    return 0
