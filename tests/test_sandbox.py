"""Sandbox tests: hostile programs must come back failed/timeout, and the *host* must be untouched afterwards.

Each hostile test runs a program that tries to do harm, checks the returned status, then inspects the host
(files, processes, sockets, memory). They skip only when bubblewrap cannot create namespaces on this machine.
Network tests use host loopback (127.0.0.1) only.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from nanochat.eval.sandbox import (
    UNSAFE_WARNING,
    Limits,
    Sandbox,
    SandboxUnavailable,
    bwrap_usable,
    docker_available,
)

REPO = Path(__file__).resolve().parents[1]

needs_bwrap = pytest.mark.skipif(not bwrap_usable(), reason="bubblewrap cannot create namespaces on this machine")


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    if not bwrap_usable():
        pytest.skip("bubblewrap cannot create namespaces on this machine")
    return Sandbox(timeout=10.0)


def _procs_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


def _no_procs_left(marker: str) -> bool:
    """True once no host process carries `marker` (the pid namespace is torn down as bwrap exits; allow the
    kernel a moment to finish reaping)."""
    import time

    for _ in range(50):
        if not _procs_with(marker):
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------------------------------------
# Plain behaviour


@needs_bwrap
def test_statuses_and_capture(sandbox: Sandbox) -> None:
    ok = sandbox.run("print('hello'); import sys; print('err', file=sys.stderr)")
    assert (ok.status, ok.stdout, ok.stderr, ok.returncode) == ("passed", "hello\n", "err\n", 0)
    assert ok.sandboxed and ok.backend == "bwrap"
    bad = sandbox.run("def f():\n    assert 1 == 2, 'nope'\nf()\n")
    assert bad.status == "failed" and bad.reason == "AssertionError: nope"
    syntax = sandbox.run("def f(:\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.reason
    exit3 = sandbox.run("import sys; sys.exit(3)")
    assert exit3.status == "failed" and exit3.returncode == 3


@needs_bwrap
def test_sandbox_identity_and_environment(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_TEST_SECRET_ENV", "leaked-env-value")
    r = sandbox.run(
        "import os, socket\n"
        "print(os.getuid(), os.getgid())\n"
        "print(sorted(os.environ))\n"
        "print(open('/proc/self/status').read())\n"
        "print(socket.gethostname())\n"
    )
    assert r.status == "passed", r.stderr
    uid, gid = (int(x) for x in r.stdout.splitlines()[0].split())
    assert uid != 0 and gid != 0  # never root inside, whatever the mode
    assert "leaked-env-value" not in r.stdout and "NANOCHAT_TEST_SECRET_ENV" not in r.stdout
    status = dict(line.split(":", 1) for line in r.stdout.splitlines() if line.startswith(("Cap", "NoNewPrivs")))
    assert int(status["CapEff"].strip(), 16) == 0 and int(status["CapPrm"].strip(), 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert r.stdout.strip().splitlines()[-1] == "sandbox"


@needs_bwrap
def test_run_many_parallel_keeps_order(sandbox: Sandbox) -> None:
    codes = [f"import time; time.sleep(0.2); print({i} * {i})" for i in range(6)]
    seen: list[int] = []
    results = sandbox.run_many(codes, workers=3, on_result=lambda i, r: seen.append(i))
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(6)]
    assert sorted(seen) == list(range(6))
    assert all(r.status == "passed" for r in results)


# ---------------------------------------------------------------------------------------------------------
# Hostile programs


@needs_bwrap
def test_fork_bomb_bounded_by_nproc(sandbox: Sandbox) -> None:
    """Forking until refused: RLIMIT_NPROC stops it well below the host's limits, and nothing survives."""
    marker = f"nanochat-bomb-{uuid.uuid4().hex}"
    bomb = (
        "import os, sys, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('forks', n, e.errno, flush=True); sys.exit(3)\n"
    )
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {marker!r}])\n"
    r = sandbox.run(code, timeout=20)
    assert r.status == "failed", (r.status, r.reason, r.stderr)
    words = r.stdout.split()
    assert words[0] == "forks" and int(words[1]) < Limits().nproc
    assert _no_procs_left(marker)


@needs_bwrap
def test_fork_bomb_exponential_is_killed() -> None:
    marker = f"nanochat-bomb-{uuid.uuid4().hex}"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {marker!r}])\n"
    r = Sandbox(timeout=2, limits=Limits(nproc=16)).run(code)  # a small nproc: be kind to the shared cores
    assert r.status in ("timeout", "failed")
    assert _no_procs_left(marker)


