"""Verifiable tasks, offline: procedural generators from ``reasoning-gym`` (each with its own scorer), maths
answers checked with ``math-verify`` (:mod:`dsv32.rl.rewards`). Everything is generated locally from seeds;
nothing is downloaded.

Training and held-out items never share a question: the two splits draw from different generator seeds, and
on top of that every question is assigned to one split by a hash of its text (1 in ``HELDOUT_EVERY`` goes to
held-out), so even a short expression that both seeds happen to generate lands in one split only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsv32.chat import IM_END, IM_START, encode_chat
from dsv32.rl.rewards import FORMAT_INSTRUCTION, RewardConfig, extract_answer, math_equal, shaped_reward
from dsv32.rl.rollout import Rollout
from dsv32.tokenizer import Tokenizer

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 8


@dataclass(frozen=True)
class Item:
    """One task instance. ``prompt`` = question + the answer-format instruction (chat templating is the
    caller's); ``entry`` is reasoning-gym's record, which its scorer reads."""

    task: str
    split: str
    index: int
    question: str
    answer: str
    prompt: str
    entry: dict[str, Any] = field(repr=False, compare=False, hash=False)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def split_of(question: str) -> str:
    """The one split a question may appear in."""
    return "heldout" if _digest(question) % HELDOUT_EVERY == 0 else "train"


@dataclass
class Task:
    """A reasoning-gym generator under a dsv32 name. ``checker``: "math" compares with math-verify, "gym" uses
    the generator's own scorer (partial credit possible; "correct" only at full score)."""

    name: str
    generator: str
    checker: str
    config: dict[str, Any] = field(default_factory=dict)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        if self.checker not in ("math", "gym"):
            raise ValueError(f"task {self.name!r}: checker must be 'math' or 'gym', got {self.checker!r}")
        self._scorer = None

    def _dataset(self, seed: int, size: int):
        # deliberately lazy: reasoning-gym is the optional ``rl`` extra and takes ~1.6 s to import
        import reasoning_gym

        return reasoning_gym.create_dataset(self.generator, seed=seed, size=size, **self.config)

    def items(self, split: str, n: int, seed: int = 0) -> list[Item]:
        """``n`` items of ``split`` ("train" or "heldout"), deterministic in (task, split, seed)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        gen_seed = _digest(f"dsv32.rl.tasks:{self.name}:{split}:{seed}") >> 1
        budget = max(64, 4 * HELDOUT_EVERY * n)  # generator draws allowed before giving up
        ds = self._dataset(gen_seed, budget)
        out: list[Item] = []
        for i in range(budget):
            entry = ds[i]
            q = entry["question"]
            if split_of(q) != split:
                continue
            out.append(Item(self.name, split, len(out), q, str(entry["answer"]), f"{q}\n{FORMAT_INSTRUCTION}", entry))
            if len(out) == n:
                return out
        raise ValueError(f"task {self.name!r}: only {len(out)} {split} items in {budget} draws (n={n}); "
                         "the generator's configuration has too few distinct questions")

    def check(self, item: Item, answer: str | None) -> float:
        """The outcome score in [0, 1] of an extracted answer."""
        if answer is None:
            return 0.0
        if self.checker == "math":
            return 1.0 if math_equal(answer, item.answer) else 0.0
        if self._scorer is None:
            self._scorer = self._dataset(0, 1)
        return float(self._scorer.score_answer(answer, item.entry))

    def score(
        self, item: Item, completion_text: str, *, n_tokens: int | None = None, max_tokens: int | None = None
    ) -> tuple[float, str]:
        """(shaped reward, verdict): verdict is "correct", "wrong" or "no_answer" (no ``<answer>`` block).
        The length penalty applies when both ``n_tokens`` and ``max_tokens`` are given."""
        answer = extract_answer(completion_text)
        outcome = self.check(item, answer)
        verdict = "no_answer" if answer is None else ("correct" if outcome >= 1.0 else "wrong")
        return shaped_reward(outcome, completion_text, self.reward, n_tokens=n_tokens, max_tokens=max_tokens), verdict


TASKS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (reasoning-gym generator, checker, generator configuration)
    "chain_sum": ("chain_sum", "math", {}),
    "basic_arithmetic": ("basic_arithmetic", "math", {}),
    "letter_counting": ("letter_counting", "math", {}),  # an integer answer: no partial credit
    "knights_knaves": ("knights_knaves", "gym", {}),  # the logic puzzle
}


def get_task(name: str, reward: RewardConfig | None = None, **config: Any) -> Task:
    """The registered task ``name``; ``config`` overrides its generator's settings (e.g. ``max_terms=3``)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    generator, checker, base = TASKS[name]
    return Task(name, generator, checker, {**base, **config}, reward or RewardConfig())


def parse_task_config(entries: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``NAME.KEY=VALUE`` entries (VALUE read as JSON when it parses, else kept as a string) -> per-task generator
    settings for :func:`get_task`, e.g. ``chain_sum.max_terms=2``."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        key, eq, raw = e.partition("=")
        name, dot, setting = key.partition(".")
        if not (eq and dot and name and setting):
            raise ValueError(f"task setting {e!r}: expected NAME.KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[setting] = value
    return out


def score_rollouts(
    rollouts: Sequence[Rollout],
    items: Sequence[Item],
    tasks: Mapping[str, Task],
    decode: Callable[[list[int]], str],
) -> float:
    """Score each rollout against ``items[rollout.group]`` with its task (``tasks[item.task]``): sets
    ``reward``, ``verdict``, ``task`` and ``meta`` (split, item index, reference answer). The length penalty
    uses the rollout's own ``max_tokens``. Returns the accuracy (share of "correct" verdicts)."""
    for ro in rollouts:
        item = items[ro.group]
        task = tasks[item.task]
        text = decode(ro.completion_ids)
        ro.reward, ro.verdict = task.score(item, text, n_tokens=len(ro.completion_ids), max_tokens=ro.max_tokens)
        ro.task = item.task
        ro.meta.update(split=item.split, item=item.index, answer=item.answer)
    return sum(ro.verdict == "correct" for ro in rollouts) / max(len(rollouts), 1)


@dataclass
class ChatCodec:
    """Prompts in the model's chat format (ChatML when the tokenizer has ``<|im_start|>``, else V3.2's), the
    stop ids, and decoding of completions."""

    tokenizer: Tokenizer
    family: str
    stop_ids: tuple[int, ...]

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer) -> ChatCodec:
        family = "chatml" if tok.token_to_id(IM_START) is not None else "deepseek-v3.2"
        stops = {tok.eos_id, tok.token_to_id(IM_END) if family == "chatml" else None}
        return cls(tok, family, tuple(sorted(t for t in stops if t is not None)))

    def prompt(self, text: str) -> list[int]:
        return encode_chat([{"role": "user", "content": text}], family=self.family, tokenizer=self.tokenizer)[0]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
