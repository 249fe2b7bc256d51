"""GRPO maths as pure functions (tensors in, tensors out), with DeepSeek-V3.2's stability measures.

V3.2 report §3.1: GRPO with a group-mean baseline (no std division), the K3 KL estimate corrected by the
current/old importance ratio (eq. 7), Off-Policy Sequence Masking (eqs. 8-9) and Keep Sampling Mask (the
training policy renormalised over the sampler's top-k/top-p support). Keep Routing lives in the model's
``forced_routes``; the rollout side is in :mod:`dsv32.rl.rollout`.

Shapes: S = sequences of one call (one mini-batch), T = padded completion length, V = vocabulary.
``token_mask`` [S, T] is bool or {0, 1}: 1 on completion tokens the loss sees, 0 on padding and tool output.
Masked positions may hold anything (padding log-probs of ``-inf``, say): every function selects with
``torch.where`` before any arithmetic, so they never produce NaN, in the values or in the gradients.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [N, G] (N prompts, G completions each) -> advantages [N, G]: ``R - mean over the group``.

    No division by the group's standard deviation (V3.2 eq. 5). Callers flatten prompt-major:
    ``adv = group_advantages(r).reshape(-1)``.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, G], got shape {tuple(rewards.shape)}")
    r = rewards.float()
    return r - r.mean(dim=-1, keepdim=True)


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Plain K3 estimate of KL(pi_theta || pi_ref) per token: ``pi_ref/pi - log(pi_ref/pi) - 1``.

    Unbiased only when the tokens were drawn from pi_theta itself; kept for the ``--no-unbiased-kl`` ablation.
    """
    d = logp_ref - logp
    return torch.exp(d) - d - 1.0


def unbiased_kl(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(pi_theta || pi_ref) estimate for tokens drawn from pi_old (V3.2 eq. 7):
    ``exp(logp - logp_old) * (exp(logp_ref - logp) - (logp_ref - logp) - 1)``.

    The importance ratio is *not* detached: its gradient is what makes the KL gradient unbiased.
    """
    return torch.exp(logp - logp_old) * k3_kl(logp, logp_ref)


def _seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[S, T] -> [S]: mean over each row's masked tokens; a row without tokens gives 0."""
    n = mask.sum(dim=-1)
    return torch.where(mask, x, torch.zeros_like(x)).sum(dim=-1) / n.clamp(min=1)


def off_policy_mask(
    adv: torch.Tensor, logp_old: torch.Tensor, logp: torch.Tensor, token_mask: torch.Tensor, delta: float
) -> torch.Tensor:
    """Off-Policy Sequence Masking (V3.2 eq. 9): adv [S] -> bool [S], True = keep.

    A sequence is dropped iff its advantage is negative **and** the mean over its ``token_mask`` tokens of
    ``logp_old - logp`` exceeds ``delta`` (the geometric-mean ratio pi_theta/pi_old fell below e^-delta).
    Decided per sequence, never per token, and without gradient. ``logp_old`` is what the sampler actually
    used, so the test covers both policy drift and training/inference mismatch. A sequence without tokens
    is kept (it adds nothing to the loss either way).
    """
    with torch.no_grad():
        m = token_mask.bool()
        gap = torch.where(m, logp_old.float() - logp.float(), torch.zeros((), device=logp.device))
        mean_gap = _seq_mean(gap, m)
        drop = (adv < 0) & (mean_gap > delta) & m.any(dim=-1)
        return ~drop


def kept_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, kept: torch.Tensor | None = None, *, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities [S, T] of ``ids`` [S, T] under ``logits`` [S, T, V] / temperature, renormalised over
    ``kept`` (bool [S, T, V], True = the sampler's top-k/top-p kept this id; None = nothing truncated).

    ``logits[:, t]`` is the distribution ``ids[:, t]`` was drawn from (callers shift). This is Keep Sampling
    Mask: the training policy and the reference see the sampler's action subspace, so the importance ratio
    compares like with like. A position whose kept row is all False (padding) is left untruncated, so it
    stays finite; an id outside a non-empty kept set gets ``-inf`` (it could not have been sampled).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for training log-probabilities, got {temperature}")
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} disagree on [S, T]")
    x = logits.float() / temperature  # [S, T, V]
    if kept is not None:
        if kept.shape != x.shape:
            raise ValueError(f"kept {tuple(kept.shape)} must match logits {tuple(logits.shape)}")
        keep = kept.bool() | ~kept.bool().any(dim=-1, keepdim=True)  # empty row = padding: no truncation
        x = x.masked_fill(~keep, float("-inf"))
    picked = x.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)  # [S, T]
    return picked - torch.logsumexp(x, dim=-1)


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor | None,
    adv: torch.Tensor,
    token_mask: torch.Tensor,
    seq_mask: torch.Tensor | None,
    *,
    clip_eps: float,
    beta: float,
    unbiased: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss = -J with V3.2's unbiased KL and sequence masking (eqs. 5-9).

    J = (1/S) sum_i (1/|o_i|) sum_t [min(r A_i, clip(r, 1-eps, 1+eps) A_i) M_i - beta KL_t], r = exp(logp -
    logp_old), |o_i| = token_mask[i].sum(). M_i = ``seq_mask[i]`` (None: all kept): a dropped sequence adds 0
    to the policy term but still counts in 1/S (the paper's 1/G); the KL term is never masked by M.
    KL_t = :func:`unbiased_kl` (``unbiased=False``: plain :func:`k3_kl`, the ablation). ``logp_ref=None``
    means no reference model (requires ``beta == 0``; the reported ``kl`` is then 0).

    logp/logp_old/logp_ref [S, T], adv [S], token_mask [S, T], seq_mask [S]. Returns ``(loss, stats)``; stats
    (detached): ``ratio_mean`` and ``kl`` (means over token_mask tokens), ``clip_frac`` (share of token_mask
    tokens where ``min`` picks the clipped term), ``masked_frac`` (share of sequences dropped).
    """
    if logp_ref is None and beta != 0:
        raise ValueError(f"beta={beta} needs logp_ref (the reference model's log-probabilities)")
    m = token_mask.bool()
    S = m.shape[0]
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    # sanitise first: masked positions may hold +-inf, and inf - inf would put NaN into the gradient
    lp = torch.where(m, logp.float(), zero)
    lo = torch.where(m, logp_old.float(), zero)
    A = adv.float().unsqueeze(-1)  # [S, 1]
    keep = torch.ones(S, dtype=torch.bool, device=m.device) if seq_mask is None else seq_mask.bool()

    ratio = torch.exp(lp - lo)  # [S, T]
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * A
    policy = torch.minimum(unclipped, clipped)
    policy = torch.where(keep.unsqueeze(-1), policy, zero)  # OPSM: no policy gradient from dropped sequences

    if logp_ref is None:
        kl = torch.zeros_like(lp)
    else:
        lr = torch.where(m, logp_ref.float(), zero)
        kl = unbiased_kl(lp, lo, lr) if unbiased else k3_kl(lp, lr)
    per_token = torch.where(m, policy - beta * kl, zero)  # [S, T]
    J = _seq_mean(per_token, m).sum() / S
    loss = -J

    with torch.no_grad():
        n_tok = m.sum().clamp(min=1)
        stats = {
            "ratio_mean": torch.where(m, ratio, zero).sum() / n_tok,
            "clip_frac": (m & (clipped < unclipped)).sum() / n_tok,
            "masked_frac": (~keep).float().mean() if S else zero,
            "kl": torch.where(m, kl, zero).sum() / n_tok,
        }
    return loss, stats
