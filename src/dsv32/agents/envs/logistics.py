"""Logistics and structure categories: warehouse picking, parcel routing, file-system puzzles, course
prerequisites, sports league tables."""

from __future__ import annotations

import heapq
import random

from dsv32.agents.envs.base import Category, Task, code, exact_task
from dsv32.agents.envs.names import ADJ, CITIES, NOUN, date, person, unique

# ------------------------------------------------------------------------------------------------ warehouse

PICK_SOLUTION = """
lines = get_order(order_id) if order_id is not None else [{"item": item, "qty": 0}]
if op == "stock":
    answer = sum(b["qty"] for b in find_item(item))
elif op == "aisles":
    aisles = set()
    for line in lines:
        best = max(find_item(line["item"]), key=lambda b: (b["qty"], b["bin"]))
        aisles.add(get_bin(best["bin"])["aisle"])
    answer = sorted(aisles)
else:
    answer = sum(max(0, line["qty"] - sum(b["qty"] for b in find_item(line["item"]))) for line in lines)
"""


class Warehouse(Category):
    name = "warehouse"
    description = "warehouse picking: items stored in bins along aisles, customer orders"
    templates = ("pick",)
    tools = '''

    def list_orders() -> list[str]:
        """Open order ids."""
        return _col("SELECT DISTINCT order_id FROM orders ORDER BY 1")


    def get_order(order_id: str) -> list[dict]:
        """The lines of an order: item and quantity.

        Args:
            order_id: order id
        """
        rows = _rows("SELECT item, qty FROM orders WHERE order_id = ? COLLATE NOCASE", (order_id,))
        if not rows:
            raise ValueError(f"no order {order_id!r}")
        return rows


    def find_item(item: str) -> list[dict]:
        """Bins holding an item and the quantity in each.

        Args:
            item: item name
        """
        return _rows("SELECT bin, qty FROM stock WHERE item = ? COLLATE NOCASE ORDER BY bin", (item,))


    def get_bin(bin: str) -> dict:
        """Where a bin is: aisle and shelf.

        Args:
            bin: bin id
        """
        return _get("bins", "bin", bin)
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        bins = [{"bin": f"B{a}{s:02d}", "aisle": f"Aisle {a}", "shelf": s} for a in "ABCDEF" for s in range(1, 7)]
        items = unique(rng, 24, lambda r: f"{r.choice(ADJ).lower()} {r.choice(NOUN).lower()} widget")
        stock = []
        for it in items:
            for b in rng.sample(bins, rng.randint(1, 3)):
                stock.append({"item": it, "bin": b["bin"], "qty": rng.randint(1, 40)})
        orders = []
        for i in range(8):
            for it in rng.sample(items, rng.randint(2, 5)):
                orders.append({"order_id": f"ORD-{1000 + i * 7 + rng.randint(0, 6)}", "item": it,
                               "qty": rng.randint(1, 60)})
        return {"bins": bins, "stock": stock, "orders": orders}

    def pick(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        held: dict[str, list[dict]] = {}
        for s in data["stock"]:
            held.setdefault(s["item"], []).append(s)
        aisle = {b["bin"]: b["aisle"] for b in data["bins"]}
        params = {"order_id": None, "item": None, "op": "stock"}
        if level == 1:
            item = rng.choice(sorted(held))
            params["item"] = item
            prompt = f"How many units of '{item}' are in the warehouse across all bins? Answer with a number."
            return exact_task(prompt, code(params, PICK_SOLUTION), sum(b["qty"] for b in held[item]), "number",
                              level, "warehouse.stock")
        oid = rng.choice(sorted({o["order_id"] for o in data["orders"]}))
        lines = [o for o in data["orders"] if o["order_id"] == oid]
        params["order_id"] = oid
        if level == 2:
            aisles = sorted({aisle[max(held[x["item"]], key=lambda b: (b["qty"], b["bin"]))["bin"]] for x in lines})
            params["op"] = "aisles"
            prompt = (f"To pick order {oid}, each item is taken from the bin holding the most of it (ties: the "
                      "alphabetically last bin id). Which aisles must the picker visit? Answer with a JSON list.")
            return exact_task(prompt, code(params, PICK_SOLUTION), aisles, "set", level, "warehouse.aisles")
        short = sum(max(0, x["qty"] - sum(b["qty"] for b in held[x["item"]])) for x in lines)
        if short == 0:
            return None
        params["op"] = "short"
        prompt = (f"Order {oid} is filled from all bins. How many units in total cannot be delivered because the "
                  "warehouse holds too few (summed over the order's lines)? Answer with a number.")
        return exact_task(prompt, code(params, PICK_SOLUTION), short, "number", level, "warehouse.shortfall")


# ------------------------------------------------------------------------------------------------ parcels

ROUTE_SOLUTION = """
import heapq

parcel = get_parcel(parcel_id)
src, dst, kg = parcel["origin"], parcel["destination"], parcel["weight_kg"]
dist, prev, heap = {src: 0.0}, {}, [(0.0, src)]
while heap:
    d, node = heapq.heappop(heap)
    if d > dist.get(node, float("inf")):
        continue
    for link in get_links(node):
        if use_weight and link["max_kg"] < kg:
            continue
        nd = d + link["km"]
        if nd < dist.get(link["to"], float("inf")):
            dist[link["to"]], prev[link["to"]] = nd, node
            heapq.heappush(heap, (nd, link["to"]))
if want_path:
    path = [dst]
    while path[-1] != src:
        path.append(prev[path[-1]])
    answer = path[::-1]
else:
    answer = round(dist[dst], 2)
"""


def _dijkstra(links: list[dict], src: str, kg: float | None) -> tuple[dict[str, float], dict[str, list[list[str]]]]:
    """Shortest distances from `src` and, per node, ALL shortest paths (to reject tasks with tied paths)."""
    dist: dict[str, float] = {src: 0.0}
    paths: dict[str, list[list[str]]] = {src: [[src]]}
    heap = [(0.0, src)]
    done: set[str] = set()
    while heap:
        d, node = heapq.heappop(heap)
        if node in done:
            continue
        done.add(node)
        for ln in links:
            if ln["from_depot"] != node or (kg is not None and ln["max_kg"] < kg):
                continue
            nd = round(d + ln["km"], 6)
            to = ln["to_depot"]
            if to not in dist or nd < dist[to] - 1e-9:
                dist[to], paths[to] = nd, [p + [to] for p in paths[node]]
                heapq.heappush(heap, (nd, to))
            elif abs(nd - dist[to]) <= 1e-9:
                paths[to] += [p + [to] for p in paths[node]]
    return dist, paths


class Parcels(Category):
    name = "parcels"
    description = "parcel routing: depots linked by roads with distances and weight limits"
    templates = ("route",)
    tools = '''

    def list_depots() -> list[str]:
        """All depots."""
        return _col("SELECT DISTINCT from_depot FROM links ORDER BY 1")


    def get_parcel(parcel_id: str) -> dict:
        """A parcel: origin and destination depot, weight in kg.

        Args:
            parcel_id: parcel id
        """
        return _get("parcels", "id", parcel_id)


    def get_links(depot: str) -> list[dict]:
        """Roads leaving a depot: the depot they lead to, length in km, heaviest parcel allowed (kg).

        Args:
            depot: depot name
        """
        return _rows("SELECT to_depot AS 'to', km, max_kg FROM links WHERE from_depot = ? COLLATE NOCASE "
                     "ORDER BY to_depot", (depot,))
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        depots = [f"{c} Depot" for c in rng.sample(CITIES, 9)]
        links = []
        for i, a in enumerate(depots):
            for b in depots[i + 1:]:
                if rng.random() < 0.35 or depots.index(b) == i + 1:     # a chain keeps the graph connected
                    km, kg = round(rng.uniform(10, 200), 1), float(rng.choice([5, 10, 20, 50, 100]))
                    links += [{"from_depot": a, "to_depot": b, "km": km, "max_kg": kg},
                              {"from_depot": b, "to_depot": a, "km": km, "max_kg": kg}]
        parcels = [{"id": f"P{rng.randint(10000, 99999)}{i}", "origin": a, "destination": b,
                    "weight_kg": round(rng.uniform(0.5, 60), 1)}
                   for i, (a, b) in enumerate(rng.sample(depots, 2) for _ in range(12))]
        return {"links": links, "parcels": parcels}

    def route(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        p = rng.choice(data["parcels"])
        use_weight = level >= 2
        dist, paths = _dijkstra(data["links"], p["origin"], p["weight_kg"] if use_weight else None)
        dst = p["destination"]
        if dst not in dist or len(paths[dst]) != 1 or len(paths[dst][0]) < 3:
            return None
        rule = f" using only roads whose weight limit allows the parcel's {p['weight_kg']:g} kg" if use_weight else ""
        params = {"parcel_id": p["id"], "use_weight": use_weight, "want_path": level == 3}
        if level < 3:
            prompt = (f"What is the length in km of the shortest road route for parcel {p['id']}{rule}? Answer with a "
                      "number.")
            return exact_task(prompt, code(params, ROUTE_SOLUTION), round(dist[dst], 2), "number", level,
                              "parcels.distance")
        prompt = (f"Give the shortest road route for parcel {p['id']}{rule}, as a JSON list of depots from its "
                  "origin to its destination.")
        return exact_task(prompt, code(params, ROUTE_SOLUTION), paths[dst][0], "list", level, "parcels.path")


# ------------------------------------------------------------------------------------------------ file system

FS_SOLUTION = """
def walk(path):
    for entry in list_dir(path):
        full = path.rstrip("/") + "/" + entry["name"]
        if entry["type"] == "dir":
            yield from walk(full)
        else:
            yield full

if op == "direct":
    answer = sum(stat(root.rstrip("/") + "/" + e["name"])["size"] for e in list_dir(root) if e["type"] == "file")
elif op == "ext":
    answer = sum(stat(f)["size"] for f in walk(root) if f.endswith(ext))
else:
    files = [(stat(f), f) for f in walk(root)]
    files = [(s["size"], f) for s, f in files if s["owner"] == owner and s["modified"] >= since]
    answer = max(files)[1]
"""


class FileSystem(Category):
    name = "filesystem"
    description = "file-system puzzles: a directory tree with sizes, owners and modification dates"
    templates = ("files",)
    tools = '''

    def list_dir(path: str) -> list[dict]:
        """Entries of a directory: name and type ("file" or "dir").

        Args:
            path: absolute directory path, e.g. /home
        """
        p = path.rstrip("/") or "/"
        if p != "/" and not _rows("SELECT 1 FROM nodes WHERE path = ? AND type = 'dir'", (p,)):
            raise ValueError(f"not a directory: {path!r}")
        return _rows("SELECT name, type FROM nodes WHERE parent = ? ORDER BY name", (p,))


    def stat(path: str) -> dict:
        """Metadata of a file or directory: type, size in bytes (files), owner, modified (YYYY-MM-DD).

        Args:
            path: absolute path
        """
        return _get("nodes", "path", path.rstrip("/") or "/")
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        owners = ["alice", "bob", "carol", "dave"]
        nodes: list[dict] = []

        def add_dir(path: str, depth: int) -> None:
            for i in range(rng.randint(2, 5)):
                ext = rng.choice([".log", ".txt", ".csv", ".py", ".log"])
                name = f"{rng.choice(NOUN).lower()}_{i}{ext}"
                nodes.append({"path": f"{path}/{name}", "parent": path, "name": name, "type": "file",
                              "size": rng.randint(100, 900_000), "owner": rng.choice(owners),
                              "modified": date(rng.randint(1, 30), rng.randint(1, 12), 2024)})
            if depth < 3:
                for sub in rng.sample(["data", "logs", "src", "tmp", "docs", "backup"], rng.randint(1, 3)):
                    p = f"{path}/{sub}"
                    nodes.append({"path": p, "parent": path, "name": sub, "type": "dir", "size": 0,
                                  "owner": rng.choice(owners), "modified": date(1, 1, 2024)})
                    add_dir(p, depth + 1)

        for top in ["home", "srv", "var"]:
            nodes.append({"path": f"/{top}", "parent": "/", "name": top, "type": "dir", "size": 0, "owner": "root",
                          "modified": date(1, 1, 2024)})
            add_dir(f"/{top}", 1)
        return {"nodes": nodes}

    def files(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        dirs = [n["path"] for n in data["nodes"] if n["type"] == "dir"]
        files = [n for n in data["nodes"] if n["type"] == "file"]
        root = rng.choice(dirs)
        under = [f for f in files if f["path"].startswith(root + "/")]
        params = {"root": root, "ext": None, "owner": None, "since": None, "op": "direct"}
        if level == 1:
            total = sum(f["size"] for f in files if f["parent"] == root)
            prompt = (f"What is the total size in bytes of the files directly inside {root} (not in its "
                      "sub-directories)? Answer with a number.")
            return exact_task(prompt, code(params, FS_SOLUTION), total, "number", level, "filesystem.direct")
        if level == 2:
            ext = rng.choice([".log", ".txt", ".csv", ".py"])
            total = sum(f["size"] for f in under if f["path"].endswith(ext))
            if total == 0:
                return None
            params.update(op="ext", ext=ext)
            prompt = (f"What is the total size in bytes of all {ext} files anywhere under {root}, sub-directories "
                      "included? Answer with a number.")
            return exact_task(prompt, code(params, FS_SOLUTION), total, "number", level, "filesystem.ext")
        owner = rng.choice(["alice", "bob", "carol", "dave"])
        since = date(1, rng.randint(2, 9), 2024)
        cand = sorted((f["size"], f["path"]) for f in under if f["owner"] == owner and f["modified"] >= since)
        if len(cand) < 2 or cand[-1][0] == cand[-2][0]:
            return None
        params.update(op="largest", owner=owner, since=since)
        prompt = (f"Which is the largest file under {root} (sub-directories included) owned by {owner} and modified "
                  f"on or after {since}? Answer with its absolute path.")
        return exact_task(prompt, code(params, FS_SOLUTION), cand[-1][1], "text", level, "filesystem.largest")


# ------------------------------------------------------------------------------------------------ courses

COURSE_SOLUTION = """
def closure(c):
    seen, todo = set(), list(get_prerequisites(c))
    while todo:
        x = todo.pop()
        if x not in seen:
            seen.add(x)
            todo += get_prerequisites(x)
    return seen

if op == "direct":
    answer = sorted(get_prerequisites(course))
elif op == "all":
    answer = sorted(closure(course))
else:
    done = set(get_completed_courses(student))
    need = (closure(course) | {course}) - done
    answer = sum(get_course(c)["credits"] for c in need)
"""


class Courses(Category):
    name = "courses"
    description = "course catalogue with prerequisites and students' completed courses"
    templates = ("prereqs",)
    tools = '''

    def list_courses() -> list[str]:
        """All course codes."""
        return _col("SELECT code FROM courses ORDER BY code")


    def get_course(code: str) -> dict:
        """A course: code, title, credits.

        Args:
            code: course code, e.g. CS210
        """
        return _get("courses", "code", code)


    def get_prerequisites(code: str) -> list[str]:
        """Courses that must be passed directly before this one (their own prerequisites not included).

        Args:
            code: course code
        """
        return _col("SELECT requires FROM prereqs WHERE course = ? COLLATE NOCASE ORDER BY requires", (code,))


    def get_completed_courses(student: str) -> list[str]:
        """Course codes a student has passed.

        Args:
            student: student name
        """
        return _col("SELECT code FROM completed WHERE student = ? COLLATE NOCASE ORDER BY code", (student,))
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        dept = rng.choice(["CS", "MA", "PH", "EC"])
        codes = sorted(unique(rng, 20, lambda r: f"{dept}{r.randint(100, 499)}"))     # lower numbers come first
        courses = [{"code": c, "title": f"{rng.choice(ADJ)} {rng.choice(NOUN)} Studies", "credits": rng.choice(
            [3, 4, 5, 6])} for c in codes]
        prereqs = [{"course": c, "requires": r} for i, c in enumerate(codes) if i >= 2
                   for r in rng.sample(codes[max(0, i - 8):i], rng.randint(0, 2))]
        students = unique(rng, 6, person)
        completed = [{"student": s, "code": c} for s in students for c in codes[:rng.randint(0, 10)]]
        return {"courses": courses, "prereqs": prereqs, "completed": completed}

    def prereqs(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        direct: dict[str, list[str]] = {}
        for p in data["prereqs"]:
            direct.setdefault(p["course"], []).append(p["requires"])

        def closure(c: str) -> set[str]:
            seen, todo = set(), list(direct.get(c, []))
            while todo:
                x = todo.pop()
                if x not in seen:
                    seen.add(x)
                    todo += direct.get(x, [])
            return seen

        course = rng.choice(sorted(direct))
        params = {"course": course, "student": None, "op": "direct"}
        if level == 1:
            prompt = f"Which courses are direct prerequisites of {course}? Answer with a JSON list of course codes."
            return exact_task(prompt, code(params, COURSE_SOLUTION), sorted(direct[course]), "set", level,
                              "courses.direct")
        if level == 2:
            if closure(course) == set(direct[course]):
                return None
            params["op"] = "all"
            prompt = (f"Which courses must be passed before {course} can be taken, counting prerequisites of "
                      "prerequisites too? Answer with a JSON list of course codes.")
            return exact_task(prompt, code(params, COURSE_SOLUTION), sorted(closure(course)), "set", level,
                              "courses.closure")
        student = rng.choice(sorted({c["student"] for c in data["completed"]}))
        done = {c["code"] for c in data["completed"] if c["student"] == student}
        credits = {c["code"]: c["credits"] for c in data["courses"]}
        need = (closure(course) | {course}) - done
        if not need or course in done:
            return None
        params.update(op="credits", student=student)
        prompt = (f"{student} wants to take {course}. How many credits must they still earn to get there: the credits "
                  f"of {course} plus every prerequisite (direct or indirect) they have not passed yet? Answer with a "
                  "number.")
        return exact_task(prompt, code(params, COURSE_SOLUTION), sum(credits[c] for c in need), "number", level,
                          "courses.credits")


# ------------------------------------------------------------------------------------------------ sports

TABLE_SOLUTION = """
def record(team):
    pts = gf = ga = 0
    for m in get_matches(team):
        if m["round"] > upto:
            continue
        mine, theirs = (m["home_goals"], m["away_goals"]) if m["home"] == team else (m["away_goals"], m["home_goals"])
        gf, ga = gf + mine, ga + theirs
        pts += 3 if mine > theirs else 1 if mine == theirs else 0
    return pts, gf - ga, gf

if op == "beaten":
    won = [m for m in get_matches(team) if m["round"] <= upto and m["home_goals"] != m["away_goals"]
           and (m["home_goals"] > m["away_goals"]) == (m["home"] == team)]
    answer = sorted(m["away"] if m["home"] == team else m["home"] for m in won)
else:
    ranked = sorted(list_teams(), key=lambda t: (*(-x for x in record(t)), t))
    answer = ranked[:3] if op == "top3" else ranked
"""


class Sports(Category):
    name = "sports"
    description = "a football league: teams and match results by round"
    templates = ("table",)
    tools = '''

    def list_teams() -> list[str]:
        """All teams of the league."""
        return _col("SELECT DISTINCT home FROM matches ORDER BY 1")


    def get_matches(team: str) -> list[dict]:
        """All matches of a team: round, home, away, home_goals, away_goals.

        Args:
            team: team name
        """
        return _rows("SELECT * FROM matches WHERE home = ? COLLATE NOCASE OR away = ? COLLATE NOCASE "
                     "ORDER BY round", (team, team))


    def get_round(round: int) -> list[dict]:
        """All matches of one round.

        Args:
            round: round number (1 is the first)
        """
        return _rows("SELECT * FROM matches WHERE round = ? ORDER BY home", (round,))
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        teams = [f"{c} {rng.choice(['United', 'Rovers', 'City', 'Athletic', 'Wanderers'])}"
                 for c in rng.sample(CITIES, 8)]
        matches = []
        rot = teams[1:]
        for rnd in range(1, 8):                                   # round robin (circle method)
            order = [teams[0], *rot]
            for i in range(4):
                h, a = (order[i], order[7 - i]) if rnd % 2 else (order[7 - i], order[i])
                matches.append({"round": rnd, "home": h, "away": a, "home_goals": rng.choice([0, 0, 1, 1, 2, 2, 3, 4]),
                                "away_goals": rng.choice([0, 0, 1, 1, 2, 3])})
            rot = rot[-1:] + rot[:-1]
        return {"matches": matches}

    def table(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        upto = rng.randint(3, 7)

        def record(team: str) -> tuple[int, int, int]:
            pts = gf = ga = 0
            for m in data["matches"]:
                if m["round"] > upto or team not in (m["home"], m["away"]):
                    continue
                mine, theirs = ((m["home_goals"], m["away_goals"]) if m["home"] == team
                                else (m["away_goals"], m["home_goals"]))
                gf, ga = gf + mine, ga + theirs
                pts += 3 if mine > theirs else 1 if mine == theirs else 0
            return pts, gf - ga, gf

        teams = sorted({m["home"] for m in data["matches"]})
        team = rng.choice(teams)
        params = {"team": team, "upto": upto, "op": "beaten"}
        after = f"after round {upto}"
        order = "Rank by points (3 per win, 1 per draw), then goal difference, then goals scored, then name (A-Z)."
        if level == 1:
            beaten = sorted(m["away"] if m["home"] == team else m["home"] for m in data["matches"]
                            if m["round"] <= upto and team in (m["home"], m["away"]) and m["home_goals"] != m[
                                "away_goals"] and (m["home_goals"] > m["away_goals"]) == (m["home"] == team))
            if not beaten:
                return None
            prompt = f"Which teams did {team} beat in rounds 1 to {upto}? Answer with a JSON list (any order)."
            return exact_task(prompt, code(params, TABLE_SOLUTION), beaten, "set", level, "sports.beaten")
        ranked = sorted(teams, key=lambda t: (*(-x for x in record(t)), t))
        params["op"] = "top3" if level == 2 else "table"
        if level == 2:
            prompt = f"Which three teams were at the top of the league table {after}? {order} Answer with a JSON list, "
            prompt += "first place first."
            return exact_task(prompt, code(params, TABLE_SOLUTION), ranked[:3], "list", level, "sports.top3")
        prompt = f"Give the full league table {after} as a JSON list of all team names, first place first. {order}"
        return exact_task(prompt, code(params, TABLE_SOLUTION), ranked, "list", level, "sports.table")
