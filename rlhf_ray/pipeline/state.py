"""``<pipeline output_dir>/pipeline_state.json``: what has run, written atomically after every change, so a rerun of
the pipeline knows which stages are done (skipped), which was interrupted (resumed) and what the gates said.

A stage is ``running`` from its start until its job returns (``done``) or raises (``failed``, with the error); one
found ``running`` was interrupted by a crash of the pipeline's process itself. ``running`` and ``failed`` stages
run again on the next run, continuing from their latest checkpoint. Each record keeps the stage's config (as built,
less ``train.resume`` / ``train.overwrite`` and ``ray``, which the pipeline sets), so a done stage whose config
has changed since is refused rather than skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from rlhf_ray.checkpoint import write_json_atomic
from rlhf_ray.config import Config, to_dict

STATE_FILE = "pipeline_state.json"
StageStatus = Literal["running", "done", "failed"]


@dataclass
class StageRecord:
    """One stage as the pipeline last saw it."""

    job: str
    output_dir: str
    status: StageStatus
    config: dict[str, Any]
    """``fingerprint`` of the config it ran (or is running) with."""
    attempts: int = 0
    """Runs of the job (a resumed stage counts each)."""
    seconds: float = 0.0
    """Wall time of all its runs."""
    result: dict[str, Any] = field(default_factory=dict)
    """Paths it produced: ``final_model``, ``best_model``, ``report``, ``eval_path`` where it has them."""
    error: Optional[str] = None
    """Why its last run failed (``failed``)."""
    resumed: bool = False
    """Its last run continued from a checkpoint (``train.resume``)."""


@dataclass
class PipelineState:
    """The whole file."""

    pipeline: str
    """The pipeline file."""
    output_dir: str
    order: list[str]
    """The stage names in the order they run."""
    status: Literal["running", "passed", "failed", "error"] = "running"
    """passed: every stage done and every gate passed; failed: a gate failed; error: a stage's job raised."""
    stages: dict[str, StageRecord] = field(default_factory=dict)
    gates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per stage, its gates' results (``gates.GateResult`` as a dict), from the latest run."""
    failure: Optional[str] = None
    """What stopped the pipeline, in one line."""
    updated: float = 0.0

    def save(self) -> Path:
        """Write the file atomically (beside it, then renamed)."""
        path = Path(self.output_dir) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.updated = time.time()
        write_json_atomic(path, asdict(self))
        return path

    @classmethod
    def load(cls, output_dir: str | Path) -> Optional["PipelineState"]:
        """The state in ``output_dir``, or None when the pipeline has not run there."""
        path = Path(output_dir) / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        data["stages"] = {name: StageRecord(**rec) for name, rec in data.get("stages", {}).items()}
        return cls(**data)


def fingerprint(cfg: Config) -> dict[str, Any]:
    """What identifies a stage's run: its config as plain data, without what the pipeline sets per run
    (``train.resume``, ``train.overwrite``) and the Ray instance the stages share (``ray``)."""
    tree = to_dict(cfg)
    tree["train"].pop("resume", None)
    tree["train"].pop("overwrite", None)
    tree.pop("ray", None)
    return tree


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two config trees."""
    a, b = _flat(before), _flat(after)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}
