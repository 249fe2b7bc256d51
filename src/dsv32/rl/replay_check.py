"""Keep Routing / Keep Sampling Mask, measured (issue 12 item 4): ``python -m dsv32.rl.replay_check``.

Samples groups through the engine, then
1. at equal weights, compares the training forward's log-probs of the sampled tokens with the engine's (the
   sampler's, after temperature and top-p): with the kept mask (and, on an MoE model, the routes replayed),
   without the mask, without the replay;
2. on an MoE model, takes GRPO steps (Adam) and reports after each the share of (position, MoE layer) routes
   of the sampled batch that the moved weights would route differently (what replay prevents).

``--model tiny`` (default): the tiny V3.2 preset (MLA + DSA + MoE) with random weights scaled up, on random
prompts, with a rule reward (the share of even token ids). Any other ``--model`` goes through
``dsv32.load_model`` (e.g. ``smollm2-135m``) and needs ``--task``: prompts are the task's training items in the
model's chat format, rewards the task's scorer. Prints one JSON line per measurement, with wall times.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from dsv32.chat import IM_START, encode_chat
from dsv32.config import ModelConfig
from dsv32.engine import Engine
from dsv32.model import Transformer
from dsv32.registry import load_model
from dsv32.rl.batch import collate, policy_logprobs, route_flip_rate
from dsv32.rl.rollout import Rollout, sample_groups
from dsv32.rl.step import GRPOConfig, grpo_update
from dsv32.rl.tasks import get_task, score_rollouts
from dsv32.tokenizer import load_tokenizer

LOGP_BINS = ((-0.1, 0.0), (-1.0, -0.1), (-3.0, -1.0), (-8.0, -3.0), (-float("inf"), -8.0))


def tiny_model(seed: int) -> Transformer:
    """The tiny preset with weights scaled up from the default init (peaked, far-from-tie distributions)."""
    torch.manual_seed(seed)
    m = Transformer(ModelConfig.from_name("tiny")).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
            elif "bias" not in name:
                p.normal_(1.0, 0.1)
    return m


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' or anything dsv32.load_model accepts")
    ap.add_argument("--task", default=None, help="task name (dsv32.rl.tasks) for a real model's prompts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.7, 0.9, 1.0])
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    stop: list[int] = []
    if args.model == "tiny":
        model = tiny_model(args.seed)
        g = torch.Generator().manual_seed(args.seed)
        prompts = [[1] + torch.randint(2, model.config.vocab_size, (int(n),), generator=g).tolist()
                   for n in torch.randint(3, 40, (args.prompts,), generator=g)]
        items = None
    else:
        if args.task is None:
            ap.error("a real --model needs --task (its prompts and scorer)")
        model = load_model(args.model)
        tok = load_tokenizer(args.model)
        family = "chatml" if tok.token_to_id(IM_START) is not None else "deepseek-v3.2"
        task = get_task(args.task)
        items = task.items("train", args.prompts, seed=args.seed)
        prompts = [encode_chat([{"role": "user", "content": it.prompt}], family=family, tokenizer=tok)[0]
                   for it in items]
        stop = [t for t in (tok.token_to_id("<|im_end|>"), tok.token_to_id(tok.eos_token or "")) if t is not None]
    V = model.config.vocab_size
    moe = bool(getattr(model.config, "n_routed_experts", 0))

    report: dict = {"equal_weights": [], "route_flip_rate": []}
    ros: list[Rollout] = []
    for top_p in args.top_p:
        eng = Engine(model, max_slots=8, max_len=max(len(p) for p in prompts) + args.max_tokens + 1,
                     num_threads=args.threads)
        t0 = time.perf_counter()
        try:
            ros = sample_groups(eng, prompts, args.group_size, run_seed=args.seed, step=0,
                                max_tokens=args.max_tokens, temperature=args.temperature, top_p=top_p,
                                stop_token_ids=stop, keep_routes=moe)
        finally:
            eng.shutdown()
        row: dict = {"model": args.model, "top_p": top_p, "rollout_s": round(time.perf_counter() - t0, 2)}
        if items is not None:
            row["accuracy"] = score_rollouts(ros, items, {task.name: task},
                                             lambda ids: tok.decode(ids, skip_special_tokens=True))
        b = collate(ros, V, keep_routing=moe)
        m = b.token_mask
        row["tokens"] = int(m.sum())
        variants = [("kept_mask", b), ("no_mask", collate(ros, V, keep_sampling_mask=False, keep_routing=moe))]
        if moe:
            variants.append(("no_replay", collate(ros, V, keep_routing=False)))
        with torch.no_grad():
            for name, batch in variants:
                t0 = time.perf_counter()
                d = (policy_logprobs(model, batch) - b.logp_old).abs()[m]
                row[f"{name}_max_abs"], row[f"{name}_mean_abs"] = float(d.max()), float(d.mean())
                row[f"{name}_forward_s"] = round(time.perf_counter() - t0, 2)
                if name == "kept_mask":  # does the gap depend on how likely the sampled token was?
                    old = b.logp_old[m]
                    row["kept_mask_mean_abs_by_logp"] = {
                        f"({lo},{hi}]": float(d[(old > lo) & (old <= hi)].mean())
                        for lo, hi in LOGP_BINS if bool(((old > lo) & (old <= hi)).any())
                    }
        report["equal_weights"].append(row)
        print(json.dumps(row), flush=True)

    if moe and args.updates:
        if items is None:
            for r in ros:  # a rule reward on the last batch: the share of even token ids
                r.reward = sum(t % 2 == 0 for t in r.completion_ids) / len(r.completion_ids)
        policy = copy.deepcopy(model)
        opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
        batch = collate(ros, V)
        for k in range(args.updates):
            t0 = time.perf_counter()
            grpo_update(policy, None, opt, ros, args.group_size, GRPOConfig(minibatches=1))
            dt = time.perf_counter() - t0
            flip = route_flip_rate(policy, batch)
            report["route_flip_rate"].append(flip)
            print(json.dumps({"update": k + 1, "lr": args.lr, "route_flip_rate": round(flip, 4),
                              "update_s": round(dt, 2)}), flush=True)
    return report


if __name__ == "__main__":
    main()
