"""Where a needle gets lost: per layer, the dense model's retrieval attention on the needle vs the indexer's top-k.

For the answer positions of a retrieval prompt, one dense forward with the indexer outputs gives, per layer, (a)
how many of the needle's tokens the indexer's top-k would select (mean over answer rows) and (b) the largest
per-head share of dense attention on the needle (mean over answer rows); with ``--targets``, (c) the needle tokens
in the top-k of each indexer training target (``dsv32 sparsify --target``): what a perfectly trained indexer
would keep under that target. A retrieval head that attends to the
needle while the indexer drops it is what breaks retrieval under DSA (docs/sparsify.md). Llama family
(``LlamaAttnAux``: post-RoPE GQA ``q``/``k``).

Tasks: the ``dsv32 eval retrieval`` items (``dsv32.evals.needles``: passkey, multikey, distractor, split; the needle
tokens are those the answer needs) or ``legacy``, the ``dsv32 eval passkey`` items on the val split of ``--text``.

    python -m dsv32.evals.selection --indexer src/dsv32/assets/indexers/smollm2-135m/indexer.safetensors \\
        --task split --context 2048 --topk 256 --items 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

import numpy as np
import torch

from dsv32.data import load_split_texts
from dsv32.evals.needles import TASKS, Haystack, eval_texts, make_item
from dsv32.evals.passkey import NEEDLE, passkey_items
from dsv32.ops import reference as ref
from dsv32.ops.reference import causal_mask
from dsv32.registry import load_model
from dsv32.tokenizer import load_gguf_tokenizer
from dsv32.train.indexer_loss import TARGETS, Target, target_dist


@torch.no_grad()
def needle_selection(model: torch.nn.Module, ids: Sequence[int], answer_len: int, needle: Sequence[int],
                     topk: int, targets: Sequence[Target] = ()) -> dict[str, list[float]]:
    """Per layer: needle tokens (positions ``needle``) in the indexer's top-``topk`` and the max-head dense
    attention mass on them, both averaged over the rows that predict the last ``answer_len`` tokens of ``ids``.

    ``targets``: for each indexer training target (``dsv32.train.indexer_loss.Target``), the needle tokens inside
    the top-``topk`` of the target distribution itself, i.e. what an indexer that matched that target exactly
    would keep (``target_<kind>_needle_tokens``)."""
    x = torch.tensor(list(ids)[:-1]).unsqueeze(0)
    out = model.forward(x, dense=True, return_indexer=True, compute_logits=False)
    S = x.shape[1]
    rows = torch.arange(S - answer_len, S)
    pos = torch.tensor(list(needle))
    vis = causal_mask(rows.view(1, -1), S)[0]  # [r,T]: the answer rows do not see the keys after them
    res: dict[str, list[float]] = {"needle_tokens_selected": [], "max_head_mass": []}
    for aux in out.indexer:
        scores = ref.indexer_scores(aux.index_q[:, rows], aux.index_w[:, rows], aux.index_k)[0]  # [r,T]
        sel = scores.masked_fill(~vis, -math.inf).topk(min(topk, S), dim=-1).indices
        res["needle_tokens_selected"].append(float(torch.isin(sel, pos).float().sum(-1).mean()))
        P = torch.softmax(aux.main_logits(rows).masked_fill(~vis, -math.inf), dim=-1)  # [1,H,r,T]
        res["max_head_mass"].append(float(P[0][..., pos].sum(-1).max(0).values.mean()))
        for t in targets:
            p, _ = target_dist(P, t, torch.arange(S).view(1, 1, S))  # [1,r,T]
            top = p[0].topk(min(topk, S), dim=-1).indices
            res.setdefault(f"target_{t.kind}_needle_tokens", []).append(float(torch.isin(top, pos).sum(-1).float()
                                                                               .mean()))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--indexer", required=True)
    ap.add_argument("--task", choices=(*TASKS, "legacy"), default="passkey")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--num", type=int, default=6, help="legacy: passkey items (as dsv32 eval passkey --num)")
    ap.add_argument("--items", type=int, nargs="+", default=[0, 1, 2], help="which items")
    ap.add_argument("--text", default=None, help="legacy: text root (default runs/raw/raw); else the eval source")
    ap.add_argument("--seed", type=int, default=0, help="legacy items' seed")
    ap.add_argument("--targets", nargs="*", choices=TARGETS, default=[],
                    help="also the needle tokens in the top-k of these indexer training targets (per layer)")
    ap.add_argument("--peak-beta", type=float, default=8.0, help="per-head-kl target: head weight sharpness")
    args = ap.parse_args(argv)
    tok = load_gguf_tokenizer()
    model = load_model("smollm2-135m", indexer=args.indexer, topk=args.topk)
    if args.task == "legacy":
        texts, _ = load_split_texts([args.text or "runs/raw/raw"], "val")
        stream = np.array([t for x in texts for t in tok.encode(x)])
        items = passkey_items(tok, stream, context=args.context, num=args.num, seed=args.seed)
        n = len(tok.encode(NEEDLE.format(key=12345)))
        chosen = [(i, items[i].ids, items[i].answer_len, range(items[i].needle_pos, items[i].needle_pos + n),
                   items[i].depth) for i in args.items]
    else:
        hay = Haystack(tok, eval_texts([args.text] if args.text else None)[0])
        chosen = []
        for i in args.items:
            it = make_item(tok, hay, args.task, args.context, i)
            chosen.append((i, it.ids, it.answer_len, it.needle_positions, it.depth))
    targets = [Target(t, peak_beta=args.peak_beta) for t in args.targets]
    for i, ids, a_len, needle, depth in chosen:
        r = needle_selection(model, ids, a_len, needle, args.topk, targets)
        print(json.dumps({"task": args.task, "item": i, "depth": depth, "needle_tokens": len(needle),
                          **{k: [round(x, 2) for x in v] for k, v in r.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
