"""Raw text straight to a model, without prepared shards: what `dsv32 eval` and `dsv32 sparsify --text` read.

`load_split_texts` applies the project's per-document split rule (`assign_splits`) to text roots, so the
evaluations' held-out documents are exactly the ones sparsify never trains on; `tokenize_docs` and
`TextWindows` turn the chosen documents into a token stream and seeded training windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dsv32.data.documents import assign_splits
from dsv32.data.sources import load_text_files

if TYPE_CHECKING:
    import torch  # at run time only inside `TextWindows.batch` (see `TokenDataset.batch`)

#: Val share of the per-document rule for text roots (`--text`): evaluations read "val", sparsify "train".
TEXT_VAL_FRACTION = 0.02


def text_sources(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
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
    texts, names = [], []
    for src, path in text_sources(paths):
        if sources and src not in sources:
            continue
        docs = load_text_files([path], source=src)
        used = 0
        for d, s in zip(docs, assign_splits(docs, TEXT_VAL_FRACTION)):
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


def tokenize_docs(tok: Any, texts: list[str]) -> np.ndarray:
    """Documents -> one int32 stream ``BOS doc EOS ...`` (ids absent from the tokenizer are skipped)."""
    out: list[int] = []
    bos, eos = getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)
    for t in texts:
        out += ([bos] if bos is not None else []) + tok.encode(t) + ([eos] if eos is not None else [])
    return np.asarray(out, dtype=np.int32)


class TextWindows:
    """Random token windows from documents (BOS doc EOS, back to back): ``batch(step)`` [B, S+1] is a pure
    function of (seed, step), so resuming needs no loader state."""

    def __init__(self, ids: np.ndarray, *, seed: int, batch_size: int, seq_len: int) -> None:
        if len(ids) <= seq_len + 1:
            raise ValueError(f"only {len(ids)} tokens of training text for windows of {seq_len + 1}")
        self.ids, self.seed, self.batch_size, self.seq_len = ids, seed, batch_size, seq_len

    def batch(self, step: int) -> torch.Tensor:
        import torch  # lazy: importing torch takes seconds, and `dsv32 data` never needs it

        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.ids) - self.seq_len - 1, self.batch_size)
        return torch.from_numpy(np.stack([self.ids[s : s + self.seq_len + 1] for s in starts]).astype(np.int64))
