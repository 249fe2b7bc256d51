"""`dsv32 eval retrieval` (issue 15, item 2): evaluation-only needles, fixed items, scoring, needle recall, and the
check that training data never holds the evaluation's templates, key format or haystack source."""

from __future__ import annotations

import argparse
import json
import random
import re

import numpy as np
import pytest
import torch

from dsv32.data import prepare
from dsv32.data.sources import DataError
from dsv32.data.synthetic import FillerSampler, make_retrieval_doc, make_synthetic_doc
from dsv32.evals import needles as nd
from dsv32.evals import retrieval
from dsv32.llama import LlamaConfig, LlamaModel
from dsv32.train import sparsify


class CharTok:
    """Byte-level stand-in tokenizer: id = byte + 2; BOS 0, EOS 1."""

    bos_id, eos_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode(errors="replace")


WORDS = "alpha beta gamma delta river stone light north table window garden paper".split()


def prose(seed: int, lines: int = 400) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, 8)) for _ in range(lines))


def tiny_model() -> LlamaModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, rope_theta=1000.0, index_n_heads=2,
                      index_head_dim=16, index_rope_head_dim=8, index_topk=32)
    return LlamaModel(cfg).eval()


@pytest.fixture()
def hay() -> nd.Haystack:
    return nd.Haystack(CharTok(), [prose(i) for i in range(3)])


@pytest.mark.parametrize("task", nd.TASKS)
def test_items_are_fixed_exact_length_and_hold_their_needles(hay, task) -> None:
    tok = CharTok()
    items = nd.make_items(tok, hay, task, 700, 7)
    assert [it.ids for it in items] == [it.ids for it in nd.make_items(tok, hay, task, 700, 7)]
    assert nd.make_item(tok, hay, task, 700, 3).ids == items[3].ids  # item i does not depend on --num
    assert [it.depth for it in items] == [nd.DEPTHS[i % len(nd.DEPTHS)] for i in range(7)]
    assert items[0].ids != nd.make_item(tok, hay, task, 800, 0).ids[:700]  # another context, other items
    for it in items:
        assert len(it.ids) == 700 and it.ids[0] == tok.bos_id
        assert nd.EVAL_KEY_PATTERN.fullmatch(it.answer)
        assert tok.decode(it.ids[-it.answer_len :]) == " " + it.answer
        needle_text = "".join(tok.decode(it.ids[a:b]) for a, b in it.spans)
        if task == "split":
            a, b = it.answer.split("-")
            assert len(it.spans) == 2 and f"begins with {a}." in needle_text and f"ends with {b}." in needle_text
        else:
            assert len(it.spans) == 1 and it.answer in needle_text
        assert len(it.distractors) == {"passkey": 0, "multikey": 3, "distractor": 3, "split": 0}[task]
        for a, b in it.distractors:  # a distractor holds another value of the same format
            other = nd.EVAL_KEY_PATTERN.search(tok.decode(it.ids[a:b]))
            assert other and other.group() != it.answer
        prompt = tok.decode(it.ids[: -it.answer_len])
        assert prompt.count(it.answer) == (0 if task == "split" else 1 + (task == "passkey"))


def test_distractor_owners_are_near_misses(hay) -> None:
    tok = CharTok()
    for i in range(10):
        it = nd.make_item(tok, hay, "distractor", 700, i)
        asked = re.search(r"locker of the (\w+ \w+)\? ", tok.decode(it.ids)).group(1).split()
        for a, b in it.distractors:
            owner = re.search(r"locker of the (\w+ \w+) opens", tok.decode(it.ids[a:b])).group(1).split()
            assert owner != asked and (owner[0] == asked[0] or owner[1] == asked[1])
        plain = nd.make_item(tok, hay, "multikey", 700, i)
        asked = re.search(r"locker of the (\w+ \w+)\? ", tok.decode(plain.ids)).group(1).split()
        for a, b in plain.distractors:
            owner = re.search(r"locker of the (\w+ \w+) opens", tok.decode(plain.ids[a:b])).group(1).split()
            assert not set(owner) & set(asked)


def test_training_generators_never_make_evaluation_needles() -> None:
    """Every synthetic training document (the mixed kind and the --retrieval-frac kind) passes the check, and the
    check does fire on a document holding an evaluation needle (it can fail)."""
    sampler = FillerSampler([prose(i, 200) for i in range(4)])
    rng = random.Random(0)
    docs = [(f"synthetic/{i}", make_synthetic_doc(rng, sampler, 3000).text) for i in range(150)]
    docs += [(f"retrieval/{i}", make_retrieval_doc(rng, sampler, 3000).text) for i in range(150)]
    assert nd.check_training_texts(docs) == []
    hay = nd.Haystack(CharTok(), [prose(9)])
    for task in nd.TASKS:
        it = nd.make_item(CharTok(), hay, task, 700, 0)
        bad = nd.check_training_texts([("x/doc", CharTok().decode(it.ids))])
        assert any("template piece" in p for p in bad) and any("key format" in p for p in bad), (task, bad)
    assert nd.check_training_texts([(f"{nd.EVAL_SOURCE}/intro", "nothing special")])


