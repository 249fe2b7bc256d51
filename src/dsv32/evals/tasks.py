"""`dsv32 eval tasks`: greedy accuracy and pass@k of a model on held-out items of a verifiable task.

The items are the task's *held-out* split (``dsv32.rl.tasks``: disjoint from every training item `dsv32 rl`
draws), in the model's chat format with the answer-format instruction; completions come from the engine and are
judged by the task's own checker (a "correct" verdict: the last ``<answer>`` block verifies). Reported:

- ``greedy_accuracy``: one greedy completion per item;
- with ``--samples n``: n sampled completions per item (``--temperature``, seeds a function of (seed, item,
  sample)), ``pass@k`` for k = 1, 2, 4, ... up to n (and n itself) with the unbiased estimator of Chen et al.
  (2021): per item 1 - C(n - c, k) / C(n, k) for c correct of n, averaged over items.

Example::

    dsv32 eval tasks --model runs/rl/final --task chain_sum --num 200 --samples 8 --json runs/rl/eval.json
    dsv32 eval tasks --model smollm2-135m --weights runs/rl --task chain_sum --num 200
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dsv32
from dsv32.engine import Engine, SamplingParams
from dsv32.evals.common import load_weights, pass_at_k, write_json
from dsv32.registry import add_placement_args, load_model, placement_from_args
from dsv32.rl.rollout import completion_seed
from dsv32.rl.tasks import ChatCodec, Item, Task, get_task, parse_task_config
from dsv32.tokenizer import load_tokenizer


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
    return [*ks, n]


def complete(engine: Engine, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[list[int]]:
    """One completion (token ids) per (prompt, params), all submitted before the first is awaited."""
    handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    out = []
    for i, h in enumerate(handles):
        res = h.result()
        if res.error is not None:
            raise RuntimeError(f"eval tasks: completion {i} failed in the engine: {res.error}")
        out.append(list(res.sequences[0].tokens))
    return out


def evaluate(
    model: nn.Module,
    codec: ChatCodec,
    task: Task,
    items: Sequence[Item],
    *,
    samples: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    threads: int | None = None,
    slots: int = 16,
) -> dict[str, Any]:
    """Greedy accuracy (and, with ``samples`` > 0, pass@k over that many samples) of ``model`` on ``items``."""
    prompts = [codec.prompt(it.prompt) for it in items]
    max_len = max(len(p) for p in prompts) + max_new_tokens + 1
    # every request is queued at once (``complete`` submits, then waits): room for all of them in the queue
    engine = Engine(model, max_slots=slots, max_len=max_len, num_threads=threads,
                    max_waiting=len(prompts) * max(1, samples))
    stop = tuple(codec.stop_ids)
    try:
        t0 = time.perf_counter()
        greedy = complete(engine, prompts, [SamplingParams(max_tokens=max_new_tokens, temperature=0.0,
                                                           stop_token_ids=stop)] * len(prompts))
        verdicts = [task.score(it, codec.decode(ids))[1] for it, ids in zip(items, greedy)]
        results: dict[str, Any] = {
            "greedy_accuracy": sum(v == "correct" for v in verdicts) / len(items),
            "greedy_no_answer": sum(v == "no_answer" for v in verdicts) / len(items),
            "greedy_completion_len": sum(len(c) for c in greedy) / len(items),
            "greedy_seconds": time.perf_counter() - t0,
        }
        per_item = [{"index": it.index, "answer": it.answer, "greedy": codec.decode(ids), "verdict": v}
                    for it, ids, v in zip(items, greedy, verdicts)]
        if samples:
            t0 = time.perf_counter()
            jobs = [(i, j) for i in range(len(items)) for j in range(samples)]
            params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stop,
                                     seed=completion_seed(seed, -1, i, j)) for i, j in jobs]
            sampled = complete(engine, [prompts[i] for i, _ in jobs], params)
            correct = [0] * len(items)
            for (i, _), ids in zip(jobs, sampled):
                correct[i] += task.score(items[i], codec.decode(ids))[1] == "correct"
            for k in ks_for(samples):
                results[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in correct) / len(items)
            results["sampled_seconds"] = time.perf_counter() - t0
            for row, c in zip(per_item, correct):
                row["correct_of_samples"] = c
    finally:
        engine.shutdown()
    return {"results": results, "items": per_item}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32 eval tasks", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="anything dsv32.load_model accepts")
    p.add_argument("--weights", type=Path, help="weights from a training run (a `dsv32 rl`/`train` run directory, "
                                                "a checkpoint directory or a .safetensors state dict)")
    p.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    p.add_argument("--task", required=True, help="task name (dsv32.rl.tasks)")
    p.add_argument("--task-config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="generator settings (as `dsv32 rl --task-config NAME.KEY=VALUE`), e.g. max_terms=2")
    p.add_argument("--num", type=int, default=200, help="held-out items")
    p.add_argument("--samples", type=int, default=0, help="sampled completions per item for pass@k (0: greedy only)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of --samples")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="held-out item seed and sampling seed")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--per-item", action="store_true", help="include every item's greedy completion in the JSON")
    p.add_argument("--json", type=Path, help="write the result here (it is printed too)")
    add_placement_args(p)
    return p


def cli_main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    device, dtype = placement_from_args(parser, args)
    if args.num < 1 or args.samples < 0 or args.max_new_tokens < 1 or (args.samples and args.temperature <= 0):
        raise SystemExit("dsv32 eval tasks: need --num >= 1, --samples >= 0, --max-new-tokens >= 1 and "
                         "--temperature > 0 with --samples")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, seed=args.seed, device=device, dtype=dtype)
    if args.weights:
        load_weights(model, args.weights)
    tok = load_tokenizer(args.tokenizer if args.tokenizer is not None else args.model)
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"dsv32 eval tasks: the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}; pass a --tokenizer that fits the model")
    try:
        config = parse_task_config([f"{args.task}.{e}" for e in args.task_config]).get(args.task, {})
        task = get_task(args.task, **config)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"dsv32 eval tasks: {e.args[0]}") from None
    items = task.items("heldout", args.num, seed=args.seed)
    out = evaluate(model, ChatCodec.for_tokenizer(tok), task, items, samples=args.samples,
                   temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                   threads=args.threads or None)
    settings = {
        "model": args.model, "weights": str(args.weights) if args.weights else None, "task": args.task,
        "task_config": task.config, "split": "heldout", "num": args.num, "samples": args.samples,
        "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
        "dsv32": dsv32.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": "dsv32 eval tasks " + " ".join(argv),
    }
    result = {"eval": "tasks", "settings": settings, "results": out["results"]}
    if args.per_item:
        result["items"] = out["items"]
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
