"""`dsv32 bench weights`: speed and accuracy cost of the CPU weight formats of ``dsv32.quant``.

Three measurements, each side by side in one process with the formats interleaved (fp32, packed, fp16, int8,
fp32, ...), so every format sees the same background load; every figure is a median over ``--runs`` rounds:

- ``stream``: a few-row projection (``--rows`` rows x a 4096 -> 8192 fp32 weight, 128 MB) through each format;
  reported as fp32-equivalent weight-streaming rate (128 MB / time), next to a 256 MB copy's read + write rate.
- ``accuracy``: SmolLM2-135M (dequantised fp32 from the shipped GGUF) on windows of held-out text (the Python
  documentation, the same source ``dsv32 bench serve`` takes its prompts from, read past those prompts):
  perplexity per format, and greedy agreement with fp32 (share of generated tokens equal to fp32's before the
  first difference, and requests whose every token agrees).
- ``decode``: single-stream greedy decode through the engine (``bench serve``'s ``run_engine``): new tokens / (submit
  -> last token), as ``bench serve`` reports it at concurrency 1, and the time per output token.

Every format shares the fp32 parameters of one loaded model (``PackedLinear`` keeps ``weight``); only the
linears (not the tied embedding / output head) are packed.

    dsv32 bench weights --json weights.json
    dsv32 bench weights --only stream --rows 1 8
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.bench.serve import real_prompts, run_engine
from dsv32.quant import WEIGHT_FORMATS, PackedLinear, pack_linears


def _interleaved(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds of each function, called in turn (a, b, c, a, b, c, ...) after one warm-up round."""
    for fn in fns.values():
        fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def stream(rows: int, runs: int) -> dict[str, float]:
    """fp32-equivalent GB/s of a ``rows``-row projection per format, and the copy rate (GB/s, read + write)."""
    torch.manual_seed(0)
    lin = nn.Linear(4096, 8192, bias=False)
    x = torch.randn(rows, 4096)
    mods: dict[str, nn.Module] = {"fp32": lin, **{f: PackedLinear(lin, f) for f in WEIGHT_FORMATS[1:]}}
    src = torch.rand(32 << 20)
    dst = torch.empty_like(src)
    fns: dict[str, Callable[[], object]] = {f: (lambda m=m: m(x)) for f, m in mods.items()}
    fns["copy"] = lambda: dst.copy_(src)
    with torch.inference_mode():
        t = _interleaved(fns, runs)
    out = {f: lin.weight.numel() * 4 / t[f] / 1e9 for f in mods}
    out["copy"] = 2 * src.numel() * 4 / t["copy"] / 1e9
    return out


def _shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the original tensors (no weight copy)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


@torch.inference_mode()
def perplexity(model: nn.Module, windows: list[list[int]]) -> float:
    """exp(mean next-token NLL) over the windows (each predicts its tokens 1..n-1)."""
    nll, n = 0.0, 0
    for w in windows:
        ids = torch.tensor([w])
        logits = model(ids)  # [1,S,V] fp32
        nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, int]:
    """(share of ``ref``'s tokens matched before each request's first difference, requests fully equal)."""
    prefix = 0
    for a, b in zip(ref, got):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += k
    return prefix / sum(len(a) for a in ref), sum(a == b for a, b in zip(ref, got))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsv32 bench weights", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a name or path for dsv32.load_model (a Llama GGUF)")
    ap.add_argument("--only", choices=["stream", "accuracy", "decode"], nargs="+",
                    default=["stream", "accuracy", "decode"])
    ap.add_argument("--formats", nargs="+", choices=WEIGHT_FORMATS, default=list(WEIGHT_FORMATS))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="activation rows of the stream test")
    ap.add_argument("--runs", type=int, default=7, help="interleaved rounds per median")
    ap.add_argument("--ppl-windows", type=int, default=8, help="held-out windows for perplexity")
    ap.add_argument("--ppl-len", type=int, default=512, help="tokens per perplexity window")
    ap.add_argument("--prompts", type=int, default=8, help="greedy requests for agreement")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--decode-runs", type=int, default=5, help="interleaved single-stream decode rounds")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res: dict = {"settings": {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "machine": platform.processor() or platform.machine(),
                              "date": time.strftime("%Y-%m-%d %H:%M:%S")}}
    if "stream" in args.only:
        res["stream_gb_per_s"] = {}
        for r in args.rows:
            s = stream(r, args.runs)
            res["stream_gb_per_s"][r] = s
            print(f"stream, {r} rows: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items()) + " GB/s (fp32-equiv)")
    if "accuracy" in args.only or "decode" in args.only:
        from dsv32.registry import load_model  # deliberately lazy: the stream test needs no model or tokenizer
        from dsv32.tokenizer import load_tokenizer

        base = load_model(args.model).eval()
        tok = load_tokenizer(args.model)
        models = {}
        for f in args.formats:
            m = _shared_copy(base)
            n = pack_linears(m, f)
            models[f] = m
            print(f"{f}: {n} linears packed", file=sys.stderr)
        prompts = real_prompts(tok, args.prompts, args.prompt_len)
        if "accuracy" in args.only:
            skip = args.prompts * args.prompt_len
            windows = real_prompts(tok, args.ppl_windows, args.ppl_len, skip=skip)
            res["ppl"] = {f: perplexity(m, windows) for f, m in models.items()}
            with torch.no_grad():
                toks = {f: [t.tokens for t in run_engine(m, prompts, args.new_tokens, 1)] for f, m in models.items()}
            res["greedy_agreement"] = {}
            for f in models:
                share, full = agreement(toks[args.formats[0]], toks[f])
                res["greedy_agreement"][f] = {"prefix_share": share, "requests_equal": full, "requests": len(prompts)}
                print(f"{f}: ppl {res['ppl'][f]:.3f}, greedy agreement with {args.formats[0]}: {share:.1%} of tokens "
                      f"before the first difference, {full}/{len(prompts)} requests equal")
        if "decode" in args.only:  # what `bench serve` reports at concurrency 1: new tokens / (submit -> last)
            tps: dict[str, list[float]] = {f: [] for f in models}
            tpot: dict[str, list[float]] = {f: [] for f in models}
            with torch.no_grad():
                for _ in range(args.decode_runs):
                    for f, m in models.items():
                        (t,) = run_engine(m, prompts[:1], args.new_tokens, 1)
                        tps[f].append(len(t.tokens) / (t.last - t.submitted))
                        tpot[f].append(t.tpot)
            res["decode_tokens_per_s"] = {f: statistics.median(v) for f, v in tps.items()}
            res["decode_tpot_ms"] = {f: 1e3 * statistics.median(v) for f, v in tpot.items()}
            print("single-stream decode: " + ", ".join(
                f"{f} {res['decode_tokens_per_s'][f]:.1f} tokens/s (TPOT {res['decode_tpot_ms'][f]:.1f} ms)"
                for f in models))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
