"""The loaders: token batches from a prepared directory (`TokenDataset`), or straight from raw text.

`TokenDataset` reads what `dsv32.data.prepare` writes (see its module docstring and docs/data.md); a batch is
a pure function of (seed, step, rank, world size, batch size, sequence length), which makes resuming and data
parallelism exact with no loader state to checkpoint.

Raw text, without prepared shards, is what `dsv32 eval` and `dsv32 sparsify --text` read:
`load_split_texts` applies the project's per-document split rule (`assign_splits`) to text roots, so the
evaluations' held-out documents are exactly the ones sparsify never trains on; `tokenize_docs` and
`TextWindows` turn the chosen documents into a token stream and seeded training windows.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dsv32.data.sources import DataError, assign_splits, load_text_files

if TYPE_CHECKING:
    import torch  # at run time only inside the methods that build tensors (see `TokenDataset.batch`)

#: Val share of the per-document rule for text roots (`--text`): evaluations read "val", sparsify "train".
TEXT_VAL_FRACTION = 0.02

MANIFEST_FORMAT = "dsv32-tokens/1"


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
        import torch  # lazy: importing torch takes seconds, and `dsv32 data prepare|info` never needs it

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
        import torch  # lazy, as in `batch`

        n_windows = (self.num_tokens - 1) // seq_len if self.num_tokens > seq_len else 0
        mine = range(rank, n_windows, world_size)
        for k, i in enumerate(range(0, len(mine), batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            rows = [self.read(w * seq_len, seq_len + 1) for w in mine[i : i + batch_size]]
            yield torch.from_numpy(np.stack(rows))


# ----------------------------------------------------------------------------------------------- raw text


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
        import torch  # lazy, as in `TokenDataset.batch`

        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.ids) - self.seq_len - 1, self.batch_size)
        return torch.from_numpy(np.stack([self.ids[s : s + self.seq_len + 1] for s in starts]).astype(np.int64))


# ------------------------------------------------------------------------------------------------ summary


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
