"""Evaluation-only retrieval items (RULER-style needles in a haystack) and the check that training never sees them.

Training can only "game" a retrieval measure if the measure's needles look like something it trained on. So the
evaluation needles here share nothing with the training generators of ``dsv32.data.synthetic``:

- **own templates** (``EVAL_TEMPLATES``: a vault combination, lockers of "the <adjective> <noun>", badge numbers),
  where training documents say "The secret code for <First Last> is <5 digits>";
- **own key format** (``EVAL_KEY_PATTERN``: seven digits written ``ddd-dddd``), where training codes are five plain
  digits; the pattern occurs nowhere in the python-docs and cpython corpora (checked when it was chosen);
- **own haystack**: the documents of ``EVAL_SOURCE`` (python-docs, all of them), a source excluded from training:
  ``dsv32 sparsify --text`` drops it, and ``check_training_data`` fails a prepared dataset that holds it.

Tasks (each item is exactly ``context`` tokens; the question comes last and the answer is scored teacher-forced):

- ``passkey``: one needle, "the vault combination is V", asked for at the end;
- ``multikey``: four lockers with different owners and combinations, one asked for (the others are distractors);
- ``distractor``: as ``multikey``, but the other owners are near misses of the asked one (same adjective or same
  noun: "the copper falcon" vs "the copper heron", "the amber falcon");
- ``split``: one number split over two spans far apart ("begins with ddd" ... "ends with dddd"), the answer
  joins them (``ddd-dddd``): both spans must be attended to.

Item i of (task, context) is a pure function of ``RETRIEVAL_SEED``, the task, the context, i and the tokenizer, so a
set of ``--num`` items is fixed in advance and a longer run extends a shorter one. The asked needle's depth
cycles through ``DEPTHS``, so 50 items give 10 per depth.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsv32.data.dataset import load_split_texts, read_manifest, text_sources
from dsv32.data.sources import load_source, load_text_files

#: Seed of every evaluation item (fixed in advance; never a CLI default that someone could tune).
RETRIEVAL_SEED = 20261204
#: Depths (share of the haystack before the asked needle) that items cycle through.
DEPTHS = (0.05, 0.275, 0.5, 0.725, 0.95)
#: The evaluation haystack: a named source that no training run may use.
EVAL_SOURCE = "python-docs"
#: Characters of the evaluation source kept (documents in name order): enough for varied haystacks.
EVAL_MAX_CHARS = 4_000_000
TASKS = ("passkey", "multikey", "distractor", "split")

PASSKEY_NEEDLE = "\nArchive note: the vault combination is {value}. Once more, the vault combination is {value}.\n"
PASSKEY_QUESTION = "\nWhat is the vault combination? The vault combination is"
LOCKER_NEEDLE = "\nThe locker of the {owner} opens with the combination {value}.\n"
LOCKER_QUESTION = ("\nWhich combination opens the locker of the {owner}? The locker of the {owner} opens with the "
                   "combination")
SPLIT_FIRST = "\nThe badge number of the {owner} begins with {a}.\n"
SPLIT_LAST = "\nThe badge number of the {owner} ends with {b}.\n"
SPLIT_QUESTION = ("\nWhat is the full badge number of the {owner}, its beginning and its end joined by a dash? The "
                  "full badge number of the {owner} is")

#: Literal pieces of the templates above: none may occur in a training document (``check_training_texts``).
EVAL_TEMPLATES = ("vault combination", "opens with the combination", "the badge number of the",
                  "full badge number")
#: The answers' format, seven digits as ddd-dddd; no training document may contain it.
EVAL_KEY_PATTERN = re.compile(r"(?<![\w-])\d{3}-\d{4}(?![\w-])")

_ADJ = ("amber copper silver crimson violet golden hollow silent northern quiet rusty velvet marble frosty "
        "scarlet gentle bright ancient narrow humble").split()
_NOUN = ("falcon heron lantern orchard harbour meadow compass beacon quarry willow anchor kettle pillar "
         "glacier canyon thistle parrot otter chapel ferry").split()


@dataclass(frozen=True)
class NeedleItem:
    """One evaluation prompt: ``ids`` = context tokens with the answer at the end (``answer_len`` tokens).

    ``spans``: [start, end) token ranges of the needles the answer needs (``split``: both halves);
    ``distractors``: those of the other needles; ``depth``: where the (first) asked needle sits in the haystack.
    """

    task: str
    ids: list[int]
    answer_len: int
    answer: str
    depth: float
    spans: list[tuple[int, int]]
    distractors: list[tuple[int, int]] = field(default_factory=list)

    @property
    def needle_positions(self) -> list[int]:
        """Token positions of the needles the answer needs."""
        return [p for a, b in self.spans for p in range(a, b)]


# ---------------------------------------------------------------------------------------------- haystack


def eval_texts(text: Sequence[str | Path] | None = None, *, max_chars: int = EVAL_MAX_CHARS
               ) -> tuple[list[str], dict[str, Any]]:
    """The evaluation haystack: every document of ``EVAL_SOURCE`` (in name order, at most ``max_chars``).

    ``text``: raw text roots (one sub-directory per source, e.g. ``dsv32 data prepare``'s ``DIR/raw``); their
    ``EVAL_SOURCE`` sub-directory is used. Default: the named source from the corpus cache (fetched if needed).
    """
    if text:
        dirs = [(n, p) for n, p in text_sources(text) if n == EVAL_SOURCE]
        if not dirs:
            raise FileNotFoundError(f"no {EVAL_SOURCE!r} sub-directory under {[str(t) for t in text]}")
        docs = [d for _, p in dirs for d in load_text_files([p], source=EVAL_SOURCE)]
        where: dict[str, Any] = {"text": [str(p) for _, p in dirs]}
    else:
        docs, info = load_source(EVAL_SOURCE)
        where = {"source": EVAL_SOURCE, "provenance": info.get("package")}
    docs = sorted(docs, key=lambda d: d.name)
    out, used = [], 0
    for d in docs:
        if used >= max_chars:
            break
        out.append(d.text[: max_chars - used])
        used += len(out[-1])
    return out, {**where, "documents": len(out), "chars": used, "excluded_from_training": True}


class Haystack:
    """Seeded stretches of the evaluation text, tokenised on demand (no whole-corpus tokenisation)."""

    def __init__(self, tok: Any, texts: Sequence[str]) -> None:
        self.tok = tok
        self.text = "\n\n".join(texts)
        if len(self.text) < 10_000:
            raise ValueError(f"evaluation text has only {len(self.text)} characters")
        self._nl: dict[int, bool] = {}

    def filler(self, rng: random.Random, n_tokens: int) -> list[int]:
        """``n_tokens`` tokens of the text from a seeded line start."""
        chars = 5 * n_tokens + 64
        while True:
            if chars >= len(self.text):
                raise ValueError(f"evaluation text too short for {n_tokens} filler tokens")
            start = rng.randrange(len(self.text) - chars)
            nl = self.text.find("\n", start, start + 2000)
            start = nl + 1 if nl >= 0 else start
            ids = list(self.tok.encode(self.text[start : start + chars]))
            if len(ids) >= n_tokens:
                return ids[:n_tokens]
            chars *= 2

    def ends_line(self, token: int) -> bool:
        if token not in self._nl:
            self._nl[token] = self.tok.decode([token]).endswith("\n")
        return self._nl[token]

    def snap(self, filler: list[int], at: int, reach: int = 48) -> int:
        """The insertion point nearest to ``at`` that follows a line break (else ``at``): needles start lines."""
        for d in range(reach + 1):
            for p in (at - d, at + d):
                if 0 < p <= len(filler) and self.ends_line(filler[p - 1]):
                    return p
        return at


def _value(rng: random.Random) -> str:
    return f"{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"


def _owners(rng: random.Random, n: int, near_miss: bool) -> list[str]:
    """``n`` distinct owners; the first is the asked one. ``near_miss``: the others share a word with it."""
    adj, noun = rng.choice(_ADJ), rng.choice(_NOUN)
    out = [f"{adj} {noun}"]
    while len(out) < n:
        if near_miss:
            o = f"{adj} {rng.choice(_NOUN)}" if len(out) % 2 else f"{rng.choice(_ADJ)} {noun}"
        else:
            o = f"{rng.choice(_ADJ)} {rng.choice(_NOUN)}"
        if o not in out and (near_miss or not set(o.split()) & set(out[0].split())):
            out.append(o)
    return out


def _needles(task: str, rng: random.Random) -> tuple[list[str], list[int], str, str]:
    """(needle texts, indices of the asked ones, question, answer) of one item."""
    if task == "passkey":
        v = _value(rng)
        return [PASSKEY_NEEDLE.format(value=v)], [0], PASSKEY_QUESTION, f" {v}"
    if task in ("multikey", "distractor"):
        owners = _owners(rng, 4, near_miss=task == "distractor")
        values: list[str] = []
        while len(values) < len(owners):
            v = _value(rng)
            if v not in values:
                values.append(v)
        texts = [LOCKER_NEEDLE.format(owner=o, value=v) for o, v in zip(owners, values)]
        return texts, [0], LOCKER_QUESTION.format(owner=owners[0]), f" {values[0]}"
    if task == "split":
        owner = _owners(rng, 1, near_miss=False)[0]
        a, b = rng.randint(100, 999), rng.randint(1000, 9999)
        texts = [SPLIT_FIRST.format(owner=owner, a=a), SPLIT_LAST.format(owner=owner, b=b)]
        return texts, [0, 1], SPLIT_QUESTION.format(owner=owner), f" {a}-{b}"
    raise ValueError(f"unknown retrieval task {task!r} (one of {', '.join(TASKS)})")


def make_item(tok: Any, hay: Haystack, task: str, context: int, i: int) -> NeedleItem:
    """Item ``i`` of ``task`` at ``context`` tokens (a pure function of the arguments and ``RETRIEVAL_SEED``)."""
    rng = random.Random(f"{RETRIEVAL_SEED}/{task}/{context}/{i}")
    texts, asked, question, answer = _needles(task, rng)
    depth = DEPTHS[i % len(DEPTHS)]
    # depths of every needle: the (first) asked one at `depth`, the others spread at random, at least 4 % away
    depths = [depth]
    while len(depths) < len(texts):
        d = rng.uniform(0.02, 0.98)
        if all(abs(d - x) >= 0.04 for x in depths):
            depths.append(d)
    bos = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []
    n_ids = [list(tok.encode(t)) for t in texts]
    q_ids, a_ids = list(tok.encode(question)), list(tok.encode(answer))
    n_fill = context - len(bos) - sum(map(len, n_ids)) - len(q_ids) - len(a_ids)
    if n_fill < 16 * len(texts):
        raise ValueError(f"context {context} is too short for a {task} item")
    filler = hay.filler(rng, n_fill)
    at = [hay.snap(filler, round(d * n_fill)) for d in depths]
    ids, spans, pos = list(bos), [None] * len(texts), 0
    for j in sorted(range(len(texts)), key=lambda j: (at[j], j)):
        ids += filler[pos : at[j]]
        pos = at[j]
        spans[j] = (len(ids), len(ids) + len(n_ids[j]))
        ids += n_ids[j]
    ids += filler[pos:] + q_ids + a_ids
    assert len(ids) == context, (len(ids), context)
    return NeedleItem(task, ids, len(a_ids), answer.strip(), depth, [spans[j] for j in asked],
                      [spans[j] for j in range(len(texts)) if j not in asked])


def make_items(tok: Any, hay: Haystack, task: str, context: int, num: int) -> list[NeedleItem]:
    return [make_item(tok, hay, task, context, i) for i in range(num)]


# ------------------------------------------------------------------------------------- training-data check


def check_training_texts(docs: Iterable[tuple[str, str]]) -> list[str]:
    """Problems (empty: none) if a training document holds an evaluation template piece or key format.

    ``docs``: (name, text) pairs; a name ``<source>/...`` of ``EVAL_SOURCE`` is a problem by itself.
    """
    problems = []
    for name, text in docs:
        if name.split("/")[0] == EVAL_SOURCE:
            problems.append(f"{name}: a document of the evaluation source {EVAL_SOURCE!r}")
            continue
        low = text.lower()
        for piece in EVAL_TEMPLATES:
            if piece in low:
                problems.append(f"{name}: contains the evaluation template piece {piece!r}")
        m = EVAL_KEY_PATTERN.search(text)
        if m:
            problems.append(f"{name}: contains {m.group()!r}, the evaluation key format ddd-dddd")
    return problems


def _decoded_documents(data_dir: Path, manifest: dict[str, Any], split: str) -> Iterable[tuple[str, str]]:
    """(source/name, text) of every document of ``split`` in the token shards, decoded with the manifest's
    tokenizer: this covers the synthetic documents, which exist only as tokens."""
    from dsv32.tokenizer import load_tokenizer  # lazy: only this check needs a tokenizer

    tok = load_tokenizer(manifest["tokenizer"]["name"])
    bos, eos = manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["eos_id"]
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    rows = [r.split("\t") for r in (data_dir / "documents.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    names = iter(f"{r[0]}/{r[1]}" for r in rows if r[2] == split)
    for sh in manifest["splits"][split]["shards"]:
        arr = np.fromfile(data_dir / sh["file"], dtype=dtype).astype(np.int64)
        ends = np.flatnonzero(arr == eos)
        start = 0
        for e in ends:
            body = arr[start:e]
            body = body[1:] if len(body) and body[0] == bos else body
            yield next(names, "?"), tok.decode(body.tolist())
            start = e + 1


def check_training_data(data_dir: str | Path) -> list[str]:
    """Problems (empty: none) of a prepared dataset (``dsv32 data prepare``) as training data for a model that
    will be measured by ``dsv32 eval retrieval``: the evaluation source among its sources, or an evaluation
    template piece or key format in any train document (real or synthetic, decoded from the shards)."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    problems = [f"{data_dir}: the evaluation source {EVAL_SOURCE!r} is a training source"
                for s in manifest["sources"] if s == EVAL_SOURCE]
    return problems + check_training_texts(_decoded_documents(data_dir, manifest, "train"))


def check_text_roots(roots: Sequence[str | Path], *, exclude_eval_source: bool = True) -> list[str]:
    """The same check for raw text roots as ``dsv32 sparsify --text`` reads them (train split)."""
    texts, names = load_split_texts(roots, "train")
    pairs = [(n, t) for n, t in zip(names, texts) if not (exclude_eval_source and n.split("/")[0] == EVAL_SOURCE)]
    return check_training_texts(pairs)


def main(argv: list[str] | None = None) -> int:
    """``python -m dsv32.evals.needles DATA_DIR...``: run ``check_training_data`` on prepared datasets."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    problems = [p for d in args for p in check_training_data(d)]
    print(json.dumps({"checked": args, "problems": problems[:50], "count": len(problems)}, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["RETRIEVAL_SEED", "DEPTHS", "EVAL_SOURCE", "TASKS", "EVAL_TEMPLATES", "EVAL_KEY_PATTERN", "NeedleItem",
           "Haystack", "eval_texts", "make_item", "make_items", "check_training_texts", "check_training_data",
           "check_text_roots"]
