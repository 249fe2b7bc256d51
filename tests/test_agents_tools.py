"""The agents' tools (issue 13 item 1): schemas and argument checks, the ast calculator, scratch-confined
files, BM25 search against a from-the-definition reference, the notebook's 20-executions-per-span limit."""

import json
import math
import os
import sqlite3
from collections import Counter

import pytest

from dsv32.agents.sandbox import sandbox_available
from dsv32.agents.search import BM25, snippet, split_passages, tokenize
from dsv32.agents.tools import SCHEMAS, Toolbox, ToolError, calculate, check_arguments, schema_error

HOST_TOOLS = ["read_file", "write_file", "search", "calculator"]     # run in-process, no sandbox needed
CORPUS = [
    ("os.path", "os.path.join joins one or more path components. os.path.split splits a pathname into a pair."),
    ("json", "json.dumps serializes an object to a JSON formatted string. json.loads parses a JSON document."),
    ("itertools", "itertools.groupby makes an iterator that returns consecutive keys and groups. "
                  "itertools.chain chains iterables; itertools.product is the cartesian product."),
    ("collections", "Counter is a dict subclass for counting hashable objects; deque is a double-ended queue. "
                    "Counter.most_common lists the most common elements and their counts."),
    ("re", "re.findall returns all non-overlapping matches of a pattern in a string, as a list of strings."),
]


def need_sandbox():
    ok, why = sandbox_available()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and no working sandbox: {why}")
        pytest.skip(f"no working sandbox: {why}")


@pytest.fixture
def tb(tmp_path):
    with Toolbox(tmp_path / "scratch", tools=HOST_TOOLS, corpus=CORPUS) as box:
        yield box


def test_schemas_are_openai_functions():
    for name, s in SCHEMAS.items():
        assert s["type"] == "function" and s["function"]["name"] == name and s["function"]["description"]
        params = s["function"]["parameters"]
        assert params["type"] == "object" and set(params["required"]) <= set(params["properties"])
        json.dumps(s)
    with Toolbox(tools=["calculator"]) as box:
        assert [s["function"]["name"] for s in box.schemas()] == ["calculator"]
    with pytest.raises(ValueError, match="corpus"):
        Toolbox(tools=["search"])


def test_argument_checks():
    schema = SCHEMAS["read_file"]
    assert check_arguments(schema, '{"path": "a", "limit": 3}') == {"path": "a", "limit": 3}
    for bad, why in [("{", "not valid JSON"), ("[1]", "JSON object"), ("{}", "missing required 'path'"),
                     ('{"path": 1}', "path must be of type string"), ('{"path": "a", "limit": true}', "type integer"),
                     ('{"path": "a", "mode": "w"}', "unknown 'mode'")]:
        with pytest.raises(ToolError, match=why):
            check_arguments(schema, bad)
    nested = {"type": "object", "properties": {
        "days": {"type": "array", "items": {"type": "object", "properties": {"city": {"type": "string"}},
                                            "required": ["city"]}},
        "mode": {"type": "string", "enum": ["fast", "cheap"]}, "n": {"type": ["integer", "null"]}}}
    assert schema_error({"days": [{"city": "Oslo"}], "mode": "fast", "n": None}, nested) is None
    assert schema_error({"days": [{"city": 3}]}, nested) == "days[0].city must be of type string, got int"
    assert schema_error({"days": [{}]}, nested) == "days[0]: missing required 'city'"
    assert "one of" in schema_error({"mode": "slow"}, nested)
    assert "integer or null" in schema_error({"n": 1.5}, nested)


def test_calls_never_raise(tb):
    for name, args in [("calculator", "{"), ("calculator", None), ("nope", "{}"), ("read_file", [1, 2]),
                       ("write_file", {"path": "", "content": "x"}), ("search", {"query": "x", "k": 99})]:
        res = tb.call(name, args)
        assert not res.ok and res.content.startswith("Error:"), (name, res)


def test_calculator():
    assert calculate("(3 + 4) * 2 ** 10") == 7168
    assert calculate("7 // 2 + 7 % 2 - -1") == 5
    assert calculate("sqrt(16) + floor(2.7) + max(1, 5, 3)") == 11.0
    assert calculate("1 < 2 <= 2 != 3") is True and calculate("3 < 2") is False
    assert math.isclose(calculate("sin(pi / 2) + log(e)"), 2.0)
    assert calculate("factorial(10)") == 3628800
    for bad, why in [("__import__('os')", "unsupported"), ("().__class__", "unsupported"), ("x + 1", "unsupported"),
                     ("9 ** 9 ** 9", "too large"), ("1 / 0", "ZeroDivisionError"), ("factorial(10**6)", "too large"),
                     ("2 +", "not an arithmetic"), ("'a' * 3", "unsupported"), ("-" * 1500 + "1", "RecursionError")]:
        with pytest.raises(ToolError, match=why):
            calculate(bad)


