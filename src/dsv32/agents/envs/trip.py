"""Trip planning, the paper's worked example (§3.3): cities with hotels, restaurants and attractions, inter-city
transport and weather; an itinerary task whose constraints grow with the level (more days, no repeats, a
rating floor, a total budget, then a conditional rule tied to the day-2 hotel's price band). Several plans
are valid, so the verifier checks the constraints through the tools instead of comparing with one answer."""

from __future__ import annotations

import math
import random

from dsv32.agents.envs.base import Category, Entity, Task, code
from dsv32.agents.envs.names import CITIES, adj_noun, date, price, unique

HOTELS = Entity("hotels", "hotel", "hotels", "city", {"price": "price per night (CNY)", "rating": "rating"},
                {"stars": "star class"}, "get_all_hotels_by_city", "get_infos_by_hotel", additive=("price",))
RESTAURANTS = Entity("restaurants", "restaurant", "restaurants", "city",
                     {"avg_cost": "average cost per person (CNY)", "rating": "rating"}, {"cuisine": "cuisine"},
                     "get_all_restaurants_by_city", "get_infos_by_restaurant", additive=("avg_cost",))
ATTRACTIONS = Entity("attractions", "attraction", "attractions", "city",
                     {"ticket": "ticket price (CNY)", "rating": "rating"}, {"kind": "kind"},
                     "get_all_attractions_by_city", "get_infos_by_attraction", additive=("ticket",))

PLAN_SOLUTION = """
def hop(a, b):
    options = get_inter_city_transport(a, b)
    return min(o["price"] for o in options) if options else None

def infos(lister, getter, city):
    return [getter(n) for n in lister(city)]

cities = get_all_cities()
def paths(p):
    if len(p) == days:
        yield p
        return
    for c in cities:
        if c not in p and hop(p[-1], c) is not None:
            yield from paths(p + [c])

best, best_cost = None, None
for p in paths([start]):
    hotels = [[h for h in infos(get_all_hotels_by_city, get_infos_by_hotel, c) if h["rating"] >= min_rating]
              for c in p]
    rests = [infos(get_all_restaurants_by_city, get_infos_by_restaurant, c) for c in p]
    sights = [infos(get_all_attractions_by_city, get_infos_by_attraction, c) for c in p]
    travel = sum(hop(a, b) for a, b in zip(p, p[1:]))
    branches = [(None, None, None)] if rule is None else [("above", rule[1], None), ("below", None, rule[2])]
    for band, max_rest, min_sight in branches:
        day_h = [list(hs) for hs in hotels]
        if band == "above":
            day_h[1] = [h for h in day_h[1] if h["price"] > rule[0]]
        elif band == "below":
            day_h[1] = [h for h in day_h[1] if h["price"] <= rule[0]]
        day_r = [[r for r in rs if max_rest is None or r["avg_cost"] <= max_rest] for rs in rests]
        day_s = [[s for s in ss if min_sight is None or s["rating"] >= min_sight] for ss in sights]
        if not all(day_h) or not all(day_r) or not all(day_s):
            continue
        picks = [(min(h, key=lambda x: x["price"]), min(r, key=lambda x: x["avg_cost"]),
                  min(s, key=lambda x: x["ticket"])) for h, r, s in zip(day_h, day_r, day_s)]
        cost = travel + sum(h["price"] + r["avg_cost"] + s["ticket"] for h, r, s in picks)
        if best_cost is None or cost < best_cost:
            best_cost = cost
            best = [{"day": i + 1, "city": c, "hotel": h["name"], "attraction": s["name"], "restaurant": r["name"]}
                    for i, (c, (h, r, s)) in enumerate(zip(p, picks))]
answer = best
"""

PLAN_VERIFIER = """
from checks import field, norm

def pick(value, names):
    for n in names:
        if value is not None and norm(n) == norm(value):
            return n
    return None

def verify(answer):
    if not isinstance(answer, list) or len(answer) != days:
        return False, f"expected a list of {days} day entries"
    total, cities, rows = 0.0, [], []
    for i, item in enumerate(answer):
        city = pick(field(item, "city"), get_all_cities())
        if city is None:
            return False, f"day {i + 1}: unknown city"
        hotel = pick(field(item, "hotel", "hotel_name"), get_all_hotels_by_city(city))
        sight = pick(field(item, "attraction", "attraction_name"), get_all_attractions_by_city(city))
        rest = pick(field(item, "restaurant", "restaurant_name"), get_all_restaurants_by_city(city))
        if None in (hotel, sight, rest):
            return False, f"day {i + 1}: hotel, attraction and restaurant must be in {city}"
        h, s, r = get_infos_by_hotel(hotel), get_infos_by_attraction(sight), get_infos_by_restaurant(rest)
        if h["rating"] < min_rating:
            return False, f"day {i + 1}: hotel rated below {min_rating}"
        total += h["price"] + s["ticket"] + r["avg_cost"]
        cities.append(city)
        rows.append((h, s, r))
    if norm(cities[0]) != norm(start):
        return False, "the trip must start in " + start
    if len(set(cities)) != len(cities):
        return False, "a city is visited twice"
    for a, b in zip(cities, cities[1:]):
        options = get_inter_city_transport(a, b)
        if not options:
            return False, f"no direct transport {a} -> {b}"
        total += min(o["price"] for o in options)
    if total > budget + 1e-6:
        return False, f"total cost {total:.2f} exceeds the budget {budget}"
    if rule is not None:
        if rows[1][0]["price"] > rule[0]:
            if any(r["avg_cost"] > rule[1] for _, _, r in rows):
                return False, "day-2 hotel above the band: a restaurant is too expensive"
        elif any(s["rating"] < rule[2] for _, s, _ in rows):
            return False, "day-2 hotel within the band: an attraction is rated too low"
    return True, "all constraints hold"
"""

