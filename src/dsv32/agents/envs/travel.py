"""Travel categories besides trip planning: flights with layovers, train timetables, museum tickets."""

from __future__ import annotations

import random

from dsv32.agents.envs.base import Category, Entity, Task, code, exact_task
from dsv32.agents.envs.names import CITIES, WEEKDAYS, adj_noun, date, hhmm, minutes, price, unique

# solution shared by flights and trains: enumerate direct and one-stop itineraries through the two tools,
# filter by the level's constraints, pick the best by `objective` ("price" or "arrival")
ROUTE_SOLUTION = """
def minutes(t):
    h, m = t.split(":")
    return int(h) * 60 + int(m)

routes = [[leg] for leg in direct(origin, destination)]
if max_stops >= 1:
    for a in departures(origin):
        if a["destination"] in (origin, destination):
            continue
        for b in direct(a["destination"], destination):
            if minutes(b["departure"]) >= minutes(a["arrival"]) + min_connection:
                routes.append([a, b])
routes = [r for r in routes if all(leg["operator"] != avoid for leg in r)
          and (latest is None or minutes(r[-1]["arrival"]) <= minutes(latest))]
if objective == "price":
    best = min(routes, key=lambda r: sum(leg["price"] for leg in r))
else:
    best = min(routes, key=lambda r: minutes(r[-1]["arrival"]))
answer = [leg["id"] for leg in best]
"""


def _routes(legs: list[dict], a: str, b: str, max_stops: int, min_conn: int) -> list[list[dict]]:
    out = [[x] for x in legs if x["origin"] == a and x["destination"] == b]
    if max_stops >= 1:
        for x in legs:
            if x["origin"] != a or x["destination"] in (a, b):
                continue
            out += [[x, y] for y in legs if y["origin"] == x["destination"] and y["destination"] == b
                    and minutes(y["departure"]) >= minutes(x["arrival"]) + min_conn]
    return out


def _legs(rng: random.Random, places: list[str], prefix: str, operators: list[str], density: float,
          per_pair: tuple[int, int], dur: tuple[int, int], fare: tuple[float, float]) -> list[dict]:
    legs = []
    for a in places:
        for b in places:
            if a == b or rng.random() > density:
                continue
            for _ in range(rng.randint(*per_pair)):
                dep = rng.randrange(6 * 60, 21 * 60, 5)
                arr = min(dep + rng.randrange(dur[0], dur[1], 5), 23 * 60 + 55)
                legs.append({"id": f"{prefix}{len(legs) + 100 + rng.randint(0, 9) * 1000}", "origin": a,
                             "destination": b, "departure": hhmm(dep), "arrival": hhmm(arr),
                             "operator": rng.choice(operators), "price": price(rng, *fare, 5)})
    return legs


