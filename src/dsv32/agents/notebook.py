"""A stateful Python interpreter per trajectory: one sandboxed kernel process (`_kernel.py`) that keeps its
globals between calls, driven over pipes with one JSON line per cell (paper §3.2: a Jupyter-style tool with a
120 s limit per execution).

Timeouts are two-level: inside, SIGALRM interrupts the cell and the namespace survives; if the cell ignores
that (a C loop, a swallowed exception), the host kills the whole sandbox `grace` seconds later and the next
call starts a fresh kernel, telling the model its state is gone.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dsv32.agents.sandbox import CODE_MOUNT, OUTPUT_CAP, CappedReader, Limits, Sandboxed, diagnose, spawn

KERNEL = Path(__file__).with_name("_kernel.py")
_LINE_CAP = 4 * OUTPUT_CAP + 4096       # a reply holds output + result + traceback, each capped, JSON-escaped


@dataclass
class CellResult:
    ok: bool
    output: str             # everything the cell printed (stdout and stderr interleaved), capped
    result: str | None      # repr of the last expression's value, notebook style
    error: str | None       # traceback, or why the sandbox stopped the cell
    seconds: float
    restarted: bool = False  # the kernel died (killed, crashed, exited) during this cell: state is lost


class _Lines(threading.Thread):
    """Reads the kernel's reply pipe line by line into a queue; None marks EOF or a protocol violation."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.q = pipe, queue.Queue()
        self.start()

    def run(self) -> None:
        try:
            while line := self.pipe.readline(_LINE_CAP):
                if not line.endswith(b"\n"):         # over-long: a cell wrote to the pipe itself
                    break
                self.q.put(line)
        except (OSError, ValueError):
            pass
        self.q.put(None)


class NotebookSession:
    """A sandboxed kernel started on first use; `execute(code)` runs one cell against its namespace."""

    def __init__(self, scratch: Path, *, ro_paths: Sequence[Path] = (), timeout: float = 120.0, memory_mb: int = 2048,
                 max_procs: int = 64, max_file_mb: int = 64, cpu_s: int = 3600, grace: float = 3.0,
                 unsafe: bool = False, python: str | None = None, uid: int | None = None):
        self.scratch, self.ro_paths, self.unsafe, self.python, self.uid = Path(scratch), ro_paths, unsafe, python, uid
        # the kernel lives for the whole trajectory: its CPU limit is a session budget, not a per-cell one
        self.limits = Limits(timeout, memory_mb, max_procs, max_file_mb, cpu_s)
        self.grace = grace
        self.box: Sandboxed | None = None
        self._lines: _Lines | None = None
        self._stderr: CappedReader | None = None
        self.cells = 0

    @property
    def alive(self) -> bool:
        return self.box is not None and self.box.proc.poll() is None

    def start(self) -> None:
        exe = self.python or sys.executable
        kernel = str(KERNEL) if self.unsafe else f"{CODE_MOUNT}/kernel.py"
        self.box = spawn([exe, "-u", kernel], scratch=self.scratch, ro_paths=self.ro_paths, limits=self.limits,
                         code_files={f"{CODE_MOUNT}/kernel.py": KERNEL}, python=exe, unsafe=self.unsafe, uid=self.uid)
        self._lines, self._stderr = _Lines(self.box.proc.stdout), CappedReader(self.box.proc.stderr)
        hello = self._reply(30.0)
        if not isinstance(hello, dict) or not hello.get("ready"):
            why = self._death_note()
            self.close()
            raise RuntimeError(f"the notebook kernel did not start: {why}")

    def _reply(self, timeout: float) -> dict | str:
        """The kernel's next reply, or why there is none: "timeout", "eof" or "garbage"."""
        assert self._lines is not None
        try:
            line = self._lines.q.get(timeout=timeout)
        except queue.Empty:
            return "timeout"
        if line is None:
            return "eof"
        try:
            reply = json.loads(line)
        except ValueError:
            return "garbage"
        return reply if isinstance(reply, dict) else "garbage"

    def _death_note(self) -> str:
        if self.box is None:
            return "not started"
        if self.box.reason:
            return self.box.reason
        rc = self.box.proc.poll()
        err = self._stderr.text().strip()[-1000:] if self._stderr is not None else ""
        why = diagnose(None if rc is None or rc < 0 else rc, err, False, self.limits)
        return why or (f"exit status {rc}" + (f": {err}" if err else "") if rc is not None else "no reply")

    def execute(self, code: str, timeout: float | None = None) -> CellResult:
        """Run one cell. Never raises for anything the cell does; the result says what happened."""
        t0 = time.perf_counter()
        restarted_before = self.cells > 0 and not self.alive
        if not self.alive:
            self.close()
            self.start()
        assert self.box is not None and self.box.proc.stdin is not None
        limit = min(timeout if timeout is not None else self.limits.timeout, self.limits.timeout)
        self.cells += 1
        request = {"seq": self.cells, "code": code, "timeout": limit, "cap": OUTPUT_CAP, "reap": not self.unsafe}
        deadline = time.monotonic() + limit + self.grace
        try:
            self.box.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.box.proc.stdin.flush()
            with self.box.watch():                 # strays are reaped after each cell: idle needs no watching
                reply = self._reply(limit + self.grace)
                # a cell may write JSON into the reply pipe itself: only the kernel's reply to this one counts
                while isinstance(reply, dict) and reply.get("seq") != self.cells:
                    reply = self._reply(max(0.0, deadline - time.monotonic()))
        except (OSError, ValueError):
            reply = "eof"
        seconds = time.perf_counter() - t0
        note = "(the interpreter had been restarted before this call: earlier variables are gone)\n"
        if not isinstance(reply, dict) or "ok" not in reply:
            if reply == "timeout":
                why = f"timeout: the cell ignored the {limit:g} s interrupt and the interpreter was killed"
            elif reply == "eof":
                if self.box is not None:
                    self.box.kill()          # wait for the exit status before reading it
                why = f"the interpreter died: {self._death_note()}"
            else:
                why = "the cell wrote garbage into the kernel's reply pipe; the interpreter was killed"
            self.close()
            error = why + "; its state is lost and the next call starts a fresh one"
            return CellResult(False, "", None, (note if restarted_before else "") + error, seconds, restarted=True)
        error = reply.get("error")
        if error and restarted_before:
            error = note + error
        output = str(reply.get("output", ""))
        if restarted_before and not error:
            output = note + output
        return CellResult(bool(reply["ok"]), output, reply.get("result"), error, seconds)

    def close(self) -> None:
        if self.box is not None:
            self.box.close()
        self.box, self._lines, self._stderr = None, None, None

    def __enter__(self) -> NotebookSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
