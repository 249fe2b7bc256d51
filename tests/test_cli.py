"""The `dsv32` command line: dispatcher and `dsv32 generate` against a saved checkpoint, in a subprocess."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torch

from dsv32.bench import BENCHES
from dsv32.cli import COMMANDS
from dsv32.config import ModelConfig
from dsv32.model import Transformer

SRC = Path(__file__).resolve().parents[1] / "src"


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv32", *args], capture_output=True, text=True, timeout=timeout)


def test_help_and_unknown_command():
    r = run("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "serve" in r.stdout
    r = run("no-such-command")
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_help_lists_every_command_and_benchmark():
    """`dsv32 --help` names every command and every `dsv32 bench` benchmark, without importing any of them."""
    code = ("import sys; from dsv32.cli import main; main(['--help']); "
            "print(sorted(m for m in sys.modules if m.startswith(('dsv32.bench.', 'dsv32.train', 'dsv32.serve'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    *usage, imported = r.stdout.rstrip("\n").split("\n")
    assert imported == "[]"  # the help reads two tables, nothing else
    start = usage.index("commands:") + 1
    commands = usage[start : usage.index("", start)]
    benches = usage[usage.index("benchmarks (dsv32 bench NAME):") + 1 :]
    assert [line.split()[0] for line in commands] == list(COMMANDS)
    assert [line.split()[0] for line in benches] == list(BENCHES) and len(BENCHES) >= 4
    for name, (_, help_) in BENCHES.items():
        assert f"  {name:<10} {help_}" in benches


def test_command_tables_point_at_real_functions():
    """Every `module:function` of COMMANDS and BENCHES names a module file defining that function (read with
    `ast`, so an optional dependency of the module does not matter)."""
    for table in (COMMANDS, BENCHES):
        for name, (target, _) in table.items():
            mod, fn = target.split(":")
            base = SRC.joinpath(*mod.split("."))
            path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            assert path.is_file(), f"{name}: {target}: no {path}"
            defs = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
            assert fn in defs, f"{name}: {target}: {path} defines no {fn}()"


def test_generate_streams_from_a_saved_checkpoint(tmp_path):
    from dsv32.checkpoint import save_model

    cfg = ModelConfig.from_name("tiny").replace(vocab_size=129280)  # the bundled V3.2 tokenizer's ids fit
    torch.manual_seed(0)
    save_model(Transformer(cfg), tmp_path / "ckpt")
    args = ["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "Hello", "--max-new-tokens", "6"]
    a = run(*args, "--temperature", "0")
    assert a.returncode == 0, a.stderr
    assert "1 prompt tokens" not in a.stderr and "prompt tokens, " in a.stderr  # BOS + "Hello"
    assert "generated" in a.stderr
    b = run(*args, "--temperature", "0")
    assert a.stdout == b.stdout  # greedy is deterministic
    c = run(*args, "--temperature", "1.0", "--seed", "3")
    d = run(*args, "--temperature", "1.0", "--seed", "3")
    assert c.stdout == d.stdout  # seeded sampling is reproducible
    bad = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert bad.returncode != 0 and "missing" in bad.stderr
