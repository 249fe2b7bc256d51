"""Shared machinery of the programmatic environment generator (issue 13 item 3; paper §3.3, general agent).

An environment is the paper's <environment, tools, task, verifier> tuple written as one directory:

    env.json     category, seed, difficulty range, tool schemas (OpenAI function format), the submit tool
    db.sqlite    the seeded data (built from the seed; tools open it read-only)
    tools.py     plain Python functions over the db; their schemas are read from this source (`ast`, never
                 by importing it: a synthesized tools.py is untrusted)
    checks.py    the answer checks verifiers import (a copy of `dsv32.agents.envs.checks`)
    tasks.jsonl  id, prompt, solution (Python that only calls tools and sets `answer`), verifier (Python
                 defining `verify(answer)`), answer (reference), answer_schema, difficulty, kind

A category is a compact description: its tables (`build`), its tools (declared `Entity` lookups plus any
extra tool source), and task templates per difficulty level. The generator computes each task's expected
answer on the host straight from the data; the solution recomputes it inside the sandbox through the tools
only, so solution -> verifier agreeing (what `dsv32 synth` checks) cross-checks two independent paths.
Difficulty rises the way the paper raises it: each level adds a constraint (a filter, a day, a transfer).
"""

from __future__ import annotations

import ast
import json
import random
import shutil
import sqlite3
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHECKS_SOURCE = Path(__file__).with_name("checks.py")

# what every tools.py starts with: a read-only connection (immutable: the file never changes) and helpers
TOOLS_PREAMBLE = '''"""Tools of a synthesized environment: functions over the read-only db.sqlite beside it."""

import sqlite3
from pathlib import Path

_DB = sqlite3.connect(f"file:{Path(__file__).with_name('db.sqlite')}?mode=ro&immutable=1", uri=True)
_DB.row_factory = sqlite3.Row


def _rows(sql, args=()):
    return [dict(r) for r in _DB.execute(sql, args)]


def _col(sql, args=()):
    return [r[0] for r in _DB.execute(sql, args)]


def _get(table, key, value):
    row = _DB.execute(f"SELECT * FROM {table} WHERE {key} = ? COLLATE NOCASE", (value,)).fetchone()
    if row is None:
        raise ValueError(f"no {table} entry with {key} = {value!r}")
    return dict(row)
'''

SUBMIT_TOOL = {"type": "function", "function": {
    "name": "submit_result", "description": "Submit the final answer to the task (ends the episode).",
    "parameters": {"type": "object", "properties": {"answer": {"description": "the answer, as the task asks"}},
                   "required": ["answer"], "additionalProperties": False}}}

S_TEXT = {"type": "string"}
S_INT = {"type": "integer"}
S_NUM = {"type": "number"}
S_TEXTS = {"type": "array", "items": {"type": "string"}}


# ------------------------------------------------------------------------------------------- tasks

@dataclass
class Task:
    prompt: str
    solution: str              # Python over the tools; sets `answer`
    verifier: str              # Python defining verify(answer) -> bool | (bool, reason)
    answer_schema: dict        # JSON schema of a well-formed answer (the random policy draws from it)
    difficulty: int
    answer: Any = None         # reference answer; None = open task, filled from the validated solution
    kind: str = ""             # template name


def code(params: dict[str, Any], body: str) -> str:
    """`name = <literal>` lines for `params`, then `body` (dedented): how templates fill their code."""
    head = "".join(f"{k} = {v!r}\n" for k, v in params.items())
    return head + textwrap.dedent(body).strip() + "\n"


def exact_verifier(expected: Any, kind: str, tol: float = 0.01) -> str:
    """A verifier comparing with the expected answer (kinds: text | number | set | list, see checks.py)."""
    return code({"EXPECTED": expected}, f"""
        from checks import check

        def verify(answer):
            return check(answer, EXPECTED, {kind!r}, tol={tol!r})
    """)


def exact_task(prompt: str, solution: str, expected: Any, kind: str, level: int, name: str,
               tol: float = 0.01) -> Task:
    schema = {"text": S_TEXT, "number": S_NUM, "set": S_TEXTS, "list": S_TEXTS}[kind]
    if kind == "number" and isinstance(expected, int):
        schema, tol = S_INT, 0.0            # counts and integer totals: exact
    return Task(prompt, solution, exact_verifier(expected, kind, tol), schema, level, expected, name)


# ------------------------------------------------------------------------------------------- entities

