"""The metrics sinks: metrics.jsonl, tensorboard event files, wandb offline runs, resume truncation, phase timers."""

from __future__ import annotations

import json
import time

from rlhf_ray.config.schema import LoggingConfig
from rlhf_ray.metrics import MetricsLogger, PhaseTimer, read_metrics


def test_jsonl_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: wandb writes its run files locally
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LoggingConfig(wandb="offline", tensorboard=True, progress_bar=True, run_name="unit")
    logger = MetricsLogger(cfg, tmp_path, total_steps=2, config_dict={"job": "sft"}, job="sft")
    logger.log(1, {"train/loss": 2.0, "timing/step_s": 0.5})
    logger.log(2, {"train/loss": 1.5, "timing/step_s": float("nan")})
    logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["train/loss"] == 1.5
    assert rows[1]["timing/step_s"] == "nan"  # JSON has no NaN: written as a string, not dropped
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("run-*.wandb"))


def test_resume_drops_lines_after_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3, 4))
                                            + '{"step": 5, "x"')  # a line cut by a crash
    off = LoggingConfig(tensorboard=False, progress_bar=False)
    logger = MetricsLogger(off, tmp_path, total_steps=6, config_dict={}, start_step=2)
    logger.log(3, {"x": 30})
    logger.close()
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1), (2, 2), (3, 30)]


def test_phase_timer_sums_per_phase():
    timer = PhaseTimer()
    for _ in range(2):
        with timer("generate"):
            time.sleep(0.01)
    with timer("train"):
        pass
    out = timer.pop()
    assert set(out) == {"timing/generate_s", "timing/train_s"} and out["timing/generate_s"] >= 0.02
    assert timer.pop() == {}
