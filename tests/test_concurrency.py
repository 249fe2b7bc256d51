"""32 simultaneous greedy streams on the real tiny V3.2 model (MLA + DSA + MoE) give what each prompt gives alone.

All 32 prompts are submitted at once and streamed (`async for` over the engine's handles, then 32 concurrent
HTTP clients streaming `/v1/completions` from uvicorn). The reference runs every prompt alone on a one-slot
engine. Batched rows are computed in `[R, 1]` decode forwards whose float reductions may round differently
from a one-row forward, so a greedy choice may flip where the two best logits are within rounding of each
other, and nowhere else. The rule: wherever a batched sequence differs from its reference, at the first differing
position the two tokens must be the top two of the reference logits (a full forward of the prompt + the common
prefix), less than NEAR_TIE apart. Later positions are not compared (the contexts differ from there on).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from dsv32 import Transformer
from dsv32.engine import Engine, SamplingParams
from dsv32.tokenizer import Tokenizer
from serving_fakes import LiveServer, peaked_tiny_v32

N_STREAMS = 32
NEAR_TIE = 1e-4
MAX_LEN = 128
PREFILL_CHUNK = 4096  # every prompt prefilled whole in one forward: a [R, 1] forward is always a decode step


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on shared cores run far faster on one thread (no OpenMP spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class RowCounter(torch.nn.Module):
    """Wraps the model and records the rows of every decode forward (``[R, 1]`` inputs)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.decode_rows: list[int] = []

    def new_cache(self, *a, **k):
        return self.inner.new_cache(*a, **k)

    def forward(self, input_ids, **k):
        if input_ids.shape[1] == 1:
            self.decode_rows.append(int(input_ids.shape[0]))
        return self.inner.forward(input_ids, **k)


@pytest.fixture(scope="module")
def model() -> Transformer:
    # larger weights than the default init, so greedy choices are clear (for this seed the smallest top-2 gap
    # along the 32 reference completions is about 5e-4, five times NEAR_TIE)
    return peaked_tiny_v32()


@pytest.fixture(scope="module")
def work() -> list[tuple[list[int], int]]:
    """32 different prompts (3-40 tokens) and their completion lengths (16-24 tokens)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(N_STREAMS):
        n = int(torch.randint(3, 41, (1,), generator=g))
        prompt = torch.randint(2, 512, (n,), generator=g).tolist()
        out.append((prompt, int(torch.randint(16, 25, (1,), generator=g))))
    assert len({tuple(p) for p, _ in out}) == N_STREAMS
    return out


@pytest.fixture(scope="module")
def alone(model, work) -> list[list[int]]:
    """Each prompt alone: a one-slot engine, one request at a time, no prefix reuse."""
    eng = Engine(model, max_slots=1, max_len=MAX_LEN, prefix_reuse=False)
    try:
        out = []
        for prompt, k in work:
            seq = eng.generate(prompt, SamplingParams(max_tokens=k, temperature=0)).sequences[0]
            assert seq.finish_reason == "length" and len(seq.tokens) == k
            out.append(seq.tokens)
    finally:
        eng.shutdown()
    return out


def check_near_ties(model, work, alone, batched) -> list[dict]:
    """Equal, or first differing at a near-tie of the reference logits; returns the divergences seen."""
    divergences = []
    for i, ((prompt, _), ref, got) in enumerate(zip(work, alone, batched)):
        assert len(got) == len(ref), (i, len(got), len(ref))
        if got == ref:
            continue
        k = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ref[:k]]))[0, -1].double()
        top = logits.topk(2)
        gap = float(top.values[0] - top.values[1])
        d = {"stream": i, "position": k, "batched": got[k], "alone": ref[k], "gap": gap, "top2": top.indices.tolist()}
        assert {got[k], ref[k]} == set(top.indices.tolist()), f"not the top two of the reference logits: {d}"
        assert gap < NEAR_TIE, f"batched and alone differ where the top-2 gap is not a near-tie: {d}"
        divergences.append(d)
    return divergences


def test_32_engine_streams_match_alone_up_to_near_ties(model, work, alone):
    counter = RowCounter(model)
    eng = Engine(counter, max_slots=N_STREAMS, max_len=MAX_LEN, max_waiting=N_STREAMS, prefill_chunk=PREFILL_CHUNK)

    async def streams() -> list[list]:
        handles = [eng.submit(p, SamplingParams(max_tokens=k, temperature=0)) for p, k in work]

        async def read(h) -> list:
            return [out async for out in h]

        return await asyncio.gather(*(read(h) for h in handles))

    try:
        outs = asyncio.run(asyncio.wait_for(streams(), timeout=300))
    finally:
        eng.shutdown()
    batched = []
    for (_, k), events in zip(work, outs):
        assert events[-1].finish_reason == "length", events[-1]
        assert all(e.finish_reason is None for e in events[:-1])
        batched.append([e.token for e in events])
        assert len(batched[-1]) == k
    # it really batched: most decode forwards ran many rows at once
    rows = counter.decode_rows
    assert max(rows) >= N_STREAMS - 4, rows
    assert eng.stats["decode_steps"] <= 2 * max(k for _, k in work), eng.stats
    assert sum(rows) == sum(k - 1 for _, k in work)  # every sampled token but the last is fed once
    divergences = check_near_ties(model, work, alone, batched)
    print(f"engine: {len(rows)} decode forwards, max {max(rows)} rows; divergences: {divergences}")


def word_tokenizer():
    """512 words `w0`..`w511` (`w0` BOS, `w1` EOS): ids round-trip exactly through the streamed text."""
    backend = Backend(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, bos_token="w0", eos_token="w1", name="words")


def test_32_http_streams_match_alone_up_to_near_ties(model, work, alone):
    for dep in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(dep, reason="the server needs fastapi, uvicorn and httpx (pip install -e '.[serve,test]')")
    # the server's dependencies are optional: the engine-only test above runs without them
    import httpx

    from dsv32.serve import create_app

    tok = word_tokenizer()
    counter = RowCounter(model)
    app = create_app(
        counter,
        tok,
        model_name="tiny",
        family=None,  # a word tokenizer without chat markers: completions only
        web=False,
        max_slots=N_STREAMS,
        max_len=MAX_LEN,
        max_waiting=N_STREAMS,
        prefill_chunk=PREFILL_CHUNK,
    )

    async def stream(client: httpx.AsyncClient, prompt: list[int], k: int) -> tuple[str, str | None, bool]:
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": k,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        text, finish, done = [], None, False
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                choice = json.loads(line[len("data: ") :])["choices"][0]
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
        return "".join(text), finish, done

    async def clients() -> list:
        limits = httpx.Limits(max_connections=N_STREAMS)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(stream(client, p, k) for p, k in work))

    with LiveServer(app) as srv:
        results = asyncio.run(asyncio.wait_for(clients(), timeout=300))
        stats = dict(app.state.engine.stats)
    batched = []
    for (_, k), (text, finish, done) in zip(work, results):
        assert done and finish == "length", (text, finish, done)
        words = text.split()
        assert all(w.startswith("w") for w in words), text
        batched.append([int(w[1:]) for w in words])
        assert len(batched[-1]) == k, text
    rows = counter.decode_rows
    assert max(rows) >= N_STREAMS // 2, rows  # the clients' requests overlapped in the engine
    assert stats["decode_steps"] < 0.25 * stats["generated_tokens"], stats
    divergences = check_near_ties(model, work, alone, batched)
    print(f"http: {len(rows)} decode forwards, max {max(rows)} rows; divergences: {divergences}")
