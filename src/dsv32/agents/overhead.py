"""Sandbox self-check: `python -m dsv32.agents.overhead [--n 20]` says whether the sandbox works here and measures
the per-call overhead it adds (docs/agents.md, "Sandbox").

Kept apart from ``sandbox.py`` because it also times the notebook kernel, and ``notebook.py`` builds on ``sandbox.py``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from dsv32.agents.notebook import NotebookSession
from dsv32.agents.sandbox import require_sandbox, run_command, run_python, sandbox_available, sandbox_env


def _median_seconds(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


def measure_overhead(n: int = 20) -> dict[str, float]:
    """Median wall-clock seconds of trivial calls, sandboxed and not: the difference is the sandbox's cost."""
    require_sandbox()

    true = shutil.which("true") or "/bin/true"
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dsv32-bench-") as tmp:
        scratch = Path(tmp)
        env = sandbox_env(scratch)
        out["bare `true`"] = _median_seconds(lambda: subprocess.run([true], env=env, check=True), n)
        out["sandboxed `true` (run_command)"] = _median_seconds(lambda: run_command([true], scratch=scratch), n)
        out["bare `python -c pass`"] = _median_seconds(
            lambda: subprocess.run([sys.executable, "-c", "pass"], env=env, cwd=scratch, check=True), n)
        out["run_python('pass')"] = _median_seconds(lambda: run_python("pass", scratch=scratch), n)
        t0 = time.perf_counter()
        nb = NotebookSession(scratch)
        nb.start()
        out["notebook start"] = time.perf_counter() - t0
        out["notebook cell 'pass'"] = _median_seconds(lambda: nb.execute("pass"), n)
        nb.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv32.agents.overhead",
                                 description="check the agents' sandbox and measure its per-call overhead")
    ap.add_argument("--n", type=int, default=20, help="calls per median (default 20)")
    args = ap.parse_args(argv)
    ok, why = sandbox_available()
    print(f"sandbox: {'yes' if ok else 'NO'} - {why}")
    if not ok:
        return 1
    for name, s in measure_overhead(args.n).items():
        print(f"{name:34s} {s * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
