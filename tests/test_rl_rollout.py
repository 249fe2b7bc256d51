"""dsv32.rl.rollout / batch: the record's save/load round trip, per-completion seeds, group sampling through the
engine on the tiny V3.2 preset, and Keep Routing + Keep Sampling Mask reproducing the engine's log-probs."""

from __future__ import annotations

import pytest
import torch

from dsv32.engine import Engine
from dsv32.rl import replay_check
from dsv32.rl import rollout as rl_rollout
from dsv32.rl.batch import collate, policy_logprobs
from dsv32.rl.rollout import Rollout, completion_seed, sample_groups
from serving_fakes import peaked_tiny_v32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster than two under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rollouts() -> list[Rollout]:
    g = torch.Generator().manual_seed(0)
    routes = [torch.randint(0, 8, (3 + 4 - 1, 2), generator=g) for _ in range(2)]
    return [
        # engine-like: truncated, routed, ragged kept sets, one untruncated step (None)
        Rollout([1, 2, 3], [4, 5, 6, 7], [1, 1, 1, 1], [-0.5, -1.25, -0.1, -2.0],
                kept=[torch.tensor([4, 9]), None, torch.tensor([6]), torch.tensor([7, 8, 300])], routes=routes,
                reward=1.0, verdict="correct", temperature=0.7, top_p=0.9, top_k=5, max_tokens=4, seed=2**62 + 3,
                group=0, sample=1, step=7, finish_reason="stop", task="chain_sum", meta={"answer": "12"}),
        # multi-turn agent-like: tool output tokens with token_mask 0; nothing recorded besides log-probs
        Rollout([1], [10, 11, 12, 13, 14, 15], [1, 1, 0, 0, 1, 1], [-0.2, -0.3, 0.0, 0.0, -0.4, -0.5]),
        # routed, not truncated; an empty MoE layer list (a dense model) keeps its "recorded" flag
        Rollout([5, 5], [6], [1], [-3.0], routes=[r[:2] for r in routes], reward=0.0, verdict="wrong"),
        Rollout([5, 5], [6], [1], [-3.0], routes=[]),
    ]


def test_rollouts_save_load_round_trip(tmp_path):
    ros = _rollouts()
    path = tmp_path / "step_7" / "rollouts.jsonl"
    rl_rollout.save(ros, path)
    assert path.exists() and rl_rollout.sidecar_path(path).exists()
    back = rl_rollout.load(path)
    assert len(back) == len(ros)
    for a, b in zip(ros, back):
        for name in ("prompt_ids", "completion_ids", "token_mask", "logprobs", "reward", "verdict", "temperature",
                     "top_p", "top_k", "max_tokens", "seed", "group", "sample", "step", "finish_reason", "task",
                     "meta"):
            assert getattr(a, name) == getattr(b, name), name
        assert (a.kept is None) == (b.kept is None)
        for ka, kb in zip(a.kept or [], b.kept or []):
            assert (ka is None and kb is None) or torch.equal(ka, kb)
        assert (a.routes is None) == (b.routes is None)
        assert len(a.routes or []) == len(b.routes or [])
        for ra, rb in zip(a.routes or [], b.routes or []):
            assert rb.dtype == torch.long and torch.equal(ra, rb)


def test_rollout_checks_its_lengths():
    with pytest.raises(ValueError, match="token_mask"):
        Rollout([1], [2, 3], [1], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"routes\[0\]"):
        Rollout([1, 2], [3, 4], [1, 1], [0.0, 0.0], routes=[torch.zeros(4, 2, dtype=torch.long)])
    with pytest.raises(ValueError, match="empty kept set"):
        rl_rollout.save([Rollout([1], [2], [1], [0.0], kept=[torch.zeros(0, dtype=torch.long)])], "/tmp/unused.jsonl")


def test_completion_seed_is_a_function_of_its_key():
    keys = [(s, st, p, j) for s in (0, 1) for st in (0, 1) for p in (0, 1, 2) for j in (0, 1, 2)]
    seeds = [completion_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= s < 2**63 for s in seeds)
    assert completion_seed(3, 4, 5, 6) == completion_seed(3, 4, 5, 6)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return peaked_tiny_v32()


PROMPTS = [[1, 17, 33, 5, 9], [1, 200, 7], [1, 3, 3, 3, 3, 3, 40]]


def _sample(model, max_slots: int, **kw) -> list[Rollout]:
    eng = Engine(model, max_slots=max_slots, max_len=64, num_threads=1)
    try:
        return sample_groups(eng, PROMPTS, 3, run_seed=11, step=2, max_tokens=8, **kw)
    finally:
        eng.shutdown()


def test_sample_groups_records_and_is_reproducible(model):
    ros = _sample(model, 4, temperature=1.2, top_p=0.8)
    assert [(r.group, r.sample) for r in ros] == [(g, j) for g in range(3) for j in range(3)]
    n_moe = sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))
    for r in ros:
        assert r.prompt_ids == PROMPTS[r.group] and r.seed == completion_seed(11, 2, r.group, r.sample)
        C = len(r.completion_ids)
        assert 1 <= C <= 8 and len(r.logprobs) == C and r.token_mask == [1] * C
        assert all(lp <= 0 for lp in r.logprobs)
        assert r.kept is not None and all(int(t) in k.tolist() for t, k in zip(r.completion_ids, r.kept))
        assert r.routes is not None and len(r.routes) == n_moe
        assert all(x.shape == (len(r.prompt_ids) + C - 1, model.config.num_experts_per_tok) for x in r.routes)
    # a group's completions differ (own seeds), and the same keys redraw the same tokens under other batching
    assert len({tuple(r.completion_ids) for r in ros}) > 3
    again = _sample(model, 1, temperature=1.2, top_p=0.8)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in ros]
    # no truncation: no kept sets
    plain = _sample(model, 4, temperature=1.0, keep_routes=False)
    assert all(r.kept is None and r.routes is None for r in plain)


def test_keep_routing_and_sampling_mask_reproduce_engine_logprobs(model):
    """Issue 12 item 4 at equal weights: the training forward with the engine's routes forced and the kept mask
    reproduces the sampler's log-probs to 1e-5 per token; without the mask (top_p < 1) they differ."""
    ros = _sample(model, 4, temperature=0.9, top_p=0.7)
    V = model.config.vocab_size
    batch = collate(ros, V)
    with torch.no_grad():
        lp = policy_logprobs(model, batch)
        no_mask = policy_logprobs(model, collate(ros, V, keep_sampling_mask=False))
    m = batch.token_mask
    err = (lp - batch.logp_old).abs()[m]
    assert float(err.max()) < 1e-5, float(err.max())
    gap = (no_mask - batch.logp_old).abs()[m]
    truncated = torch.tensor([k is not None and len(k) < V for r in ros for k in r.kept])
    assert truncated.any() and float(gap.max()) > 1e-2


def test_replay_check_tiny_runs_and_reports():
    argv = "--prompts 2 --group-size 2 --max-tokens 4 --top-p 0.8 --updates 1 --lr 0.05".split()
    rep = replay_check.main(argv)
    row = rep["equal_weights"][0]
    assert row["tokens"] == 16 and row["kept_mask_max_abs"] < 1e-5 and row["no_mask_mean_abs"] > 1e-2
    assert len(rep["route_flip_rate"]) == 1 and 0 < rep["route_flip_rate"][0] <= 1
