"""The package has no import cycles, and nothing outside `dsv32.ops` rebinds an op.

Both checks read the source with `ast` and never import it, so they see imports inside functions too: a
function-local import hides a cycle from `import dsv32.x` but does not remove it (whichever module runs first
decides which half sees a partially initialised module).

The import graph (`import_graph`):

- nodes are the modules under `src/dsv32`; a package is its `__init__.py`;
- every `import` / `from ... import` statement in a module adds edges, wherever it stands (module level, in a
  function, under `if TYPE_CHECKING:`), relative imports resolved against the module's package; so does every
  `importlib.import_module("dsv32....")` call whose argument is a string literal;
- `import a.b.c` (or `from a.b.c import x`) makes Python run the `__init__` of `a`, then `a.b`, then `a.b.c`,
  so it adds an edge to each of them, **except** to packages that contain the importing module: their
  `__init__` has already run (or is running) before the module's own body starts, so the statement
  initialises nothing there. Without this rule every `dsv32.data.prepare -> dsv32.data.sources` import
  would look like a cycle through `dsv32.data`, which re-exports both;
- `from P import x` adds an edge to the module `P.x` when there is one; when `x` is a name, it reads `P`'s
  namespace, and the edge goes to `P` even when `P` contains the importer (a real hazard: if `P/__init__.py`
  imports the importer before it defines `x`, the import fails);
- an import of a `dsv32` name that is not a module file counts as an edge to its longest module prefix;
- the lazy name tables of `dsv32/__init__.py` (`_LAZY`), `cli.py` (`COMMANDS`) and `bench/__init__.py`
  (`BENCHES`) are the exempt entry points: they are data, and the `importlib.import_module(table[name])`
  calls that read them take no literal, so they add no edge. They must stay the only such tables.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dsv32"
OPS_DIR = SRC / PACKAGE / "ops"
TESTS = Path(__file__).resolve().parent

#: (importer, imported) -> the "file:line" of the first statement that makes the edge.
Edges = dict[tuple[str, str], str]


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `src/package`."""
    mods = {}
    for f in sorted((src / package).rglob("*.py")):
        parts = f.relative_to(src).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _contains(pkg: str, mod: str) -> bool:
    """`pkg` is `mod` itself or a package above it."""
    return mod == pkg or mod.startswith(pkg + ".")


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted `name` that is a module of the package (None: outside it)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _targets(importer: str, dotted: str, mods: dict[str, Path]) -> list[str]:
    """Modules whose body importing `dotted` may run from `importer`: the module and the packages above it,
    leaving out the packages that contain `importer` (already initialised before its body runs)."""
    resolved = _resolve(dotted, mods)
    if resolved is None:
        return []
    parts = resolved.split(".")
    chain = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return [m for m in chain if not _contains(m, importer)]


def _is_import_module(node: ast.Call) -> bool:
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id == "import_module"
    )


def import_graph(src: Path = SRC, package: str = PACKAGE) -> tuple[dict[str, set[str]], Edges]:
    """(module -> modules it imports, edge -> where) by the rules in the module docstring."""
    mods = module_files(src, package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    where: Edges = {}

    def add(m: str, targets: list[str], f: Path, line: int) -> None:
        for t in targets:
            if t != m:
                graph[m].add(t)
                where.setdefault((m, t), f"{f.relative_to(src.parent)}:{line}")

    for m, f in mods.items():
        own_pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), filename=str(f))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(m, _targets(m, alias.name, mods), f, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = own_pkg.split(".")
                    if node.level - 1 >= len(parts):
                        raise AssertionError(f"{f}:{node.lineno}: relative import beyond the top-level package")
                    base = ".".join(parts[: len(parts) - (node.level - 1)])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if _resolve(base, mods) is None:
                    continue  # another distribution
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in mods:  # a submodule: its chain (P itself too unless P contains m)
                        add(m, _targets(m, sub, mods), f, node.lineno)
                    else:  # a name of P's namespace: P's __init__ must have defined it
                        add(m, [*_targets(m, base, mods), str(_resolve(base, mods))], f, node.lineno)
            elif isinstance(node, ast.Call) and _is_import_module(node) and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    add(m, _targets(m, arg.value, mods), f, node.lineno)
    return graph, where


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def shortest_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the first module of the component: [a, b, ..., a]."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"{comp} is not strongly connected")


def describe_cycles(graph: dict[str, set[str]], where: Edges) -> list[str]:
    """One line per cycle: every module of the component, then one cycle with the line making each edge."""
    lines = []
    for comp in strongly_connected(graph):
        cyc = shortest_cycle(graph, comp)
        hops = " -> ".join(f"{a} ({where[a, b]})" for a, b in zip(cyc, cyc[1:])) + f" -> {cyc[0]}"
        lines.append(f"cycle among {', '.join(comp)}:\n    {hops}")
    return lines


# -------------------------------------------------------------------------------------------- the checker


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_checker_finds_hidden_and_dynamic_cycles(tmp_path: Path) -> None:
    """The rules above on a small package: function-local, relative and import_module edges count; the
    importer's own packages do not; `from P import name` does."""
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\nTABLE = {'x': 'pkg.lazy'}\n",
        "pkg/a.py": "def f():\n    from .b import g\n    return g()\n",
        "pkg/b.py": "import importlib\n\ndef g():\n    return importlib.import_module('pkg.a')\n",
        "pkg/lazy.py": "import pkg\n",
        "pkg/sub/__init__.py": "from pkg.sub.one import X\n\ndef h():\n    from pkg.sub import three\n",
        "pkg/sub/one.py": "from pkg.sub import two\nimport os.path\nX = 1\n",
        "pkg/sub/two.py": "import pkg.sub.one\nfrom . import one\n",
        "pkg/sub/three.py": "from pkg.sub import X\n",
        "pkg/user.py": "from pkg.sub.two import nothing\n",
    })
    graph, where = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}  # function-local + import_module
    assert graph["pkg"] == {"pkg.a"}  # the TABLE is data, not an edge
    assert graph["pkg.lazy"] == set()  # its own package: already initialised
    assert graph["pkg.sub.one"] == {"pkg.sub.two"} and graph["pkg.sub.two"] == {"pkg.sub.one"}
    assert graph["pkg.sub.three"] == {"pkg.sub"}  # a name from the __init__ of its own package
    assert graph["pkg.sub"] == {"pkg.sub.one", "pkg.sub.three"}
    assert graph["pkg.user"] == {"pkg.sub", "pkg.sub.two"}  # outside pkg.sub: its __init__ runs first
    assert where["pkg.a", "pkg.b"].endswith("a.py:2")
    comps = [["pkg.a", "pkg.b"], ["pkg.sub", "pkg.sub.three"], ["pkg.sub.one", "pkg.sub.two"]]
    assert strongly_connected(graph) == comps
    lines = describe_cycles(graph, where)
    assert any("pkg.a (" in s and "pkg.b (" in s for s in lines)