@dataclass(frozen=True)
class Entity:
    """A table of named things grouped by a scope column (hotels by city, books by genre, ...). Gives two
    tools (names in a scope; everything about one name) and the generic filter/aggregate query tasks."""
    table: str
    noun: str
    plural: str
    scope: str                                   # grouping column; tasks are asked within one scope value
    numbers: dict[str, str]                      # numeric column -> phrase ("price per night in EUR")
    labels: dict[str, str] = field(default_factory=dict)   # categorical column -> phrase (equality filters)
    list_tool: str = ""                          # default list_<plural>_by_<scope>
    info_tool: str = ""                          # default get_<noun>_info
    additive: tuple[str, ...] = ()               # numeric columns whose sum means something (prices, pages)

    @property
    def lister(self) -> str:
        return self.list_tool or f"list_{self.plural}_by_{self.scope}"

    @property
    def getter(self) -> str:
        return self.info_tool or f"get_{self.noun}_info"

    def tools_source(self) -> str:
        cols = ", ".join(["name", self.scope, *self.numbers, *self.labels])
        return f'''

def {self.lister}({self.scope}: str) -> list[str]:
    """Names of all the {self.plural} with the given {self.scope}.

    Args:
        {self.scope}: the {self.scope} (exact name, case-insensitive)
    """
    return _col("SELECT name FROM {self.table} WHERE {self.scope} = ? COLLATE NOCASE ORDER BY name", ({self.scope},))


def {self.getter}(name: str) -> dict:
    """Everything about one {self.noun} ({cols}).

    Args:
        name: the {self.noun}'s name
    """
    return _get("{self.table}", "name", name)
'''


