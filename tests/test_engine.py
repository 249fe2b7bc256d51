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


# ------------------------------------------------------------------------------ prompt log-probabilities


def test_prompt_logprobs_equal_a_full_forward(model):
    """Prefill-only scoring (max_tokens=0) in chunks of 5 positions, the head applied 3 positions at a time:
    every prompt token's log-probability, rank and top alternatives equal a full forward's log_softmax; a
    cached copy of the prompt is not reused (its positions' logits are needed)."""
    p = prompts(1, seed=12)[0] + prompts(1, seed=13)[0]
    vocab = model.config.vocab_size
    eng = Engine(model, max_slots=3, max_len=96, prefill_chunk=5, logprob_block_bytes=3 * 4 * vocab)
    try:
        eng.generate(p, GREEDY)  # leaves the prompt in a slot
        h1 = eng.submit(p, SamplingParams(max_tokens=0, prompt_logprobs=4))
        h2 = eng.submit(p[:-1], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0, n=2))
        r1, r2 = h1.result(), h2.result()
    finally:
        eng.shutdown()
    with torch.no_grad():
        ref = model.forward(torch.tensor([p])).log_softmax(-1)[0]  # [S, V]
    want = ref[:-1].gather(-1, torch.tensor(p[1:])[:, None])[:, 0]
    plp = r1.prompt_logprobs
    assert r1.cached_tokens == 0 and r1.sequences[0].tokens == [] and r1.sequences[0].finish_reason == "length"
    assert plp.logprobs[0] is None and plp.ranks[0] is None and plp.top[0] is None
    assert len(plp.logprobs) == len(p)
    assert torch.allclose(torch.tensor(plp.logprobs[1:]), want, atol=1e-5, rtol=0)
    assert plp.ranks[1:] == ((ref[:-1] > want[:, None]).sum(-1) + 1).tolist()
    vals, ids = ref[:-1].topk(4, dim=-1)
    for t in range(1, len(p)):
        assert [i for i, _ in plp.top[t]] == ids[t - 1].tolist()
        assert torch.allclose(torch.tensor([v for _, v in plp.top[t]]), vals[t - 1], atol=1e-5, rtol=0)
    # with generation and n=2: the prompt scored once, both sequences generate greedily
    assert r2.prompt_logprobs.logprobs[1:] == pytest.approx(plp.logprobs[1 : len(p) - 1], abs=1e-5)
    assert r2.prompt_logprobs.top[1:] == [[]] * (len(p) - 2)
    alone = list(generate_ids(model, p[:-1], max_new_tokens=3, temperature=0))
    assert [s.tokens for s in r2.sequences] == [alone, alone]


def test_prompt_logprobs_batched_and_context_limit(model):
    """Equal-length prompts scored in one prefill forward give what each gives alone; a prefill-only request
    may fill the whole slot (nothing is generated), one that generates may not."""
    ps = [prompts(1, seed=20 + i)[0][:8] + [7] * (8 - len(prompts(1, seed=20 + i)[0][:8])) for i in range(3)]
    eng = Engine(model, max_slots=4, max_len=16)
    try:
        hs = [eng.submit(p, SamplingParams(max_tokens=0, prompt_logprobs=1)) for p in ps]
        batched = [h.result().prompt_logprobs.logprobs for h in hs]
        alone = [eng.generate(p, SamplingParams(max_tokens=0, prompt_logprobs=1)).prompt_logprobs.logprobs for p in ps]
        assert eng.generate(list(range(1, 17)), SamplingParams(max_tokens=0, prompt_logprobs=0)).prompt_tokens == 16
        with pytest.raises(RequestTooLarge):
            eng.submit(list(range(1, 17)), SamplingParams(max_tokens=1))
    finally:
        eng.shutdown()
    for b, a in zip(batched, alone):
        assert b[0] is None and b[1:] == pytest.approx(a[1:], abs=1e-5)


# ------------------------------------------------------------------------------------- logits processing


