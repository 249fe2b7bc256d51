"""Structured output by constrained decoding: JSON Schema replies and forced tool calls as per-sequence
logits masks (:class:`dsv32.engine.LogitsMask`).

A request's constraint is described as an xgrammar *structural tag* (a tree of formats: constant text,
JSON-Schema values written as JSON or as V3.2's DSML parameters, tagged blocks, free text up to a marker),
compiled once per (tokenizer, constraint) into a token-level automaton and cached. Each sequence gets a
matcher over the compiled grammar; every step it writes the allowed next ids as a packed bitmask, which
becomes the engine's bool row, and after sampling it advances by the sampled id. Why xgrammar: on our two
tokenizers (V3.2's 129K and SmolLM2's 49K vocabularies) it filled a mask in ~5 us per token against
llguidance's 17-400 us, both accepted every valid path, and it builds V3.2's DSML format (docs/serving.md,
"Structured output", has the measurement).

Added tokens (BOS, EOS, `<|im_end|>`, placeholders, ...) are never text to a grammar: they are blanked in the
vocabulary handed to xgrammar, so no JSON string can contain one, and the stop ids are allowed exactly when
the grammar is complete. V3.2's `｜DSML｜` and `</think>` stay spellable, since the DSML call format and the
thinking prefix are written with them.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dsv32.chat import CALLS_CLOSE, CALLS_OPEN, DSML, END_THINK, INVOKE_CLOSE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from dsv32.tokenizer import Tokenizer

#: JSON Schema keywords a grammar enforces (validation keywords) or may carry (annotations). Anything else
#: in a schema is refused (:class:`SchemaError`) rather than silently not enforced.
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minLength", "maxLength", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    # annotations: carried, nothing to enforce
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "strict",
})
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # keyword -> {name: schema}
_SCHEMA_LISTS = ("anyOf", "prefixItems")  # keyword -> [schema, ...]
_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
#: Markers grammars spell as text (the DSML call format, the end of V3.2's reasoning).
GRAMMAR_MARKERS = (DSML, END_THINK)
# At most this many whitespace characters in a row inside JSON: a small model cannot pad forever.
_MAX_WS = 1
_CONTROL = re.compile("[\x00-\x09\x0b\x0c\x0e-\x1f]")  # control characters JSON never holds raw


class SchemaError(ValueError):
    """A constraint the grammar cannot enforce; the message names the path and keyword (the server's 400)."""


class VocabularyError(SchemaError):
    """The model's vocabulary cannot carry a grammar over this tokenizer: a text token the grammar may need
    lies past the model's rows, or no stop id is within them (a constrained reply could never end)."""


def check_schema(schema: Any, path: str = "schema") -> None:
    """Raise :class:`SchemaError` for a schema that uses keywords outside :data:`SUPPORTED_KEYWORDS` or is
    not a JSON Schema object (booleans are schemas too)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise SchemaError(f"{path} must be a JSON Schema object, got {type(schema).__name__}")
    for key, value in schema.items():
        if key not in SUPPORTED_KEYWORDS:
            raise SchemaError(f"{path}: the keyword {key!r} is not supported by constrained decoding "
                              f"(supported: {', '.join(sorted(SUPPORTED_KEYWORDS))})")
        if key == "type":
            types = value if isinstance(value, list) else [value]
            bad = [t for t in types if t not in _JSON_TYPES]
            if bad or not types:
                raise SchemaError(f"{path}.type: unknown type {bad[0] if bad else value!r}")
        elif key in _SCHEMA_MAPS:
            if not isinstance(value, Mapping):
                raise SchemaError(f"{path}.{key} must be an object")
            for name, sub in value.items():
                check_schema(sub, f"{path}.{key}.{name}")
        elif key in _SCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                raise SchemaError(f"{path}.{key} must be a non-empty list of schemas")
            for i, sub in enumerate(value):
                check_schema(sub, f"{path}.{key}[{i}]")
        elif key in ("items", "additionalProperties"):
            check_schema(value, f"{path}.{key}")
        elif key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise SchemaError(f"{path}.$ref: only local references ('#/...') are supported, got {value!r}")
        elif key == "enum" and (not isinstance(value, list) or not value):
            raise SchemaError(f"{path}.enum must be a non-empty list")
    if "pattern" in schema and ("minLength" in schema or "maxLength" in schema):
        # xgrammar 0.2.9 drops the length bounds next to a pattern (with only a warning): refuse, not ignore
        raise SchemaError(f"{path}: 'pattern' together with 'minLength' / 'maxLength' is not supported by "
                          "constrained decoding; write the length into the pattern (e.g. '^[a-z]{1,8}$')")


def tool_parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's argument schema (an OpenAI tool entry or a bare function schema); no parameters = `{}` only."""
    fn = tool.get("function", tool)
    params = fn.get("parameters")
    return dict(params) if params else {"type": "object", "properties": {}, "additionalProperties": False}


def _tool_name(tool: Mapping[str, Any]) -> str:
    return tool.get("function", tool)["name"]


# ------------------------------------------------------------------------------------------ formats


def json_format(schema: Any) -> dict[str, Any]:
    """A JSON value matching ``schema`` (``{"type": "object"}`` for OpenAI's json_object mode)."""
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": _MAX_WS}


def tool_call_format(tools: Sequence[Mapping[str, Any]], family: str, *, parallel: bool = True) -> dict[str, Any]:
    """At least one call to one of ``tools`` (one tool: that one, as OpenAI's named tool_choice), written
    exactly as `dsv32.chat` renders calls, arguments matching each tool's parameter schema; exactly one
    call unless ``parallel`` (OpenAI's ``parallel_tool_calls``)."""
    if not tools:
        raise ValueError("tool_call_format needs at least one tool")
    if family == "chatml":
        tags = [{"type": "tag", "begin": f'{TOOL_CALL_OPEN}\n{{"name": "{_tool_name(t)}", "arguments": ',
                 "content": json_format(tool_parameters(t)), "end": f"}}\n{TOOL_CALL_CLOSE}"} for t in tools]
        return {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                "stop_after_first": not parallel}
    tags = [{"type": "tag", "begin": f'<{DSML}invoke name="{_tool_name(t)}">\n',
             "content": {"type": "json_schema", "json_schema": tool_parameters(t), "style": "deepseek_xml",
                         "max_whitespace_cnt": _MAX_WS},
             "end": f"{INVOKE_CLOSE}\n"} for t in tools]
    return {"type": "sequence", "elements": [
        {"type": "const_string", "value": f"\n\n{CALLS_OPEN}\n"},
        {"type": "tags_with_separator", "tags": tags, "separator": "", "at_least_one": True,
         "stop_after_first": not parallel},
        {"type": "const_string", "value": CALLS_CLOSE},
    ]}


def after_reasoning(fmt: dict[str, Any]) -> dict[str, Any]:
    """``fmt`` preceded by free reasoning text and `</think>` (V3.2 thinking mode: the prompt ends in
    `<think>`, and only the answer after the reasoning is constrained)."""
    think = {"type": "tag", "begin": "", "content": {"type": "any_text", "excludes": [END_THINK]}, "end": END_THINK}
    return {"type": "sequence", "elements": [think, fmt]}


# ------------------------------------------------------------------------------------------ compiling


class GrammarCompiler:
    """Compiles constraints for one tokenizer and model vocabulary, caching each compiled grammar by the
    JSON text of its format (so equal schemas from different requests share one)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, cache_size: int = 256) -> None:
        self.tokenizer, self.vocab_size = tokenizer, int(vocab_size)
        self._lock = threading.Lock()
        self._xgr_compiler: Any = None
        self._vocab_error: str | None = None  # set once the vocabulary check has failed
        self.banned: list[int] = []  # text ids blanked for holding a raw control character (filled on first use)
        self._compile = functools.lru_cache(maxsize=cache_size)(self._compile_uncached)

    def _compiler(self) -> Any:
        # xgrammar is imported on first use: its import costs seconds (it loads torch extensions), which a
        # server that never sees a constrained request should not pay at start-up.
        import xgrammar as xgr

        with self._lock:
            if self._vocab_error is not None:
                raise VocabularyError(self._vocab_error)
            if self._xgr_compiler is None:
                backend = self.tokenizer.backend
                V = self.vocab_size
                added = set(backend.get_added_tokens_decoder())
                keep = {self.tokenizer.token_to_id(m) for m in GRAMMAR_MARKERS} - {None}
                vocab = [""] * V  # "" = a special token: never matched as text
                outside: list[tuple[int, str]] = []  # text tokens the model has no row for
                for text, i in backend.get_vocab(with_added_tokens=True).items():
                    if i not in added or i in keep:
                        if i < V:
                            vocab[i] = text
                        else:
                            outside.append((i, text))
                # Tokens holding a raw control character (U+0000-U+001F but LF and CR) are never text to a grammar:
                # none may appear in JSON (inside a string they must be escaped), yet xgrammar 0.2.9 admits them
                # in strings with minLength / maxLength (mlc-ai/xgrammar#800), so a reply could stop complete and
                # still not parse. Tab goes too: JSON's other whitespace (space, LF, CR) remains.
                texts = backend.decode_batch([[i] for i in range(min(V, backend.get_vocab_size(True)))],
                                             skip_special_tokens=False)
                self.banned = [i for i, t in enumerate(texts) if vocab[i] and _CONTROL.search(t)]
                for i in self.banned:
                    vocab[i] = ""
                if outside:
                    # A grammar over a truncated vocabulary may need a token the model cannot emit (a byte, a
                    # DSML marker) and stall mid-reply; refuse it up front, naming the mismatch.
                    i, text = min(outside)
                    self._vocab_error = (
                        f"constrained decoding is unavailable: tokenizer {self.tokenizer.name or '(unnamed)'!r} "
                        f"has {len(outside)} text token(s) with ids >= the model's vocabulary size {V} "
                        f"(first: id {i} {text!r}); serve the model with the tokenizer it was trained with")
                    raise VocabularyError(self._vocab_error)
                meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
                info = xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=V, stop_token_ids=[],
                                         add_prefix_space=meta["add_prefix_space"])
                self._xgr_compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._xgr_compiler

    def _compile_uncached(self, key: str) -> Any:
        tag = {"type": "structural_tag", "format": json.loads(key)}
        return self._compiler().compile_structural_tag(json.dumps(tag))

    def compile(self, fmt: Mapping[str, Any]) -> Any:
        """The compiled grammar of a structural-tag format (cached). Raises SchemaError when xgrammar refuses it."""
        key = json.dumps(fmt, ensure_ascii=False)  # key order kept: properties are generated in schema order
        try:
            return self._compile(key)
        except SchemaError:
            raise
        except (RuntimeError, ValueError) as e:
            raise SchemaError(f"the grammar could not be built: {e}") from e

    def mask_factory(self, fmt: Mapping[str, Any], stop_ids: Sequence[int]) -> Callable[[], GrammarMask]:
        """The ``SamplingParams.logits_mask`` factory for ``fmt``: compiles now (so a bad schema fails the
        request before it is queued), one matcher per sequence later."""
        compiled = self.compile(fmt)
        stops = sorted({int(t) for t in stop_ids if 0 <= int(t) < self.vocab_size})
        if not stops:  # once the grammar is complete only a stop id may follow: without one the reply stalls
            if stop_ids:
                raise VocabularyError(f"constrained decoding needs a stop id below the model's vocabulary size "
                                      f"{self.vocab_size}, got {sorted(stop_ids)}: the reply could never end")
            raise SchemaError("constrained decoding needs a stop id (EOS) to end the reply; none was given "
                              "(with ignore_eos, name one in stop_token_ids)")
        return functools.partial(GrammarMask, compiled, stops, self.vocab_size)


class GrammarMask:
    """One sequence's matcher (implements :class:`dsv32.engine.LogitsMask`). When the grammar is complete
    only the stop ids are allowed; until then no stop id is."""

    def __init__(self, compiled: Any, stop_ids: Sequence[int], vocab_size: int) -> None:
        import xgrammar as xgr  # already imported by the compiler that built ``compiled``

        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_ids))
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32
        self.rejected: int | None = None  # a token the grammar did not accept (never, when masked)

    def fill_mask(self, allowed: torch.Tensor) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        n = min(self.vocab_size, allowed.shape[0])
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little", count=n)
        allowed[:n] &= torch.from_numpy(bits.view(np.bool_)).to(allowed.device)
        allowed[n:] = False  # ids past the grammar's vocabulary are never text

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(int(token)):
            self.rejected = int(token)
