"""What runs INSIDE the sandbox for an environment (standard library only; the host passes this file's text
to `run_python`, with the environment directory mounted read-only).

Reads one JSON job list on stdin, prints one JSON result per job (a line each, flushed), so one sandboxed
process serves all the tasks of an environment (one interpreter start, one `import tools`):

    {"env": "/abs/env/dir", "timeout": 10, "jobs": [
        {"op": "solve", "id": "t0", "solution": "..."},                     -> {"id", "answer", "error"}
        {"op": "verify", "id": "t0", "verifier": "...", "answer": ...},    -> {"id", "ok", "reason"}
        {"op": "random", "id": "t0", "prompt": "...", "answer_schema": {...}, "verifier": "...",
         "seed": 0, "calls": 6},                                          -> {"id", "ok", "answer", "calls"}
        {"op": "validate", "id": "t0", ...all of the above..., "reference": ..., "random": 3},
        {"op": "trace", "id": "t0", "solution": "..."}]}                    -> {"id", "answer", "error", "calls"}

A solution is Python that sees the environment's tools as globals and leaves its result in `answer`; a
verifier defines `verify(answer) -> bool | (bool, reason)` and may call tools and `checks` too. A trace runs
the solution like "solve" and also records every tool call it makes, in order, as the agent loop would have
seen it (`traced_tools`): {"name", "arguments", "ok", "result"}, the result being the tool's return value as
JSON text or, when the tool raised, the exception's last line. Each job has
its own namespace and an alarm of `timeout` seconds; an exception is a failed job, never a dead runner.
"""

import inspect
import json
import random
import re
import signal
import sys
import traceback

