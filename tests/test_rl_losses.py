"""dsv32.rl.losses against numbers derived by hand (in the comments), a Monte-Carlo check of the unbiased KL,
and gradient checks."""

from __future__ import annotations

import math

import pytest
import torch

from dsv32.rl.losses import group_advantages, grpo_loss, k3_kl, kept_logprobs, off_policy_mask, unbiased_kl

L = math.log
INF = float("inf")


def close(a: torch.Tensor, b, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a.float(), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------- advantages


def test_group_advantages_mean_baseline_without_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    # group means 0.5, 2, 0.75; no division by the std (the last group's std would rescale it)
    expected = [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [2.25, -0.75, -0.75, -0.75]]
    close(group_advantages(r), expected)
    close(group_advantages(r).reshape(-1)[4:8], [0.0] * 4)  # prompt-major flattening
    with pytest.raises(ValueError, match=r"\[N, G\]"):
        group_advantages(torch.ones(4))


# ------------------------------------------------------------------------------------------------- KL


def test_unbiased_kl_by_hand():
    # pi=0.5, pi_old=0.25, pi_ref=0.25: ratio 2, pi_ref/pi = 0.5, K3 = 0.5 - ln 0.5 - 1 = ln 2 - 0.5
    # -> 2 (ln 2 - 0.5) = 0.3862944.  pi = pi_ref: K3 = 0 whatever the ratio.
    # pi=0.2, pi_old=0.4, pi_ref=0.4: ratio 0.5, pi_ref/pi = 2, K3 = 2 - ln 2 - 1 -> 0.5 (1 - ln 2) = 0.1534264
    logp = torch.tensor([[L(0.5), L(0.3)], [L(0.2), L(0.5)]])
    old = torch.tensor([[L(0.25), L(0.9)], [L(0.4), L(0.5)]])
    ref = torch.tensor([[L(0.25), L(0.3)], [L(0.4), L(0.5)]])
    close(unbiased_kl(logp, old, ref), [[2 * (L(2) - 0.5), 0.0], [0.5 * (1 - L(2)), 0.0]])
    close(k3_kl(logp, ref), [[L(2) - 0.5, 0.0], [1 - L(2), 0.0]])


def test_unbiased_kl_monte_carlo_matches_exact_kl_and_plain_k3_does_not():
    # tokens drawn from pi_old, which differs from pi_theta (several mini-batches after the rollout)
    theta = torch.tensor([0.6, 0.2, 0.1, 0.1])
    old = torch.tensor([0.1, 0.2, 0.3, 0.4])
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((theta * (theta / ref).log()).sum())  # KL(pi_theta || pi_ref) = 0.2974
    x = torch.multinomial(old, 100_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = unbiased_kl(theta.log()[x], old.log()[x], ref.log()[x])
    se = float(est.std()) / math.sqrt(len(x))
    assert abs(float(est.mean()) - exact) < 3 * se, (float(est.mean()), exact, se)
    plain = k3_kl(theta.log()[x], ref.log()[x])  # estimates KL under pi_old's token distribution instead
    se_plain = float(plain.std()) / math.sqrt(len(x))
    assert abs(float(plain.mean()) - exact) > 50 * se_plain, (float(plain.mean()), exact, se_plain)


def test_unbiased_kl_gradient_is_unbiased_and_a_detached_ratio_is_not():
    # The gradient w.r.t. pi_theta's logits z, averaged over tokens from pi_old, matches the exact gradient of
    # KL(pi_theta || pi_ref). Per-sample gradients: d est/dz = (d est/d logp) * (onehot(x) - softmax(z)).
    theta = torch.tensor([0.6, 0.2, 0.1, 0.1])
    old = torch.tensor([0.1, 0.2, 0.3, 0.4])
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25])
    z = theta.log().clone().requires_grad_()
    (z.softmax(-1) * (z.log_softmax(-1) - ref.log())).sum().backward()
    exact = z.grad
    n = 100_000
    x = torch.multinomial(old, n, replacement=True, generator=torch.Generator().manual_seed(1))
    jac = torch.nn.functional.one_hot(x, 4).float() - theta  # d logp_x / dz  [n, 4]

    def per_sample_grads(kl_fn) -> torch.Tensor:
        lp = theta.log()[x].clone().requires_grad_()
        kl_fn(lp, old.log()[x], ref.log()[x]).sum().backward()
        return lp.grad[:, None] * jac

    g = per_sample_grads(unbiased_kl)
    z_scores = (g.mean(0) - exact) / (g.std(0) / math.sqrt(n))
    assert z_scores.abs().max() < 3, z_scores
    detached = per_sample_grads(lambda lp, lo, lr: torch.exp(lp - lo).detach() * k3_kl(lp, lr))
    z_det = (detached.mean(0) - exact) / (detached.std(0) / math.sqrt(n))
    assert z_det.abs().max() > 20, z_det


