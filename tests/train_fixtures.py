"""Shared test data for the trainer tests: a byte tokenizer and a small prepared word corpus."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from dsv32.data import prepare


class ByteTok:
    """Bytes -> ids 2..257 with BOS 0 / EOS 1, inside the tiny preset's 512-entry vocabulary."""

    name, vocab_size, bos_id, eos_id = "bytes", 512, 0, 1

    def encode(self, text: str) -> list[int]:
        return [2 + b for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode(errors="replace")


class WideByteTok(ByteTok):
    """A byte tokenizer with a 1000-id vocabulary (odd bytes map above 512): data the tiny preset's 512-entry
    embedding cannot hold, as from a user's own tokenizer."""

    name, vocab_size = "bytes-wide", 1000

    def encode(self, text: str) -> list[int]:
        return [2 + b + (500 if b % 2 else 0) for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes((i - 502 if i >= 502 else i - 2) for i in ids if i >= 2).decode(errors="replace")


def prepare_word_corpus(root: Path, words: str, *, n_docs: int, seed: int, val_fraction: float,
                        tokenizer: Any = None) -> Path:
    """``n_docs`` documents of 300 random words, prepared with ``dsv32.data.prepare`` -> the data directory."""
    rng = random.Random(seed)
    vocab = words.split()
    (root / "text").mkdir()
    for k in range(n_docs):
        (root / "text" / f"doc{k}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(300)) + "\n")
    prepare(root / "data", texts=[root / "text"], tokenizer=tokenizer or ByteTok(), val_fraction=val_fraction,
            progress=False, log=lambda m: None)
    return root / "data"
