"""Sampling: truncation rules and the log-probabilities post-training relies on."""

from __future__ import annotations

import math

import torch

from dsv32.sampling import sample, truncated_logprobs


def test_greedy_and_truncations():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    tok, lp = sample(logits, temperature=0)
    assert tok.item() == 1 and lp.item() == 0.0
    lp_k = truncated_logprobs(logits, top_k=2)
    assert torch.isinf(lp_k[0, [0, 3]]).all() and math.isclose(lp_k[0, [1, 2]].exp().sum().item(), 1, rel_tol=1e-6)
    # top_p keeps the smallest prefix reaching the mass: probs ~ [.09,.67,.24,.03] -> p=0.7 keeps ids 1 and 2
    lp_p = truncated_logprobs(logits, top_p=0.7)
    assert torch.isfinite(lp_p[0]).tolist() == [False, True, True, False]
    # a tiny top_p keeps at least the arg-max
    assert torch.isfinite(truncated_logprobs(logits, top_p=1e-6)[0]).sum() == 1


def test_sampled_logprob_is_under_the_truncated_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    tok, lp = sample(logits, temperature=0.7, top_p=0.9, generator=g)
    full = truncated_logprobs(logits, temperature=0.7, top_p=0.9)
    assert torch.allclose(lp, full.gather(1, tok[:, None]).squeeze(1))
    assert torch.isfinite(lp).all()


def test_sampling_is_seeded():
    logits = torch.randn(3, 100)
    a = sample(logits, generator=torch.Generator().manual_seed(5))[0]
    b = sample(logits, generator=torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, b)
