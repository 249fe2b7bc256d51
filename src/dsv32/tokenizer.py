"""Tokenizers: the bundled DeepSeek-V3.2 tokenizer, checkpoint tokenizers, GGUF-embedded BPEs, a small BPE trainer.

`load_tokenizer` is the single entry point (see docs/design.md, "Tokenizers"); `Tokenizer` is a thin
wrapper over HF `tokenizers.Tokenizer` that adds the ids the rest of the project needs by name (BOS/EOS/pad
and V3.2's chat markers), so no caller has to spell `<｜User｜>` to find an id.

`train_bpe` builds the `small` preset's byte-level BPE: V3.2's pre-tokenisation idea with V3.2's special
tokens at fixed low ids, so that the chat format (`dsv32.chat`) works unchanged on a vocabulary small
enough for a tiny model's embeddings.
"""

from __future__ import annotations

import argparse
import functools
import json
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from dsv32.gguf import gguf_metadata, resolve_gguf

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"

#: Special tokens of the small BPE, in id order (0, 1, 2, ...). Spelled exactly as in V3.2's tokenizer.
SMALL_SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK, DSML)
#: Markers that, as in V3.2, survive `decode(..., skip_special_tokens=True)` (only BOS/EOS/pad/DSML are special).
_NON_SPECIAL_MARKERS = frozenset({USER, ASSISTANT, THINK, END_THINK})

BUNDLED_NAME = "deepseek-v3.2"
_ASSETS = Path(__file__).resolve().parent / "assets" / "tokenizers"
_BUNDLED_DIR = _ASSETS / BUNDLED_NAME
#: The `small` preset's 8K byte-level BPE (trained by `dsv32 tokenizer train`; provenance in its NOTICE.md).
SMALL_NAME = "dsv32-small-8k"

