"""Generation engine: continuous batching over token ids (the server owns text, chat formats and stop strings).

One background thread owns the model and its cache. Each loop iteration ("step") it
  1. applies cancellations and admits waiting requests into free cache slots (rows of one static cache),
  2. prefills newly admitted requests, at most ``prefill_chunk`` prompt tokens in all (so a long prompt
     never stalls decoding for more than a chunk), and
  3. runs one decode forward for every sequence that has a sampled token still to feed: a ``[R, 1]`` batch
     whose rows map to their cache slots through ``cache_rows``, each at its own position.
Requests therefore join and leave between steps, and nothing is padded.

Why the output equals running a request alone: each sequence samples from its own row of logits with its
own seeded ``torch.Generator``, and rows never attend to each other (each slot is its own cache row and
the causal rule masks whatever a reused row held past the current position).

Prefix reuse: a finished sequence leaves its tokens in its slot. A new request takes the free slot whose
cached tokens share the longest prefix with its prompt, truncates the slot there and prefills only the
rest, so a follow-up turn of a conversation costs only its new tokens (``RequestHandle.cached_tokens``).

Memory: the cache is allocated once, ``max_slots x max_len`` tokens, sized from a byte budget with the
cache's own ``nbytes()``; work beyond the slots waits in a bounded queue, and past that ``submit`` raises
:class:`EngineOverloaded` (HTTP 429 + Retry-After) instead of allocating more.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dsv32.sampling import draw, truncated_logprobs

__all__ = [
    "Engine",
    "draw",
    "EngineClosed",
    "EngineError",
    "EngineOverloaded",
    "LogitsMask",
    "Output",
    "PromptLogprobs",
    "RequestHandle",
    "RequestResult",
    "RequestTooLarge",
    "SamplingParams",
    "SequenceResult",
    "UnsupportedRequest",
]

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR = "stop", "length", "abort", "error"


# ----------------------------------------------------------------------------------------------- errors


class EngineError(Exception):
    """Base class of the engine's refusals."""


class EngineOverloaded(EngineError):
    """Every slot is busy and the waiting queue is full: come back later (the server answers 429)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTooLarge(EngineError, ValueError):
    """The request can never fit this engine (prompt longer than a slot, ``n`` above the slot count)."""


class UnsupportedRequest(EngineError, ValueError):
    """The model cannot do what the request asks (prompt log-probabilities need ``return_hidden`` and
    ``logits_from_hidden`` in the model protocol); the server answers 400."""


class EngineClosed(EngineError):
    """The engine is shutting down and takes no new work (the server answers 503)."""


# --------------------------------------------------------------------------------------- public values


class LogitsMask(Protocol):
    """A per-sequence constraint on the next token (a grammar matcher, for instance), run in the sampling step.

    ``SamplingParams.logits_mask`` is a *factory*: the engine calls it once per sequence when the request is
    admitted (each of ``n`` sequences keeps its own state). Every step, before the token is drawn, the
    engine hands ``fill_mask`` one row of a fresh bool tensor (``[V]``, all True on entry, on the logits'
    device) to clear the ids that must not come next; they get logit -inf, so the sampled distribution,
    its log-probability and the reported kept set (``return_allowed``) all reflect the mask, while
    ``model_logprob`` stays under the model's own distribution. After the token is drawn (stop tokens
    included) the engine calls ``accept(token)``. A mask that allows nothing ends the sequence with
    finish "error". Only sequences that have a mask pay for it.
    """

    def fill_mask(self, allowed: torch.Tensor) -> None: ...

    def accept(self, token: int) -> None: ...


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature <= 0`` is greedy. Stop *strings* are the caller's business:
    it cancels the sequence when its decoded text contains one.

    max_tokens: tokens to generate; 0 runs the prefill only (scoring a prompt with ``prompt_logprobs``).
    logprobs: also report the token's log-probability under the model's own distribution (temperature 1,
    no truncation, no penalties: what OpenAI's API reports) and the ``top_logprobs`` most likely alternatives.
    prompt_logprobs: report every prompt token's log-probability given the tokens before it (None for the
    first), its rank, and this many top alternatives (``RequestHandle.prompt_logprobs``); turns prefix reuse
    off for the request, since every prompt position must be computed.
    return_allowed: report the ids kept by the temperature/top-k/top-p truncation (post-training masks).
    return_routes: report MoE routes; turns prefix reuse off for the request (every prompt position is
    computed, so its routes are known).

    Logits processing, applied in this order to the rows that ask for it (as vLLM does), before temperature
    and truncation: ``logits_mask`` (see :class:`LogitsMask`); ``min_tokens`` (the stop ids get -inf until
    that many tokens are out); ``logit_bias`` (added to the named ids' logits, OpenAI's -100..100);
    ``repetition_penalty`` (vLLM/CTRL: a logit of an id seen in the prompt or the output is divided by it
    when positive, multiplied when negative); ``frequency_penalty`` / ``presence_penalty`` (OpenAI:
    subtract ``frequency x count`` and ``presence x [count > 0]`` over the *generated* tokens).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    return_allowed: bool = False
    return_routes: bool = False
    min_tokens: int = 0
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logits_mask: Callable[[], LogitsMask] | None = None

    def __post_init__(self) -> None:
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        bias = tuple(sorted((int(t), float(b)) for t, b in bias))
        checks = [
            (self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.top_logprobs >= 0, f"top_logprobs must be >= 0, got {self.top_logprobs}"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             f"prompt_logprobs must be None or >= 0, got {self.prompt_logprobs}"),
            (self.seed is None or -(2**63) <= self.seed and self.seed + self.n - 1 < 2**64,
             f"seed must be a 64-bit integer (seed + n - 1 included), got {self.seed}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (all(t >= 0 and math.isfinite(b) for t, b in bias), "logit_bias needs ids >= 0 and finite biases"),
            (len({t for t, _ in bias}) == len(bias), "logit_bias names an id twice"),
            (math.isfinite(self.presence_penalty), "presence_penalty must be finite"),
            (math.isfinite(self.frequency_penalty), "frequency_penalty must be finite"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", bias)

    @property
    def truncates(self) -> bool:
        return self.temperature <= 0 or self.top_k > 0 or self.top_p < 1

    @property
    def penalizes(self) -> bool:
        """Uses a penalty that needs the sequence's token counts."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def processes_logits(self) -> bool:
        """Changes the logits before sampling (the rows that do not skip the processing step entirely)."""
        return bool(self.penalizes or self.logit_bias or self.min_tokens or self.logits_mask is not None)


