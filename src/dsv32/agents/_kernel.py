"""The notebook kernel: a long-lived Python process INSIDE the sandbox that keeps one namespace across cells
(the stateful Jupyter-style tool of the paper's agent prompts, §3.2 / Appendix B).

Standard library only, and no dsv32 import: the host binds this file read-only into the sandbox and runs it
with the sandbox's interpreter. Protocol: one JSON object per line. The host sends
`{"seq", "code", "timeout", "cap", "reap"}` on stdin; the kernel answers `{"seq", "ok", "output", "result",
"error"}` on
the pipe that was its stdout. While a cell runs, file descriptors 1 and 2 point at a private temporary file,
so output from `print`, C extensions and child processes is all captured, in order, and capped.
"""

import ast
import json
import linecache
import os
import signal
import sys
import tempfile
import time
import traceback


class CellTimeout(Exception):
    """Raised inside the cell by SIGALRM when it runs past its time (the state survives)."""


_limit = [0.0]      # the running cell's time limit, for the message


def _on_alarm(signum, frame):
    raise CellTimeout(f"the cell ran past its {_limit[0]:g} s limit and was interrupted (earlier state is kept)")


def _read_capped(fd: int, cap: int) -> str:
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, cap) if size else b""
    text = data.decode("utf-8", errors="replace")
    return text + (f"\n[... output truncated: {size - cap} more bytes]" if size > cap else "")


def _reap_strays(me: int) -> None:
    """Kill every other process in the sandbox: cells' children never outlive the cell (a fork bomb's
    survivors would otherwise keep the process limit exhausted). Only ever called inside the sandbox's own
    PID namespace, where kill(-1) reaches nothing outside it."""
    for _ in range(20):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, me)]
        if not others:
            return
        time.sleep(0.01)            # killed processes linger as zombies until their parent reaps them


def _in_sandbox() -> bool:
    """True inside bubblewrap's PID namespace (its init is PID 1); never reap on a host."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0")[0]) == b"bwrap"
    except OSError:
        return False


def run_cell(code: str, ns: dict, n: int, timeout: float, cap: int) -> dict:
    name = f"<cell {n}>"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)   # tracebacks show the source
    out = tempfile.TemporaryFile(dir="/tmp")
    fd = out.fileno()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    reply = {"ok": True, "result": None, "error": None}
    _limit[0] = timeout
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        tree = ast.parse(code, name)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):       # notebook style: echo the last value
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, name, "exec"), ns)
        if last is not None:
            value = eval(compile(last, name, "eval"), ns)
            if value is not None:
                text = repr(value)
                reply["result"] = text[:cap] + (f"... [{len(text) - cap} more characters]" if len(text) > cap else "")
    except BaseException as e:  # noqa: B036 - everything the cell raises, SystemExit included, is its result
        signal.setitimer(signal.ITIMER_REAL, 0)
        te = traceback.TracebackException.from_exception(e)
        te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename != __file__])  # kernel's own
        reply["ok"], reply["error"] = False, "".join(te.format())[-cap:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # a closed or replaced stream must not take the kernel down
            pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    reply["output"] = _read_capped(fd, cap)
    out.close()
    return reply


def main() -> None:
    me = os.getpid()
    proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):               # cells see no stdin, and nothing they print reaches the protocol pipe
        os.dup2(null, fd)           # (fd 2 stays the host's stderr drain, for the kernel's own last words)
    os.close(null)
    signal.signal(signal.SIGALRM, _on_alarm)
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    proto_out.write(json.dumps({"ready": True, "pid": me}) + "\n")
    proto_out.flush()
    n = 0
    for line in proto_in:
        req = json.loads(line)
        n += 1
        reply = run_cell(req["code"], ns, n, float(req["timeout"]), int(req["cap"]))
        if os.getpid() != me:       # a child the cell forked finished: it must never answer
            os._exit(0)
        if req.get("reap") and _in_sandbox():
            _reap_strays(me)
        reply["seq"] = req.get("seq")
        proto_out.write(json.dumps(reply) + "\n")
        proto_out.flush()


if __name__ == "__main__":
    main()