class _Routes(Category):
    """Route-finding over a table of legs; subclasses name the vocabulary."""
    noun = "flight"
    objective = "price"
    direct_tool = ""
    departures_tool = ""
    templates = ("route",)

    def route(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        legs = data["legs"]
        a, b = rng.sample(sorted({x["origin"] for x in legs}), 2)
        max_stops = 0 if level == 1 else 1
        min_conn = rng.choice([30, 45, 60]) if level >= 2 else 0
        avoid, latest = None, None
        routes = _routes(legs, a, b, max_stops, min_conn)
        if level >= 3 and routes:
            avoid = rng.choice(sorted({x["operator"] for r in routes for x in r}))
            arrivals = sorted(minutes(r[-1]["arrival"]) for r in routes)
            latest = hhmm(arrivals[rng.randint(len(arrivals) // 2, len(arrivals) - 1)])
            routes = [r for r in routes if all(x["operator"] != avoid for x in r)
                      and minutes(r[-1]["arrival"]) <= minutes(latest)]
        if len(routes) < 2:
            return None
        key = (lambda r: sum(x["price"] for x in r)) if self.objective == "price" else (
            lambda r: minutes(r[-1]["arrival"]))
        scores = sorted(key(r) for r in routes)
        if scores[0] == scores[1]:
            return None
        best = min(routes, key=key)
        want = ("the cheapest itinerary (total price)" if self.objective == "price"
                else "the itinerary arriving earliest")
        rules = "a direct " + self.noun if level == 1 else (
            f"at most one change, with at least {min_conn} minutes between arriving and the next departure")
        extra = f" Do not use {avoid}, and arrive by {latest}." if level >= 3 else ""
        prompt = (f"Find {want} from {a} to {b} today using {rules}.{extra} Answer with a JSON list of the "
                  f"{self.noun} numbers in travel order.")
        params = {"origin": a, "destination": b, "max_stops": max_stops, "min_connection": min_conn,
                  "avoid": avoid, "latest": latest, "objective": self.objective}
        head = f"direct, departures = {self.direct_tool}, {self.departures_tool}\n"
        return exact_task(prompt, code(params, head + ROUTE_SOLUTION), [x["id"] for x in best], "list", level,
                          f"{self.name}.route")


def _route_tools(direct: str, departures: str, noun: str, place: str) -> str:
    return f'''

    def list_{place}s() -> list[str]:
        """All {place}s served."""
        return _col("SELECT DISTINCT origin FROM legs ORDER BY 1")


    def {direct}(origin: str, destination: str) -> list[dict]:
        """Today's direct {noun}s from one {place} to another (id, departure, arrival HH:MM, operator, price).

        Args:
            origin: departure {place}
            destination: arrival {place}
        """
        return _rows("SELECT * FROM legs WHERE origin = ? COLLATE NOCASE AND destination = ? COLLATE NOCASE "
                     "ORDER BY departure", (origin, destination))


    def {departures}(origin: str) -> list[dict]:
        """All of today's {noun}s leaving a {place}.

        Args:
            origin: departure {place}
        """
        return _rows("SELECT * FROM legs WHERE origin = ? COLLATE NOCASE ORDER BY departure", (origin,))


    def get_{noun}(id: str) -> dict:
        """One {noun} by its number.

        Args:
            id: the {noun} number
        """
        return _get("legs", "id", id)
    '''


class Flights(_Routes):
    name = "flights"
    description = "flight search: direct flights and one-stop itineraries with connection times and airlines"
    noun, objective = "flight", "price"
    direct_tool, departures_tool = "search_flights", "get_flights_from"
    tools = _route_tools("search_flights", "get_flights_from", "flight", "airport")

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        codes = unique(rng, rng.randint(6, 8), lambda r: "".join(r.choice("ABCDEFGHJKLMNPRSTVWXZ") for _ in "xyz"))
        return {"legs": _legs(rng, codes, rng.choice(["SK", "AB", "NM", "QX"]), ["Skyline", "AeroBlue", "Nimbus"],
                              0.5, (1, 3), (50, 240), (60, 600))}


class Trains(_Routes):
    name = "trains"
    description = "train timetables: direct trains and one-change journeys, earliest arrival"
    noun, objective = "train", "arrival"
    direct_tool, departures_tool = "get_direct_trains", "get_departures"
    tools = _route_tools("get_direct_trains", "get_departures", "train", "station")

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        stations = [f"{c} Central" for c in rng.sample(CITIES, rng.randint(6, 8))]
        return {"legs": _legs(rng, stations, rng.choice(["IC", "RE", "EX"]), ["Rail North", "CityLink", "Express"],
                              0.6, (1, 4), (25, 180), (8, 120))}


# ------------------------------------------------------------------------------------------------ museums

MUSEUMS = Entity("museums", "museum", "museums", "city",
                 {"adult": "adult ticket price (EUR)", "child": "child ticket price (EUR)",
                  "senior": "senior ticket price (EUR)"}, {"closed_day": "weekly closing day"}, additive=())

def _n(k: int, noun: str) -> str:
    return f"{k} {noun}" if k == 1 else f"{k} {'children' if noun == 'child' else noun + 's'}"


GROUP_SOLUTION = """
m = get_museum_info(museum)
total = adults * m["adult"] + children * m["child"] + seniors * m["senior"]
if exhibition is not None:
    total += (adults + children + seniors) * get_exhibition(exhibition)["surcharge"]
answer = round(total, 2)
"""

CHEAPEST_SOLUTION = """
best = None
for name in list_museums_by_city(city):
    m = get_museum_info(name)
    if m["closed_day"] == weekday:
        continue
    shows = [e for e in list_exhibitions(name) if e["start_date"] <= day <= e["end_date"]]
    if not shows:
        continue
    cost = adults * m["adult"] + children * m["child"] + seniors * m["senior"]
    cost += (adults + children + seniors) * min(e["surcharge"] for e in shows)
    if best is None or cost < best[0]:
        best = (cost, name)
answer = best[1]
"""


class Museums(Category):
    name = "museums"
    description = "museum tickets: prices per visitor type, closing days, exhibitions with surcharges"
    entities = (MUSEUMS,)
    templates = ("group_cost", "cheapest")
    query_share = 0.3
    tools = '''

    def list_exhibitions(museum: str) -> list[dict]:
        """Exhibitions of a museum with their dates (YYYY-MM-DD, inclusive) and surcharge per visitor (EUR).

        Args:
            museum: museum name
        """
        return _rows("SELECT * FROM exhibitions WHERE museum = ? COLLATE NOCASE ORDER BY start_date", (museum,))


    def get_exhibition(title: str) -> dict:
        """One exhibition by its title.

        Args:
            title: exhibition title
        """
        return _get("exhibitions", "title", title)
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        cities = rng.sample(CITIES, 3)
        names = unique(rng, 15, adj_noun("Museum"))
        museums = []
        for i, n in enumerate(names):
            adult = price(rng, 8, 30, 0.5)
            museums.append({"name": n, "city": cities[i % 3], "adult": adult, "child": round(adult * 0.5, 2),
                            "senior": round(adult * rng.choice([0.6, 0.7, 0.8]), 2),
                            "closed_day": rng.choice(WEEKDAYS)})
        titles = iter(unique(rng, 40, lambda r: f"{r.choice(['Light', 'Echoes', 'Maps', 'Dreams', 'Voices'])} of "
                                                f"the {r.choice(['Sea', 'North', 'Empire', 'Future', 'Garden'])}"))
        exhibitions = []
        for m in museums:
            for _ in range(rng.randint(1, 3)):
                start = rng.randint(1, 20)
                exhibitions.append({"title": next(titles), "museum": m["name"], "start_date": date(start),
                                    "end_date": date(min(31, start + rng.randint(3, 15))),
                                    "surcharge": price(rng, 2, 12, 0.5)})
        return {"museums": museums, "exhibitions": exhibitions}

    def _group(self, rng: random.Random, level: int) -> dict:
        return {"adults": rng.randint(1, 4), "children": rng.randint(0, 3), "seniors": rng.randint(1, 2) if level > 1
                else 0}

    def group_cost(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        if level >= 3:
            return None
        m = rng.choice(data["museums"])
        g = self._group(rng, level)
        exh = None
        total = g["adults"] * m["adult"] + g["children"] * m["child"] + g["seniors"] * m["senior"]
        if level == 2:
            e = rng.choice([e for e in data["exhibitions"] if e["museum"] == m["name"]])
            exh = e["title"]
            total += sum(g.values()) * e["surcharge"]
        who = f"{_n(g['adults'], 'adult')}, {_n(g['children'], 'child')}" + (
            f" and {_n(g['seniors'], 'senior')}" if level > 1 else "")
        extra = f", all visiting the exhibition '{exh}' (its surcharge is per visitor)" if exh else ""
        prompt = f"What do tickets for {who} at the {m['name']} cost in total{extra}? Answer with a number in EUR."
        return exact_task(prompt, code({"museum": m["name"], **g, "exhibition": exh}, GROUP_SOLUTION),
                          round(total, 2), "number", level, "museums.group_cost")

    def cheapest(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        if level < 3:
            return None
        city = rng.choice(sorted({m["city"] for m in data["museums"]}))
        day_n = rng.randint(1, 31)
        day, weekday = date(day_n), WEEKDAYS[(day_n + 1) % 7]        # 1 Oct 2025 is a Wednesday
        g = self._group(rng, level)
        costs = []
        for m in data["museums"]:
            shows = [e for e in data["exhibitions"] if e["museum"] == m["name"] and e["start_date"] <= day <= e[
                "end_date"]]
            if m["city"] != city or m["closed_day"] == weekday or not shows:
                continue
            costs.append((g["adults"] * m["adult"] + g["children"] * m["child"] + g["seniors"] * m["senior"]
                          + sum(g.values()) * min(e["surcharge"] for e in shows), m["name"]))
        costs.sort()
        if len(costs) < 2 or costs[0][0] == costs[1][0]:
            return None
        prompt = (f"On {day} ({weekday}) a group of {_n(g['adults'], 'adult')}, {_n(g['children'], 'child')} and "
                  f"{_n(g['seniors'], 'senior')} wants to visit one museum in {city} that is open that day and "
                  "shows at least one exhibition on that date; each visitor pays the museum's ticket plus the "
                  "surcharge of the cheapest exhibition showing. Which museum is cheapest for the group? Answer "
                  "with its name.")
        params = {"city": city, "day": day, "weekday": weekday, **g}
        return exact_task(prompt, code(params, CHEAPEST_SOLUTION), costs[0][1], "text", level, "museums.cheapest")
