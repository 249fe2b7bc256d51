"""`dsv32 agent-sft`: supervised fine-tuning on reference-solution trajectories, the step before agentic RL.

A model that never calls a tool gets reward 0 on every agentic RL rollout, so RL has nothing to follow
(docs/agents.md). Every task `dsv32 synth` writes carries a reference `solution`: Python that only calls the
environment's tools and sets `answer`. This module turns each solution into the trajectory an agent would have
produced and trains on it:

1. **Trace** (`trace_env`). The solution runs in the sandbox (`envs/runner.py`, op "trace") with every tool
   wrapped to record its calls in order: the arguments by parameter name after a trip through JSON, the tool
   run on exactly those, the result as the JSON text the agent loop's tool cell prints, or the exception's last
   line when the tool raised.
2. **Messages** (`trajectory_messages`). What the agent loop (`dsv32.agents.loop.run_agent`) builds: its system
   prompt, the task as the one user message, then per recorded call one assistant turn holding that call and
   one `tool` message with the result exactly as `EnvTools.call` returns it (`tool_content`: the kernel's
   64 KiB output cap, `Error: ...` for a raised exception), and last the `submit_result` call with the
   reference answer. Each call must pass the loop's own schema check (`call_errors`); a trajectory with one
   that does not is dropped, since the loop would have answered it with an error instead of running it.
3. **Encoding** (`encode_trajectory`). `dsv32.chat.encode_chat` with the tool schemas the loop offers
   (`rl.agentic.tool_schemas`: the env's tools and its submit tool), the model's chat family and thinking mode:
   the renderer and per-segment tokenisation the loop's `EngineBackend` uses, so the trained ids are the ids the
   model later sees and samples (a test forces a real engine onto these ids through the loop and compares). The
   loss mask is the assistant's tokens only: its turns and their closing EOS / `<|im_end|>`; system prompt,
   tool schemas, task, tool results and the template around them are 0. The final `tool` message of the submit
   call is not part of it: the loop ends there without feeding it to the model.
4. **Training** (`train`). Full fine-tuning with AdamW under the shared run loop (`train.run.RunLoop`: resume,
   checkpoints, metrics.jsonl, graceful stop), warm-up + cosine (`run.lr_at`), conversations batched by
   `train.trainer.SFTBatches`'s stateless order. A V3.2 model takes `train.trainer.Trainer`'s step (MoE balance
   and router-bias update; MTP off); a Llama-family model (SmolLM2) the same masked chunked cross-entropy in
   `masked_lm_step`, since the Trainer's step needs V3.2's MTP and routing outputs. `OUT/final` is an HF-format
   directory plus the tokenizer (`rl.cli.export_model`), which `dsv32 agent`, `dsv32 eval agent` and
   `dsv32 rl --model` load.

    dsv32 agent-sft --model smollm2-135m --envs envs/train --out runs/smol-sft --epochs 1 --lr 2e-5
    dsv32 agent-sft --model smollm2-135m --envs envs/train --out /tmp/x --count   # trajectories and tokens only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv32 import chat
from dsv32.agents.cli import detect_family
from dsv32.agents.envs.base import SUBMIT_TOOL, find_environments, read_tasks
from dsv32.agents.envs.session import run_jobs
from dsv32.agents.loop import SYSTEM_PROMPT, call_errors
from dsv32.agents.sandbox import OUTPUT_CAP
from dsv32.llama import LlamaModel
from dsv32.registry import load_model
from dsv32.rl.agentic import tool_schemas
from dsv32.rl.cli import export_model
from dsv32.tokenizer import SMALL_NAME, load_tokenizer
from dsv32.train.losses import chunked_cross_entropy
from dsv32.train.run import RunLoop, lr_at
from dsv32.train.trainer import Batch, SFTBatches, StepStats, Trainer, param_groups

# ------------------------------------------------------------------------------------------- trajectories


def trace_env(env_dir: str | Path, tasks: Sequence[dict[str, Any]] | None = None, *, unsafe: bool = False,
              job_timeout: float = 20.0) -> list[dict[str, Any]]:
    """Run the reference solution of each task (default: every task of the environment) in ONE sandboxed
    process with its tool calls recorded; one ``{"id", "answer", "error", "calls": [{"name", "arguments", "ok",
    "result"}]}`` per task, in order (``{"fatal": why}`` when the runner never answered)."""
    env_dir = Path(env_dir)
    tasks = list(read_tasks(env_dir) if tasks is None else tasks)
    jobs = [{"op": "trace", "id": t["id"], "solution": t["solution"]} for t in tasks]
    return run_jobs(env_dir, jobs, job_timeout=job_timeout, unsafe=unsafe) if jobs else []


def tool_content(record: dict[str, Any]) -> str:
    """A recorded call's result as the agent loop's `EnvTools.call` hands it to the model: the printed JSON
    under the notebook kernel's output cap (`_kernel._read_capped`), stripped; a raised exception as
    ``Error: <its last line>``."""
    if not record.get("ok"):
        return f"Error: {record.get('result')}"
    data = (str(record["result"]) + "\n").encode("utf-8")
    if len(data) <= OUTPUT_CAP:
        return str(record["result"]).strip()
    text = data[:OUTPUT_CAP].decode("utf-8", errors="replace")
    return (text + f"\n[... output truncated: {len(data) - OUTPUT_CAP} more bytes]").strip()


def trajectory_messages(task: dict[str, Any], calls: Sequence[dict[str, Any]], *, system: str | None = SYSTEM_PROMPT,
                        submit_name: str = SUBMIT_TOOL["function"]["name"]) -> list[dict[str, Any]]:
    """The conversation the agent loop would hold had the model made the solution's calls one per turn and then
    submitted the reference answer (module docstring, step 2)."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": task["prompt"]})

    def turn(k: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return {"role": "assistant", "content": "",
                "tool_calls": [{"id": f"call_{k}", "type": "function",
                                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]}

    for k, c in enumerate(calls):
        msgs.append(turn(k, c["name"], c["arguments"]))
        msgs.append({"role": "tool", "tool_call_id": f"call_{k}", "content": tool_content(c)})
    msgs.append(turn(len(calls), submit_name, {"answer": task["answer"]}))
    return msgs


def encode_trajectory(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]], tokenizer: Any, *,
                      family: str, thinking: bool) -> tuple[list[int], list[int]]:
    """Ids and loss mask (1 on the assistant's tokens) of a trajectory, rendered and tokenised as the agent
    loop's `EngineBackend` does (`chat.render_chat` segments, each tokenised on its own). The sequence ends
    with the last assistant token, as the loop's trajectory does: what a template renders after it (ChatML's
    newline after `<|im_end|>`) is never fed to the model."""
    ids, mask = chat.encode_chat(messages, tools=list(tools), thinking=thinking, family=family, tokenizer=tokenizer)
    end = max((i + 1 for i, m in enumerate(mask) if m), default=len(ids))
    return ids[:end], mask[:end]


