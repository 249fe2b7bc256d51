"""`prepare`: documents -> token shards + manifest, and the `dsv32 data prepare|fetch|info` command line.

`dsv32 data prepare --out DIR ...` writes

    DIR/raw/<source>/<doc>.txt    cleaned documents (what `dsv32 tokenizer train --corpus DIR` reads)
    DIR/train_000.bin ...         flat little-endian uint16/uint32 token arrays: BOS doc EOS BOS doc EOS ...
    DIR/val_000.bin ...
    DIR/documents.tsv             source, name, split, bytes, tokens of every document
    DIR/manifest.json             tokenizer (+ hash), dtype, seed, split rule, per-source and per-shard counts

The train/val split is `SPLIT_RULE` (per document, by name hash). Optional synthetic long-range documents
(`dsv32.data.synthetic`) are built from the training text and added to the train split only. Same arguments
and inputs give byte-identical files. `dsv32.data.dataset.TokenDataset` reads the result. See docs/data.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from dsv32.data.dataset import MANIFEST_FORMAT, format_info, read_manifest
from dsv32.data.sources import (
    SOURCES,
    SPLIT_RULE,
    DataError,
    Document,
    assign_splits,
    fetch_source,
    load_source,
    load_text_files,
    safe_name,
    sha256_file,
    split_long_text,
)
from dsv32.data.synthetic import FillerSampler, make_synthetic_doc
from dsv32.tokenizer import load_tokenizer

DEFAULT_SHARD_TOKENS = 64 * 2**20
#: Documents longer than this are cut (at blank lines) into parts: keeps encoder batches and the
#: per-document split granular for big local files (of the named corpora, only one cpython file is longer).
DEFAULT_MAX_DOC_CHARS = 256_000
DEFAULT_SYNTHETIC_CHARS = 4000


class TokenizerLike(Protocol):
    """What `prepare` needs from a tokenizer (`dsv32.tokenizer.Tokenizer` provides it)."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# --------------------------------------------------------------------------------------------- tokenising


def _load_tokenizer(spec: str | Path | TokenizerLike | None) -> tuple[TokenizerLike, dict[str, Any]]:
    """The tokenizer object and its manifest entry (name, vocab size, special ids, content hash)."""
    if spec is None or isinstance(spec, str | Path):
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
        digest, hashed = sha256_file(file), "file"
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
        path = out / "raw" / d.source / f"{safe_name(d.name)}.txt"
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


# ---------------------------------------------------------------------------------------------------- CLI


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
