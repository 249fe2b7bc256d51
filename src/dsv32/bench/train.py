"""`dsv32 bench train`: training throughput of our model vs HF transformers' ``DeepseekV32ForCausalLM``.

Both models are built from the same config (ours: a ``ModelConfig`` preset; HF: ``config.to_hf()`` without
the ``dsv32_*`` keys, passed to ``DeepseekV32Config``), fed the same batch, and trained with the same
AdamW settings and gradient clipping in the same process with the same thread count. Steps alternate
between the two so that load from other processes hits both alike; the figure is the median step.

Compared like for like: next-token cross-entropy only (HF has no MTP module and no balance loss). Ours runs
through the real trainer step (``Trainer.step``: chunked cross-entropy, router-bias update) with
``mtp_weight=0``. Optional extra lines: ``--full`` times our full objective (MTP + sequence-wise balance
loss), ``--dense`` our model with DSA off (dense MLA, the MHA form through SDPA) to show what the sparse
path costs at this length.
MFU = ``flops_per_token`` (model FLOPs, the same formula for both) x tokens/s / the fp32 matmul rate
measured here at start-up. Also reported: the best step and the median process CPU time per step, which
on a machine shared with other jobs track the uncontended speed better than the median wall time (with
``--threads 1`` the CPU time is the step's own work).

    dsv32 bench train                       # small preset, sequence 1024, batch 1
    dsv32 bench train --quick               # tiny preset, sequence 128: a smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsv32.config import ModelConfig
from dsv32.model import Transformer
from dsv32.train.trainer import Batch, Dist, Trainer, flops_per_token, measure_matmul_flops, param_groups


def hf_model(cfg: ModelConfig, attn: str) -> torch.nn.Module:
    """HF transformers' DeepSeek-V3.2 built from our config (fp32, random init)."""
    # Lazy: transformers is an optional dependency (the `test` extra) and takes seconds to import.
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # its YaRN factor notice is about HF's own consistency check, not ours
    d = {k: v for k, v in cfg.to_hf().items() if not k.startswith("dsv32_")}
    hcfg = DeepseekV32Config(**d)
    hcfg._attn_implementation = attn
    return DeepseekV32ForCausalLM(hcfg).float().train()


def _ours_step(cfg: ModelConfig, *, full: bool, seed: int) -> Callable[[torch.Tensor], float]:
    """Our trainer's step (LM loss only unless ``full``)."""
    torch.manual_seed(seed)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    trainer = Trainer(model, opt, sched, Dist(), mtp_weight=0.3 if full else 0.0,
                      balance_alpha=1e-4 if full else 0.0, bias_update_speed=1e-3, clip=1.0)

    def step(ids: torch.Tensor) -> float:
        return trainer.step([Batch(ids)]).lm_loss

    return step


def _hf_step(cfg: ModelConfig, *, attn: str, seed: int) -> Callable[[torch.Tensor], float]:
    torch.manual_seed(seed)
    model = hf_model(cfg, attn)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=False)

    def step(ids: torch.Tensor) -> float:
        logits = model(input_ids=ids[:, :-1]).logits  # [B,S,V], HF's ordinary training path
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def run(preset: str, *, seq_len: int, batch_size: int, steps: int, warmup: int, threads: int | None,
        hf_attn: str, full: bool = False, dense: bool = False, seed: int = 0,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure and return the result dict (settings next to the numbers)."""
    import transformers  # lazy: optional (see `hf_model`)

    if threads:
        torch.set_num_threads(threads)
    cfg = ModelConfig.from_name(preset)
    peak = measure_matmul_flops(torch.device("cpu"), torch.float32, seconds=1.0)
    log(f"{preset}: seq {seq_len}, batch {batch_size}, {torch.get_num_threads()} threads, "
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=g)
               for _ in range(warmup + steps)]
    runners: dict[str, Callable[[torch.Tensor], float]] = {
        "dsv32": _ours_step(cfg, full=False, seed=seed),
        f"hf-{hf_attn}": _hf_step(cfg, attn=hf_attn, seed=seed),
    }
    if full:
        runners["dsv32-full"] = _ours_step(cfg, full=True, seed=seed)
    if dense:
        runners["dsv32-dense"] = _ours_step(cfg.replace(use_dsa=False), full=False, seed=seed)
    times: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    losses: dict[str, list[float]] = {k: [] for k in runners}
    for i, ids in enumerate(batches):
        for name, fn in runners.items():  # alternate, so background load hits every contender alike
            t, c = time.perf_counter(), time.process_time()
            losses[name].append(fn(ids))
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if i >= warmup:
                times[name].append(dt)
                cpu[name].append(dc)
            log(f"  step {i}{' (warm-up)' if i < warmup else ''} {name:<10} {dt:7.2f} s  loss {losses[name][-1]:.4f}")

    tokens = batch_size * seq_len
    results: dict[str, Any] = {}
    for name, ts in times.items():
        fpt = flops_per_token(cfg.replace(use_dsa=name != "dsv32-dense"), seq_len, mtp=name == "dsv32-full")
        med = statistics.median(ts)
        results[name] = {
            "step_s_median": med,
            "step_s_min": min(ts),
            "step_s_all": ts,
            "cpu_s_median": statistics.median(cpu[name]),
            "tokens_per_s_best": tokens / min(ts),
            "tokens_per_s": tokens / med,
            "mfu": fpt * tokens / med / peak,
            "flops_per_token": fpt,
            "first_loss": losses[name][0],
            "last_loss": losses[name][-1],
        }
    hf_name = f"hf-{hf_attn}"
    speedup = results["dsv32"]["tokens_per_s"] / results[hf_name]["tokens_per_s"]
    best = results["dsv32"]["tokens_per_s_best"] / results[hf_name]["tokens_per_s_best"]
    return {
        "bench": "train",
        "model": preset,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "seed": seed,
        "dtype": "float32",
        "index_topk": cfg.index_topk,
        "peak_flops": peak,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "results": results,
        "speedup_vs_hf": speedup,
        "speedup_vs_hf_best": best,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv32 bench train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="measured steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention implementation")
    p.add_argument("--full", action="store_true", help="also time our full objective (MTP + balance loss)")
    p.add_argument("--dense", action="store_true", help="also time our model with DSA off (dense MLA)")
    p.add_argument("--quick", action="store_true", help="tiny preset, sequence 128, 2 steps: a smoke test")
    p.add_argument("--json", type=Path, default=None, metavar="F", help="write the result here")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.seq_len, args.steps = "tiny", 128, 2
    res = run(args.preset, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
              threads=args.threads, hf_attn=args.hf_attn, full=args.full, dense=args.dense)
    print(f"\n{'':<12}{'median s':>9}{'tokens/s':>10}{'MFU':>8}{'best s':>8}{'CPU s':>8}")
    for name, r in res["results"].items():
        print(f"{name:<12}{r['step_s_median']:>9.2f}{r['tokens_per_s']:>10.1f}{100 * r['mfu']:>7.1f}%"
              f"{r['step_s_min']:>8.2f}{r['cpu_s_median']:>8.2f}")
    print(f"dsv32 / HF (median step): {res['speedup_vs_hf']:.2f}x; best step: {res['speedup_vs_hf_best']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
