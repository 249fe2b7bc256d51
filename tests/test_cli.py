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


# ============================================================================================ --device / --dtype

NO_CUDA = not torch.cuda.is_available()


def _tiny_checkpoint(path: Path) -> Path:
    from dsv32.checkpoint import save_model

    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.from_name("tiny").replace(vocab_size=129280)), path)  # bundled tokenizer
    return path


def test_resolve_placement_defaults_and_errors():
    import pytest

    from dsv32.registry import resolve_placement

    if NO_CUDA:
        assert resolve_placement() == (torch.device("cpu"), torch.float32)
        with pytest.raises(ValueError, match="--device 'cuda': CUDA is not available"):
            resolve_placement("cuda")
    else:
        assert resolve_placement() == (torch.device("cuda"), torch.bfloat16)
    assert resolve_placement("cpu", "float32") == (torch.device("cpu"), torch.float32)
    with pytest.warns(RuntimeWarning, match="slower than float32"):
        assert resolve_placement("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="--device 'tpu'"):
        resolve_placement("tpu")
    with pytest.raises(ValueError, match="--dtype 'int4'"):
        resolve_placement("cpu", "int4")


def test_every_model_command_parses_device_and_dtype():
    """Each command's own parser takes the two flags (an unknown flag would be "unrecognized arguments")."""
    from dsv32.evals import passkey, ppl, retrieval, tasks
    from dsv32.train import sparsify

    flags = ["--device", "cpu", "--dtype", "float32"]
    for build, argv in ((ppl.build_parser, ["--model", "m", "--context", "8"]),
                        (passkey.build_parser, ["--model", "m", "--context", "8"]),
                        (retrieval.build_parser, ["--model", "m", "--context", "8"]),
                        (tasks.build_parser, ["--model", "m", "--task", "t"]),
                        (sparsify.build_parser, ["--stage", "1", "--model", "m", "--out", "o"])):
        args = build().parse_args([*argv, *flags])
        assert (args.device, args.dtype) == ("cpu", "float32"), build.__module__
    assert sparsify.build_parser().parse_args(["--stage", "1", "--model", "m", "--out", "o"]).dtype == "float32"
    assert ppl.build_parser().parse_args(["--model", "m", "--context", "8"]).dtype == "auto"


def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    import pytest

    from dsv32 import evals, generate
    from dsv32.serve import cli as serve_cli
    from dsv32.train import sparsify

    if not NO_CUDA:
        pytest.skip("this machine has CUDA")
    for fn, argv in ((generate.main, ["--model", "m", "--prompt", "x"]), (serve_cli.cli_main, ["--model", "m"]),
                     (sparsify.cli_main, ["--stage", "1", "--model", "m", "--out", str(tmp_path)])):
        with pytest.raises(SystemExit) as e:
            fn([*argv, "--device", "cuda"])
        assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err, fn.__module__
    for name in ("ppl", "passkey", "retrieval", "tasks"):
        assert evals.cli_main([name, "--model", "m", "--context", "8", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["--model", "m", "--prompt", "x", "--dtype", "int4"])  # not a choice


def test_generate_and_eval_run_with_device_and_dtype(tmp_path, capsys):
    """`generate` and `eval ppl` on a tiny checkpoint with --device cpu; the ppl in float32 and in bfloat16 (warned:
    slow on CPUs) are close but different, so the dtype reaches the model."""
    import json

    import pytest

    from dsv32 import evals, generate

    ckpt = str(_tiny_checkpoint(tmp_path / "ckpt"))
    argv = ["--model", ckpt, "--prompt", "Hello", "--max-new-tokens", "3", "--temperature", "0"]
    assert generate.main([*argv, "--device", "cpu", "--dtype", "float32"]) == 0
    assert "3 generated" in capsys.readouterr().err
    with pytest.raises(SystemExit), pytest.warns(RuntimeWarning):  # the CPU weight formats pack fp32 weights only
        generate.main([*argv, "--dtype", "bfloat16", "--weights-format", "int8"])
    assert "--weights-format int8 packs fp32 weights" in capsys.readouterr().err

    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north"]
    for src in ("prose", "verse"):
        d = tmp_path / "raw" / src
        d.mkdir(parents=True)
        for i in range(6):
            (d / f"doc{i}.txt").write_text("\n".join(" ".join(words[(i + j + w) % 8] for w in range(9))
                                                     for j in range(60)))
    ppl_of = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"ppl-{dtype}.json"
        with pytest.warns(RuntimeWarning) if dtype == "bfloat16" else _no_warning():
            assert evals.cli_main(["ppl", "--model", ckpt, "--context", "32", "--num-seqs", "1", "--text",
                                   str(tmp_path / "raw"), "--device", "cpu", "--dtype", dtype, "--json",
                                   str(out)]) == 0
        r = json.loads(out.read_text())
        assert (r["settings"]["device"], r["settings"]["dtype"]) == ("cpu", dtype)
        ppl_of[dtype] = r["results"]["ppl"]
    assert ppl_of["float32"] != ppl_of["bfloat16"]
    assert ppl_of["bfloat16"] == pytest.approx(ppl_of["float32"], rel=0.05)


def _no_warning():
    import contextlib

    return contextlib.nullcontext()
