"""Escape attempts against the agents' sandbox (issue 13 item 1): network, writes outside the scratch dir,
secrets, a fork bomb, a 10 GB allocation, an endless loop, an output flood. Each must be stopped, come back
as an error (ExecResult.error / an "Error:" tool result), and leave the next call working.

Never skipped silently: with CI=true a missing sandbox FAILS; elsewhere the skip says why (and warns).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest

from dsv32.agents.notebook import NotebookSession
from dsv32.agents.sandbox import (
    OUTPUT_CAP,
    Limits,
    SandboxUnavailable,
    _bwrap_argv,
    run_command,
    run_python,
    sandbox_available,
    sandbox_env,
)
from dsv32.agents.tools import Toolbox


@pytest.fixture(autouse=True)
def need_sandbox():
    ok, why = sandbox_available()
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and no working sandbox: {why}")
    warnings.warn(f"agents sandbox tests skipped: {why}", stacklevel=1)
    pytest.skip(f"no working sandbox: {why}")


def _uid_processes(uid: int) -> list[int]:
    """Host PIDs whose real uid is `uid`."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        line = next((ln for ln in status.splitlines() if ln.startswith("Uid:")), "")
        if line.split()[1:2] == [str(uid)]:
            pids.append(int(p))
    return pids


def _gone(uid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while _uid_processes(uid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ------------------------------------------------------------------------------------- run_python / run_command


def test_plain_run_and_isolation(tmp_path):
    r = run_python("import os, sys\nprint(os.getcwd()); print(sys.stdin.read())", scratch=tmp_path, stdin="fed")
    assert r.ok and r.returncode == 0 and not r.timed_out and r.error is None
    assert r.stdout.splitlines() == [str(tmp_path.resolve()), "fed"]
    r = run_python("import os; print(os.getuid())", scratch=tmp_path)
    assert r.ok and int(r.stdout) != 0, "the payload must not run as root"


def test_network_is_unreachable(tmp_path):
    # a real listener on the host's loopback: the sandbox has its own network namespace and cannot reach it
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass
    t = threading.Thread(target=accept)
    t.start()
    code = f"""
import socket
print([name for _, name in socket.if_nameindex()])
for addr in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
    try:
        socket.create_connection(addr, timeout=1).close()
        print("CONNECTED", addr)
    except OSError as e:
        print("blocked", addr, type(e).__name__)
"""
    r = run_python(code, scratch=tmp_path, timeout=20)
    t.join()
    server.close()
    assert r.ok, r
    assert r.stdout.splitlines()[0] == "['lo']"
    assert "CONNECTED" not in r.stdout and r.stdout.count("blocked") == 3
    assert not accepted


def test_writes_outside_scratch_fail(tmp_path):
    scratch, outside, ro = tmp_path / "scratch", tmp_path / "outside", tmp_path / "ro"
    for d in (scratch, outside, ro):
        d.mkdir()
    (ro / "data.txt").write_text("original")
    os.chmod(ro / "data.txt", 0o666)          # only the read-only mount may stop the write, not permissions
    os.chmod(ro, 0o777)
    targets = [outside / "pwned.txt", ro / "data.txt", Path("/usr/pwned"), Path("/root/pwned"),
               Path(sys.base_prefix) / "pwned", Path(__file__).parent / "pwned", Path("/etc/pwned")]
    code = f"""
for p in {[str(p) for p in targets]!r}:
    try:
        with open(p, "w") as f:
            f.write("x")
        print("WROTE", p)
    except OSError as e:
        print("refused", p, type(e).__name__)
open("inside.txt", "w").write("ok")
"""
    r = run_python(code, scratch=scratch, ro_paths=[ro])
    assert r.ok, r
    assert "WROTE" not in r.stdout and r.stdout.count("refused") == len(targets)
    assert "Read-only file system" in run_python(f"open({str(ro / 'data.txt')!r}, 'a')", scratch=scratch,
                                                 ro_paths=[ro]).stderr
    assert not (outside / "pwned.txt").exists() and (ro / "data.txt").read_text() == "original"
    assert not Path(__file__).with_name("pwned").exists()
    assert (scratch / "inside.txt").read_text() == "ok"


def test_secrets_are_invisible(tmp_path):
    ssh = Path.home() / ".ssh"
    made_dir = not ssh.exists()
    ssh.mkdir(mode=0o700, exist_ok=True)
    key = ssh / "id_dsv32_test"
    key.write_text("SECRET-KEY-MATERIAL")
    try:
        probes = [str(key), "~/.ssh/id_dsv32_test", "/etc/shadow", "/root/.bash_history",
                  str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).resolve().parents[1] / ".git"),
                  "/work/shared"]
        code = f"""
import os
for p in {probes!r}:
    p = os.path.expanduser(p)
    if os.path.exists(p):
        print("VISIBLE", p)
    else:
        print("absent", p)
print(sorted(os.listdir(os.path.expanduser("~"))))
"""
        r = run_python(code, scratch=tmp_path)
        assert r.ok, r
        assert "VISIBLE" not in r.stdout and "SECRET" not in r.stdout, r.stdout
        assert r.stdout.count("absent") == len(probes)
        cat = run_command(["bash", "-c", f"cat {key} ~/.ssh/* 2>&1; ls /root"], scratch=tmp_path)
        assert "SECRET" not in cat.stdout + cat.stderr
    finally:
        key.unlink()
        if made_dir:
            ssh.rmdir()