# ------------------------------------------------------------------------------------------------- OPSM


def test_off_policy_mask_by_hand():
    adv = torch.tensor([-1.0, -1.0, 1.0, -1.0, -0.5])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 0, 0]])
    logp = torch.zeros(5, 3)
    logp[0, 2] = -INF  # masked position: logp_old - logp = +inf there must not count
    old = torch.tensor([
        [0.3, 0.5, 0.0],  # mean over 2 tokens 0.4 > 0.35, adv < 0 -> drop
        [0.3, 0.3, 0.3],  # mean 0.3 <= 0.35 -> keep
        [1.0, 1.0, 1.0],  # far off-policy but adv > 0 -> keep (only negatives are masked)
        [9.0, 9.0, 9.0],  # no tokens -> keep
        [0.36, -5.0, -5.0],  # one token: 0.36 > 0.35 -> drop (the masked -5 would have kept it)
    ])
    keep = off_policy_mask(adv, old, logp, mask, delta=0.35)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, True, True, True, False]
    assert off_policy_mask(adv, old, logp, mask.bool(), delta=0.35).tolist() == keep.tolist()


def test_off_policy_mask_carries_no_gradient():
    logp = torch.zeros(2, 2, requires_grad=True)
    keep = off_policy_mask(torch.tensor([-1.0, 1.0]), torch.ones(2, 2), logp, torch.ones(2, 2), delta=0.5)
    assert not keep.requires_grad and keep.tolist() == [False, True]


# ------------------------------------------------------------------------------------- Keep Sampling Mask


def test_kept_logprobs_by_hand():
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]]))  # [S=1, T=3, V=3]
    ids = torch.tensor([[2, 0, 1]])
    kept = torch.tensor([[[False, True, True], [False, True, True], [False, False, False]]])
    # t=0: full softmax 3/6; kept {1, 2}: 3/5.  t=1: id 0 was not kept -> -inf.  t=2: empty kept row
    # (padding) -> untruncated 1/3
    close(kept_logprobs(logits, ids), [[L(3 / 6), L(1 / 6), L(1 / 3)]])
    close(kept_logprobs(logits, ids, kept), [[L(3 / 5), -INF, L(1 / 3)]])
    # temperature 0.5: logits/0.5 = log [1, 4, 9] -> full 9/14, kept {1, 2} 9/13
    close(kept_logprobs(logits, ids, kept, temperature=0.5)[0, 0], L(9 / 13))
    close(kept_logprobs(logits, ids, temperature=0.5)[0, 0], L(9 / 14))
    with pytest.raises(ValueError, match="temperature"):
        kept_logprobs(logits, ids, temperature=0.0)


def test_kept_logprobs_gradient_stays_in_the_kept_set():
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0]]])).requires_grad_()
    kept = torch.tensor([[[False, True, True]]])
    kept_logprobs(logits, torch.tensor([[2]]), kept).sum().backward()
    # d log p_2 / d x_k = [k == 2] - p_k over the kept set {1: 2/5, 2: 3/5}; 0 outside it
    close(logits.grad, [[[0.0, -2 / 5, 1 - 3 / 5]]])


# ------------------------------------------------------------------------------------------------- GRPO


