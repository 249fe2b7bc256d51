"""Constrained decoding (`dsv32.grammar`) on a real model: a random-weight tiny V3.2 (vocabulary 512) sampling at
temperature 1 over byte-level tokenizers, so every structure in a reply comes from the grammar's mask and none
from a model that happens to know JSON. Checked: the mask equals a token-by-token reference (the matcher asked
about every id), json_object / json_schema replies that stop all parse and validate, a forced tool call is
exactly one parsable call in both chat families (through the server), unsupported schema keywords are a 400
naming the keyword, and a tokenizer the model's vocabulary cannot carry is refused with a message naming both.

A small positive ``logit_bias`` on the closing characters keeps the random model's strings short, so replies
finish within the token budget; the bias never lets through anything the mask forbids.
"""

from __future__ import annotations

import json

import pytest

for _dep in ("xgrammar", "jsonschema", "fastapi", "httpx"):
    pytest.importorskip(_dep, reason=f"needs {_dep} (pip install -e '.[serve,test]')")

import jsonschema  # noqa: E402
import torch  # noqa: E402
import xgrammar as xgr  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from dsv32 import chat, grammar  # noqa: E402
from dsv32.engine import Engine, SamplingParams  # noqa: E402
from dsv32.registry import load_model  # noqa: E402
from dsv32.serve import create_app  # noqa: E402
from serving_fakes import byte_tokenizer, scripted  # noqa: E402

V = 512  # the tiny preset's vocabulary: more rows than the byte tokenizers' ~260 ids
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
                   "unit": {"enum": ["C", "F"]}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 6}}, "required": ["tz"]}}}
SCHEMAS = [
    {"type": "object"},  # OpenAI's json_object mode
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 99},
                                      "b": {"enum": ["x", "yy", 3, None]}, "c": {"type": "string", "maxLength": 3}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1,
                                               "maxItems": 3},
                                      "point": {"$ref": "#/$defs/point"},
                                      "code": {"type": "string", "pattern": "^[a-c]{2}$"}},
     "required": ["tags", "point", "code"], "$defs": {"point": {"type": "object", "properties": {
         "x": {"type": "number", "minimum": 0, "maximum": 1}, "y": {"anyOf": [{"type": "null"}, {"const": 7}]}},
         "required": ["x", "y"]}}},
    {"type": "array", "prefixItems": [{"type": "string", "minLength": 1, "maxLength": 2}, {"type": "integer"}],
     "items": False, "minItems": 2},
]


def closing_bias(tok) -> dict[int, float]:
    """+6 on the characters that end strings, objects, arrays and DSML values (the random model's strings
    would otherwise run for hundreds of tokens)."""
    return {tok.encode(c)[0]: 6.0 for c in ('"', "}", "]", "<", ",")}


@pytest.fixture(scope="module")
def model():
    return load_model("preset:tiny")  # random weights, seeded


@pytest.fixture(scope="module")
def engine(model):
    threads = torch.get_num_threads()
    eng = Engine(model, max_slots=8, max_len=512, num_threads=1)  # one thread: far faster for a tiny model
    yield eng
    eng.shutdown()
    torch.set_num_threads(threads)  # process-wide: give the other test modules their setting back


@pytest.fixture(scope="module")
def chatml():
    tok = byte_tokenizer("chatml")
    return tok, grammar.GrammarCompiler(tok, V)


def _replay(compiled, tokens: list[int], stop: int) -> bool:
    """Whether a fresh matcher accepts ``tokens`` one by one (a reply cut by max_tokens is a valid prefix)."""
    m = xgr.GrammarMatcher(compiled, override_stop_tokens=[stop])
    return all(m.accept_token(t) for t in tokens)


# ------------------------------------------------------------------------------------ schema keywords


@pytest.mark.parametrize("keyword", ["not", "oneOf", "allOf", "if", "patternProperties", "uniqueItems",
                                     "multipleOf", "format", "minProperties", "contains", "$dynamicRef"])
