"""`dsv32 rl`: GRPO with DeepSeek-V3.2's four stability measures (report §3.1) on verifiable tasks.

One RL step (a pure function of the checkpointed state and the step index, so a run resumes exactly):

1. **Prompts.** ``--prompts-per-step`` training items drawn from the ``--task`` mix with a generator seeded by
   (``--seed``, step): a task by weight, then an item of its pool (``--pool-size`` training items per task,
   generated once from ``--seed``; held-out items are never in a pool).
2. **Rollouts.** ``--group-size`` completions per prompt through the engine (``rollout.sample_groups``: each
   completion's seed is a function of (seed, step, prompt, sample)), with the sampler's log-probabilities, kept
   sets and MoE routes. In-process the engine runs over the policy module itself: it is idle while the
   optimiser steps and caches nothing derived from the weights across requests (prefix reuse is off), so each
   step samples from the current weights. ``--rollout-workers N`` samples in N Ray actors instead
   (``rl/workers.py``), each with its own copy of the weights, refreshed after every update.
3. **Rewards.** Each completion scored by its task (``tasks.score_rollouts``).
4. **Update.** ``step.grpo_update``: ``--minibatches`` optimiser steps over the batch against the frozen
   reference (the initial weights, rebuilt from ``--model`` at resume rather than stored).

Resume, periodic/final/on-signal checkpoints and ``OUT/metrics.jsonl`` are ``train.run.RunLoop``'s. A step
killed mid-way is redone from its seed on resume, so its rollouts are regenerated and never half-counted.
Metrics per step: ``reward_mean``, ``accuracy`` (share of sampled completions judged correct), ``no_answer``,
``completion_len``, the ``grpo_update`` statistics (``loss``, ``ratio_mean``, ``kl``, ``clip_frac``,
``masked_frac``, ``route_flip_rate`` (null for a dense model or ``--no-keep-routing``), ``mismatch_kl``),
``tokens`` (trained tokens of the step), ``seconds`` and its split ``t_rollout`` / ``t_reference`` /
``t_train`` (the policy forwards, backward and optimiser steps, plus the route-flip diagnostic forward).

Agent environments (``--task env:DIR[:WEIGHT]``, ``rl/agentic.py``): every task of the environments
``dsv32 synth`` wrote under DIR; its prompts are rolled out as multi-turn trajectories through the agent loop
on the same engine (tools and verifier in the sandbox, ``--max-turns`` turns of at most ``--max-new-tokens``
each, within ``--agent-context`` tokens), rewarded by the verifier, and trained by the same GRPO step with the
tool output masked out of the loss. They mix with the reasoning tasks by weight. Extra metrics:
``agent_turns``, ``agent_tool_calls``, ``agent_valid_call_rate``, ``agent_submitted``, ``agent_malformed``,
``agent_tool_tokens``.

Example (the tiny preset with a byte-level tokenizer would be ``--model preset:tiny --tokenizer DIR``)::

    dsv32 rl --model smollm2-135m --task chain_sum --group-size 8 --prompts-per-step 4 --minibatches 2 \\
        --max-new-tokens 64 --max-steps 50 --save-every 10 --out runs/rl
    dsv32 rl --model smollm2-135m --task env:envs --group-size 4 --prompts-per-step 2 --max-turns 4 \\
        --max-new-tokens 128 --agent-context 3072 --max-steps 20 --out runs/agent-rl
    dsv32 plot runs/rl
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv32.agents.loop import AgentConfig
from dsv32.checkpoint import save_model
from dsv32.engine import Engine
from dsv32.llama import LlamaModel, save_hf
from dsv32.registry import load_model
from dsv32.rl import rollout as rollout_io
from dsv32.rl.agentic import (
    EnvTask,
    agent_metrics,
    is_env_spec,
    load_env_tasks,
    parse_env_spec,
    prompt_length,
    sample_env_groups,
)
from dsv32.rl.rewards import RewardConfig
from dsv32.rl.rollout import Rollout, sample_groups
from dsv32.rl.step import GRPOConfig, frozen_copy, grpo_update
from dsv32.rl.tasks import ChatCodec, Item, Task, get_task, parse_task_config, score_rollouts
from dsv32.tokenizer import Tokenizer, load_tokenizer
from dsv32.train.run import RunLoop

# ============================================================================================ tasks and prompts


def parse_task_spec(spec: str) -> tuple[str, float]:
    """``NAME`` or ``NAME:WEIGHT`` -> (name, weight); ``env:DIR[:WEIGHT]`` -> ("env:DIR", weight)."""
    if is_env_spec(spec):
        try:
            path, weight = parse_env_spec(spec)
        except ValueError as e:
            raise SystemExit(f"dsv32 rl: {e}") from None
        return f"env:{path}", weight
    name, _, w = spec.partition(":")
    try:
        weight = float(w) if w else 1.0
    except ValueError:
        raise SystemExit(f"dsv32 rl: --task {spec!r}: the weight after ':' must be a number") from None
    if not name or weight <= 0:
        raise SystemExit(f"dsv32 rl: --task {spec!r}: need NAME[:WEIGHT] with WEIGHT > 0")
    return name, weight


@dataclass
class TaskMix:
    """The weighted task mix of a run and each task's pool of training items. ``tasks`` holds the reasoning
    tasks (their scorers); an ``env:DIR`` entry has a pool of agent tasks (`EnvTask`, all of DIR's tasks:
    ``--pool-size`` does not apply) and is rewarded by each task's own verifier."""

    tasks: dict[str, Task]
    weights: dict[str, float]
    pools: dict[str, list[Item] | list[EnvTask]]

    @classmethod
    def build(cls, specs: Sequence[str], config: dict[str, dict[str, Any]], pool_size: int, seed: int,
              reward: RewardConfig | None = None) -> TaskMix:
        parsed = [parse_task_spec(s) for s in specs]
        names = [n for n, _ in parsed]
        if len(set(names)) != len(names):
            raise SystemExit(f"dsv32 rl: a task is listed twice in --task {list(specs)}")
        unknown = sorted(set(config) - set(names))
        if unknown:
            raise SystemExit(f"dsv32 rl: --task-config names {unknown}, which are not in --task")
        tasks = {}
        pools: dict[str, list[Item] | list[EnvTask]] = {}
        for n in names:
            if is_env_spec(n):
                try:
                    pools[n] = load_env_tasks(n[len("env:"):], source=n)
                except (OSError, ValueError) as e:
                    raise SystemExit(f"dsv32 rl: --task {n}: {e}") from None
                continue
            try:
                tasks[n] = get_task(n, reward, **config.get(n, {}))
            except KeyError as e:
                raise SystemExit(f"dsv32 rl: {e.args[0]}") from None
            pools[n] = tasks[n].items("train", pool_size, seed=seed)
        return cls(tasks, dict(parsed), {n: pools[n] for n in names})

    def draw(self, n: int, seed: int, step: int) -> list[Item | EnvTask]:
        """The ``n`` prompts of ``step``: a function of (seed, step) only (a resumed step draws the same)."""
        rng = random.Random(f"dsv32.rl.prompts:{seed}:{step}")
        names = list(self.weights)
        out = []
        for _ in range(n):
            name = rng.choices(names, weights=[self.weights[k] for k in names])[0]
            pool = self.pools[name]
            out.append(pool[rng.randrange(len(pool))])
        return out