@needs_bwrap
def test_infinite_loop_times_out(sandbox: Sandbox) -> None:
    r = sandbox.run("while True:\n    pass\n", timeout=1.5)
    assert r.status == "timeout"
    assert "timeout" in r.reason or "CPU" in r.reason


@needs_bwrap
def test_sleeping_forever_times_out(sandbox: Sandbox) -> None:
    r = sandbox.run("import time\ntime.sleep(3600)\n", timeout=1.0)
    assert r.status == "timeout" and r.reason.startswith("wall-clock timeout")


@needs_bwrap
def test_unbounded_allocation_fails() -> None:
    small = Sandbox(timeout=20, limits=Limits(memory_bytes=256 << 20))
    r = small.run("chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n")
    assert r.status == "failed" and "MemoryError" in r.reason


@needs_bwrap
def test_huge_single_allocation_fails(sandbox: Sandbox) -> None:
    r = sandbox.run("x = b'x' * (1 << 34)\n")  # 16 GiB, far above the 1 GiB address-space limit
    assert r.status == "failed" and "MemoryError" in r.reason


@needs_bwrap
def test_cannot_write_outside(sandbox: Sandbox, tmp_path: Path) -> None:
    targets = [
        tmp_path / "pwned.txt",
        REPO / f"pwned-{uuid.uuid4().hex}.txt",
        Path.home() / f"pwned-{uuid.uuid4().hex}",
    ]
    code = (
        "import sys\n"
        f"targets = {[str(t) for t in targets]!r}\n"
        "written = []\n"
        "for t in targets:\n"
        "    try:\n"
        "        open(t, 'w').write('pwned')\n"
        "        written.append(t)\n"
        "    except OSError as e:\n"
        "        print(t, type(e).__name__)\n"
        "sys.exit(0 if written else 1)\n"
    )
    try:
        r = sandbox.run(code)
        assert r.status == "failed", r.stdout
        for t in targets:
            assert not t.exists()
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


@needs_bwrap
def test_private_tmp_does_not_reach_host(sandbox: Sandbox) -> None:
    host_path = Path("/tmp") / f"nanochat-sandbox-escape-{uuid.uuid4().hex}"
    r = sandbox.run(f"open({str(host_path)!r}, 'w').write('inside')\nprint(open({str(host_path)!r}).read())\n")
    try:
        assert r.status == "passed" and r.stdout.strip() == "inside"  # the sandbox has its own /tmp
        assert not host_path.exists()
    finally:
        host_path.unlink(missing_ok=True)


@needs_bwrap
def test_cannot_read_home_or_project(sandbox: Sandbox) -> None:
    secret_value = f"secret-{uuid.uuid4().hex}"
    secret = Path.home() / f".nanochat_test_secret_{uuid.uuid4().hex[:8]}"
    secret.write_text(secret_value)
    try:
        for path in (secret, REPO / "pyproject.toml"):
            r = sandbox.run(f"print(open({str(path)!r}).read())\n")
            assert r.status == "failed", r.stdout[:200]
            assert secret_value not in r.stdout + r.stderr
        listing = sandbox.run(f"import os\nprint(os.listdir({str(Path.home())!r}))\nprint(os.listdir({str(REPO)!r}))\n")
        assert secret.name not in listing.stdout and "pyproject.toml" not in listing.stdout
        assert listing.status == "failed"
        shadow = sandbox.run("print(open('/etc/shadow').read())\n")
        assert shadow.status == "failed"
    finally:
        secret.unlink()


@needs_bwrap
def test_cannot_connect_to_host_loopback(sandbox: Sandbox) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        r = sandbox.run(
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\ns.sendall(b'pwned')\n"
        )
        assert r.status == "failed"
        assert "ConnectionRefused" in r.reason or "unreachable" in r.reason.lower() or "OSError" in r.reason
        readable, _, _ = select.select([server], [], [], 0.5)
        assert readable == []  # the server never saw a connection
    finally:
        server.close()


