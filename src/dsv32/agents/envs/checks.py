"""Answer checks that verifiers share (standard library only: a copy travels into every environment directory
and is imported inside the sandbox as `checks`).

A submitted answer is whatever JSON the agent sent, so every check is lenient about form and strict about
content: strings compare case- and whitespace-insensitively, numbers within a tolerance (numeric strings
such as "1,250.50" or "12.5 EUR" count), sets ignore order and duplicates, lists keep order.
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"[-+]?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def norm(value) -> str:
    """Case-folded, whitespace-collapsed text with surrounding quotes and punctuation dropped."""
    text = " ".join(str(value).split()).casefold()
    return text.strip(" \t'\"`.,;:!?")


def as_number(value) -> float | None:
    """A number from a number or a string holding exactly one (thousands separators allowed); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        found = _NUMBER.findall(value)
        if len(found) == 1:
            try:
                return float(found[0].replace(",", ""))
            except ValueError:
                return None
    return None


def same_number(answer, expected: float, tol: float = 0.01) -> bool:
    """Within `tol` of `expected` (plus a relative 1e-9 for float round-off on large values)."""
    got = as_number(answer)
    return got is not None and abs(got - expected) <= tol + 1e-9 * abs(expected)


def same_text(answer, expected: str) -> bool:
    return isinstance(answer, (str, int, float)) and not isinstance(answer, bool) and norm(answer) == norm(expected)


def as_list(answer) -> list | None:
    """A list from a list, or from a string of comma/semicolon/newline separated items; else None."""
    if isinstance(answer, list):
        return answer
    if isinstance(answer, str) and answer.strip():
        return [p for p in re.split(r"[,;\n]", answer) if p.strip()]
    return None


def same_set(answer, expected: list) -> bool:
    """The same items in any order (strings normalised, duplicates ignored)."""
    items = as_list(answer)
    return items is not None and bool(expected) and {norm(x) for x in items} == {norm(x) for x in expected}


def same_list(answer, expected: list) -> bool:
    """The same items in the same order (strings normalised)."""
    items = as_list(answer)
    return items is not None and [norm(x) for x in items] == [norm(x) for x in expected]


def check(answer, expected, kind: str, tol: float = 0.01) -> bool:
    """Dispatch on the answer kind a task declares: text | number | set | list."""
    if kind == "text":
        return same_text(answer, expected)
    if kind == "number":
        return same_number(answer, expected, tol)
    if kind == "set":
        return same_set(answer, expected)
    if kind == "list":
        return same_list(answer, expected)
    raise ValueError(f"unknown answer kind {kind!r}")


def field(item, *names):
    """The first of `names` present in a dict (case-insensitive keys), else None: planners' answers name
    their fields a little differently ("hotel" / "Hotel" / "hotel_name")."""
    if not isinstance(item, dict):
        return None
    low = {norm(k): v for k, v in item.items()}
    for name in names:
        if norm(name) in low:
            return low[norm(name)]
    return None
