"""Keep Routing / Keep Sampling Mask, measured (issue 12 item 4): ``python -m dsv32.rl.replay_check``.

Samples groups from a randomly initialised tiny V3.2 model (MLA + DSA + MoE) through the engine, then
1. at equal weights, compares the training forward's log-probs with the engine's (the sampler's, after
   temperature and top-p): with routes replayed and the kept mask, without the mask, without the replay;
2. takes GRPO steps (Adam) on a rule reward and reports, after each, the share of (position, MoE layer) routes
   of the sampled batch that the moved weights would route differently (what replay prevents).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from dsv32.config import ModelConfig
from dsv32.engine import Engine
from dsv32.model import Transformer
from dsv32.rl.batch import collate, policy_logprobs, route_flip_rate
from dsv32.rl.rollout import sample_groups
from dsv32.rl.step import GRPOConfig, grpo_update


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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.7, 0.9, 1.0])
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = tiny_model(args.seed)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    prompts = [[1] + torch.randint(2, V, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 40, (args.prompts,), generator=g)]
    report: dict = {"equal_weights": [], "route_flip_rate": []}
    ros = None
    for top_p in args.top_p:
        eng = Engine(model, max_slots=8, max_len=128)
        try:
            ros = sample_groups(eng, prompts, args.group_size, run_seed=args.seed, step=0,
                                max_tokens=args.max_tokens, temperature=args.temperature, top_p=top_p)
        finally:
            eng.shutdown()
        b = collate(ros, V)
        m = b.token_mask
        with torch.no_grad():
            row = {"top_p": top_p, "tokens": int(m.sum())}
            for name, batch in (("replay+mask", b), ("no_mask", collate(ros, V, keep_sampling_mask=False)),
                                ("no_replay", collate(ros, V, keep_routing=False))):
                d = (policy_logprobs(model, batch) - b.logp_old).abs()[m]
                row[f"{name}_max_abs"], row[f"{name}_mean_abs"] = float(d.max()), float(d.mean())
        report["equal_weights"].append(row)
        print(json.dumps(row))
    assert ros is not None
    for r in ros:  # a rule reward on the last batch: the share of even token ids
        r.reward = sum(t % 2 == 0 for t in r.completion_ids) / len(r.completion_ids)
    policy = copy.deepcopy(model)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    batch = collate(ros, V)
    for k in range(args.updates):
        grpo_update(policy, None, opt, ros, args.group_size, GRPOConfig(minibatches=1))
        flip = route_flip_rate(policy, batch)
        report["route_flip_rate"].append(flip)
        print(json.dumps({"update": k + 1, "lr": args.lr, "route_flip_rate": round(flip, 4)}))
    return report


if __name__ == "__main__":
    main()
