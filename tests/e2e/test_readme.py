"""Every command the README shows is run, here or by the test named for it, so the docs cannot drift.

Commands come from the README's code blocks. ``rlhf-ray`` commands run here in a scratch directory that
sees the repo's ``examples/`` (as a user in a clone would): ``make-tiny-model`` and ``validate`` as
written, ``train`` as ``validate`` with the same arguments (config, data, reward files all checked),
and the example it names must be trained by an e2e test (which loads that very file as its base
config and shortens it). Every other command must appear verbatim in the test file ``OTHER_TESTS``
maps it to (cluster and benchmark commands are run there; ``rlhf-ray eval`` and ``rlhf-ray report`` run as
written in a clone-like directory, on the runs they name). A README command that matches nothing fails.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"

OTHER_TESTS = {
    "bash launch/test.sh": REPO / ".ci" / "run",
    "python launch/submit.py": TESTS / "e2e" / "test_cluster.py",
    "ray job submit": TESTS / "e2e" / "test_cluster.py",
    "bash launch/single_node.sh": TESTS / "e2e" / "test_cluster.py",
    "ray up": TESTS / "unit" / "test_cluster_configs.py",
    "kubectl": TESTS / "unit" / "test_cluster_configs.py",
    "python benchmarks/": TESTS / "e2e" / "test_benchmarks.py",
    "bash benchmarks/": TESTS / "e2e" / "test_benchmarks.py",
    # Run as written in a clone-like directory, on the runs they name (shared fixtures / the report test).
    "bash launch/demo.sh": TESTS / "e2e" / "conftest.py",
    "rlhf-ray eval": TESTS / "e2e" / "conftest.py",
    "rlhf-ray report": TESTS / "e2e" / "test_report.py",
}


def readme_commands() -> list[str]:
    """Shell commands in the README's code blocks (indented or fenced), comments and prompts stripped."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    blocks += ["\n".join(m.group(0).splitlines()) for m in re.finditer(r"(?m)(?:^(?: {4}|\t).*\n?)+", text)]
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#") and re.match(r"(rlhf-ray|python|bash|ray|kubectl)\b", line):
                commands.append(line)
    return list(dict.fromkeys(commands))


def test_readme_has_the_two_quickstart_commands():
    commands = readme_commands()
    assert commands[:2] == ["bash launch/demo.sh", "bash launch/test.sh"]
    assert "exec bash launch/test.sh" in (REPO / ".ci" / "run").read_text()  # CI runs the README's test command


def test_readme_pictures_are_small_pngs_that_show_something():
    """Every image the README shows is in the repo, a PNG that decodes, not blank, and small enough to keep there."""
    import numpy as np
    from PIL import Image

    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (REPO / "README.md").read_text())
    assert pictures
    for name in pictures:
        path = REPO / name
        assert path.is_file() and path.stat().st_size < 250_000, (name, path.stat().st_size if path.exists() else None)
        img = Image.open(path)
        img.load()
        gray = np.asarray(img.convert("L"), dtype=np.float64)
        assert img.format == "PNG" and gray.std() > 0 and (gray < 250).mean() > 0.01, name


def test_commands_run_elsewhere_are_in_their_tests():
    for cmd in readme_commands():
        for prefix, test_file in OTHER_TESTS.items():
            if cmd.startswith(prefix):
                assert test_file.is_file(), f"README command {cmd!r}: {test_file} does not exist"
                assert cmd in test_file.read_text(), f"README command {cmd!r} is not run by {test_file}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory laid out like a clone: examples/ and launch/ visible, runs/ written here."""
    d = tmp_path_factory.mktemp("readme")
    for name in ("examples", "launch", "rlhf_ray", "setup.py", "README.md"):
        (d / name).symlink_to(REPO / name)
    return d


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_every_rlhf_ray_command_runs(scratch, monkeypatch, capsys):
    """Through ``rlhf_ray.cli.main``, the function the ``rlhf-ray`` console script calls, in the scratch clone."""
    from rlhf_ray.cli import main

    commands = [c for c in readme_commands() if c.startswith("rlhf-ray")
                and not c.startswith(tuple(OTHER_TESTS))]  # eval and report: run in their tests
    assert commands, "no rlhf-ray commands found in the README"
    monkeypatch.chdir(scratch)

    def rlhf(argv: list[str]) -> None:
        code = main(argv)
        assert code == 0, f"rlhf-ray {' '.join(argv)} -> {code}: {capsys.readouterr().err[-2000:]}"

    # make-tiny-model first (every example reads runs/tiny-model); the PPO example's reward model is
    # runs/rm-tiny/final, which `train examples/rm_tiny_cpu.yaml` writes: a tiny stand-in is made for it here.
    order = sorted(commands, key=lambda c: not c.startswith("rlhf-ray make-tiny-model"))
    for cmd in order:
        argv = shlex.split(cmd)[1:]
        if argv[0] == "pipeline" and "--dry-run" not in argv:
            # Every stage's config checked, references and gates resolved; the pipeline machinery itself runs end to
            # end in test_pipeline (the Quickstart's demo pipeline, a resumed one, a failing gate).
            argv = [*argv, "--dry-run"]
        if argv[0] == "train":
            example = argv[1]
            trained_by = [p.name for p in (TESTS / "e2e").glob("test_*.py") if example in p.read_text()
                          and p.name != "test_readme.py"]
            assert trained_by, f"README command {cmd!r}: no e2e test trains {example}"
            if "rm-tiny/final" in (scratch / example).read_text() and not (scratch / "runs/rm-tiny/final").exists():
                rlhf(["make-tiny-model", "runs/rm-tiny/final", "--reward-model"])
            argv = ["validate", *argv[1:]]
        rlhf(argv)


