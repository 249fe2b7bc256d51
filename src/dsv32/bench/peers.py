"""`dsv32 bench peers`: whole-model long-context prefill and decode, ours vs a peer that runs V3.2 with DSA.

Peers (``--peer``):
- ``hf``: transformers' ``DeepseekV32ForCausalLM``. On CPU it runs DSA as dense attention under a top-k mask,
  so its cost and memory grow with T². Config: the ``small`` preset cut to 4 layers, no MTP (hidden 256,
  index_topk 256).
- ``llama.cpp``: llama-cpp-python 0.3.36 (arch ``deepseek32``) on a GGUF converted from the same checkpoint
  (``bench/llamacpp_v32.py``; f32 weights, its default f16 KV cache). Config: 2 layers, hidden 128, kv_lora 512,
  rope 64, indexer 4 x 64, index_topk 64, vocab 102,400 (the converter's vocab workaround).
Ours gathers the selected latent rows (``ops``), so attention work per query stays near k. Both systems load one
HF-format checkpoint with seeded random weights, fp32, the same thread count.

Each (system, length) point runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its
own. Prefill: one sequence of T tokens, logits of the last position only (HF: ``logits_to_keep=1``), no cache.
Decode: after a cached prefill of T tokens, ``--decode-tokens`` greedy steps of one token; ms per token is the
median step. HF is skipped beyond ``--hf-max`` (its masked attention needs O(T²) memory; at 32K it does not fit
in 24 GB, as measured when this benchmark was specified).

    dsv32 bench peers                                   # T = 2K, 8K, 16K (both), 32K, 64K (ours)
    dsv32 bench peers --lengths 2048 --hf-max 2048      # a quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dsv32.bench.llamacpp_v32 import b16_config, convert_v32
from dsv32.bench.train import hf_model
from dsv32.config import ModelConfig
from dsv32.registry import load_model

LENGTHS = [2048, 8192, 16384, 32768, 65536]


def peer_config(preset: str = "small", layers: int = 4) -> ModelConfig:
    """The benchmark config: a preset with ``layers`` main layers and no MTP module."""
    cfg = ModelConfig.from_name(preset)
    cfg.num_hidden_layers = layers
    cfg.num_nextn_predict_layers = 0
    return cfg


def write_checkpoint(cfg: ModelConfig, out: Path, seed: int = 0) -> Path:
    """HF's model with seeded random weights, written by ``save_pretrained``; both systems load this."""
    torch.manual_seed(seed)
    hf_model(cfg, "sdpa").save_pretrained(out)
    conf = json.loads((out / "config.json").read_text())  # keep our own switches (dsv32_*; HF ignores them)
    conf.update({k: v for k, v in cfg.to_hf().items() if k.startswith("dsv32_")})
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    return out


