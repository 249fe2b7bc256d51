"""dsv32: DeepSeek-V3.2 (MLA + DeepSeekMoE + MTP + DeepSeek Sparse Attention) in PyTorch.

Public surface (docs/design.md): ``load_model``, ``save_model``, ``ModelConfig``, ``load_tokenizer``, ``Transformer``.
Heavy submodules are imported lazily so ``import dsv32`` stays light.
"""

from __future__ import annotations

from typing import Any

from dsv32.config import ModelConfig

__version__ = "0.1.0"

_LAZY = {
    "Transformer": "dsv32.model",
    "load_model": "dsv32.registry",
    "save_model": "dsv32.checkpoint",
    "CheckpointError": "dsv32.checkpoint",
    "load_tokenizer": "dsv32.tokenizer",
    "Tokenizer": "dsv32.tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsv32' has no attribute {name!r}")


__all__ = ["ModelConfig", "__version__", *_LAZY]