def test_unsupported_keyword_named_with_its_path(keyword):
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string", keyword: {}}}}}
    with pytest.raises(grammar.SchemaError, match=rf"^rf\.properties\.a\.items: the keyword '\{keyword}' is not"
                       if keyword.startswith("$") else rf"^rf\.properties\.a\.items: the keyword '{keyword}' is not"):
        grammar.check_schema(schema, "rf")


@pytest.mark.parametrize("schema, message", [
    ({"$ref": "https://example.com/s.json"}, "only local references"),
    ({"type": "decimal"}, "unknown type 'decimal'"),
    ({"enum": []}, "non-empty list"),
    ({"anyOf": {}}, "non-empty list of schemas"),
    ([{"type": "object"}], "must be a JSON Schema object"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "'pattern' together with 'minLength' / 'maxLength'"),
])
def test_malformed_schemas_refused(schema, message):
    with pytest.raises(grammar.SchemaError, match=message):
        grammar.check_schema(schema)


def test_every_supported_keyword_compiles(chatml):
    """One schema using every keyword of SUPPORTED_KEYWORDS passes the check and xgrammar compiles it: the
    list in docs/serving.md is what the grammar really takes."""
    sink = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:s", "$comment": "c", "title": "t",
            "description": "d", "default": {}, "examples": [{}], "strict": True, "type": "object",
            "properties": {
                "s": {"type": "string", "minLength": 1, "maxLength": 4}, "p": {"type": "string", "pattern": "^[a-z]+$"},
                "n": {"type": "number", "minimum": 0, "maximum": 10, "exclusiveMinimum": -1, "exclusiveMaximum": 11},
                "l": {"type": "array", "prefixItems": [{"const": 1}], "items": {"enum": [2, 3]}, "minItems": 1,
                      "maxItems": 3},
                "r": {"$ref": "#/$defs/r"}, "d": {"$ref": "#/definitions/d"},
                "u": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}, "e": {"enum": ["a", 1]}, "c": {"const": 2}},
            "required": ["s"], "additionalProperties": False,
            "$defs": {"r": {"type": "integer"}}, "definitions": {"d": {"type": "string"}}}
    used = set(sink) | {k for sub in sink["properties"].values() for k in sub}
    assert used == grammar.SUPPORTED_KEYWORDS
    grammar.check_schema(sink)
    tok, gc = chatml
    gc.compile(grammar.json_format(sink))


