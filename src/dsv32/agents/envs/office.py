"""Office categories: calendars (meeting scheduling), employee rosters, bank transactions, household budgets,
grade books."""

from __future__ import annotations

import random

from dsv32.agents.envs.base import Category, Entity, Task, code, exact_task
from dsv32.agents.envs.names import LAST, adj_noun, date, hhmm, person, price, unique

# ------------------------------------------------------------------------------------------------ calendar

SLOT_SOLUTION = """
def minutes(t):
    h, m = t.split(":")
    return int(h) * 60 + int(m)

who = people if team is None else list_team_members(team)
busy = [(minutes(e["start"]), minutes(e["end"])) for p in who for e in get_events(p, day)]
if no_lunch:
    busy.append((12 * 60, 13 * 60))
answer = None
for s in range(9 * 60, 17 * 60 - duration + 1, 15):
    if all(s + duration <= a or s >= b for a, b in busy):
        answer = f"{s // 60:02d}:{s % 60:02d}"
        break
"""


class Calendar(Category):
    name = "calendar"
    description = "meeting scheduling: people, teams and their calendars"
    templates = ("slot",)
    tools = '''

    def list_people() -> list[str]:
        """Everyone with a calendar."""
        return _col("SELECT name FROM people ORDER BY name")


    def list_team_members(team: str) -> list[str]:
        """Members of a team.

        Args:
            team: team name
        """
        return _col("SELECT name FROM people WHERE team = ? COLLATE NOCASE ORDER BY name", (team,))


    def get_events(person: str, date: str) -> list[dict]:
        """A person's events on a date (YYYY-MM-DD): title, start and end (HH:MM, end exclusive).

        Args:
            person: the person's name
            date: the day, YYYY-MM-DD
        """
        return _rows("SELECT title, start, end FROM events WHERE person = ? COLLATE NOCASE AND date = ? "
                     "ORDER BY start", (person, date))
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        names = unique(rng, 10, person)
        teams = unique(rng, 3, adj_noun("Team"))
        people = [{"name": n, "team": teams[i % 3]} for i, n in enumerate(names)]
        events = []
        for p in names:
            for d in range(6, 11):
                t = 9 * 60 + rng.choice([0, 0, 15, 30, 60])
                while t < 17 * 60:
                    length = rng.choice([30, 45, 60, 90])
                    if rng.random() < 0.6 and t + length <= 18 * 60:
                        events.append({"person": p, "date": date(d), "start": hhmm(t), "end": hhmm(t + length),
                                       "title": rng.choice(["1:1", "standup", "review", "planning", "focus",
                                                            "client call", "interview"])})
                    t += length + rng.choice([0, 15, 30, 45])
        return {"people": people, "events": events}

    def slot(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        day = date(rng.randint(6, 10))
        team = None
        if level == 3 and rng.random() < 0.5:
            team = rng.choice(sorted({p["team"] for p in data["people"]}))
            who = sorted(p["name"] for p in data["people"] if p["team"] == team)
        else:
            who = sorted(rng.sample([p["name"] for p in data["people"]], level))
        duration = {1: 30, 2: 60, 3: rng.choice([45, 60, 90])}[level]
        no_lunch = level == 3
        busy = [(int(e["start"][:2]) * 60 + int(e["start"][3:]), int(e["end"][:2]) * 60 + int(e["end"][3:]))
                for e in data["events"] if e["person"] in who and e["date"] == day]
        if no_lunch:
            busy.append((720, 780))
        start = next((s for s in range(540, 1020 - duration + 1, 15)
                      if all(s + duration <= a or s >= b for a, b in busy)), None)
        if start is None or start == 540:
            return None
        names = f"everyone in team {team}" if team else " and ".join(who)
        prompt = (f"Find the earliest start time on {day} for a {duration}-minute meeting with {names}, between "
                  "09:00 and 17:00, starting on a quarter hour, overlapping none of their events"
                  + (" and not touching the 12:00-13:00 lunch break" if no_lunch else "")
                  + ". Answer with the start time as HH:MM.")
        params = {"people": who, "team": team, "day": day, "duration": duration, "no_lunch": no_lunch}
        return exact_task(prompt, code(params, SLOT_SOLUTION), hhmm(start), "text", level, "calendar.slot")


# ------------------------------------------------------------------------------------------------ roster

EMPLOYEES = Entity("employees", "employee", "employees", "dept",
                   {"salary": "annual salary (EUR)", "hired": "hiring year", "age": "age"}, {"role": "role"},
                   additive=("salary",))

HOURS_SOLUTION = """
names = [employee] if employee is not None else list_employees_by_dept(dept)
hours = {n: sum(s["hours"] for s in get_shifts(n) if start <= s["date"] <= end) for n in names}
if op == "sum":
    answer = round(sum(hours.values()), 2)
else:
    answer = sorted(n for n, h in hours.items() if h > limit)
"""


class Roster(Category):
    name = "roster"
    description = "employee rosters: departments, roles, salaries and worked shifts"
    entities = (EMPLOYEES,)
    templates = ("hours",)
    tools = '''

    def list_departments() -> list[str]:
        """All departments."""
        return _col("SELECT DISTINCT dept FROM employees ORDER BY 1")


    def get_shifts(employee: str) -> list[dict]:
        """Shifts an employee worked: date (YYYY-MM-DD) and hours.

        Args:
            employee: the employee's name
        """
        return _rows("SELECT date, hours FROM shifts WHERE employee = ? COLLATE NOCASE ORDER BY date", (employee,))
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        names = unique(rng, 24, person)
        depts = ["Sales", "Support", "Engineering", "Finance"]
        emps = [{"name": n, "dept": depts[i % 4], "role": rng.choice(["junior", "senior", "lead"]),
                 "salary": float(rng.randrange(32000, 120000, 500)), "hired": rng.randint(2005, 2024),
                 "age": rng.randint(21, 64)} for i, n in enumerate(names)]
        shifts = [{"employee": n, "date": date(d), "hours": rng.choice([4.0, 6.0, 7.5, 8.0, 8.0, 9.5, 10.0])}
                  for n in names for d in range(1, 15) if rng.random() < 0.7]
        return {"employees": emps, "shifts": shifts}

    def hours(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        start_d = rng.randint(1, 7)
        start, end = date(start_d), date(start_d + 6)
        dept = rng.choice(sorted({e["dept"] for e in data["employees"]}))
        members = [e["name"] for e in data["employees"] if e["dept"] == dept]
        worked = {n: sum(s["hours"] for s in data["shifts"] if s["employee"] == n and start <= s["date"] <= end)
                  for n in members}
        params = {"employee": None, "dept": dept, "start": start, "end": end, "op": "sum", "limit": None}
        span = f"from {start} to {end} (inclusive)"
        if level == 1:
            params["employee"] = rng.choice(members)
            total = worked[params["employee"]]
            prompt = f"How many hours did {params['employee']} work {span}? Answer with a number."
        elif level == 2:
            total = sum(worked.values())
            prompt = f"How many hours did the {dept} department work in total {span}? Answer with a number."
        else:
            limit = rng.choice([30, 35, 40])
            over = sorted(n for n, h in worked.items() if h > limit)
            if not over or len(over) == len(members):
                return None
            params.update(op="set", limit=limit)
            prompt = (f"Which employees of the {dept} department worked more than {limit} hours {span}? Answer "
                      "with a JSON list of names (any order).")
            return exact_task(prompt, code(params, HOURS_SOLUTION), over, "set", level, "roster.overtime")
        if total == 0:
            return None
        return exact_task(prompt, code(params, HOURS_SOLUTION), round(total, 2), "number", level, "roster.hours")


# ------------------------------------------------------------------------------------------------ bank

BALANCE_SOLUTION = """
acct = get_account(account)
txs = get_transactions(account, "0000-00-00", end)
if op == "balance":
    answer = round(acct["opening_balance"] + sum(t["amount"] for t in txs), 2)
elif op == "spent":
    answer = round(-sum(t["amount"] for t in txs if t["amount"] < 0 and t["category"] == category
                        and t["date"] >= start), 2)
else:
    balance, low = acct["opening_balance"], None
    by_day = {}
    for t in txs:
        by_day[t["date"]] = by_day.get(t["date"], 0) + t["amount"]
    for d in sorted(by_day):
        balance += by_day[d]
        if low is None or balance < low[0]:
            low = (balance, d)
    answer = low[1]
"""


class Bank(Category):
    name = "bank"
    description = "bank accounts and their transactions: balances, spending by category, lowest balance"
    templates = ("balance",)
    tools = '''

    def list_accounts() -> list[dict]:
        """All accounts: id and owner."""
        return _rows("SELECT id, owner FROM accounts ORDER BY id")


    def get_account(account: str) -> dict:
        """One account: id, owner, currency and its balance on 1 October 2025 before any transaction.

        Args:
            account: account id
        """
        return _get("accounts", "id", account)


    def get_transactions(account: str, start_date: str, end_date: str) -> list[dict]:
        """Transactions of an account between two dates (YYYY-MM-DD, inclusive), oldest first; a negative
        amount is money going out.

        Args:
            account: account id
            start_date: first day, YYYY-MM-DD
            end_date: last day, YYYY-MM-DD
        """
        return _rows("SELECT * FROM transactions WHERE account = ? COLLATE NOCASE AND date BETWEEN ? AND ? "
                     "ORDER BY date, id", (account, start_date, end_date))
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        owners = unique(rng, 5, person)
        accounts = [{"id": f"AC{rng.randint(10000, 99999)}{i}", "owner": o, "currency": "EUR",
                     "opening_balance": price(rng, 200, 5000, 0.01)} for i, o in enumerate(owners)]
        payees = {"groceries": ["FreshMart", "Corner Grocer"], "rent": ["Landlord Ltd"], "travel": ["CityRail",
                  "SkyTaxi"], "dining": ["Blue Lotus", "Pizza Hill"], "utilities": ["PowerCo", "WaterWorks"]}
        txs = []
        for a in accounts:
            for _ in range(rng.randint(20, 30)):
                if rng.random() < 0.2:
                    amount, cat, who = price(rng, 100, 2500, 0.01), "income", rng.choice(["Employer", "Refund"])
                else:
                    cat = rng.choice(sorted(payees))
                    amount, who = -price(rng, 5, 600, 0.01), rng.choice(payees[cat])
                txs.append({"id": f"T{len(txs) + 1000}", "account": a["id"], "date": date(rng.randint(1, 31)),
                            "amount": amount, "category": cat, "counterparty": who})
        return {"accounts": accounts, "transactions": txs}

    def balance(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        a = rng.choice(data["accounts"])
        end = date(rng.randint(10, 31))
        start = date(rng.randint(1, 9))
        txs = sorted((t for t in data["transactions"] if t["account"] == a["id"] and t["date"] <= end),
                     key=lambda t: (t["date"], t["id"]))
        params = {"account": a["id"], "end": end, "start": start, "category": None, "op": "balance"}
        if level == 1:
            prompt = f"What is the balance of account {a['id']} at the end of {end}? Answer with a number in EUR."
            return exact_task(prompt, code(params, BALANCE_SOLUTION),
                              round(a["opening_balance"] + sum(t["amount"] for t in txs), 2), "number", level,
                              "bank.balance")
        if level == 2:
            cat = rng.choice(sorted({t["category"] for t in txs if t["amount"] < 0} or {"none"}))
            spent = -sum(t["amount"] for t in txs if t["amount"] < 0 and t["category"] == cat and t["date"] >= start)
            if spent == 0:
                return None
            params.update(op="spent", category=cat)
            prompt = (f"How much did account {a['id']} spend on {cat} from {start} to {end} (inclusive)? Answer "
                      "with a positive number in EUR.")
            return exact_task(prompt, code(params, BALANCE_SOLUTION), round(spent, 2), "number", level, "bank.spent")
        balance, lows = a["opening_balance"], []
        by_day: dict[str, float] = {}
        for t in txs:
            by_day[t["date"]] = by_day.get(t["date"], 0) + t["amount"]
        for d in sorted(by_day):
            balance += by_day[d]
            lows.append((balance, d))
        lows.sort()
        if len(lows) < 2 or abs(lows[0][0] - lows[1][0]) < 0.005:
            return None
        params["op"] = "lowest"
        prompt = (f"On which day up to {end} was the end-of-day balance of account {a['id']} lowest (counting only "
                  "days with transactions)? Answer with the date as YYYY-MM-DD.")
        return exact_task(prompt, code(params, BALANCE_SOLUTION), lows[0][1], "text", level, "bank.lowest")


# ------------------------------------------------------------------------------------------------ budget

BUDGET_SOLUTION = """
def spent(cat, month):
    return round(sum(e["amount"] for e in get_expenses(cat, month)), 2)

if op == "spent":
    answer = spent(category, months[0])
elif op == "over":
    answer = sorted(c for c in list_categories() if spent(c, months[0]) > get_budget(c, months[0]))
else:
    over = {c: sum(spent(c, m) - get_budget(c, m) for m in months) for c in list_categories()}
    answer = max(over, key=over.get)
"""


class Budget(Category):
    name = "budget"
    description = "household budgets: monthly limits per category and the expenses against them"
    templates = ("budget",)
    tools = '''

    def list_categories() -> list[str]:
        """All budget categories."""
        return _col("SELECT DISTINCT category FROM limits ORDER BY 1")


    def get_budget(category: str, month: str) -> float:
        """The spending limit of a category in a month (YYYY-MM), EUR.

        Args:
            category: budget category
            month: month as YYYY-MM
        """
        rows = _col("SELECT amount FROM limits WHERE category = ? COLLATE NOCASE AND month = ?", (category, month))
        if not rows:
            raise ValueError(f"no budget for {category!r} in {month!r}")
        return rows[0]


    def get_expenses(category: str, month: str) -> list[dict]:
        """Expenses of a category in a month (YYYY-MM): date, payee, amount in EUR.

        Args:
            category: budget category
            month: month as YYYY-MM
        """
        return _rows("SELECT date, payee, amount FROM expenses WHERE category = ? COLLATE NOCASE "
                     "AND substr(date, 1, 7) = ? ORDER BY date", (category, month))
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        cats = rng.sample(["groceries", "transport", "dining", "clothing", "utilities", "hobbies", "health",
                           "gifts", "books", "garden", "pets", "sports"], 9)
        months = [f"2025-{m:02d}" for m in range(1, 7)]
        limits = [{"category": c, "month": m, "amount": float(rng.randrange(100, 800, 25))} for c in cats
                  for m in months]
        shops = unique(rng, 12, adj_noun("Store"))
        expenses = [{"date": f"{m}-{rng.randint(1, 28):02d}", "category": c, "payee": rng.choice(shops),
                     "amount": price(rng, 5, 180, 0.01)} for c in cats for m in months
                    for _ in range(rng.randint(2, 7))]
        return {"limits": limits, "expenses": expenses}

    def budget(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        months = sorted({lim["month"] for lim in data["limits"]})
        cats = sorted({lim["category"] for lim in data["limits"]})
        limit = {(x["category"], x["month"]): x["amount"] for x in data["limits"]}

        def spent(c: str, m: str) -> float:
            return round(sum(e["amount"] for e in data["expenses"] if e["category"] == c and e["date"][:7] == m), 2)

        m0 = rng.randrange(len(months) - 2)
        params = {"category": None, "months": [months[m0]], "op": "spent"}
        if level == 1:
            c = rng.choice(cats)
            params["category"] = c
            prompt = f"How much was spent on {c} in {months[m0]}? Answer with a number in EUR."
            return exact_task(prompt, code(params, BUDGET_SOLUTION), spent(c, months[m0]), "number", level,
                              "budget.spent")
        if level == 2:
            over = sorted(c for c in cats if spent(c, months[m0]) > limit[(c, months[m0])])
            if not over or len(over) == len(cats):
                return None
            params["op"] = "over"
            prompt = (f"Which budget categories went over their limit in {months[m0]}? Answer with a JSON list "
                      "(any order).")
            return exact_task(prompt, code(params, BUDGET_SOLUTION), over, "set", level, "budget.over")
        span = months[m0:m0 + 3]
        over = sorted(((sum(spent(c, m) - limit[(c, m)] for m in span), c) for c in cats), reverse=True)
        if abs(over[0][0] - over[1][0]) < 0.01:
            return None
        params.update(op="worst", months=span)
        prompt = (f"Over the months {', '.join(span)} together, which category has the largest total of (spent "
                  "minus limit)? Answer with the category name.")
        return exact_task(prompt, code(params, BUDGET_SOLUTION), over[0][1], "text", level, "budget.worst")


# ------------------------------------------------------------------------------------------------ grade book

GRADE_SOLUTION = """
weights = {a["title"]: a["weight"] for a in list_assignments(course)}

def grade(student):
    got = {s["assignment"]: s["score"] for s in get_scores(student, course)}
    return sum(w * got.get(t, 0.0) for t, w in weights.items()) / sum(weights.values())

if op == "grade":
    answer = round(grade(student), 2)
elif op == "failing":
    answer = sorted(s for s in list_students(course) if grade(s) < threshold)
else:
    answer = max(list_students(course), key=grade)
"""


class Gradebook(Category):
    name = "gradebook"
    description = "grade books: courses, weighted assignments, students' scores (missing work counts as 0)"
    templates = ("grades",)
    tools = '''

    def list_courses() -> list[str]:
        """All courses."""
        return _col("SELECT DISTINCT course FROM assignments ORDER BY 1")


    def list_students(course: str) -> list[str]:
        """Students enrolled in a course.

        Args:
            course: course name
        """
        return _col("SELECT student FROM enrolments WHERE course = ? COLLATE NOCASE ORDER BY 1", (course,))


    def list_assignments(course: str) -> list[dict]:
        """A course's assignments with their weights in the final grade.

        Args:
            course: course name
        """
        return _rows("SELECT title, weight FROM assignments WHERE course = ? COLLATE NOCASE ORDER BY title",
                     (course,))


    def get_scores(student: str, course: str) -> list[dict]:
        """A student's recorded scores (0-100) in a course; missing assignments have no row.

        Args:
            student: student name
            course: course name
        """
        return _rows("SELECT assignment, score FROM scores WHERE student = ? COLLATE NOCASE AND course = ? "
                     "COLLATE NOCASE ORDER BY assignment", (student, course))
    '''

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        courses = rng.sample(["Algebra", "Biology", "Chemistry", "History", "Literature", "Physics"], 3)
        students = unique(rng, 14, lambda r: f"{r.choice('ABCDEFGHJKLMNPRST')}. {r.choice(LAST)}")
        assignments, enrol, scores = [], [], []
        for c in courses:
            titles = rng.sample(["Quiz 1", "Quiz 2", "Essay", "Lab", "Midterm", "Final", "Project"], 4)
            ws = [rng.randint(1, 5) for _ in titles]
            assignments += [{"course": c, "title": t, "weight": round(w / sum(ws), 3)} for t, w in zip(titles, ws)]
            for s in rng.sample(students, 9):
                enrol.append({"course": c, "student": s})
                scores += [{"student": s, "course": c, "assignment": t, "score": float(rng.randint(30, 100))}
                           for t in titles if rng.random() < 0.9]
        return {"assignments": assignments, "enrolments": enrol, "scores": scores}

    def grades(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        course = rng.choice(sorted({a["course"] for a in data["assignments"]}))
        weights = {a["title"]: a["weight"] for a in data["assignments"] if a["course"] == course}
        students = sorted(e["student"] for e in data["enrolments"] if e["course"] == course)

        def grade(s: str) -> float:
            got = {x["assignment"]: x["score"] for x in data["scores"] if x["student"] == s and x["course"] == course}
            return sum(w * got.get(t, 0.0) for t, w in weights.items()) / sum(weights.values())

        params = {"course": course, "student": None, "threshold": None, "op": "grade"}
        if level == 1:
            s = rng.choice(students)
            params["student"] = s
            prompt = (f"What is {s}'s final grade in {course}: the weighted average of the assignment scores with "
                      "the course's weights, a missing assignment counting as 0? Round to 2 decimals.")
            return exact_task(prompt, code(params, GRADE_SOLUTION), round(grade(s), 2), "number", level,
                              "gradebook.grade")
        if level == 2:
            thr = rng.choice([55, 60, 65, 70])
            fail = sorted(s for s in students if grade(s) < thr)
            if not fail or len(fail) == len(students):
                return None
            params.update(op="failing", threshold=thr)
            prompt = (f"Which students of {course} have a final grade (weighted average of assignment scores, "
                      f"missing work counting as 0) below {thr}? Answer with a JSON list (any order).")
            return exact_task(prompt, code(params, GRADE_SOLUTION), fail, "set", level, "gradebook.failing")
        ranked = sorted(students, key=grade, reverse=True)
        if abs(grade(ranked[0]) - grade(ranked[1])) < 1e-9:
            return None
        params["op"] = "top"
        prompt = (f"Who has the highest final grade in {course} (weighted average of assignment scores with the "
                  "course's weights, missing work counting as 0)? Answer with the student's name.")
        return exact_task(prompt, code(params, GRADE_SOLUTION), ranked[0], "text", level, "gradebook.top")
