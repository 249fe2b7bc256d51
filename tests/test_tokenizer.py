"""Tokenizer: the bundled V3.2 tokenizer's real ids, round trips, load_tokenizer resolution, small BPE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from dsv32 import tokenizer as tokenizer_module
from dsv32.tokenizer import SMALL_SPECIAL_TOKENS, Tokenizer, cli_main, load_tokenizer, train_bpe

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\n\nclass X:\n\tpass  # tab-indented\n",
    "人工智能正在改变世界。日本語のテキストもあります。한국어 문장도 있습니다.",
    "1234567890 3.14159 2025-12-01 -42 1e-9 007",
    "emoji: 😀👍🏽 🇯🇵 ❤️ — “quotes” and ‘apostrophes’…",
    "  leading and trailing spaces  \n\n\n  ",
    "mixed\r\nline\rendings\n",
]


def _sample_corpus() -> str:
    # Our own varied text: made-up words from syllables, code, CJK, numbers.
    syl = ["ka", "lo", "mi", "ten", "ra", "su", "vel", "or", "ith", "pa", "don", "que", "str", "ex", "ing"]
    words = [syl[i % 15] + syl[(i * 7) % 15] + syl[(i * 11) % 13] for i in range(400)]
    lines = [" ".join(words[j : j + 12]) for j in range(0, 400, 12)]
    for i in range(60):
        lines.append(f"Line {i}: the model reads {i * 37} tokens and writes {i % 7} answers.")
        lines.append(f"    for j in range({i}):\n        total += values[j] * {i}")
        lines.append("深度学习模型需要大量的数据。" if i % 2 else "テキストを分割します。")
    return "\n".join(lines + SAMPLES) + "\n"


@pytest.fixture(scope="module")
def v32() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Path, Path]:
    d = tmp_path_factory.mktemp("bpe")
    text = d / "corpus.txt"
    text.write_text(_sample_corpus(), encoding="utf-8")
    tok = train_bpe([text], vocab_size=512, out=d / "tok")
    return tok, text, d / "tok"


# ------------------------------------------------------------------------------ bundled V3.2 tokenizer


def test_bundled_real_ids(v32: Tokenizer) -> None:
    assert v32.vocab_size == 128815
    assert (v32.bos_id, v32.eos_id, v32.pad_id) == (0, 1, 1)  # upstream config: pad = EOS
    assert v32.user_id == 128803
    assert v32.assistant_id == 128804
    assert v32.think_id == 128798
    assert v32.end_think_id == 128799
    assert v32.dsml_id == 128793
    assert v32.token_to_id("<｜▁pad▁｜>") == 2
    assert v32.id_to_token(128804) == "<｜Assistant｜>"
    assert v32.token_to_id("definitely-not-a-token") is None


@pytest.mark.parametrize("text", SAMPLES)
def test_bundled_round_trip(v32: Tokenizer, text: str) -> None:
    ids = v32.encode(text)
    assert ids and all(0 <= i < v32.vocab_size for i in ids)
    assert v32.decode(ids) == text


def test_bundled_known_encodings(v32: Tokenizer) -> None:
    assert v32.encode("Hello world") == [19923, 2058]
    assert v32.encode("1234567") == [6895, 18009, 25]  # digits split 123|456|7
    assert v32.encode("hi", add_bos=True) == [0, v32.encode("hi")[0]]
    assert v32.encode_batch(["Hello world", "hi"]) == [v32.encode("Hello world"), v32.encode("hi")]


def test_special_tokens_in_text_are_single_ids(v32: Tokenizer) -> None:
    ids = v32.encode("<｜User｜>hi<｜Assistant｜><think>why</think>ok｜DSML｜<｜end▁of▁sentence｜>")
    assert ids[0] == 128803 and 128804 in ids and 128798 in ids and 128799 in ids
    assert ids.count(128793) == 1 and ids[-1] == 1
    # BOS/EOS/DSML are special (dropped by skip_special_tokens); role and think markers are not.
    text = v32.decode(ids, skip_special_tokens=True)
    assert text == "<｜User｜>hi<｜Assistant｜><think>why</think>ok"


# ----------------------------------------------------------------------------------------- resolution


def test_load_bundled_by_name_and_none(v32: Tokenizer) -> None:
    assert load_tokenizer("deepseek-v3.2") is v32
    assert load_tokenizer(None) is v32


def test_load_checkpoint_dir_and_file(small: tuple[Tokenizer, Path, Path]) -> None:
    tok, _, out = small
    for arg in (out, str(out), out / "tokenizer.json"):
        t = load_tokenizer(arg)
        assert t.vocab_size == tok.vocab_size == 512
        assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2)  # pad from tokenizer_config.json


def test_dir_without_tokenizer_falls_back_to_bundled(tmp_path: Path, v32: Tokenizer) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is v32


def test_json_without_config_guesses_bos_eos(small: tuple[Tokenizer, Path, Path], tmp_path: Path) -> None:
    _, _, out = small
    (tmp_path / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    t = load_tokenizer(tmp_path / "tokenizer.json")
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2)


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        load_tokenizer(other)


def test_gguf_errors_name_the_file_or_the_shipped_names(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # a header and nothing else
    with pytest.raises(ValueError, match="model.gguf") as e:
        load_tokenizer(gguf)
    assert "not a readable GGUF file" in str(e.value)
    with pytest.raises(FileNotFoundError, match="smollm2-135m-dsa"):  # the list of shipped names
        load_tokenizer("no-such-model")


def test_gguf_delegates_to_gguf_tokenizer(small: tuple[Tokenizer, Path, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch):
    _, _, out = small
    seen: list[object] = []

    def load_gguf_tokenizer(path: object) -> Tokenizer:
        seen.append(path)
        return Tokenizer(tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")), name=str(path))

    monkeypatch.setattr(tokenizer_module, "load_gguf_tokenizer", load_gguf_tokenizer)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert isinstance(load_tokenizer(gguf), Tokenizer)
    assert load_tokenizer(tmp_path).vocab_size == 512  # a directory holding one .gguf
    assert load_tokenizer("smollm2-135m-dsa").bos_id == 0  # a shipped model name
    assert seen == [gguf, gguf, "smollm2-135m-dsa"]


# ------------------------------------------------------------------------------------------ small BPE


def test_small_bpe_special_ids(small: tuple[Tokenizer, Path, Path]) -> None:
    tok, _, out = small
    assert [tok.id_to_token(i) for i in range(len(SMALL_SPECIAL_TOKENS))] == list(SMALL_SPECIAL_TOKENS)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.user_id, tok.assistant_id, tok.think_id, tok.end_think_id, tok.dsml_id) == (3, 4, 5, 6, 7)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["pad_token"] == "<｜▁pad▁｜>" and cfg["bos_token"] == "<｜begin▁of▁sentence｜>"
    ids = tok.encode("<｜User｜>q<｜Assistant｜><think>r</think>a｜DSML｜<｜end▁of▁sentence｜>")
    assert [i for i in ids if i < 8] == [3, 4, 5, 6, 7, 1]
    assert tok.decode(ids, skip_special_tokens=True) == "<｜User｜>q<｜Assistant｜><think>r</think>a"


@pytest.mark.parametrize("text", SAMPLES + ["unseen ß∂ƒ words ☃ and 🦀 bytes"])
def test_small_bpe_round_trip(small: tuple[Tokenizer, Path, Path], text: str) -> None:
    tok = small[0]
    ids = tok.encode(text)
    assert max(ids) < 512
    assert tok.decode(ids) == text


def test_small_bpe_splits_digits(small: tuple[Tokenizer, Path, Path]) -> None:
    tok = small[0]
    pieces = [tok.decode([i]) for i in tok.encode("1234567")]
    assert "".join(pieces) == "1234567" and all(len(p) <= 3 for p in pieces)


def test_small_bpe_digit_group_one_keeps_every_digit_apart(tmp_path: Path) -> None:
    # numbers repeated often enough that a 3-digit group would be merged into one id
    text = tmp_path / "sums.txt"
    text.write_text("".join(f"Calculate {a} + {b}. <answer>{a + b}</answer>\n" for a in range(40, 90) for b in (7, 77)))
    per_digit = train_bpe([text], vocab_size=400, out=tmp_path / "one", digit_group=1)
    grouped = train_bpe([text], vocab_size=400, out=tmp_path / "three")
    pieces = [per_digit.decode([i]) for i in per_digit.encode("Calculate 47 + 77.")]
    assert pieces[pieces.index(" ") + 1: pieces.index(" ") + 3] == ["4", "7"]
    assert all(len(p) == 1 for p in pieces if p.strip().isdigit())
    assert any(len(grouped.decode([i])) > 1 and grouped.decode([i]).isdigit() for i in grouped.encode("47 + 77"))
    with pytest.raises(ValueError, match="digit_group"):
        train_bpe([text], vocab_size=400, out=tmp_path / "zero", digit_group=0)


def test_small_bpe_deterministic(small: tuple[Tokenizer, Path, Path], tmp_path: Path) -> None:
    _, text, out = small
    train_bpe([text], vocab_size=512, out=tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_small_bpe_rejects_tiny_vocab(small: tuple[Tokenizer, Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe([small[1]], vocab_size=200, out=tmp_path)


def test_cli_train_from_corpus_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "a.txt").write_text(_sample_corpus(), encoding="utf-8")
    extra = tmp_path / "extra.txt"
    extra.write_text("some extra text of our own\n" * 20, encoding="utf-8")
    out = tmp_path / "tok"
    rc = cli_main(
        ["train", "--out", str(out), "--corpus", str(tmp_path / "data"), "--text", str(extra), "--vocab-size", "400"]
    )
    assert rc == 0
    assert "2 file(s)" in capsys.readouterr().out
    assert load_tokenizer(out).vocab_size == 400
    with pytest.raises(SystemExit):
        cli_main(["train", "--out", str(out)])  # no inputs


def test_shipped_small_bpe_matches_the_small_preset():
    from dsv32.config import ModelConfig
    from dsv32.tokenizer import SMALL_NAME

    tok = load_tokenizer(SMALL_NAME)
    assert tok.vocab_size == ModelConfig.from_name("small").vocab_size == 8192
    assert (tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id, tok.dsml_id) == (0, 1, 3, 4, 7)
    text = "To be, or not to be: that is the question.\ndef f(x):\n    return x ** 2  # 12345"
    assert tok.decode(tok.encode(text)) == text