def _reference_greedy(model, prompt, n, *, bias=None, presence=0.0, frequency=0.0, repetition=1.0,
                      min_tokens=0, stop=(), allow=None):
    """Slow reference: a full forward per token and the processing written out token by token."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            x = model.forward(torch.tensor([prompt + out]))[0, -1].clone()
        if allow is not None:
            for t in range(x.shape[0]):
                if not allow(t):
                    x[t] = float("-inf")
        if len(out) < min_tokens:
            for t in stop:
                x[t] = float("-inf")
        for t, b in (bias or {}).items():
            x[t] += b
        for t in set(prompt + out):
            if repetition != 1:
                x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
        for t in set(out):
            x[t] -= frequency * out.count(t) + presence
        tok = int(x.argmax())
        out.append(tok)
        if tok in stop:
            break
    return out


class EvenIds:
    """A simple LogitsMask: only even ids (and it records what it was told)."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def fill_mask(self, allowed: torch.Tensor) -> None:
        allowed[1::2] = False

    def accept(self, token: int) -> None:
        self.accepted.append(token)


def test_logits_processing_matches_a_slow_reference(model):
    """logit_bias, presence/frequency/repetition penalties, min_tokens and a logits mask, each in a request
    of its own, all batched in the same steps as a plain request: each equals the token-by-token reference,
    and the plain request equals its result alone (it is not touched)."""
    p = prompts(1, seed=30)[0]
    plain = list(generate_ids(model, p, max_new_tokens=10, temperature=0))
    top = plain[0]
    masks: list[EvenIds] = []

    def even() -> EvenIds:
        masks.append(EvenIds())
        return masks[-1]

    cases = [
        (dict(logit_bias={top: -100.0}), dict(bias={top: -100.0})),
        (dict(logit_bias={5: 100.0, 9: 3.5}), dict(bias={5: 100.0, 9: 3.5})),
        (dict(logit_bias={5: 6.0}, presence_penalty=1.5, frequency_penalty=0.7),  # the bias makes 5 repeat
         dict(bias={5: 6.0}, presence=1.5, frequency=0.7)),
        (dict(frequency_penalty=-2.0), dict(frequency=-2.0)),
        (dict(repetition_penalty=1.8), dict(repetition=1.8)),
        (dict(min_tokens=4, stop_token_ids=(plain[1],)), dict(min_tokens=4, stop=(plain[1],))),
        (dict(logits_mask=even), dict(allow=lambda t: t % 2 == 0)),
    ]
    eng = Engine(model, max_slots=len(cases) + 1, max_len=64)
    try:
        base = eng.submit(p, SamplingParams(max_tokens=10, temperature=0))
        hs = [eng.submit(p, SamplingParams(max_tokens=10, temperature=0, **kw)) for kw, _ in cases]
        got = [h.result().sequences[0].tokens for h in hs]
        assert base.result().sequences[0].tokens == plain
    finally:
        eng.shutdown()
    for (kw, ref_kw), toks in zip(cases, got):
        want = _reference_greedy(model, p, 10, **ref_kw)
        assert toks == want, kw
    assert top not in got[0] and got[1] == [5] * 10
    assert all(t != plain for t in got[2:])  # every case changed the output (none is a no-op)
    assert all(t % 2 == 0 for t in got[-1]) and masks[0].accepted == got[-1]


def test_processed_logits_reach_the_post_training_outputs(model):
    """The sampled-distribution log-probability and the kept set come from the processed logits; the
    OpenAI log-probability stays the model's own."""
    p = prompts(1, seed=31)[0]
    eng = Engine(model, max_slots=2, max_len=64)
    try:
        r = eng.generate(p, SamplingParams(max_tokens=1, temperature=0.7, seed=0, logprobs=True, return_allowed=True,
                                           logit_bias={3: 2.0}, logits_mask=EvenIds))
    finally:
        eng.shutdown()
    seq = r.sequences[0]
    with torch.no_grad():
        raw = model.forward(torch.tensor([p]))[0, -1]
    x = raw.clone()
    x[1::2] = float("-inf")
    x[3] += 2.0
    lp = truncated_logprobs(x[None], temperature=0.7)[0]
    tok = seq.tokens[0]
    assert tok % 2 == 0
    assert seq.logprobs[0] == pytest.approx(float(lp[tok]), abs=1e-5)
    assert seq.model_logprobs[0] == pytest.approx(float(raw.log_softmax(-1)[tok]), abs=1e-5)
    assert torch.equal(seq.allowed[0], torch.arange(0, raw.shape[0], 2))


def test_params_validation():
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})
    assert SamplingParams(logit_bias={4: 1, 2: -1}).logit_bias == ((2, -1.0), (4, 1.0))
    assert not SamplingParams().processes_logits and SamplingParams(min_tokens=1).processes_logits
