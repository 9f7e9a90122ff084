"""Checkpoint directories that are written atomically: a crash never corrupts the last good one.

Layout under ``<output_dir>/checkpoints``::

    step_000010/            one complete checkpoint
        model/              HF safetensors + tokenizer (loads in transformers and vLLM as is)
        deepspeed/state/    optimizer, scheduler and model shards of every rank
        rng_rank*.pt        per-rank RNG state
        trainer_state.json  step, epoch, data position, metric history needed to continue
    latest                  name of the newest complete checkpoint (replaced atomically)

A checkpoint is first written to ``.tmp-step_000010`` and renamed once every part is on disk;
``latest`` is only updated after the rename. ``<output_dir>/final`` (the last model) and ``<output_dir>/best``
(the best evaluated one, ``train.keep_best``) are published the same way: written aside, then renamed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (the ranks wrote them; a rename is durable only after)."""
    for here, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(here))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointDir:
    """Create, finalise, list and prune the checkpoints of one run."""

    def __init__(self, output_dir: str | os.PathLike, keep: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:06d}"

    def staging(self, step: int) -> Path:
        """A fresh temporary directory to write checkpoint ``step`` into (shared by all ranks)."""
        tmp = self.root / f".tmp-{self.name(step)}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def finalize(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write trainer_state.json, rename the staging dir into place, point ``latest`` at it, prune."""
        tmp = self.root / f".tmp-{self.name(step)}"
        write_json_atomic(tmp / "trainer_state.json", trainer_state)
        _fsync_tree(tmp)  # the model, optimizer and RNG files too, before the rename makes them "complete"
        final = self.root / self.name(step)
        if final.exists():  # re-saving the same step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        latest_tmp = self.root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, self.root / "latest")
        _fsync_dir(self.root)
        self._prune()
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. Half-written ``.tmp-*`` dirs are never returned."""
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if (path / "trainer_state.json").is_file():
                return path
        done = self.complete()
        return done[-1] if done else None

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / "trainer_state.json").is_file())

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def read_state(path: Path) -> dict[str, Any]:
        return json.loads((path / "trainer_state.json").read_text())


def data_fingerprint(data_path: str, n_items: int) -> dict[str, Any]:
    """What a checkpoint records of the data it was trained on (``trainer_state.json``'s ``data``): the configured
    source and how many training items (examples or prompts) it gave."""
    return {"path": data_path, "items": n_items}


def publish_final(model_dir: Path, output_dir: str | os.PathLike) -> Path:
    """Copy a checkpoint's HF model to ``<output_dir>/final`` atomically (copy aside, then rename)."""
    final = Path(output_dir) / "final"
    tmp = final.with_name(".final.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(model_dir, tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


BEST_DIR = "best"
BEST_FILE = "best.json"
"""Inside ``best/``: which metric chose it, which way, its value and the step evaluated (0 = before training)."""


def improves(value: float, best: Optional[float], mode: str) -> bool:
    """Whether ``value`` beats ``best`` under ``mode`` (max: higher is better; min: lower is). Strictly: of equal
    values the earliest is kept. A NaN never improves; any other value beats no best at all (``best`` None)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if mode == "max" else value < best


class BestModel:
    """``<output_dir>/best/``: the policy as it was at the evaluation that scored best so far by one metric
    (``train.keep_best``), ``best.json`` inside it. Written aside and renamed, as ``final/``: a crash leaves the
    previous best whole. A resumed run reads the record back, so its later evaluations compete with it."""

    def __init__(self, output_dir: str | os.PathLike, metric: str, mode: str, resume: bool):
        self.dir = Path(output_dir) / BEST_DIR
        self.metric, self.mode = metric, mode
        self.record: Optional[dict[str, Any]] = None
        """The best so far: ``{"metric", "mode", "value", "step"}``."""
        recorded = self.dir / BEST_FILE
        if resume and recorded.is_file():
            record = json.loads(recorded.read_text())
            if (record.get("metric"), record.get("mode")) == (metric, mode):  # else chosen by another rule: start over
                self.record = record

    def offer(self, step: int, metrics: dict[str, float], export: Callable[[Path], None]) -> bool:
        """An evaluation after ``step`` steps logged ``metrics``: when ``metrics[metric]`` improves on the best,
        ``export(directory)`` writes the policy's HF model there and it becomes ``best/``. Returns whether it did.
        ``ConfigError`` names the metric and the keys the evaluation does log."""
        if self.metric not in metrics:
            from rlhf_ray.config.errors import ConfigError

            raise ConfigError(f"train.keep_best: the evaluation logged no {self.metric!r}; it logs "
                           f"{', '.join(sorted(metrics))}")
        value = float(metrics[self.metric])
        if not improves(value, None if self.record is None else self.record["value"], self.mode):
            return False
        record = {"metric": self.metric, "mode": self.mode, "value": value, "step": step}
        tmp = self.dir.with_name(f".{BEST_DIR}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        export(tmp)
        write_json_atomic(tmp / BEST_FILE, record)
        _fsync_tree(tmp)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        os.replace(tmp, self.dir)
        _fsync_dir(self.dir.parent)
        self.record = record
        return True
