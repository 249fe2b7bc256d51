"""`dsv32 bench rl-gain`: a measured RL gain on the V3.2 architecture, end to end on CPU.

A small DSA + MoE ``Transformer`` (``model_config``) learns the answer format by SFT, then ``dsv32 rl`` trains
it with GRPO on a verifiable arithmetic task; greedy accuracy on held-out items is measured before SFT (random
weights), at the SFT plateau and after RL.

The task (``--task``, through ``dsv32.rl.tasks``, held-out questions hash-disjoint from training ones):
``addition`` (the default) is reasoning-gym's ``basic_arithmetic`` with ``+`` only, ``--terms`` terms of 1 to
``--digits`` digits (``Calculate 47 + 8.``); ``chain_sum`` mixes ``+`` and ``-`` (``4 + 1 - 7 =``). With two
terms of up to two digits there are about 10,000 questions, so 200 distinct held-out ones exist and no stage
can learn the answers as a table; ``--digit-group 1`` gives every digit its own token id.

Where RL gets room: labels are scarce, checking is cheap. SFT sees a small fixed set of ``--sft-examples``
labelled training items (question -> ``<answer>N</answer>``) and runs until the validation accuracy stops
rising. RL then sees only questions (a pool of ``--rl-pool`` training items, no labels) and the verifier's
reward. Validation items are distinct training-split questions that SFT never saw labelled (they pick the SFT
checkpoint and draw the curves); the table is measured on distinct held-out questions (seed 0), which no stage
ever sees.

Stages (``--stage``; ``all`` runs them in order, each skipped when its output exists):

1. ``data``: the SFT items, a byte-level BPE (``tokenizer.train_bpe``, 512 ids) trained on their chats.
2. ``sft``: ``Trainer.step`` on the chats (loss on the assistant's tokens only), greedy validation every
   ``--eval-every`` steps; the best checkpoint -> ``OUT/sft``; the curve -> ``OUT/sft_curve.jsonl``.
3. ``rl``: ``dsv32 rl --model OUT/sft`` (the command is logged to ``OUT/rl_command.txt``).
4. ``report``: test accuracy of base / SFT / RL -> ``OUT/table.md``, ``OUT/results.json``, ``OUT/curves.png``,
   and the RL step time split into rollout / reference / train.

    dsv32 bench rl-gain --out runs/rlgain                       # the defaults are the run in docs/rl.md
    dsv32 bench rl-gain --out runs/rlgain --stage ablation      # after sft: the four-measure ablation
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dsv32.chat import encode_chat, render_chat_text
from dsv32.checkpoint import save_model
from dsv32.config import ModelConfig
from dsv32.evals.tasks import evaluate
from dsv32.model import Transformer
from dsv32.registry import load_model
from dsv32.rl import cli as rl_cli
from dsv32.rl.tasks import ChatCodec, Item, Task, get_task
from dsv32.tokenizer import Tokenizer, load_tokenizer, train_bpe
from dsv32.train import checkpointing as ckpt
from dsv32.train.run import RUN_PART
from dsv32.train.trainer import Batch, Dist, Trainer

#: ``--task`` -> (dsv32.rl.tasks name, generator settings for ``terms`` terms of 1..``digits`` digits)
TASKS = {
    # reasoning-gym's chain_sum: "+" and "-" between the terms, results may be negative
    "chain_sum": lambda terms, digits: ("chain_sum", {"min_terms": terms, "max_terms": terms, "min_digits": 1,
                                                      "max_digits": digits}),
    # basic_arithmetic restricted to "+" without negation or parentheses: "Calculate 47 + 8."
    "addition": lambda terms, digits: ("basic_arithmetic", {"min_terms": terms, "max_terms": terms,
                                                            "min_digits": 1, "max_digits": digits,
                                                            "operators": ["+"], "allow_parentheses": False,
                                                            "allow_negation": False}),
}


def task_spec(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(task name, generator settings) of ``--task`` at ``--terms`` and ``--digits``."""
    return TASKS[args.task](args.terms, args.digits)
MAX_NEW_TOKENS = 24  # a completion is `<answer>N</answer>` + EOS; the length penalty starts 16 tokens before