def test_unsupported_keywords_are_a_400_naming_them():
    tok = byte_tokenizer("chatml")
    app = create_app(scripted(tok, "{}"), tok, model_name="m", family="chatml", max_slots=2, max_len=1024)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as c:
        bad_rf = {"type": "json_schema", "json_schema": {"name": "r", "schema": {
            "type": "object", "properties": {"x": {"oneOf": [{"type": "integer"}]}}}}}
        r = c.post("/v1/chat/completions", json=body | {"response_format": bad_rf})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "response_format"
        assert "properties.x: the keyword 'oneOf' is not supported" in err["message"]
        odd = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "dependentRequired": {}}}}
        r = c.post("/v1/chat/completions", json=body | {"tools": [odd], "tool_choice": "required"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "tools" and "'dependentRequired'" in err["message"]
        ok = c.post("/v1/chat/completions", json=body | {"response_format": {"type": "json_object"}})
        assert ok.status_code == 200 and json.loads(ok.json()["choices"][0]["message"]["content"]) == {}


# ------------------------------------------------------------------------------------ the mask


def test_mask_equals_matcher_reference(chatml):
    """Fast path: xgrammar's packed bitmask unpacked into the engine's bool row. Reference: the matcher asked
    about each of the model's 512 ids in turn (accept, then roll back). They agree at every step of a
    valid reply, the ids past the tokenizer are never allowed, and the stop id only once the value is whole."""
    tok, gc = chatml
    schema = SCHEMAS[1]
    compiled = gc.compile(grammar.json_format(schema))
    mask = gc.mask_factory(grammar.json_format(schema), [tok.eos_id])()
    ref = xgr.GrammarMatcher(compiled, override_stop_tokens=[tok.eos_id])
    reply = tok.encode('{"a": -5,"b":null}') + [tok.eos_id]
    for step, token in enumerate(reply):
        row = torch.ones(V, dtype=torch.bool)
        mask.fill_mask(row)
        expect = torch.zeros(V, dtype=torch.bool)
        for i in range(V):
            if ref.accept_token(i):
                expect[i] = True
                ref.rollback(1)
        assert torch.equal(row, expect), f"step {step}: mask and reference differ at {(row ^ expect).nonzero()}"
        assert not row[tok.vocab_size:].any()
        assert bool(row[tok.eos_id]) == (token == tok.eos_id)
        mask.accept(token)
        assert ref.accept_token(token) and mask.rejected is None
    assert mask.matcher.is_terminated()


# ------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_sampled_json_always_valid(engine, chatml, index):
    tok, gc = chatml
    schema = SCHEMAS[index]
    fmt = grammar.json_format(schema)
    compiled = gc.compile(fmt)
    params = SamplingParams(max_tokens=120, n=8, seed=index, stop_token_ids=(tok.eos_id,),
                            logit_bias=closing_bias(tok), logits_mask=gc.mask_factory(fmt, [tok.eos_id]))
    res = engine.generate(tok.encode("reply in JSON"), params)
    validator = jsonschema.Draft202012Validator(schema)
    done = 0
    for seq in res.sequences:
        assert max(seq.tokens) < tok.vocab_size  # the model's extra rows are never text
        if seq.finish_reason == "stop":
            assert seq.tokens[-1] == tok.eos_id
            value = json.loads(tok.decode(seq.tokens[:-1]))
            validator.validate(value)
            done += 1
        else:  # cut by max_tokens: still a prefix the grammar accepts
            assert seq.finish_reason == "length" and _replay(compiled, seq.tokens, tok.eos_id)
    assert done >= 6, f"only {done}/8 replies finished within 120 tokens"


@pytest.mark.parametrize("family, named", [("chatml", WEATHER), ("deepseek-v3.2", TIME)])
def test_forced_tool_call_is_exactly_one_valid_call(engine, family, named):
    """A named tool (parallel off, as the server builds it for a named tool_choice) gives exactly one call of
    that tool, written as `dsv32.chat` parses it, with arguments that match its schema; "required" (parallel
    on) gives at least one call, each valid. V3.2's calls are DSML, ChatML's Qwen2.5 JSON blocks (V3.2 uses the
    one-parameter tool: a DSML call is twice as many bytes, and every byte is a decode step here)."""
    tok = byte_tokenizer(family)
    gc = grammar.GrammarCompiler(tok, V)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    required = [WEATHER, TIME] if family == "chatml" else [TIME]
    for tools, parallel in (([named], False), (required, True)):
        fmt = grammar.tool_call_format(tools, family, parallel=parallel)
        budget = 320 if parallel else 160  # one call: ~90 bytes as JSON (get_weather), ~130 as DSML (get_time)
        params = SamplingParams(max_tokens=budget, n=6, seed=5, stop_token_ids=(tok.eos_id,),
                                logit_bias=closing_bias(tok), logits_mask=gc.mask_factory(fmt, [tok.eos_id]))
        res = engine.generate(tok.encode("weather?"), params)
        finished = [s for s in res.sequences if s.finish_reason == "stop"]
        # a single call mostly fits the budget; parallel calls may chain past it
        assert len(finished) >= (3 if not parallel else 1), [s.finish_reason for s in res.sequences]
        for seq in res.sequences:
            if seq.finish_reason != "stop":
                assert seq.finish_reason == "length" and _replay(gc.compile(fmt), seq.tokens, tok.eos_id)
        for seq in finished:
            calls = chat.parse_completion(tok.decode(seq.tokens[:-1], skip_special_tokens=False),
                                          family=family)["tool_calls"]
            assert calls and (parallel or len(calls) == 1)
            for call in calls:
                fn = call["function"]
                assert fn["name"] in {t["function"]["name"] for t in tools}
                jsonschema.validate(json.loads(fn["arguments"]), schemas[fn["name"]])


def test_named_tool_choice_through_the_server(model):
    """The server's path: a named tool_choice comes back as exactly one parsed call, finish "tool_calls"."""
    tok = byte_tokenizer("chatml")
    app = create_app(model, tok, model_name="m", family="chatml", max_slots=4, max_len=1024)
    body = {"model": "m", "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER, TIME],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "n": 4, "seed": 3,
            "max_tokens": 150, "logit_bias": {str(k): v for k, v in closing_bias(tok).items()}}
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        finished = [ch for ch in r.json()["choices"] if ch["finish_reason"] != "length"]
        assert len(finished) >= 3
        for ch in finished:
            (call,) = ch["message"]["tool_calls"]
            assert ch["finish_reason"] == "tool_calls" and call["function"]["name"] == "get_weather"
            jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])


