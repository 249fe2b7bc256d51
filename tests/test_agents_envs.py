"""Synthesized environments (issue 13 item 3): every category generates tasks whose reference solution, run
through the tools in the sandbox, passes its verifier; verifiers reject empty and wrong answers and accept
reformatted right ones; tool schemas come from tools.py without running it; generation is deterministic.

Needs the sandbox (tools, solutions and verifiers are untrusted code): with CI=true a missing sandbox FAILS,
elsewhere the skip says why.
"""

import json
import os
import sqlite3
import warnings
from pathlib import Path

import pytest

from dsv32.agents.envs import CATEGORIES
from dsv32.agents.envs.base import generate, read_tasks, schemas_from_source
from dsv32.agents.envs.checks import as_number, check, norm
from dsv32.agents.envs.session import ToolCallError, ToolSession, filter_pass_k, pass_at_k, random_policy
from dsv32.agents.sandbox import sandbox_available
from dsv32.agents.synth import cli_main, run_jobs, synthesize, validate


def need_sandbox():
    ok, why = sandbox_available()
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and no working sandbox: {why}")
    warnings.warn(f"environment synthesis tests skipped: {why}", stacklevel=2)
    pytest.skip(f"no working sandbox: {why}")


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    """2 seeds of every category, generated and validated once for the module."""
    need_sandbox()
    out = tmp_path_factory.mktemp("envs")
    summary = synthesize(out, list(CATEGORIES), [0, 1], [1, 2, 3], per_level=2, random_tries=3, log=lambda *_: None)
    return out, summary


# ---------------------------------------------------------------------------------------------- pure host parts

