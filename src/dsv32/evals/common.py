"""What every evaluation shares: the model (``dsv32.load_model`` plus its tokenizer), whole-state weights from
a training run, the settings recorded beside each figure, the common CLI arguments and the JSON writer."""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

import dsv32
from dsv32.llama import LlamaModel
from dsv32.registry import add_placement_args, indexer_params, load_model, resolve_placement, shipped
from dsv32.tokenizer import load_tokenizer
from dsv32.train import checkpointing as ckpt

DEFAULT_TEXT = Path("runs/raw/raw")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n - c, k) / C(n, k),
    the chance that k of the n samples drawn without replacement hold at least one correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def load_eval_model(
    spec: str,
    *,
    dsa: bool = True,
    topk: int | None = None,
    index_heads: int | None = None,
    seed: int = 0,
    indexer: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) for ``spec`` (see the module docstring), through ``dsv32.load_model``.
    ``dsa`` turns the model's DSA on (sparse once a query sees more than k keys); ``topk`` sets its k;
    ``indexer`` loads indexer weights (metadata checked against the model); ``device``/``dtype`` place it."""
    model = load_model(spec, dsa=dsa, topk=topk, index_heads=index_heads, seed=seed, indexer=indexer, device=device,
                       dtype=dtype)
    if spec.lower().startswith("preset:"):
        return model, None  # random weights, no tokenizer
    if isinstance(model, LlamaModel):
        return model, load_tokenizer(spec)  # the GGUF's own tokenizer
    try:
        return model, load_tokenizer(spec)
    except (OSError, ValueError):
        return model, None


def base_settings(args: Any, mode: str, k: int | None) -> dict[str, Any]:
    """Settings every result carries."""
    indexer = "n/a (dense)" if mode == "dense" else ("n/a (window)" if mode == "window" else None)
    if indexer is None:
        if getattr(args, "weights", None):
            indexer = f"from --weights {args.weights}"
        elif args.indexer:
            indexer = str(args.indexer)
        elif (entry := shipped(args.model)) is not None and entry.indexer is not None:
            indexer = f"shipped ({entry.indexer.parent.relative_to(Path(dsv32.__file__).resolve().parent)})"
        elif getattr(args, "random_indexer", False) or entry is not None:
            indexer = f"random (seed {args.seed})"
        else:
            indexer = "the checkpoint's"
    return {
        "model": args.model, "context": args.context, "mode": mode, "topk": k if mode == "topk" else None,
        "window": k if mode == "window" else None, "sinks": 4 if mode == "window" else None, "indexer": indexer,
        "sparse_impl": None if mode == "dense" else getattr(args, "sparse_impl", "op"),
        "weights": str(args.weights) if getattr(args, "weights", None) else None,
        "seed": args.seed, "device": getattr(args, "device", None), "dtype": getattr(args, "dtype", None),
        "dsv32": dsv32.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "command": "dsv32 eval " + " ".join(sys.argv[2:])
        if sys.argv[1:2] == ["eval"] else None,
    }


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a whole trained state over ``model``: a checkpoint directory of ``dsv32 train``/``dsv32 sparsify``
    (its ``model`` part; stage 2 trains every weight) or a ``.safetensors`` state dict. Every tensor of the
    model must be present with its shape (a stage-1 checkpoint holds only indexers: use ``--indexer``)."""
    path = Path(path)
    if path.is_dir():
        if (path / "ckpt").is_dir():  # a run directory: its newest valid checkpoint
            found = ckpt.latest_valid(path / "ckpt")
            if found is None:
                raise SystemExit(f"--weights {path}: no valid checkpoint under {path / 'ckpt'}")
            path = found[0]
        if not (path / ckpt.MANIFEST).is_file():
            raise SystemExit(f"--weights {path}: not a checkpoint directory (no {ckpt.MANIFEST})")
        state = ckpt.load_parts(path, ["model"])["model"]
    elif path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        raise SystemExit(f"--weights {path}: not a checkpoint directory or a .safetensors file")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"--weights {path}: does not fit the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")


def prepare_model(args: Any, mode: str, k: int | None) -> tuple[nn.Module, Any]:
    device, dtype = resolve_placement(getattr(args, "device", "cpu"), getattr(args, "dtype", "float32"))
    model, tok = load_eval_model(args.model, dsa=mode != "dense", topk=k, index_heads=args.index_heads,
                                 seed=args.seed, indexer=args.indexer, device=device, dtype=dtype)
    if getattr(args, "weights", None):
        load_weights(model, args.weights)
    if getattr(args, "random_indexer", False):
        reset = getattr(model, "reset_indexer", None)
        if reset is not None:
            reset(args.seed)
        else:
            gen = torch.Generator().manual_seed(args.seed)
            with torch.no_grad():
                for p in indexer_params(model).values():
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=gen) * model.config.initializer_range)
    if getattr(args, "tokenizer", None):
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
    add_placement_args(p)


__all__ = ["DEFAULT_TEXT", "load_eval_model", "base_settings", "load_weights", "prepare_model", "write_json",
           "add_common_args"]