def _grpo_case():
    """Three sequences, T=2, eps=0.2, beta=0.1 (derivation in test_grpo_loss_by_hand)."""
    logp = torch.tensor([[L(0.3), L(0.9 * 0.5)], [L(0.2), -INF], [L(0.5), L(0.5)]])
    old = torch.tensor([[L(0.2), L(0.5)], [L(0.4), 0.0], [L(0.5), L(0.5)]])
    ref = torch.tensor([[L(0.3), L(0.9 * 0.5)], [L(0.4), -INF], [L(0.25), L(0.25)]])
    adv = torch.tensor([1.0, -1.0, -2.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    seq_mask = torch.tensor([True, True, False])
    return logp, old, ref, adv, mask, seq_mask


def test_grpo_loss_by_hand():
    logp, old, ref, adv, mask, seq_mask = _grpo_case()
    # seq 0 (A=+1): r = 1.5, 0.9. min(1.5, clip 1.2) = 1.2 (clipped); min(0.9, 0.9) = 0.9 (tie: not clipped).
    #   pi = pi_ref -> KL 0. Per sequence (1.2 + 0.9) / 2 = 1.05.
    # seq 1 (A=-1), one token (the -inf padding must not leak): r = 0.5, min(-0.5, -0.8) = -0.8 (clipped);
    #   KL = 0.5 (2 - ln 2 - 1) = 0.1534264 -> -0.8 - 0.1 * 0.1534264.
    # seq 2 (A=-2) dropped by OPSM: policy 0, but KL still counts: r = 1, K3 = 0.5 + ln 2 - 1 = 0.1931472
    #   per token -> -0.1 * 0.1931472; and the sequence still counts in 1/S.
    kl1, kl2 = 0.5 * (1 - L(2)), L(2) - 0.5
    J = (1.05 + (-0.8 - 0.1 * kl1) + (-0.1 * kl2)) / 3
    loss, stats = grpo_loss(logp, old, ref, adv, mask, seq_mask, clip_eps=0.2, beta=0.1)
    close(loss, -J)  # -0.0717809
    close(stats["ratio_mean"], (1.5 + 0.9 + 0.5 + 1 + 1) / 5)
    close(stats["clip_frac"], 2 / 5)
    close(stats["masked_frac"], 1 / 3)
    close(stats["kl"], (kl1 + 2 * kl2) / 5)
    assert all(torch.isfinite(v) for v in stats.values())
    # a bool mask and {0,1} floats agree
    loss_f, _ = grpo_loss(logp, old, ref, adv, mask.float(), seq_mask.float(), clip_eps=0.2, beta=0.1)
    close(loss_f, -J)
    # plain K3 (the ablation): seq 1's KL without the ratio is 1 - ln 2
    loss_k3, st = grpo_loss(logp, old, ref, adv, mask, seq_mask, clip_eps=0.2, beta=0.1, unbiased=False)
    close(loss_k3, -(1.05 + (-0.8 - 0.1 * (1 - L(2))) + (-0.1 * kl2)) / 3)


def test_grpo_loss_gradients_by_hand():
    logp, old, ref, adv, mask, seq_mask = _grpo_case()
    logp = logp.clone().requires_grad_()
    loss, _ = grpo_loss(logp, old, ref, adv, mask, seq_mask, clip_eps=0.2, beta=0.1)
    loss.backward()
    # d KL / d logp = r K3 + r (1 - pi_ref/pi)  (the first term is the ratio's own gradient: not detached)
    # seq 0 t0: clipped -> no policy gradient; KL at pi = pi_ref: r*0 + r*(1-1) = 0          -> 0
    # seq 0 t1: unclipped, d(r A)/d logp = r A = 0.9; loss = -J/... -> -(1/3)(1/2)(0.9)     = -0.15
    # seq 1 t0: clipped; d KL = 0.5 (1 - ln 2) + 0.5 (1 - 2) = -0.3465736 -> (1/3)(0.1)(-0.3465736)
    # seq 1 t1: padding -> exactly 0 (and not NaN, although logp = -inf there)
    # seq 2: dropped -> no policy gradient; d KL = (ln 2 - 0.5) + 1 (1 - 0.5) = ln 2 -> (1/3)(1/2)(0.1) ln 2
    g1 = 0.5 * (1 - L(2)) + 0.5 * (1 - 2)
    expected = [[0.0, -0.15], [0.1 * g1 / 3, 0.0], [0.1 * L(2) / 6, 0.1 * L(2) / 6]]
    close(logp.grad, expected)
    # with a detached ratio the dropped sequence's gradient would be (1/6)(0.1)(0.5), not (1/6)(0.1) ln 2
    assert abs(float(logp.grad[2, 0]) - 0.1 * 0.5 / 6) > 1e-3


def test_grpo_dropped_sequence_gives_no_policy_gradient():
    logp = torch.tensor([[L(0.3), L(0.55)], [L(0.3), L(0.55)]], requires_grad=True)
    old = torch.tensor([[L(0.5), L(0.5)], [L(0.5), L(0.5)]])
    adv = torch.tensor([-1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, _ = grpo_loss(logp, old, None, adv, mask, torch.tensor([False, True]), clip_eps=0.2, beta=0.0)
    loss.backward()
    assert logp.grad[0].abs().max() == 0
    # seq 1 t1: r = 1.1 inside the clip range, A = -1: grad of -J = (1/2)(1/2)(1.1) = 0.275
    # seq 1 t0: r = 0.6 < 0.8, A = -1 -> min(-0.6, -0.8) = clipped -> 0
    close(logp.grad[1], [0.0, 0.275])
    with pytest.raises(ValueError, match="logp_ref"):
        grpo_loss(logp, old, None, adv, mask, None, clip_eps=0.2, beta=0.1)


def test_grpo_empty_sequence_contributes_zero():
    logp = torch.full((2, 3), -INF)
    logp[0] = torch.tensor([L(0.5), L(0.5), L(0.5)])
    old = torch.full((2, 3), L(0.25))
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    # seq 0: r = 2 everywhere, A = 1 -> clipped to 1.2 each, mean 1.2; seq 1 has no tokens -> 0; J = 1.2/2
    logp.requires_grad_()
    loss, stats = grpo_loss(logp, old, old, torch.tensor([1.0, -1.0]), mask, None, clip_eps=0.2, beta=0.0)
    close(loss, -0.6)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[1].abs().max() == 0
    close(stats["clip_frac"], 1.0)
