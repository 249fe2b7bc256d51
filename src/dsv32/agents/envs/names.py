"""Word pools and small random helpers the categories build their data from (fictional names: the tasks must
be solved from the environment's tools, never from world knowledge)."""

from __future__ import annotations

import random
from collections.abc import Callable

CITIES = ["Amberton", "Brightwater", "Coldharbour", "Dunmore", "Eastvale", "Fairhaven", "Glenrock", "Highmoor",
          "Ironbridge", "Juniper Bay", "Kingsford", "Lakeshire", "Millbrook", "Northgate", "Oakridge", "Port Elwin",
          "Queensfield", "Riverton", "Stonehill", "Thornbury", "Upwell", "Valewood", "Westmarch", "Yarrow"]
ADJ = ["Golden", "Silver", "Blue", "Red", "Green", "Quiet", "Grand", "Little", "Old", "New", "Royal", "Sunny",
       "Hidden", "Misty", "Crystal", "Amber", "Ivory", "Maple", "Cedar", "Copper", "Velvet", "Lucky", "Happy",
       "Wild", "Northern", "Southern", "Eastern", "Western", "Bright", "Gentle"]
NOUN = ["Lantern", "Harbor", "Garden", "Pine", "River", "Lotus", "Crown", "Falcon", "Meadow", "Bridge", "Tower",
        "Willow", "Orchid", "Summit", "Bay", "Anchor", "Compass", "Fox", "Heron", "Oak", "Star", "Moon", "Cloud",
        "Stone", "Brook", "Hill", "Valley", "Forest", "Island", "Castle"]
FIRST = ["Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Maya",
         "Nico", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wei", "Xenia", "Yusuf", "Zoe"]
LAST = ["Abbott", "Brennan", "Castillo", "Dalton", "Eriksen", "Fischer", "Gupta", "Hale", "Ivanova", "Jensen",
        "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quispe", "Rossi", "Sato", "Tanaka",
        "Ueda", "Varga", "Weber", "Xu", "Yilmaz", "Zimmer"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def unique(rng: random.Random, n: int, make: Callable[[random.Random], str]) -> list[str]:
    """`n` distinct names from `make` (adds a numeral after many collisions, so it always terminates)."""
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        name = make(rng)
        tries += 1
        if name in seen:
            if tries < 50 * n:
                continue
            name = f"{name} {len(out) + 2}"
        seen.add(name)
        out.append(name)
    return out


def adj_noun(suffix: str = "") -> Callable[[random.Random], str]:
    return lambda r: f"{r.choice(ADJ)} {r.choice(NOUN)}{' ' + suffix if suffix else ''}"


def person(r: random.Random) -> str:
    return f"{r.choice(FIRST)} {r.choice(LAST)}"


def price(rng: random.Random, lo: float, hi: float, step: float = 1.0) -> float:
    """A price on a grid of `step` (floats for money, so sums show cents)."""
    return round(round(rng.uniform(lo, hi) / step) * step, 2)


def hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def minutes(t: str) -> int:
    h, m = t.split(":")
    return int(h) * 60 + int(m)


def date(day: int, month: int = 10, year: int = 2025) -> str:
    return f"{year:04d}-{month:02d}-{day:02d}"