def _fmt(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def query_task(rng: random.Random, e: Entity, rows: list[dict], level: int) -> Task | None:
    """One filter/aggregate question about an entity table: level L applies L-1 filters (numeric thresholds
    or label equalities) inside one scope, and higher levels ask for harder aggregates. None when the draw
    is degenerate (ties, empty sets); the caller draws again."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[e.scope], []).append(r)
    scopes = sorted(s for s, g in groups.items() if len(g) >= 4)
    if not scopes:
        return None
    scope = rng.choice(scopes)
    cand = groups[scope]
    conds: list[str] = []
    phrases: list[str] = []
    used: set[str] = set()
    for _ in range(level - 1):
        free_labels = [c for c in e.labels if c not in used and len({r[c] for r in cand}) > 1]
        free_nums = [c for c in e.numbers if c not in used]
        if free_labels and (not free_nums or rng.random() < 0.3):
            col = rng.choice(free_labels)
            val = rng.choice(sorted({r[col] for r in cand}))
            keep = [r for r in cand if r[col] == val]
            conds.append(f"r[{col!r}] == {val!r}")
            phrases.append(f"whose {e.labels[col]} is '{val}'")
        elif free_nums:
            col = rng.choice(free_nums)
            vals = sorted(r[col] for r in cand)
            ge = rng.random() < 0.5
            # a threshold taken from the data itself, leaving at least about 3 rows on the kept side
            lo, hi = (0, max(0, len(vals) - 3)) if ge else (min(2, len(vals) - 1), len(vals) - 1)
            thr = vals[rng.randint(lo, hi)]
            keep = [r for r in cand if (r[col] >= thr if ge else r[col] <= thr)]
            conds.append(f"r[{col!r}] {'>=' if ge else '<='} {thr!r}")
            phrases.append(f"whose {e.numbers[col]} is {'at least' if ge else 'at most'} {_fmt(thr)}")
        else:
            break
        used.add(col)
        cand = keep
    if len(cand) < 2:
        return None
    targets = [c for c in e.numbers if c not in used] or list(e.numbers)
    col = rng.choice(targets)
    what = e.numbers[col]
    ops = {1: ["min", "max", "count"], 2: ["min", "max", "sum", "avg"], 3: ["set", "top2", "sum", "avg", "max"]}
    op = rng.choice(ops[min(level, 3)])
    if op == "sum":                 # a total of ratings or years means nothing: sum only additive columns
        summable = [c for c in e.additive if c not in used]
        if not summable:
            return None
        col = rng.choice(summable)
        what = e.numbers[col]
    vals = [r[col] for r in cand]
    names = sorted(r["name"] for r in cand)
    where = f"the {e.plural} whose {e.scope} is '{scope}'" + "".join(
        (" and " if i else ", ") + p for i, p in enumerate(phrases))
    fetch = f"rows = [{e.getter}(n) for n in {e.lister}({scope!r})]\n"
    if conds:
        fetch += f"rows = [r for r in rows if {' and '.join(conds)}]\n"
    if op in ("min", "max"):
        best = (min if op == "min" else max)(vals)
        if vals.count(best) > 1:
            return None
        expected = cand[vals.index(best)]["name"]
        word = "lowest" if op == "min" else "highest"
        q = f"Consider {where}. Which of them has the {word} {what}? Answer with its name."
        body = f"answer = {op}(rows, key=lambda r: r[{col!r}])['name']"
        return exact_task(q, fetch + body, expected, "text", level, f"{e.table}.{op}")
    if op == "count":
        if len(cand) == len(groups[scope]) and level > 1:
            return None
        q = (f"Consider {where}. How many are there? Answer with a number." if phrases
             else f"How many {e.plural} have {e.scope} '{scope}'? Answer with a number.")
        return exact_task(q, fetch + "answer = len(rows)", len(cand), "number", level, f"{e.table}.count")
    if op == "sum":
        q = f"Consider {where}. What is their total {what}? Answer with a number."
        return exact_task(q, fetch + f"answer = round(sum(r[{col!r}] for r in rows), 2)",
                          round(sum(vals), 2), "number", level, f"{e.table}.sum")
    if op == "avg":
        q = f"Consider {where}. What is their average {what}, rounded to 2 decimals? Answer with a number."
        return exact_task(q, fetch + f"answer = round(sum(r[{col!r}] for r in rows) / len(rows), 2)",
                          round(sum(vals) / len(vals), 2), "number", level, f"{e.table}.avg")
    if op == "set":
        if len(cand) == len(groups[scope]):
            return None
        q = f"List the names of all {where}. Answer with a JSON list of names (any order)."
        return exact_task(q, fetch + "answer = sorted(r['name'] for r in rows)", names, "set", level,
                          f"{e.table}.set")
    # top2: the two highest, highest first
    if len(cand) < 3 or len(set(vals)) != len(vals):
        return None
    top = [r["name"] for r in sorted(cand, key=lambda r: -r[col])[:2]]
    q = f"Consider {where}. Name the two with the highest {what}, highest first. Answer with a JSON list."
    body = f"answer = [r['name'] for r in sorted(rows, key=lambda r: -r[{col!r}])[:2]]"
    return exact_task(q, fetch + body, top, "list", level, f"{e.table}.top2")


# ------------------------------------------------------------------------------------------- categories

class Category:
    """One environment category. Subclasses set `name`, `description`, `entities`, optionally `tools`
    (extra tool source) and `templates` (bespoke task makers), and implement `build`."""
    name: str = ""
    description: str = ""
    entities: tuple[Entity, ...] = ()
    tools: str = ""                              # extra tool functions (source, using the preamble helpers)
    templates: tuple[str, ...] = ()              # names of methods (rng, data, level) -> Task | None
    query_share: float = 0.5                     # chance a task is a generic entity query (if entities exist)

    def build(self, rng: random.Random) -> dict[str, list[dict]]:
        """The environment's tables: name -> rows (dicts with the same keys; int/float/str values)."""
        raise NotImplementedError

    def tools_source(self) -> str:
        return TOOLS_PREAMBLE + "".join(e.tools_source() for e in self.entities) + textwrap.dedent(self.tools)

    def make_task(self, rng: random.Random, data: dict[str, list[dict]], level: int) -> Task | None:
        makers: list[Callable[[], Task | None]] = [
            (lambda m=m: getattr(self, m)(rng, data, level)) for m in self.templates]
        if self.entities and (not makers or rng.random() < self.query_share):
            e = rng.choice(self.entities)
            return query_task(rng, e, data[e.table], level)
        return rng.choice(makers)()

    def tasks(self, rng: random.Random, data: dict[str, list[dict]], level: int, n: int,
              tries: int = 60) -> list[Task]:
        """`n` distinct tasks at `level` (fewer if the data cannot give that many)."""
        out: list[Task] = []
        seen: set[str] = set()
        for _ in range(tries):
            if len(out) == n:
                break
            t = self.make_task(rng, data, level)
            if t is not None and t.prompt not in seen:
                seen.add(t.prompt)
                out.append(t)
        return out


# ------------------------------------------------------------------------------------------- tool schemas

_PY_TO_JSON = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "dict": "object",
               "list": "array"}


def _json_type(ann: ast.expr | None, where: str) -> dict:
    if ann is None:
        raise ValueError(f"{where}: every tool parameter needs a type annotation")
    if isinstance(ann, ast.Name) and ann.id in _PY_TO_JSON:
        return {"type": _PY_TO_JSON[ann.id]}
    if isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "list":
        return {"type": "array", "items": _json_type(ann.slice, where)}
    raise ValueError(f"{where}: unsupported annotation {ast.unparse(ann)!r} (use str, int, float, bool, list[...])")


def _parse_doc(doc: str) -> tuple[str, dict[str, str]]:
    """Docstring -> (description, {arg: description}) from a Google-style `Args:` block."""
    head, _, rest = doc.partition("Args:")
    args: dict[str, str] = {}
    for line in rest.splitlines():
        name, sep, text = line.strip().partition(":")
        if sep and name.isidentifier():
            args[name] = text.strip()
    return " ".join(head.split()), args


