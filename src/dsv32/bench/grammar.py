"""`dsv32 bench grammar`: structured output by constrained decoding (`dsv32.grammar`) on a real model.

1. **Validity.** ``--schemas N`` JSON Schemas from a seeded generator (nested objects, arrays with item bounds,
   tuples, enums, consts, nullable unions, ``$ref`` to ``$defs``, required and optional properties, bounded
   integers and numbers, strings with length bounds or patterns), each asked for once as the chat endpoint
   builds it (the schema rendered into the system turn, the reply masked by its grammar). Reported: how many
   replies stopped on their own (the rest hit ``--max-tokens``), and how many of those parse and validate
   under `jsonschema` (Draft 2020-12), the reference validator, with every failure listed.
2. **Overhead.** Decode throughput at ``--streams`` concurrent sequences (that many engine slots and
   requests, submitted at once), with and without a grammar, every request generating exactly ``--tokens``
   tokens: unconstrained requests ignore EOS, constrained ones follow a schema (a list of at least 200
   small records) that cannot be complete before ``--tokens``. Equal work, so tokens/s compare directly.
   Only the decode window is timed (all rows decoding: after the last prefill, before the first finish),
   in wall time and in this process's CPU time; the two modes alternate for ``--repeats`` rounds and the
   medians are compared (shared machines are noisy). The mask's own cost (fill + accept, timed around the
   calls) and the compile times are reported too.

    dsv32 bench grammar                                  # SmolLM2-135M, 60 schemas, 16 streams
    dsv32 bench grammar --skip-overhead --schemas 100 --json grammar.json
    dsv32 bench grammar --model preset:tiny --quick      # random weights and a byte tokenizer: a smoke test
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv32 import chat, grammar
from dsv32.engine import Engine, SamplingParams
from dsv32.registry import load_model
from dsv32.tokenizer import Tokenizer, load_tokenizer

TOPICS = ["a library book", "a city", "a recipe", "a football match", "a laptop", "a planet", "an employee",
          "a train journey", "a weather report", "a hotel booking", "a bank transfer", "a song", "a movie",
          "a garden", "a school class", "a bicycle", "a doctor's appointment", "a shopping list", "a river",
          "a software bug"]
WORDS = ["name", "title", "id", "count", "price", "city", "tags", "items", "owner", "status", "score", "date",
         "color", "size", "notes", "rating", "level", "kind", "year", "email", "address", "active", "total", "unit"]
ENUMS = [["red", "green", "blue"], ["low", "medium", "high"], ["open", "closed"], ["cat", "dog", "bird", "fish"],
         ["yes", "no", "maybe"], [1, 2, 3], ["a", "b", None]]
PATTERNS = ["^[A-Z][a-z]{1,10}$", "^[0-9]{3}-[0-9]{4}$", "^[a-z]+(-[a-z]+)*$", "^#[0-9a-f]{6}$", "^v[0-9]\\.[0-9]$"]


# ============================================================================================ schemas


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "string_len", "pattern", "integer", "number", "boolean", "enum", "const",
                       "nullable"])
    if kind == "string":
        return {"type": "string"}
    if kind == "string_len":
        lo = rng.choice([0, 1, 3])
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.choice([5, 12, 30])}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "integer":
        lo = rng.choice([-100, 0, 1, 1900])
        out: dict[str, Any] = {"type": "integer", "minimum": lo}
        if rng.random() < 0.8:
            out["maximum"] = lo + rng.choice([9, 100, 2100])
        return out
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 5, 1000])} if rng.random() < 0.5 else \
            {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.choice(ENUMS)}
    if kind == "const":
        return {"const": rng.choice(["v1", 42, True])}
    return {"anyOf": [{"type": "null"}, _leaf(rng)]}


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    r = rng.random()
    if depth < 2 and r < 0.25:
        return _object(rng, depth + 1)
    if depth < 2 and r < 0.45:
        lo = rng.choice([0, 1, 2])
        return {"type": "array", "items": _value(rng, depth + 1), "minItems": lo, "maxItems": lo + rng.choice([1, 3])}
    if depth < 2 and r < 0.5:
        return {"type": "array", "prefixItems": [_leaf(rng), _leaf(rng)], "items": False, "minItems": 2}
    return _leaf(rng)


def _object(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    names = rng.sample(WORDS, rng.randint(1, 4 if depth == 0 else 3))
    props = {n: _value(rng, depth) for n in names}
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": [n for n in names if rng.random() < 0.7] or names[:1]}
    if rng.random() < 0.6:
        out["additionalProperties"] = False
    return out


def make_schemas(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` varied JSON Schemas, the same for the same seed. Every fifth routes a property through ``$defs``;
    every seventh is a top-level array. All pass :func:`dsv32.grammar.check_schema`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 7 == 6:
            schema: dict[str, Any] = {"type": "array", "items": _object(rng, 1), "minItems": 1, "maxItems": 3}
        else:
            schema = _object(rng)
        if i % 5 == 4 and schema["type"] == "object":
            schema["$defs"] = {"part": _object(rng, 1)}
            schema["properties"]["part"] = {"$ref": "#/$defs/part"}
        grammar.check_schema(schema)
        out.append(schema)
    return out


# ============================================================================================ helpers


def _prompt(tok: Tokenizer, family: str, text: str, schema: dict[str, Any] | None) -> list[int]:
    """The chat endpoint's prompt: the schema (when given) rendered into the system turn, as `dsv32 serve` does."""
    kw = {"response_format": schema} if schema is not None else {}
    ids, _ = chat.encode_chat([{"role": "user", "content": text}], family=family, tokenizer=tok, **kw)
    return ids


