"""Rule-based rewards for verifiable tasks, in the shape V3.2 lists for reasoning RL (report §3.1 / §2.2 of the
post-training section): an outcome reward from a verifier, a length penalty and a language-consistency reward.
The paper gives neither forms nor weights; the ones here are stated in :class:`RewardConfig`.

The answer format the model must use: the final answer inside ``<answer>...</answer>`` (the last such block
counts). Maths answers are compared with ``math-verify`` (symbolic/numeric equality: ``-4`` = ``-4.0``,
``1/2`` = ``0.5``).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FORMAT_INSTRUCTION = (
    f"Put the final answer inside {ANSWER_OPEN}{ANSWER_CLOSE} tags, e.g. {ANSWER_OPEN}42{ANSWER_CLOSE}."
)
_ANSWER_RE = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)
MAX_MATH_ANSWER_CHARS = 64  # longer "answers" are not parsed symbolically (sympy can hang on e.g. towers of powers)


def extract_answer(text: str) -> str | None:
    """The content of the last complete ``<answer>...</answer>`` block (tags case- and space-insensitive),
    stripped; None when there is none or it is empty."""
    found = _ANSWER_RE.findall(text)
    if not found:
        return None
    ans = found[-1].strip()
    return ans or None


def math_equal(pred: str, gold: str) -> bool:
    """Whether ``pred`` equals ``gold`` as mathematics (math-verify: parsing, then symbolic/numeric comparison).

    math-verify's timeouts use ``signal.alarm``, which only the main thread may set; elsewhere (engine or Ray
    worker threads) they are off, and the answer length cap bounds the work instead.
    """
    # deliberately lazy: math-verify (with sympy) is the optional ``rl`` extra and takes ~0.7 s to import
    from math_verify import parse, verify

    if len(pred) > MAX_MATH_ANSWER_CHARS:
        return False
    main = threading.current_thread() is threading.main_thread()
    t = 5 if main else None
    g, p = parse(gold, parsing_timeout=t), parse(pred, parsing_timeout=t)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=t))


def overlong_penalty(n_tokens: int, max_tokens: int, soft: int) -> float:
    """0 up to ``max_tokens - soft`` tokens, then falling linearly to -1 at ``max_tokens`` (a soft length
    penalty: it tells the policy the budget is near before truncation cuts the answer off)."""
    if soft <= 0:
        return -1.0 if n_tokens >= max_tokens else 0.0
    start = max_tokens - soft
    return -min(1.0, max(0, n_tokens - start) / soft)


def _in_script(ch: str, script: str) -> bool:
    if script == "latin":
        return ch.isascii() or "LATIN" in unicodedata.name(ch, "")
    if script == "cjk":
        return "CJK" in unicodedata.name(ch, "") or "HIRAGANA" in unicodedata.name(ch, "")
    raise ValueError(f"unknown script {script!r} (known: latin, cjk)")


def language_consistency(text: str, script: str = "latin") -> float:
    """Share of the words (runs of letters) written entirely in the target ``script``; 1.0 when the text has
    no letters. V3.2 uses a language-consistency reward so that the reasoning stays in the prompt's language."""
    words = re.findall(r"[^\W\d_]+", text)
    if not words:
        return 1.0
    return sum(all(_in_script(c, script) for c in w) for w in words) / len(words)


@dataclass(frozen=True)
class RewardConfig:
    """reward = outcome (the verifier's score in [0, 1]) - format_weight * [no answer block]
    + length_weight * overlong_penalty + language_weight * (consistency - 1).

    A correct, well-formed answer within the budget in the target script scores exactly 1.
    """

    format_weight: float = 0.1
    length_weight: float = 0.2
    length_soft: int = 16  # tokens before max_tokens where the length penalty starts
    language_weight: float = 0.1
    script: str = "latin"


def shaped_reward(
    outcome: float, text: str, cfg: RewardConfig, *, n_tokens: int | None = None, max_tokens: int | None = None
) -> float:
    """Combine the outcome with the format, length and language terms (see :class:`RewardConfig`)."""
    r = float(outcome)
    if extract_answer(text) is None:
        r -= cfg.format_weight
    if n_tokens is not None and max_tokens is not None:
        r += cfg.length_weight * overlong_penalty(n_tokens, max_tokens, cfg.length_soft)
    r += cfg.language_weight * (language_consistency(text, cfg.script) - 1.0)
    return r
