"""dsv32.rl.step: GRPO updates on the tiny V3.2 preset, from rollouts the engine sampled."""

from __future__ import annotations

import copy

import pytest
import torch

from dsv32.engine import Engine
from dsv32.llama import LlamaConfig, LlamaModel
from dsv32.rl.batch import collate, policy_logprobs, route_flip_rate
from dsv32.rl.rollout import Rollout, sample_groups
from dsv32.rl.step import GRPOConfig, frozen_copy, grpo_update
from serving_fakes import peaked_tiny_v32

PROMPTS = [[1, 17, 33, 5, 9], [1, 200, 7], [1, 3, 3, 3, 3, 3, 40], [1, 99]]
G = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster than two under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rollouts() -> list[Rollout]:
    model = peaked_tiny_v32()
    eng = Engine(model, max_slots=8, max_len=64, num_threads=1)
    try:
        ros = sample_groups(eng, PROMPTS, G, run_seed=5, step=0, max_tokens=6, temperature=1.5, top_p=0.95)
    finally:
        eng.shutdown()
    for r in ros:  # a rule reward: the share of even token ids (any verifiable rule would do)
        r.reward = sum(t % 2 == 0 for t in r.completion_ids) / len(r.completion_ids)
    return ros


def _policy():
    return peaked_tiny_v32()  # the same seed: the weights the rollouts were sampled with


def test_on_policy_step_starts_at_ratio_one_and_learns(rollouts):
    policy = _policy()
    ref = frozen_copy(policy)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    before = collate(rollouts, policy.config.vocab_size)
    with torch.no_grad():
        lp0 = policy_logprobs(policy, before)
    stats = grpo_update(policy, ref, opt, rollouts, G, GRPOConfig(beta=0.01, minibatches=1))
    # at equal weights the replayed forward is the sampler: ratio 1, nothing clipped, no mismatch
    assert abs(stats["ratio_mean"] - 1) < 1e-5 and stats["clip_frac"] == 0
    assert abs(stats["mismatch_kl"]) < 1e-5
    assert abs(stats["kl"]) < 1e-5 and stats["tokens"] == sum(len(r.completion_ids) for r in rollouts)
    with torch.no_grad():
        lp1 = policy_logprobs(policy, before)
    # the update moved each sequence's log-likelihood in the direction of its advantage
    r = torch.tensor([x.reward for x in rollouts]).view(-1, G)
    adv = (r - r.mean(-1, keepdim=True)).reshape(-1)
    m = before.token_mask
    dll = torch.where(m, lp1 - lp0, torch.zeros(())).sum(-1)
    assert float((dll * adv).sum()) > 0
    # the weights moved: some routes would flip without replay (the statistic is taken after the update)
    assert stats["route_flip_rate"] == route_flip_rate(policy, before) > 0
    with torch.no_grad():  # ... and replaying the recorded routes changes the log-probs the loss sees
        free = policy_logprobs(policy, collate(rollouts, policy.config.vocab_size, keep_routing=False))
    assert float((free - lp1).abs()[m].max()) > 1e-4
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), _policy().parameters()))  # ref stayed put
    assert not any(p.requires_grad for p in ref.parameters())


def test_minibatches_go_off_policy_and_opsm_masks(rollouts):
    policy, ref = _policy(), _policy()
    opt = torch.optim.SGD(policy.parameters(), lr=2.0)
    cfg = GRPOConfig(beta=0.0, delta=0.0, minibatches=4)
    stats = grpo_update(policy, None, opt, rollouts, G, cfg)
    assert abs(stats["ratio_mean"] - 1) > 1e-3  # later mini-batches see pi_theta != pi_old
    assert stats["masked_frac"] > 0
    # the ablation switches reach the forward: no replay, no kept mask -> still a finite step
    p2 = copy.deepcopy(ref)
    off = GRPOConfig(minibatches=2, keep_routing=False, keep_sampling_mask=False, opsm=False, unbiased_kl=False,
                     beta=0.01)
    s2 = grpo_update(p2, ref, torch.optim.SGD(p2.parameters(), lr=0.1), rollouts, G, off)
    assert s2["masked_frac"] == 0 and s2["route_flip_rate"] != s2["route_flip_rate"]  # NaN: nothing recorded
    assert abs(s2["mismatch_kl"]) > 1e-3  # the full softmax is not the truncated sampler


def test_grpo_update_checks_inputs(rollouts):
    policy = _policy()
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="groups of 5"):
        grpo_update(policy, None, opt, rollouts, 5, GRPOConfig())
    with pytest.raises(ValueError, match="reference model"):
        grpo_update(policy, None, opt, rollouts, G, GRPOConfig(beta=0.1))


def test_dense_llama_family_without_routes():
    """A dense model (Llama family, e.g. SmolLM2) has no routes: sampled and trained with Keep Routing off,
    the training forward still reproduces the sampler's log-probs (top-k truncation, kept mask on)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000.0,
                      index_n_heads=2, index_head_dim=16, index_rope_head_dim=8, index_topk=16)
    model = LlamaModel(cfg).eval()
    eng = Engine(model, max_slots=4, max_len=64, num_threads=1)
    try:
        ros = sample_groups(eng, [[1, 2, 3], [1, 5, 6, 7, 8]], 2, run_seed=0, step=0, max_tokens=6, top_k=20,
                            keep_routes=False)
    finally:
        eng.shutdown()
    batch = collate(ros, cfg.vocab_size, keep_routing=False)
    assert batch.routes is None and batch.kept is not None
    with torch.no_grad():
        lp = policy_logprobs(model, batch)
    assert float((lp - batch.logp_old).abs()[batch.token_mask].max()) < 1e-5
    for r in ros:
        r.reward = float(r.completion_ids[0] % 2)
    stats = grpo_update(model, None, torch.optim.SGD(model.parameters(), lr=0.1), ros, 2,
                        GRPOConfig(keep_routing=False))
    assert abs(stats["ratio_mean"] - 1) < 1e-5 and stats["route_flip_rate"] != stats["route_flip_rate"]