# ============================================================================================ model I/O


def is_moe(model: nn.Module) -> bool:
    """Whether the model routes tokens to experts (Keep Routing has something to replay)."""
    return bool(getattr(model.config, "n_routed_experts", 0))


def export_model(model: nn.Module, out: Path, tokenizer: Tokenizer | None) -> Path:
    """``out``: HF-format weights ``dsv32.load_model`` reloads (V3.2: ``save_model``; Llama family:
    ``llama.save_hf``) plus the tokenizer."""
    if isinstance(model, LlamaModel):
        save_hf(model, out)
    else:
        save_model(model, out)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


# ============================================================================================ the command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32 rl", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and tasks")
    g.add_argument("--model", required=True, help="anything dsv32.load_model accepts (preset:tiny, a directory, "
                                                  "smollm2-135m, ...)")
    g.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's own)")
    g.add_argument("--task", nargs="+", required=True, metavar="NAME[:WEIGHT]", help="task mix (dsv32.rl.tasks)")
    g.add_argument("--task-config", nargs="*", default=[], metavar="NAME.KEY=VALUE",
                   help="generator settings, e.g. chain_sum.max_terms=2")
    g.add_argument("--pool-size", type=int, default=256, help="training items generated per task")
    g.add_argument("--reward-script", choices=("latin", "cjk"), default="latin",
                   help="target script of the language-consistency reward")
    g = p.add_argument_group("sampling")
    g.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    g.add_argument("--prompts-per-step", type=int, default=4)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--rollout-workers", type=int, default=0,
                   help="sample in N Ray actors (the optional 'rl' extra); 0: in this process")
    g.add_argument("--engine-slots", type=int, default=16, help="engine batch slots")
    g = p.add_argument_group("agent environments (--task env:DIR)")
    g.add_argument("--max-turns", type=int, default=8, help="model turns per trajectory (each at most "
                                                             "--max-new-tokens)")
    g.add_argument("--agent-context", type=int, default=0,
                   help="context window of a trajectory in tokens (0: the model's, at most 4096)")
    g.add_argument("--thinking", choices=("auto", "on", "off"), default="auto",
                   help="thinking mode (auto: on for V3.2-format models; ChatML models have none)")
    g.add_argument("--agent-threads", type=int, default=0,
                   help="trajectories run at once (0: as many as the engine has slots)")
    g.add_argument("--unsafe", action="store_true",
                   help="run environment tools and verifiers WITHOUT the sandbox (only if you trust them)")
    g = p.add_argument_group("GRPO")
    g.add_argument("--minibatches", type=int, default=1, help="optimiser steps per rollout batch")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--clip-eps", type=float, default=0.2)
    g.add_argument("--beta", type=float, default=0.0, help="KL weight (0: the KL is monitored only)")
    g.add_argument("--delta", type=float, default=0.5, help="OPSM threshold on mean log(pi_old/pi_theta)")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--no-unbiased-kl", dest="unbiased_kl", action="store_false", help="plain K3 (ablation)")
    g.add_argument("--no-opsm", dest="opsm", action="store_false", help="no off-policy sequence masking")
    g.add_argument("--no-keep-routing", dest="keep_routing", action="store_false", help="no MoE route replay")
    g.add_argument("--no-keep-sampling-mask", dest="keep_sampling_mask", action="store_false",
                   help="train on the full softmax, not the sampler's kept set")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--max-steps", type=int, default=100)
    g.add_argument("--save-every", type=int, default=10)
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept (0: all)")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--save-rollouts", action="store_true", help="write OUT/rollouts/step_N.jsonl each step")
    g.add_argument("--no-export", action="store_true", help="no OUT/final export at the end")
    g.add_argument("--no-progress", action="store_true")
    return p