def test_fork_bomb_hits_process_limit(tmp_path):
    t0 = time.monotonic()
    r = run_python("import os\nwhile True:\n    os.fork()", scratch=tmp_path, max_procs=32, timeout=20)
    assert not r.ok and not r.timed_out and r.error is not None and "process limit" in r.error, r
    assert time.monotonic() - t0 < 15
    assert run_python("print('alive')", scratch=tmp_path).stdout == "alive\n"


def test_detached_child_dies_with_the_sandbox(tmp_path):
    code = ("import os, subprocess\nsubprocess.Popen(['sleep', '300'], start_new_session=True)\n"
            "print(os.getuid())")
    r = run_python(code, scratch=tmp_path)
    assert r.ok, r
    assert _gone(int(r.stdout)), "a setsid'd child outlived its sandbox"


def test_ten_gigabytes_refused(tmp_path):
    r = run_python("b = bytearray(10 * 2**30)", scratch=tmp_path, memory_mb=512)
    assert not r.ok and r.error is not None and "memory limit" in r.error, r
    # creeping growth stops at the limit too
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(64 << 20))", scratch=tmp_path, memory_mb=256)
    assert not r.ok and r.error is not None and "memory limit" in r.error, r
    assert run_python("print(1)", scratch=tmp_path).ok


def test_forked_allocations_hit_the_sandbox_memory_watchdog(tmp_path):
    # each process stays under its own RLIMIT_AS (256 MB); together they pass the sandbox's 512 MB
    code = ("import os, time\nfor i in range(6):\n    if os.fork() == 0:\n        b = bytearray(150 << 20)\n"
            "        time.sleep(30)\n        os._exit(0)\ntime.sleep(30)\n")
    t0 = time.monotonic()
    r = run_python(code, scratch=tmp_path, memory_mb=256, timeout=60)
    assert r.returncode is None and not r.timed_out and "together used" in (r.error or ""), r
    assert time.monotonic() - t0 < 30
    with NotebookSession(tmp_path, memory_mb=256) as nb:
        assert nb.execute("keep = 1").ok
        r = nb.execute(code)
        assert not r.ok and r.restarted and "together used" in (r.error or ""), r
        assert nb.execute("1 + 1").result == "2"


def test_endless_loop_times_out(tmp_path):
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", scratch=tmp_path, timeout=2)
    assert r.timed_out and r.returncode is None and r.error is not None and r.error.startswith("timeout"), r
    assert time.monotonic() - t0 < 6
    assert run_python("print(2)", scratch=tmp_path).stdout == "2\n"


def test_file_size_limit_and_output_cap(tmp_path):
    r = run_python("open('big', 'wb').write(b'0' * (8 << 20))", scratch=tmp_path, max_file_mb=1)
    assert not r.ok and r.error is not None and "file size limit" in r.error, r
    assert (tmp_path / "big").stat().st_size <= 1 << 20
    r = run_python("print('x' * 20_000_000)", scratch=tmp_path)
    assert r.ok and len(r.stdout) < OUTPUT_CAP + 200 and "output truncated" in r.stdout


def test_missing_sandbox_refuses_unless_unsafe(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))           # bwrap cannot be found
    sandbox_available.cache_clear()
    try:
        ok, why = sandbox_available()
        assert not ok and "bwrap" in why
        with pytest.raises(SandboxUnavailable, match="unsafe"):
            run_python("print(1)", scratch=tmp_path)
        with pytest.raises(SandboxUnavailable, match="bwrap"):
            Toolbox(tmp_path / "s")
        r = run_python("print(1)", scratch=tmp_path, unsafe=True)      # explicit opt-out still has limits
        assert r.stdout == "1\n"
        assert "memory limit" in (run_python("bytearray(10 * 2**30)", scratch=tmp_path, unsafe=True).error or "")
    finally:
        monkeypatch.undo()
        sandbox_available.cache_clear()
    assert sandbox_available()[0]


# ------------------------------------------------------------------------------------------ through the tools


