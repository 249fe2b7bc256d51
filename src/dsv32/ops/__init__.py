"""DSA hot paths behind one interface (docs/design.md, "DSA ops").

``indexer_topk``, ``sparse_mla``, ``sparse_gqa`` and ``dense_mla`` dispatch to the fastest implementation
available for the tensors' device: Triton kernels on CUDA (``triton.py``), the chunked torch path on CPU
(``cpu.py``), and otherwise the reference (``reference.py``), which is also the oracle in the tests.
``set_backend("reference")`` forces the reference everywhere (tests, debugging); ``override(name, fn)``
routes one op through another function for the length of a ``with`` block (a forced DSA selection such as a
sliding window, or sparse attention as masked SDPA): the one sanctioned way to swap an op, so nothing outside
this package assigns ``ops.<name> = ...``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

from dsv32.ops import reference

_FORCED: str | None = None
_CACHE: dict[str, ModuleType | None] = {}
OPS = ("indexer_topk", "sparse_mla", "sparse_gqa", "dense_mla")
_OVERRIDES: dict[str, Callable[..., object]] = {}


def set_backend(name: str | None) -> None:
    """Force a backend by name ("reference", "cpu", "triton"), or None for automatic choice."""
    global _FORCED
    if name is not None and name not in ("reference", "cpu", "cpu_gqa", "triton"):
        raise ValueError(f"unknown ops backend {name!r}")
    _FORCED = name


@contextmanager
def override(name: str, fn: Callable[..., object]) -> Iterator[None]:
    """Inside the block every call of ``ops.<name>`` goes to ``fn`` (same signature and return value as the op).

    Overrides nest (the inner one wins; leaving it restores the outer one) and are undone on exit, exceptions
    included. They are process-global, not per thread: the models call ``ops.<name>`` from whichever thread
    runs the forward, so a serving process must not enter one while other requests run.
    ``backend_for(t, name)`` ignores overrides: it names the real implementation (e.g. to get an lse that an
    override does not compute).
    """
    if name not in OPS:
        raise ValueError(f"ops.override: unknown op {name!r} (one of {', '.join(OPS)})")
    saved = _OVERRIDES.get(name)
    _OVERRIDES[name] = fn
    try:
        yield
    finally:
        if saved is None:
            del _OVERRIDES[name]
        else:
            _OVERRIDES[name] = saved


def _load(name: str) -> ModuleType | None:
    """A backend module by name, or None where it cannot load (deliberately lazy: the Triton backend needs the
    optional ``triton`` package and a GPU, and the reference alone must import on any machine)."""
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
    fn = _OVERRIDES.get("indexer_topk") or backend_for(q, "indexer_topk").indexer_topk
    return fn(q, w, k, k_scale=k_scale, q_pos=q_pos, topk=topk, ordered=ordered)


def sparse_mla(q, kv, idx, *, v_dim, scale):
    fn = _OVERRIDES.get("sparse_mla") or backend_for(q, "sparse_mla").sparse_mla
    return fn(q, kv, idx, v_dim=v_dim, scale=scale)


def sparse_gqa(q, k, v, idx, *, scale):
    fn = _OVERRIDES.get("sparse_gqa") or backend_for(q, "sparse_gqa").sparse_gqa
    return fn(q, k, v, idx, scale=scale)


def dense_mla(q, kv, q_pos, *, v_dim, scale):
    fn = _OVERRIDES.get("dense_mla") or backend_for(q, "dense_mla").dense_mla
    return fn(q, kv, q_pos, v_dim=v_dim, scale=scale)


__all__ = ["indexer_topk", "sparse_mla", "sparse_gqa", "dense_mla", "set_backend", "override", "backend_for",
           "reference"]