def model_config(hidden: int = 64, layers: int = 3) -> ModelConfig:
    """The ``tiny`` preset's layout (1 dense layer, then DeepSeekMoE layers with 8 routed experts in 4 groups,
    top-2, 1 shared; MLA; DSA on) at width ``hidden`` and depth ``layers`` (the preset: 64 and 3; the MLP and
    low-rank widths scale with ``hidden``), with this tokenizer's 512 ids, without the MTP module (the engine
    never runs it; leaving it out makes SFT cheaper) and with plain RoPE (no YaRN: sequences stay < 80).

    ``index_topk`` 96 is above every sequence here (a 46-token prompt + at most 24 new tokens), so the indexer
    runs but its top-k keeps every key: attention equals dense MLA. (A k below the length would need the
    indexer trained by its KL warm-up first, V3.2 report §2.1, which this short run leaves out.)"""
    return ModelConfig.from_name("tiny").replace(
        hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        q_lora_rank=3 * hidden // 4, kv_lora_rank=hidden // 2, num_hidden_layers=layers, index_topk=96,
        num_nextn_predict_layers=0, rope_scaling=None, max_position_embeddings=512, bos_token_id=0, eos_token_id=1)


def task(args: argparse.Namespace) -> Task:
    name, config = task_spec(args)
    return get_task(name, **config)


def chat(tok: Tokenizer, item: Item) -> tuple[list[int], list[int]]:
    """The SFT conversation of ``item``: its prompt, then ``<answer>N</answer>``; mask = the assistant's tokens."""
    return encode_chat(messages(item), family="deepseek-v3.2", tokenizer=tok)


def messages(item: Item) -> list[dict[str, str]]:
    return [{"role": "user", "content": item.prompt},
            {"role": "assistant", "content": f"<answer>{item.answer}</answer>"}]


# ============================================================================================ stages


def stage_data(args: argparse.Namespace, log) -> None:
    out: Path = args.out
    if (out / "tok" / "tokenizer.json").exists():
        return
    items = task(args).items("train", args.sft_examples, seed=args.seed + 1000)
    (out / "sft_items.jsonl").write_text("".join(json.dumps({"question": it.question, "answer": it.answer}) + "\n"
                                                 for it in items))
    # the tokenizer sees training-split text only: the SFT chats, rendered as text
    corpus = out / "tok_corpus.txt"
    lines = []
    for it in items:
        lines.append(render_chat_text(messages(it), family="deepseek-v3.2"))
    corpus.write_text("\n".join(lines) + "\n")
    tok = train_bpe([corpus], vocab_size=512, out=out / "tok", digit_group=args.digit_group)
    log(f"data: {len(items)} SFT items, tokenizer {tok.vocab_size} ids; e.g. {len(chat(tok, items[0])[0])} tokens "
        "per SFT chat")


def distinct(items: list[Item], n: int, what: str, flag: str) -> list[Item]:
    """The first ``n`` items of distinct questions: a generator that repeats easy questions (``addition`` draws
    the digit count first, so "3 + 5" recurs) would otherwise weigh them many times over."""
    seen: set[str] = set()
    out = [it for it in items if not (it.question in seen or seen.add(it.question))]
    if len(out) < n:
        raise SystemExit(f"rl-gain: only {len(out)} distinct {what} questions (need {flag} {n}); "
                         "the task has too few: raise --digits or --terms")
    return out[:n]


def validation_items(args: argparse.Namespace) -> list[Item]:
    """Distinct training-split questions that SFT never saw labelled: SFT's early stopping and the curves use
    these, so the held-out (test) questions never pick a checkpoint."""
    t = task(args)
    seen = {it.question for it in t.items("train", args.sft_examples, seed=args.seed + 1000)}
    pool = [it for it in t.items("train", 20 * args.eval_items, seed=args.seed + 2000) if it.question not in seen]
    return distinct(pool, args.eval_items, "validation", "--eval-items")


def test_items(args: argparse.Namespace) -> list[Item]:
    """``--test-items`` distinct held-out questions (seed 0), which no stage ever sees. More of them than
    validation items: at 200 items an accuracy near 0.9 has a standard error of 2 points, as large as the
    margins the report is read for."""
    n = args.test_items
    return distinct(task(args).items("heldout", 20 * n, seed=0), n, "held-out", "--test-items")