@dataclass
class PromptLogprobs:
    """Per prompt position: the token's log-probability given the tokens before it, its rank (1 = the
    most likely id) and the ``prompt_logprobs`` most likely ids; None at position 0 (nothing precedes it)."""

    logprobs: list[float | None] = field(default_factory=lambda: [None])
    ranks: list[int | None] = field(default_factory=lambda: [None])
    top: list[list[tuple[int, float]] | None] = field(default_factory=lambda: [None])


@dataclass
class Output:
    """One event of a request's stream: a sampled token of sequence ``seq``, and/or its end.

    ``token`` is None only for an end without a token (cancelled: ``abort``; a failed step: ``error``; a
    prefill-only request, ``max_tokens=0``: ``length``).
    A stop token is reported as a token (post-training needs its log-probability) with finish "stop".
    ``routes``: per MoE layer, the ``[num_experts_per_tok]`` experts of the position whose logits this
    token was sampled from (token 0: the last prompt position).
    """

    seq: int
    token: int | None
    logprob: float | None = None  # under the distribution actually sampled from
    model_logprob: float | None = None  # under the model's distribution (with ``logprobs``)
    top_logprobs: list[tuple[int, float]] | None = None
    allowed: torch.Tensor | None = None  # kept ids (with ``return_allowed`` when something is truncated)
    routes: list[torch.Tensor] | None = None
    finish_reason: str | None = None


@dataclass
class SequenceResult:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    model_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    allowed: list[torch.Tensor | None] = field(default_factory=list)
    routes: list[list[torch.Tensor] | None] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: Output) -> None:
        if out.token is not None:
            self.tokens.append(out.token)
            self.logprobs.append(float(out.logprob))  # type: ignore[arg-type]
            self.model_logprobs.append(out.model_logprob)
            self.top_logprobs.append(out.top_logprobs)
            self.allowed.append(out.allowed)
            self.routes.append(out.routes)
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason


@dataclass
class RequestResult:
    sequences: list[SequenceResult]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens found in the cache (prefix reuse), not computed again
    prompt_routes: list[torch.Tensor] | None  # per MoE layer [prompt_tokens, K] (with return_routes)
    error: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # with ``prompt_logprobs``


# -------------------------------------------------------------------------------------------- handles

_END = object()