def _stop_ids(tok: Tokenizer, family: str) -> list[int]:
    ids = [tok.eos_id, tok.token_to_id(chat.IM_END) if family == "chatml" else None]
    return sorted({int(i) for i in ids if i is not None})


@dataclass
class MaskTimer:
    """Wraps a mask factory and times every ``fill_mask`` + ``accept`` (the grammar's own per-token cost), in
    CPU time of the calling (engine) thread, so that other processes on a shared machine do not inflate it."""

    factory: Callable[[], Any]
    seconds: float = 0.0
    calls: int = 0

    def __call__(self) -> Any:
        inner, timer = self.factory(), self

        class Timed:
            def fill_mask(self, allowed: torch.Tensor) -> None:
                t = time.thread_time()
                inner.fill_mask(allowed)
                timer.seconds += time.thread_time() - t
                timer.calls += 1

            def accept(self, token: int) -> None:
                t = time.thread_time()
                inner.accept(token)
                timer.seconds += time.thread_time() - t

        return Timed()


@dataclass
class Validity:
    schemas: int = 0
    stopped: int = 0
    valid: int = 0
    length: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    compile_ms: list[float] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


# ============================================================================================ runs


def run_validity(engine: Engine, tok: Tokenizer, compiler: grammar.GrammarCompiler, family: str,
                 schemas: list[dict[str, Any]], *, max_tokens: int, temperature: float, seed: int) -> Validity:
    """Submit every schema's request at once (the engine batches them), then check each reply."""
    import jsonschema  # the reference validator (a test dependency), needed only here

    stops = _stop_ids(tok, family)
    res = Validity(schemas=len(schemas))
    handles = []
    t0 = time.perf_counter()
    for i, schema in enumerate(schemas):
        topic = TOPICS[i % len(TOPICS)]
        ids = _prompt(tok, family, f"Describe {topic} as JSON.", schema)
        t = time.perf_counter()
        mask = compiler.mask_factory(grammar.json_format(schema), stops)
        res.compile_ms.append((time.perf_counter() - t) * 1e3)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i,
                                stop_token_ids=tuple(stops), logits_mask=mask)
        handles.append(engine.submit(ids, params))
    for i, (schema, h) in enumerate(zip(schemas, handles)):
        seq = h.result().sequences[0]
        res.tokens += len(seq.tokens)
        body = seq.tokens[:-1] if seq.finish_reason == "stop" else seq.tokens
        text = tok.decode(body)
        if len(res.samples) < 3:
            res.samples.append(text)
        if seq.finish_reason == "length":
            res.length += 1
            continue
        if seq.finish_reason != "stop":
            res.errors += 1
            res.failures.append({"schema": i, "finish_reason": seq.finish_reason, "text": text[:200]})
            continue
        res.stopped += 1
        try:
            jsonschema.Draft202012Validator(schema).validate(json.loads(text))
            res.valid += 1
        except (ValueError, jsonschema.ValidationError) as e:
            res.failures.append({"schema": i, "error": str(e).splitlines()[0][:200], "text": text[:200]})
    res.seconds = time.perf_counter() - t0
    return res