def test_quickstart_demo_runs(demo_run):
    """`bash launch/demo.sh` as the Quickstart gives it (installs if needed, then the tiny pipeline SFT -> GRPO ->
    eval; run once for the session by ``conftest.demo_run``): it says where the metrics, models and report are,
    and they are there."""
    printed = demo_run.proc.stdout
    assert "pipeline passed (3 stages)" in printed and f"demo done: {demo_run.out}" in printed, printed[-3000:]
    out = demo_run.out
    for stage in ("sft", "grpo", "eval"):
        assert f"metrics {out / stage}/metrics.jsonl" in printed and (out / stage / "metrics.jsonl").is_file()
    for model in (out / "sft" / "final", out / "grpo" / "final", out / "grpo" / "best"):
        assert f"model   {model}  " in printed and (model / "model.safetensors").is_file()
    assert f"eval    {out / 'eval' / 'eval.json'}" in printed and (out / "eval" / "eval.json").is_file()
    assert f"report  {out / 'report.html'}" in printed and (out / "report.html").is_file()
    print(f"demo: {demo_run.seconds:.0f} s")  # the Quickstart promises ~3 minutes after install on 2 idle cores


def test_reward_server_command_serves(scratch):
    """The README's reward-server commands (a reward file; the tiny random model as a judge, on vLLM), each on a
    free port instead of its example port. The judge's scoring is checked verdict by verdict in
    test_judge_server.py."""
    import json
    import time
    import urllib.request

    cmds = [c for c in readme_commands() if c.startswith("python -m rlhf_ray.rewards.server")]
    assert cmds and any("--judge" in c for c in cmds)
    if not (scratch / "runs" / "tiny-model").exists():  # the judge's model; test_every_rlhf_ray_command_runs makes it
        from rlhf_ray.models.tiny import make_tiny_model

        make_tiny_model(scratch / "runs" / "tiny-model")
    for cmd in cmds:
        argv = shlex.split(re.sub(r"--port \d+", "--port 0", cmd))
        env = {k: v for k, v in os.environ.items() if k != "RLHF_RAY_REWARD_TOKEN"} | {"PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, *argv[1:]], cwd=scratch, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            # No token given: the server prints the one it generated, once, as RLHF_RAY_REWARD_TOKEN=<token>.
            token = proc.stdout.readline().strip().removeprefix("RLHF_RAY_REWARD_TOKEN=")
            line = next(line for line in proc.stderr if " serving " in line)
            port = int(re.search(r"http://[\d.]+:(\d+)", line).group(1))
            body = json.dumps({"prompts": ["p"], "responses": ["r"], "row_fields": {}}).encode()
            deadline = time.monotonic() + 10
            while True:
                try:
                    with urllib.request.urlopen(urllib.request.Request(
                            f"http://127.0.0.1:{port}/score", data=body, method="POST",
                            headers={"Authorization": f"Bearer {token}"}), timeout=5) as resp:
                        rewards = json.loads(resp.read())["rewards"]
                    assert len(rewards) == 1
                    # the tiny judge (weight 1): a digit d in its verdict scores d / 9, none the default 4.5 / 9
                    assert "--judge" not in cmd or 0.0 <= rewards[0] <= 1.0, rewards
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(10)