def test_escapes_through_the_tools_are_tool_errors(tmp_path):
    with Toolbox(tmp_path / "traj", python_timeout=2, shell_timeout=3, memory_mb=512, max_procs=32) as tb:
        assert tb.call("python", {"code": "state = 'kept'\nstate"}).content == "'kept'"
        report = {}
        attempts = {
            "network": ("python", "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)"),
            "write outside": ("python", "open('/usr/pwned', 'w')"),
            "read ~/.ssh": ("bash", "cat /root/.ssh/* ~/.ssh/*"),
            "fork bomb (python)": ("python", "import os\nwhile True:\n    os.fork()"),
            "fork bomb (bash)": ("bash", "bomb() { bomb | bomb & }; bomb; sleep 30"),
            "10 GB": ("python", "b = bytearray(10 * 2**30)"),
            "endless loop": ("python", "while True:\n    pass"),
        }
        for what, (tool, code) in attempts.items():
            arg = "code" if tool == "python" else "command"
            res = tb.call(tool, {arg: code})
            assert not res.ok and ("Error:" in res.content or "[exit status" in res.content), (what, res)
            report[what] = res.content.splitlines()[-1]
            follow = tb.call("python", {"code": "state"})
            assert follow.ok and follow.content == "'kept'", (what, follow)
            assert tb.call("bash", {"command": "echo fine"}).content == "fine", what
        print("\n".join(f"{k}: {v}" for k, v in report.items()))     # the record docs/agents.md quotes (-s)
    assert tb.uid is None or _gone(tb.uid), "processes survived Toolbox.close()"


def test_notebook_hard_kill_restarts(tmp_path):
    with NotebookSession(tmp_path, timeout=1, grace=1) as nb:
        assert nb.execute("v = 7").ok
        r = nb.execute("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass")
        assert not r.ok and r.restarted and "timeout" in (r.error or "")
        r = nb.execute("v")
        assert not r.ok and "restarted" in (r.error or "") and "NameError" in (r.error or "")
        assert nb.execute("v = 8\nv").result == "8"


def test_notebook_ignores_forged_replies(tmp_path):
    forge = """
import fcntl, os, stat
for fd in range(3, 64):
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            os.write(fd, b'{"seq": 99, "ok": true, "output": "FORGED", "result": null, "error": null}\\n')
    except OSError:
        pass
x
"""
    with NotebookSession(tmp_path, timeout=5) as nb:
        assert nb.execute("x = 1").ok
        r = nb.execute(forge)
        assert r.ok and r.result == "1" and "FORGED" not in r.output, r
        assert nb.execute("x + 1").result == "2"


def test_scratch_must_be_a_private_dir(tmp_path):
    for bad in ["/", "/usr", "/etc", str(Path.home())]:
        with pytest.raises(ValueError, match="scratch directory"):
            run_python("print(1)", scratch=Path(bad))
    with pytest.raises(FileNotFoundError):
        run_python("print(1)", scratch=tmp_path / "missing")


def test_user_namespace_mode_as_an_unprivileged_user():
    """The non-root path (bwrap --unshare-user; RLIMIT_NPROC counted per user namespace), exercised here by
    starting the same command line as `nobody` with the system Python (the venv's may sit under /root)."""
    if os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK) or shutil.which("setpriv") is None:
        pytest.skip("needs root (to become nobody), setpriv and /usr/bin/python3")
    with tempfile.TemporaryDirectory(prefix="dsv32-userns-") as tmp:    # pytest's tmp_path sits in a 0700 dir
        _userns_probe(Path(tmp))


def _userns_probe(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    code = tmp_path / "probe.py"
    code.write_text("import os, socket\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
                    "            import time; time.sleep(5); os._exit(0)\n        n += 1\n"
                    "except OSError:\n    print('forks', n)\n"
                    "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\nexcept OSError as e:\n"
                    "    print('net', e.errno)\nprint(sorted(os.listdir('/')))\n")
    os.chmod(code, 0o644)
    cmd = _bwrap_argv(["/usr/bin/python3", "probe.py"], scratch=tmp_path, ro_paths=[], limits=Limits(20, max_procs=16),
                      uid=None, code_files={}, python="/usr/bin/python3")
    assert "--unshare-user" in cmd
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    r = subprocess.run([*nobody, *cmd], env=sandbox_env(tmp_path), capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and ("No permissions to create" in r.stderr or "new namespace failed" in r.stderr):
        pytest.skip(f"unprivileged user namespaces are not allowed here: {r.stderr.strip()}")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3, (r.stdout, r.stderr)
    assert int(lines[0].split()[1]) < 16 and lines[1] == "net 101"
    assert "root" not in lines[2] and "work" not in lines[2]