EMPTY_ANSWERS = (None, "", [], {})
_QUOTED = re.compile(r"'([^']{1,60})'|\"([^\"]{1,60})\"")
_CAPITALISED = re.compile(r"\b[A-Z][\w'&.-]*(?: [A-Z][\w'&.-]*)*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class JobTimeout(BaseException):
    """Not an Exception: no `except Exception` in a job may swallow it."""


def _alarm(signum, frame):
    raise JobTimeout("job exceeded its time limit")


def load_tools(env: str) -> tuple[dict, list[dict]]:
    """The public functions of the environment's tools.py and the tool schemas of its env.json."""
    sys.path.insert(0, env)
    import tools  # noqa: PLC0415 - the environment's own module, found on the path set just above

    with open(f"{env}/env.json", encoding="utf-8") as f:
        schemas = json.load(f)["tools"]
    names = {s["function"]["name"] for s in schemas}
    return {n: getattr(tools, n) for n in names if hasattr(tools, n)}, schemas


def jsonable(value):
    """What the answer looks like after a trip through JSON (as a submitted answer would)."""
    return json.loads(json.dumps(value, default=str))


def solve(tools: dict, solution: str, task_id: str):
    ns = dict(tools)
    exec(compile(solution, f"<solution {task_id}>", "exec"), ns)  # noqa: S102 - sandboxed by design
    if "answer" not in ns:
        raise ValueError("the solution did not set `answer`")
    return jsonable(ns["answer"])


def traced_tools(tools: dict, calls: list) -> dict:
    """The tools, each wrapped to append one record per call to `calls`. A call is recorded as the agent loop
    makes it: the arguments by parameter name (positional ones bound to their names) after a trip through
    JSON, the tool run on exactly those, the result as the JSON text the loop's tool cell prints
    (`ensure_ascii=False, default=str`), an exception as the last line of its traceback. The solution gets
    the return value (or the exception) as without tracing."""

    def wrap(name, fn):
        sig = inspect.signature(fn)

        def traced(*args, **kwargs):
            arguments = jsonable(dict(sig.bind(*args, **kwargs).arguments))
            rec = {"name": name, "arguments": arguments}
            calls.append(rec)
            try:
                value = fn(**arguments)
            except Exception as e:
                lines = [s for s in "".join(traceback.format_exception_only(type(e), e)).splitlines() if s.strip()]
                rec["ok"], rec["result"] = False, lines[-1] if lines else type(e).__name__
                raise
            rec["ok"], rec["result"] = True, json.dumps(value, ensure_ascii=False, default=str)
            return value

        traced.__name__ = name
        return traced

    return {name: wrap(name, fn) for name, fn in tools.items()}


def verify(tools: dict, verifier: str, answer, task_id: str) -> tuple[bool, str]:
    ns = dict(tools)
    exec(compile(verifier, f"<verifier {task_id}>", "exec"), ns)  # noqa: S102 - sandboxed by design
    try:
        out = ns["verify"](answer)
    except Exception as e:  # noqa: BLE001 - a malformed answer is a failed answer
        return False, f"verifier raised on this answer: {type(e).__name__}: {e}"
    ok, reason = out if isinstance(out, tuple) else (out, "")
    return bool(ok), str(reason)


# ------------------------------------------------------------------------------------------- random policy

class Pool:
    """Values seen so far in an episode: the prompt's quoted/capitalised phrases and numbers, then every
    scalar in every tool result."""

    def __init__(self, prompt: str):
        self.strings: list[str] = []
        self.numbers: list[float] = []
        for m in _QUOTED.finditer(prompt):
            self.add(m.group(1) or m.group(2))
        for m in _CAPITALISED.finditer(prompt):
            self.add(m.group(0))
        for m in _NUMBER.finditer(prompt):
            self.add(float(m.group(0)))

    def add(self, value) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            self.numbers.append(value)
        elif isinstance(value, str):
            self.strings.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                self.add(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.add(v)

    def draw(self, schema: dict, rng: random.Random):
        """A value of the schema's type built from pooled values (schema-valid, content random)."""
        kind = schema.get("type", "string")
        if kind == "string":
            return rng.choice(self.strings) if self.strings else ""
        if kind == "integer":
            ints = [int(x) for x in self.numbers if float(x).is_integer()]
            return rng.choice(ints) if ints else 0
        if kind == "number":
            return rng.choice(self.numbers) if self.numbers else 0
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "array":
            return [self.draw(schema.get("items", {}), rng) for _ in range(rng.randint(1, 4))]
        if kind == "object":
            return {k: self.draw(v, rng) for k, v in schema.get("properties", {}).items()}
        return None


def random_episode(tools: dict, schemas: list[dict], prompt: str, answer_schema: dict, rng: random.Random,
                   calls: int) -> tuple[object, int]:
    """`calls` schema-valid tool calls whose arguments come from values seen earlier, then a random answer."""
    pool = Pool(prompt)
    made = 0
    for _ in range(calls):
        fn = rng.choice(schemas)["function"]
        if fn["name"] not in tools:
            continue
        args = {k: pool.draw(v, rng) for k, v in fn["parameters"].get("properties", {}).items()}
        made += 1
        try:
            pool.add(jsonable(tools[fn["name"]](**args)))
        except Exception:  # noqa: BLE001, S112 - a failed call teaches the random policy nothing
            continue
    return jsonable(pool.draw(answer_schema, rng)), made


# ------------------------------------------------------------------------------------------------- jobs

def run_job(job: dict, tools: dict, schemas: list[dict]) -> dict:
    op, tid = job["op"], job["id"]
    out: dict = {"id": tid, "op": op}
    if op in ("solve", "validate"):
        try:
            out["answer"], out["error"] = solve(tools, job["solution"], tid), None
        except Exception:  # noqa: BLE001 - reported, not raised
            out["answer"], out["error"] = None, traceback.format_exc(limit=3)[-2000:]
    if op == "verify":
        out["ok"], out["reason"] = verify(tools, job["verifier"], job["answer"], tid)
    if op == "trace":
        out["calls"] = []
        try:
            out["answer"], out["error"] = solve(traced_tools(tools, out["calls"]), job["solution"], tid), None
        except Exception:  # noqa: BLE001 - reported, not raised
            out["answer"], out["error"] = None, traceback.format_exc(limit=3)[-2000:]
    if op == "validate":
        out["solution_ok"], out["solution_reason"] = (verify(tools, job["verifier"], out["answer"], tid)
                                                      if out["error"] is None else (False, "solution failed"))
        if job.get("reference") is not None:
            out["reference_ok"], out["reference_reason"] = verify(tools, job["verifier"], job["reference"], tid)
        out["empty_ok"] = [verify(tools, job["verifier"], a, tid)[0] for a in EMPTY_ANSWERS]
    if op in ("random", "validate"):
        n = 1 if op == "random" else job.get("random", 0)
        out["random_ok"], out["random_answers"] = [], []
        for i in range(n):
            rng = random.Random(f"{job.get('seed', 0)}-{tid}-{i}")
            ans, _ = random_episode(tools, schemas, job["prompt"], job["answer_schema"], rng,
                                    job.get("calls", rng.randint(1, 8)))
            out["random_ok"].append(verify(tools, job["verifier"], ans, tid)[0])
            out["random_answers"].append(ans)
        if op == "random":
            out["ok"], out["answer"] = out["random_ok"][0], out["random_answers"][0]
    return out


def main() -> None:
    spec = json.load(sys.stdin)
    signal.signal(signal.SIGALRM, _alarm)
    tools, schemas = load_tools(spec["env"])
    for job in spec["jobs"]:
        signal.alarm(int(spec.get("timeout", 10)))
        try:
            result = run_job(job, tools, schemas)
        except (Exception, JobTimeout):  # noqa: BLE001 - this job fails, the next one runs
            result = {"id": job.get("id"), "op": job.get("op"), "fatal": traceback.format_exc(limit=3)[-2000:]}
        finally:
            signal.alarm(0)
        print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