def greedy_eval(model: torch.nn.Module, tok: Tokenizer, items: list[Item], args: argparse.Namespace) -> dict[str, Any]:
    return evaluate(model, ChatCodec.for_tokenizer(tok), task(args), items, max_new_tokens=MAX_NEW_TOKENS,
                    threads=args.threads, slots=len(items))  # all at once: evaluate submits before it waits


def stage_sft(args: argparse.Namespace, log) -> None:
    out: Path = args.out
    if (out / "sft" / "config.json").exists():
        return
    tok = load_tokenizer(out / "tok")
    t = task(args)
    items = t.items("train", args.sft_examples, seed=args.seed + 1000)
    valid = validation_items(args)
    rows = [chat(tok, it) for it in items]
    torch.manual_seed(args.seed)
    model = Transformer(model_config(args.hidden, args.layers))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"sft: model {n_params / 1e6:.2f}M parameters, {len(rows)} chats, batch {args.sft_batch}, lr {args.sft_lr}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # 20-step warm-up
    trainer = Trainer(model, opt, sched, Dist(), mtp_weight=0.0)
    rng = random.Random(args.seed)
    order: list[int] = []
    curve = []
    best, best_step, since_best = -1.0, 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(args.sft_max_steps + 1):
        if step % args.eval_every == 0:
            res = greedy_eval(model, tok, valid, args)["results"]
            rec = {"step": step, "epoch": step * args.sft_batch / len(rows), "valid_accuracy": res["greedy_accuracy"],
                   "no_answer": res["greedy_no_answer"], "seconds": time.perf_counter() - t0}
            curve.append(rec)
            with open(out / "sft_curve.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            log(f"sft step {step}: valid acc {rec['valid_accuracy']:.3f} no_answer {rec['no_answer']:.2f}")
            if rec["valid_accuracy"] > best:
                best, best_step, since_best = rec["valid_accuracy"], step, 0
                save_model(model, out / "sft")
                tok.save(out / "sft")
            else:
                since_best += 1
            if since_best >= args.patience:
                break
        if step == args.sft_max_steps:
            break
        if len(order) < args.sft_batch:
            perm = list(range(len(rows)))
            rng.shuffle(perm)
            order += perm
        batch = [rows[i] for i in order[: args.sft_batch]]
        del order[: args.sft_batch]
        L = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), L, dtype=torch.long)
        loss_mask = torch.zeros(len(batch), L - 1, dtype=torch.bool)
        valid_tok = torch.zeros(len(batch), L - 1, dtype=torch.bool)
        for b, (r, m) in enumerate(batch):
            ids[b, : len(r)] = torch.tensor(r)
            loss_mask[b, : len(r) - 1] = torch.tensor(m[1:], dtype=torch.bool)  # label t = token t+1
            valid_tok[b, : len(r) - 1] = True
        st = trainer.step([Batch(ids, loss_mask, valid_tok)])
        if step % 50 == 0:
            log(f"sft step {step}: loss {st.lm_loss:.4f}")
    (out / "sft_summary.json").write_text(json.dumps({"best_valid_accuracy": best, "best_step": best_step,
                                                      "steps_run": curve[-1]["step"],
                                                      "seconds": time.perf_counter() - t0,
                                                      "cpu_seconds": time.process_time() - c0}, indent=2) + "\n")
    log(f"sft: plateau {best:.3f} at step {best_step} (stopped at {curve[-1]['step']})")


def rl_argv(args: argparse.Namespace) -> list[str]:
    out: Path = args.out
    name, config = task_spec(args)
    cfg = [f"{name}.{k}={json.dumps(v)}" for k, v in config.items()]
    return ["--model", str(out / "sft"), "--tokenizer", str(out / "sft"), "--task", name, "--task-config", *cfg,
            "--pool-size", str(args.rl_pool), "--group-size", str(args.group_size),
            "--prompts-per-step", str(args.prompts_per_step), "--minibatches", str(args.minibatches),
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--temperature", "1.0", "--lr", str(args.rl_lr),
            "--max-steps", str(args.rl_steps), "--save-every", str(args.save_every), "--keep", "0",
            "--seed", str(args.seed),
            "--threads", str(args.threads), "--engine-slots", str(args.prompts_per_step * args.group_size),
            "--no-progress", "--out", str(out / "rl")]


