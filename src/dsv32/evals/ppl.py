"""`dsv32 eval ppl`: held-out perplexity at context T, dense or DSA (top-k / sliding window).

Sequences are ``--num-seqs`` windows of T+1 tokens spread evenly over the held-out token stream (documents
joined as ``BOS doc EOS``); every window predicts its last T tokens. Reported: perplexity over all positions
and over the positions whose query sees more than k keys (``beyond_k``: where DSA can differ from dense at
all), plus with ``--recall`` the mean indexer recall and KL of the selections the model made (V3.2 paper §2.1;
the recall definition is the sparsify diagnostic's).

Example (docs/sparsify.md)::

    dsv32 eval ppl --model smollm2-135m-dsa --context 4096 --topk 512 --num-seqs 4 --json runs/eval/ppl-dsa.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dsv32.data import TokenDataset, load_split_texts, tokenize_docs
from dsv32.evals.common import DEFAULT_TEXT, add_common_args, base_settings, prepare_model, write_json
from dsv32.evals.modes import attention_mode, forward_kwargs, mode_context
from dsv32.train.indexer_loss import indexer_loss
from dsv32.train.losses import chunked_cross_entropy


def heldout_stream(tok: Any, text: list[Path] | None, *, data: Path | None = None,
                   max_chars: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The held-out token stream and a description of it: ``data``'s val split (token shards) or the val
    documents of ``text`` tokenised with ``tok``."""
    if data is not None:
        ds = TokenDataset(data, "val")
        return ds.read(0, ds.num_tokens), {"data": str(data), "split": "val", "tokens": int(ds.num_tokens)}
    roots = text or [DEFAULT_TEXT]
    texts, names = load_split_texts(roots, "val", max_chars=max_chars)
    if tok is None:
        raise SystemExit("dsv32 eval: this model has no tokenizer; pass --tokenizer or --data")
    ids = tokenize_docs(tok, texts)
    return ids, {"text": [str(r) for r in roots], "split": "val", "documents": names, "tokens": int(len(ids))}


def window_starts(n_tokens: int, context: int, num_seqs: int) -> list[int]:
    """``num_seqs`` starts of (context + 1)-token windows spread evenly over the stream (non-overlapping when
    it is long enough)."""
    last = n_tokens - context - 1
    if last < 0:
        raise ValueError(f"held-out text has {n_tokens} tokens, fewer than context + 1 = {context + 1}")
    if num_seqs == 1:
        return [0]
    return sorted({round(i * last / (num_seqs - 1)) for i in range(num_seqs)})


@torch.no_grad()
def eval_ppl(
    model: nn.Module, stream: np.ndarray, *, context: int, mode: str, k: int | None, num_seqs: int,
    recall: bool = False, progress: bool = True, beyond: int | None = None, sparse_impl: str = "op",
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``num_seqs`` windows of ``stream`` -> the ``results`` dict.

    ``beyond``: the k of ``ppl_beyond_k`` (default ``k``; give it for a dense run to compare like with like).
    """
    kb = beyond or k
    starts = window_starts(len(stream), context, num_seqs)
    nll = nll_far = 0.0
    n = n_far = 0
    recalls, kls, per_seq = [], [], []
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    for s in tqdm(starts, disable=not progress, desc=f"ppl {mode}", unit="seq"):
        row = torch.from_numpy(stream[s : s + context + 1].astype(np.int64)).unsqueeze(0).to(device)
        ids, labels = row[:, :-1], row[:, 1:]
        want_aux = recall and mode != "dense"
        with mode_context(mode, sparse_impl):
            out = model.forward(ids, return_hidden=True, compute_logits=False, return_indexer=want_aux,
                                **forward_kwargs(mode, k))
        far = torch.arange(context).unsqueeze(0) + 1 > (kb or context)  # the query sees more than k keys
        total = float(chunked_cross_entropy(out.hidden, model.head_weight, labels, reduction="sum"))
        part = float(chunked_cross_entropy(out.hidden, model.head_weight, labels, far, reduction="sum")) if kb else 0.0
        nll, n = nll + total, n + context
        nll_far, n_far = nll_far + part, n_far + int(far.sum())
        seq = {"start": int(s), "nll": total / context}
        if want_aux:
            stats = indexer_loss(out.indexer, topk=k, sparse=True, recall=True)
            r = [st.recall for st in stats if st.recall is not None]
            seq["recall"] = sum(r) / len(r) if r else None
            seq["recall_layers"] = [None if st.recall is None else round(st.recall, 4) for st in stats]
            seq["kl"] = sum(st.kl for st in stats) / len(stats)
            if seq["recall"] is not None:
                recalls.append(seq["recall"])
            kls.append(seq["kl"])
        per_seq.append(seq)
    res: dict[str, Any] = {
        "ppl": math.exp(nll / n), "nll": nll / n, "tokens": n,
        "ppl_beyond_k": math.exp(nll_far / n_far) if n_far else None, "tokens_beyond_k": n_far, "beyond_k": kb,
        "sequences": len(starts), "seconds": time.perf_counter() - t0,
    }
    if recalls or kls:
        res["recall"] = sum(recalls) / len(recalls) if recalls else None
        res["kl"] = sum(kls) / len(kls) if kls else None
    res["per_sequence"] = per_seq
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32 eval ppl", description="held-out perplexity, dense or DSA")
    add_common_args(p)
    p.add_argument("--data", type=Path, help="token shards: use their val split instead of --text")
    p.add_argument("--num-seqs", type=int, default=4, help="windows of context + 1 tokens")
    p.add_argument("--max-chars", type=int, default=None, help="cap per source of held-out text")
    p.add_argument("--recall", action="store_true", help="also the indexer recall/KL of the selections (--topk)")
    p.add_argument("--beyond", type=int, help="k of ppl_beyond_k (default: --topk/--window; set it for --dense)")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    mode, k = attention_mode(args)
    model, tok = prepare_model(args, mode, k)
    stream, data_info = heldout_stream(tok, args.text, data=args.data, max_chars=args.max_chars)
    results = eval_ppl(model, stream, context=args.context, mode=mode, k=k, num_seqs=args.num_seqs,
                       recall=args.recall, beyond=args.beyond, sparse_impl=args.sparse_impl)
    settings = {**base_settings(args, mode, k), "num_seqs": args.num_seqs, "data": data_info}
    write_json({"eval": "ppl", "settings": settings, "results": results}, args.json)
    return 0
