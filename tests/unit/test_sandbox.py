"""The Python sandbox, driven with real subprocesses: limits, isolation, clean-up, the tool and the reward.

Every program here runs in a real sandbox (no mocks); limits are small so the file takes seconds. Where a
test shows that something is blocked inside, it also shows the same thing works outside, so the test fails
if the isolation stops working rather than passing for an unrelated reason.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlhf_ray.agentic.sandbox import TOOL_LIMITS, SandboxLimits, SandboxUnavailable, python_sandbox, run_python
from rlhf_ray.rewards import FunctionReward, RewardError, build_reward_source, checked_scores
from rlhf_ray.rewards.code_exec import PythonSandboxReward, extract_code, python_sandbox_reward

FAST = SandboxLimits(cpu_seconds=1, wall_seconds=5.0, memory_mb=128, max_processes=8, output_bytes=4096)


def processes_named(comm: str) -> int:
    """How many processes on this machine have ``comm`` as their name (``/proc/<pid>/comm``)."""
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    n += f.read().strip() == comm
            except OSError:
                pass  # exited while we looked
    return n


def name_self(comm: str) -> str:
    """Source lines that set the sandboxed process's name, so this machine can count its processes."""
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {comm.encode()!r}, 0, 0, 0)  # PR_SET_NAME\n"


# ---------------------------------------------------------------- limits and plain programs

def test_limits_are_validated_naming_the_field():
    with pytest.raises(ValueError, match=r"SandboxLimits\.cpu_seconds must be a whole number >= 1, got 0"):
        SandboxLimits(cpu_seconds=0)
    with pytest.raises(ValueError, match=r"SandboxLimits\.wall_seconds must be .* > 0, got -1"):
        SandboxLimits(wall_seconds=-1)
    with pytest.raises(ValueError, match=r"SandboxLimits\.memory_mb must be >= 32"):
        SandboxLimits(memory_mb=8)
    with pytest.raises(ValueError, match=r"SandboxLimits\.max_processes must be a whole number >= 1, got 2\.5"):
        SandboxLimits(max_processes=2.5)


def test_program_output_exit_code_and_stdin():
    code = ("import sys\nname = sys.stdin.read().strip()\nprint(f'héllo {name}')\n"
            "print('warn', file=sys.stderr)\nsys.exit(3)\n")
    r = run_python(code, stdin="world\n", limits=FAST)
    assert (r.exit_code, r.signal, r.killed_reason, r.timed_out) == (3, None, None, False)
    assert r.stdout == "héllo world\n" and r.stderr == "warn\n"
    assert not r.stdout_truncated and not r.stderr_truncated and not r.ok
    assert 0 < r.seconds < FAST.wall_seconds and r.cpu_seconds is not None

    ok = run_python("print(sum(range(10)))", limits=FAST)
    assert ok.ok and ok.stdout == "45\n" and ok.exit_code == 0  # 0 + 1 + ... + 9 = 45

    # A traceback names main.py and the line, which is what a model reading the tool's reply needs.
    bad = run_python("x = 1\ny = x / 0\n", limits=FAST)
    assert bad.exit_code == 1 and bad.killed_reason is None
    assert 'File "/tmp/main.py", line 2' in bad.stderr and "ZeroDivisionError" in bad.stderr


def test_missing_interpreter_fails_closed():
    with pytest.raises(SandboxUnavailable, match=r"setup step 'exec' failed: starting /nonexistent/python3") as e:
        run_python("print(1)", limits=FAST, python="/nonexistent/python3")
    assert e.value.stage == "exec"


# A machine with user namespaces closed, made for one process: a child in its own user namespace (uids mapped
# 1:1 by this root process) sets user.max_user_namespaces = 0 there, then calls run_python.
_CLOSED_USERNS = """
import ctypes, os, sys
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    assert ctypes.CDLL(None).unshare(0x10000000) == 0  # CLONE_NEWUSER
    os.read(r, 1)
    open("/proc/sys/user/max_user_namespaces", "w").write("0")
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
for name in ("uid_map", "gid_map"):
    for _ in range(100):
        try:
            open(f"/proc/{pid}/{name}", "w").write("0 0 65536")
            break
        except PermissionError:  # the child has not unshared yet
            import time; time.sleep(0.01)
os.write(w, b"x")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
_CALL = """
from rlhf_ray.agentic.sandbox import run_python, SandboxUnavailable
try:
    print("RAN UNSANDBOXED", run_python("print(1)"))
