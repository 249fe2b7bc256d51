"""Run untrusted code (model-written cells, shell commands, a synthesized environment's `tools.py`, its
solutions and verifiers) so that it cannot hurt the machine (issue 13, paper §3.3).

Isolation is bubblewrap (`bwrap`): a fresh mount namespace that sees only read-only system directories, the
Python installation and the caller's `ro_paths`, with the trajectory's scratch directory as the one writable
place besides a small tmpfs `/tmp`; no network (`--unshare-net`: only a loopback of its own), its own PID
namespace (everything dies with the sandbox), no `$HOME`, `/root`, `/work` or `/etc` secrets.

The process limit needs a non-root uid: the kernel exempts uid 0 from `RLIMIT_NPROC` even inside a user
namespace whose uid 65534 maps back to root, which is what `bwrap --unshare-user` gives a root caller. So:
- as root (this machine, CI): bwrap without a user namespace, and `setpriv` drops the payload to a fresh
  random uid with no capabilities and `no_new_privs`; `RLIMIT_NPROC` then counts exactly this sandbox's
  processes (the uid is unique to it), and the scratch directory is handed to that uid;
- as an ordinary user: `bwrap --unshare-user`; the kernel counts `RLIMIT_NPROC` per user namespace.
Either way `prlimit` sets the address-space, CPU-time, file-size and process limits inside the sandbox, the
host enforces a wall-clock timeout by killing the sandbox (its PID namespace takes every descendant with it),
and each output stream is capped so a flood cannot exhaust the host's memory.

Without a working sandbox, `run_python`/`run_command` raise `SandboxUnavailable` unless `unsafe=True` (then
only the rlimits and the timeout apply).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT_CAP = 64 * 1024          # bytes kept per stream; the rest is drained and counted
SANDBOX_TMP_MB = 64             # size of the sandbox's private /tmp and /dev/shm (tmpfs, i.e. host memory)
CODE_MOUNT = "/sandbox"         # where code files the host hands in appear, read-only
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# a few /etc entries programs need (alternatives symlinks, the loader cache); never /etc as a whole
_ETC_FILES = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_PROTECTED = _SYSTEM_DIRS + ("/etc", "/proc", "/sys", "/dev", "/boot")
_UNSAFE_HINT = "pass unsafe=True to run code WITHOUT isolation (rlimits and timeout only), only if you trust it"


class SandboxUnavailable(RuntimeError):
    """No working sandbox on this machine and the caller did not ask for unsafe execution."""


@dataclass
class ExecResult:
    returncode: int | None      # None if the host killed it (timeout)
    stdout: str
    stderr: str
    timed_out: bool
    error: str | None           # why the sandbox stopped it (timeout, memory, process limit, file size, ...) or None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None


@dataclass(frozen=True)
class Limits:
    """Per-sandbox resource limits. `cpu_s` defaults to the wall-clock timeout (+1 s); `total_memory_mb`
    (all the sandbox's processes together, resident, watched by the host) to twice `memory_mb`."""
    timeout: float = 120.0
    memory_mb: int = 1024       # RLIMIT_AS of every process
    max_procs: int = 64         # processes + threads of the sandbox's uid
    max_file_mb: int = 64       # RLIMIT_FSIZE: largest file a process may write
    cpu_s: int | None = None
    total_memory_mb: int | None = None

    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else int(self.timeout) + 1

    def total_memory(self) -> int:
        return (self.total_memory_mb if self.total_memory_mb is not None else 2 * self.memory_mb) << 20


# ---------------------------------------------------------------------------------------------------------
# probing


def _tools() -> dict[str, str | None]:
    return _which(os.environ.get("PATH", os.defpath))


@functools.lru_cache(maxsize=4)
def _which(path: str) -> dict[str, str | None]:
    return {name: shutil.which(name, path=path) for name in ("bwrap", "setpriv", "prlimit")}


@functools.lru_cache(maxsize=1)
def sandbox_available() -> tuple[bool, str]:
    """(works?, why not): runs one trivial command through the real sandbox once per process."""
    if sys.platform != "linux":
        return False, f"bubblewrap sandboxes need Linux, this is {sys.platform}"
    missing = [n for n, p in _tools().items() if p is None and (n != "setpriv" or os.geteuid() == 0)]
    if missing:
        return False, (f"missing {', '.join(missing)} (Debian: apt-get install -y bubblewrap util-linux)")
    with tempfile.TemporaryDirectory(prefix="dsv32-probe-") as tmp:
        try:
            res = run_command([shutil.which("true") or "/bin/true"], scratch=Path(tmp), timeout=20.0,
                              _probe=True)
        except OSError as e:
            return False, f"bwrap could not start: {e}"
    if res.returncode != 0:
        why = (res.stderr or res.stdout).strip()[-400:] or f"exit status {res.returncode}"
        return False, f"bwrap failed to create the sandbox (namespaces not permitted here?): {why}"
    return True, "bubblewrap sandbox works" + (" (root: fresh unprivileged uid per sandbox)"
                                               if os.geteuid() == 0 else " (user namespace)")


def require_sandbox() -> None:
    ok, why = sandbox_available()
    if not ok:
        raise SandboxUnavailable(f"no working sandbox: {why}; {_UNSAFE_HINT}")


# ---------------------------------------------------------------------------------------------------------
# the bwrap command line


def python_roots(python: str | os.PathLike | None = None) -> list[Path]:
    """Directories a Python interpreter needs: its installation and, for a venv, the base one it points to."""
    exe = Path(python if python is not None else sys.executable)
    roots = {Path(os.path.realpath(exe)).parent.parent}
    cfg = exe.parent.parent / "pyvenv.cfg"
    if cfg.is_file():
        roots.add(exe.parent.parent.resolve())
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                roots.add(Path(value.strip()).resolve().parent)
    return sorted(roots)


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@functools.lru_cache(maxsize=1)
def _system_mounts() -> tuple[list[str], list[str]]:
    """bwrap arguments exposing the system directories read-only, and the paths they cover."""
    args: list[str] = []
    covered: list[str] = []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
        covered.append(d)
    for e in _ETC_FILES:
        if os.path.exists(e):
            args += ["--ro-bind", e, e]
            covered.append(e)
    return args, covered


def _bwrap_argv(argv: Sequence[str], *, scratch: Path, ro_paths: Sequence[Path], limits: Limits, uid: int | None,
                code_files: dict[str, Path], python: str | None) -> list[str]:
    """The full command: bwrap [namespaces, mounts] [setpriv to `uid`] prlimit [limits] -- argv."""
    tools = _tools()
    cmd = [tools["bwrap"] or "bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    if uid is None:                                   # unprivileged caller: a user namespace
        cmd += ["--unshare-user", "--disable-userns"]
    else:                                             # root: keep just enough to let setpriv drop to `uid`
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    system_args, covered = _system_mounts()
    cmd += system_args
    tmpfs = ["--perms", "1777", "--size", str(SANDBOX_TMP_MB << 20), "--tmpfs"]     # small, world-writable
    cmd += ["--proc", "/proc", "--dev", "/dev", *tmpfs, "/dev/shm", *tmpfs, "/tmp"]
    # binds, shallow first so nested ones land on top; the scratch dir is the only writable one
    binds = [(os.path.realpath(p), "--ro-bind") for p in [*python_roots(python), *ro_paths]]
    binds.append((os.path.realpath(scratch), "--bind"))
    binds.sort(key=lambda b: b[0].count("/"))
    mounted = [*covered, "/proc", "/dev"]
    made: set[str] = {"/", "/tmp"}
    for path, how in binds:
        if how == "--ro-bind" and _under(path, _SYSTEM_DIRS):
            continue                                  # already visible read-only
        parts = path.split("/")[1:-1]
        for i in range(1, len(parts) + 1):            # mount points' parents: world-traversable, not 0700
            parent = "/" + "/".join(parts[:i])
            if parent in made or _under(parent, mounted):
                continue
            cmd += ["--perms", "0755", "--dir", parent]
            made.add(parent)
        cmd += [how, path, path]
        mounted.append(path)
    cmd += ["--perms", "0755", "--dir", CODE_MOUNT]
    for dest, src in code_files.items():
        cmd += ["--ro-bind", str(src), dest]
    cmd += ["--chdir", os.path.realpath(scratch)]
    if uid is not None:
        cmd += [tools["setpriv"] or "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    cpu = limits.cpu_seconds()
    cmd += [tools["prlimit"] or "prlimit", f"--as={limits.memory_mb << 20}", f"--cpu={cpu}:{cpu + 1}",
            f"--fsize={limits.max_file_mb << 20}", f"--nproc={limits.max_procs}", "--core=0", "--"]
    return cmd + list(argv)


def sandbox_env(scratch: Path) -> dict[str, str]:
    """The whole environment a sandboxed process sees (nothing is inherited from the host)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(scratch), "TMPDIR": "/tmp", "USER": "sandbox",
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(scratch), "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp/matplotlib",
        # BLAS/OpenMP thread pools count against the process limit and the address space
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


def sandbox_uid() -> int | None:
    """As root: a fresh uid no other process uses, so RLIMIT_NPROC counts only this sandbox. As a user: None
    (the user namespace maps the caller's own uid)."""
    return 2_000_000 + secrets.randbelow(1_000_000_000) if os.geteuid() == 0 else None


def check_scratch(path: str | os.PathLike) -> Path:
    """The scratch dir's real path; refuses a missing dir, `/`, the home dir and system directories (it is
    made writable to, and owned by, the sandbox)."""
    real = Path(os.path.realpath(path))
    if not real.is_dir():
        raise FileNotFoundError(f"scratch directory {path} does not exist")
    if str(real) in ("/", os.path.realpath(Path.home())) or _under(str(real), _PROTECTED):
        raise ValueError(f"scratch directory {real} is a system or home directory; give each trajectory its own")
    return real


def hand_over(path: Path, uid: int | None) -> None:
    """Give the sandbox's uid ownership of `path` and everything under it (root mode; symlinks not followed)."""
    if uid is None:
        return
    path = check_scratch(path)
    os.lchown(path, uid, uid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, uid)


# ---------------------------------------------------------------------------------------------------------
# spawning and collecting


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _pss(pid: int) -> int:
    """Proportional set size in bytes (resident size where the kernel predates smaps_rollup, Linux 4.14)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) << 10
        return 0
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            raise
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE


def tree_memory(root: int) -> int:
    """Bytes of memory the process tree under `root` uses: the sum of proportional set sizes (PSS, so pages a
    fork shares are counted once), from /proc; processes that vanish mid-walk count as 0."""
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            total += _pss(pid)
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


@dataclass
class Sandboxed:
    """A started sandboxed process; `kill()` takes the whole sandbox down. `watch()` runs the host's memory
    watchdog: RLIMIT_AS bounds each process, but `max_procs` processes could each fill theirs, so the host
    also sums the tree's memory every `period` seconds and kills the sandbox past `limits.total_memory()`."""
    proc: subprocess.Popen
    uid: int | None
    limits: Limits = field(default_factory=Limits)
    reason: str | None = None           # why the host killed it (memory watchdog), if it did
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @contextlib.contextmanager
    def watch(self, period: float = 0.05):
        stop = threading.Event()
        limit = self.limits.total_memory()

        def run() -> None:
            while not stop.wait(period):
                used = tree_memory(self.proc.pid)
                if used > limit:
                    self.reason = (f"memory limit: the sandbox's processes together used {used >> 20} MB, "
                                   f"over {limit >> 20} MB")
                    self.kill()
                    return
        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:  # bwrap leads its own process group; its PID namespace takes every descendant with it
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        while self.cleanup:
            self.cleanup.pop()()


def _unsafe_preexec(limits: Limits) -> Callable[[], None]:
    def apply() -> None:
        cpu = limits.cpu_seconds()
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_mb << 20,) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def spawn(argv: Sequence[str], *, scratch: Path, ro_paths: Sequence[Path] = (), limits: Limits = Limits(),
          code_files: dict[str, Path] | None = None, python: str | None = None, unsafe: bool = False,
          stdin_pipe: bool = True, uid: int | None = None, _probe: bool = False) -> Sandboxed:
    """Start `argv` in a sandbox with cwd `scratch` (pipes on stdin/stdout/stderr). `code_files` maps paths
    under `CODE_MOUNT` to host files bound read-only there; with `unsafe=True` argv runs unisolated and must
    name the host files instead. `uid` (root mode, from `sandbox_uid()`) lets several sandboxes of one
    trajectory share the scratch dir's ownership; the caller has then handed the dir over already."""
    scratch = check_scratch(scratch)
    env = sandbox_env(scratch.resolve())
    pipes = dict(stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, start_new_session=True, close_fds=True, env=env)
    if unsafe:
        proc = subprocess.Popen(list(argv), cwd=scratch, preexec_fn=_unsafe_preexec(limits), **pipes)
        return Sandboxed(proc, None, limits)
    if not _probe:
        require_sandbox()
    if os.geteuid() != 0:
        uid = None
    elif uid is None:
        uid = sandbox_uid()
        hand_over(scratch, uid)
    cmd = _bwrap_argv(argv, scratch=scratch, ro_paths=[Path(p) for p in ro_paths], limits=limits, uid=uid,
                      code_files=code_files or {}, python=python)
    return Sandboxed(subprocess.Popen(cmd, **pipes), uid, limits)


class CappedReader(threading.Thread):
    """Reads a pipe to EOF, keeping the first `cap` bytes and counting the rest."""

    def __init__(self, pipe, cap: int = OUTPUT_CAP):
        super().__init__(daemon=True)
        self.pipe, self.cap, self.buf, self.dropped = pipe, cap, bytearray(), 0
        self.start()

    def run(self) -> None:
        try:
            while chunk := self.pipe.read1(65536):
                keep = max(0, self.cap - len(self.buf))
                self.buf += chunk[:keep]
                self.dropped += len(chunk) - min(keep, len(chunk))
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        out = self.buf.decode("utf-8", errors="replace")
        return out + (f"\n[... output truncated: {self.dropped} more bytes]" if self.dropped else "")


def diagnose(returncode: int | None, stderr: str, timed_out: bool, limits: Limits) -> str | None:
    """Why the sandbox stopped a process, from its exit status and last words (None: it ended on its own)."""
    if timed_out:
        return f"timeout: killed after {limits.timeout:g} s wall-clock"
    if returncode == 0 or returncode is None:
        return None
    tail = stderr[-2000:]
    if returncode == 128 + signal.SIGXCPU:
        return f"CPU time limit: killed after {limits.cpu_seconds()} s of CPU"
    if returncode == 128 + signal.SIGXFSZ or "File too large" in tail:
        return f"file size limit: a file may not exceed {limits.max_file_mb} MB"
    if "No space left on device" in tail:
        return f"space limit: the sandbox's /tmp and /dev/shm hold {SANDBOX_TMP_MB} MB each"
    if "MemoryError" in tail or "Cannot allocate memory" in tail or "std::bad_alloc" in tail:
        return f"memory limit: the address space may not exceed {limits.memory_mb} MB"
    if "Resource temporarily unavailable" in tail or "BlockingIOError" in tail or "fork: " in tail:
        return f"process limit: at most {limits.max_procs} processes/threads"
    if returncode == 128 + signal.SIGKILL:
        return "killed (SIGKILL; probably a resource limit)"
    if returncode == 128 + signal.SIGSEGV:
        return "crashed (SIGSEGV; a failed allocation under the memory limit looks like this)"
    return None


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for exit without `Popen.wait(timeout)`'s polling (up to 50 ms late); True if it exited."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):              # no pidfd (old kernel): the polling wait
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if ready:
        proc.wait()
    return bool(ready)


def communicate(box: Sandboxed, stdin: str | None, limits: Limits, output_cap: int = OUTPUT_CAP) -> ExecResult:
    """Feed stdin, collect capped output, enforce the wall-clock timeout, always tear the sandbox down."""
    t0 = time.perf_counter()
    proc = box.proc
    out, err = CappedReader(proc.stdout, output_cap), CappedReader(proc.stderr, output_cap)
    if proc.stdin is not None:
        def feed() -> None:
            try:
                if stdin:
                    proc.stdin.write(stdin.encode())
                proc.stdin.close()
            except (OSError, ValueError):
                pass
        threading.Thread(target=feed, daemon=True).start()
    with box.watch():
        timed_out = not _wait(proc, limits.timeout)
    box.kill()
    out.join(5)
    err.join(5)
    box.close()
    seconds = time.perf_counter() - t0
    rc = None if timed_out or box.reason or proc.returncode < 0 else proc.returncode
    stderr = err.text()
    return ExecResult(rc, out.text(), stderr, timed_out, box.reason or diagnose(rc, stderr, timed_out, limits),
                      seconds)


def run_command(argv: Sequence[str], *, scratch: Path, ro_paths: Sequence[Path] = (), timeout: float = 120.0,
                memory_mb: int = 1024, max_procs: int = 64, max_file_mb: int = 64, stdin: str | None = None,
                unsafe: bool = False, python: str | None = None, uid: int | None = None,
                output_cap: int = OUTPUT_CAP, _probe: bool = False) -> ExecResult:
    """Run `argv` (absolute path or a name on the sandbox's PATH) sandboxed in `scratch`; see module doc."""
    limits = Limits(timeout, memory_mb, max_procs, max_file_mb)
    box = spawn(argv, scratch=scratch, ro_paths=ro_paths, limits=limits, python=python, unsafe=unsafe, uid=uid,
                _probe=_probe)
    return communicate(box, stdin, limits, output_cap)


def run_python(code: str, *, scratch: Path, ro_paths: Sequence[Path] = (), timeout: float = 120.0,
               memory_mb: int = 1024, max_procs: int = 64, max_file_mb: int = 64, stdin: str | None = None,
               unsafe: bool = False, python: str | None = None, uid: int | None = None,
               output_cap: int = OUTPUT_CAP) -> ExecResult:
    """Run a Python program in a fresh sandboxed interpreter (this venv's, read-only; stdlib + its packages).

    The code is handed in as a read-only file `/sandbox/main.py`; `scratch` is the cwd and on `sys.path`
    (so `import tools` finds a `tools.py` there); `ro_paths` are visible read-only at the same paths.
    `output_cap` bytes of each stream are kept (raise it for a batch runner with many result lines)."""
    limits = Limits(timeout, memory_mb, max_procs, max_file_mb)
    exe = python or sys.executable
    with tempfile.TemporaryDirectory(prefix="dsv32-code-") as tmp:    # private: it becomes sys.path[0] if unsafe
        host_file = Path(tmp) / "main.py"
        host_file.write_text(code, encoding="utf-8")
        os.chmod(tmp, 0o755)
        target = str(host_file) if unsafe else f"{CODE_MOUNT}/main.py"
        box = spawn([exe, target], scratch=scratch, ro_paths=ro_paths, limits=limits, python=exe, unsafe=unsafe,
                    code_files={f"{CODE_MOUNT}/main.py": host_file}, uid=uid)
        return communicate(box, stdin, limits, output_cap)
