"""`rlhf-ray pipeline` on the real stack: a two-stage pipeline whose process is killed mid-stage resumes that stage from
its checkpoint while the finished one is skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rlhf_ray.cli import main

REPO = Path(__file__).resolve().parents[2]


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