@needs_bwrap
def test_cannot_kill_parent_or_host_processes(sandbox: Sandbox) -> None:
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        code = (
            "import os, signal\n"
            f"for pid in (os.getppid(), {victim.pid}, {os.getpid()}):\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "        print('killed', pid, flush=True)\n"
            "    except OSError as e:\n"
            "        print('refused', pid, type(e).__name__, flush=True)\n"
            "try:\n"
            "    os.kill(-1, signal.SIGKILL)\n"
            "except OSError:\n"
            "    pass\n"
            "os.killpg(os.getpgid(0), signal.SIGKILL)\n"
        )
        r = sandbox.run(code)
        assert r.status == "failed", (r.status, r.stdout)
        assert victim.poll() is None  # the host process it aimed at is alive
        assert f"killed {victim.pid}" not in r.stdout and f"killed {os.getpid()}" not in r.stdout
        # And the sandbox still works afterwards (we, the parent, survived).
        assert sandbox.run("print(1)").status == "passed"
    finally:
        victim.kill()
        victim.wait()


@needs_bwrap
def test_daemon_does_not_outlive_the_run(sandbox: Sandbox) -> None:
    marker = f"nanochat-daemon-{uuid.uuid4().hex}"
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n"
        "sys.exit(1)\n"
    )
    r = sandbox.run(code, timeout=10)
    assert r.status == "failed" and r.returncode == 1
    assert _no_procs_left(marker)


def _rss_bytes() -> int:
    """This process's resident set size now (ru_maxrss is a lifetime peak: an earlier test's model hides growth)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@needs_bwrap
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_printing_gigabytes_is_capped(sandbox: Sandbox, stream: str) -> None:
    """A program that would print 16 GiB is killed once a stream passes the cap: we keep exactly the first `cap`
    bytes, it ends by the output limit (not the timeout), and our resident memory, sampled while it runs, grows
    by far less than what it tried to print."""
    import threading

    stop, peak = threading.Event(), [0]
    base = _rss_bytes()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes() - base)
            stop.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = sandbox.run(
            f"import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1 << 14):\n    sys.{stream}.write(chunk)\n"
        )
    finally:
        stop.set()
        sampler.join()
    cap = Limits().max_output_bytes
    other = "stderr" if stream == "stdout" else "stdout"
    assert r.status == "failed" and r.output_truncated, (r.status, r.reason)
    assert r.reason == f"output limit exceeded ({cap} bytes per stream)"
    assert peak[0] < 32 << 20, f"resident memory grew by {peak[0] / 2**20:.0f} MiB while capturing"
    assert getattr(r, stream) == "x" * cap and getattr(r, other) == ""
    assert r.returncode is not None and r.returncode != 0  # killed, not finished


@needs_bwrap
@pytest.mark.parametrize("limit", [Limits().file_size_bytes, (3 << 20) + 123])
def test_big_file_is_refused(limit: int) -> None:
    """RLIMIT_FSIZE: writes stop with EFBIG (Python ignores SIGXFSZ) at exactly the configured size."""
    sandbox = Sandbox(timeout=10.0, limits=Limits(file_size_bytes=limit))
    code = (
        "import errno, os\n"
        "f = open('/tmp/big', 'wb', buffering=0)\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(50):\n"  # 50 MiB: above the limit, below the 64 MiB private /tmp
        "        n += f.write(b'x' * (1 << 20))\n"
        "except OSError as e:\n"
        "    print(n, os.path.getsize('/tmp/big'), errno.errorcode[e.errno], flush=True)\n"
        "    raise\n"
    )
    r = sandbox.run(code)
    assert r.status == "failed", (r.status, r.reason)
    assert r.stdout.split() == [str(limit), str(limit), "EFBIG"], r.stdout + r.stderr
    assert "File too large" in r.reason, r.reason


# ---------------------------------------------------------------------------------------------------------
# Unavailable / unsafe / other backends


def test_missing_bwrap_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no bwrap anywhere
    with pytest.raises(SandboxUnavailable, match="bubblewrap") as info:
        Sandbox("bwrap")
    assert "--unsafe-no-sandbox" in str(info.value)


def test_unknown_backend_rejected() -> None:
    with pytest.raises(ValueError, match="unknown sandbox backend"):
        Sandbox("chroot")


def test_unsafe_no_sandbox_runs_with_limits_and_is_marked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # works without bwrap
    sb = Sandbox(unsafe_no_sandbox=True, timeout=5)
    assert not sb.sandboxed and sb.describe()["warnings"] == [UNSAFE_WARNING]
    ok = sb.run("import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0])\n")
    assert ok.status == "passed" and not ok.sandboxed and ok.backend == "none"
    assert int(ok.stdout) == Limits().memory_bytes
    assert sb.run("while True:\n    pass\n", timeout=1).status == "timeout"
    assert sb.run("raise ValueError('x')").reason == "ValueError: x"


@pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"),
    reason="needs root (to become an unprivileged user), setpriv and /usr/bin/python3",
)
@needs_bwrap
def test_unprivileged_user_mode() -> None:
    """The non-root path (--unshare-all with a user namespace, limits by the wrapper), run as `nobody`."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    pre = subprocess.run([*as_nobody, "bwrap", "--unshare-user", "--ro-bind", "/", "/", "true"], capture_output=True)
    if pre.returncode != 0:
        pytest.skip(f"unprivileged users cannot create user namespaces here: {pre.stderr[-200:]!r}")
    pkg = REPO / "python"
    tmp = Path(tempfile.mkdtemp(prefix="nanochat-nobody-"))  # pytest's tmp_path is not readable by nobody
    script = tmp / "probe.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(pkg)!r})\n"
        "from nanochat.eval.sandbox import Sandbox\n"
        "sb = Sandbox(python='/usr/bin/python3', timeout=10)\n"
        "bomb = 'import os\\nn=0\\ntry:\\n    while True:\\n        if os.fork()==0:\\n            import time; "
        "time.sleep(30); os._exit(0)\\n        n+=1\\nexcept OSError:\\n    print(n)\\n'\n"
        "r = sb.run(bomb)\n"
        "print('FORKS', r.stdout.strip())\n"
        "print('NET', sb.run('import socket; socket.create_connection((\"127.0.0.1\", 9), timeout=2)').status)\n"
    )
    os.chmod(tmp, 0o755)
    os.chmod(script, 0o644)
    try:
        probe = subprocess.run(
            [*as_nobody, "/usr/bin/python3", str(script)], capture_output=True, text=True, timeout=120
        )
    finally:
        shutil.rmtree(tmp)
    assert probe.returncode == 0, probe.stderr
    lines = dict(line.split(" ", 1) for line in probe.stdout.splitlines())
    assert int(lines["FORKS"]) < Limits().nproc
    assert lines["NET"] == "failed"