LONG_SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "minItems": 200, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                     "qty": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "kind": {"enum": ["fruit", "vegetable", "bread", "dairy"]}},
    "required": ["name", "qty", "kind"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False}


def run_throughput(engine: Engine, prompts: list[list[int]], *, tokens: int, mask: Callable[[], Any] | None,
                   stops: list[int], seed: int) -> tuple[float, float, int]:
    """Submit ``prompts`` at once (one per slot) and time the decode window: from the moment the last of them
    got its first token (every prefill done) to the moment the first of them got its last (every row still
    decoding), so each step in between is one decode forward over all the rows.

    -> (tokens/s in the window, tokens per CPU second of this process in the window, tokens in the window).
    The CPU figure is the one to trust on a shared machine: the engine runs in this process, so its CPU time
    is the work done, whatever else the cores were busy with."""
    handles = [engine.submit(p, SamplingParams(max_tokens=tokens, temperature=0.7, seed=seed + i,
                                               stop_token_ids=tuple(stops) if mask else (), logits_mask=mask))
               for i, p in enumerate(prompts)]
    stamps: list[list[tuple[float, float]]] = [[] for _ in handles]  # per request: (wall, cpu) per token

    def watch(i: int) -> None:
        for out in handles[i]:
            if out.token is not None:
                stamps[i].append((time.perf_counter(), time.process_time()))

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(st) == tokens for st in stamps), [len(st) for st in stamps]
    start = max(st[0] for st in stamps)
    end = min(st[-1] for st in stamps)
    n = sum(1 for st in stamps for w, _ in st if start[0] < w <= end[0])
    return n / (end[0] - start[0]), n / (end[1] - start[1]), n


