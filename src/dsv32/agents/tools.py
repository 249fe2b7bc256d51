"""The agent's tools and their per-trajectory runtime (issue 13 item 1).

`Toolbox` holds one trajectory's scratch directory, its sandboxed notebook kernel and the search index, and
dispatches `call(name, arguments_json) -> ToolResult(ok, content)`. Every tool returns a string for the
model; nothing a model can send (bad JSON, a wrong type, a path outside the scratch dir, a fork bomb) raises
out of `call`: failures come back as `ok=False` results whose text starts with "Error:".

Tools (OpenAI-style function schemas in `Toolbox.schemas()`):
- `python`: a stateful notebook, 120 s per call; at most 20 executions inside one thinking span (the paper's
  reasoning-with-tools prompt, §3.2), the agent loop calls `new_thinking_span()` when a span ends;
- `bash`: one sandboxed `bash -c` per call, cwd the scratch dir;
- `read_file` / `write_file`: host-side, confined to the scratch dir (no `..`, no symlinks, regular files);
- `search`: BM25 over a local corpus (only offered when the toolbox has one);
- `calculator`: arithmetic evaluated from the `ast`, never `eval`;
- a synthesized environment's own tools (`env=`), each call run in the environment's sandboxed kernel.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dsv32.agents.notebook import NotebookSession
from dsv32.agents.sandbox import OUTPUT_CAP, diagnose, hand_over, require_sandbox, run_command, sandbox_uid
from dsv32.agents.search import BM25, snippet

MAX_PYTHON_CALLS = 20          # per thinking span (paper Appendix B, Table 8)
READ_CAP = OUTPUT_CAP          # characters a read_file call returns at most


@dataclass
class ToolResult:
    ok: bool
    content: str


class ToolError(Exception):
    """A failure to report to the model as the tool's result (never escapes `Toolbox.call`)."""


def function_schema(name: str, description: str, properties: dict[str, Any], required: Sequence[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(required),
                       "additionalProperties": False}}}


SCHEMAS: dict[str, dict] = {s["function"]["name"]: s for s in [
    function_schema(
        "python", "Run Python code in a stateful Jupyter-style notebook: variables, imports and functions persist "
        "between calls. Returns printed output and the value of the last expression. 120 s per call; no network; "
        "the working directory is your scratch directory.",
        {"code": {"type": "string", "description": "Python source to execute"}}, ["code"]),
    function_schema(
        "bash", "Run a shell command with bash in a sandbox (no network; the working directory is your scratch "
        "directory, the only writable place). Returns stdout, stderr and a non-zero exit status.",
        {"command": {"type": "string", "description": "the command line"}}, ["command"]),
    function_schema(
        "read_file", "Read a text file from your scratch directory.",
        {"path": {"type": "string", "description": "path relative to the scratch directory"},
         "offset": {"type": "integer", "description": "first character to return (default 0)"},
         "limit": {"type": "integer", "description": f"characters to return (default and maximum {READ_CAP})"}},
        ["path"]),
    function_schema(
        "write_file", "Write (or append to) a text file in your scratch directory; missing folders are created.",
        {"path": {"type": "string", "description": "path relative to the scratch directory"},
         "content": {"type": "string", "description": "the text to write"},
         "append": {"type": "boolean", "description": "append instead of replacing (default false)"}},
        ["path", "content"]),
    function_schema(
        "search", "Search the local document collection (offline, keyword ranking with BM25). Returns the best "
        "passages with their document titles.",
        {"query": {"type": "string", "description": "keywords"},
         "k": {"type": "integer", "description": "number of results, 1-10 (default 5)"}}, ["query"]),
    function_schema(
        "calculator", "Evaluate an arithmetic expression exactly as Python would: + - * / // % **, parentheses, "
        "comparisons, and abs round min max sqrt log exp sin cos tan floor ceil factorial gcd, pi, e.",
        {"expression": {"type": "string", "description": "e.g. (3 + 4) * 2 ** 10 / sqrt(2)"}}, ["expression"]),
]}
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
               "array": list, "null": type(None)}


