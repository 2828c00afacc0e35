"""Run untrusted Python programs (model-written code) in a sandbox and report what happened.

A program is plain source text; :meth:`Sandbox.run` returns a :class:`RunResult` with a status
(``passed`` = exit code 0, ``failed``, ``timeout``, ``error`` = the sandbox itself could not run it), a short
reason, the captured stdout/stderr (capped), the exit code and the wall time.

Backends and notable choices:

- ``bwrap`` (default): bubblewrap with new pid, net, ipc, uts (and cgroup) namespaces, ``--die-with-parent``,
  ``--new-session``, a cleared environment, an empty root holding only the system directories (read-only),
  a handful of ``/etc`` files the dynamic loader needs (not ``passwd``/``shadow``), the interpreter's own prefix
  (read-only; in a venv that is the *base* interpreter, never the project or the home directory), a fresh
  ``/proc`` and ``/dev``, and a private size-capped tmpfs ``/tmp`` as working directory. The program is copied
  in with ``--ro-bind-data``; nothing of the host's home or project is visible.
- Resource limits are set by a tiny wrapper run by the sandboxed interpreter before it execs the program:
  CPU seconds, address space, file size, processes (``RLIMIT_NPROC``), open files, no core dumps.
- Programs run with ``python -I -B -S``: isolated mode, and by default no ``site``, so the standard library
  only. The base interpreter's site-packages may hold anything (and ``.pth`` hooks that cost tens of ms per
  start-up); ``site=True`` turns them back on.
- **Why two bwrap modes.** As an unprivileged user we add ``--unshare-user`` (and ``--disable-userns``), and
  ``RLIMIT_NPROC`` counts only the sandbox's processes in its fresh user namespace. As *real root* a user
  namespace maps the sandbox onto host uid 0, and the kernel exempts uid 0 from ``RLIMIT_NPROC`` altogether
  (a fork bomb would then only be stopped by the timeout). So as root we do not unshare the user namespace;
  bwrap keeps only ``CAP_SETUID``/``CAP_SETGID`` and the wrapper drops to an unused unprivileged host uid
  (one per concurrent run, derived from our pid) before setting the limits. bwrap sets ``no_new_privs``, so
  nothing can regain privileges afterwards.
- The wall-clock timeout kills bwrap's whole process group; killing the pid namespace's init takes every
  process in the sandbox with it, and the namespace also ends as soon as the program's main process exits, so
  double-forked daemons do not survive a run.
- Output is read incrementally from both pipes; beyond ``max_output_bytes`` per stream the run is killed and
  marked failed, so a program printing gigabytes costs neither memory nor time.
- ``unsafe_no_sandbox=True`` runs with resource limits only (no namespaces, no filesystem isolation;
  ``RLIMIT_NPROC`` does not bind root) and every result and description carries a loud warning.
- ``docker``: ``docker run --network none --read-only --cap-drop ALL`` with pids/memory limits, when
  ``docker info`` works.

Capability detection (does bwrap exist, can it create the namespaces?) runs one trivial program per
(bwrap, interpreter, mode) and is cached; when it fails, :class:`SandboxUnavailable` says why and what to do.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["passed", "failed", "timeout", "error"]
BACKENDS = ("bwrap", "docker")

UNSAFE_WARNING = (
    "UNSAFE: programs ran WITHOUT a sandbox (resource limits only: no namespaces, no filesystem or network "
    "isolation). Only do this with code you trust."
)

# Exit code the wrapper uses when it could not set up the limits / drop privileges (then status = error).
_SETUP_EXIT = 125
_SETUP_PREFIX = "nanochat-sandbox: setup failed:"

# Runs inside the sandbox as `python -I -B -S -c _WRAPPER uid gid cpu as fsize nproc nofile site program`.
# A negative uid means "do not change uid"; a negative limit means "leave as is". Kept tiny: it costs one
# interpreter start-up per run.
_WRAPPER = """\
import os, resource, sys
a = [int(x) for x in sys.argv[1:9]]
try:
    if a[0] >= 0:
        os.setgroups([]); os.setgid(a[1]); os.setuid(a[0])
    R = resource
    for lim, v, extra in ((R.RLIMIT_CPU, a[2], 1), (R.RLIMIT_AS, a[3], 0), (R.RLIMIT_FSIZE, a[4], 0),
                          (R.RLIMIT_NPROC, a[5], 0), (R.RLIMIT_NOFILE, a[6], 0), (R.RLIMIT_CORE, 0, 0)):
        if v >= 0:
            R.setrlimit(lim, (v, v + extra))
    os.execv(sys.executable, [sys.executable, "-I", "-B"] + ([] if a[7] else ["-S"]) + [sys.argv[9]])