# ------------------------------------------------------------------------------------ vocabulary mismatch


def test_vocabulary_mismatch_is_refused_clearly():
    tok = byte_tokenizer("chatml")  # 256 byte tokens + 3 markers
    small = grammar.GrammarCompiler(tok, 200)
    fmt = grammar.json_format({"type": "object"})
    for _ in range(2):  # the refusal is remembered, and stays as clear
        with pytest.raises(grammar.VocabularyError, match=r"tokenizer 'bytes-chatml' has 56 text token\(s\) with "
                           r"ids >= the model's vocabulary size 200 \(first: id 200 "):
            small.compile(fmt)
    # V3.2's DSML marker is text to a grammar: a model without a row for it cannot carry tool calls
    v32 = byte_tokenizer("deepseek-v3.2")
    with pytest.raises(grammar.VocabularyError, match=f"first: id {v32.token_to_id(chat.DSML)} '{chat.DSML}'"):
        grammar.GrammarCompiler(v32, v32.token_to_id(chat.DSML)).compile(fmt)
    gc = grammar.GrammarCompiler(tok, V)
    with pytest.raises(grammar.VocabularyError, match=r"stop id below the model's vocabulary size 512, got \[600\]"):
        gc.mask_factory(fmt, [600])
    with pytest.raises(grammar.SchemaError, match="needs a stop id"):
        gc.mask_factory(fmt, [])
    gc.mask_factory(fmt, [tok.eos_id, 600])  # out-of-range ids are dropped when a usable one remains


def test_no_raw_control_characters_in_bounded_strings(chatml):
    """Regression (xgrammar 0.2.9, mlc-ai/xgrammar#800): a string with minLength / maxLength admitted raw
    U+0000-U+001F, so a complete reply could fail `json.loads`. Those tokens are now never text."""
    tok, gc = chatml
    fmt = grammar.json_format({"type": "object", "properties": {"c": {"type": "string", "minLength": 1,
                                                                      "maxLength": 8}}, "required": ["c"]})
    mask = gc.mask_factory(fmt, [tok.eos_id])()
    for t in tok.encode('{"c": "'):
        mask.accept(t)
    row = torch.ones(V, dtype=torch.bool)
    mask.fill_mask(row)
    texts = {i: tok.decode([i]) for i in row.nonzero().flatten().tolist()}
    assert texts and not [t for t in texts.values() if any(ord(ch) < 0x20 for ch in t)]
    controls = {tok.encode(chr(c))[0] for c in range(32) if c not in (10, 13)}
    assert tok.encode("a")[0] in texts and set(gc.banned) == controls
