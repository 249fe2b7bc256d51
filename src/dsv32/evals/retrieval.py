"""`dsv32 eval retrieval`: RULER-style retrieval (passkey, multi-key, distractor needles, a needle split over two
spans) at several depths and contexts, on evaluation-only needles and haystack (``dsv32.evals.needles``).

Scoring is exact match, teacher-forced: an item is right when the argmax at every answer position is the answer
token (= greedy decoding gives the answer); one forward per item. Per task and context: accuracy, accuracy by
depth, accuracy on items whose needles lie outside a sliding window of the same k, and (``--needle-recall``) per
layer the share of the asked needle's tokens inside the selection the model attended to (DSA / window modes) and
the largest per-head dense attention mass on them: which layers hold retrieval heads, and whether the indexer
keeps what they look at (docs/sparsify.md, "Why the passkeys are lost").

    dsv32 eval retrieval --model smollm2-135m-dsa --context 2048 4096 --topk 256 512 --num 50 --json r.json
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dsv32.evals.common import base_settings, prepare_model, write_json
from dsv32.evals.modes import forward_kwargs, mode_context
from dsv32.evals.needles import (
    DEPTHS,
    EVAL_KEY_PATTERN,
    EVAL_SOURCE,
    EVAL_TEMPLATES,
    RETRIEVAL_SEED,
    TASKS,
    Haystack,
    NeedleItem,
    eval_texts,
    make_items,
)
from dsv32.ops.reference import causal_mask
from dsv32.registry import add_placement_args


def needle_layers(auxes: list[Any], item: NeedleItem, rows: torch.Tensor) -> dict[str, list[float | None]]:
    """Per layer, at the answer-predicting ``rows``: the share of the asked needles' tokens inside the attended
    selection (1 where the layer ran dense: every key was attended to) and the largest per-head dense attention
    mass on them."""
    needle = torch.tensor(item.needle_positions, device=rows.device)
    recall: list[float | None] = []
    mass: list[float] = []
    for aux in auxes:
        if aux.topk_idx is None:
            recall.append(1.0)
        else:
            sel = aux.topk_idx[0, rows].long()  # [r,K]
            recall.append(float(torch.isin(sel, needle).sum(-1).float().mean()) / len(needle))
        logits = aux.main_logits(rows)[0]  # [H,r,T]
        vis = causal_mask(aux.q_pos[:, rows], logits.shape[-1])[0]  # [r,T]
        p = torch.softmax(logits.masked_fill(~vis, -math.inf), dim=-1)
        mass.append(float(p[..., needle].sum(-1).max(0).values.mean()))
    return {"needle_recall_layers": recall, "needle_head_mass_layers": mass}


@torch.no_grad()
def score_items(model: nn.Module, items: list[NeedleItem], *, mode: str, k: int | None, sparse_impl: str = "op",
                needle_recall: bool = False, progress: bool = True) -> dict[str, Any]:
    """Exact-match accuracy of ``model`` on ``items`` (one task, one context) -> a results dict."""
    t0 = time.perf_counter()
    per_item = []
    device = next(model.parameters()).device
    for it in tqdm(items, disable=not progress, desc=f"{items[0].task if items else ''} {mode}", unit="item"):
        ids = torch.tensor(it.ids[:-1], device=device).unsqueeze(0)
        S = ids.shape[1]
        target = torch.tensor(it.ids[-it.answer_len :], device=device)
        with mode_context(mode, sparse_impl):
            out = model.forward(ids, return_hidden=True, compute_logits=False, return_indexer=needle_recall,
                                **forward_kwargs(mode, k))
        pred = model.logits_from_hidden(out.hidden[:, -it.answer_len :])[0].argmax(-1)
        reach = S - it.answer_len - (k - 4) if k is not None else None  # first key of a k-window at the answer
        rec: dict[str, Any] = {
            "depth": it.depth, "answer": it.answer, "spans": [list(s) for s in it.spans],
            "correct": bool((pred == target).all()), "answer_tokens_right": int((pred == target).sum()),
            "wrong_at": [i for i, ok in enumerate((pred == target).tolist()) if not ok],  # answer token indices
            "needle_in_window": reach is not None and all(a >= reach for a, _ in it.spans),
        }
        if needle_recall:
            rows = torch.arange(S - it.answer_len, S, device=device)
            layers = needle_layers(out.indexer, it, rows)
            if mode == "dense":  # no selection to speak of
                layers["needle_recall_layers"] = [None] * len(layers["needle_recall_layers"])
            rec.update({key: [None if v is None else round(v, 4) for v in vals] for key, vals in layers.items()})
        per_item.append(rec)
    n_ok = sum(r["correct"] for r in per_item)
    by_depth: dict[float, list[bool]] = defaultdict(list)
    for r in per_item:
        by_depth[r["depth"]].append(r["correct"])
    far = [r["correct"] for r in per_item if not r["needle_in_window"]]
    res: dict[str, Any] = {
        "accuracy": n_ok / len(per_item), "correct": n_ok, "items": len(per_item),
        "accuracy_by_depth": {f"{d:g}": sum(v) / len(v) for d, v in sorted(by_depth.items())},
        "accuracy_out_of_window": sum(far) / len(far) if far else None, "items_out_of_window": len(far),
        "answer_tokens_right": sum(r["answer_tokens_right"] for r in per_item),
        "seconds": time.perf_counter() - t0,
    }
    if needle_recall:
        for key in ("needle_recall_layers", "needle_head_mass_layers"):
            cols = list(zip(*(r[key] for r in per_item)))
            res[key.replace("_layers", "_by_layer")] = [
                None if any(v is None for v in c) else round(sum(c) / len(c), 4) for c in cols]
    res["per_item"] = per_item
    return res


def _per_context(values: list[int] | None, contexts: list[int], flag: str) -> list[int | None]:
    if not values:
        return [None] * len(contexts)
    if len(values) == 1:
        return values * len(contexts)
    if len(values) != len(contexts):
        raise SystemExit(f"dsv32 eval retrieval: {flag} takes one value or one per --context ({len(contexts)})")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32 eval retrieval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF dir, .gguf, smollm2-135m, smollm2-135m-dsa or preset:NAME")
    p.add_argument("--context", type=int, nargs="+", required=True, help="tokens per item, e.g. 2048 4096")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--topk", type=int, nargs="+", help="DSA, k keys per query (one k, or one per --context)")
    m.add_argument("--dense", action="store_true", help="dense attention (the default)")
    m.add_argument("--window", type=int, nargs="+", help="sliding window: 4 sinks + the last K-4 keys (per context)")
    p.add_argument("--task", nargs="+", choices=(*TASKS, "all"), default=["all"])
    p.add_argument("--num", type=int, default=50, help="items per task and context (>= 50 for a reported figure)")
    p.add_argument("--needle-recall", action="store_true",
                   help="per layer: needle tokens inside the attended selection, max-head dense mass on the needle")
    p.add_argument("--indexer", type=Path, help="indexer weights (safetensors from dsv32 sparsify)")
    p.add_argument("--weights", type=Path, help="all weights from a training run (as dsv32 eval ppl --weights)")
    p.add_argument("--random-indexer", action="store_true", help="re-initialise the indexers randomly (seeded)")
    p.add_argument("--index-heads", type=int, help="Llama family: indexer heads (must match --indexer)")
    p.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    p.add_argument("--text", type=Path, nargs="+", default=None,
                   help=f"raw text roots holding a {EVAL_SOURCE!r} sub-directory (default: the named source)")
    p.add_argument("--sparse-impl", choices=("op", "masked"), default="op")
    p.add_argument("--seed", type=int, default=0, help="random-indexer seed only; the items use RETRIEVAL_SEED")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result here (it is printed too)")
    add_placement_args(p)
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    contexts = list(args.context)
    tasks = list(TASKS) if "all" in args.task else list(dict.fromkeys(args.task))
    if args.window:
        mode, ks = "window", _per_context(args.window, contexts, "--window")
    elif args.topk:
        mode, ks = "topk", _per_context(args.topk, contexts, "--topk")
    else:
        mode, ks = "dense", [None] * len(contexts)
    args.context = contexts[0]  # base_settings / prepare_model take one; every context is listed below
    model, tok = prepare_model(args, mode, ks[0])
    if tok is None:
        raise SystemExit("dsv32 eval retrieval: this model has no tokenizer; pass --tokenizer")
    texts, text_info = eval_texts(args.text)
    hay = Haystack(tok, texts)
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        for T, k in zip(contexts, ks):
            items = make_items(tok, hay, task, T, args.num)
            results.setdefault(task, {})[str(T)] = {"k": k, **score_items(
                model, items, mode=mode, k=k, sparse_impl=args.sparse_impl, needle_recall=args.needle_recall)}
    settings = {
        **base_settings(args, mode, ks[0]), "contexts": contexts, "k_per_context": ks, "tasks": tasks,
        "num": args.num, "items_seed": RETRIEVAL_SEED, "depths": list(DEPTHS), "haystack": text_info,
        "eval_source": EVAL_SOURCE, "templates": list(EVAL_TEMPLATES), "key_format": EVAL_KEY_PATTERN.pattern,
        "scoring": "exact match, teacher-forced argmax over the answer tokens (= greedy decoding)",
    }
    summary = {task: {T: r["accuracy"] for T, r in by_t.items()} for task, by_t in results.items()}
    write_json({"eval": "retrieval", "settings": settings, "results": {"summary": summary, "tasks": results}},
               args.json)
    return 0


__all__ = ["needle_layers", "score_items", "cli_main"]