except BaseException as e:
    sys.stderr.write("@PREFIX@ %r\\n" % (e,)); sys.stderr.flush(); os._exit(@EXIT@)
""".replace("@PREFIX@", _SETUP_PREFIX).replace("@EXIT@", str(_SETUP_EXIT))

# /etc files the dynamic loader and libc want; deliberately not passwd, shadow, hosts or anything with secrets.
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives")
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class SandboxUnavailable(RuntimeError):
    """The requested sandbox backend cannot run here; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one run."""

    cpu_seconds: int | None = None  # RLIMIT_CPU; None: the run's timeout rounded up, plus 1
    memory_bytes: int = 1 << 30  # RLIMIT_AS (address space)
    file_size_bytes: int = 10 << 20  # RLIMIT_FSIZE (largest file the program may write)
    nproc: int = 64  # RLIMIT_NPROC (processes + threads of the sandbox uid)
    nofile: int = 256  # RLIMIT_NOFILE
    tmpfs_bytes: int = 64 << 20  # size of the private /tmp (bwrap, docker)
    max_output_bytes: int = 64 << 10  # per stream; beyond it the run is killed and marked failed


@dataclass
class RunResult:
    """What one run did."""

    status: Status
    reason: str  # short: "", "AssertionError", "wall-clock timeout after 3.0 s", ...
    stdout: str
    stderr: str
    wall_time: float  # seconds, from launch to the sandbox being gone
    returncode: int | None
    output_truncated: bool = False
    backend: str = "bwrap"
    sandboxed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------
# uids for the root mode: one unused host uid per concurrent run, so RLIMIT_NPROC counts only that run.


def _uid_base() -> int:
    """First uid of a block of 1024 unused uids for this process (inside the range our user namespace maps)."""
    ranges: list[tuple[int, int]] = []
    try:
        for line in Path("/proc/self/uid_map").read_text().splitlines():
            inside, _outside, count = (int(x) for x in line.split())
            ranges.append((inside, inside + count))
    except (OSError, ValueError):
        ranges = [(0, 1 << 32)]
    lo, hi = max(ranges, key=lambda r: r[1] - r[0])
    hi = min(hi, (1 << 31) - 1)
    lo = max(lo, 100_000) if hi - lo > 200_000 else max(lo, 10_000)
    blocks = (hi - lo) // 1024
    if blocks < 1:
        raise SandboxUnavailable(f"no unused uid range to run sandboxed programs in (uid_map ranges {ranges})")
    return lo + (os.getpid() % min(blocks, 1_000_000)) * 1024


class _UidPool:
    """Hands out distinct uids to concurrent runs of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._next = 0
        self._base: int | None = None

    def acquire(self) -> int:
        with self._lock:
            if self._base is None:
                self._base = _uid_base()
            if self._free:
                return self._base + self._free.pop()
            if self._next >= 1024:
                raise SandboxUnavailable("more than 1024 concurrent sandboxed runs in one process")
            self._next += 1
            return self._base + self._next - 1

    def release(self, uid: int) -> None:
        with self._lock:
            assert self._base is not None
            self._free.append(uid - self._base)


_UIDS = _UidPool()
# Capability-probe results per (bwrap, interpreter, prefix, root mode, userns flags): None = works, else why not.
_PROBES: dict[tuple[str, str, str, bool, bool], str | None] = {}


# --------------------------------------------------------------------------------------------------------
# Interpreter and capability detection


