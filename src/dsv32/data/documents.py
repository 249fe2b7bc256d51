"""The unit every part of the data layer shares: a cleaned `Document`, and the per-document train/val rule.

The split is a hash of each document's name alone, so adding a source never moves another source's documents,
and evaluations (`load_split_texts`) and training (`prepare`) agree on what is held out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SPLIT_RULE = (
    "val if int(sha256('<source>/<name>')[:16], 16) / 2**64 < val_fraction; a source with >= 2 documents "
    "and none selected puts its lowest-hash document in val; synthetic documents are train only"
)


class DataError(RuntimeError):
    """A corpus could not be fetched or prepared; the message says what to do."""


@dataclass(frozen=True)
class Document:
    """One cleaned text; `name` is unique within `source` and decides the split."""

    source: str
    name: str
    text: str


# --------------------------------------------------------------------------------------------- cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Normalise newlines, drop control characters and trailing spaces, keep at most two blank lines."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")
    return text + "\n" if text.strip() else ""


def split_long_text(text: str, max_chars: int) -> list[str]:
    """Cut `text` into parts of at most `max_chars`, preferring blank lines, then newlines, then spaces."""
    parts: list[str] = []
    while len(text) > max_chars:
        cut = -1
        for sep in ("\n\n", "\n", " "):
            cut = text.rfind(sep, max_chars // 2, max_chars)
            if cut > 0:
                cut += len(sep)
                break
        if cut <= 0:
            cut = max_chars
        parts.append(text[:cut])
        text = text[cut:]
    parts.append(text)
    return [p for p in (clean_text(p) for p in parts) if p]


def safe_name(name: str) -> str:
    """`name` as a file-name stem: runs of characters outside [A-Za-z0-9._+-] become '_'."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "doc"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- splitting


def _name_hash(source: str, name: str, *, salt: str = "") -> int:
    return int(hashlib.sha256(f"{salt}{source}/{name}".encode()).hexdigest()[:16], 16)


def split_of(source: str, name: str, val_fraction: float) -> str:
    """'val' or 'train' from a hash of the document's name alone (before the one-per-source rule)."""
    return "val" if _name_hash(source, name) / 2**64 < val_fraction else "train"


def assign_splits(docs: Sequence[Document], val_fraction: float) -> list[str]:
    """Split of every document by `SPLIT_RULE` (per-source; independent of the other sources)."""
    splits = [split_of(d.source, d.name, val_fraction) for d in docs]
    if val_fraction <= 0:
        return splits
    by_source: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_source.setdefault(d.source, []).append(i)
    for idx in by_source.values():
        if len(idx) >= 2 and all(splits[i] == "train" for i in idx):
            splits[min(idx, key=lambda i: _name_hash(docs[i].source, docs[i].name))] = "val"
    return splits


def cap_documents(docs: Sequence[Document], max_bytes: int | None) -> list[Document]:
    """A deterministic subset of at most `max_bytes`: documents in name-hash order, greedily, original order kept."""
    if max_bytes is None:
        return list(docs)
    # A salted hash, so that the kept subset is independent of the (unsalted) split hash.
    order = sorted(range(len(docs)), key=lambda i: _name_hash(docs[i].source, docs[i].name, salt="cap:"))
    keep, total = set(), 0
    for i in order:
        size = len(docs[i].text.encode("utf-8"))
        if total + size <= max_bytes:
            keep.add(i)
            total += size
    return [d for i, d in enumerate(docs) if i in keep]