def test_schemas_from_source_reads_signatures_and_docstrings():
    src = '''
def find(city: str, max_price: float, tags: list[str], limit: int = 5) -> list[dict]:
    """Find hotels.

    Args:
        city: city name
        limit: how many
    """
    return []


def _private(x: int) -> int:
    return x
'''
    (s,) = schemas_from_source(src)
    f = s["function"]
    assert f["name"] == "find" and f["description"] == "Find hotels."
    p = f["parameters"]
    assert p["required"] == ["city", "max_price", "tags"] and p["additionalProperties"] is False
    assert p["properties"]["city"] == {"type": "string", "description": "city name"}
    assert p["properties"]["max_price"] == {"type": "number"}
    assert p["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert p["properties"]["limit"]["type"] == "integer"
    with pytest.raises(ValueError, match="needs a type annotation"):
        schemas_from_source("def f(x):\n    return x\n")
    with pytest.raises(ValueError, match="plain named parameters"):
        schemas_from_source("def f(*a: int):\n    return a\n")


def test_checks_are_lenient_about_form_strict_about_content():
    assert norm("  The  Blue Lotus. ") == "the blue lotus"
    assert as_number("1,250.50 EUR") == 1250.5 and as_number("3 or 4") is None and as_number(True) is None
    assert check("12.5", 12.5, "number") and check(12.504, 12.5, "number") and not check(12.52, 12.5, "number")
    assert check(["b", "A"], ["a", "b"], "set") and not check(["a"], ["a", "b"], "set")
    assert check("a, b", ["a", "b"], "list") and not check(["b", "a"], ["a", "b"], "list")
    assert not check(None, "x", "text") and not check([], ["a"], "set") and not check({}, 1.0, "number")


def test_generation_is_deterministic_and_db_is_the_seed_data(tmp_path):
    cat = CATEGORIES["trip"]
    a = generate(cat, 3, tmp_path / "a")
    b = generate(cat, 3, tmp_path / "b")
    assert (a.path / "tasks.jsonl").read_text() == (b.path / "tasks.jsonl").read_text()
    dump = [list(sqlite3.connect(p / "db.sqlite").iterdump()) for p in (a.path, b.path)]
    assert dump[0] == dump[1]
    c = generate(cat, 4, tmp_path / "c")
    assert (c.path / "tasks.jsonl").read_text() != (a.path / "tasks.jsonl").read_text()
    meta = json.loads((a.path / "env.json").read_text())
    names = {t["function"]["name"] for t in meta["tools"]}
    assert {"get_all_cities", "get_inter_city_transport", "get_infos_by_hotel", "get_weather_by_city_date"} <= names
    assert meta["difficulty"] == [1, 3] and meta["submit_tool"]["function"]["name"] == "submit_result"


def test_at_least_20_categories_with_three_levels(tmp_path):
    assert len(CATEGORIES) >= 20
    for name, cat in CATEGORIES.items():
        env = generate(cat, 0, tmp_path)
        levels = sorted({t["difficulty"] for t in env.tasks})
        assert levels == [1, 2, 3], f"{name}: levels {levels}"
        assert len(env.tasks) >= 5, f"{name}: only {len(env.tasks)} tasks"


# ---------------------------------------------------------------------------------------------- in the sandbox

def test_every_category_validates(envs):
    _, s = envs
    assert s["categories"] == len(CATEGORIES)
    assert s["dropped"] == [] and s["tasks_kept"] == s["tasks_generated"] >= 200
    assert s["solution_pass_rate"] == 1.0
    assert s["empty_answer_pass_rate"] == 0.0
    assert s["random_policy_pass_rate"] < 0.05, s["random_policy_pass_rate"]
    assert s["random_policy_runs"] == 3 * s["tasks_kept"]


def _wrong(answer, verifier: str):
    """A plausible but wrong answer of the same shape."""
    if "'set'" in verifier:                                            # order does not matter: drop or add one
        return answer[:-1] if len(answer) > 1 else [*answer, "extra"]
    if isinstance(answer, str):
        return answer + " B"
    if isinstance(answer, (int, float)):
        return answer + 1
    if answer and isinstance(answer[0], dict):                        # a trip plan: day 1 moved to another city
        return [{**answer[0], "city": "Nowhere"}, *answer[1:]]
    return answer[::-1] if len(answer) > 1 and answer[0] != answer[-1] else [*answer, "extra"]


def _reformatted(answer):
    """The right answer in another form a verifier must accept."""
    if isinstance(answer, str):
        return f"  {answer.upper()} "
    if isinstance(answer, (int, float)):
        return f"{answer:,}"
    if answer and isinstance(answer[0], dict):
        return [{k.title(): v for k, v in day.items()} for day in answer]
    return answer


def test_verifiers_reject_wrong_and_accept_reformatted_answers(envs):
    out, _ = envs
    for name in CATEGORIES:
        path = out / f"{name}-0000"
        tasks = read_tasks(path)
        jobs = []
        for t in tasks:
            jobs.append({"op": "verify", "id": t["id"] + "/wrong", "verifier": t["verifier"],
                         "answer": _wrong(t["answer"], t["verifier"])})
            jobs.append({"op": "verify", "id": t["id"] + "/reformatted", "verifier": t["verifier"],
                         "answer": _reformatted(t["answer"])})
        for job, res in zip(jobs, run_jobs(path, jobs)):
            assert "fatal" not in res, res
            want = job["id"].endswith("/reformatted")
            assert res["ok"] is want, f"{job['id']}: {res} (answer {job['answer']!r})"


def test_trip_verifier_checks_constraints_not_one_answer(envs):
    """A different valid plan passes; the same cities with the priciest picks break the budget."""
    out, _ = envs
    path = out / "trip-0000"
    db = sqlite3.connect(path / "db.sqlite")
    tasks = [t for t in read_tasks(path) if t["kind"] == "trip.plan"]
    assert tasks
    jobs = []
    for t in tasks:
        priciest = []
        for day in t["answer"]:
            pick = {}
            for table, col, key in [("hotels", "price", "hotel"), ("attractions", "ticket", "attraction"),
                                    ("restaurants", "avg_cost", "restaurant")]:
                pick[key] = db.execute(f"SELECT name FROM {table} WHERE city = ? ORDER BY {col} DESC LIMIT 1",
                                       (day["city"],)).fetchone()[0]
            priciest.append({**day, **pick})
        jobs.append({"op": "verify", "id": t["id"], "verifier": t["verifier"], "answer": priciest})
    results = run_jobs(path, jobs)
    reasons = [r["reason"] for r in results if not r["ok"]]
    assert reasons, "no trip plan with the priciest picks was rejected"
    assert all(("budget" in w or "rated" in w or "expensive" in w) for w in reasons), reasons


def test_broken_tasks_are_dropped_and_reported(tmp_path):
    need_sandbox()
    env = generate(CATEGORIES["bank"], 0, tmp_path)
    env.tasks[0]["solution"] = "answer = 'made up'"                                # wrong solution
    env.tasks[1]["verifier"] = "def verify(answer):\n    return True\n"            # accepts anything
    env.tasks[2]["solution"] = "while True:\n    pass\n"                           # never ends
    broken = [t["id"] for t in env.tasks[:3]]
    v = validate(env, random_tries=0, job_timeout=2)
    dropped = dict(v.dropped)
    assert set(dropped) == set(broken)
    assert "fails its verifier" in dropped[broken[0]]
    assert "empty answer" in dropped[broken[1]]
    assert "time limit" in dropped[broken[2]]
    ids = [t["id"] for t in read_tasks(env.path)]
    assert len(dropped) == 3 and not set(dropped) & set(ids)
    assert len(ids) == len(v.kept) >= 3


def test_solutions_cannot_write_the_db(tmp_path):
    need_sandbox()
    env = generate(CATEGORIES["inventory"], 0, tmp_path)
    db = (env.path / "db.sqlite").resolve()
    sneaky = f"import sqlite3\nc = sqlite3.connect({str(db)!r})\nc.execute('DELETE FROM products')\nc.commit()\n"
    sneaky += "answer = 1\n"
    (res,) = run_jobs(env.path, [{"op": "solve", "id": "x", "solution": sneaky}])
    assert res["answer"] is None and "readonly" in res["error"].replace("-", "").lower(), res
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM products").fetchone()[0] > 0


def test_run_jobs_output_grows_with_the_job_count(tmp_path):
    """All job results share one stdout: 40 results of 3 KB each (120 KB, past the sandbox's 64 KiB default)
    all come back; a cap too small for them says so instead of 'exit status 0'."""
    need_sandbox()
    env = generate(CATEGORIES["bank"], 0, tmp_path)
    jobs = [{"op": "solve", "id": f"j{i}", "solution": f"answer = '{i:04d}' + 'x' * 3000"} for i in range(40)]
    res = run_jobs(env.path, jobs)
    assert [r.get("answer", "")[:4] for r in res] == [f"{i:04d}" for i in range(40)]
    cut = run_jobs(env.path, jobs, job_output_cap=1000)
    assert "fatal" in cut[-1] and "cap of 1000 bytes per job" in cut[-1]["fatal"]


def test_cli_writes_environments_and_summary(tmp_path, capsys):
    need_sandbox()
    rc = cli_main(["--out", str(tmp_path / "out"), "--categories", "calendar,sports", "--seeds", "1",
                   "--difficulty", "2..3", "--json", str(tmp_path / "s.json")])
    assert rc == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["environments"] == 2 and s["by_level"].keys() == {"level2", "level3"}
    for d in ("calendar-0000", "sports-0000"):
        files = {p.name for p in (tmp_path / "out" / d).iterdir()}
        assert files == {"env.json", "db.sqlite", "tools.py", "checks.py", "tasks.jsonl"}
    assert "verified tasks" in capsys.readouterr().out
    assert cli_main(["--out", str(tmp_path), "--categories", "nope"]) == 2
    # the pass@k filter from the command line: every task gets its pass_k, only solved ones stay
    rc = cli_main(["--out", str(tmp_path / "pk"), "--categories", "sports", "--seeds", "1", "--random", "0",
                   "--pass-k", "2", "--json", str(tmp_path / "pk.json")])
    s = json.loads((tmp_path / "pk.json").read_text())
    assert rc == 0 and s["pass_k"]["k"] == 2 and s["pass_k"]["kept"] + s["pass_k"]["dropped"] == s["tasks_kept"]
    left = read_tasks(tmp_path / "pk" / "sports-0000")
    assert len(left) == s["pass_k"]["kept"] and all(t["pass_k"]["solved"] >= 1 for t in left)


def test_tool_session_runs_tools_in_the_sandbox(tmp_path):
    need_sandbox()
    env = generate(CATEGORIES["trip"], 0, tmp_path)
    db = sqlite3.connect(env.path / "db.sqlite")
    hotel, city = db.execute("SELECT name, city FROM hotels LIMIT 1").fetchone()
    with ToolSession(env.path) as s:
        assert s.call("get_all_cities") == sorted(r[0] for r in db.execute("SELECT name FROM cities"))
        assert s.call("get_city_by_hotel", {"hotel": hotel.upper()}) == city
        assert s.call("get_infos_by_hotel", json.dumps({"name": hotel}))["city"] == city
        bad = [("nope", {}, "unknown tool"), ("get_city_by_hotel", {"hotel": 3}, "type string"),
               ("get_city_by_hotel", {}, "missing"), ("get_city_by_hotel", {"hotel": "x"}, "no hotels")]
        for name, args, msg in bad:
            with pytest.raises(ToolCallError, match=msg):
                s.call(name, args)
        t = env.tasks[0]
        assert s.verify(t, t["answer"] if t["answer"] is not None else "x")[0] is (t["answer"] is not None)
        assert s.verify(t, None)[0] is False
        assert s.call("get_all_cities")                                   # still usable after errors


def test_pass_k_filter_keeps_what_a_policy_solves(tmp_path):
    need_sandbox()
    env = generate(CATEGORIES["sports"], 0, tmp_path)
    answers = {t["id"]: t["answer"] for t in env.tasks}
    calls = []

    def oracle(task, session, rng):                       # looks at a tool, then submits the reference answer
        calls.append(session.call("list_teams"))
        return answers[task["id"]]

    res = pass_at_k(env.path, oracle, 4)
    assert all(r == {"k": 4, "tries": 1, "solved": 1} for r in res.values()) and len(calls) == len(answers)
    res = pass_at_k(env.path, random_policy, 3, stop_at_first=False)
    assert all(r["tries"] == 3 for r in res.values())
    kept, dropped = filter_pass_k(env.path, lambda task, session, rng: None, 2)    # never solves
    assert kept == [] and len(dropped) == len(answers) and read_tasks(env.path) == []
    assert all(t["pass_k"] == {"k": 2, "tries": 2, "solved": 0} for t in dropped)


def test_no_sandbox_no_run_unless_unsafe(tmp_path, monkeypatch, capsys):
    """Without bwrap on PATH, synth refuses (exit 1, says why); --unsafe is the user's explicit way out."""
    need_sandbox()
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox_available.cache_clear()
    try:
        assert cli_main(["--out", str(tmp_path / "a"), "--categories", "bank", "--seeds", "1"]) == 1
        assert "no working sandbox" in capsys.readouterr().err
        assert cli_main(["--out", str(tmp_path / "b"), "--categories", "bank", "--seeds", "1", "--unsafe"]) == 0
        assert "6 verified tasks" in capsys.readouterr().out
    finally:
        monkeypatch.undo()
        sandbox_available.cache_clear()


@pytest.mark.slow
def test_targets_1000_verified_tasks(tmp_path):
    """The issue's target: >= 1,000 verified tasks in >= 20 categories, reference 100%, random < 5%, empty 0%."""
    need_sandbox()
    s = synthesize(tmp_path, list(CATEGORIES), range(9), [1, 2, 3], per_level=2, random_tries=5,
                   log=lambda *_: None)
    assert s["categories"] >= 20 and s["tasks_kept"] >= 1000
    assert s["solution_pass_rate"] == 1.0 and s["empty_answer_pass_rate"] == 0.0
    assert s["random_policy_pass_rate"] < 0.05


def test_env_dirs_are_world_readable(tmp_path):
    env = generate(CATEGORIES["courses"], 0, tmp_path)
    assert env.path.stat().st_mode & 0o005 == 0o005
    assert all(p.stat().st_mode & 0o004 for p in Path(env.path).iterdir())


# ---------------------------------------------------------------------------------------------- LLM-driven generator

BAD_DATA = "```python\nimport sqlite3\ndb = sqlite3.connect('db.sqlite')\nundefined_helper()\n```"
GOOD_DATA = '''Here it is.
```python
import sqlite3
db = sqlite3.connect("db.sqlite")
db.execute("CREATE TABLE books (title TEXT, author TEXT, year INTEGER, price REAL)")
rows = [("Tide %d" % i, ["Ann Lee", "Bo Chen", "Cy Dunn"][i % 3], 1990 + i, 5.5 + i) for i in range(12)]
db.executemany("INSERT INTO books VALUES (?, ?, ?, ?)", rows)
db.commit()
```'''
TOOLS = '''```python
def list_authors() -> list[str]:
    """All authors.
    """
    return _col("SELECT DISTINCT author FROM books ORDER BY 1")


def books_by_author(author: str) -> list[dict]:
    """Books of one author with year and price.

    Args:
        author: full name
    """
    return _rows("SELECT * FROM books WHERE author = ? COLLATE NOCASE", (author,))
```'''


def _task(prompt, solution, verifier):
    body = {"prompt": prompt, "solution": solution, "verifier": verifier, "answer_schema": {"type": "number"}}
    return "```json\n" + json.dumps(body) + "\n```"


SOLVE_1 = "answer = len(books_by_author('Bo Chen'))"
VERIFY_WRONG = "def verify(answer):\n    return answer == 5\n"
VERIFY_1 = "from checks import same_number\ndef verify(answer):\n    return same_number(answer, 4, 0)\n"
SOLVE_2 = "answer = round(sum(b['price'] for b in books_by_author('Bo Chen') if b['year'] > 1995), 2)"
VERIFY_2 = "from checks import same_number\ndef verify(answer):\n    return same_number(answer, 28.0)\n"


class _ScriptedEndpoint:
    """An OpenAI-compatible /chat/completions server answering from a script; records every request."""

    def __init__(self, replies):
        import http.server
        import threading

        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                text = outer.replies.pop(0)
                data = json.dumps({"object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data.encode())

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()


def test_llm_generator_repairs_until_solution_and_verifier_agree(tmp_path, monkeypatch):
    need_sandbox()
    fake = _ScriptedEndpoint([BAD_DATA, GOOD_DATA, TOOLS,
                              _task("How many books by Bo Chen?", SOLVE_1, VERIFY_WRONG),
                              _task("How many books by Bo Chen? Answer with a number.", SOLVE_1, VERIFY_1),
                              _task("Total price of Bo Chen's books after 1995?", SOLVE_2, VERIFY_2)])
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    try:
        rc = cli_main(["--out", str(tmp_path), "--llm", "second-hand bookshop", "--base-url", fake.url,
                       "--model", "scripted", "--api-key-env", "FAKE_KEY", "--difficulty", "1..2"])
    finally:
        fake.close()
    assert rc == 0 and fake.replies == []
    path, headers, body = fake.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "scripted"
    assert headers["Authorization"] == "Bearer sk-test"
    # the failures went back to the model: the data program's NameError, then the verifier disagreeing
    assert "undefined_helper" in fake.requests[1][2]["messages"][-1]["content"]
    assert "fails the verifier" in fake.requests[4][2]["messages"][-1]["content"]
    env = tmp_path / "llm-second-hand-bookshop-0000"
    meta = json.loads((env / "env.json").read_text())
    assert meta["generator"] == "llm" and [t["function"]["name"] for t in meta["tools"]] == [
        "list_authors", "books_by_author"]
    tasks = read_tasks(env)
    assert [t["difficulty"] for t in tasks] == [1, 2] and [t["answer"] for t in tasks] == [4, 28.0]
    jobs = [{"op": "verify", "id": f"{t['id']}/{a}", "verifier": t["verifier"], "answer": a}
            for t in tasks for a in (t["answer"], 0)]
    assert [r["ok"] for r in run_jobs(env, jobs)] == [True, False, True, False]
