"""`dsv32 eval passkey`: retrieve a key hidden at seeded depths of real held-out text (exact match).

Task ``passkey`` (default): a needle "The pass key is NNNNN. Remember it. NNNNN is the pass key." is inserted at
depth d of T tokens of held-out text, and the prompt ends with "What is the pass key? The pass key is"; the
answer " NNNNN" must come out exactly. The depths are ``--num`` evenly spaced values in [0.02, 0.95] with a
seeded key and filler offset each, so the item set is fixed for a seed; at k = T/8 most needles lie outside
the last k-4 tokens, i.e. out of reach of a sliding window. Task ``kv``: four locker combinations in the held-out
text, one asked about (``dsv32.evals.needles``' ``multikey`` items, whose templates and key format no training
document uses; ``dsv32 eval retrieval`` is the full RULER-style set).

Exact match is scored teacher-forced: the answer is right when the argmax at every answer position is the
answer token, i.e. exactly when greedy decoding would produce the answer; one forward per item.

Check the dense model first (``--dense``): a DSA score only means something where dense solves the items.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dsv32.data import load_split_texts
from dsv32.evals.common import DEFAULT_TEXT, add_common_args, base_settings, prepare_model, write_json
from dsv32.evals.modes import attention_mode, forward_kwargs, mode_context
from dsv32.evals.needles import Haystack, make_items
from dsv32.evals.ppl import heldout_stream

NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class Item:
    """One retrieval prompt: ``ids`` (context tokens, answer included at the end) and where the answer starts."""

    ids: list[int]
    answer_len: int
    depth: float
    needle_pos: int  # token position of the needle's first token
    answer: str


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text))


def passkey_items(tok: Any, stream: np.ndarray, *, context: int, num: int, seed: int) -> list[Item]:
    """``num`` passkey prompts of exactly ``context`` tokens from the held-out token stream."""
    rng = random.Random(seed)
    depths = [0.02 + (0.95 - 0.02) * i / max(1, num - 1) for i in range(num)]
    bos = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []
    items = []
    for d in depths:
        key = rng.randint(10_000, 99_999)
        needle = _encode(tok, NEEDLE.format(key=key))
        question, answer = _encode(tok, QUESTION), _encode(tok, f" {key}")
        n_fill = context - len(bos) - len(needle) - len(question) - len(answer)
        if n_fill < 1:
            raise ValueError(f"context {context} is too short for the passkey prompt")
        off = rng.randrange(0, len(stream) - n_fill)
        filler = [int(t) for t in stream[off : off + n_fill]]
        at = round(d * n_fill)
        ids = bos + filler[:at] + needle + filler[at:] + question + answer
        items.append(Item(ids, len(answer), round(d, 4), len(bos) + at, str(key)))
    return items


def kv_items(tok: Any, texts: list[str], *, context: int, num: int) -> list[Item]:
    """``num`` key-value items of exactly ``context`` tokens: four lockers with combinations in ``texts``, one
    asked for (``dsv32.evals.needles``' ``multikey`` task: evaluation-only templates and key format, never the
    training generators of ``dsv32.data.synthetic``)."""
    hay = Haystack(tok, texts)
    return [Item(it.ids, it.answer_len, it.depth, it.spans[0][0], it.answer)
            for it in make_items(tok, hay, "multikey", context, num)]


@torch.no_grad()
def eval_items(model: nn.Module, items: list[Item], *, mode: str, k: int | None, progress: bool = True,
               sparse_impl: str = "op") -> dict[str, Any]:
    """Exact-match accuracy of ``model`` on ``items`` -> the ``results`` dict."""
    t0 = time.perf_counter()
    per_item = []
    device = next(model.parameters()).device
    for it in tqdm(items, disable=not progress, desc=f"passkey {mode}", unit="item"):
        ids = torch.tensor(it.ids[:-1], device=device).unsqueeze(0)
        target = torch.tensor(it.ids[-it.answer_len :], device=device)
        with mode_context(mode, sparse_impl):
            out = model.forward(ids, return_hidden=True, compute_logits=False, **forward_kwargs(mode, k))
        logits = model.logits_from_hidden(out.hidden[:, -it.answer_len :])[0]  # predicts the answer tokens
        pred = logits.argmax(-1)
        in_window = (k is not None and it.needle_pos >= 0
                     and it.needle_pos >= len(it.ids) - it.answer_len - (k - 4))
        per_item.append({"depth": it.depth, "needle_pos": it.needle_pos, "answer": it.answer,
                         "correct": bool((pred == target).all()), "answer_tokens_right": int((pred == target).sum()),
                         "needle_in_window": bool(in_window)})
    n_ok = sum(r["correct"] for r in per_item)
    out_of_reach = [r for r in per_item if not r["needle_in_window"]]
    return {
        "accuracy": n_ok / len(per_item), "correct": n_ok, "items": len(per_item),
        "accuracy_out_of_window": (sum(r["correct"] for r in out_of_reach) / len(out_of_reach)) if out_of_reach
        else None,
        "seconds": time.perf_counter() - t0, "per_item": per_item,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32 eval passkey", description="passkey retrieval in held-out text")
    add_common_args(p)
    p.add_argument("--task", choices=("passkey", "kv"), default="passkey")
    p.add_argument("--num", type=int, default=10, help="items (depths evenly spaced in [0.02, 0.95])")
    p.add_argument("--data", type=Path, help="token shards: take filler from their val split (passkey task)")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    mode, k = attention_mode(args)
    model, tok = prepare_model(args, mode, k)
    if tok is None:
        raise SystemExit("dsv32 eval passkey: this model has no tokenizer; pass --tokenizer")
    if args.task == "passkey":
        stream, data_info = heldout_stream(tok, args.text, data=args.data)
        items = passkey_items(tok, stream, context=args.context, num=args.num, seed=args.seed)
    else:
        roots = args.text or [DEFAULT_TEXT]
        texts, names = load_split_texts(roots, "val")
        data_info = {"text": [str(r) for r in roots], "split": "val", "documents": names}
        items = kv_items(tok, texts, context=args.context, num=args.num)
    results = eval_items(model, items, mode=mode, k=k, sparse_impl=args.sparse_impl)
    settings = {**base_settings(args, mode, k), "task": args.task, "num": args.num, "data": data_info,
                "scoring": "exact match, teacher-forced argmax over the answer tokens (= greedy decoding)"}
    write_json({"eval": "passkey", "settings": settings, "results": results}, args.json)
    return 0
