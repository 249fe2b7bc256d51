"""One GRPO step: a rollout batch (G completions per prompt, prompt-major) -> several mini-batch updates.

This is the step a run loop calls once per RL step (``dsv32.train.run``); sampling, scoring and the loop around
it are the caller's. Each V3.2 stability measure (report §3.1) is a switch of :class:`GRPOConfig`, so the
ablations change one field.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv32.rl.batch import Batch, collate, policy_logprobs, route_flip_rate
from dsv32.rl.losses import group_advantages, grpo_loss, k3_kl, off_policy_mask, unbiased_kl
from dsv32.rl.rollout import Rollout


@dataclass(frozen=True)
class GRPOConfig:
    """clip_eps: PPO clip range. beta: KL weight (V3.2: weak or none for maths). delta: OPSM threshold on the
    mean log-ratio log(pi_old/pi_theta) (the paper gives no value; 0.5 is TRL's suggested start).
    minibatches: optimiser steps per rollout batch (> 1 makes later mini-batches off-policy)."""

    clip_eps: float = 0.2
    beta: float = 0.0
    delta: float = 0.5
    minibatches: int = 1
    max_grad_norm: float = 1.0
    unbiased_kl: bool = True
    opsm: bool = True
    keep_routing: bool = True
    keep_sampling_mask: bool = True


def _chunks(n: int, k: int) -> list[range]:
    """Split ``range(n)`` into ``k`` contiguous parts as equal as possible."""
    if not 1 <= k <= n:
        raise ValueError(f"minibatches={k} must be between 1 and the number of rollouts ({n})")
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(k)]


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The reference policy: a copy of the initial weights that never trains."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


@torch.no_grad()
def monitored_kl(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, token_mask: torch.Tensor,
                 *, unbiased: bool = True) -> torch.Tensor:
    """The KL estimate ``grpo_loss`` would report, for a run whose loss carries no KL term (beta = 0): the
    drift from the reference stays visible in the metrics."""
    m = token_mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    lp, lo, lr = (torch.where(m, x.float(), zero) for x in (logp, logp_old, logp_ref))
    kl = unbiased_kl(lp, lo, lr) if unbiased else k3_kl(lp, lr)
    return torch.where(m, kl, zero).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def reference_logprobs(ref: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The frozen reference policy's log-probs [S, T], seen through the same routes and kept sets as the
    policy (the KL compares the two on the sampler's action subspace)."""
    return policy_logprobs(ref, batch)


def grpo_update(
    policy: torch.nn.Module,
    ref: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    rollouts: Sequence[Rollout],
    group_size: int,
    cfg: GRPOConfig,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Advantages per group, then ``cfg.minibatches`` optimiser steps over contiguous slices of the batch.

    Every rollout needs its ``reward``. Returns means over the mini-batches of the loss statistics, plus
    ``mismatch_kl`` (mean of ``logp_old - logp`` over the first mini-batch's tokens: the training/inference
    gap before any update), ``route_flip_rate`` (on the first mini-batch after the last update: the share of
    routes that free routing would now choose differently from the sampler's; NaN without recorded routes),
    ``tokens`` and ``t_reference`` (seconds in the reference forward). With a reference and ``beta = 0`` the
    reported ``kl`` is monitored only (no gradient).
    """
    if len(rollouts) % group_size:
        raise ValueError(f"{len(rollouts)} rollouts do not split into groups of {group_size}")
    if any(ro.reward is None for ro in rollouts):
        raise ValueError("every rollout needs a reward before the update")
    if cfg.beta != 0 and ref is None:
        raise ValueError(f"beta={cfg.beta} needs a reference model")
    V = policy.config.vocab_size
    rewards = torch.tensor([float(ro.reward) for ro in rollouts])  # type: ignore[arg-type]
    adv = group_advantages(rewards.view(-1, group_size)).reshape(-1)  # [S] prompt-major

    totals: dict[str, float] = {}
    flip = math.nan
    mismatch = math.nan
    tokens = 0
    t_ref = 0.0
    for k, part in enumerate(_chunks(len(rollouts), cfg.minibatches)):
        mb = collate([rollouts[i] for i in part], V, keep_sampling_mask=cfg.keep_sampling_mask,
                     keep_routing=cfg.keep_routing).to(device)
        a = adv[part.start : part.stop].to(device)
        if k == 0:
            first = mb
        logp_ref = None
        if ref is not None:  # with beta = 0 the reference only monitors the KL (no gradient through it)
            t0 = time.perf_counter()
            logp_ref = reference_logprobs(ref, mb)
            t_ref += time.perf_counter() - t0
        logp = policy_logprobs(policy, mb)
        m = mb.token_mask
        if k == 0:
            with torch.no_grad():
                gap = torch.where(m, mb.logp_old - logp, torch.zeros((), device=logp.device))
                mismatch = float(gap.sum() / m.sum().clamp(min=1))
        seq_mask = off_policy_mask(a, mb.logp_old, logp, m, cfg.delta) if cfg.opsm else None
        loss, stats = grpo_loss(logp, mb.logp_old, logp_ref if cfg.beta != 0 else None, a, m, seq_mask,
                                clip_eps=cfg.clip_eps, beta=cfg.beta, unbiased=cfg.unbiased_kl)
        if cfg.beta == 0 and logp_ref is not None:
            stats["kl"] = monitored_kl(logp, mb.logp_old, logp_ref, m, unbiased=cfg.unbiased_kl)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        tokens += int(m.sum())
        for name, v in {"loss": loss.detach(), **stats}.items():
            totals[name] = totals.get(name, 0.0) + float(v) / cfg.minibatches
    if first.routes is not None:  # after the updates: what replay kept fixed that free routing would change
        flip = route_flip_rate(policy, first)
    return {**totals, "mismatch_kl": mismatch, "route_flip_rate": flip, "tokens": float(tokens),
            "reward_mean": float(rewards.mean()), "t_reference": t_ref}