def schema_error(value: Any, schema: dict, where: str = "arguments") -> str | None:
    """Why `value` does not match a JSON schema (the subset tool schemas use: type, enum, items, properties,
    required, additionalProperties), or None. Booleans are not numbers, as in JSON Schema."""
    want = schema.get("type")
    if want is not None:
        kinds = want if isinstance(want, list) else [want]
        if not any(k in _JSON_TYPES and isinstance(value, _JSON_TYPES[k])
                   and not (k in ("integer", "number") and isinstance(value, bool)) for k in kinds):
            return f"{where} must be of type {' or '.join(kinds)}, got {type(value).__name__}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {schema['enum']}, got {value!r}"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            if err := schema_error(v, schema["items"], f"{where}[{i}]"):
                return err
    if isinstance(value, dict):
        props = schema.get("properties", {})
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            return f"{where}: missing required {', '.join(map(repr, missing))}"
        unknown = [k for k in value if k not in props]
        if unknown and schema.get("additionalProperties") is False:
            return f"{where}: unknown {', '.join(map(repr, unknown))}; expected {', '.join(props) or 'none'}"
        for k, v in value.items():
            if k in props and (err := schema_error(v, props[k], f"{where}.{k}" if where != "arguments" else k)):
                return err
    return None


def check_arguments(schema: dict, arguments: str | dict | None) -> dict:
    """Parse a tool call's arguments (JSON text or a dict) and validate them against its function schema."""
    if arguments is None or arguments == "":
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            raise ToolError(f"arguments are not valid JSON ({e})") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    if err := schema_error(arguments, schema["function"]["parameters"]):
        raise ToolError(err)
    return arguments


# ------------------------------------------------------------------------------------------------ calculator

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge}
_FUNCS: dict[str, Callable[..., Any]] = {
    "abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "log": math.log, "log2": math.log2,
    "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin,
    "acos": math.acos, "atan": math.atan, "floor": math.floor, "ceil": math.ceil, "factorial": math.factorial,
    "gcd": math.gcd, "lcm": math.lcm, "comb": math.comb, "perm": math.perm, "hypot": math.hypot}
_CONSTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}
_MAX_INT_BITS = 14_000         # ~4,200 digits (Python's int-to-str limit is 4,300); 9**9**9 would eat the host


