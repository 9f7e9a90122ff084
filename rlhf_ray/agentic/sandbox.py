"""Run untrusted Python (a policy's tool call, a response's solution) in a sandboxed subprocess.

:func:`run_python` runs one program and returns a :class:`SandboxResult`; :func:`python_sandbox` wraps it as
a tool a model can call (typed, with a docstring a chat template's ``tools=`` can read); the reward
``builtin:python_sandbox``, which runs a row's tests, lives in :mod:`rlhf_ray.rewards.code_exec`.

What a program gets (``_sandbox_launcher.py`` does the setup, in a helper process, so nothing runs between
fork and exec in this one: ``preexec_fn`` is unsafe in a threaded controller):

- **Limits** (:class:`SandboxLimits`): CPU seconds, address space, processes + threads, open files, size of
  any one file, and the bytes of stdout / stderr kept (past it the program is killed, so a flood never fills
  this process's memory), and a wall clock (past it the whole sandbox is killed).
- **No network**: a new, empty network namespace (a loopback that is down; no route to the host's loopback
  or anywhere else). UNIX sockets in the host's file system are reachable only where their file permissions
  allow the sandbox user to connect (as root, the sandbox user is ``nobody``).
- **Its own temporary directory**: the working directory and HOME are ``/tmp``, a fresh ``tmpfs`` of
  ``file_size_mb`` in a private mount namespace, gone when the program ends; it holds ``main.py``, the
  program. Every other mount is read-only, so the program can change no file of the host.
- **No stray processes**: the program runs in a new PID namespace under a small init; when the program
  exits or is killed, the kernel kills everything it started (also children that called ``setsid``).
- **Not root**: run as root, the controller switches the sandbox to ``nobody`` (so root-only files are
  unreadable and the process limit applies: the kernel does not enforce RLIMIT_NPROC on uid 0). Run as
  another user, the sandbox keeps that user's uid and reads what that user reads (it still writes nothing
  outside its ``/tmp``).
- **Isolated Python**: ``python -I -S`` (no site-packages, no user site, ``PYTHON*`` variables ignored) with
  a minimal environment and empty stdin unless ``stdin`` is given.

Needs Linux >= 5.12 (``mount_setattr``) with user namespaces open to unprivileged users
(``user.max_user_namespaces`` > 0; on Ubuntu >= 23.10 ``kernel.apparmor_restrict_unprivileged_userns`` = 0;
in Docker a seccomp profile that allows ``unshare``). Where the namespaces cannot be made, :func:`run_python`
fails closed: :class:`SandboxUnavailable` names the step and the setting; nothing runs unsandboxed.
Before Linux 5.14, RLIMIT_NPROC counted every process of the sandbox user, not of one sandbox.

Known gaps: CPU and memory limits are per process (a program of ``max_processes`` processes may use that
many times each); System V shared memory and memfd files (up to ``open_files`` x ``file_size_mb``) hold
memory outside RLIMIT_AS until the program ends (the wall clock bounds how long); the program can read the
host's world-readable files; ``/proc`` is the host's (it can list, not signal, other processes).

Thread-safe: each call owns its processes, pipes and temporary files; call it from many threads at once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal, Optional

log = logging.getLogger(__name__)

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_launcher.py")

KilledReason = Literal["wall_clock", "cpu_time", "memory", "process_limit", "output_limit"]

_READ_CHUNK = 1 << 16
_KILL_GRACE_S = 5.0
"""After a kill, how long the pipes may stay open before this process stops waiting for them."""
_SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
                "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class SandboxUnavailable(RuntimeError):
    """The sandbox could not be set up on this machine (no user namespaces, no usable interpreter, ...).

    ``stage``: the setup step that failed (``unshare``, ``uid_map``, ``mount``, ``exec``, ...).
    """

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed program; every field must be positive."""

    cpu_seconds: int = 5
    """CPU time (user + system) of each process, whole seconds (RLIMIT_CPU): SIGXCPU past it."""
    memory_mb: int = 512
    """Address space of each process, MiB (RLIMIT_AS): allocations past it fail (MemoryError). The
    interpreter itself needs about 20 MiB of it."""
    output_bytes: int = 64 * 1024
    """Bytes kept of stdout and of stderr (each); one byte more and the program is killed."""
    wall_seconds: float = 10.0
    """Wall-clock time from start (interpreter start-up included) until the whole sandbox is killed."""
    max_processes: int = 16
    """Processes and threads the program may have at once, itself included (RLIMIT_NPROC): a fork past it
    fails with BlockingIOError."""
    file_size_mb: int = 16
    """Size of the private ``/tmp`` (a tmpfs) and of any one file the program writes (RLIMIT_FSIZE), MiB."""
    open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE); also bounds the memory memfd files can hold."""

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "memory_mb", "output_bytes", "max_processes", "file_size_mb", "open_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SandboxLimits.{name} must be a whole number >= 1, got {value!r}")
        if isinstance(self.wall_seconds, bool) or not isinstance(self.wall_seconds, (int, float)) \
                or not self.wall_seconds > 0:
            raise ValueError(f"SandboxLimits.wall_seconds must be a number of seconds > 0, got {self.wall_seconds!r}")
        if self.memory_mb < 32:
            raise ValueError(f"SandboxLimits.memory_mb must be >= 32: the interpreter alone needs about 20 MiB of "
                             f"address space, got {self.memory_mb}")
        if self.open_files < 8:
            raise ValueError(f"SandboxLimits.open_files must be >= 8: the interpreter opens a few files to start, "
                             f"got {self.open_files}")


DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True)
class SandboxResult:
    """How one sandboxed program ended.

    ``killed_reason`` names the limit that ended it, None when none did: ``wall_clock`` and ``output_limit``
    (this process killed the sandbox), ``cpu_time`` (SIGXCPU / SIGKILL from RLIMIT_CPU), ``memory`` and
    ``process_limit`` (the program died of a MemoryError / a failed fork or thread start: read from the last
    lines of its stderr, so a program can fake these two, but not the others). ``timed_out``: the reason is
    ``wall_clock`` or ``cpu_time``.
    """

    exit_code: Optional[int]
    """The program's exit status; None when a signal ended it or the sandbox was killed."""
    signal: Optional[int]
    """The signal that ended the program, if one did (None when the sandbox was killed from outside)."""
    stdout: str
    stderr: str
    """Decoded as UTF-8 (undecodable bytes replaced), at most ``output_bytes`` bytes each."""
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    killed_reason: Optional[KilledReason]
    seconds: float
    """Wall-clock seconds from start to end, interpreter start-up and clean-up included."""
    cpu_seconds: Optional[float]
    """CPU seconds of the program and the children it waited for; None when the sandbox was killed."""

    @property
    def ok(self) -> bool:
        """The program exited with status 0 and no limit ended it."""
        return self.exit_code == 0 and self.killed_reason is None


