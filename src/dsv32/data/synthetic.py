"""Synthetic long-range documents: key-value recall and copying, embedded in stretches of real text.

Training on them puts retrieval-shaped attention into the data (a fact or a span far back that the answer
needs), which is what a sparse-attention indexer must learn to keep (V3.2 paper §2.1). Every generator is a
pure function of its `random.Random`, so `prepare` and `dsv32 sparsify` build the same documents from the same
seed.

These are *training* generators only. The retrieval evaluations build their needles elsewhere
(`dsv32.evals.needles`), with other templates and another key format (there: ddd-dddd; here: five plain
digits, `TRAIN_KEY_DIGITS`), so that a score cannot come from having trained on the test's own phrasing; a test
checks that no document made here matches the evaluation templates or key format.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dsv32.data.sources import DataError

_FIRST = (
    "Ada Alma Amos Anya Aris Basil Bea Boris Cara Cyrus Dara Dmitri Edda Elio Enzo Faye Felix Gemma Greta "
    "Hana Hugo Ida Ines Ivo Jasper Juno Kai Kira Lars Leda Lena Milo Mina Nadia Nico Nils Odile Omar Oona "
    "Pavel Pia Quinn Rafa Rhea Rosa Sami Selma Soren Tala Theo Uma Vera Wren Yara Yusuf Zane Zora"
).split()
_LAST = (
    "Abbott Bauer Castell Dorn Ekberg Falk Garza Holm Ibarra Jansen Kato Lund Moreau Novak Okafor Park "
    "Quiroga Rossi Sato Tanaka Ulrich Varga Weber Xu Yilmaz Zeller Brandt Costa Duval Engel Fischer Greco"
).split()

#: Digits of a training key (codes are 10000..99999).
TRAIN_KEY_DIGITS = 5
KV_FACT = "The secret code for {name} is {code}."
KV_QUESTION = "\n\nQuestion: What is the secret code for {name}?\nAnswer: The secret code for {name} is "
COPY_OPEN, COPY_CLOSE = "<<<\n", "\n>>>"
COPY_QUESTION = "\n\nRepeat the passage between <<< and >>> exactly:\n"


@dataclass(frozen=True)
class SyntheticDoc:
    """A long-range task: the model should continue `prompt` with `answer`; `text` is the training form."""

    kind: str
    prompt: str
    answer: str
    suffix: str = "\n"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.prompt + self.answer + self.suffix


def text_window(rng: random.Random, text: str, n_chars: int) -> str:
    """A random stretch of about `n_chars` of `text`, starting and ending at line (else word) boundaries."""
    if n_chars <= 0:
        return ""
    if len(text) <= n_chars:
        return text.strip("\n")
    start = rng.randrange(len(text) - n_chars + 1)
    if start > 0:
        nl = text.find("\n", start, start + n_chars // 4)
        sp = text.find(" ", start, start + n_chars // 4)
        start = nl + 1 if nl >= 0 else (sp + 1 if sp >= 0 else start)
    chunk = text[start : start + n_chars]
    if start + n_chars < len(text):
        nl = chunk.rfind("\n")
        sp = chunk.rfind(" ")
        end = nl if nl >= len(chunk) // 2 else (sp if sp >= len(chunk) // 2 else len(chunk))
        chunk = chunk[:end]
    return chunk.strip("\n")


def random_names(rng: random.Random, n: int) -> list[str]:
    """`n` distinct 'First Last' names."""
    if n > len(_FIRST) * len(_LAST):
        raise ValueError(f"at most {len(_FIRST) * len(_LAST)} distinct names")
    picks = rng.sample(range(len(_FIRST) * len(_LAST)), n)
    return [f"{_FIRST[i % len(_FIRST)]} {_LAST[i // len(_FIRST)]}" for i in picks]


def make_kv_recall_doc(rng: random.Random, filler_text: str, n_keys: int, length_chars: int) -> SyntheticDoc:
    """Key-value recall: `n_keys` lines 'The secret code for <name> is <5 digits>.' at random depths of
    about `length_chars` of real text, then a question about one of them; `answer` is its code."""
    if n_keys < 1:
        raise ValueError("n_keys must be >= 1")
    names = random_names(rng, n_keys)
    codes = rng.sample(range(10_000, 100_000), n_keys)
    facts = [KV_FACT.format(name=n, code=c) for n, c in zip(names, codes)]
    target = rng.randrange(n_keys)
    question = KV_QUESTION.format(name=names[target])
    budget = length_chars - sum(len(f) + 1 for f in facts) - len(question)
    lines, depths = _insert_lines(rng, text_window(rng, filler_text, budget).split("\n"), facts)
    prompt = "\n".join(lines) + question
    meta = {"n_keys": n_keys, "name": names[target], "depth": round(depths[target], 4)}
    return SyntheticDoc("kv_recall", prompt, str(codes[target]), suffix=".\n", meta=meta)


def _insert_lines(rng: random.Random, lines: list[str], facts: list[str]) -> tuple[list[str], list[float]]:
    """`facts` inserted as lines at random places of `lines` (in order) -> (lines, each fact's depth)."""
    slots = sorted(rng.randint(0, len(lines)) for _ in facts)  # insert before line `slot`
    for k, (slot, fact) in enumerate(zip(slots, facts)):
        lines.insert(slot + k, fact)
    return lines, [(slot + k) / max(1, len(lines) - 1) for k, slot in enumerate(slots)]


def make_multi_question_doc(rng: random.Random, filler_text: str, n_keys: int, n_questions: int,
                            length_chars: int) -> SyntheticDoc:
    """Key-value recall with several questions: `n_keys` facts over about `length_chars` of real text, then
    `n_questions` (<= `n_keys`) question/answer pairs about distinct keys. Each answer is a retrieval event, so
    a document carries several per question-free stretch of text (`dsv32 sparsify --retrieval-frac`)."""
    if not 1 <= n_questions <= n_keys:
        raise ValueError(f"need 1 <= n_questions ({n_questions}) <= n_keys ({n_keys})")
    names = random_names(rng, n_keys)
    codes = rng.sample(range(10_000, 100_000), n_keys)
    facts = [KV_FACT.format(name=n, code=c) for n, c in zip(names, codes)]
    asked = rng.sample(range(n_keys), n_questions)
    qa = [KV_QUESTION.format(name=names[j]) + f"{codes[j]}." for j in asked]
    budget = length_chars - sum(len(f) + 1 for f in facts) - sum(map(len, qa))
    lines, depths = _insert_lines(rng, text_window(rng, filler_text, budget).split("\n"), facts)
    prompt = "\n".join(lines) + "".join(qa[:-1]) + KV_QUESTION.format(name=names[asked[-1]])
    meta = {"n_keys": n_keys, "questions": n_questions, "depths": [round(depths[j], 4) for j in asked]}
    return SyntheticDoc("kv_multi", prompt, str(codes[asked[-1]]), suffix=".\n", meta=meta)


def make_retrieval_doc(
    rng: random.Random, sample_filler: Callable[[random.Random, int], str], length_chars: int
) -> SyntheticDoc:
    """One retrieval-bearing training document (`dsv32 sparsify --retrieval-frac`): 2..8 facts over 1/2..1x
    `length_chars` of real text and 1..4 questions about them, so the asked facts lie far before the answers."""
    n = rng.randint(max(400, length_chars // 2), max(400, length_chars))
    n_keys = rng.randint(2, 8)
    return make_multi_question_doc(rng, sample_filler(rng, 2 * n), n_keys, rng.randint(1, min(4, n_keys)), n)


def make_copy_doc(rng: random.Random, filler_text: str, span_chars: int, length_chars: int) -> SyntheticDoc:
    """Copying: a real-text span marked with <<< >>> at a random depth of about `length_chars` of real
    text, then a request to repeat it; `answer` is the span."""
    span = text_window(rng, filler_text, span_chars).strip() or "(empty)"
    budget = length_chars - 2 * len(span) - len(COPY_OPEN) - len(COPY_CLOSE) - len(COPY_QUESTION) - 4
    lines = text_window(rng, filler_text, budget).split("\n")
    at = rng.randint(0, len(lines))
    before, after = "\n".join(lines[:at]), "\n".join(lines[at:])
    prompt = f"{before}\n\n{COPY_OPEN}{span}{COPY_CLOSE}\n\n{after}".strip("\n") + COPY_QUESTION
    meta = {"span_chars": len(span), "depth": round(at / max(1, len(lines)), 4)}
    return SyntheticDoc("copy", prompt, span, suffix="\n", meta=meta)


class FillerSampler:
    """Random stretches of the training text, each document weighted by its length."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = [t for t in texts if t]
        if not self.texts:
            raise DataError("synthetic documents need some training text")
        self.cum = np.cumsum([len(t) for t in self.texts]).tolist()

    def __call__(self, rng: random.Random, n_chars: int) -> str:
        i = bisect.bisect_right(self.cum, rng.randrange(self.cum[-1]))
        out = self.texts[i]
        while len(out) < n_chars:  # short documents: continue with the next ones
            i = (i + 1) % len(self.texts)
            out += "\n\n" + self.texts[i]
        return out


def make_synthetic_doc(
    rng: random.Random, sample_filler: Callable[[random.Random, int], str], length_chars: int
) -> SyntheticDoc:
    """One training document: key-value recall or copying (even odds), of 1/4..1x `length_chars`."""
    n = rng.randint(max(200, length_chars // 4), max(200, length_chars))
    filler = sample_filler(rng, 2 * n)
    if rng.random() < 0.5:
        return make_kv_recall_doc(rng, filler, rng.randint(1, 6), n)
    return make_copy_doc(rng, filler, rng.randint(40, max(40, min(600, n // 6))), n)