# Fallback spellings when a tokenizer.json comes without a tokenizer_config.json naming BOS/EOS.
_BOS_CANDIDATES = (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>")
_EOS_CANDIDATES = (EOS, "</s>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids the model, chat encoder and trainer look up by name.

    Added tokens written in the text (`<｜User｜>`, `｜DSML｜`, ...) are matched before BPE, so they become
    single ids; that is what lets `dsv32.chat` build prompts as plain strings.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        name: str = "",
    ) -> None:
        self.backend = backend
        self.name = name
        self.bos_token = bos_token if bos_token is not None else self._first_known(_BOS_CANDIDATES)
        self.eos_token = eos_token if eos_token is not None else self._first_known(_EOS_CANDIDATES)
        if pad_token is None:
            pad_token = PAD if self.token_to_id(PAD) is not None else self.eos_token
        self.pad_token = pad_token
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.token_to_id(self.eos_token) if self.eos_token else None
        self.pad_id = self.token_to_id(self.pad_token) if self.pad_token else None
        self.user_id = self.token_to_id(USER)
        self.assistant_id = self.token_to_id(ASSISTANT)
        self.think_id = self.token_to_id(THINK)
        self.end_think_id = self.token_to_id(END_THINK)
        self.dsml_id = self.token_to_id(DSML)

    def _first_known(self, candidates: Iterable[str]) -> str | None:
        return next((t for t in candidates if self.token_to_id(t) is not None), None)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (base vocab + added tokens); a model may pad its embedding past it."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids) if add_bos else ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]:
        """Encode many texts at once (parallel in the Rust backend): the fast path for corpus preparation."""
        out = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self._with_bos(ids) for ids in out] if add_bos else out

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is None:
            raise ValueError(f"tokenizer {self.name or '?'} has no BOS token; cannot add_bos")
        return [self.bos_id, *ids]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(int(id))

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` + `tokenizer_config.json` into a checkpoint directory (what
        `load_tokenizer(directory)` reads back first)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        _write_config(directory, self.bos_token, self.eos_token, self.pad_token)
        return directory / "tokenizer.json"

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


# ----------------------------------------------------------------------------------------------- loading


def load_tokenizer(path_or_name: str | Path | None = None) -> Tokenizer:
    """Resolve a tokenizer the way the rest of the project expects (docs/design.md).

    In order: a directory's `tokenizer.json`; a `tokenizer.json` file; a GGUF file (or a directory holding
    one, or a shipped GGUF model name) through `load_gguf_tokenizer`; otherwise — `None`,
    `"deepseek-v3.2"`, or a checkpoint directory without a tokenizer — the bundled DeepSeek-V3.2 tokenizer.
    """
    if path_or_name is None or str(path_or_name) == BUNDLED_NAME:
        return _load_bundled()
    shipped = _ASSETS / str(path_or_name) / "tokenizer.json"
    if _looks_like_name(str(path_or_name)) and shipped.is_file():
        return _load_json(shipped)  # another tokenizer shipped with dsv32, e.g. the small preset's BPE
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _load_json(path / "tokenizer.json")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0])
        if len(ggufs) > 1:
            raise ValueError(f"{path}: holds several .gguf files and no tokenizer.json; pass one .gguf file")
        return _load_bundled()
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path)
        if path.suffix == ".json":
            return _load_json(path)
        raise ValueError(f"{path}: not a tokenizer.json, a .gguf file or a checkpoint directory")
    if _looks_like_name(str(path_or_name)):
        return _load_gguf(str(path_or_name))  # a shipped model name; dsv32.registry resolves it
    raise FileNotFoundError(f"{path}: no such tokenizer file or directory")


def _looks_like_name(s: str) -> bool:
    return "/" not in s and "\\" not in s and not s.endswith((".json", ".gguf")) and not s.startswith(".")


def _load_json(path: Path) -> Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
    return Tokenizer(backend, **_read_config(path.parent / "tokenizer_config.json"), name=str(path))


def _load_gguf(path: str | Path) -> Tokenizer:
    return load_gguf_tokenizer(path)


@functools.lru_cache(maxsize=1)
def _load_bundled() -> Tokenizer:
    """The real V3.2 tokenizer (cached: parsing its 7.8 MB JSON takes a noticeable fraction of a second).

    Upstream's tokenizer_config.json sets pad = EOS and adds no BOS by default; we follow it.
    """
    path = _BUNDLED_DIR / "tokenizer.json.zip"
    try:
        with zipfile.ZipFile(path) as zf:
            text = zf.read("tokenizer.json").decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise FileNotFoundError(f"{path}: bundled DeepSeek-V3.2 tokenizer missing or damaged ({e})") from e
    backend = tokenizers.Tokenizer.from_str(text)
    return Tokenizer(backend, bos_token=BOS, eos_token=EOS, pad_token=EOS, name=BUNDLED_NAME)


def _read_config(path: Path) -> dict[str, str | None]:
    """BOS/EOS/pad spellings from an HF tokenizer_config.json (strings or AddedToken dicts), if present."""
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable tokenizer_config.json ({e})") from e
    out: dict[str, str | None] = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        val = cfg.get(key)
        if isinstance(val, dict):
            val = val.get("content")
        if isinstance(val, str):
            out[key] = val
    return out


def _write_config(directory: Path, bos: str | None, eos: str | None, pad: str | None) -> None:
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------ GGUF BPE

# llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) that split every digit on its own before the GPT-2
# regex, the rest split only by the GPT-2 regex. Other pre-tokenizers (llama-bpe, qwen2, ...) are not built here.
_PRE_DIGITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_PRE_GPT2 = ("gpt2", "default", "mpt", "olmo", "jais")
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types


def _gguf_file(path_or_name: str | Path | None) -> Path:
    """None, a .gguf file or a directory holding one -> the file; a shipped model name -> its GGUF."""
    if path_or_name is None or Path(path_or_name).expanduser().exists():
        return resolve_gguf(path_or_name)
    # deliberately lazy: the registry imports torch and the models (seconds), which the tokenizer's users
    # (`dsv32 data prepare`, chat rendering) never need; only a shipped model name costs that import
    from dsv32.registry import shipped_gguf

    return shipped_gguf(str(path_or_name))


def load_gguf_tokenizer(path_or_name: str | Path | None = None) -> Tokenizer:
    """The GGUF's embedded GPT-2-style byte-level BPE (vocab + merges + special tokens) as a ``Tokenizer``.

    ``path_or_name``: a .gguf file, a directory holding one, a shipped model name, or None (SmolLM2).
    Pre-tokenisation follows llama.cpp for the file's ``tokenizer.ggml.pre``: for SmolLM2 ("smollm") each digit
    is split off on its own, then the GPT-2 regex and byte-level mapping apply (as HF's SmolLM2
    tokenizer.json does). Control tokens (``<|im_start|>``, ...) are special added tokens, matched in text.
    """
    path = _gguf_file(path_or_name)
    meta = gguf_metadata(path)
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)")
    if pre not in _PRE_DIGITS + _PRE_GPT2:
        raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported ({_PRE_DIGITS + _PRE_GPT2})")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    backend = tokenizers.Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
    if pre in _PRE_DIGITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED]
    )

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None else None

    return Tokenizer(backend, bos_token=token("bos"), eos_token=token("eos"), pad_token=token("padding"),
                     name=str(path))


# ------------------------------------------------------------------------------------------ small BPE

# Pre-tokenisation in V3.2's spirit: digits in groups of 1-3 (``digit_group``), runs of CJK script kept apart,
# then words (optionally led by one non-letter such as a space), punctuation runs, newlines and other whitespace.
def _digits(group: int) -> str:
    return rf"\p{{N}}{{1,{group}}}"

_CJK = r"[\p{Han}\p{Hiragana}\p{Katakana}]+"
_WORDS = (
    r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"  # a word, with its leading space or sigil
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"  # punctuation/symbol runs
    r"|\s*[\r\n]+"  # newlines with the indentation before them
    r"|\s+(?!\S)"  # trailing spaces (leave one for the next word)
    r"|\s+"
)


def _small_backend(digit_group: int = 3) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_digits(digit_group)), behavior="isolated"),
            pre_tokenizers.Split(Regex(_CJK), behavior="isolated"),
            pre_tokenizers.Split(Regex(_WORDS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(
    files: list[Path], *, vocab_size: int = 8192, out: Path, show_progress: bool = False, digit_group: int = 3
) -> Tokenizer:
    """Train a byte-level BPE on text files and save it as `out/tokenizer.json` (+ `tokenizer_config.json`).

    Numbers are cut into groups of at most ``digit_group`` digits before merging (V3.2: 3); 1 keeps every
    digit its own token, which small arithmetic models learn from far more easily than opaque 2-3 digit ids.

    Ids 0..7 are `SMALL_SPECIAL_TOKENS` (BOS, EOS, pad, User, Assistant, think, /think, DSML), then the 256
    byte symbols, then merges. Files are read in sorted order and the trainer is deterministic, so the
    same inputs give a byte-identical tokenizer.json.
    """
    files = sorted({Path(f) for f in files})
    if not files:
        raise ValueError("train_bpe: no training files given")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: training text not found")
    floor = len(SMALL_SPECIAL_TOKENS) + 256
    if vocab_size <= floor:
        raise ValueError(f"vocab_size {vocab_size} must exceed {floor} (special tokens + 256 bytes)")

    if digit_group < 1:
        raise ValueError(f"digit_group must be >= 1, got {digit_group}")
    backend = _small_backend(digit_group)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=show_progress,
        special_tokens=[AddedToken(t, normalized=False) for t in SMALL_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train([str(f) for f in files], trainer)

    # The trainer registers every special token as `special`; as in V3.2, role and think markers are plain
    # added tokens (they survive skip_special_tokens). Flip the flag in the serialised form and reload.
    spec = json.loads(backend.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in _NON_SPECIAL_MARKERS:
            added["special"] = False
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))

    out = Path(out)
    tok = Tokenizer(backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, name=str(out / "tokenizer.json"))
    for i, t in enumerate(SMALL_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} landed on id {tok.token_to_id(t)}, not {i}"
    tok.save(out)
    return tok


# ------------------------------------------------------------------------------------------------- CLI


def cli_main(argv: list[str]) -> int:
    """`dsv32 tokenizer train --out DIR [--text FILE ...] [--corpus DIR] [--vocab-size N]`."""
    parser = argparse.ArgumentParser(prog="dsv32 tokenizer", description="tokenizer tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a small byte-level BPE with V3.2's special tokens")
    tr.add_argument("--out", required=True, type=Path, help="output directory (tokenizer.json is written here)")
    tr.add_argument("--text", action="append", default=[], type=Path, metavar="FILE", help="a text file (repeatable)")
    tr.add_argument("--corpus", type=Path, metavar="DIR", help="a `dsv32 data prepare` output: reads DIR/raw/**/*.txt")
    tr.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args(argv)

    files: list[Path] = list(args.text)
    if args.corpus is not None:
        raw = args.corpus / "raw"
        if not raw.is_dir():
            parser.error(f"{raw}: not a directory (expected the cleaned texts of `dsv32 data prepare`)")
        found = sorted(raw.rglob("*.txt"))
        if not found:
            parser.error(f"{raw}: no *.txt files")
        files += found
    if not files:
        parser.error("give at least one --text FILE or --corpus DIR")
    for f in files:
        if not f.is_file():
            parser.error(f"{f}: no such file")

    total = sum(f.stat().st_size for f in files)
    print(f"training byte-level BPE: vocab {args.vocab_size}, {len(files)} file(s), {total / 1e6:.1f} MB of text")
    tok = train_bpe(files, vocab_size=args.vocab_size, out=args.out, show_progress=True)
    sample = "Hello, world! 12345 <｜User｜>hi<｜Assistant｜>"
    ids = tok.encode(sample)
    print(f"wrote {args.out / 'tokenizer.json'} (vocab {tok.vocab_size}); {sample!r} -> {len(ids)} tokens")
    return 0


# ------------------------------------------------------------------------------------ streaming decode


class Detokenizer:
    """Incremental decoding for streamed generation: ``add(id)`` returns the text that id completes.

    Decoding the whole sequence per token costs O(n) each, O(n^2) in all. Instead this decodes a short
    window: the ids of the previous emitted piece (as context) plus the ids not yet emitted. The context
    matters because decoders treat the start of a decode specially (e.g. SentencePiece's Metaspace drops
    the leading space of the first word); diffing two decodes with the same start cancels that out. Text
    ending in U+FFFD (an unfinished multi-byte UTF-8 character) is held back until its bytes arrive.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window (the previous piece's first id)
        self.read = 0  # ids before this are emitted

    def add(self, token: int) -> str:
        """Feed one id; returns the newly completed text ('' while a character is still incomplete)."""
        self.ids.append(int(token))
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        new = self.tok.decode(self.ids[self.prefix :])
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new[len(prev) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation, an incomplete character is emitted as is)."""
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        new = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return new[len(prev) :] if len(new) > len(prev) else ""
