"""DSA hot paths behind one interface (design.md "DSA ops").

``indexer_topk``, ``sparse_mla``, ``sparse_gqa`` and ``dense_mla`` dispatch to the fastest implementation
available for the tensors' device: Triton kernels on CUDA (``triton.py``), the chunked torch path on CPU
(``cpu.py``), and otherwise the reference (``reference.py``), which is also the oracle in the tests.
``set_backend("reference")`` forces the reference everywhere (tests, debugging).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from dsv32.ops import reference

_FORCED: str | None = None
_CACHE: dict[str, ModuleType | None] = {}


def set_backend(name: str | None) -> None:
    """Force a backend by name ("reference", "cpu", "triton"), or None for automatic choice."""
    global _FORCED
    if name is not None and name not in ("reference", "cpu", "cpu_gqa", "triton"):
        raise ValueError(f"unknown ops backend {name!r}")
    _FORCED = name


def _load(name: str) -> ModuleType | None:
    if name not in _CACHE:
        try:
            _CACHE[name] = importlib.import_module(f"dsv32.ops.{name}")
        except ImportError:
            _CACHE[name] = None
    return _CACHE[name]


def backend_for(t: torch.Tensor, op: str) -> ModuleType:
    """The module that implements ``op`` for tensors like ``t``."""
    order = [_FORCED] if _FORCED else (["triton", "cpu", "cpu_gqa"] if t.is_cuda else ["cpu", "cpu_gqa"])
    for name in order:
        if name == "reference":
            return reference
        mod = _load(name)
        if mod is not None and hasattr(mod, op) and getattr(mod, "supports", lambda *_: True)(t, op):
            return mod
    return reference


def indexer_topk(q, w, k, *, k_scale=None, q_pos, topk, ordered=True):
    """``ordered=False``: the same selected set in unspecified order (for masked attention)."""
    return backend_for(q, "indexer_topk").indexer_topk(
        q, w, k, k_scale=k_scale, q_pos=q_pos, topk=topk, ordered=ordered
    )


def sparse_mla(q, kv, idx, *, v_dim, scale):
    return backend_for(q, "sparse_mla").sparse_mla(q, kv, idx, v_dim=v_dim, scale=scale)


def sparse_gqa(q, k, v, idx, *, scale):
    return backend_for(q, "sparse_gqa").sparse_gqa(q, k, v, idx, scale=scale)


def dense_mla(q, kv, q_pos, *, v_dim, scale):
    return backend_for(q, "dense_mla").dense_mla(q, kv, q_pos, v_dim=v_dim, scale=scale)


__all__ = ["indexer_topk", "sparse_mla", "sparse_gqa", "dense_mla", "set_backend", "backend_for", "reference"]