def stage_rl(args: argparse.Namespace, log) -> None:
    out: Path = args.out
    if (out / "rl" / "final" / "config.json").exists():
        return
    argv = rl_argv(args)
    resume = (out / "rl" / "ckpt").exists()
    (out / "rl_command.txt").write_text("dsv32 rl " + shlex.join(argv) + "\n")
    log("rl: dsv32 rl " + shlex.join(argv) + (" --resume" if resume else ""))
    c0, w0 = time.process_time(), time.perf_counter()
    rl_cli.cli_main(argv + (["--resume"] if resume else []))
    with open(out / "rl_time.jsonl", "a") as f:  # wall vs this process's CPU time (the machine is shared)
        f.write(json.dumps({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
                            "resumed": resume}) + "\n")


def stage_report(args: argparse.Namespace, log) -> None:
    out: Path = args.out
    tok = load_tokenizer(out / "tok")
    t = task(args)
    test = test_items(args)
    valid = validation_items(args)
    rows = {}
    torch.manual_seed(args.seed)
    base = Transformer(model_config(args.hidden, args.layers)).eval()
    models = {"base (random init)": base, "SFT": load_model(out / "sft"),
              "RL": load_model(out / "rl" / "final")}
    for name, m in models.items():
        r = evaluate(m, ChatCodec.for_tokenizer(tok), t, test, samples=args.report_samples,
                     max_new_tokens=MAX_NEW_TOKENS, threads=args.threads,
                     slots=len(test) * max(1, args.report_samples))["results"]
        r["valid_greedy_accuracy"] = greedy_eval(m, tok, valid, args)["results"]["greedy_accuracy"]
        rows[name] = r
        log(f"report: {name}: greedy {r['greedy_accuracy']:.3f} (validation {r['valid_greedy_accuracy']:.3f})")
    metrics = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    split = {k: statistics.median(m[k] for m in metrics) for k in ("seconds", "t_rollout", "t_score", "t_reference",
                                                                  "t_train")}
    sft = json.loads((out / "sft_summary.json").read_text())
    k = args.report_samples
    n_q = len({it.question for it in test})
    lines = [f"| model | greedy accuracy, held-out test ({len(test)} items, {n_q} distinct questions) | no answer | "
             f"pass@{k} (T=1) | greedy accuracy, validation ({len(valid)} items: RL's questions, never labelled) |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['greedy_accuracy']:.3f} | {r['greedy_no_answer']:.3f} | "
                     f"{r.get(f'pass@{k}', 0):.3f} | {r['valid_greedy_accuracy']:.3f} |")
    lines += ["", f"SFT: best validation accuracy {sft['best_valid_accuracy']:.3f} at step {sft['best_step']}, "
              f"{sft['seconds']:.0f} s; RL: {len(metrics)} steps, {sum(m['seconds'] for m in metrics):.0f} s",
              "", "median seconds per RL step: " + ", ".join(f"{k2} {v:.2f}" for k2, v in split.items())]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"test": rows, "sft": sft, "rl_step_split_median": split,
                                                  "rl_steps": len(metrics)}, indent=2) + "\n")
    rl_curve = rl_validation_curve(args, tok)
    (out / "rl_curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl_curve))
    plot(out, metrics, rl_curve)
    print("\n".join(lines))


#: The four-measure ablation (``--stage ablation``): one arm with every measure on, then one arm per measure
#: switched off, all from ``OUT/sft`` with the same seed and budget. Off-policy on purpose: 8 optimiser steps
#: per rollout batch, so that later mini-batches see pi_theta != pi_old; top-p 0.9 so that the kept sets
#: differ from the full vocabulary; beta > 0 so that the KL estimator enters the loss.
ABLATION_ARMS = {"all": [], "no-unbiased-kl": ["--no-unbiased-kl"], "no-opsm": ["--no-opsm"],
                 "no-keep-routing": ["--no-keep-routing"], "no-keep-sampling-mask": ["--no-keep-sampling-mask"]}
ABLATION_SETTINGS = ["--minibatches", "8", "--top-p", "0.9", "--beta", "0.02", "--delta", "0.1"]


def ablation_argv(args: argparse.Namespace, arm: str) -> list[str]:
    """``rl_argv`` with the ablation's settings, ``--abl-steps`` steps, its own output and the arm's switch."""
    argv = rl_argv(args)

    def put(flag: str, value: str) -> None:
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv.extend([flag, value])

    for flag, value in zip(ABLATION_SETTINGS[::2], ABLATION_SETTINGS[1::2]):
        put(flag, value)
    put("--max-steps", str(args.abl_steps))
    put("--save-every", str(args.abl_steps))
    put("--keep", "1")
    put("--out", str(args.out / "abl" / arm))
    return argv + ABLATION_ARMS[arm]


def stage_ablation(args: argparse.Namespace, log) -> None:
    """Run every arm not yet finished, then ``OUT/ablation.md`` (means over the last 30 steps and each arm's
    final greedy accuracy) and ``OUT/ablation.png`` (reward, KL, mismatch, masked share side by side)."""
    out: Path = args.out
    for arm in ABLATION_ARMS:
        if not (out / "abl" / arm / "final" / "config.json").exists():
            argv = ablation_argv(args, arm)
            log(f"ablation {arm}: dsv32 rl " + shlex.join(argv))
            rl_cli.cli_main(argv)
    tok = load_tokenizer(out / "tok")
    valid = validation_items(args)
    test = test_items(args)
    runs = {arm: [json.loads(x) for x in (out / "abl" / arm / "metrics.jsonl").read_text().splitlines() if x.strip()]
            for arm in ABLATION_ARMS}
    keys = ("reward_mean", "accuracy", "kl", "mismatch_kl", "masked_frac", "clip_frac", "route_flip_rate")
    lines = ["| arm | " + " | ".join(f"{k} (last 30 steps)" for k in keys) + " | greedy accuracy, validation | "
             "greedy accuracy, held-out test |", "|" + " --- |" * (len(keys) + 3)]
    results = {}
    for arm, m in runs.items():
        tail = m[-30:]
        means = {k: statistics.mean(x[k] for x in tail) if all(x.get(k) is not None for x in tail) else None
                 for k in keys}
        model = load_model(out / "abl" / arm / "final")
        means["valid_accuracy"] = greedy_eval(model, tok, valid, args)["results"]["greedy_accuracy"]
        means["test_accuracy"] = greedy_eval(model, tok, test, args)["results"]["greedy_accuracy"]
        results[arm] = means
        cells = ["n/a" if means[k] is None else f"{means[k]:.4f}" for k in keys]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {means['valid_accuracy']:.3f} | "
                     f"{means['test_accuracy']:.3f} |")
        log(f"ablation {arm}: " + ", ".join(f"{k} {v}" for k, v in means.items()))
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps({"settings": ABLATION_SETTINGS, "steps": args.abl_steps,
                                                   "arms": results}, indent=2) + "\n")
    plot_ablation(out, runs)
    print("\n".join(lines))