PLAN_SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "day": {"type": "integer"}, "city": {"type": "string"}, "hotel": {"type": "string"},
    "attraction": {"type": "string"}, "restaurant": {"type": "string"}}}}


class Trip(Category):
    name = "trip"
    description = "trip planning: cities, hotels, restaurants, attractions, transport and weather"
    entities = (HOTELS, RESTAURANTS, ATTRACTIONS)
    templates = ("plan",)
    query_share = 0.4
    tools = '''

    def get_all_cities() -> list[str]:
        """Names of all the cities in the database."""
        return _col("SELECT name FROM cities ORDER BY name")


    def get_infos_by_city(city: str) -> dict:
        """Region and population of a city.

        Args:
            city: city name
        """
        return _get("cities", "name", city)


    def get_city_by_hotel(hotel: str) -> str:
        """The city a hotel is in.

        Args:
            hotel: hotel name
        """
        return _get("hotels", "name", hotel)["city"]


    def get_city_by_attraction(attraction: str) -> str:
        """The city an attraction is in.

        Args:
            attraction: attraction name
        """
        return _get("attractions", "name", attraction)["city"]


    def get_city_by_restaurant(restaurant: str) -> str:
        """The city a restaurant is in.

        Args:
            restaurant: restaurant name
        """
        return _get("restaurants", "name", restaurant)["city"]


    def get_inter_city_transport(from_city: str, to_city: str) -> list[dict]:
        """Direct transport options between two cities (mode, price in CNY, hours); empty if none.

        Args:
            from_city: departure city
            to_city: arrival city
        """
        return _rows("SELECT mode, price, hours FROM transport WHERE from_city = ? COLLATE NOCASE "
                     "AND to_city = ? COLLATE NOCASE ORDER BY price", (from_city, to_city))


    def get_city_transport(city: str) -> list[dict]:
        """Transport inside a city: mode (metro, bus, taxi) and the usual fare per ride in CNY.

        Args:
            city: city name
        """
        return _rows("SELECT mode, fare FROM city_transport WHERE city = ? COLLATE NOCASE ORDER BY fare", (city,))


    def get_weather_by_city_date(city: str, date: str) -> dict:
        """Forecast for a city on a date (YYYY-MM-DD): condition and high/low temperature in Celsius.

        Args:
            city: city name
            date: date as YYYY-MM-DD
        """
        rows = _rows("SELECT * FROM weather WHERE city = ? COLLATE NOCASE AND date = ?", (city, date))
        if not rows:
            raise ValueError(f"no forecast for {city!r} on {date!r}")
        return rows[0]
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        cities = rng.sample(CITIES, rng.randint(6, 8))
        data: dict[str, list[dict]] = {"cities": [
            {"name": c, "region": rng.choice(["north", "south", "east", "west"]),
             "population": rng.randint(50, 3000) * 1000} for c in cities]}
        n_per = {c: rng.randint(4, 6) for c in cities}
        total = sum(n_per.values())
        names = {k: iter(unique(rng, total, adj_noun(k.title()))) for k in ("hotel", "restaurant", "park")}
        data["hotels"] = [{"name": next(names["hotel"]), "city": c, "price": price(rng, 180, 1200, 10),
                           "rating": round(rng.uniform(3.0, 5.0), 1), "stars": rng.randint(2, 5)}
                          for c in cities for _ in range(n_per[c])]
        data["restaurants"] = [{"name": next(names["restaurant"]), "city": c,
                                "cuisine": rng.choice(["local", "sichuan", "cantonese", "noodles", "seafood"]),
                                "avg_cost": price(rng, 30, 400, 5), "rating": round(rng.uniform(3.0, 5.0), 1)}
                               for c in cities for _ in range(n_per[c])]
        data["attractions"] = [{"name": next(names["park"]).replace("Park", rng.choice(["Park", "Museum", "Temple"])),
                                "city": c, "kind": rng.choice(["nature", "history", "art", "family"]),
                                "ticket": price(rng, 0, 300, 5), "rating": round(rng.uniform(3.0, 5.0), 1)}
                               for c in cities for _ in range(n_per[c])]
        data["transport"] = []
        for i, a in enumerate(cities):
            for b in cities[i + 1:]:
                if rng.random() < 0.55:
                    for mode in rng.sample(["train", "bus", "flight"], rng.randint(1, 2)):
                        p, h = price(rng, 40, 900, 5), round(rng.uniform(0.5, 6.0), 1)
                        data["transport"] += [{"from_city": a, "to_city": b, "mode": mode, "price": p, "hours": h},
                                              {"from_city": b, "to_city": a, "mode": mode, "price": p, "hours": h}]
        data["weather"] = [{"city": c, "date": date(d), "condition": rng.choice(["sunny", "cloudy", "rain"]),
                            "high": rng.randint(14, 30), "low": rng.randint(5, 13)} for c in cities for d in (1, 2, 3)]
        data["city_transport"] = [{"city": c, "mode": m, "fare": price(rng, lo, hi, 1)} for c in cities
                                  for m, lo, hi in (("metro", 2, 8), ("bus", 1, 4), ("taxi", 15, 60))]
        return data

    def plan(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        """Level 1: one day, rating floor and budget; 2: two days, linked cities, no repeats; 3: three days and
        the paper's conditional rule on the day-2 hotel's price band."""
        days = level
        hop: dict[tuple[str, str], float] = {}
        for t in data["transport"]:
            key = (t["from_city"], t["to_city"])
            hop[key] = min(hop.get(key, math.inf), t["price"])
        by_city = {k: {} for k in ("hotels", "restaurants", "attractions")}
        for k in by_city:
            for r in data[k]:
                by_city[k].setdefault(r["city"], []).append(r)
        path = [rng.choice([c["name"] for c in data["cities"]])]
        while len(path) < days:
            nxt = sorted(b for (a, b) in hop if a == path[-1] and b not in path)
            if not nxt:
                return None
            path.append(rng.choice(nxt))
        picks = [(rng.choice(by_city["hotels"][c]), rng.choice(by_city["restaurants"][c]),
                  rng.choice(by_city["attractions"][c])) for c in path]
        min_rating = math.floor(min(h["rating"] for h, _, _ in picks) * 10) / 10
        cost = sum(h["price"] + r["avg_cost"] + s["ticket"] for h, r, s in picks)
        cost += sum(hop[(a, b)] for a, b in zip(path, path[1:]))
        budget = math.ceil(cost * rng.uniform(1.0, 1.12))
        rule = None
        text = ""
        if days >= 3:
            h2 = picks[1][0]["price"]
            above = rng.random() < 0.5
            band = h2 - 10 if above else h2
            if above:   # the plan satisfies the restaurant cap; the attraction floor is a distractor
                rule = (band, max(r["avg_cost"] for _, r, _ in picks), round(rng.uniform(3.5, 4.5), 1))
            else:       # the plan satisfies the attraction floor; the restaurant cap is a distractor
                rule = (band, price(rng, 30, 120, 5), min(s["rating"] for _, _, s in picks))
            text = (f" If the day-2 hotel costs more than {band:g} CNY per night, every restaurant must have an "
                    f"average cost of at most {rule[1]:g} CNY; otherwise every attraction must be rated at least "
                    f"{rule[2]:g}.")
        span = "1 October 2025" if days == 1 else f"1-{days} October 2025"
        prompt = (f"Plan a {days}-day trip starting in {path[0]} ({span}), one city per day. Each day pick one "
                  "hotel, one attraction and one restaurant in that day's city. "
                  + ("Consecutive days' cities must be linked by direct inter-city transport, and no city may be "
                     "visited twice (so no hotel, attraction or restaurant repeats). " if days > 1 else "")
                  + f"Every hotel must be rated at least {min_rating:g}. The total cost (hotel prices per night + "
                  "attraction tickets + restaurant average costs"
                  + (" + the cheapest transport option between consecutive cities" if days > 1 else "")
                  + f") must not exceed {budget} CNY.{text} Answer with a JSON list with one object per day: "
                  '{"day": 1, "city": ..., "hotel": ..., "attraction": ..., "restaurant": ...}.')
        params = {"start": path[0], "days": days, "min_rating": min_rating, "budget": budget, "rule": rule}
        return Task(prompt, code(params, PLAN_SOLUTION), code(params, PLAN_VERIFIER), PLAN_SCHEMA, level, None,
                    "trip.plan")