@dataclass
class Example:
    """One reference trajectory, encoded."""

    task_id: str
    env: str
    category: str
    messages: list[dict[str, Any]]
    calls: int
    ids: list[int]
    mask: list[int]

    def summary(self) -> dict[str, Any]:
        return {"task": self.task_id, "env": self.env, "category": self.category, "tool_calls": self.calls,
                "tokens": len(self.ids), "assistant_tokens": sum(self.mask),
                "prompt_tokens": self.mask.index(1) if 1 in self.mask else len(self.mask), "messages": self.messages}


def build_examples(root: str | Path, tokenizer: Any, *, family: str, thinking: bool,
                   system: str | None = SYSTEM_PROMPT, max_len: int | None = None, unsafe: bool = False,
                   log=print) -> tuple[list[Example], list[tuple[str, str]]]:
    """Every task of the environments at or under ``root`` as an encoded reference trajectory. Returns the
    examples and the dropped tasks with why (a solution that failed here, a call the loop would refuse, an
    answer other than the reference, more than ``max_len`` tokens)."""
    examples: list[Example] = []
    dropped: list[tuple[str, str]] = []
    for env in find_environments(Path(root)):
        tasks = read_tasks(env)
        tools = tool_schemas(env)
        for task, tr in zip(tasks, trace_env(env, tasks, unsafe=unsafe)):
            why = tr.get("fatal") or tr.get("error")
            calls = tr.get("calls") or []
            if not why:
                bad = [(c["name"], errs) for c in calls
                       if (errs := call_errors(tools, {"name": c["name"], "arguments": c["arguments"]}))]
                if bad:
                    why = f"the agent loop would refuse call {bad[0][0]}: {'; '.join(bad[0][1])}"
            if not why and task.get("answer") is None:
                why = "the task has no reference answer"
            if why:
                dropped.append((task["id"], str(why)[-300:]))
                continue
            msgs = trajectory_messages(task, calls, system=system)
            ids, mask = encode_trajectory(msgs, tools, tokenizer, family=family, thinking=thinking)
            if max_len is not None and len(ids) > max_len:
                dropped.append((task["id"], f"{len(ids)} tokens, more than --max-len {max_len}"))
                continue
            examples.append(Example(task["id"], env.name, task.get("category", env.name.split("-")[0]), msgs,
                                    len(calls), ids, mask))
    log(f"{len(examples)} trajectories, {len(dropped)} dropped")
    return examples, dropped