def plot_ablation(out: Path, runs: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib  # deliberately lazy: plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("reward_mean", "reward (10-step mean)"), ("kl", "KL to the reference"),
              ("mismatch_kl", "mismatch: mean logp_old - logp, first mini-batch"),
              ("masked_frac", "OPSM: share masked"))
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4))
    for ax, (key, title) in zip(axes, panels):
        for arm, m in runs.items():
            ys = [x[key] if x[key] is not None else float("nan") for x in m]
            ys = [statistics.mean(ys[max(0, i - 9): i + 1]) for i in range(len(ys))]  # 10-step running mean
            ax.plot([x["step"] for x in m], ys, label=arm)
        ax.set(title=title, xlabel="RL step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=100)


def rl_validation_curve(args: argparse.Namespace, tok: Tokenizer) -> list[dict[str, Any]]:
    """Greedy accuracy of every RL checkpoint (``--keep 0`` keeps them all) on the validation items (questions
    RL samples from, without labels) and on the held-out test items (questions no stage sees)."""
    valid = validation_items(args)
    test = test_items(args)
    model = load_model(args.out / "sft")

    def point(step: int) -> dict[str, Any]:
        return {"step": step, "valid_accuracy": greedy_eval(model, tok, valid, args)["results"]["greedy_accuracy"],
                "test_accuracy": greedy_eval(model, tok, test, args)["results"]["greedy_accuracy"]}

    curve = [point(0)]
    for path in sorted(ckpt.list_checkpoints(args.out / "rl" / "ckpt"), key=lambda p: p.name):
        parts = ckpt.load_parts(path)
        model.load_state_dict(parts["model"])
        curve.append(point(int(parts[RUN_PART]["step"])))
    return sorted(curve, key=lambda r: r["step"])


def plot(out: Path, metrics: list[dict[str, Any]], rl_curve: list[dict[str, Any]]) -> None:
    import matplotlib  # deliberately lazy: plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [json.loads(x) for x in (out / "sft_curve.jsonl").read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot([c["step"] for c in curve], [c["valid_accuracy"] for c in curve], marker="o")
    ax[0].set(title="SFT: greedy accuracy on validation items", xlabel="SFT step", ylabel="accuracy")
    steps = [m["step"] for m in metrics]
    w = 10
    smooth = [statistics.mean(m["accuracy"] for m in metrics[max(0, i - w + 1): i + 1]) for i in range(len(metrics))]
    ax[1].plot(steps, [m["accuracy"] for m in metrics], alpha=0.3, label="rollout accuracy")
    ax[1].plot(steps, smooth, label=f"rollout accuracy ({w}-step mean)")
    ax[1].plot(steps, [m["reward_mean"] for m in metrics], alpha=0.5, label="reward mean")
    ax[1].plot([r["step"] for r in rl_curve], [r["valid_accuracy"] for r in rl_curve], marker="o",
               label="greedy accuracy, validation items (RL sees the questions)")
    ax[1].plot([r["step"] for r in rl_curve], [r["test_accuracy"] for r in rl_curve], marker="s",
               label="greedy accuracy, held-out test items")
    ax[1].set(title="dsv32 rl (GRPO) from the SFT checkpoint", xlabel="RL step")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)


