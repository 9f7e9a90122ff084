"""Run it where users run it: a real two-node Ray cluster, jobs sent with `ray job submit`.

The cluster is started with the README's commands: ``ray start --head`` and a second node joined with
``ray start --address`` (both on this machine, each with its own ports and temp dir, logical GPUs and a
node label ``rlhf-ray/pool``). Jobs go through ``launch/submit.py`` and the plain ``ray job submit``;
``launch/single_node.sh`` starts its own head. The cluster is torn down by process group and by its
private temp dir (never ``ray stop``, which would stop every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlhf_ray.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
POOL = "rlhf-ray/pool"  # the node label the configs select on (cluster_configs/ set the same one)
JOB_TIMEOUT_S = 600

# The README's "Run on a cluster" commands, verbatim. The tests run them as written with the placeholders
# (HEAD, HEAD_IP, the default ports, 8 GPUs) replaced by this machine's cluster, then flags or tiny-run
# overrides appended (`test_readme_shows_these_commands` keeps the two in step).
README_HEAD = "ray start --head --port=6379 --num-gpus=8 --labels=rlhf-ray/pool=learner"
README_NODE = "ray start --address=HEAD_IP:6379 --num-gpus=8 --labels=rlhf-ray/pool=rollout"
README_SUBMIT = "python launch/submit.py --address http://HEAD:8265 examples/grpo_tiny_cpu.yaml placement.node_selector.actor.rlhf-ray/pool=learner placement.node_selector.rollout.rlhf-ray/pool=rollout --follow"  # noqa: E501
README_LOGS = "ray job logs --address http://HEAD:8265 raysubmit_XXXX"
README_PLAIN = "ray job submit --address http://HEAD:8265 --working-dir . -- python -m rlhf_ray train examples/sft_tiny_cpu.yaml"  # noqa: E501
README_SINGLE = "bash launch/single_node.sh examples/sft_tiny_cpu.yaml learner.gpus_per_worker=1"


def readme_argv(cmd: str, *extra: str, **subs: str) -> list[str]:
    """``cmd`` split, each ``old=new`` of ``subs`` applied to a whole argument or to the value of ``--old=...``
    (``_`` in ``old`` read as ``-``), the leading ``python`` made this interpreter, ``extra`` appended."""
    argv = []
    for arg in shlex.split(cmd):
        for old, new in subs.items():
            flag = f"--{old.replace('_', '-')}="
            if arg == old:
                arg = new
            elif arg.startswith(flag):
                arg = flag + new
        argv.append(arg)
    if argv[0] == "python":
        argv[0] = sys.executable
    return argv + list(extra)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_port_flags() -> list[str]:
    """Ports every Ray node opens at fixed defaults; two nodes on one machine (and other tests) need their own."""
    a, g, r, m = free_ports(4)
    return [f"--dashboard-agent-listen-port={a}", f"--dashboard-agent-grpc-port={g}", f"--runtime-env-agent-port={r}",
            f"--metrics-export-port={m}", "--object-store-memory=300000000", "--disable-usage-stats"]


def kill_tree(procs: list[subprocess.Popen], root: Path) -> None:
    """Stop what we started: each `ray start --block` process group, then any process left under ``root``
    (Ray workers, job drivers and vLLM engines run with their command line or working dir there)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5.0  # a graceful stop first (the jobs are over, so little to drain)
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in leftover_pids(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def leftover_pids(root: Path) -> list[int]:
    """Live processes (not zombies) whose command line or working dir is under ``root``."""
    out, mark = [], str(root)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if (d / "stat").read_text().split(") ", 1)[1].startswith("Z"):
                continue
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(d / "cwd")
        except (OSError, IndexError):
            continue
        if mark in cmdline or cwd == mark or cwd.startswith(mark + "/"):
            out.append(int(d.name))
    return out


@dataclass
class LocalCluster:
    root: Path
    gcs: str
    dashboard: str
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, args: list[str], timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
        """A command from the repo root with the cluster's environment (its auth token)."""
        return subprocess.run(args, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self, args: list[str]) -> subprocess.Popen:
        """``run``, started and not waited for (``finish`` collects it)."""
        return subprocess.Popen(args, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def state(self) -> dict:
        """Alive nodes with their labels, submission id -> Ray job id, and every actor's node and pid."""
        probe = (
            "import json, sys\n"
            "from ray.job_submission import JobSubmissionClient\n"
            "from ray.util.state import list_actors, list_nodes\n"
            "a = sys.argv[1]\n"
            "nodes = {n.node_id: n.labels for n in list_nodes(address=a, detail=True) if n.state == 'ALIVE'}\n"
            "jobs = {j.submission_id: j.job_id for j in JobSubmissionClient(a).list_jobs() if j.submission_id}\n"
            "actors = [dict(cls=x.class_name, pid=x.pid, node=x.node_id, job=x.job_id)\n"
            "          for x in list_actors(address=a, detail=True, limit=10000)]\n"
            "print(json.dumps(dict(nodes=nodes, jobs=jobs, actors=actors)))\n")
        proc = self.run([sys.executable, "-c", probe, self.dashboard], timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])


def start_node(args: list[str], root: Path, env: dict, name: str) -> subprocess.Popen:
    log = open(root / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the node
    return subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(cond, what: str, procs: list[subprocess.Popen], root: Path, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                logs = "\n".join(f.read_text()[-2000:] for f in root.glob("*.log"))
                raise RuntimeError(f"{what}: `{' '.join(map(str, p.args[:3]))}` exited {p.returncode}\n{logs}")
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready within {timeout:.0f} s")


@pytest.fixture(scope="module")
def cluster():
    """Head (3 logical GPUs, rlhf-ray/pool=learner) + a joined node (2 logical GPUs, rlhf-ray/pool=rollout)."""
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    (root / "token").write_text(os.urandom(16).hex())
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(root / "token"), DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    gcs_port, dash_port, client_port = free_ports(3)
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start_node(readme_argv(
            README_HEAD, f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={client_port}", f"--temp-dir={root / 'head'}", "--num-cpus=6",
            *node_port_flags(), "--block", port=str(gcs_port), num_gpus="3"), root, env, "head"))
        address_file = root / "head" / "ray_current_cluster"
        gcs = wait_for(lambda: address_file.is_file() and address_file.read_text().strip(), "head", procs, root)
        procs.append(start_node(readme_argv(
            README_NODE, f"--temp-dir={root / 'node2'}", "--num-cpus=6", *node_port_flags(), "--block",
            address=gcs, num_gpus="2"), root, env, "node2"))
        c = LocalCluster(root, gcs, f"http://127.0.0.1:{dash_port}", env, procs)
        wait_for(lambda: len(c.state()["nodes"]) == 2, "second node", procs, root)
        yield c
    finally:
        kill_tree(procs, root)
        shutil.rmtree(root, ignore_errors=True)


def submit(c: LocalCluster, config: str, *overrides: str) -> subprocess.Popen:
    """`python launch/submit.py --address DASHBOARD CONFIG k=v ... --follow`, started (not waited for)."""
    return start_helper(c, [sys.executable, "launch/submit.py", "--address", c.dashboard, config, *overrides,
                            "--follow"])


def start_helper(c: LocalCluster, argv: list[str]) -> subprocess.Popen:
    """Without RAY_AUTH_MODE: the helper finds the token (RAY_AUTH_TOKEN_PATH) and uses it by itself."""
    env = {k: v for k, v in c.env.items() if k != "RAY_AUTH_MODE"}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    return proc.returncode, out, err


def job_id(stdout: str) -> str:
    """The first submission id in a command's output (the helper prints it bare, `ray job submit` quoted)."""
    return re.search(r"raysubmit_\w+", stdout).group(0)


SFT_TINY = ["train.max_steps=3", "train.save_every=3", "train.eval_every=3", "logging.progress_bar=false",
            "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def jobs(cluster, tiny_model_dir, tmp_path_factory):
    """Two tiny jobs at once, each followed to the end: GRPO through the helper (learners on the `learner` node,
    the vLLM engine on the `rollout` node) and SFT through the README's plain `ray job submit` (learners spread
    over both nodes)."""
    out = tmp_path_factory.mktemp("cluster_jobs")
    grpo = start_helper(cluster, readme_argv(
        README_SUBMIT, f"model.path={tiny_model_dir}", f"train.output_dir={out / 'grpo'}", "algo.total_steps=3",
        "learner.gpus_per_worker=1", "logging.progress_bar=false", **{"http://HEAD:8265": cluster.dashboard}))
    sft = cluster.start(readme_argv(
        README_PLAIN, f"model.path={tiny_model_dir}", f"train.output_dir={out / 'sft'}", *SFT_TINY,
        "learner.gpus_per_worker=1", "placement.strategy=STRICT_SPREAD", **{"http://HEAD:8265": cluster.dashboard}))
    return {"grpo": (*finish(grpo), out / "grpo"), "sft": (*finish(sft), out / "sft")}


def test_grpo_through_the_submit_helper_and_sft_through_plain_ray_job_submit(jobs):
    """(1) Both jobs succeed and wrote their outputs, their logs streamed back: the helper exits 0 and says
    SUCCEEDED; the README's plain command, `ray job submit --working-dir . -- python -m rlhf_ray train CONFIG
    k=v ...`, exits 0 and says it succeeded."""
    for name, (code, out, err, run_dir) in jobs.items():
        assert code == 0, f"{name}: {err[-3000:]}\n{out[-3000:]}"
        assert "placement plan:" in out, "the plan is printed (in the streamed job log) before the roles start"
        assert len(read_metrics(run_dir / "metrics.jsonl")) == 3
        assert (run_dir / "final" / "config.json").is_file() and (run_dir / "config.yaml").is_file()
    assert f"job {job_id(jobs['grpo'][1])} ended SUCCEEDED" in jobs["grpo"][1]
    assert "on nodes {rlhf-ray/pool=rollout} <- rollout" in jobs["grpo"][1]
    sft_out = jobs["sft"][1] + jobs["sft"][2]
    assert f"Job '{job_id(sft_out)}' succeeded" in sft_out, sft_out[-3000:]


def test_roles_land_on_the_nodes_the_config_names(cluster, jobs):
    """(2) GRPO: every actor rank on the node labelled learner, the vLLM engine on the node labelled rollout
    (read back from Ray's own actor table by pid). SFT with STRICT_SPREAD: its two learners on two nodes."""
    state = cluster.state()
    pool_of = {node: labels.get(POOL) for node, labels in state["nodes"].items()}
    node_of_pid = {a["pid"]: a["node"] for a in state["actors"]}

    report = json.loads((jobs["grpo"][3] / "placement.json").read_text())
    actor_nodes = {pool_of[node_of_pid[r["pid"]]] for r in report["roles"]["actor"]}
    rollout_nodes = {pool_of[node_of_pid[r["pid"]]] for r in report["roles"]["rollout"]}
    assert actor_nodes == {"learner"} and rollout_nodes == {"rollout"}, report
    assert len(report["roles"]["actor"]) == 2 and len(report["roles"]["rollout"]) == 1

    sft_job = state["jobs"][job_id(jobs["sft"][1])]
    learners = [a for a in state["actors"] if a["job"] == sft_job and a["cls"] == "LearnerWorker"]
    assert len(learners) == 2 and {pool_of[a["node"]] for a in learners} == {"learner", "rollout"}, learners


def test_failing_job_exits_nonzero_and_its_error_is_in_ray_job_logs(cluster, tiny_model_dir, tmp_path):
    """A job asking for nodes nobody has fails before any actor starts: the helper exits 1 with the error on
    one line, and `ray job logs <id>` shows the same error."""
    code, out, err = finish(submit(
        cluster, "examples/sft_tiny_cpu.yaml", f"model.path={tiny_model_dir}", f"train.output_dir={tmp_path / 'bad'}",
        *SFT_TINY, "learner.gpus_per_worker=1", f"placement.node_selector.learner.{POOL}=h100"))
    assert code == 1, out[-3000:] + err[-3000:]
    jid = job_id(out)
    assert f"job {jid} ended FAILED" in out
    error = "placement error: placement.node_selector (learner): no alive node has the labels {rlhf-ray/pool=h100}"
    assert error in err and "Traceback" not in err, err
    logs = cluster.run(readme_argv(README_LOGS, **{"http://HEAD:8265": cluster.dashboard, "raysubmit_XXXX": jid}),
                       timeout=120)
    assert logs.returncode == 0 and error in logs.stdout, logs.stdout[-3000:] + logs.stderr[-3000:]
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_single_node_script_starts_and_stops_its_own_head(tiny_model_dir, tmp_path):
    """`bash launch/single_node.sh CONFIG k=v ...` on a machine with 2 (logical) GPUs: it starts a Ray head,
    the learners take the GPUs, and nothing of that head is left running afterwards."""
    root = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    port, dash, client = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    (root / "token").write_text(os.urandom(16).hex())
    env.update(NUM_GPUS="2", NUM_CPUS="4", RAY_PORT=str(port), RAY_TEMP_DIR=str(root / "ray"),
               RAY_AUTH_TOKEN_PATH=str(root / "token"),  # no RAY_AUTH_MODE: the script agrees with the head itself
               RAY_START_ARGS=" ".join([f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                                        *node_port_flags()]))
    try:
        proc = subprocess.run(readme_argv(README_SINGLE, f"model.path={tiny_model_dir}",
                                          f"train.output_dir={tmp_path / 'sft'}", *SFT_TINY),
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "with 2 GPUs" in proc.stdout
        assert len(read_metrics(tmp_path / "sft" / "metrics.jsonl")) == 3
        time.sleep(1.0)
        assert leftover_pids(root) == []
    finally:
        for pid in leftover_pids(root):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("args, message", [
    (["examples/missing.yaml"], "submit: config file not found: examples/missing.yaml"),
    (["examples/sft_tiny_cpu.yaml", "optim.lrr=1"], "submit: config error: unknown config key 'optim.lrr'"),
    (["--address", "http://127.0.0.1:1", "examples/sft_tiny_cpu.yaml"],
     "submit: cannot reach the Ray dashboard at http://127.0.0.1:1"),
])
def test_submit_helper_bad_input_is_one_clear_line(args, message):
    proc = subprocess.run([sys.executable, "launch/submit.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_readme_shows_these_commands():
    readme = (REPO / "README.md").read_text()
    for cmd in (README_HEAD, README_NODE, README_SUBMIT, README_LOGS, README_PLAIN, README_SINGLE):
        assert f"    {cmd}\n" in readme, cmd