def test_checker_on_an_acyclic_package(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.core import A\nfrom pkg.io import B\n",
        "pkg/core.py": "A = 1\n",
        "pkg/io.py": "from .core import A\nB = A\n",
        "pkg/cli.py": "import importlib\n\ndef main(name):\n    return importlib.import_module(name)\n",
    })
    graph, _ = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.core", "pkg.io"}, "pkg.core": set(), "pkg.io": {"pkg.core"}, "pkg.cli": set()}
    assert strongly_connected(graph) == []


# ---------------------------------------------------------------------------------------------- dsv32


def test_graph_sees_the_package() -> None:
    """The real graph has the edges we know of (guards against a checker that silently finds nothing)."""
    graph, _ = import_graph()
    assert {"dsv32", "dsv32.cli", "dsv32.data", "dsv32.data.prepare", "dsv32.ops"} <= set(graph)
    assert "dsv32.data" in graph["dsv32.train.trainer"]
    assert "dsv32.data.sources" in graph["dsv32.data.prepare"] and "dsv32.data" not in graph["dsv32.data.prepare"]
    assert graph["dsv32"] == {"dsv32.config"}  # `_LAZY` is exempt


def test_no_import_cycles() -> None:
    graph, where = import_graph()
    cycles = describe_cycles(graph, where)
    assert not cycles, "import cycles in src/dsv32 (edge sources in parentheses):\n" + "\n".join(cycles)


def _ops_names(tree: ast.AST) -> set[str]:
    """Local names bound to `dsv32.ops` (`from dsv32 import ops as x`, `import dsv32.ops as x`), plus `ops`."""
    names = {"ops"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == PACKAGE and not node.level:
            names |= {a.asname or a.name for a in node.names if a.name == "ops"}
        elif isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == f"{PACKAGE}.ops" and a.asname}
    return names


def _is_ops(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in names
    return (isinstance(node, ast.Attribute) and node.attr == "ops" and isinstance(node.value, ast.Name)
            and node.value.id == PACKAGE)


def ops_rebindings(path: Path) -> list[str]:
    """`file:line ops.<name>` for each assignment to an attribute of `dsv32.ops` in `path` (plain, augmented,
    annotated or inside a tuple target; and `setattr(ops, ...)`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = _ops_names(tree)
    found = []

    def targets(node: ast.AST) -> list[ast.AST]:
        if isinstance(node, ast.Assign):
            return list(node.targets)
        if isinstance(node, ast.AugAssign | ast.AnnAssign):
            return [node.target]
        return []

    for node in ast.walk(tree):
        todo = targets(node)
        while todo:
            t = todo.pop()
            if isinstance(t, ast.Tuple | ast.List):
                todo += t.elts
            elif isinstance(t, ast.Starred):
                todo.append(t.value)
            elif isinstance(t, ast.Attribute) and _is_ops(t.value, names):
                found.append(f"{path}:{t.lineno} ops.{t.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and node.args and _is_ops(node.args[0], names)):
            found.append(f"{path}:{node.lineno} setattr(ops, ...)")
    return sorted(found, key=lambda s: int(s.split(" ")[0].rpartition(":")[2]))


def test_ops_rebinding_detector(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("from dsv32 import ops as O\nimport dsv32\n\ndef f(fn):\n    O.indexer_topk = fn\n"
                 "    dsv32.ops.sparse_gqa, x = fn, 1\n    ops.n += 1\n    setattr(O, 'k', fn)\n"
                 "    obj.ops = 1\n    ops_table = {}\n")
    assert [s.split(" ", 1)[1] for s in ops_rebindings(f)] == [
        "ops.indexer_topk", "ops.sparse_gqa", "ops.n", "setattr(ops, ...)"
    ]


@pytest.mark.parametrize("root", [SRC / PACKAGE, TESTS], ids=["src", "tests"])
def test_no_ops_rebinding_outside_ops(root: Path) -> None:
    """Ops are chosen through `dsv32.ops`' own seams (`set_backend`, `ops.override`), never by assigning
    to the module from outside: such a patch leaks into every other caller in the process."""
    found = [s for f in sorted(root.rglob("*.py")) if OPS_DIR not in f.parents for s in ops_rebindings(f)]
    assert not found, "assignments to dsv32.ops attributes outside src/dsv32/ops/:\n" + "\n".join(found)