def calculate(expression: str) -> int | float | bool:
    """Evaluate arithmetic by walking the expression's AST: numbers, operators, whitelisted functions and
    constants only (no names, attributes, calls of anything else), with guards on huge powers/factorials."""
    if len(expression) > 2000:
        raise ToolError("expression too long (2000 characters at most)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"not an arithmetic expression: {e.msg}") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float | bool):
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and isinstance(a, int) and isinstance(b, int) and abs(a) > 1 \
                    and b > 0 and b * max(a.bit_length(), 1) > _MAX_INT_BITS:
                raise ToolError(f"result too large: {a} ** {b}")
            if isinstance(node.op, ast.Mult) and isinstance(a, int) and isinstance(b, int) \
                    and a.bit_length() + b.bit_length() > _MAX_INT_BITS:
                raise ToolError("result too large")
            return _BINARY[type(node.op)](a, b)
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            left = ev(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                right = ev(right_node)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
                and not node.keywords:
            args = [ev(a) for a in node.args]
            if node.func.id in ("factorial", "comb", "perm") and any(isinstance(a, int) and a > 5000 for a in args):
                raise ToolError(f"argument too large for {node.func.id}")
            return _FUNCS[node.func.id](*args)
        raise ToolError(f"unsupported element {ast.unparse(node)!r} (only numbers, operators, "
                        f"{', '.join(_FUNCS)} and {', '.join(_CONSTS)})")

    try:
        return ev(tree.body)
    except ToolError:
        raise
    except (ArithmeticError, ValueError, TypeError, RecursionError) as e:
        raise ToolError(f"{type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------- scratch-confined files


def _relative_parts(scratch: Path, path: str) -> list[str]:
    """Components of `path` below `scratch`; refuses `..`, absolute paths elsewhere and empty paths."""
    p = PurePosixPath(path)
    if p.is_absolute():
        root = PurePosixPath(scratch.resolve())
        if not (p == root or root in p.parents):
            raise ToolError(f"{path}: outside the scratch directory {root}")
        p = p.relative_to(root)
    parts = [s for s in p.parts if s not in ("", ".")]
    if any(s == ".." for s in parts):
        raise ToolError(f"{path}: '..' is not allowed; paths stay inside the scratch directory")
    if not parts:
        raise ToolError(f"{path!r}: not a file path")
    return parts


def open_in_scratch(scratch: Path, path: str, flags: int, *, make_dirs: bool = False, uid: int | None = None) -> int:
    """Open `path` inside `scratch` walking one component at a time with O_NOFOLLOW, so a symlink (even one
    the sandbox swaps in between check and use) can never lead outside; only regular files are returned."""
    parts = _relative_parts(scratch, path)
    dfd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            except FileNotFoundError:
                if not make_dirs:
                    raise ToolError(f"{path}: no such file or directory") from None
                os.mkdir(part, 0o755, dir_fd=dfd)
                if uid is not None:
                    os.chown(part, uid, uid, dir_fd=dfd, follow_symlinks=False)
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            except OSError as e:
                raise ToolError(f"{path}: {part!r} is not a directory inside the scratch dir (symlinks are "
                                f"not followed): {e.strerror}") from None
            os.close(dfd)
            dfd = nfd
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644, dir_fd=dfd)
        except FileNotFoundError:
            raise ToolError(f"{path}: no such file or directory") from None
        except OSError as e:
            raise ToolError(f"{path}: cannot open ({e.strerror}; symlinks are not followed)") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ToolError(f"{path}: not a regular file")
        if uid is not None and flags & os.O_CREAT:
            os.fchown(fd, uid, uid)
        return fd
    finally:
        os.close(dfd)


# ------------------------------------------------------------------------------------ an environment's tools


class EnvironmentTools:
    """A synthesized environment's tool functions (`tools.py` beside its `db.sqlite`, paper §3.3). They are
    untrusted code, so they run in a sandboxed kernel of their own with the environment dir mounted read-only
    and a private scratch dir; the model's python cells never share it (they cannot patch the tools, shadow
    their imports, or read the database behind them). Results come back as JSON text."""

    def __init__(self, env_dir: Path, schemas: Sequence[dict] | None = None, *, timeout: float = 30.0,
                 memory_mb: int = 1024, max_procs: int = 16, unsafe: bool = False):
        self.env_dir = Path(env_dir).resolve()
        if schemas is None:
            schemas = json.loads((self.env_dir / "env.json").read_text(encoding="utf-8"))["tools"]
        self.schemas = {s["function"]["name"]: s for s in schemas}
        bad = [n for n in self.schemas if not n.isidentifier() or n.startswith("_")]
        if bad:
            raise ValueError(f"{self.env_dir}: tool names must be public Python identifiers, got {bad}")
        self._scratch = Path(tempfile.mkdtemp(prefix="dsv32-envtools-"))
        self.session = NotebookSession(self._scratch, ro_paths=[self.env_dir], timeout=timeout,
                                       memory_mb=memory_mb, max_procs=max_procs, unsafe=unsafe)

    def call(self, name: str, args: dict) -> ToolResult:
        if name not in self.schemas:
            raise ToolError(f"unknown environment tool {name!r}")
        if not self.session.alive:               # first call, or the kernel died: (re)load the module
            boot = (f"import json as _json, sys as _sys\n_sys.path.insert(0, {str(self.env_dir)!r})\n"
                    "import tools as _env_tools")
            r = self.session.execute(boot)
            if not r.ok:
                raise ToolError(f"the environment's tools failed to load: {_last_line(r.error)}")
        call = (f"print(_json.dumps(_env_tools.{name}(**_json.loads({json.dumps(args)!r})), "
                "ensure_ascii=False, default=str))")
        r = self.session.execute(call)
        if not r.ok:
            raise ToolError(_last_line(r.error))
        return ToolResult(True, r.output.strip())

    def close(self) -> None:
        self.session.close()
        shutil.rmtree(self._scratch, ignore_errors=True)


def _last_line(text: str | None) -> str:
    """The exception line of a traceback (what the model needs; the tool's internals are not its business)."""
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown failure"


# ------------------------------------------------------------------------------------------------ the toolbox


class Toolbox:
    """One trajectory's tools: scratch dir, notebook kernel, search index; `call()` dispatches by name.

    `unsafe=True` runs code without the sandbox (only on the user's explicit request); otherwise a machine
    without a working sandbox gets `SandboxUnavailable` at construction when code tools are enabled."""

    CODE_TOOLS = ("python", "bash")

    def __init__(self, scratch: Path | None = None, *, tools: Sequence[str] | None = None,
                 corpus: Sequence[tuple[str, str]] | BM25 | None = None, ro_paths: Sequence[Path] = (),
                 python_timeout: float = 120.0, shell_timeout: float = 120.0, memory_mb: int = 2048,
                 max_procs: int = 64, max_file_mb: int = 64, max_python_calls: int = MAX_PYTHON_CALLS,
                 env: EnvironmentTools | Path | None = None, unsafe: bool = False):
        names = list(tools) if tools is not None else [n for n in SCHEMAS if n != "search" or corpus is not None]
        unknown = [n for n in names if n not in SCHEMAS]
        if unknown:
            raise ValueError(f"unknown tool(s) {unknown}; known: {', '.join(SCHEMAS)}")
        if env is not None and not isinstance(env, EnvironmentTools):
            if not unsafe:
                require_sandbox()
            env = EnvironmentTools(Path(env), unsafe=unsafe)
        self.env = env
        clash = [n for n in (env.schemas if env is not None else {}) if n in names]
        if clash:
            env.close()
            raise ValueError(f"environment tool(s) {clash} clash with built-in tools; leave those out via tools=")
        if "search" in names and corpus is None:
            raise ValueError("the search tool needs a corpus (list of (title, text) or a BM25 index)")
        if not unsafe and any(n in self.CODE_TOOLS for n in names):
            require_sandbox()
        self.names = names
        self._own_scratch = scratch is None
        self.scratch = Path(tempfile.mkdtemp(prefix="dsv32-traj-")) if scratch is None else Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.ro_paths, self.unsafe = list(ro_paths), unsafe
        self.shell_timeout, self.memory_mb, self.max_procs, self.max_file_mb = (
            shell_timeout, memory_mb, max_procs, max_file_mb)
        self.max_python_calls = max_python_calls
        # one sandbox uid for the whole trajectory, so the notebook, shells and host writes share the files
        self.uid = None if unsafe else sandbox_uid()
        hand_over(self.scratch, self.uid)
        self.notebook = NotebookSession(self.scratch, ro_paths=self.ro_paths, timeout=python_timeout,
                                        memory_mb=memory_mb, max_procs=max_procs, max_file_mb=max_file_mb,
                                        unsafe=unsafe, uid=self.uid)
        self.index = corpus if isinstance(corpus, BM25) or corpus is None else BM25(corpus)
        self.python_calls = 0          # executions in the current thinking span
        self._dispatch: dict[str, Callable[[dict], ToolResult]] = {
            "python": self._python, "bash": self._bash, "read_file": self._read_file,
            "write_file": self._write_file, "search": self._search, "calculator": self._calculator}

    def schemas(self) -> list[dict]:
        """The built-in tools' schemas, then the environment's."""
        return [SCHEMAS[n] for n in self.names] + (list(self.env.schemas.values()) if self.env is not None else [])

    def new_thinking_span(self) -> None:
        """The agent loop calls this when a thinking span ends (a final answer, or a new user message)."""
        self.python_calls = 0

    def call(self, name: str, arguments: str | dict | None) -> ToolResult:
        """Run one tool call; every failure is an `ok=False` result for the model, never an exception."""
        env_tools = self.env.schemas if self.env is not None else {}
        if name not in self.names and name not in env_tools:
            available = ", ".join([*self.names, *env_tools])
            return ToolResult(False, f"Error: unknown tool {name!r}; available: {available}")
        try:
            if name in env_tools:
                assert self.env is not None
                return self.env.call(name, check_arguments(env_tools[name], arguments))
            args = check_arguments(SCHEMAS[name], arguments)
            return self._dispatch[name](args)
        except ToolError as e:
            return ToolResult(False, f"Error: {e}")
        except Exception as e:  # noqa: BLE001 - a tool bug must not kill the agent loop; the model sees it
            return ToolResult(False, f"Error: the {name} tool failed: {type(e).__name__}: {e}")

    # -------------------------------------------------------------------------------------------- the tools

    def _python(self, args: dict) -> ToolResult:
        if self.python_calls >= self.max_python_calls:
            raise ToolError(f"the python tool may run at most {self.max_python_calls} times within one thinking "
                            "span; finish reasoning from what you have")
        self.python_calls += 1
        r = self.notebook.execute(args["code"])
        parts = [r.output.rstrip("\n")] if r.output.strip() else []
        if r.result is not None:
            parts.append(r.result)
        if not r.ok:
            why = None if r.restarted else diagnose(1, r.error or "", False, self.notebook.limits)
            return ToolResult(False, "\n".join([*parts, f"Error: {r.error}"] + ([f"[sandbox: {why}]"] if why else [])))
        return ToolResult(True, "\n".join(parts) if parts else "(no output)")

    def _bash(self, args: dict) -> ToolResult:
        r = run_command(["bash", "-c", args["command"]], scratch=self.scratch, ro_paths=self.ro_paths,
                        timeout=self.shell_timeout, memory_mb=self.memory_mb, max_procs=self.max_procs,
                        max_file_mb=self.max_file_mb, unsafe=self.unsafe, uid=self.uid)
        text = "\n".join(s.rstrip("\n") for s in (r.stdout, r.stderr) if s.strip())
        if r.error is not None:
            return ToolResult(False, (text + "\n" if text else "") + f"Error: {r.error}")
        if r.returncode != 0:
            return ToolResult(False, (text + "\n" if text else "") + f"[exit status {r.returncode}]")
        return ToolResult(True, text or "(no output)")

    def _read_file(self, args: dict) -> ToolResult:
        offset, limit = args.get("offset", 0), min(args.get("limit", READ_CAP), READ_CAP)
        if offset < 0 or limit < 1:
            raise ToolError("offset must be >= 0 and limit >= 1")
        fd = open_in_scratch(self.scratch, args["path"], os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            data = f.read(4 * (offset + limit) + 4)         # UTF-8: at most 4 bytes per character
            size = os.fstat(f.fileno()).st_size
        decoded = data.decode("utf-8", errors="replace")
        text = decoded[offset:offset + limit]
        end = offset + len(text)
        more = end < len(decoded) or size > len(data)
        return ToolResult(True, text + (f"\n[... more after character {end}; read on with offset={end}]"
                                        if more else ""))

    def _write_file(self, args: dict) -> ToolResult:
        data = args["content"].encode()
        if len(data) > self.max_file_mb << 20:
            raise ToolError(f"content exceeds the {self.max_file_mb} MB file size limit")
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if args.get("append") else os.O_TRUNC)
        fd = open_in_scratch(self.scratch, args["path"], flags, make_dirs=True, uid=self.uid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return ToolResult(True, f"wrote {len(data)} bytes to {args['path']}")

    def _search(self, args: dict) -> ToolResult:
        assert self.index is not None
        k = args.get("k", 5)
        if not 1 <= k <= 10:
            raise ToolError("k must be between 1 and 10")
        hits = self.index.search(args["query"], k)
        if not hits:
            return ToolResult(True, "no results")
        return ToolResult(True, "\n\n".join(f"[{i + 1}] {h.title}\n{snippet(h.text, args['query'])}"
                                            for i, h in enumerate(hits)))

    def _calculator(self, args: dict) -> ToolResult:
        value = calculate(args["expression"])
        try:
            return ToolResult(True, repr(value))
        except ValueError:          # an int past Python's 4,300-digit conversion limit
            raise ToolError("the result has too many digits to print") from None

    # --------------------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop the notebook kernel (and with it every process of the trajectory); drop an owned scratch dir."""
        self.notebook.close()
        if self.env is not None:
            self.env.close()
        if self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> Toolbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