# ============================================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32 bench rl-gain", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/rl_gain"))
    p.add_argument("--stage", choices=("all", "data", "sft", "rl", "report", "ablation"), default="all",
                   help="all = data, sft, rl, report; ablation (after sft) runs the four-measure ablation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (on a loaded machine 1 beats 2)")
    p.add_argument("--task", choices=sorted(TASKS), default="addition")
    p.add_argument("--terms", type=int, default=2, help="terms per question")
    p.add_argument("--digits", type=int, default=2, help="each term has 1..DIGITS digits")
    p.add_argument("--digit-group", type=int, default=1,
                   help="the tokenizer cuts numbers into groups of at most this many digits (1: one per digit)")
    p.add_argument("--hidden", type=int, default=128, help="model width (the tiny preset: 64)")
    p.add_argument("--layers", type=int, default=4, help="model depth (the tiny preset: 3)")
    p.add_argument("--eval-items", type=int, default=200, help="validation items (SFT early stopping, curves)")
    p.add_argument("--test-items", type=int, default=1000,
                   help="held-out items for the table and curves (the first N are those of --test-items N)")
    p.add_argument("--sft-examples", type=int, default=1024, help="labelled training items SFT sees")
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-max-steps", type=int, default=15000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--patience", type=int, default=15, help="evaluations without a new best before SFT stops")
    p.add_argument("--rl-pool", type=int, default=4096, help="training questions (no labels) RL draws from")
    p.add_argument("--rl-steps", type=int, default=2000)
    p.add_argument("--rl-lr", type=float, default=1e-4, help="1e-3 (the SFT rate) collapses RL here (docs/rl.md)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--abl-steps", type=int, default=150, help="RL steps per ablation arm")
    p.add_argument("--report-samples", type=int, default=4, help="sampled completions per test item for pass@k")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    logf = open(args.out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    stages = ("data", "sft", "rl", "report") if args.stage == "all" else (args.stage,)
    for s in stages:
        {"data": stage_data, "sft": stage_sft, "rl": stage_rl, "report": stage_report,
         "ablation": stage_ablation}[s](args, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
