"""Where a passkey gets lost: per layer, the dense model's retrieval attention on the needle vs the indexer's top-k.

For the answer positions of passkey prompts (``passkey_items``), one dense forward with the indexer outputs gives,
per layer, (a) how many of the needle's tokens the indexer's top-k selects (mean over answer rows) and (b) the
largest per-head share of dense attention on the needle (mean over answer rows). A retrieval head that attends to
the needle while the indexer drops it is what breaks retrieval under DSA (docs/sparsify.md). Llama family
(``LlamaAttnAux``: post-RoPE GQA ``q``/``k``).

    python -m dsv32.evals.selection --indexer src/dsv32/assets/indexers/smollm2-135m/indexer.safetensors \\
        --context 2048 --topk 256 --items 1 2 3
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from dsv32.data import load_split_texts
from dsv32.evals.passkey import NEEDLE, passkey_items
from dsv32.ops import reference as ref
from dsv32.registry import load_model
from dsv32.tokenizer import load_gguf_tokenizer


@torch.no_grad()
def needle_selection(model: torch.nn.Module, item: Any, needle_len: int, topk: int) -> dict[str, list[float]]:
    """Per layer: needle tokens in the indexer's top-``topk`` and the max-head dense attention mass on them."""
    ids = torch.tensor(item.ids[:-1]).unsqueeze(0)
    out = model.forward(ids, dense=True, return_indexer=True, compute_logits=False)
    S = ids.shape[1]
    rows = torch.arange(S - item.answer_len, S)
    needle = torch.arange(item.needle_pos, item.needle_pos + needle_len)
    selected, mass = [], []
    for aux in out.indexer:
        scores = ref.indexer_scores(aux.index_q[:, rows], aux.index_w[:, rows], aux.index_k)[0]  # [r,T]
        sel = scores.topk(min(topk, scores.shape[-1]), dim=-1).indices
        selected.append(float(torch.isin(sel, needle).float().sum(-1).mean()))
        q, k = aux.q[0, rows], aux.k[0]  # [r,H,D], [T,Hkv,D]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [T,H,D]
        p = torch.softmax(torch.einsum("rhd,thd->rht", q, k) * aux.scale, dim=-1)  # causal: rows are the last ones
        mass.append(float(p[..., needle].sum(-1).max(-1).values.mean()))
    return {"needle_tokens_selected": selected, "max_head_mass": mass}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--indexer", required=True)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--num", type=int, default=6, help="passkey items (as dsv32 eval passkey --num)")
    ap.add_argument("--items", type=int, nargs="+", default=None, help="which of them (default: all)")
    ap.add_argument("--text", default="runs/raw/raw")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tok = load_gguf_tokenizer()
    texts, _ = load_split_texts([args.text], "val")
    stream = np.array([t for x in texts for t in tok.encode(x)])
    items = passkey_items(tok, stream, context=args.context, num=args.num, seed=args.seed)
    model = load_model("smollm2-135m", indexer=args.indexer, topk=args.topk)
    n = len(tok.encode(NEEDLE.format(key=12345)))
    for i in args.items if args.items is not None else range(len(items)):
        r = needle_selection(model, items[i], n, args.topk)
        print(json.dumps({"item": i, "depth": items[i].depth, "needle_tokens": n,
                          **{k: [round(x, 2) for x in v] for k, v in r.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