def schemas_from_source(source: str, filename: str = "tools.py") -> list[dict]:
    """OpenAI function schemas of every public top-level function, read from the source without running it."""
    out = []
    for node in ast.parse(source, filename).body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        desc, arg_docs = _parse_doc(ast.get_docstring(node) or "")
        a = node.args
        if a.vararg or a.kwarg or a.posonlyargs or a.kwonlyargs:
            raise ValueError(f"{filename}:{node.lineno} {node.name}: tools take plain named parameters only")
        n_req = len(a.args) - len(a.defaults)
        props = {}
        for arg in a.args:
            props[arg.arg] = _json_type(arg.annotation, f"{filename}:{node.lineno} {node.name}({arg.arg})")
            if arg.arg in arg_docs:
                props[arg.arg]["description"] = arg_docs[arg.arg]
        out.append({"type": "function", "function": {
            "name": node.name, "description": desc or node.name,
            "parameters": {"type": "object", "properties": props, "required": [x.arg for x in a.args[:n_req]],
                           "additionalProperties": False}}})
    return out


# ------------------------------------------------------------------------------------------- writing

def _sql_type(v: Any) -> str:
    return "INTEGER" if isinstance(v, int) else "REAL" if isinstance(v, float) else "TEXT"


def write_db(path: Path, data: dict[str, list[dict]]) -> None:
    if path.exists():
        path.unlink()
    db = sqlite3.connect(path)
    try:
        for table, rows in data.items():
            if not rows:
                raise ValueError(f"table {table!r} has no rows")
            cols = list(rows[0])
            db.execute(f"CREATE TABLE {table} ({', '.join(f'{c} {_sql_type(rows[0][c])}' for c in cols)})")
            db.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(cols))})",
                           [tuple(r[c] for c in cols) for r in rows])
        db.commit()
    finally:
        db.close()


@dataclass
class Environment:
    """A generated environment before validation: where it lives, its schemas and its tasks."""
    path: Path
    category: str
    seed: int
    tasks: list[dict]


def env_rng(category: str, seed: int, salt: str = "") -> random.Random:
    return random.Random(f"dsv32-env/{category}/{seed}/{salt}")


def generate(cat: Category, seed: int, out_dir: Path, levels: Sequence[int] = (1, 2, 3),
             per_level: int = 2) -> Environment:
    """Write one environment directory `out_dir/<category>-<seed>` (world-readable: the sandbox's uid reads it)."""
    path = Path(out_dir) / f"{cat.name}-{seed:04d}"
    path.mkdir(parents=True, exist_ok=True)
    data = cat.build(env_rng(cat.name, seed, "data"))
    source = cat.tools_source()
    schemas = schemas_from_source(source)
    tasks: list[dict] = []
    for level in levels:
        for t in cat.tasks(env_rng(cat.name, seed, f"level{level}"), data, level, per_level):
            tasks.append({"id": f"{cat.name}-{seed:04d}-{len(tasks):02d}", "category": cat.name,
                          "difficulty": t.difficulty, "kind": t.kind, "prompt": t.prompt,
                          "answer_schema": t.answer_schema, "solution": t.solution, "verifier": t.verifier,
                          "answer": t.answer, "pass_k": None})
    write_db(path / "db.sqlite", data)
    (path / "tools.py").write_text(source, encoding="utf-8")
    shutil.copyfile(CHECKS_SOURCE, path / "checks.py")
    meta = {"category": cat.name, "description": cat.description, "seed": seed,
            "difficulty": [min(levels), max(levels)], "tables": {k: list(v[0]) for k, v in data.items()},
            "tools": schemas, "submit_tool": SUBMIT_TOOL}
    (path / "env.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    write_tasks(path, tasks)
    path.chmod(0o755)
    for f in path.iterdir():
        f.chmod(0o644)
    return Environment(path, cat.name, seed, tasks)


def write_tasks(path: Path, tasks: list[dict]) -> None:
    with open(path / "tasks.jsonl", "w", encoding="utf-8") as f:
        for t in tasks:
            f.write(json.dumps(t) + "\n")
    (path / "tasks.jsonl").chmod(0o644)


def read_tasks(path: Path) -> list[dict]:
    """The tasks of the environment at `path`; a line that is not a JSON object is an error naming the file
    and the line."""
    file = Path(path) / "tasks.jsonl"
    out = []
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                task = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{file}:{n}: not JSON ({e})") from None
            if not isinstance(task, dict):
                raise ValueError(f"{file}:{n}: a task must be a JSON object, got {type(task).__name__}")
            out.append(task)
    return out


def find_environments(root: str | Path) -> list[Path]:
    """The environment directories (those holding an env.json) at `root` itself or one level under it, sorted
    by name. Raises FileNotFoundError / ValueError naming `root` when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    if (root / "env.json").is_file():
        return [root]
    envs = sorted(d for d in root.iterdir() if (d / "env.json").is_file())
    if not envs:
        raise ValueError(f"{root}: no environment here (no env.json in it or in its sub-directories)")
    return envs