def token_stats(examples: Sequence[Example]) -> dict[str, Any]:
    """Tokens per trajectory (all, the assistant's, the first prompt's) and tool calls, overall and by category."""
    def stats(xs: Sequence[int]) -> dict[str, float]:
        if not xs:
            return {}
        return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "mean": sum(xs) / len(xs)}

    cats = sorted({e.category for e in examples})
    return {"trajectories": len(examples), "tokens": stats([len(e.ids) for e in examples]),
            "assistant_tokens": stats([sum(e.mask) for e in examples]),
            "tool_calls": stats([e.calls for e in examples]),
            "total_tokens": sum(len(e.ids) for e in examples),
            "by_category": {c: {"trajectories": sum(e.category == c for e in examples),
                                "tokens": stats([len(e.ids) for e in examples if e.category == c]),
                                "tool_calls": stats([e.calls for e in examples if e.category == c])}
                            for c in cats}}


# ------------------------------------------------------------------------------------------- training


class TrajectoryBatches(SFTBatches):
    """`SFTBatches`' stateless batching (seeded permutation per epoch, padded micro-batches, label t = token t+1
    masked by the assistant mask) over already encoded trajectories, in any chat family."""

    def __init__(self, rows: Sequence[tuple[list[int], list[int]]], *, pad_id: int, seed: int, batch_size: int) -> None:
        self.rows = [(list(ids), list(mask)) for ids, mask in rows if len(ids) >= 2 and any(mask[1:])]
        if not self.rows:
            raise ValueError("no trajectory with assistant tokens")
        self.pad_id = pad_id
        self.vocab_size = max(max(ids) for ids, _ in self.rows) + 1
        self.seed, self.batch_size = seed, batch_size
        self.seq_len = max(len(ids) for ids, _ in self.rows) - 1
        self._perms: dict[int, Any] = {}


