"""The `dsv32` command line: dispatcher and `dsv32 generate` against a saved checkpoint, in a subprocess."""

from __future__ import annotations

import subprocess
import sys

import torch

from dsv32.config import ModelConfig
from dsv32.model import Transformer


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv32", *args], capture_output=True, text=True, timeout=timeout)


def test_help_and_unknown_command():
    r = run("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "serve" in r.stdout
    r = run("no-such-command")
    assert r.returncode == 2 and "unknown command" in r.stderr


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