except SandboxUnavailable as e:
    print(e.stage, e)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="making the closed machine needs root (it writes another uid_map)")
def test_without_user_namespaces_it_fails_closed():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _CLOSED_USERNS, _CALL], capture_output=True, text=True,
                         timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("unshare python sandbox: setup step 'unshare' failed: unshare(CLONE_NEWUSER")
    assert "user.max_user_namespaces" in out.stdout  # says which setting to check
    assert "RAN" not in out.stdout


# ---------------------------------------------------------------- the five attacks

def test_infinite_loop_is_stopped_by_the_cpu_limit():
    r = run_python("while True:\n    pass\n", limits=SandboxLimits(cpu_seconds=1, wall_seconds=10.0))
    assert r.killed_reason == "cpu_time" and r.timed_out and r.signal == signal.SIGXCPU
    assert r.exit_code is None and not r.ok
    assert r.seconds < 10.0  # ended by RLIMIT_CPU, long before the wall clock


def test_sleeping_program_is_killed_by_the_wall_clock():
    # Sleeping uses no CPU, so only the wall clock can stop it.
    r = run_python("import time\nprint('start', flush=True)\ntime.sleep(60)\n", limits=SandboxLimits(wall_seconds=1.0))
    assert r.killed_reason == "wall_clock" and r.timed_out
    assert (r.exit_code, r.signal, r.cpu_seconds) == (None, None, None)
    assert r.stdout == "start\n"  # unbuffered: what it printed before the kill is kept
    assert 1.0 <= r.seconds < 5.0


def test_fork_bomb_is_contained_and_leaves_nothing_behind():
    comm = f"bomb{uuid.uuid4().hex[:8]}"
    # Every process keeps forking and retries when the process limit refuses: only the wall clock ends it.
    bomb = name_self(comm) + ("import os, time\nwhile True:\n    try:\n        os.fork()\n"
                              "    except OSError:\n        time.sleep(0.005)\n")
    limits = SandboxLimits(cpu_seconds=2, wall_seconds=2.0, max_processes=8)
    seen, done = [], threading.Event()
    box = {}
    runner = threading.Thread(target=lambda: (box.update(r=run_python(bomb, limits=limits)), done.set()))
    runner.start()
    while not done.is_set():
        seen.append(processes_named(comm))
        time.sleep(0.02)
    runner.join()
    r = box["r"]
    assert r.killed_reason == "wall_clock"
    assert 2 <= max(seen) <= limits.max_processes  # it did fork, and never past the limit
    assert processes_named(comm) == 0  # none survives the sandbox


def test_process_limit_is_exact_and_reported():
    # Children that sleep stay alive, so forks succeed until the limit: the program itself + 4 children = 5.
    code = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n"
            "            os._exit(0)\n        n += 1\nfinally:\n    print(n, flush=True)\n")
    r = run_python(code, limits=SandboxLimits(max_processes=5, wall_seconds=5.0))
    assert r.stdout == "4\n"
    assert r.killed_reason == "process_limit" and r.exit_code == 1 and "BlockingIOError" in r.stderr


def test_child_that_leaves_the_session_dies_with_the_program():
    comm = f"daem{uuid.uuid4().hex[:8]}"
    # setsid() takes the child out of the process group this side kills; the PID namespace still ends it.
    code = name_self(comm) + ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
                              "    os._exit(0)\ntime.sleep(0.2)\nprint('parent exits')\n")
    r = run_python(code, limits=FAST)
    assert r.ok and r.stdout == "parent exits\n"
    assert processes_named(comm) == 0