def masked_lm_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, batch: Batch, *,
                   clip: float = 1.0) -> StepStats:
    """One optimiser step of masked next-token cross-entropy (mean over the masked labels) for any model that
    returns hidden states and has a ``head_weight`` (the Llama family here)."""
    model.train()
    ids = batch.ids
    mask = batch.loss_mask if batch.loss_mask is not None else torch.ones_like(ids[:, 1:], dtype=torch.bool)
    out = model(ids[:, :-1], compute_logits=False, return_hidden=True)
    n = mask.sum().clamp_min(1)
    lm = chunked_cross_entropy(out.hidden, model.head_weight, ids[:, 1:], mask, reduction="sum")
    (lm / n).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0
            else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    loss = float(lm.detach()) / float(n)
    tokens = int(batch.valid.sum()) if batch.valid is not None else ids[:, :-1].numel()
    return StepStats(loss=loss, lm_loss=loss, mtp_loss=0.0, balance_loss=0.0, grad_norm=float(norm), tokens=tokens)


@torch.no_grad()
def masked_loss(model: nn.Module, rows: Sequence[tuple[list[int], list[int]]]) -> float:
    """Mean cross-entropy over the assistant tokens of ``rows`` (one forward per row; eval mode)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for ids, mask in rows:
        t = torch.tensor([ids])
        m = torch.tensor([mask[1:]], dtype=torch.bool)
        out = model(t[:, :-1], compute_logits=False, return_hidden=True)
        total += float(chunked_cross_entropy(out.hidden, model.head_weight, t[:, 1:], m, reduction="sum"))
        n += int(m.sum())
    model.train(was)
    return total / max(n, 1)


def train(model: nn.Module, rows: Sequence[tuple[list[int], list[int]]], out: Path, *, pad_id: int,
          max_steps: int, batch_size: int = 1, lr: float = 1e-5, min_lr: float | None = None, warmup: int = 0,
          weight_decay: float = 0.0, clip: float = 1.0, seed: int = 0, save_every: int = 0,
          resume: bool = False, progress: bool = True, extra_state: dict[str, Any] | None = None) -> Any:
    """Fine-tune ``model`` in place on the encoded trajectories ``rows`` under the shared run loop (module
    docstring, step 4). Returns the loop's `RunResult`."""
    batches = TrajectoryBatches(rows, pad_id=pad_id, seed=seed, batch_size=batch_size)
    if batches.vocab_size > model.config.vocab_size:
        raise ValueError(f"the trajectories use {batches.vocab_size} token ids but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    floor = lr / 10 if min_lr is None else min_lr
    with RunLoop(out, name="dsv32 agent-sft", max_steps=max_steps, save_every=save_every, keep=1, resume=resume,
                 progress=progress) as loop:
        parts = loop.resume_parts
        if parts is not None:
            model.load_state_dict(parts["model"])
            del parts["model"]
        del parts
        model.train()
        opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=False)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: lr_at(i, lr=lr, min_lr=floor, warmup=warmup, max_steps=max_steps) / lr)
        llama = isinstance(model, LlamaModel)
        trainer = None if llama else Trainer(model, opt, sched, loop.d, mtp_weight=0.0, clip=clip)

        def step(i: int) -> dict[str, Any]:
            t0 = time.perf_counter()
            batch = batches.get(i, 0, 1)
            lr_now = opt.param_groups[0]["lr"]
            st = (masked_lm_step(model, opt, sched, batch, clip=clip) if trainer is None
                  else trainer.step([batch]))
            return {"loss": st.lm_loss, "balance_loss": st.balance_loss, "lr": lr_now, "grad_norm": st.grad_norm,
                    "tokens": st.tokens, "trained_tokens": int(batch.loss_mask.sum()),
                    "epoch": (i + 1) * batch_size / len(batches.rows), "seconds": time.perf_counter() - t0}

        def state() -> dict[str, Any]:
            return {"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "trainer": {"scheduler": sched.state_dict(), **(extra_state or {})}}

        def load(parts: dict[str, Any]) -> None:
            opt.load_state_dict(parts["optimizer"])
            sched.load_state_dict(parts["trainer"]["scheduler"])

        result = loop.run(step, state=state, load=load,
                          postfix=lambda r: {"loss": f"{r['loss']:.4f}", "s": f"{r['seconds']:.1f}"})
    model.eval()
    return result


# ------------------------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32 agent-sft", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="HF dir, .gguf, shipped name (smollm2-135m) or preset:NAME")
    p.add_argument("--tokenizer", help="default: the model's; for preset:NAME the small preset's BPE")
    p.add_argument("--envs", type=Path, required=True, help="environments written by `dsv32 synth` (at or under)")
    p.add_argument("--out", type=Path, required=True,
                   help="run dir: trajectories.jsonl, data.json, metrics.jsonl, ckpt/, final/ (HF format + tokenizer)")
    p.add_argument("--thinking", choices=["auto", "on", "off"], default="auto",
                   help="render as the loop will run (auto: on for V3.2-format models, as `dsv32 agent`)")
    p.add_argument("--system", help="system prompt (default: the agent loop's; '' for none)")
    p.add_argument("--max-len", type=int, default=2048, help="drop trajectories longer than this (tokens)")
    p.add_argument("--count", action="store_true", help="only build the trajectories and report their tokens")
    p.add_argument("--dense", action="store_true", help="load the model with DSA off (an untrained indexer)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the trajectories (sets --max-steps)")
    p.add_argument("--max-steps", type=int, help="optimiser steps (default: from --epochs)")
    p.add_argument("--batch-size", type=int, default=1, help="trajectories per step (padded to the longest)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float, help="cosine floor (default lr / 10)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0, help="data order (and a preset's initial weights)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--unsafe", action="store_true", help="run the solutions WITHOUT the sandbox")
    p.add_argument("--no-progress", action="store_true")
    return p


def cli_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    tok = load_tokenizer(args.tokenizer or (SMALL_NAME if args.model.startswith("preset:") else args.model))
    family = detect_family(tok)
    thinking = family == "deepseek-v3.2" if args.thinking == "auto" else args.thinking == "on"
    if thinking and family == "chatml":
        raise SystemExit("dsv32 agent-sft: ChatML models have no thinking mode")
    system = SYSTEM_PROMPT if args.system is None else (args.system or None)
    t0 = time.perf_counter()
    examples, dropped = build_examples(args.envs, tok, family=family, thinking=thinking, system=system,
                                       max_len=args.max_len, unsafe=args.unsafe, log=log)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stats = token_stats(examples)
    data = {"envs": str(args.envs), "tokenizer": tok.name, "family": family, "thinking": thinking,
            "max_len": args.max_len, "seconds": time.perf_counter() - t0, **stats, "dropped": dropped}
    (out / "data.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "trajectories.jsonl").write_text("".join(json.dumps(e.summary(), ensure_ascii=False) + "\n"
                                                    for e in examples))
    if stats["trajectories"]:
        t = stats["tokens"]
        log(f"tokens per trajectory: min {t['min']}, median {t['median']}, max {t['max']} (family {family}, "
            f"thinking {'on' if thinking else 'off'}); {stats['total_tokens']} in all; "
            f"assistant tokens median {stats['assistant_tokens']['median']}")
    if args.count:
        return 0
    if not examples:
        raise SystemExit(f"dsv32 agent-sft: {args.envs}: no trajectory to train on")
    model = load_model(args.model, seed=args.seed, dsa=False if args.dense else None)
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"dsv32 agent-sft: the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}; pass a --tokenizer that fits the model")
    steps = args.max_steps or max(1, math.ceil(args.epochs * len(examples) / args.batch_size))
    log(f"agent-sft: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(examples)} "
        f"trajectories, {steps} steps of {args.batch_size}, lr {args.lr}")
    rows = [(e.ids, e.mask) for e in examples]
    result = train(model, rows, out, pad_id=tok.pad_id if tok.pad_id is not None else 0, max_steps=steps,
                   batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
                   weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, save_every=args.save_every,
                   resume=args.resume, progress=not args.no_progress,
                   extra_state={"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}})
    if result.stopped:
        return 0
    log(f"exported {export_model(model, out / 'final', tok)}")
    return 0
