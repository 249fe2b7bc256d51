"""Engine: continuous batching gives each request what it would get alone; prefix reuse, memory budget,
overload refusal, cancellation, and the post-training outputs (sampled-distribution logprobs, allowed sets,
MoE routes)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from dsv32.engine import (
    Engine,
    EngineClosed,
    EngineOverloaded,
    RequestTooLarge,
    SamplingParams,
    common_prefix_len,
    draw,
)
from dsv32.generate import generate_ids
from dsv32.model import Transformer
from dsv32.sampling import truncated_logprobs
from serving_fakes import peaked_tiny_v32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on shared cores run far faster on one thread (no OpenMP spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> Transformer:
    """Tiny V3.2 (MLA + DSA + MoE) with weights large enough that greedy choices are far from ties."""
    return peaked_tiny_v32()


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, 500, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


GREEDY = SamplingParams(max_tokens=24, temperature=0)


def test_batched_equals_alone_greedy(model):
    ps = prompts(6)
    alone = [list(generate_ids(model, p, max_new_tokens=24, temperature=0)) for p in ps]
    # 6 requests on 3 slots with different lengths: requests join and leave between steps
    eng = Engine(model, max_slots=3, max_len=128)
    try:
        lengths = [24, 5, 17, 24, 9, 12]
        handles = [eng.submit(p, SamplingParams(max_tokens=k, temperature=0)) for p, k in zip(ps, lengths)]
        results = [h.result() for h in handles]
        for r, a, k in zip(results, alone, lengths):
            assert r.sequences[0].tokens == a[:k]
            assert r.sequences[0].finish_reason == "length"
        # batching happened: far fewer decode forwards than generated tokens
        assert eng.stats["decode_steps"] < 0.6 * eng.stats["generated_tokens"]
    finally:
        eng.shutdown()


def test_seeded_sampling_batched_equals_alone_and_n(model):
    p, other = prompts(1, seed=3)[0], prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=11, n=2)
    eng = Engine(model, max_slots=4, max_len=96)
    try:
        busy = eng.submit(other, SamplingParams(max_tokens=30, temperature=1.0, seed=1))
        res = eng.generate(p, params)
        busy.result()
        # alone: sequence i samples with seed + i, whatever else shares the batch
        for i, seq in enumerate(res.sequences):
            alone = eng.generate(p, SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=11 + i))
            assert seq.tokens == alone.sequences[0].tokens
    finally:
        eng.shutdown()
    assert res.sequences[0].tokens != res.sequences[1].tokens


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(4000)]), minlength=5).float() / 4000
    assert counts[1] == 0 and counts[4] == 0
    assert torch.allclose(counts, probs, atol=0.03)
    one_hot = torch.zeros(7)
    one_hot[6] = 1.0
    assert {draw(one_hot, g) for _ in range(50)} == {6}


def test_prefix_reuse_prefills_only_new_tokens(model):
    eng = Engine(model, max_slots=2, max_len=160)
    try:
        first = prompts(1, seed=5)[0] + list(range(40, 80))
        r1 = eng.generate(first, GREEDY)
        assert r1.cached_tokens == 0
        other = eng.generate(prompts(1, seed=6)[0], GREEDY)  # unrelated work takes the other slot (LRU)
        assert other.cached_tokens == 0
        follow_up = first + r1.sequences[0].tokens + [7, 8, 9, 10]
        before = eng.stats["prefilled_tokens"]
        r2 = eng.generate(follow_up, GREEDY)
        prefilled = eng.stats["prefilled_tokens"] - before
        # everything fed before (prompt + all generated tokens but the last, never fed) is reused
        assert r2.cached_tokens == len(first) + len(r1.sequences[0].tokens) - 1
        assert prefilled == len(follow_up) - r2.cached_tokens == 5
        # same prompt again: all but the last token is cached (its logits are needed)
        r3 = eng.generate(follow_up, GREEDY)
        assert r3.cached_tokens == len(follow_up) - 1
        assert r3.sequences[0].tokens == r2.sequences[0].tokens
    finally:
        eng.shutdown()
    fresh = list(generate_ids(model, follow_up, max_new_tokens=24, temperature=0))
    assert r2.sequences[0].tokens == fresh


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2


def test_memory_budget_and_refusals(model):
    per_token = Engine(model, max_slots=1, max_len=64)
    bpt = per_token.bytes_per_token
    per_token.shutdown()
    eng = Engine(model, max_slots=8, max_len=100, memory_budget=int(2.5 * 100 * bpt), max_waiting=0)
    try:
        assert eng.max_slots == 2 and eng.cache_bytes <= 2.5 * 100 * bpt
        with pytest.raises(RequestTooLarge):
            eng.submit(list(range(2, 102)), GREEDY)  # prompt does not fit a slot
        with pytest.raises(RequestTooLarge):
            eng.submit([1, 2], SamplingParams(n=3))
        long = SamplingParams(max_tokens=120, temperature=0)
        h1, h2 = eng.submit([1, 2, 3], long), eng.submit([4, 5, 6], long)
        with pytest.raises(EngineOverloaded) as exc:
            eng.submit([7, 8], GREEDY)  # both slots busy, no queue
        assert exc.value.retry_after >= 1
        # the completion is capped by the slot: 3 prompt tokens + 120 > 100 -> 97 tokens, finish "length"
        s1 = h1.result().sequences[0]
        assert len(s1.tokens) == 97 and s1.finish_reason == "length"
        h2.result()
        assert eng.generate([7, 8], GREEDY).sequences[0].finish_reason == "length"  # capacity is back
    finally:
        eng.shutdown()
    small = Engine(model, max_slots=4, max_len=4096, memory_budget=300 * bpt)
    assert (small.max_slots, small.max_len) == (1, 300)  # one slot, shortened to the budget
    small.shutdown()
    with pytest.raises(ValueError):
        Engine(model, memory_budget=4 * bpt)
    with pytest.raises(EngineClosed):
        small.submit([1], GREEDY)


def test_cancel_frees_slot_and_queue(model):
    eng = Engine(model, max_slots=1, max_len=512, max_waiting=2)
    try:
        h = eng.submit([1, 2, 3], SamplingParams(max_tokens=500, temperature=0))
        waiting = eng.submit([4, 5], SamplingParams(max_tokens=5, temperature=0))
        it = iter(h)
        first = [next(it) for _ in range(3)]
        assert all(o.token is not None for o in first)
        waiting.cancel()
        h.cancel()
        rest = list(it)
        assert rest[-1].finish_reason == "abort" and rest[-1].token is None
        assert len(first) + len(rest) < 100
        w = waiting.result()
        assert w.sequences[0].finish_reason == "abort" and w.sequences[0].tokens == []
        ok = eng.generate([6, 7], SamplingParams(max_tokens=3, temperature=0))
        assert ok.sequences[0].finish_reason == "length" and eng.load()["busy_slots"] == 0
    finally:
        eng.shutdown()


def test_stop_token_is_reported_with_its_logprob(model):
    p = prompts(1, seed=8)[0]
    ref = list(generate_ids(model, p, max_new_tokens=10, temperature=0))
    stop = ref[4]
    first = ref.index(stop)
    eng = Engine(model, max_slots=2, max_len=64)
    try:
        r = eng.generate(p, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop,)))
    finally:
        eng.shutdown()
    seq = r.sequences[0]
    assert seq.tokens == ref[: first + 1] and seq.finish_reason == "stop"


def test_post_training_outputs_match_a_full_forward(model):
    p = prompts(1, seed=9)[0]
    params = SamplingParams(
        max_tokens=12,
        temperature=0.8,
        top_k=40,
        top_p=0.9,
        seed=3,
        logprobs=True,
        top_logprobs=3,
        return_allowed=True,
        return_routes=True,
    )
    eng = Engine(model, max_slots=2, max_len=64)
    try:
        eng.generate(p, GREEDY)  # a cached prefix exists, but return_routes turns reuse off
        r = eng.generate(p, params)
    finally:
        eng.shutdown()
    seq = r.sequences[0]
    assert r.cached_tokens == 0
    full = torch.tensor([p + seq.tokens])
    with torch.no_grad():
        out = model.forward(full, return_routes=True)
    P = len(p)
    logits = out.logits[0, P - 1 : P - 1 + len(seq.tokens)]
    lp = truncated_logprobs(logits, temperature=0.8, top_k=40, top_p=0.9)
    want = lp.gather(1, torch.tensor(seq.tokens)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(seq.logprobs), want, atol=1e-4)
    raw = logits.log_softmax(-1).gather(1, torch.tensor(seq.tokens)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(seq.model_logprobs), raw, atol=1e-4)
    for i, allowed in enumerate(seq.allowed):
        assert torch.equal(allowed, torch.isfinite(lp[i]).nonzero().squeeze(-1))
        assert len(seq.top_logprobs[i]) == 3
    # routes: prompt positions, then per token the position its logits came from
    n_moe = len(out.routes)
    assert len(r.prompt_routes) == n_moe
    for layer in range(n_moe):
        ref = out.routes[layer].view(1, -1, out.routes[layer].shape[-1])[0]
        assert torch.equal(r.prompt_routes[layer].sort(-1).values, ref[:P].sort(-1).values)
        got = torch.stack([rt[layer] for rt in seq.routes])
        assert torch.equal(got.sort(-1).values, ref[P - 1 : P - 1 + len(seq.tokens)].sort(-1).values)


def test_async_stream_and_forward_failure(model):
    class Flaky(torch.nn.Module):
        """Wraps the model; fails the forwards while ``broken`` is set."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.config, self.broken = inner, inner.config, False

        def new_cache(self, *a, **k):
            return self.inner.new_cache(*a, **k)

        def forward(self, *a, **k):
            if self.broken:
                raise RuntimeError("boom")
            return self.inner.forward(*a, **k)

    flaky = Flaky(model)
    eng = Engine(flaky, max_slots=2, max_len=64)

    async def stream() -> list:
        h = eng.submit([1, 2, 3], SamplingParams(max_tokens=6, temperature=0))
        return [o async for o in h]

    try:
        outs = asyncio.run(stream())
        assert [o.token for o in outs] == list(generate_ids(model, [1, 2, 3], max_new_tokens=6, temperature=0))
        flaky.broken = True
        r = eng.generate([4, 5], GREEDY)
        assert r.sequences[0].finish_reason == "error" and "boom" in r.error
        flaky.broken = False
        t0 = time.monotonic()
        assert eng.generate([4, 5], GREEDY).sequences[0].finish_reason == "length"  # still serving
        assert time.monotonic() - t0 < 30
    finally:
        eng.shutdown()


def test_seed_range_and_a_request_failing_at_admission(model, monkeypatch):
    """Seeds outside 64 bits are refused up front; anything else failing while a request is admitted fails that
    request alone (found by fuzzing: the engine thread used to die and every later request hung)."""
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=bad)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64 - 1, n=2)
    eng = Engine(model, max_slots=2, max_len=64)
    real = torch.Generator

    class Boom:
        def __init__(self, *a, **k):
            raise RuntimeError("no generator today")

    try:
        import dsv32.engine as engine_mod

        monkeypatch.setattr(engine_mod.torch, "Generator", Boom)
        r = eng.generate([4, 5], GREEDY)
        assert r.sequences[0].finish_reason == "error" and "no generator today" in r.error
        monkeypatch.setattr(engine_mod.torch, "Generator", real)
        t0 = time.monotonic()
        assert eng.generate([4, 5], GREEDY).sequences[0].finish_reason == "length"  # the engine still serves
        assert time.monotonic() - t0 < 30
    finally:
        monkeypatch.setattr(torch, "Generator", real)
        eng.shutdown()
