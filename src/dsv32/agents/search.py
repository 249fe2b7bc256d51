"""Offline search for agents: Okapi BM25 over local documents (the search tool of issue 13; the paper's
search agent uses a web-search API, §3.3, which a machine without network replaces with a local corpus).

Documents are (title, text) pairs; long texts are split into passages at paragraph boundaries so a hit
points at the relevant part of a long page. Pure Python, an inverted index built once per corpus.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"[a-z0-9_]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric runs; `_` stays inside a word so identifiers like `os.path_join` survive."""
    return _WORD.findall(text.lower())


def split_passages(text: str, max_chars: int = 1500) -> list[str]:
    """Greedy paragraph packing into passages of at most ~`max_chars` (a longer paragraph is cut hard)."""
    out: list[str] = []
    cur = ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        while len(para) > max_chars:
            if cur:
                out.append(cur)
                cur = ""
            out.append(para[:max_chars])
            para = para[max_chars:]
        if cur and len(cur) + len(para) + 2 > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


@dataclass
class Hit:
    score: float
    title: str
    text: str            # the passage
    doc: int             # index of the source document
    passage: int         # index of the passage in the index


class BM25:
    """Okapi BM25 (k1, b) with the non-negative idf log(1 + (N - df + 0.5) / (df + 0.5)).

    The title is prepended to every passage of its document so title words count."""

    def __init__(self, docs: Sequence[tuple[str, str]], *, k1: float = 1.5, b: float = 0.75,
                 passage_chars: int = 1500):
        self.k1, self.b = k1, b
        self.titles: list[str] = []
        self.passages: list[tuple[int, str]] = []            # (doc index, passage text)
        for i, (title, text) in enumerate(docs):
            self.titles.append(title)
            for p in split_passages(text, passage_chars) or [""]:
                self.passages.append((i, p))
        self.postings: dict[str, list[tuple[int, int]]] = {}  # term -> [(passage, term frequency)]
        self.lengths: list[int] = []
        for j, (i, p) in enumerate(self.passages):
            counts = Counter(tokenize(self.titles[i] + "\n" + p))
            self.lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                self.postings.setdefault(term, []).append((j, tf))
        n = len(self.passages)
        self.avg_len = sum(self.lengths) / max(n, 1)
        self.idf = {t: math.log(1.0 + (n - len(ps) + 0.5) / (len(ps) + 0.5)) for t, ps in self.postings.items()}

    def __len__(self) -> int:
        return len(self.passages)

    def scores(self, query: str) -> dict[int, float]:
        """BM25 score of every passage sharing a term with the query (others score 0)."""
        acc: dict[int, float] = {}
        for term, qtf in Counter(tokenize(query)).items():
            idf = self.idf.get(term)
            if idf is None:
                continue
            for j, tf in self.postings[term]:
                norm = tf + self.k1 * (1 - self.b + self.b * self.lengths[j] / self.avg_len)
                acc[j] = acc.get(j, 0.0) + qtf * idf * tf * (self.k1 + 1) / norm
        return acc

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The `k` best passages, at most one per document, best first (ties: corpus order)."""
        ranked = sorted(self.scores(query).items(), key=lambda kv: (-kv[1], kv[0]))
        hits: list[Hit] = []
        seen: set[int] = set()
        for j, score in ranked:
            doc, text = self.passages[j]
            if doc in seen:
                continue
            seen.add(doc)
            hits.append(Hit(score, self.titles[doc], text, doc, j))
            if len(hits) == k:
                break
        return hits


def snippet(text: str, query: str, width: int = 400) -> str:
    """A `width`-character window of `text` around the densest cluster of query words."""
    if len(text) <= width:
        return text
    terms = set(tokenize(query))
    starts = [m.start() for m in _WORD.finditer(text.lower()) if m.group() in terms]
    if not starts:
        return text[:width] + " ..."
    best = max(starts, key=lambda s: sum(1 for t in starts if s <= t < s + width))
    lo = max(0, min(best - width // 4, len(text) - width))
    return ("... " if lo else "") + text[lo:lo + width] + (" ..." if lo + width < len(text) else "")


def corpus_from_source(name: str, **kw) -> list[tuple[str, str]]:
    """(title, text) pairs of a corpus the data layer builds (e.g. "python-docs"); fetched on first use."""
    from dsv32.data import load_source  # lazy: the data layer pulls numpy/tokenizer code the tools do not need

    docs, _ = load_source(name, **kw)
    return [(d.name, d.text) for d in docs]