def test_memory_hog_gets_memory_error_and_is_reported():
    code = "chunks = []\nfor _ in range(2048):\n    chunks.append(bytearray(1 << 20))\nprint('allocated 2 GiB')\n"
    r = run_python(code, limits=SandboxLimits(memory_mb=64, wall_seconds=5.0))
    assert r.killed_reason == "memory" and r.exit_code == 1
    assert r.stderr.rstrip().endswith("MemoryError") and r.stdout == ""
    assert not r.timed_out


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood_is_capped_and_killed_quickly(stream):
    code = f"import sys\nwhile True:\n    sys.{stream}.write('x' * 1000)\n"
    r = run_python(code, limits=SandboxLimits(output_bytes=4096, wall_seconds=10.0))
    kept = getattr(r, stream)
    assert kept == "x" * 4096  # exactly the cap, nothing more held in this process
    assert getattr(r, f"{stream}_truncated") and r.killed_reason == "output_limit"
    assert r.seconds < 5.0  # killed when the cap passed, not left to the 10 s wall clock


def test_no_network_inside_though_the_same_code_connects_outside():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    # UDP connect only looks up a route (no packet leaves): it tells whether an external address is reachable.
    code = (
        "import json, socket\nout = {}\n"
        f"for key, kind, addr in [('loopback', socket.SOCK_STREAM, ('127.0.0.1', {port})),\n"
        "                         ('external', socket.SOCK_DGRAM, ('203.0.113.7', 53))]:\n"
        "    s = socket.socket(socket.AF_INET, kind)\n    s.settimeout(2)\n    try:\n"
        "        s.connect(addr)\n        out[key] = 'connected'\n    except OSError as e:\n"
        "        out[key] = f'error: {e}'\n    s.close()\n"
        "out['interfaces'] = sorted(name for _, name in socket.if_nameindex())\nprint(json.dumps(out))\n")
    try:
        outside = json.loads(subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                                            text=True, timeout=10, check=True).stdout)
        listener.accept()[0].close()  # the outside run did connect
        inside_result = run_python(code, limits=FAST)
        assert inside_result.ok, inside_result.stderr
        inside = json.loads(inside_result.stdout)
        with pytest.raises(socket.timeout):
            listener.accept()  # and the sandboxed one did not
    finally:
        listener.close()
    assert outside["loopback"] == "connected"
    assert inside["loopback"] == "error: [Errno 101] Network is unreachable"
    assert inside["external"] == "error: [Errno 101] Network is unreachable"
    assert inside["interfaces"] == ["lo"]
    if outside["external"] != "connected":
        pytest.skip(f"this machine has no route to an external address ({outside['external']}); only the "
                    "loopback half of the proof ran")


# ---------------------------------------------------------------- the temporary directory, concurrency

