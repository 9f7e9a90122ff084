"""End-to-end fixtures shared across files: a reward model trained once by the real ``rm`` job, and runs made by
README commands in a directory laid out like a clone (a short GRPO run, evaluations, the Quickstart's demo)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def trained_rm(ray_cluster, tiny_model_dir, tmp_path_factory):
    """(config, result, output dir) of a 120-step ``job: rm`` run on the demo preference set.

    test_preference checks what it learned and exported; test_rl's PPO run uses its export as the reward model.
    """
    from rlhf_ray.jobs import get_job
    from tests.e2e.test_preference import pref_config

    out = tmp_path_factory.mktemp("trained_rm") / "rm"
    cfg = pref_config("rm", tiny_model_dir, out, **{
        "train.max_steps": 120, "train.eval_every": 40, "optim.min_lr_ratio": 0.1})
    return cfg, get_job("rm").run(cfg), out


# ---- runs in a directory laid out like a clone, where README commands run as written -----------------------------

REPO = Path(__file__).resolve().parents[2]

EVAL_COMMAND = "rlhf-ray eval examples/eval_tiny_cpu.yaml"
"""The README's eval command, run as written by ``eval_tiny_run``."""
EVAL_FINAL_COMMAND = (
    "rlhf-ray eval examples/eval_tiny_cpu.yaml model.path=runs/grpo-tiny/final train.output_dir=runs/grpo-tiny-eval")
"""The README's eval of a run's final/, run as written by ``grpo_final_eval``."""
GRPO_SHORT = ["train", "examples/grpo_tiny_cpu.yaml", "algo.total_steps=4", "train.eval_every=2",
              "data.eval_fraction=0.05", "logging.progress_bar=false"]
"""The README's GRPO example, 4 of its steps, with a held-out set evaluated every 2 steps."""


@dataclass(frozen=True)
class CliRun:
    """One ``rlhf-ray`` command run in the clone: its exit code, what it printed and the run directory."""

    code: int
    out: str
    err: str
    run_dir: Path


def rlhf_ray_in(clone: Path, argv: list[str], run_dir: str) -> CliRun:
    """``rlhf_ray.cli.main(argv)`` (what the ``rlhf-ray`` script calls) with ``clone`` as the working directory."""
    from rlhf_ray.cli import main

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(clone)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(cwd)
    return CliRun(code, out.getvalue(), err.getvalue(), clone / run_dir)


@pytest.fixture(scope="session")
def clone(tiny_model_dir, tmp_path_factory):
    """A directory laid out like a clone of the repo: examples/ and launch/ seen through links, runs/tiny-model the
    session's tiny model (what `rlhf-ray make-tiny-model runs/tiny-model` writes)."""
    d = tmp_path_factory.mktemp("clone")
    for name in ("examples", "launch", "rlhf_ray", "setup.py", "README.md"):  # what `pip install -e .` reads too
        (d / name).symlink_to(REPO / name)
    (d / "runs").mkdir()
    (d / "runs" / "tiny-model").symlink_to(tiny_model_dir)
    return d


@pytest.fixture(scope="session")
def eval_tiny_run(ray_cluster, clone) -> CliRun:
    """``EVAL_COMMAND`` as written: the tiny model, 2 vLLM engines, 8 samples per prompt and greedy, into
    runs/eval-tiny. test_eval checks its numbers; test_report reports on it."""
    run = rlhf_ray_in(clone, shlex.split(EVAL_COMMAND)[1:], "runs/eval-tiny")
    assert run.code == 0, run.err[-3000:]
    return run


@pytest.fixture(scope="session")
def grpo_tiny_run(ray_cluster, clone) -> CliRun:
    """A short GRPO run of the README's example into runs/grpo-tiny (``GRPO_SHORT``). test_eval evaluates its
    final/; test_report reports on it."""
    run = rlhf_ray_in(clone, GRPO_SHORT, "runs/grpo-tiny")
    assert run.code == 0, run.err[-3000:]
    return run


@pytest.fixture(scope="session")
def grpo_final_eval(grpo_tiny_run, clone) -> CliRun:
    """``EVAL_FINAL_COMMAND`` as written: the GRPO run's final/ evaluated into runs/grpo-tiny-eval."""
    run = rlhf_ray_in(clone, shlex.split(EVAL_FINAL_COMMAND)[1:], "runs/grpo-tiny-eval")
    assert run.code == 0, run.err[-3000:]
    return run


DEMO_COMMAND = "bash launch/demo.sh"
"""The Quickstart's first command, run as written by ``demo_run`` (with an output directory of the test's)."""


@dataclass(frozen=True)
class DemoRun:
    """The Quickstart's demo, run once: what it printed, where it wrote, and the pipeline's state and report page as
    they were when it ended (later tests rerun the pipeline in the same directory)."""

    proc: subprocess.CompletedProcess
    out: Path
    state: dict
    report: str
    seconds: float


@pytest.fixture(scope="session")
def demo_run(clone) -> DemoRun:
    """``DEMO_COMMAND`` in the clone, as its own process (its own Ray instance, as on a fresh machine): install
    (already installed here: a check only), then the embedded pipeline SFT -> GRPO -> eval at its full length.
    test_readme checks what it prints; test_pipeline what the pipeline did."""
    out = clone / "runs" / "demo-quickstart"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    t0 = time.monotonic()
    proc = subprocess.run([*shlex.split(DEMO_COMMAND), "--output-dir", str(out)], cwd=clone, capture_output=True,
                          text=True, timeout=1500, env=env)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return DemoRun(proc, out, json.loads((out / "pipeline_state.json").read_text()),
                   (out / "report.html").read_text(), seconds)