def run_python(code: str, stdin: str = "", limits: SandboxLimits = DEFAULT_LIMITS,
               python: Optional[str] = None) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh sandbox (see the module docstring), feeding it ``stdin``.

    ``python``: the interpreter to run it with; by default :func:`default_interpreter` (this process's own
    when the sandbox user can run it). Raises :class:`SandboxUnavailable` when the sandbox cannot be made;
    whatever the program does (fail, hang, flood, fork) is reported in the result, not raised. TypeError /
    ValueError for a ``code`` or ``stdin`` that is not a str, or a program larger than ``file_size_mb``.
    """
    if not isinstance(code, str):
        raise TypeError(f"run_python: code must be a str, got {type(code).__name__}")
    if not isinstance(stdin, str):
        raise TypeError(f"run_python: stdin must be a str, got {type(stdin).__name__}")
    if len(code.encode()) > limits.file_size_mb << 20:  # main.py must fit the sandbox's /tmp
        raise ValueError(f"run_python: the program is {len(code.encode())} bytes, more than "
                         f"SandboxLimits.file_size_mb={limits.file_size_mb} MiB")
    return _run(code, stdin, limits, python or default_interpreter())


@functools.cache
def default_interpreter() -> str:
    """The first interpreter that starts inside the sandbox: this process's own, else ``python3`` on the PATH.

    This process's interpreter may be out of the sandbox user's reach (run as root from ``/root/.pyenv``, the
    user ``nobody`` cannot enter ``/root``); then a system ``python3`` is used and the choice is logged.
    Checked by running a one-line program once per process. Raises :class:`SandboxUnavailable` naming each
    interpreter tried and why it failed, or the setup step that failed.
    """
    candidates = [sys.executable]
    system = shutil.which("python3", path=_SANDBOX_ENV["PATH"])
    if system and os.path.realpath(system) != os.path.realpath(sys.executable):
        candidates.append(system)
    probe = "import sys; print(sys.version_info[0])"
    failures = []
    for python in candidates:
        try:
            result = _run(probe, "", SandboxLimits(wall_seconds=30.0), python)
        except SandboxUnavailable as exc:
            if exc.stage != "exec":
                raise  # the namespaces themselves: no other interpreter will do better
            failures.append(f"{python}: {exc}")
            continue
        if result.ok and result.stdout.strip() == "3":
            if failures:
                log.info("python sandbox: programs run with %s; %s cannot start in the sandbox (%s)",
                         python, sys.executable, failures[0])
            return python
        failures.append(f"{python}: exit code {result.exit_code}, signal {result.signal}, "
                        f"stderr {result.stderr[-300:]!r}")
    user = "nobody" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    raise SandboxUnavailable(
        f"no Python interpreter starts inside the sandbox (run as {user}): " + "; ".join(failures)
        + ". Pass run_python(python=...) an interpreter that user can run (its folders readable by all), "
        "or make the folders above this one searchable (chmod o+x)", stage="exec")


def _run(code: str, stdin: str, limits: SandboxLimits, python: str) -> SandboxResult:
    start = time.monotonic()
    status_r, status_w = os.pipe()
    code_fd = stdin_fd = -1
    try:
        code_fd = _read_only_tempfile(code.encode())
        stdin_fd = _read_only_tempfile(stdin.encode())
        cfg = {"python": python, "code_fd": code_fd, "status_fd": status_w, "parent_pid": os.getpid(),
               "run_as": _sandbox_user(), "env": _SANDBOX_ENV,
               "limits": {"cpu_seconds": limits.cpu_seconds, "memory_mb": limits.memory_mb,
                          "max_processes": limits.max_processes, "file_size_mb": limits.file_size_mb,
                          "open_files": limits.open_files}}
        # A new session: the launcher, the init and (unless it calls setsid) the program share one process
        # group, killed at once; the init's death takes the rest of the PID namespace with it.
        proc = subprocess.Popen([sys.executable, "-I", "-S", LAUNCHER, json.dumps(cfg)], stdin=stdin_fd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w, code_fd),
                                cwd="/", env=_SANDBOX_ENV, start_new_session=True)
    except BaseException:
        os.close(status_r)
        raise
    finally:
        for fd in (status_w, code_fd, stdin_fd):
            if fd >= 0:
                os.close(fd)  # the launcher has its copies; ours would keep the status pipe from reaching EOF
    try:
        streams, status, reason = _collect(proc, status_r, limits, start)
    finally:
        os.close(status_r)
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()
        _reap(proc)
    seconds = time.monotonic() - start
    records = [json.loads(line) for line in status.decode(errors="replace").splitlines() if line.startswith("{")]
    setup = next((r for r in records if "setup_error" in r), None)
    if setup is not None:
        raise SandboxUnavailable(f"python sandbox: setup step {setup['stage']!r} failed: {setup['setup_error']}. "
                                 f"{_HINTS.get(setup['stage'], '')}".rstrip(), stage=setup["stage"])
    end = next((r for r in records if "exit_code" in r), None)
    if end is None and reason is None:  # the launcher died on its own, before the program could start
        launcher_stderr = streams["stderr"][0].decode(errors="replace")[-2000:]
        raise SandboxUnavailable(f"python sandbox: the launcher exited with code {proc.returncode} without a "
                                 f"report; its stderr: {launcher_stderr!r}", stage="launcher")
    stdout = streams["stdout"][0].decode("utf-8", errors="replace")
    stderr = streams["stderr"][0].decode("utf-8", errors="replace")
    exit_code = None if end is None else end["exit_code"]
    sig = None if end is None else end["signal"]
    cpu = None if end is None else end["cpu_seconds"]
    if reason is None:
        reason = _limit_from_end(sig, cpu, stderr, exit_code, limits)
    return SandboxResult(exit_code=exit_code, signal=sig, stdout=stdout, stderr=stderr,
                         stdout_truncated=streams["stdout"][1], stderr_truncated=streams["stderr"][1],
                         timed_out=reason in ("wall_clock", "cpu_time"), killed_reason=reason,
                         seconds=seconds, cpu_seconds=cpu)


_HINTS = {
    "unshare": "The sandbox needs user namespaces: check sysctl user.max_user_namespaces > 0 (and "
               "kernel.unprivileged_userns_clone = 1 on Debian kernels, kernel.apparmor_restrict_unprivileged_userns"
               " = 0 on Ubuntu >= 23.10); in Docker, a seccomp profile that allows unshare.",
    "mount": "The sandbox needs Linux >= 5.12 (mount_setattr) and mount rights inside its user namespace.",
    "drop_privileges": "Run as root, the sandbox switches to the user 'nobody' (uid 65534).",
}


def _read_only_tempfile(data: bytes) -> int:
    """A read-only descriptor of an unlinked temporary file holding ``data`` (nothing left to clean up)."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        # Reopened read-only: the program gets its stdin this way and must not be able to write to it.
        return os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDONLY | os.O_CLOEXEC)