@pytest.fixture
def host_dir():
    """A folder of this machine that anyone may write to, outside /tmp (which the sandbox replaces)."""
    path = tempfile.mkdtemp(prefix="sandbox-test-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    os.chmod(path, 0o777)  # writable by anyone, so only the read-only mount can stop the sandbox
    with open(os.path.join(path, "keep.txt"), "w") as f:
        f.write("host file")
    yield path
    shutil.rmtree(path)


def test_temporary_directory_is_private_fresh_and_removed(host_dir):
    tokens = [uuid.uuid4().hex for _ in range(3)]
    new_file, kept_file = os.path.join(host_dir, "new.txt"), os.path.join(host_dir, "keep.txt")
    code = (
        "import json, os, sys, time\ntoken = sys.stdin.read()\n"
        "open(token + '.txt', 'w').write(token)\ntime.sleep(0.5)  # overlap with the other sandboxes\n"
        "errors = []\n"
        f"for act in (lambda: open({new_file!r}, 'w'), lambda: os.remove({kept_file!r})):\n"
        "    try:\n        act()\n    except OSError as e:\n        errors.append(e.strerror)\n"
        "print(json.dumps({'cwd': os.getcwd(), 'home': os.environ['HOME'], 'files': sorted(os.listdir('.')),\n"
        "                  'errors': errors}))\n")
    with ThreadPoolExecutor(3) as pool:  # three at once from threads, as a rollout loop calls it
        results = list(pool.map(lambda t: run_python(code, stdin=t, limits=FAST), tokens))
    for token, r in zip(tokens, results):
        assert r.ok, r.stderr
        seen = json.loads(r.stdout)
        assert seen["cwd"] == seen["home"] == "/tmp"
        assert seen["files"] == sorted(["main.py", f"{token}.txt"])  # its own file only, not the others'
        assert seen["errors"] == ["Read-only file system"] * 2
        assert not os.path.exists(f"/tmp/{token}.txt")  # its /tmp was never this machine's /tmp
    assert sorted(os.listdir(host_dir)) == ["keep.txt"]
    fresh = run_python("import os\nprint(sorted(os.listdir('.')))", limits=FAST)
    assert fresh.stdout == "['main.py']\n"  # a new sandbox starts empty: the earlier ones' files are gone


# ---------------------------------------------------------------- the tool

def test_tool_returns_output_errors_and_notes():
    assert python_sandbox("print(6 * 7)") == "42\n"
    assert python_sandbox("pass") == "(no output)"
    failed = python_sandbox("print('before')\n1 / 0\n")
    assert failed.startswith("before\n[stderr]\nTraceback") and "ZeroDivisionError" in failed
    assert failed.endswith("[exit code 1]")
    flood = python_sandbox("while True:\n    print('y' * 100)\n")
    assert flood.endswith(f"[stdout truncated at {TOOL_LIMITS.output_bytes} bytes]\n"
                          f"[stopped: printed more than {TOOL_LIMITS.output_bytes} bytes]")


def test_tool_schema_for_a_chat_template():
    get_json_schema = pytest.importorskip("transformers.utils.chat_template_utils").get_json_schema
    schema = get_json_schema(python_sandbox)
    assert schema["function"]["name"] == "python_sandbox"
    assert schema["function"]["parameters"]["properties"]["code"]["type"] == "string"
    assert schema["function"]["parameters"]["required"] == ["code"]
    # The model reads the limits in the description: they must be the limits the tool runs with.
    doc = schema["function"]["description"]
    for phrase in (f"{TOOL_LIMITS.cpu_seconds} seconds of CPU time", f"{TOOL_LIMITS.wall_seconds:g} seconds in all",
                   f"{TOOL_LIMITS.memory_mb} MB of memory", f"{TOOL_LIMITS.output_bytes} bytes of output"):
        assert phrase in doc


# ---------------------------------------------------------------- the reward

def test_extract_code_takes_the_last_python_block():
    assert extract_code("a\n```python\nx = 1\n```\nthen\n```py\nx = 2\n```\n") == "x = 2\n"
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"  # no block: all of it
    # A block the token limit cut off is not a block; the earlier closed one is taken.
    assert extract_code("```python\nx = 1\n```\n```python\nx = 2") == "x = 1\n"


def test_reward_scores_passing_failing_looping_and_early_exit():
    reward = PythonSandboxReward(SandboxLimits(cpu_seconds=1, wall_seconds=4.0), max_workers=5)
    responses = [
        "Here:\n```python\ndef add(a, b):\n    return a + b\n```",             # passes
        "```python\ndef add(a, b):\n    return a - b\n```",                     # an assert fails
        "```python\nimport sys\nsys.exit(0)\ndef add(a, b):\n    return 0\n```",  # exits 0 before the tests
        "```python\ndef add(a, b):\n    while True:\n        pass\n```",        # loops: CPU limit
        "def add(a, b):\n    return b + a\n",                                   # no block: the whole response
    ]
    tests = ["assert add(2, 3) == 5", ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"],
             "assert add(2, 3) == 5", "assert add(1, 1) == 2", ["assert add(0, 0) == 0"]]
    scores = checked_scores(FunctionReward(reward, name="sandbox"), ["p"] * 5, responses,
                            {"tests": tests, "answer": [None] * 5}, timeout_s=60)
    assert scores == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_builtin_reward_without_tests_names_the_field_and_the_sample():
    source = build_reward_source("builtin:python_sandbox", timeout_s=60)
    assert source.fn is python_sandbox_reward
    with pytest.raises(RewardError, match=r"rows have no 'tests' field .* on sample 0"):
        checked_scores(source, ["p", "p"], ["x = 1", "x = 2"], {"answer": ["1", "2"]}, timeout_s=60)
    with pytest.raises(RewardError, match=r"sample 1 has no 'tests' \(None\).* on sample 1"):
        checked_scores(source, ["p", "p"], ["x = 1", "x = 2"], {"tests": ["assert x == 1", None]}, timeout_s=60)
    with pytest.raises(RewardError, match=r"sample 0 has 'tests' of type int"):
        checked_scores(source, ["p"], ["x = 1"], {"tests": [3]}, timeout_s=60)