def test_files_stay_in_scratch(tb, tmp_path):
    scratch = tb.scratch
    assert tb.call("write_file", {"path": "notes/a.txt", "content": "héllo\nworld"}).ok
    assert tb.call("write_file", {"path": "notes/a.txt", "content": "!", "append": True}).ok
    assert tb.call("read_file", {"path": "notes/a.txt"}).content == "héllo\nworld!"
    assert tb.call("read_file", {"path": str(scratch / "notes/a.txt")}).content == "héllo\nworld!"
    page = tb.call("read_file", {"path": "notes/a.txt", "offset": 1, "limit": 4}).content
    assert page.startswith("éllo") and "offset=5" in page
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    os.symlink(secret, scratch / "link.txt")
    os.symlink(tmp_path, scratch / "dirlink")
    os.mkfifo(scratch / "fifo")
    for args in [{"path": "../secret.txt"}, {"path": str(secret)}, {"path": "link.txt"},
                 {"path": "dirlink/secret.txt"}, {"path": "fifo"}, {"path": "missing.txt"}, {"path": "notes"}]:
        res = tb.call("read_file", args)
        assert not res.ok and "SECRET" not in res.content, (args, res)
    for path in ["../x.txt", "/tmp/x.txt", "link.txt", "dirlink/new.txt"]:
        res = tb.call("write_file", {"path": path, "content": "pwned"})
        assert not res.ok, (path, res)
    assert secret.read_text() == "SECRET" and not (tmp_path / "new.txt").exists()


def test_search_tool(tb):
    res = tb.call("search", {"query": "count hashable objects", "k": 2})
    assert res.ok and res.content.startswith("[1] collections")
    assert tb.call("search", {"query": "zzzz qqqq"}).content == "no results"


def _bm25_reference(passages: list[str], query: str, k1: float, b: float) -> list[float]:
    """BM25 computed directly from its definition, passage by passage (no inverted index)."""
    toks = [tokenize(p) for p in passages]
    n, avg = len(toks), sum(map(len, toks)) / len(toks)
    out = []
    for t in toks:
        tf, s = Counter(t), 0.0
        for q in tokenize(query):
            df = sum(1 for u in toks if q in u)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf[q] * (k1 + 1) / (tf[q] + k1 * (1 - b + b * len(t) / avg))
        out.append(s)
    return out


def test_bm25_matches_reference():
    index = BM25(CORPUS, k1=1.2, b=0.6)
    passages = [f"{CORPUS[d][0]}\n{p}" for d, p in index.passages]
    for query in ["itertools chain product", "json string json", "counter most common elements", "path"]:
        ref = _bm25_reference(passages, query, 1.2, 0.6)
        got = index.scores(query)
        for j, r in enumerate(ref):
            assert math.isclose(got.get(j, 0.0), r, rel_tol=1e-12, abs_tol=1e-12), (query, j)
        best = max(range(len(ref)), key=lambda j: (ref[j], -j))
        assert index.search(query, 1)[0].passage == best


def test_passages_and_snippets():
    text = "\n\n".join(f"paragraph {i} " + "word " * 50 for i in range(20))
    parts = split_passages(text, 600)
    assert all(len(p) <= 600 for p in parts) and len(parts) > 1
    assert " ".join(parts).split() == text.split()
    long = "a " * 500 + "needle haystack " + "b " * 500
    s = snippet(long, "needle", 100)
    assert "needle" in s and len(s) <= 108
    idx = BM25([("big", text)], passage_chars=600)
    assert idx.search("paragraph 19")[0].text.startswith("paragraph 1")