class RequestHandle:
    """The caller's side of one request: iterate it (sync or ``async for``) for :class:`Output` events,
    or wait for :meth:`result`. Created by :meth:`Engine.submit`; safe to use from any thread.

    When ``submit`` runs inside an asyncio loop the handle wakes that loop through
    ``call_soon_threadsafe``, so ``async for`` never blocks the event loop.
    """

    def __init__(self, engine: Engine, request_id: str, prompt_len: int, params: SamplingParams) -> None:
        self._engine = engine
        self.id = request_id
        self.prompt_len = prompt_len
        self.params = params
        self.cached_tokens = 0
        self.prompt_routes: list[torch.Tensor] | None = None
        self.prompt_logprobs: PromptLogprobs | None = None  # complete once the first event arrives
        self.error: str | None = None
        self.submitted_at = time.monotonic()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done = threading.Event()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._wake: asyncio.Event | None = asyncio.Event()
        except RuntimeError:
            self._loop = self._wake = None

    # engine side
    def _push(self, item: Any) -> None:
        self._q.put(item)
        if item is _END:
            self._done.set()
        if self._loop is not None and self._wake is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    # caller side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self, seq: int | None = None) -> None:
        """Stop generating (one sequence, or all); freed slots are reused from the next step on."""
        self._engine._request_cancel(self, seq)

    def __iter__(self) -> Iterator[Output]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[Output]:
        if self._wake is None:
            raise RuntimeError("async iteration needs the handle to be submitted from inside an asyncio loop")
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                self._wake.clear()
                if self._q.empty():
                    await self._wake.wait()
                continue
            if item is _END:
                return
            yield item

    def _collect(self, outputs: Sequence[Output]) -> RequestResult:
        seqs = [SequenceResult() for _ in range(self.params.n)]
        for out in outputs:
            seqs[out.seq].add(out)
        return RequestResult(
            seqs, self.prompt_len, self.cached_tokens, self.prompt_routes, self.error, self.prompt_logprobs
        )

    def result(self) -> RequestResult:
        """Block until every sequence has finished; returns everything the stream carried."""
        return self._collect(list(self))

    async def aresult(self) -> RequestResult:
        return self._collect([out async for out in self])


# ------------------------------------------------------------------------------------------- internals


@dataclass
class _Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # ids whose keys/values this cache row holds
    seq: _Seq | None = None
    last_used: int = 0


@dataclass
class _Seq:
    req: _Request
    index: int
    gen: torch.Generator
    slot: _Slot | None = None
    generated: int = 0
    pending: int | None = None  # sampled, not yet fed to the model
    finished: bool = False
    mask: LogitsMask | None = None  # from ``params.logits_mask``
    counts_ready: bool = False  # the engine's token-count rows for this slot hold this sequence's tokens


@dataclass
class _Request:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    seqs: list[_Seq] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the cache (reused + computed)
    admitted_at: float = 0.0
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values) tensors, built once

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= len(self.prompt)


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _parse_bytes(value: int | str | None) -> int | None:
    """``123``, ``"512MiB"``, ``"2GB"``, ``"1.5GiB"`` -> bytes."""
    if value is None or isinstance(value, int):
        return value
    s = value.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


# --------------------------------------------------------------------------------------------- engine