def grpo_config(args: argparse.Namespace, moe: bool) -> GRPOConfig:
    return GRPOConfig(clip_eps=args.clip_eps, beta=args.beta, delta=args.delta, minibatches=args.minibatches,
                      max_grad_norm=args.max_grad_norm, unbiased_kl=args.unbiased_kl, opsm=args.opsm,
                      keep_routing=args.keep_routing and moe, keep_sampling_mask=args.keep_sampling_mask)


def _jsonable(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


#: Arguments that change what a step computes: a resumed run must keep them.
_STEP_ARGS = ("model", "task", "task_config", "pool_size", "reward_script", "group_size", "prompts_per_step",
              "max_new_tokens", "temperature", "top_p", "top_k", "minibatches", "lr", "clip_eps", "beta", "delta",
              "max_grad_norm", "unbiased_kl", "opsm", "keep_routing", "keep_sampling_mask", "seed",
              "max_turns", "agent_context", "thinking")


class LocalSampler:
    """Rollouts through one in-process engine over the policy module itself (see the module docstring)."""

    def __init__(self, policy: nn.Module, *, slots: int, max_len: int, threads: int | None) -> None:
        self.engine = Engine(policy, max_slots=slots, max_len=max_len, num_threads=threads, prefix_reuse=False)

    def sample(self, prompts: list[list[int]], group_size: int, **kw: Any) -> list[Rollout]:
        return sample_groups(self.engine, prompts, group_size, **kw)

    def refresh(self, policy: nn.Module) -> None:
        """Nothing to do: the engine reads the policy's own parameters."""

    def close(self) -> None:
        self.engine.shutdown()


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def rl(args: argparse.Namespace) -> int:
    """Run ``dsv32 rl`` as ``args`` describe (``build_parser``). Returns the exit code."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    with RunLoop(out, name="dsv32 rl", max_steps=args.max_steps, save_every=args.save_every, keep=args.keep,
                 resume=args.resume, progress=not args.no_progress) as loop:
        log = loop.log
        parts = loop.resume_parts
        if parts is not None:
            was = parts["trainer"]["args"]
            # a key the checkpoint lacks was added later: the run it holds used that argument's default
            changed = [k for k in _STEP_ARGS if k in was and was[k] != _jsonable(args).get(k)]
            if changed:
                raise SystemExit(f"dsv32 rl: {loop.resume_checkpoint} was run with other {changed}; a resumed "
                                 "run must keep what a step computes")
        # the initial weights: the reference, and the policy's start (a checkpoint's weights replace them)
        policy = load_model(args.model, seed=args.seed)
        ref = frozen_copy(policy)
        if parts is not None:
            policy.load_state_dict(parts["model"])
            del parts["model"]
        policy.eval().requires_grad_(True)  # eval: no dropout, the same forward the engine runs
        moe = is_moe(policy)
        cfg = grpo_config(args, moe)
        if args.keep_routing and not moe:
            log("note: a dense model has no routes; Keep Routing does not apply")

        tok = load_tokenizer(args.tokenizer if args.tokenizer is not None else args.model)
        if tok.vocab_size > policy.config.vocab_size:
            raise SystemExit(f"dsv32 rl: the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                             f"{policy.config.vocab_size}; pass a --tokenizer that fits the model")
        codec = ChatCodec.for_tokenizer(tok)
        try:
            task_config = parse_task_config(args.task_config)
        except ValueError as e:
            raise SystemExit(f"dsv32 rl: {e}") from None
        mix = TaskMix.build(args.task, task_config, args.pool_size, args.seed,
                            RewardConfig(script=args.reward_script))
        env_pool = [it for pool in mix.pools.values() for it in pool if isinstance(it, EnvTask)]
        gym_pool = [it for pool in mix.pools.values() for it in pool if isinstance(it, Item)]
        longest = max((len(codec.prompt(it.prompt)) for it in gym_pool), default=0)
        max_len = longest + args.max_new_tokens + 1
        agent_cfg = None
        if env_pool:
            agent_cfg = agent_config(args, codec.family, policy, cfg)
            max_len = max(max_len, agent_cfg.context)  # type: ignore[arg-type]
            first = max(env_pool, key=lambda it: prompt_length(it, tok, codec.family, agent_cfg))
            need = prompt_length(first, tok, codec.family, agent_cfg)
            if need + 1 > agent_cfg.context:  # type: ignore[operator]
                raise SystemExit(f"dsv32 rl: task {first.id} ({first.env_dir}): its first prompt has {need} tokens, "
                                 f"more than --agent-context {agent_cfg.context} allows; raise --agent-context")
            log(f"agent tasks: {len(env_pool)} from {len({it.env_dir for it in env_pool})} environment(s); "
                f"longest first prompt {need} tokens, context {agent_cfg.context}, "
                f"thinking {'on' if agent_cfg.thinking else 'off'}")
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr,
                                weight_decay=0.0, fused=False)
        tokens_total = 0

        def load(parts: dict[str, Any]) -> None:
            nonlocal tokens_total
            opt.load_state_dict(parts["optimizer"])
            tokens_total = int(parts["trainer"]["tokens"])

        def state() -> dict[str, Any]:
            return {"model": {k: v.detach().cpu() for k, v in policy.state_dict().items()},
                    "optimizer": opt.state_dict(),
                    "trainer": {"tokens": tokens_total, "args": _jsonable(args)}}

        (out / "rl_args.json").write_text(json.dumps(_jsonable(args), indent=2) + "\n")
        slots = engine_slots(args)
        sampler = make_sampler(args, policy, max_len)
        try:

            def step(i: int) -> dict[str, Any]:
                nonlocal tokens_total
                t0 = time.perf_counter()
                drawn = mix.draw(args.prompts_per_step, args.seed, i)
                # reasoning prompts first (groups 0..), then agent tasks: a step's groups are numbered in this order
                items = [it for it in drawn if isinstance(it, Item)]
                env_items = [it for it in drawn if isinstance(it, EnvTask)]
                ros: list[Rollout] = []
                if items:
                    prompts = [codec.prompt(it.prompt) for it in items]
                    ros = sampler.sample(prompts, args.group_size, run_seed=args.seed, step=i,
                                         max_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p, top_k=args.top_k, stop_token_ids=codec.stop_ids,
                                         keep_routes=cfg.keep_routing)
                t_verify = 0.0
                agent = {}
                if env_items:
                    envs = sample_env_groups(
                        sampler.engine, tok, codec.family, env_items, args.group_size, agent_cfg,
                        run_seed=args.seed, step=i, first_group=len(items), threads=args.agent_threads or slots,
                        unsafe=args.unsafe)
                    t_verify = envs.t_verify
                    agent = agent_metrics(envs.trajectories, envs.rollouts)
                t1 = time.perf_counter() - t_verify
                if items:
                    score_rollouts(ros, items, mix.tasks, codec.decode)
                if env_items:
                    ros += envs.rollouts
                    if args.save_rollouts:
                        _save_trajectories(envs.trajectories, out / "rollouts" / f"step_{i + 1:06d}.agent.jsonl")
                accuracy = sum(r.verdict == "correct" for r in ros) / len(ros)
                t2 = time.perf_counter()
                stats = grpo_update(policy, ref, opt, ros, args.group_size, cfg)
                t3 = time.perf_counter()
                sampler.refresh(policy)
                if args.save_rollouts:
                    rollout_io.save(ros, out / "rollouts" / f"step_{i + 1:06d}.jsonl")
                tokens_total += int(stats["tokens"])
                return {
                    "reward_mean": stats["reward_mean"],
                    "accuracy": accuracy,
                    "no_answer": sum(r.verdict == "no_answer" for r in ros) / len(ros),
                    "completion_len": sum(len(r.completion_ids) for r in ros) / len(ros),
                    "loss": stats["loss"],
                    "ratio_mean": stats["ratio_mean"],
                    "kl": stats["kl"],
                    "clip_frac": stats["clip_frac"],
                    "masked_frac": stats["masked_frac"],
                    "route_flip_rate": _finite(stats["route_flip_rate"]),
                    "mismatch_kl": _finite(stats["mismatch_kl"]),
                    "tokens": int(stats["tokens"]),
                    "tokens_total": tokens_total,
                    "lr": opt.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - t0,
                    "t_rollout": t1 - t0,
                    "t_score": t2 - t1,
                    "t_reference": stats["t_reference"],
                    "t_train": t3 - t2 - stats["t_reference"],
                    **agent,
                }

            def postfix(rec: dict[str, Any]) -> dict[str, str]:
                return {"reward": f"{rec['reward_mean']:.3f}", "acc": f"{rec['accuracy']:.2f}",
                        "kl": f"{rec['kl']:.2e}"}

            result = loop.run(step, state=state, load=load, postfix=postfix)
        finally:
            sampler.close()
        if not result.stopped and not args.no_export:
            log(f"exported {export_model(policy, out / 'final', tok)}")
    return 0


def engine_slots(args: argparse.Namespace) -> int:
    """Sequences the engine batches: at most a step's rollouts."""
    return max(1, min(args.engine_slots, args.group_size * args.prompts_per_step))


def agent_config(args: argparse.Namespace, family: str, policy: nn.Module, cfg: GRPOConfig) -> AgentConfig:
    """The per-trajectory settings of the ``env:DIR`` tasks."""
    thinking = family == "deepseek-v3.2" if args.thinking == "auto" else args.thinking == "on"
    if thinking and family == "chatml":
        raise SystemExit("dsv32 rl: --thinking on: ChatML models have no thinking mode")
    context = args.agent_context or min(getattr(policy.config, "max_position_embeddings", 4096) or 4096, 4096)
    return AgentConfig(max_turns=args.max_turns, max_tokens=args.max_new_tokens, context=context, thinking=thinking,
                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                       keep_routes=cfg.keep_routing)


def _save_trajectories(trajs: Sequence[Any], path: Path) -> None:
    """The step's agent trajectories as readable JSON lines (messages, calls, verdict), beside its rollouts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(t.to_json(), ensure_ascii=False, default=str) + "\n" for t in trajs))


def make_sampler(args: argparse.Namespace, policy: nn.Module, max_len: int) -> Any:
    """The in-process engine, or ``--rollout-workers`` Ray actors."""
    slots = engine_slots(args)
    threads = args.threads or None
    if args.rollout_workers > 0:
        from dsv32.rl.workers import RaySampler  # deliberately lazy: Ray is the optional 'rl' extra, slow to import

        return RaySampler(policy, args.rollout_workers, slots=slots, max_len=max_len, threads=threads)
    return LocalSampler(policy, slots=slots, max_len=max_len, threads=threads)


def cli_main(argv: list[str]) -> int:
    """``dsv32 rl ...``"""
    args = build_parser().parse_args(argv)
    bad: list[tuple[str, Callable[[], bool]]] = [
        ("--max-steps >= 1", lambda: args.max_steps >= 1),
        ("--group-size >= 2 (advantages are relative to the group)", lambda: args.group_size >= 2),
        ("--prompts-per-step >= 1", lambda: args.prompts_per_step >= 1),
        ("--max-new-tokens >= 1", lambda: args.max_new_tokens >= 1),
        ("--temperature > 0", lambda: args.temperature > 0),
        ("0 < --top-p <= 1", lambda: 0 < args.top_p <= 1),
        ("--pool-size >= 1", lambda: args.pool_size >= 1),
        ("--rollout-workers >= 0", lambda: args.rollout_workers >= 0),
        ("--max-turns >= 1", lambda: args.max_turns >= 1),
        ("--agent-context >= 0", lambda: args.agent_context >= 0),
        ("--agent-threads >= 0", lambda: args.agent_threads >= 0),
        ("--rollout-workers 0 for env: tasks (agent trajectories roll out in this process)",
         lambda: not (args.rollout_workers and any(is_env_spec(t) for t in args.task))),
        ("1 <= --minibatches <= group size x prompts per step",
         lambda: 1 <= args.minibatches <= args.group_size * args.prompts_per_step),
    ]
    for need, ok in bad:
        if not ok():
            raise SystemExit(f"dsv32 rl: need {need}")
    return rl(args)