@needs_bwrap
def test_setup_failure_is_an_error_status() -> None:
    """Limits the wrapper cannot apply make the run an `error` (the sandbox failed), not a program failure."""
    r = Sandbox(limits=Limits(nofile=1 << 40)).run("print(1)")
    assert r.status == "error" and "setup failed" in r.reason and r.stdout == ""


FAKE_DOCKER = """#!{python}
import json, os, sys
log = {log!r}
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "info":
    sys.exit(0)
if sys.argv[1] == "run":  # run the program from stdin, as the container's `python -I -B -` would
    os.execv(sys.executable, [sys.executable, "-I", "-B", "-"])
sys.exit(0)
"""


def test_docker_backend_plumbing_with_a_fake_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The docker command line, stdin feeding and `docker kill` on timeout, against a stand-in client."""
    log = tmp_path / "docker.log"
    fake = tmp_path / "docker"
    fake.write_text(FAKE_DOCKER.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    sb = Sandbox("docker", timeout=10, docker_image="python:3.11-slim")
    assert sb.run("print(6 * 7)").stdout == "42\n"
    assert sb.run("while True:\n    pass\n", timeout=1).status == "timeout"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    run = next(c for c in calls if c[0] == "run")
    for flag in (["--network", "none"], ["--cap-drop", "ALL"], ["--user", "65534:65534"], ["--pids-limit", "64"]):
        i = run.index(flag[0])
        assert run[i : i + 2] == flag
    assert "--read-only" in run and run[-5:] == ["python:3.11-slim", "python", "-I", "-B", "-"]
    names = [c[c.index("--name") + 1] for c in calls if c[0] == "run"]
    killed = [c[1] for c in calls if c[0] == "kill"]
    assert killed == [names[1]]  # the timed-out container was killed by name, the finished one was not


@pytest.mark.skipif(not docker_available(), reason="no docker engine reachable (`docker info` fails)")
def test_docker_backend_runs() -> None:
    sb = Sandbox("docker", timeout=60)
    r = sb.run("import socket, os\nprint(os.getuid())\n")
    assert r.status == "passed" and r.stdout.strip() == "65534"
    assert sb.run("import socket; socket.create_connection(('127.0.0.1', 9), timeout=3)").status == "failed"
