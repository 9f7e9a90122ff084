"""The sandbox's launcher, run by :func:`rlhf_ray.agentic.sandbox.run_python` as a script, never imported.

    python -I -S _sandbox_launcher.py '<config json>'

Three processes, so that no code runs between ``fork`` and ``exec`` in the caller (``preexec_fn`` is unsafe
in a threaded controller) and so that nothing the program starts can outlive it:

1. **launcher** (this script, started by the controller in a new session): as root, drops to the sandbox user
   (``nobody``); makes new user, mount, network, PID and IPC namespaces; maps its own uid / gid into the user
   namespace; forbids nested user namespaces; makes every mount read-only and mounts a fresh ``tmpfs`` of
   ``file_size_mb`` on ``/tmp`` holding ``main.py``; forks the init, waits for it.
2. **init** (PID 1 of the new PID namespace): forks the program and waits for it; when it exits, the kernel
   kills whatever else is left in the namespace (a daemonised child, a fork bomb's survivors).
3. **program**: sets the resource limits, then execs ``python -I -S -B -u -X utf8 main.py`` in ``/tmp``.

The init reports one JSON line on the status descriptor: ``{"exit_code", "signal", "cpu_seconds"}`` of the
program; a setup step that fails reports ``{"setup_error", "stage"}`` instead, and the launcher exits 2.
Standard library only, and nothing from ``rlhf_ray`` (``-I`` keeps the package off ``sys.path``).
"""

import ctypes
import json
import os
import resource
import signal
import sys

# <sched.h>, <sys/prctl.h>, <sys/mount.h>, <linux/mount.h>: Python 3.11 has neither os.unshare nor mount.
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12, after the tables merged)

SETUP_FAILED = 2
WORKDIR = "/tmp"

_libc = ctypes.CDLL(None, use_errno=True)
# Declared so every argument reaches the kernel at its C width (flags are unsigned long, AT_FDCWD a negative int).
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p,
                          ctypes.c_size_t]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class SetupError(Exception):
    """A setup step failed; ``stage`` names it for the controller's error message."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


def _check(result: int, stage: str, call: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(stage, f"{call} failed: [Errno {errno}] {os.strerror(errno)}")


def _write(path: str, text: str, stage: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise SetupError(stage, f"writing {text!r} to {path}: {exc}") from None


def _report(fd: int, record: dict) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def _to_devnull(fds: tuple[int, ...]) -> None:
    # The launcher and the init must not hold the program's stdout / stderr pipes open: the controller reads
    # them to EOF, which then comes exactly when the program and everything it started are gone.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        os.dup2(null, fd)
    os.close(null)


def isolate(cfg: dict) -> bytes:
    """Steps 1 of the module docstring, in the launcher; returns the program's source read before ``/tmp`` is
    replaced. Raises SetupError naming the step that failed."""
    code = b""
    while chunk := os.read(cfg["code_fd"], 1 << 20):
        code += chunk
    os.close(cfg["code_fd"])
    uid, gid = os.getuid(), os.getgid()
    if cfg["run_as"] is not None:
        uid, gid = cfg["run_as"]
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except OSError as exc:
            raise SetupError("drop_privileges", f"switching to uid {uid} / gid {gid}: {exc}") from None
    # Set after the uid change, which clears it. It fires when the controller *thread* that started us ends,
    # which is after run_python returns: that thread waits for us. Controller gone already: do not start.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl", "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != cfg["parent_pid"]:
        os._exit(SETUP_FAILED)
    # A process that changed uid is not dumpable, and then its /proc/self files belong to root: it could not
    # write its own uid_map below.
    _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl", "prctl(PR_SET_DUMPABLE)")
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    _check(_libc.unshare(flags), "unshare", "unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWNET|CLONE_NEWPID|CLONE_NEWIPC)")
    # Identity maps: the program keeps its uid (not root inside the namespace either, so exec drops every
    # capability), and files it writes on the tmpfs get an owner the kernel can represent.
    _write("/proc/self/uid_map", f"{uid} {uid} 1", "uid_map")
    _write("/proc/self/setgroups", "deny", "uid_map")
    _write("/proc/self/gid_map", f"{gid} {gid} 1", "uid_map")
    # A nested user namespace would give the program mount rights again (e.g. an unbounded tmpfs to fill).
    _write("/proc/sys/user/max_user_namespaces", "0", "max_user_namespaces")
    # Private first, so nothing mounted here propagates back to the host.
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount", "mount(/, MS_REC|MS_PRIVATE)")
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)),
           "mount", "mount_setattr(/, AT_RECURSIVE, MOUNT_ATTR_RDONLY)")
    options = f"size={cfg['limits']['file_size_mb']}m,mode=0700,uid={uid},gid={gid}".encode()
    _check(_libc.mount(b"tmpfs", WORKDIR.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), "mount",
           f"mount(tmpfs on {WORKDIR})")
    return code


def set_limits(limits: dict) -> None:
    """The program's resource limits (see ``SandboxLimits``); set in the program's process just before exec."""
    mb = 1 << 20
    cpu = limits["cpu_seconds"]
    # SIGXCPU at the soft limit; SIGKILL a second later if the program catches SIGXCPU.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb,) * 2)
    # Counted per user namespace (Linux >= 5.14), so per sandbox: the program's processes and threads plus the
    # launcher and the init, which were counted when they joined the namespace.
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"] + 2,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(cfg: dict, status_fd: int) -> None:
    """Step 3: limits, then exec the interpreter on ``main.py``; reports a failed exec and exits 127."""
    try:
        os.chdir(WORKDIR)
        set_limits(cfg["limits"])
        os.set_inheritable(status_fd, False)  # closed by a successful exec: the program never sees it
        python = cfg["python"]
        os.execve(python, [python, "-I", "-S", "-B", "-u", "-X", "utf8", "main.py"], cfg["env"])
    except OSError as exc:
        _report(status_fd, {"stage": "exec", "setup_error": f"starting {cfg['python']}: {exc}"})
    finally:
        os._exit(127)


def init(cfg: dict, status_fd: int) -> None:
    """Step 2: PID 1 of the sandbox; forks the program, reaps everything, reports the program's end."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the launcher killed -> the whole namespace goes
    program = os.fork()
    if program == 0:
        run_program(cfg, status_fd)
    _to_devnull((0, 1, 2))
    while True:
        try:
            pid, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(SETUP_FAILED)  # cannot happen: the program is our child until we reap it
        if pid == program:
            break  # orphans re-parented to us are reaped here too, and the rest die with the namespace
    _report(status_fd, {
        "exit_code": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    })
    os._exit(0)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    try:
        code = isolate(cfg)
        with open(os.path.join(WORKDIR, "main.py"), "wb") as f:
            f.write(code)
    except SetupError as exc:
        _report(status_fd, {"stage": exc.stage, "setup_error": str(exc)})
        os._exit(SETUP_FAILED)
    except OSError as exc:
        _report(status_fd, {"stage": "workdir", "setup_error": f"writing {WORKDIR}/main.py: {exc}"})
        os._exit(SETUP_FAILED)
    child = os.fork()  # the first child after unshare(CLONE_NEWPID) is the new namespace's PID 1
    if child == 0:
        init(cfg, status_fd)
    _to_devnull((0, 1, 2))
    os.close(status_fd)
    _, status = os.waitpid(child, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else SETUP_FAILED)


if __name__ == "__main__":
    main()