def _interpreter(python: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(real path of the interpreter, directory tree to bind read-only for it)."""
    exe = os.path.realpath(python or sys.executable)
    if not os.access(exe, os.X_OK):
        raise SandboxUnavailable(f"python interpreter {exe} is not executable")
    if python is None:
        prefix = os.path.realpath(sys.base_prefix)  # a venv's base installation, not the venv (the project)
        if not exe.startswith(prefix + os.sep):
            prefix = os.path.dirname(os.path.dirname(exe))
    else:
        prefix = os.path.dirname(os.path.dirname(exe))
    home = os.path.realpath(os.path.expanduser("~"))
    if prefix in ("/", "") or home == prefix or home.startswith(prefix.rstrip("/") + "/"):
        raise SandboxUnavailable(
            f"the interpreter {exe} lives in {prefix}, which is (or contains) the home directory; binding it "
            "into the sandbox would expose the home directory: pass python=/usr/bin/python3 (or another "
            "interpreter installed in its own prefix)"
        )
    return exe, prefix


def _is_root() -> bool:
    return os.getuid() == 0


def _bwrap_version(bwrap: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout
        return tuple(int(x) for x in out.split()[-1].split("."))
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return (0,)


def docker_available(docker: str = "docker") -> bool:
    """True when a docker client exists and `docker info` reaches an engine."""
    exe = shutil.which(docker)
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def bwrap_usable(bwrap: str | None = None) -> bool:
    """Quick check that bwrap exists and can create namespaces here (`bwrap --unshare-all --ro-bind / / true`)."""
    exe = bwrap or shutil.which("bwrap")
    if exe is None:
        return False
    try:
        r = subprocess.run([exe, "--unshare-all", "--ro-bind", "/", "/", "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


# --------------------------------------------------------------------------------------------------------
# Running a process with a deadline and capped output


@dataclass
class _Captured:
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    overflow: bool = False
    returncode: int | None = None
    wall_time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the launcher's pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _communicate(
    proc: subprocess.Popen[bytes], timeout: float, cap: int, t0: float, on_kill: Callable[[], None] | None = None
) -> _Captured:
    """Read stdout/stderr incrementally until both close and the process exits, the deadline passes or a
    stream exceeds `cap` bytes; kill the process group in the last two cases."""
    assert proc.stdout is not None and proc.stderr is not None
    out = _Captured()
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for f in (proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
        sel.register(f.fileno(), selectors.EVENT_READ)
    deadline = t0 + timeout
    exited_at: float | None = None
    lingering = False
    try:
        while sel.get_map():
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now  # a leftover child may hold the pipes open (unsafe mode): drain briefly
            if exited_at is not None and now - exited_at > 0.5:
                lingering = True  # children of the program still hold its pipes: they go with the group
                break
            if now >= deadline:
                out.timed_out = True
                break
            for key, _ in sel.select(timeout=min(deadline - now, 0.25)):
                fd = int(key.fd)
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = bufs[fd]
                room = cap - len(buf)
                buf += chunk[: max(room, 0)]
                if len(chunk) > room:
                    out.overflow = True
            if out.overflow:
                break
        if proc.poll() is None and not (out.timed_out or out.overflow):
            # Both pipes closed but the process lives on: wait for it within the deadline.
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                out.timed_out = True
    finally:
        sel.close()
        if out.timed_out or out.overflow or lingering or proc.poll() is None:
            if on_kill is not None:
                on_kill()
            _kill_group(proc)
        out.returncode = proc.wait()
        out.wall_time = time.monotonic() - t0
        proc.stdout.close()
        proc.stderr.close()
    out.stdout, out.stderr = bytes(bufs[out_fd]), bytes(bufs[err_fd])
    return out


def _last_line(text: str, limit: int = 200) -> str:
    for line in reversed(text.strip().splitlines()):
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


# --------------------------------------------------------------------------------------------------------
# The sandbox


class Sandbox:
    """Runs Python programs in the chosen backend. Thread-safe: `run` may be called from many threads."""

    def __init__(
        self,
        backend: str = "bwrap",
        *,
        unsafe_no_sandbox: bool = False,
        timeout: float = 10.0,
        limits: Limits | None = None,
        python: str | os.PathLike[str] | None = None,
        docker_image: str = "python:3.11-slim",
        site: bool = False,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown sandbox backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.timeout = float(timeout)
        self.limits = limits or Limits()
        self.unsafe = bool(unsafe_no_sandbox)
        self.warnings: list[str] = []
        self.docker_image = docker_image
        self.site = bool(site)
        if self.unsafe:
            self.backend = "none"
            self.python, self._prefix = os.path.realpath(python or sys.executable), ""
            self.warnings.append(UNSAFE_WARNING)
            print(f"WARNING: {UNSAFE_WARNING}", file=sys.stderr)
        elif backend == "docker":
            self.backend = "docker"
            self.python, self._prefix = "python", ""
            self._docker = shutil.which("docker")
            if self._docker is None or not docker_available(self._docker):
                raise SandboxUnavailable(
                    "the docker backend needs a docker client that reaches an engine (`docker info` failed); "
                    "use --sandbox bwrap, or --unsafe-no-sandbox for trusted code only"
                )
        else:
            self.backend = "bwrap"
            bwrap = shutil.which("bwrap")
            if bwrap is None:
                raise SandboxUnavailable(
                    "bubblewrap (`bwrap`) is not on PATH: install it (Debian/Ubuntu: apt-get install bubblewrap), "
                    "or pass --unsafe-no-sandbox / unsafe_no_sandbox=True to run trusted code without a sandbox"
                )
            self._bwrap = bwrap
            self.python, self._prefix = _interpreter(python)
            self._root_mode = _is_root()
            self._userns_flags = _bwrap_version(bwrap) >= (0, 8)
            key = (bwrap, self.python, self._prefix, self._root_mode, self._userns_flags)
            if key not in _PROBES:
                _PROBES[key] = self._probe()
            problem = _PROBES[key]
            if problem:
                raise SandboxUnavailable(
                    f"bubblewrap cannot create a sandbox here: {problem}. Check that user namespaces are allowed "
                    "(sysctl kernel.unprivileged_userns_clone=1, or run as root) or pass --unsafe-no-sandbox "
                    "for trusted code only"
                )

    def _probe(self) -> str | None:
        """None when a trivial program runs in this sandbox, else what went wrong (with default limits: the
        probe tests the machine, not the caller's limits, which show up as `error` results instead)."""
        limits, self.limits = self.limits, Limits()
        try:
            r = self.run("import sys; print('sandbox-ok'); sys.exit(0)", timeout=30.0)
        finally:
            self.limits = limits
        if r.status == "passed" and r.stdout.strip() == "sandbox-ok":
            return None
        return r.reason or f"status {r.status}, exit code {r.returncode}: {r.stderr.strip()[:300]}"

    def _isolation(self) -> str:
        if self.backend == "bwrap":
            who = "unused host uid per run (root mode)" if self._root_mode else "user namespace, uid 65534"
            return f"bubblewrap: pid/net/ipc/uts/cgroup namespaces, read-only system dirs, private /tmp, {who}"
        if self.backend == "docker":
            return f"docker ({self.docker_image}): --network none, read-only root, uid 65534, no capabilities"
        return "none: resource limits only"

    @property
    def sandboxed(self) -> bool:
        return not self.unsafe

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for results files."""
        return {
            "backend": self.backend,
            "sandboxed": self.sandboxed,
            "warnings": list(self.warnings),
            "isolation": self._isolation(),
            "python": self.python,
            "site_packages": self.site,
            "timeout_s": self.timeout,
            "limits": asdict(self.limits),
        }

    # -- public API ----------------------------------------------------------------------------------------

    def run(self, code: str, *, timeout: float | None = None) -> RunResult:
        """Run one program; never raises for anything the program does."""
        timeout = self.timeout if timeout is None else float(timeout)
        cpu = self.limits.cpu_seconds if self.limits.cpu_seconds is not None else int(timeout + 0.999) + 1
        try:
            if self.backend == "bwrap":
                cap = self._run_bwrap(code, timeout, cpu)
            elif self.backend == "docker":
                cap = self._run_docker(code, timeout, cpu)
            else:
                cap = self._run_unsafe(code, timeout, cpu)
        except OSError as e:
            return RunResult(
                "error", f"could not launch the sandbox: {e}", "", "", 0.0, None, False, self.backend, self.sandboxed
            )
        return self._classify(cap)

    def run_many(
        self,
        codes: Sequence[str],
        *,
        workers: int = 1,
        timeout: float | None = None,
        on_result: Callable[[int, RunResult], None] | None = None,
    ) -> list[RunResult]:
        """Run many programs with a pool of `workers` concurrent sandboxes; results in input order."""
        results: list[RunResult | None] = [None] * len(codes)

        def one(i: int) -> None:
            results[i] = r = self.run(codes[i], timeout=timeout)
            if on_result is not None:
                on_result(i, r)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for fut in [pool.submit(one, i) for i in range(len(codes))]:
                fut.result()
        return [r for r in results if r is not None]

    # -- result classification ----------------------------------------------------------------------------

    def _classify(self, c: _Captured) -> RunResult:
        stdout = c.stdout.decode("utf-8", errors="replace")
        stderr = c.stderr.decode("utf-8", errors="replace")
        rc = c.returncode
        status: Status
        if c.extra.get("setup_failed"):
            status, reason = "error", c.extra.get("setup_reason") or _last_line(stderr) or "sandbox setup failed"
        elif rc == _SETUP_EXIT and _SETUP_PREFIX in stderr:
            status, reason = "error", _last_line(stderr)
        elif c.timed_out:
            status, reason = "timeout", f"wall-clock timeout after {c.wall_time:.1f} s"
        elif c.overflow:
            status, reason = "failed", f"output limit exceeded ({self.limits.max_output_bytes} bytes per stream)"
        elif rc == 0:
            status, reason = "passed", ""
        elif rc is not None and (rc == 128 + signal.SIGXCPU or rc == -signal.SIGXCPU):
            status, reason = "timeout", "CPU time limit exceeded"
        elif rc is not None and (rc < 0 or rc > 128) and not _last_line(stderr):
            sig = -rc if rc < 0 else rc - 128
            status, reason = "failed", f"killed by {_signal_name(sig)}"
        else:
            status, reason = "failed", _last_line(stderr) or f"exit code {rc}"
        return RunResult(
            status, reason, stdout, stderr, round(c.wall_time, 4), rc, c.overflow, self.backend, self.sandboxed
        )

    # -- backends -------------------------------------------------------------------------------------------

    def _wrapper_argv(self, python: str, uid: int, cpu: int, program: str) -> list[str]:
        lim = self.limits
        return [
            python,
            "-I",
            "-B",
            "-S",
            "-c",
            _WRAPPER,
            str(uid),
            str(uid),
            str(cpu),
            str(lim.memory_bytes),
            str(lim.file_size_bytes),
            str(lim.nproc),
            str(lim.nofile),
            str(int(self.site)),
            program,
        ]

    def _run_bwrap(self, code: str, timeout: float, cpu: int) -> _Captured:
        uid = _UIDS.acquire() if self._root_mode else -1
        try:
            with tempfile.TemporaryFile() as prog:
                prog.write(code.encode("utf-8"))
                prog.flush()
                prog.seek(0)
                status_r, status_w = os.pipe()
                argv = _bwrap_argv(
                    self._bwrap,
                    self._prefix,
                    self._root_mode,
                    self._userns_flags,
                    prog.fileno(),
                    status_w,
                    self.limits.tmpfs_bytes,
                )
                argv += self._wrapper_argv(self.python, uid, cpu, "/sandbox/main.py")
                t0 = time.monotonic()
                try:
                    proc = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        pass_fds=(prog.fileno(), status_w),
                        start_new_session=True,
                        env=_host_env(),
                    )
                finally:
                    os.close(status_w)
                try:
                    cap = _communicate(proc, timeout, self.limits.max_output_bytes, t0)
                finally:
                    status = _read_all(status_r)
                    os.close(status_r)
        finally:
            if uid >= 0:
                _UIDS.release(uid)
        if '"child-pid"' not in status:
            # bwrap never started the program: its own error message is on stderr.
            cap.extra["setup_failed"] = True
            cap.extra["setup_reason"] = _last_line(cap.stderr.decode("utf-8", errors="replace"))
        return cap

    def _run_unsafe(self, code: str, timeout: float, cpu: int) -> _Captured:
        with tempfile.TemporaryDirectory(prefix="nanochat-unsafe-") as tmp:
            path = os.path.join(tmp, "main.py")
            Path(path).write_text(code, encoding="utf-8")
            argv = self._wrapper_argv(self.python, -1, cpu, path)
            t0 = time.monotonic()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=tmp,
                start_new_session=True,
                env={**_host_env(), "HOME": tmp},
            )
            return _communicate(proc, timeout, self.limits.max_output_bytes, t0)

    def _run_docker(self, code: str, timeout: float, cpu: int) -> _Captured:
        lim = self.limits
        name = f"nanochat-sandbox-{uuid.uuid4().hex[:16]}"
        assert self._docker is not None
        argv = [
            self._docker,
            "run",
            "--rm",
            "-i",
            "--name",
            name,
            "--network",
            "none",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--user",
            "65534:65534",
            "--pids-limit",
            str(lim.nproc),
            "--memory",
            str(lim.memory_bytes),
            "--memory-swap",
            str(lim.memory_bytes),
            "--cpus",
            "1",
            "--tmpfs",
            f"/tmp:rw,nosuid,nodev,size={lim.tmpfs_bytes}",
            "--workdir",
            "/tmp",
            "--ulimit",
            f"cpu={cpu}:{cpu + 1}",
            "--ulimit",
            f"fsize={lim.file_size_bytes}",
            "--ulimit",
            f"nofile={lim.nofile}:{lim.nofile}",
            "--env",
            "HOME=/tmp",
            self.docker_image,
            "python",
            "-I",
            "-B",
            "-",
        ]
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        assert proc.stdin is not None
        try:
            proc.stdin.write(code.encode("utf-8"))
            proc.stdin.close()
        except BrokenPipeError:
            pass

        def stop_container() -> None:  # killing the client does not stop the container
            subprocess.run([self._docker or "docker", "kill", name], capture_output=True, timeout=30)

        return _communicate(proc, timeout, lim.max_output_bytes, t0, on_kill=stop_container)


def _host_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            b = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _bwrap_argv(
    bwrap: str, prefix: str, root_mode: bool, userns_flags: bool, prog_fd: int, status_fd: int, tmpfs_bytes: int
) -> list[str]:
    argv = [bwrap]
    if root_mode:
        # No user namespace (see the module docstring); keep only what the wrapper needs to drop to its uid.
        argv += [
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "CAP_SETUID",
            "--cap-add",
            "CAP_SETGID",
        ]
    else:
        argv += [
            "--unshare-user",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--uid",
            "65534",
            "--gid",
            "65534",
        ]
        if userns_flags:
            argv += ["--disable-userns"]
    argv += [
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/local/bin:/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/tmp",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--setenv",
        "TMPDIR",
        "/tmp",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for d in _SYSTEM_LINKS:
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    argv += ["--perms", "0755", "--dir", "/etc"]
    for f in _ETC_FILES:
        argv += ["--ro-bind-try", f, f]
    if prefix and not (prefix == "/usr" or prefix.startswith("/usr/")):
        parts = Path(prefix).parts[1:]
        for i in range(1, len(parts)):
            argv += ["--perms", "0755", "--dir", "/" + "/".join(parts[:i])]
        argv += ["--ro-bind", prefix, prefix]
    argv += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--size",
        str(tmpfs_bytes),
        "--tmpfs",
        "/tmp",
        "--perms",
        "0755",
        "--dir",
        "/sandbox",
        "--perms",
        "0644",
        "--ro-bind-data",
        str(prog_fd),
        "/sandbox/main.py",
        "--chdir",
        "/tmp",
        "--json-status-fd",
        str(status_fd),
        "--",
    ]
    return argv


__all__ = [
    "BACKENDS",
    "Limits",
    "RunResult",
    "Sandbox",
    "SandboxUnavailable",
    "UNSAFE_WARNING",
    "bwrap_usable",
    "docker_available",
]