def _sandbox_user() -> Optional[tuple[int, int]]:
    """(uid, gid) the sandbox switches to: ``nobody`` when running as root, else None (keep our own)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _collect(proc: subprocess.Popen, status_r: int, limits: SandboxLimits,
             start: float) -> tuple[dict[str, tuple[bytes, bool]], bytes, Optional[KilledReason]]:
    """Read stdout / stderr (each capped) and the status pipe to EOF; kill on the wall clock or a flood.

    Returns ``({"stdout": (bytes, truncated), "stderr": ...}, status bytes, reason this process killed it)``.
    """
    buffers = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = {"stdout": False, "stderr": False}
    status = bytearray()
    reason: Optional[KilledReason] = None
    deadline = start + limits.wall_seconds
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
        sel.register(status_r, selectors.EVENT_READ, "status")
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                if reason is not None:
                    break  # killed, yet a pipe stays open past the grace period: stop waiting for it
                reason = "wall_clock"
                _kill(proc)
                deadline = time.monotonic() + _KILL_GRACE_S
                continue
            for key, _ in sel.select(left):
                data = os.read(key.fd, _READ_CHUNK)
                if not data:
                    sel.unregister(key.fd)
                elif key.data == "status":
                    status += data[:_READ_CHUNK]
                elif not truncated[key.data]:
                    buf = buffers[key.data]
                    room = limits.output_bytes - len(buf)
                    buf += data[:room]
                    if len(data) > room:
                        # Killed at once, not read on: the flood would otherwise keep a core busy until the
                        # wall clock, and what it prints past the cap is thrown away anyway.
                        truncated[key.data] = True
                        if reason is None:
                            reason = "output_limit"
                            _kill(proc)
                            deadline = time.monotonic() + _KILL_GRACE_S
    return {k: (bytes(buffers[k]), truncated[k]) for k in buffers}, bytes(status), reason


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group (launcher and init: the PID namespace dies with the init)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # safe: the launcher is not reaped yet, so its pid is not reused
    except ProcessLookupError:
        pass


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.wait()


def _limit_from_end(sig: Optional[int], cpu: Optional[float], stderr: str, exit_code: Optional[int],
                    limits: SandboxLimits) -> Optional[KilledReason]:
    """Which limit ended a program that ended by itself (see ``SandboxResult``), or None."""
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu is not None and cpu >= limits.cpu_seconds):
        return "cpu_time"
    if exit_code in (None, 0):
        return None
    tail = "\n".join(stderr.strip().splitlines()[-3:])
    if "MemoryError" in tail:
        return "memory"
    if "BlockingIOError: [Errno 11]" in tail or "can't start new thread" in tail:
        return "process_limit"
    return None


# ---- the tool -----------------------------------------------------------------------------------------

TOOL_LIMITS = SandboxLimits(output_bytes=8 * 1024)
"""Limits of :func:`python_sandbox`: the defaults with 8 KiB of output, so a reply fits a model's context.
Its docstring (what the model reads) quotes these numbers; a test keeps them in step."""


def python_sandbox(code: str) -> str:
    """Run a Python 3 program and return what it printed.

    The program runs alone with the standard library only: no network access, no input, a private empty
    working directory, 5 seconds of CPU time, 10 seconds in all, 512 MB of memory, and 8192 bytes of output.
    Print every result you need to see.

    Args:
        code: The complete Python program to run.

    Returns:
        The program's standard output, then its standard error, then a note when it failed, was stopped
        by a limit, or printed more than the limit.
    """
    return format_tool_result(run_python(code, limits=TOOL_LIMITS), TOOL_LIMITS)


def format_tool_result(result: SandboxResult, limits: SandboxLimits) -> str:
    """The text a model sees for ``result``: stdout, ``[stderr]`` and stderr, then bracketed notes."""
    parts = [result.stdout]
    if result.stdout_truncated:
        parts.append(f"\n[stdout truncated at {limits.output_bytes} bytes]\n")
    if result.stderr:
        parts.append(("" if not result.stdout or result.stdout.endswith("\n") else "\n") + "[stderr]\n"
                     + result.stderr)
        if result.stderr_truncated:
            parts.append(f"\n[stderr truncated at {limits.output_bytes} bytes]\n")
    notes = {
        "wall_clock": f"stopped: ran past the {limits.wall_seconds:g} s time limit",
        "cpu_time": f"stopped: used more than {limits.cpu_seconds} s of CPU time",
        "output_limit": f"stopped: printed more than {limits.output_bytes} bytes",
        "memory": f"stopped: ran out of memory ({limits.memory_mb} MB)",
        "process_limit": f"stopped: started more than {limits.max_processes} processes or threads",
    }
    text = "".join(parts)
    if result.killed_reason is not None:
        note = notes[result.killed_reason]
    elif result.exit_code not in (0, None):
        note = f"exit code {result.exit_code}"
    elif result.signal is not None:
        note = f"killed by signal {result.signal}"
    else:
        return text if text else "(no output)"
    return (text + ("" if not text or text.endswith("\n") else "\n")) + f"[{note}]"
