"""`rlhf-ray pipeline` on the real stack: the Quickstart's demo pipeline (SFT -> GRPO -> eval, run once by
``conftest.demo_run``) chains its stages by reference and gates the last; its page shows stages, gates and each
stage's report; a rerun skips what is done; a failing gate stops it with what and why; and a pipeline whose process
is killed mid-stage resumes that stage from its checkpoint while the finished one is skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rlhf_ray.cli import DEMO_PIPELINE, main
from rlhf_ray.metrics import read_metrics
from tests.e2e.test_report import _check_page, _screenshot

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_pipeline_chains_its_stages_by_reference(demo_run):
    out, state = demo_run.out, demo_run.state
    assert state["status"] == "passed" and state["order"] == ["sft", "grpo", "eval"] and state["failure"] is None
    assert all(state["stages"][s]["status"] == "done" and state["stages"][s]["attempts"] == 1 for s in state["order"])
    # ${sft.final} and ${grpo.best} became the paths the next stage loaded (its config.yaml records what it ran).
    grpo_cfg = yaml.safe_load((out / "grpo" / "config.yaml").read_text())
    eval_cfg = yaml.safe_load((out / "eval" / "config.yaml").read_text())
    assert grpo_cfg["model"]["path"] == str(out / "sft" / "final")
    assert eval_cfg["model"]["path"] == str(out / "grpo" / "best")
    assert json.loads((out / "eval" / "eval.json").read_text())["model"] == str(out / "grpo" / "best")

    # GRPO evaluated the SFT model before its first step and kept its best evaluated policy.
    evals = [r for r in read_metrics(out / "grpo" / "metrics.jsonl") if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    best = json.loads((out / "grpo" / "best" / "best.json").read_text())
    top = max(r["eval/pass@1"] for r in evals)
    assert best["value"] == top and best["step"] == min(r["step"] for r in evals if r["eval/pass@1"] == top)
    # RL improved on SFT: held-out pass@1 ~0.49 at step 0 and ~0.93 at step 20 here (26 prompts x 4 samples, a
    # deterministic CPU run); +0.2 leaves room for other CPUs' arithmetic while a GRPO that learns nothing fails.
    assert evals[-1]["eval/pass@1"] > evals[0]["eval/pass@1"] + 0.2, [r["eval/pass@1"] for r in evals]

    # The gate read the eval stage's eval.json and passed.
    [gate] = state["gates"]["eval"]
    doc = json.loads((out / "eval" / "eval.json").read_text())
    minimum = yaml.safe_load(DEMO_PIPELINE.read_text())["stages"]["eval"]["gates"][0]["min"]
    assert gate["passed"] and gate["value"] == doc["sampled"]["pass@1"] >= minimum and gate["limits"] == [minimum]


def test_the_pipeline_page_shows_stages_gates_and_every_stage_report(demo_run, tmp_path):
    page = demo_run.report
    _check_page(page)  # self-contained, every embedded picture a non-blank PNG
    assert "<p class='passed'>pipeline passed</p>" in page
    assert "<h2>Stages</h2>" in page and "<h2>Gates</h2>" in page and "<td class='passed'>passed</td>" in page
    for stage, job in (("sft", "sft"), ("grpo", "grpo"), ("eval", "eval")):
        assert f"<a href='{stage}/report.html'>report</a>" in page and (demo_run.out / stage / "report.html").is_file()
        assert f"<summary>stage <b>{stage}</b>: job {job}, done" in page
    # The stages' panel plots each stage's headline curves; each stage's own sections are embedded below.
    assert "<code>train/loss</code>" in page and "<code>rollout/reward_mean</code>" in page
    assert page.count("<h2>Reward</h2>") == 1 and page.count("<h2>Evaluation</h2>") == 1
    _screenshot(demo_run.out / "report.html", tmp_path)


def test_a_rerun_skips_the_finished_stages(demo_run, capsys):
    """The demo again in the same directory: every stage done, nothing runs (not even Ray), the gates are checked
    again on what the stages wrote."""
    metrics = {s: (demo_run.out / s / "metrics.jsonl").stat().st_mtime_ns for s in ("sft", "grpo", "eval")}
    t0 = time.monotonic()
    assert main(["demo", "--output-dir", str(demo_run.out)]) == 0
    seconds = time.monotonic() - t0
    assert "pipeline passed (3 stages)" in capsys.readouterr().out
    state = json.loads((demo_run.out / "pipeline_state.json").read_text())
    assert all(state["stages"][s]["attempts"] == 1 for s in metrics)
    assert {s: (demo_run.out / s / "metrics.jsonl").stat().st_mtime_ns for s in metrics} == metrics
    assert seconds < 60, seconds  # the demo's first run takes minutes; a rerun only reads files and draws its page


def test_a_failing_gate_stops_the_pipeline_saying_what_and_why(demo_run, capsys):
    out = demo_run.out
    pass1 = json.loads((out / "eval" / "eval.json").read_text())["sampled"]["pass@1"]
    code = main(["pipeline", str(DEMO_PIPELINE), f"output_dir={out}",
                 f"stages.sft.overrides.model.path={(out / 'tiny-model').resolve()}",
                 "stages.eval.gates=[{metric: eval/pass@1, min: 1.01}, {metric: eval/maj@8, min: 0.0}]"])
    printed = capsys.readouterr().out
    assert code == 1
    why = f"gate eval/pass@1 >= 1.01 failed: eval/pass@1 = {pass1:.6g} < min 1.01"
    assert printed.startswith(f"pipeline failed: stage 'eval': {why}\n"), printed
    assert "gate eval/maj@8 >= 0: passed" in printed  # every gate of the stage is checked and reported
    state = json.loads((out / "pipeline_state.json").read_text())
    assert state["status"] == "failed" and state["failure"] == f"stage 'eval': {why}"
    page = (out / "report.html").read_text()
    assert "<p class='failed'>pipeline failed" in page and "<td class='failed'>FAILED</td>" in page


# ---- a pipeline killed mid-stage -----------------------------------------------------------------------------

def _sft(tiny_model_dir: str, steps: int) -> dict:
    return {"job": "sft", "model": {"path": tiny_model_dir},
            "data": {"path": "demo:repeat_number", "demo_size": 256, "max_length": 32, "apply_chat_template": False},
            "learner": {"num_workers": 2, "gpus_per_worker": 0, "micro_batch_size": 8, "global_batch_size": 16},
            "train": {"max_steps": steps, "timeout_s": 300}, "logging": {"tensorboard": False, "progress_bar": False}}


def test_a_killed_pipeline_resumes_its_interrupted_stage_and_skips_the_finished_one(ray_cluster, tiny_model_dir,
                                                                                     tmp_path, capsys):
    """Stage `first` finishes; the pipeline's process is killed (SIGKILL) once stage `second` has a checkpoint.
    The rerun skips `first` and resumes `second` from its latest checkpoint: the metrics it had logged up to that
    checkpoint are kept as they were written, the rest logged once."""
    out = tmp_path / "p"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(out), "stages": {
        "first": {"config": _sft(tiny_model_dir, 3)},
        "second": {"config": _sft(tiny_model_dir, 80),
                   "overrides": {"model.path": "${first.final}", "train.save_every": 5}}}}, sort_keys=False))
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray", "pipeline", str(path), f"ray.address={address}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    latest = out / "second" / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 600
        while not latest.is_file() and proc.poll() is None:
            assert time.monotonic() < deadline, "stage second wrote no checkpoint"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished: 80 steps outlast the first checkpoint
    state = json.loads((out / "pipeline_state.json").read_text())
    assert state["stages"]["first"]["status"] == "done" and state["stages"]["second"]["status"] == "running"
    kept = int(latest.read_text().strip().removeprefix("step_"))
    before = [ln for ln in (out / "second" / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= kept]
    first_mtime = (out / "first" / "metrics.jsonl").stat().st_mtime_ns

    assert main(["pipeline", str(path), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "first: job sft, skip (done)" in plan and "second: job sft, resume" in plan
    assert main(["pipeline", str(path)]) == 0
    state = json.loads((out / "pipeline_state.json").read_text())
    second = state["stages"]["second"]
    assert state["status"] == "passed" and second["status"] == "done"
    assert (second["attempts"], second["resumed"], state["stages"]["first"]["attempts"]) == (2, True, 1)
    lines = (out / "second" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == list(range(1, 81))  # each step once
    assert lines[:len(before)] == before and len(before) == kept  # up to the checkpoint: as the killed run wrote them
    assert (out / "first" / "metrics.jsonl").stat().st_mtime_ns == first_mtime
    assert (out / "second" / "final" / "model.safetensors").is_file()