class Engine:
    """Continuous-batching generation over one model and one static cache of ``max_slots`` rows.

    model: follows the model protocol (``forward(ids, cache=, positions=, last_only=, cache_rows=,
    return_routes=)`` and ``new_cache(batch, max_len)``).
    max_len: tokens per slot (prompt + completion); default: the model's context, at most 4096.
    memory_budget: bytes (or "2GiB") for the cache; lowers ``max_slots`` (then ``max_len``) to fit.
    max_waiting: requests allowed to queue for a slot before ``submit`` raises ``EngineOverloaded``.
    prefill_chunk: prompt tokens per prefill forward (bounds both activation memory and decode stalls).
    forward_kwargs: passed to every forward (e.g. ``{"dense": True}``).
    prefix_reuse: look for cached prefixes (off: every prompt is prefilled in full, e.g. to measure it).
    num_threads: torch intra-op threads for the engine thread (``torch.set_num_threads`` is process-wide).
    logprob_block_bytes: prompt log-probabilities are computed from the chunk's hidden states a block of
        positions at a time, so that at most this many bytes of ``[positions, vocab]`` logits exist at once.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_slots: int = 8,
        max_len: int | None = None,
        memory_budget: int | str | None = None,
        max_waiting: int = 64,
        prefill_chunk: int = 512,
        forward_kwargs: dict[str, Any] | None = None,
        prefix_reuse: bool = True,
        num_threads: int | None = None,
        logprob_block_bytes: int = 32 * 2**20,
    ) -> None:
        self.model = model
        self.device = _model_device(model)
        cfg = getattr(model, "config", None)
        context = getattr(cfg, "max_position_embeddings", None) or 4096
        max_len = int(max_len or min(context, 4096))
        if max_len < 2 or max_slots < 1 or prefill_chunk < 1 or max_waiting < 0:
            raise ValueError("need max_len >= 2, max_slots >= 1, prefill_chunk >= 1, max_waiting >= 0")
        with torch.no_grad():
            probe = model.new_cache(1, 64)
            self.bytes_per_token = max(1, math.ceil(probe.nbytes() / 64))
            del probe
        budget = _parse_bytes(memory_budget)
        if budget is not None:
            max_slots = min(max_slots, budget // (self.bytes_per_token * max_len))
            if max_slots < 1:  # one slot at full length does not fit: shorten the slot instead
                max_slots, max_len = 1, budget // self.bytes_per_token
                if max_len < 16:
                    raise ValueError(
                        f"memory budget {budget} B holds only {max_len} tokens "
                        f"({self.bytes_per_token} B/token); need at least 16"
                    )
        self.max_slots, self.max_len = int(max_slots), int(max_len)
        self.max_waiting, self.prefill_chunk = max_waiting, prefill_chunk
        self.forward_kwargs = dict(forward_kwargs or {})
        self.num_threads = num_threads
        self.prefix_reuse = prefix_reuse
        self.logprob_block_bytes = logprob_block_bytes
        # token counts for the penalties, one row per slot, allocated on first use ([max_slots, V])
        self._counts: torch.Tensor | None = None  # generated tokens (presence / frequency penalties)
        self._seen: torch.Tensor | None = None  # prompt + generated ids (repetition penalty)
        with torch.no_grad():
            self.cache = model.new_cache(self.max_slots, self.max_len)
        self.cache_bytes = int(self.cache.nbytes())
        self._slots = [_Slot(i) for i in range(self.max_slots)]
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._cancels: list[tuple[RequestHandle, int | None]] = []
        self._by_handle: dict[RequestHandle, _Request] = {}
        self._cv = threading.Condition()
        self._closed = False
        self._stop = False
        self._ids = itertools.count()
        self._tick = itertools.count(1)
        self._service_s = 2.0  # running mean of a request's time in a slot (Retry-After hint)
        self.stats = {
            "requests": 0,
            "finished": 0,
            "prefilled_tokens": 0,
            "reused_tokens": 0,
            "generated_tokens": 0,
            "decode_steps": 0,
            "prefill_steps": 0,
        }
        self._thread = threading.Thread(target=self._run, name="dsv32-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    @property
    def capacity(self) -> dict[str, int]:
        return {
            "max_slots": self.max_slots,
            "max_len": self.max_len,
            "cache_bytes": self.cache_bytes,
            "bytes_per_token": self.bytes_per_token,
            "max_waiting": self.max_waiting,
        }

    def load(self) -> dict[str, int]:
        with self._cv:
            busy = sum(s.seq is not None for s in self._slots)
            return {"running": len(self._running), "waiting": len(self._waiting), "busy_slots": busy}

    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request; returns at once. Raises RequestTooLarge, EngineOverloaded or EngineClosed."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise RequestTooLarge("the prompt is empty (it needs at least one token, e.g. BOS)")
        if len(prompt) + (params.max_tokens > 0) > self.max_len:
            raise RequestTooLarge(
                f"the prompt has {len(prompt)} tokens; this engine's context is {self.max_len} tokens "
                "(prompt + at least one generated token, unless max_tokens is 0)"
            )
        if params.n > self.max_slots:
            raise RequestTooLarge(f"n={params.n} exceeds the engine's {self.max_slots} concurrent sequences")
        if params.prompt_logprobs is not None and not hasattr(self.model, "logits_from_hidden"):
            raise UnsupportedRequest(
                f"{type(self.model).__name__} cannot score prompts (prompt log-probabilities need the model "
                "protocol's return_hidden and logits_from_hidden)"
            )
        max_tokens = min(params.max_tokens, self.max_len - len(prompt))
        with self._cv:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            free = sum(s.seq is None for s in self._slots) - sum(r.params.n for r in self._waiting)
            if free < params.n and len(self._waiting) >= self.max_waiting:
                raise EngineOverloaded(
                    f"all {self.max_slots} slots are busy and {len(self._waiting)} requests are waiting",
                    retry_after=self._retry_after(),
                )
            handle = RequestHandle(self, f"req-{next(self._ids)}", len(prompt), params)
            req = _Request(handle, prompt, params, max_tokens)
            self._waiting.append(req)
            self._by_handle[handle] = req
            self.stats["requests"] += 1
            self._cv.notify()
        return handle

    def generate(self, prompt: Sequence[int], params: SamplingParams | None = None) -> RequestResult:
        """Submit and wait (convenience for scripts and tests)."""
        return self.submit(prompt, params).result()

    def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Refuse new work, let in-flight requests finish for up to ``drain_timeout`` s, cancel the rest
        (their streams end with finish "abort") and stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and self._thread.is_alive():
            with self._cv:
                if not self._running and not self._waiting:
                    break
            time.sleep(0.02)
        self.cancel_all()
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def cancel_all(self) -> None:
        with self._cv:
            for req in [*self._waiting, *self._running]:
                self._cancels.append((req.handle, None))
            self._cv.notify()

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ called from other threads
    def _request_cancel(self, handle: RequestHandle, seq: int | None) -> None:
        with self._cv:
            if handle in self._by_handle:
                self._cancels.append((handle, seq))
                self._cv.notify()

    def _retry_after(self) -> float:
        waves = 1 + len(self._waiting) / max(1, self.max_slots)
        return float(min(60, max(1, math.ceil(self._service_s * waves))))

    # ------------------------------------------------------------------ the loop (engine thread only)
    def _run(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        with torch.no_grad():
            while True:
                with self._cv:
                    while not (self._stop or self._cancels or self._waiting or self._running):
                        self._cv.wait()
                    self._apply_cancels()
                    if self._stop:
                        break
                    self._admit()
                try:
                    self._step()
                except Exception as e:  # a failing forward must not take the server down with it
                    self._fail_running(e)

    def _step(self) -> None:
        # Prefill up to ``prefill_chunk`` prompt tokens per step (several short prompts, or one chunk of a
        # long one), oldest first; then one decode forward for everything that is generating.
        # Chunks of equal length (e.g. several short prompts) share one forward: a batched prefill reads the
        # weights once for all of them (16 x 128-token prompts: 2.9 s batched vs 4.4 s one by one, SmolLM2).
        budget = self.prefill_chunk
        groups: dict[tuple[int, bool, bool], list[_Request]] = {}
        for req in [r for r in self._running if not r.prefill_done]:
            if budget <= 0:
                break
            if not any(not s.finished for s in req.seqs):
                continue
            S = min(budget, len(req.prompt) - req.prefilled)
            key = (S, req.params.return_routes, req.params.prompt_logprobs is not None)
            groups.setdefault(key, []).append(req)
            budget -= S
        for (S, routes, _), reqs in groups.items():
            if routes:  # prompt routes are collected per request
                for req in reqs:
                    self._prefill_chunk([req], S)
            else:
                self._prefill_chunk(reqs, S)
        rows = [s for r in self._running for s in r.seqs if s.pending is not None and not s.finished]
        if rows:
            self._decode(rows)

    def _admit(self) -> None:
        """FIFO: give the head of the queue its slots while enough are free (best shared prefix first)."""
        while self._waiting:
            req = self._waiting[0]
            free = [s for s in self._slots if s.seq is None]
            if len(free) < req.params.n:
                return
            self._waiting.popleft()
            chosen: list[tuple[_Slot, int]] = []
            for _ in range(req.params.n):
                best = max(free, key=lambda s: (common_prefix_len(s.tokens, req.prompt), -s.last_used))
                if common_prefix_len(best.tokens, req.prompt) == 0:
                    best = min(free, key=lambda s: s.last_used)  # keep recently used prefixes for later
                free.remove(best)
                chosen.append((best, common_prefix_len(best.tokens, req.prompt)))
            reuse = min(min(c for _, c in chosen), len(req.prompt) - 1)
            if req.params.return_routes or req.params.prompt_logprobs is not None or not self.prefix_reuse:
                reuse = 0  # every prompt position must be computed (its routes or its logits are wanted)
            seed = req.params.seed
            try:  # a request that cannot even start fails alone; the engine thread must survive it
                gens, masks = [], []
                for i in range(len(chosen)):
                    gens.append(torch.Generator(device=self.device))
                    gens[-1].manual_seed(seed + i if seed is not None else int(time.time_ns() + i) % 2**62)
                    masks.append(req.params.logits_mask() if req.params.logits_mask is not None else None)
                if req.params.prompt_logprobs is not None:
                    req.handle.prompt_logprobs = PromptLogprobs()
            except Exception as e:
                req.handle.error = f"{type(e).__name__}: {e}"
                self._by_handle.pop(req.handle, None)
                self.stats["finished"] += 1
                req.handle._push(Output(0, None, finish_reason=FINISH_ERROR))
                req.handle._push(_END)
                continue
            for i, (slot, _) in enumerate(chosen):
                seq = _Seq(req, i, gens[i], slot=slot, mask=masks[i])
                slot.seq, slot.tokens = seq, slot.tokens[:reuse]
                slot.last_used = next(self._tick)
                self.cache.truncate(slot.index, reuse)
                req.seqs.append(seq)
            req.prefilled = reuse
            req.handle.cached_tokens = reuse
            req.admitted_at = time.monotonic()
            self.stats["reused_tokens"] += reuse * req.params.n
            self._running.append(req)

    def _apply_cancels(self) -> None:
        cancels, self._cancels = self._cancels, []
        for handle, seq in cancels:
            req = self._by_handle.get(handle)
            if req is None:
                continue
            if req in self._waiting:
                self._waiting.remove(req)
                for i in range(req.params.n):
                    handle._push(Output(i, None, finish_reason=FINISH_ABORT))
                self._retire(req)
                continue
            for s in req.seqs:
                if not s.finished and (seq is None or s.index == seq):
                    self._finish(s, Output(s.index, None, finish_reason=FINISH_ABORT))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, rows: list[int], routes: bool, hidden: bool = False):
        """-> (last position's logits [B, V], routes or None, final-norm hidden states [B, S, D] or None).

        With ``hidden`` the head runs on the last position only; the caller applies it to the other positions
        block by block (prompt log-probabilities) instead of holding ``[B, S, V]`` logits."""
        extras: dict[str, Any] = {"return_routes": True} if routes else {}
        if hidden:
            extras.update(return_hidden=True, compute_logits=False)
        out = self.model.forward(
            ids.to(self.device),
            cache=self.cache,
            positions=positions.to(self.device),
            last_only=True,
            cache_rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            **extras,
            **self.forward_kwargs,
        )
        if not extras:
            return out[:, -1], None, None
        if hidden:
            return self.model.logits_from_hidden(out.hidden[:, -1]), out.routes, out.hidden
        return out.logits[:, -1], out.routes, None

    def _prefill_chunk(self, reqs: list[_Request], S: int) -> None:
        """Prefill the next ``S`` prompt tokens of every request in ``reqs`` in one forward (a row per live
        sequence; each row at its own positions and cache slot)."""
        lives = [[s for s in req.seqs if not s.finished] for req in reqs]
        chunks = [req.prompt[req.prefilled : req.prefilled + S] for req in reqs]
        ids = torch.tensor([c for c, live in zip(chunks, lives) for _ in live], dtype=torch.long)
        pos = torch.cat([torch.arange(req.prefilled, req.prefilled + S).unsqueeze(0).expand(len(live), S)
                         for req, live in zip(reqs, lives)])
        slots = [s.slot.index for live in lives for s in live]  # type: ignore[union-attr]
        want_routes = any(req.params.return_routes for req in reqs)  # then reqs is a single request
        want_hidden = any(req.params.prompt_logprobs is not None for req in reqs)  # then all of them
        logits, routes, hidden = self._forward(ids, pos, slots, want_routes, want_hidden)
        row = 0
        done: list[tuple[_Seq, int, list[torch.Tensor] | None]] = []
        for req, live, chunk in zip(reqs, lives, chunks):
            n = len(live)
            for s in live:
                s.slot.tokens.extend(chunk)  # type: ignore[union-attr]
            if hidden is not None:  # every row holds the same prompt: score row 0
                self._prompt_logprobs(req, hidden[row], req.prefilled)
            req.prefilled += S
            self.stats["prefilled_tokens"] += S * n
            if want_routes:  # routes are [n*S, K]; every row holds the same prompt, keep row 0
                part = [r.view(n, S, -1)[0].cpu() for r in routes]
                prev = req.handle.prompt_routes
                req.handle.prompt_routes = part if prev is None else [torch.cat([a, b]) for a, b in zip(prev, part)]
            if req.prefill_done:
                if req.max_tokens == 0:  # prefill only: scored, nothing to sample
                    for s in live:
                        self._finish(s, Output(s.index, None, finish_reason=FINISH_LENGTH))
                else:
                    last = [r.view(n, S, -1)[:, -1].cpu() for r in routes] if want_routes else None
                    for i, s in enumerate(live):
                        done.append((s, row + i, [r[i] for r in last] if last is not None else None))
            row += n
        if done:
            self._sample_rows([s for s, _, _ in done], logits[[i for _, i, _ in done]], [r for _, _, r in done])
        self.stats["prefill_steps"] += 1

    def _prompt_logprobs(self, req: _Request, h: torch.Tensor, start: int) -> None:
        """Score the prompt tokens that the chunk's positions ``start .. start+S-1`` predict (``h`` [S, D]):
        position t's logits give token t+1's log-probability. The head runs on blocks of positions so that
        at most ``logprob_block_bytes`` of fp32 logits exist at once, whatever the chunk or prompt length."""
        plp, k = req.handle.prompt_logprobs, req.params.prompt_logprobs
        assert plp is not None and k is not None
        targets = torch.tensor(req.prompt[start + 1 : start + 1 + h.shape[0]], dtype=torch.long, device=h.device)
        vocab = self.model.logits_from_hidden(h[:1]).shape[-1]
        block = max(1, self.logprob_block_bytes // (4 * vocab))
        for a in range(0, targets.shape[0], block):
            tgt = targets[a : a + block]  # [b]
            lsm = self.model.logits_from_hidden(h[a : a + tgt.shape[0]]).float().log_softmax(-1)  # [b, V]
            lp = lsm.gather(-1, tgt[:, None])  # [b, 1]
            plp.logprobs.extend(lp[:, 0].tolist())
            plp.ranks.extend(((lsm > lp).sum(-1) + 1).tolist())
            if k:
                vals, idx = lsm.topk(min(k, vocab), dim=-1)  # [b, k]
                plp.top.extend([list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())])
            else:
                plp.top.extend([[] for _ in range(tgt.shape[0])])

    def _decode(self, rows: list[_Seq]) -> None:
        ids = torch.tensor([[s.pending] for s in rows], dtype=torch.long)
        pos = torch.tensor([[len(s.slot.tokens)] for s in rows], dtype=torch.long)  # type: ignore[union-attr]
        want_routes = any(s.req.params.return_routes for s in rows)
        logits, routes, _ = self._forward(ids, pos, [s.slot.index for s in rows], want_routes)  # type: ignore[union-attr]
        self.stats["decode_steps"] += 1
        routes_cpu = [r.cpu() for r in routes] if want_routes else None
        for s in rows:
            s.slot.tokens.append(s.pending)  # type: ignore[union-attr,arg-type]
            s.pending = None
        self._sample_rows(
            rows,
            logits,
            [[x[i] for x in routes_cpu] if routes_cpu is not None and s.req.params.return_routes else None
             for i, s in enumerate(rows)],
        )

    # ------------------------------------------------------------------ sampling (engine thread only)
    def _process(
        self, rows: list[_Seq], logits: torch.Tensor
    ) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """The logits processing of :class:`SamplingParams` as batched tensor operations over the rows that use
        any of it (the others are not touched, and a step where none does costs one Python scan).

        -> (indices into ``rows`` that were processed, their processed logits [P, V], and which of them a
        mask or ``min_tokens`` cut down [P] bool), or ([], None, None)."""
        idx = [i for i, s in enumerate(rows) if s.req.params.processes_logits]
        if not idx:
            return [], None, None
        sub = [rows[i] for i in idx]
        x = logits[idx].float()  # [P, V] (a copy: the raw rows stay for model_logprob)
        P, V = x.shape
        dev = x.device
        cut = torch.zeros(P, dtype=torch.bool, device=dev)
        masked = [j for j, s in enumerate(sub) if s.mask is not None]
        if masked:  # the only per-row Python call: the mask object fills its own row
            allowed = torch.ones(len(masked), V, dtype=torch.bool, device=dev)
            for k, j in enumerate(masked):
                sub[j].mask.fill_mask(allowed[k])  # type: ignore[union-attr]
            mrows = torch.tensor(masked, device=dev)
            x[mrows] = x[mrows].masked_fill(~allowed, float("-inf"))
            cut[mrows] = True
        early = [(j, s.req.params.stop_token_ids) for j, s in enumerate(sub)
                 if s.generated < s.req.params.min_tokens and s.req.params.stop_token_ids]
        if early:  # min_tokens: no stop id before then
            r = torch.tensor([j for j, ids in early for _ in ids], device=dev)
            c = torch.tensor([t for _, ids in early for t in ids], device=dev)
            keep = c < V
            x[r[keep], c[keep]] = float("-inf")
            cut[torch.tensor([j for j, _ in early], device=dev)] = True
        biased = [j for j, s in enumerate(sub) if s.req.params.logit_bias]
        if biased:
            parts = [self._bias(sub[j].req, V) for j in biased]
            r = torch.cat([torch.full_like(ids, j) for j, (ids, _) in zip(biased, parts)])
            x.index_put_((r, torch.cat([ids for ids, _ in parts])), torch.cat([v for _, v in parts]), accumulate=True)
        pen = [j for j, s in enumerate(sub) if s.req.params.penalizes]
        if pen:
            self._penalize(x, [sub[j] for j in pen], torch.tensor(pen, device=dev))
        return idx, x, cut

    def _bias(self, req: _Request, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        if req.bias is None:
            pairs = [(t, b) for t, b in req.params.logit_bias if t < vocab]  # type: ignore[misc]
            ids = torch.tensor([t for t, _ in pairs], dtype=torch.long, device=self.device)
            req.bias = ids, torch.tensor([b for _, b in pairs], dtype=torch.float32, device=self.device)
        return req.bias

    def _count_rows(self, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._counts is None or self._counts.shape[1] != vocab:
            self._counts = torch.zeros(self.max_slots, vocab, dtype=torch.float32, device=self.device)
            self._seen = torch.zeros(self.max_slots, vocab, dtype=torch.bool, device=self.device)
        assert self._seen is not None
        return self._counts, self._seen

    def _penalize(self, x: torch.Tensor, seqs: list[_Seq], rows: torch.Tensor) -> None:
        """Repetition, frequency and presence penalties on rows ``rows`` of ``x`` [P, V], in place, from the
        per-slot count rows (kept up to date by :meth:`_count_tokens`, one batched scatter per step)."""
        counts, seen = self._count_rows(x.shape[1])
        for s in seqs:
            if not s.counts_ready:  # first token of this sequence: its slot's rows start from its prompt
                i = s.slot.index  # type: ignore[union-attr]
                counts[i].zero_()
                seen[i].zero_()
                seen[i, torch.tensor([t for t in s.req.prompt if t < x.shape[1]], dtype=torch.long)] = True
                s.counts_ready = True
        slots = torch.tensor([s.slot.index for s in seqs], device=x.device)  # type: ignore[union-attr]
        c, m = counts[slots], seen[slots]  # [p, V]
        ps = [s.req.params for s in seqs]
        rep = torch.tensor([p.repetition_penalty for p in ps], device=x.device)[:, None]
        freq = torch.tensor([p.frequency_penalty for p in ps], device=x.device)[:, None]
        pres = torch.tensor([p.presence_penalty for p in ps], device=x.device)[:, None]
        y = x[rows]
        y = torch.where(m, torch.where(y > 0, y / rep, y * rep), y)
        x[rows] = y - freq * c - pres * (c > 0).float()

    def _count_tokens(self, seqs: list[_Seq], tokens: list[int]) -> None:
        pairs = [(s.slot.index, t) for s, t in zip(seqs, tokens)  # type: ignore[union-attr]
                 if t >= 0 and s.req.params.penalizes and s.counts_ready]
        if pairs and self._counts is not None and self._seen is not None:
            r = torch.tensor([i for i, _ in pairs], device=self.device)
            c = torch.tensor([t for _, t in pairs], device=self.device)
            self._counts[r, c] += 1  # one row per slot, so no (row, id) pair repeats
            self._seen[r, c] = True

    def _sample_rows(self, rows: list[_Seq], logits: torch.Tensor, routes: list[list[torch.Tensor] | None]) -> None:
        """Sample one token for each of ``rows`` from its row of ``logits`` [R, V] (after the batched logits
        processing) with its own generator, and emit it."""
        idx, proc, cut = self._process(rows, logits)
        where = {i: j for j, i in enumerate(idx)}
        if proc is not None:
            empty = ~torch.isfinite(proc).any(-1)  # a mask that left nothing to sample
        tokens: list[int] = []
        for i, s in enumerate(rows):
            j = where.get(i)
            if j is not None and bool(empty[j]):
                s.req.handle.error = "the logits mask allowed no token"
                self._finish(s, Output(s.index, None, finish_reason=FINISH_ERROR))
                tokens.append(-1)
                continue
            row = logits[i] if j is None else proc[j]  # type: ignore[index]
            tokens.append(self._sample(s, row, logits[i], routes[i], cut=j is not None and bool(cut[j])))  # type: ignore[index]
        self._count_tokens(rows, tokens)

    def _sample(self, s: _Seq, logits: torch.Tensor, raw: torch.Tensor, routes: list[torch.Tensor] | None,
                cut: bool = False) -> int:
        """Sample one token for ``s`` from its (processed) logits row [V] with its own generator, emit it, and
        return it. ``raw``: the model's own row (for ``model_logprob``); ``cut``: a mask or ``min_tokens``
        removed ids this step (then the kept set is reported even without truncation)."""
        p = s.req.params
        if p.temperature <= 0 and not p.return_allowed:  # greedy: the arg-max has probability 1 (log 0)
            tok, lp = int(logits.argmax(-1)), None
        else:
            lp = truncated_logprobs(logits[None], temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
            tok = int(lp.argmax(-1)) if p.temperature <= 0 else draw(lp[0].exp(), s.gen)
        out = Output(s.index, tok, logprob=float(lp[0, tok]) if lp is not None else 0.0, routes=routes)
        if p.logprobs or p.top_logprobs:
            model_lp = raw.float().log_softmax(-1)
            out.model_logprob = float(model_lp[tok])
            if p.top_logprobs:
                vals, idx = model_lp.topk(min(p.top_logprobs, model_lp.shape[-1]))
                out.top_logprobs = [(int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist())]
        if p.return_allowed and (p.truncates or cut) and lp is not None:
            out.allowed = torch.isfinite(lp[0]).nonzero().squeeze(-1).cpu()
        if s.mask is not None:
            s.mask.accept(tok)
        s.generated += 1
        self.stats["generated_tokens"] += 1
        if tok in p.stop_token_ids:
            out.finish_reason = FINISH_STOP
        elif s.generated >= s.req.max_tokens:
            out.finish_reason = FINISH_LENGTH
        if out.finish_reason is None:
            s.pending = tok
            s.req.handle._push(out)
        else:
            self._finish(s, out)
        return tok

    def _finish(self, s: _Seq, out: Output) -> None:
        s.finished, s.pending = True, None
        if s.slot is not None:
            s.slot.seq = None
            s.slot.last_used = next(self._tick)
        s.req.handle._push(out)
        req = s.req
        if all(x.finished for x in req.seqs):
            if req in self._running:
                self._running.remove(req)
            if req.admitted_at:
                self._service_s = 0.8 * self._service_s + 0.2 * (time.monotonic() - req.admitted_at)
            self._retire(req)

    def _retire(self, req: _Request) -> None:
        with self._cv:
            self._by_handle.pop(req.handle, None)
            self.stats["finished"] += 1
        req.handle._push(_END)

    def _fail_running(self, err: Exception) -> None:
        msg = f"{type(err).__name__}: {err}"
        for req in list(self._running):
            req.handle.error = msg
            for s in req.seqs:
                if s.slot is not None:  # the failed step may have left this row half written
                    s.slot.tokens = []
                    self.cache.reset([s.slot.index])
                if not s.finished:
                    self._finish(s, Output(s.index, None, finish_reason=FINISH_ERROR))