def _llama_point(ckpt: Path, phase: str, T: int, decode_tokens: int, threads: int, seed: int) -> dict[str, Any]:
    """llama.cpp on ``ckpt/model.gguf``: prefill of T tokens (last logits), or T then one token per step."""
    from llama_cpp import Llama  # lazy: llama-cpp-python is optional, installed only for this peer

    llm = Llama(model_path=str(ckpt / "model.gguf"), n_ctx=T + decode_tokens + 16, n_batch=512, n_ubatch=512,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    res: dict[str, Any] = {"system": "llama.cpp", "phase": phase, "T": T, "model_rss_gb": _rss_gb()}
    ids = torch.randint(2, 102400, (T + decode_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    t = time.perf_counter()
    llm.eval(ids[:T])
    dt = time.perf_counter() - t
    if phase == "prefill":
        res.update(seconds=dt, tokens_per_s=T / dt)
    else:
        res["prefill_seconds"] = dt
        steps = []
        for i in range(decode_tokens):
            t = time.perf_counter()
            llm.eval([ids[T + i]])
            steps.append(time.perf_counter() - t)
        res.update(ms_per_token=1e3 * statistics.median(steps), steps_ms=[round(1e3 * x, 1) for x in steps])
    res["peak_rss_gb"] = _rss_gb()
    llm.close()
    return res


def load(system: str, ckpt: Path) -> torch.nn.Module:
    """Our Transformer (``dsv32.load_model``) or HF's DeepseekV32ForCausalLM from the same checkpoint."""
    if system == "dsv32":
        return load_model(ckpt).eval()
    # Lazy: transformers is an optional dependency (the `test` extra) and takes seconds to import.
    from transformers import DeepseekV32ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    return DeepseekV32ForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=torch.float32).eval()


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def one_point(system: str, phase: str, T: int, decode_tokens: int, ckpt: Path, seed: int = 0) -> dict[str, Any]:
    """Measure one point in this process (run it in a fresh one: the peak RSS is the process's)."""
    if system == "llama.cpp":
        return _llama_point(ckpt, phase, T, decode_tokens, torch.get_num_threads(), seed)
    model = load(system, ckpt)
    cfg = model.config
    base = _rss_gb()
    ids = torch.randint(2, cfg.vocab_size, (1, T + decode_tokens), generator=torch.Generator().manual_seed(seed))
    res: dict[str, Any] = {"system": system, "phase": phase, "T": T, "model_rss_gb": base}
    with torch.inference_mode():
        if phase == "prefill":
            t = time.perf_counter()
            if system == "dsv32":
                model.forward(ids[:, :T], last_only=True)
            else:
                model(input_ids=ids[:, :T], logits_to_keep=1, use_cache=False)
            dt = time.perf_counter() - t
            res.update(seconds=dt, tokens_per_s=T / dt)
        else:
            steps = []
            if system == "dsv32":
                cache = model.new_cache(1, T + decode_tokens)
                t = time.perf_counter()
                logits = model.forward(ids[:, :T], cache=cache, last_only=True)
                res["prefill_seconds"] = time.perf_counter() - t
                for _ in range(decode_tokens):
                    nxt = logits[:, -1:].argmax(-1)
                    t = time.perf_counter()
                    logits = model.forward(nxt, cache=cache)
                    steps.append(time.perf_counter() - t)
            else:
                t = time.perf_counter()
                out = model(input_ids=ids[:, :T], use_cache=True, logits_to_keep=1)
                res["prefill_seconds"] = time.perf_counter() - t
                pkv, logits = out.past_key_values, out.logits
                for _ in range(decode_tokens):
                    nxt = logits[:, -1:].argmax(-1)
                    t = time.perf_counter()
                    out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
                    steps.append(time.perf_counter() - t)
                    pkv, logits = out.past_key_values, out.logits
            res.update(ms_per_token=1e3 * statistics.median(steps), steps_ms=[round(1e3 * s, 1) for s in steps])
    res["peak_rss_gb"] = _rss_gb()
    return res


def _spawn(system: str, phase: str, T: int, decode_tokens: int, threads: int, timeout: float,
           ckpt: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dsv32.bench.peers", "--one", system, phase, str(T), str(decode_tokens),
           "--threads", str(threads), "--checkpoint", str(ckpt)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"system": system, "phase": phase, "T": T, "error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-1:] or [f"exit {p.returncode}"]
        killed = " (killed: out of memory?)" if p.returncode in (-9, 137) else ""
        return {"system": system, "phase": phase, "T": T, "error": tail[0] + killed}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsv32 bench peers", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    ap.add_argument("--peer", choices=["hf", "llama.cpp"], default="hf")
    ap.add_argument("--preset", default="small", help="HF peer: config preset (cut to --layers layers, no MTP)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hf-max", type=int, default=16384, help="longest T for the peer (HF's memory grows with T^2)")
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per point")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--one", nargs=4, metavar=("SYSTEM", "PHASE", "T", "DECODE"), help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="an HF-format V3.2 checkpoint to use (default: the small preset cut to 4 layers, random)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        system, phase, T, dec = args.one
        print(json.dumps(one_point(system, phase, int(T), int(dec), args.checkpoint)))
        return 0
    tmp = None
    if args.checkpoint is None:
        tmp = tempfile.TemporaryDirectory(prefix="dsv32-peers-")
        cfg0 = peer_config(args.preset, args.layers) if args.peer == "hf" else b16_config()
        args.checkpoint = write_checkpoint(cfg0, Path(tmp.name))
    if args.peer == "llama.cpp" and not (args.checkpoint / "model.gguf").is_file():

        convert_v32(args.checkpoint, args.checkpoint / "model.gguf")
    cfg = ModelConfig.from_hf(args.checkpoint)
    what = args.checkpoint if tmp is None else (f"{args.preset} preset" if args.peer == "hf" else "B1.6 config")
    print(f"dsv32 bench peers: {what}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"index_topk {cfg.index_topk}, fp32, {args.threads} threads, peer {args.peer}", file=sys.stderr)
    points = []
    for T in args.lengths:
        for phase in ("prefill", "decode"):
            for system in ("dsv32", args.peer):
                if system != "dsv32" and T > args.hf_max:
                    continue
                r = _spawn(system, phase, T, args.decode_tokens, args.threads, args.timeout, args.checkpoint)
                points.append(r)
                print(f"  {json.dumps(r)}", file=sys.stderr)
    peer = "HF" if args.peer == "hf" else "llama.cpp"
    print(f"\n{'T':>7} {'phase':<8}{'dsv32':>14}{peer:>14}{'ratio':>8}{'dsv32 GB':>10}{peer + ' GB':>14}"
          f"{'mem ratio':>10}")
    for T in args.lengths:
        for phase in ("prefill", "decode"):
            ours = next((p for p in points if p["system"] == "dsv32" and p["phase"] == phase and p["T"] == T), {})
            hf = next((p for p in points if p["system"] == args.peer and p["phase"] == phase and p["T"] == T), {})
            key, unit = ("tokens_per_s", "tok/s") if phase == "prefill" else ("ms_per_token", "ms/tok")

            def fmt(p: dict[str, Any], key: str = key, unit: str = unit) -> str:
                return f"{p[key]:.1f} {unit}" if key in p else ("failed" if "error" in p else "-")

            ratio = ""
            if key in ours and key in hf:
                r = ours[key] / hf[key] if phase == "prefill" else hf[key] / ours[key]
                ratio = f"{r:.1f}x"
            mem = f"{hf['peak_rss_gb'] / ours['peak_rss_gb']:.1f}x" if "peak_rss_gb" in hf and "peak_rss_gb" in ours \
                else ""
            gb_ours, gb_peer = ours.get("peak_rss_gb", float("nan")), hf.get("peak_rss_gb", float("nan"))
            print(f"{T:>7} {phase:<8}{fmt(ours):>14}{fmt(hf):>14}{ratio:>8}{gb_ours:>10.2f}{gb_peer:>14.2f}{mem:>10}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__},
            "config": {k: v for k, v in cfg.to_hf().items() if not isinstance(v, dict)},
            "points": points,
        }, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