def compare_libraries(tok: Tokenizer, compiler: grammar.GrammarCompiler, schemas: list[dict[str, Any]],
                      instances: list[Any]) -> dict[str, Any]:
    """Per-token cost of the two grammar libraries that build a token mask from a JSON Schema: xgrammar (what
    `dsv32.grammar` uses) and llguidance. Each walks the canonical tokens of a valid instance of each schema
    (``json.dumps``' spacing, which both accept by default), timing the mask fill and the token accept in
    CPU time, and checking that every token is accepted and the walk ends complete. Compile times too."""
    import llguidance  # a comparison only: neither the server nor the tests need it
    import llguidance.numpy as llnp
    import numpy as np
    import xgrammar as xgr

    V = compiler.vocab_size
    ll_tok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=V, eos_token=tok.eos_id)
    out: dict[str, Any] = {}
    for lib in ("xgrammar", "llguidance"):
        fills, accepts, compiles, ok = [], [], [], True
        for schema, inst in zip(schemas, instances):
            ids = tok.encode(json.dumps(inst))
            t = time.thread_time()
            if lib == "xgrammar":
                m = xgr.GrammarMatcher(compiler._compile_uncached(json.dumps(grammar.json_format(schema))),
                                       override_stop_tokens=[tok.eos_id])
                bitmask = xgr.allocate_token_bitmask(1, V)
            else:
                m = llguidance.LLMatcher(ll_tok, llguidance.LLMatcher.grammar_from_json_schema(schema), log_level=0)
                bitmask = llnp.allocate_token_bitmask(1, V)
            compiles.append(time.thread_time() - t)
            for i in ids:
                t = time.thread_time()
                if lib == "xgrammar":
                    m.fill_next_token_bitmask(bitmask, 0)
                    bits = np.asarray(bitmask)
                else:
                    llnp.fill_next_token_bitmask(m, bitmask, 0)
                    bits = bitmask
                t2 = time.thread_time()
                allowed = bool((bits[0, i // 32] >> (i % 32)) & 1)
                accepted = m.accept_token(i) if lib == "xgrammar" else m.consume_token(i)
                accepts.append(time.thread_time() - t2)
                fills.append(t2 - t)
                ok = ok and allowed and bool(accepted)
            ok = ok and (m.is_completed() if lib == "xgrammar" else m.is_accepting())
        out[lib] = {"fill_us_median": 1e6 * statistics.median(fills), "fill_us_p99": 1e6 * sorted(fills)[
            int(0.99 * (len(fills) - 1))], "fill_us_max": 1e6 * max(fills), "accept_us_median":
            1e6 * statistics.median(accepts), "compile_ms_median": 1e3 * statistics.median(compiles),
            "compile_ms_max": 1e3 * max(compiles), "tokens": len(fills), "all_accepted": ok}
    return out


def _instance(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
    """A small valid instance of a generated schema (the comparison walks it)."""
    defs = schema.get("$defs", defs)
    if "$ref" in schema:
        return _instance(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return _instance(schema["anyOf"][-1], defs)
    kind = schema.get("type")
    if kind == "object":
        return {k: _instance(v, defs) for k, v in schema["properties"].items()}
    if kind == "array":
        if "prefixItems" in schema:
            return [_instance(s, defs) for s in schema["prefixItems"]]
        return [_instance(schema["items"], defs) for _ in range(max(1, schema.get("minItems", 0)))]
    if kind == "string":
        return {"^[A-Z][a-z]{1,10}$": "Paris", "^[0-9]{3}-[0-9]{4}$": "555-1234", "^[a-z]+(-[a-z]+)*$": "a-b",
                "^#[0-9a-f]{6}$": "#00ff00", "^v[0-9]\\.[0-9]$": "v1.2"}.get(schema.get("pattern"), "hello")
    if kind in ("integer", "number"):
        return max(schema.get("minimum", 1), 1) if "maximum" not in schema or schema["maximum"] >= 1 else 0
    if kind == "boolean":
        return True
    return None


# ============================================================================================ main


def _tiny_tokenizer() -> Tokenizer:
    """A byte-level ChatML tokenizer for the random tiny model (the smoke test)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", chat.IM_START, chat.IM_END])
    return Tokenizer(backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", name="bytes-chatml")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsv32 bench grammar", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model name, path or preset:NAME (default: %(default)s)")
    ap.add_argument("--schemas", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=160, help="validity run: tokens per reply at most")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--streams", type=int, default=16, help="overhead run: concurrent sequences (engine slots)")
    ap.add_argument("--tokens", type=int, default=96, help="overhead run: tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-validity", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--compare-libraries", action="store_true",
                    help="also time xgrammar against llguidance on the schemas' valid instances")
    ap.add_argument("--quick", action="store_true", help="8 schemas, 1 repeat, 16 tokens")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    if a.quick:
        a.schemas, a.repeats, a.tokens = 8, 1, 16
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    t = time.perf_counter()
    model = load_model(a.model).eval()
    tok = _tiny_tokenizer() if a.model.startswith("preset:") else load_tokenizer(a.model)
    family = "chatml" if tok.token_to_id(chat.IM_START) is not None else "deepseek-v3.2"
    vocab = int(getattr(model.config, "vocab_size", tok.vocab_size))
    compiler = grammar.GrammarCompiler(tok, vocab)
    t_init = time.perf_counter()
    compiler.compile(grammar.json_format({"type": "object"}))  # builds xgrammar's tokenizer tables once
    init_s = time.perf_counter() - t_init
    print(f"model {a.model} ({family}, vocab {vocab}) loaded in {time.perf_counter() - t:.1f} s; "
          f"grammar tables built in {init_s:.2f} s; {a.threads} thread(s)", flush=True)
    report: dict[str, Any] = {"model": a.model, "family": family, "threads": a.threads, "args": vars(a),
                              "grammar_init_s": init_s}
    stops = _stop_ids(tok, family)

    if not a.skip_validity:
        schemas = make_schemas(a.schemas, a.seed)
        eng = Engine(model, max_slots=a.streams, max_len=2048, max_waiting=len(schemas), num_threads=a.threads)
        try:
            v = run_validity(eng, tok, compiler, family, schemas, max_tokens=a.max_tokens,
                             temperature=a.temperature, seed=a.seed)
        finally:
            eng.shutdown()
        print(f"validity: {v.schemas} schemas, {v.stopped} stopped ({v.length} hit max_tokens={a.max_tokens}, "
              f"{v.errors} errors); {v.valid}/{v.stopped} stopped replies parse and validate "
              f"({100 * v.valid / max(v.stopped, 1):.1f} %); {v.tokens} tokens in {v.seconds:.1f} s; "
              f"compile median {statistics.median(v.compile_ms):.1f} ms, max {max(v.compile_ms):.0f} ms", flush=True)
        for f in v.failures:
            print(f"  failure: {f}", flush=True)
        for s in v.samples:
            print(f"  sample: {s[:160]!r}", flush=True)
        report["validity"] = vars(v)

    if not a.skip_overhead:
        # short prompts without the schema, the same for both modes: only the mask differs, and the decode
        # window is what is timed
        prompts = [_prompt(tok, family, f"List {TOPICS[i % len(TOPICS)]}'s details as JSON.", None)
                   for i in range(a.streams)]
        timer = MaskTimer(compiler.mask_factory(grammar.json_format(LONG_SCHEMA), stops))
        eng = Engine(model, max_slots=a.streams, max_len=1024, num_threads=a.threads, prefix_reuse=False)
        runs: dict[str, list[tuple[float, float]]] = {"plain": [], "constrained": []}
        try:
            run_throughput(eng, prompts, tokens=4, mask=timer, stops=stops, seed=a.seed)  # warm-up
            timer.seconds, timer.calls = 0.0, 0
            for r in range(a.repeats):
                for mode in ("plain", "constrained") if r % 2 == 0 else ("constrained", "plain"):
                    tps, cps, n = run_throughput(eng, prompts, tokens=a.tokens,
                                                 mask=timer if mode == "constrained" else None, stops=stops,
                                                 seed=a.seed)
                    runs[mode].append((tps, cps))
                    print(f"  round {r} {mode:<11} {tps:7.1f} tokens/s, {cps:7.1f} tokens per CPU second "
                          f"({n} tokens in the window)", flush=True)
        finally:
            eng.shutdown()
        p, c = (statistics.median(x for x, _ in runs[m]) for m in ("plain", "constrained"))
        pc, cc = (statistics.median(y for _, y in runs[m]) for m in ("plain", "constrained"))
        mask_us = 1e6 * timer.seconds / max(timer.calls, 1)
        print(f"overhead at {a.streams} streams ({a.tokens} tokens each, median of {a.repeats}): "
              f"wall: plain {p:.1f}, constrained {c:.1f} tokens/s -> {100 * (1 - c / p):+.1f} %; "
              f"CPU: plain {pc:.1f}, constrained {cc:.1f} tokens/CPU-s -> {100 * (1 - cc / pc):+.1f} % "
              f"(target <= 10 %); mask fill + accept {mask_us:.0f} us CPU per token", flush=True)
        report["overhead"] = {"streams": a.streams, "tokens": a.tokens, "runs": runs, "overhead_wall": 1 - c / p,
                              "overhead_cpu": 1 - cc / pc, "mask_us_per_token": mask_us}
    if a.compare_libraries:
        schemas = make_schemas(a.schemas, a.seed)
        instances = [_instance(sc) for sc in schemas]
        import jsonschema  # the instances are checked, so a wrong one cannot flatter either library

        for sc, inst in zip(schemas, instances):
            jsonschema.validate(inst, sc)
        cmp = compare_libraries(tok, compiler, schemas, instances)
        for lib, r in cmp.items():
            print(f"{lib:<10} fill median {r['fill_us_median']:.0f} us (p99 {r['fill_us_p99']:.0f}, max "
                  f"{r['fill_us_max']:.0f}), accept {r['accept_us_median']:.0f} us, compile median "
                  f"{r['compile_ms_median']:.1f} ms (max {r['compile_ms_max']:.0f}), {r['tokens']} tokens, "
                  f"every token accepted and complete: {r['all_accepted']}", flush=True)
        report["libraries"] = cmp
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