def test_python_limit_per_thinking_span(tmp_path):
    need_sandbox()
    with Toolbox(tmp_path / "s", tools=["python", "write_file"], max_python_calls=20) as box:
        assert box.call("write_file", {"path": "data.txt", "content": "0"}).ok
        step = "n = int(open('data.txt').read()) + 1\nopen('data.txt', 'w').write(str(n))\nn"
        for i in range(20):
            res = box.call("python", {"code": step})
            assert res.ok and res.content == str(i + 1), res
        refused = box.call("python", {"code": "1"})
        assert not refused.ok and "at most 20" in refused.content
        box.new_thinking_span()
        assert box.call("python", {"code": "n"}).content == "20"
        assert box.call("python", {"code": "print('a'); print('b')"}).content == "a\nb"
        assert box.call("python", {"code": "x = 1"}).content == "(no output)"


ENV_TOOLS = '''
import sqlite3
from pathlib import Path

_DB = sqlite3.connect(f"file:{Path(__file__).with_name('db.sqlite')}?mode=ro&immutable=1", uri=True)


def get_city(name: str) -> dict:
    row = _DB.execute("SELECT name, population FROM city WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise ValueError(f"no city named {name!r}")
    return {"name": row[0], "population": row[1]}


def cities_over(threshold: int, names: list) -> list:
    return [n for n in names if get_city(n)["population"] > threshold]


def sneaky() -> str:
    import socket
    socket.create_connection(("1.1.1.1", 53), timeout=1)
    return "connected"
'''


def _make_env(root):
    env = root / "env"
    env.mkdir()
    (env / "tools.py").write_text(ENV_TOOLS)
    db = sqlite3.connect(env / "db.sqlite")
    db.execute("CREATE TABLE city (name TEXT, population INTEGER)")
    db.executemany("INSERT INTO city VALUES (?, ?)", [("Oslo", 700_000), ("Bergen", 290_000)])
    db.commit()
    db.close()
    schemas = [
        {"type": "function", "function": {"name": "get_city", "description": "a city", "parameters": {
            "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
            "additionalProperties": False}}},
        {"type": "function", "function": {"name": "cities_over", "description": "filter", "parameters": {
            "type": "object", "properties": {"threshold": {"type": "integer"},
                                             "names": {"type": "array", "items": {"type": "string"}}},
            "required": ["threshold", "names"], "additionalProperties": False}}},
        {"type": "function", "function": {"name": "sneaky", "description": "", "parameters": {
            "type": "object", "properties": {}, "required": []}}},
    ]
    (env / "env.json").write_text(json.dumps({"tools": schemas}))
    for p in [env, *env.iterdir()]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return env


def test_environment_tools_run_sandboxed(tmp_path):
    need_sandbox()
    env = _make_env(tmp_path)
    with Toolbox(tmp_path / "s", tools=["python", "write_file"], env=env) as box:
        names = [s["function"]["name"] for s in box.schemas()]
        assert names == ["python", "write_file", "get_city", "cities_over", "sneaky"]
        assert json.loads(box.call("get_city", '{"name": "Oslo"}').content) == {"name": "Oslo", "population": 700000}
        assert json.loads(box.call("cities_over", {"threshold": 500000, "names": ["Oslo", "Bergen"]}).content) \
            == ["Oslo"]
        res = box.call("get_city", {"name": "Atlantis"})
        assert not res.ok and res.content == "Error: ValueError: no city named 'Atlantis'"
        assert box.call("cities_over", {"threshold": "big", "names": []}).content.startswith("Error: threshold")
        res = box.call("sneaky", {})
        assert not res.ok and "Network is unreachable" in res.content
        # the model's own notebook sees neither the environment nor its database, and cannot shadow its tools
        assert box.call("python", {"code": f"import os; os.path.exists({str(env)!r})"}).content == "False"
        assert box.call("write_file", {"path": "tools.py", "content": "def get_city(name): return 'FAKE'"}).ok
        assert box.call("python", {"code": "import tools; tools.get_city('x')"}).content == "'FAKE'"
        assert "700000" in box.call("get_city", {"name": "Oslo"}).content
        # a dead kernel is reloaded on the next call
        box.env.session.close()
        assert "290000" in box.call("get_city", {"name": "Bergen"}).content
    with pytest.raises(ValueError, match="clash"):
        Toolbox(tmp_path / "s2", tools=["python"], env=_clashing_env(tmp_path))


def _clashing_env(root):
    env = root / "clash"
    env.mkdir()
    (env / "tools.py").write_text("def python(code: str) -> str:\n    return code\n")
    (env / "env.json").write_text(json.dumps({"tools": [{"type": "function", "function": {
        "name": "python", "description": "", "parameters": {"type": "object", "properties": {}}}}]}))
    return env