def test_prepared_manifest_is_checked_against_templates_keys_and_source(tmp_path) -> None:
    """`dsv32 data prepare` output (real + synthetic train documents, decoded from the shards) passes; a document
    with an evaluation needle fails, and so does a dataset holding the evaluation source."""
    src = tmp_path / "text"
    src.mkdir()
    for i in range(6):
        (src / f"doc{i}.txt").write_text(prose(i, 60))
    kw = {"tokenizer": "dsv32-small-8k", "progress": False, "log": lambda s: None, "val_fraction": 0.2}
    prepare(tmp_path / "ok", texts=[src], synthetic_frac=0.3, synthetic_chars=1500, **kw)
    assert nd.check_training_data(tmp_path / "ok") == []
    args = argparse.Namespace(data=tmp_path / "ok", seed=0, batch_size=1, seq_len=32)
    assert sparsify._batches(args, None)[1]["holds_eval_source"] is False  # what dsv32 sparsify --data records
    (src / "doc7.txt").write_text(prose(7, 30) + "\nArchive note: the vault combination is 123-4567.\n")
    prepare(tmp_path / "bad", texts=[src], **kw)
    problems = nd.check_training_data(tmp_path / "bad")
    rows = (tmp_path / "bad" / "documents.tsv").read_text()
    if "doc7\ttrain" in rows:
        assert any("text/doc7" in p and "vault combination" in p for p in problems), problems
    else:  # the split rule put it in val: training never sees it, so nothing to report
        assert problems == []
    try:
        prepare(tmp_path / "src", sources=[nd.EVAL_SOURCE], max_bytes=20_000, **kw)
    except DataError as e:
        pytest.skip(f"{nd.EVAL_SOURCE} not available offline: {e}")
    assert any("evaluation source" in p for p in nd.check_training_data(tmp_path / "src"))
    args.data = tmp_path / "src"
    assert sparsify._batches(args, None)[1]["holds_eval_source"] is True


def test_score_items_and_needle_recall(hay) -> None:
    m, tok = tiny_model(), CharTok()
    items = nd.make_items(tok, hay, "split", 600, 3)
    full = retrieval.score_items(m, items, mode="topk", k=700, needle_recall=True, progress=False)
    assert full["items"] == 3 and set(full["accuracy_by_depth"]) == {"0.05", "0.275", "0.5"}
    assert full["needle_recall_by_layer"] == [1.0, 1.0]  # k covers every key: the whole needle is attended to
    assert all(0 < x < 1 for x in full["needle_head_mass_by_layer"])
    dense = retrieval.score_items(m, items, mode="dense", k=None, needle_recall=True, progress=False)
    assert dense["needle_recall_by_layer"] == [None, None]
    assert [r["correct"] for r in dense["per_item"]] == [r["correct"] for r in full["per_item"]]
    win = retrieval.score_items(m, items, mode="window", k=32, needle_recall=True, progress=False)
    assert win["items_out_of_window"] == 3 and all(x < 0.5 for x in win["needle_recall_by_layer"])


def test_cli_json(tmp_path, monkeypatch) -> None:
    root = tmp_path / "raw" / nd.EVAL_SOURCE
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"p{i}.txt").write_text(prose(i))
    monkeypatch.setattr(retrieval, "prepare_model", lambda args, mode, k: (tiny_model(), CharTok()))
    out = tmp_path / "r.json"
    assert retrieval.cli_main(["--model", "tiny-test", "--context", "600", "700", "--topk", "32", "48", "--num", "2",
                               "--task", "passkey", "multikey", "--text", str(tmp_path / "raw"), "--json",
                               str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["eval"] == "retrieval" and set(r) == {"eval", "settings", "results"}
    s, res = r["settings"], r["results"]
    assert s["contexts"] == [600, 700] and s["k_per_context"] == [32, 48] and s["items_seed"] == nd.RETRIEVAL_SEED
    assert s["eval_source"] == nd.EVAL_SOURCE and s["haystack"]["documents"] == 3
    assert set(res["summary"]) == {"passkey", "multikey"} and set(res["tasks"]["multikey"]) == {"600", "700"}
    assert res["tasks"]["passkey"]["700"]["k"] == 48 and res["tasks"]["passkey"]["700"]["items"] == 2
    with pytest.raises(SystemExit):
        retrieval.cli_main(["--model", "x", "--context", "600", "700", "--topk", "1", "2", "3"])
