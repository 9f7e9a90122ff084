"""A run directory as the report reads it: the metrics rows, the placement record, the eval document, the config.

Only reads; the files are the ones a run writes (``rlhf_ray.metrics.MetricsLogger``: ``metrics.jsonl``;
``controller.launch``: ``placement.json``; job eval: ``eval.json``; the job front: ``config.yaml``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

RUN_FILES = ("metrics.jsonl", "placement.json", "eval.json")
"""What makes a directory a run the report can show (at least one of them)."""


class ReportError(ValueError):
    """A run directory the report cannot read; the message names the directory or file."""


@dataclass(frozen=True)
class RunData:
    """What the report shows of one run."""

    run_dir: Path
    rows: list[dict[str, Any]]
    """``metrics.jsonl``, one dict per logged step (an int ``step`` plus namespaced keys; other lines skipped)."""
    placement: Optional[dict[str, Any]]
    eval_doc: Optional[dict[str, Any]]
    config: Optional[dict[str, Any]]

    def keys(self) -> list[str]:
        """Every numeric metric key logged at some step, in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for k, v in row.items():
                if k not in ("step", "time_s") and _number(v) is not None:
                    seen.setdefault(k, None)
        return list(seen)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` over the steps that logged it (NaN where a run logged "nan")."""
        steps, values = [], []
        for row in self.rows:
            v = _number(row.get(key))
            if v is not None:
                steps.append(row["step"])
                values.append(v)
        return steps, values

    def describe(self) -> dict[str, str]:
        """Job, model and data of the run, from its config.yaml (empty where it has none)."""
        cfg = self.config or {}
        return {k: str(v) for k, v in (("job", cfg.get("job")), ("model", (cfg.get("model") or {}).get("path")),
                                       ("data", (cfg.get("data") or {}).get("path"))) if v is not None}


def _number(v: Any) -> Optional[float]:
    """A logged value as a float: numbers as they are, "nan" / "inf" strings (how the logger writes them) as
    floats, anything else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf"):
        return float(v)
    return None


def load_run(run_dir: str | Path) -> RunData:
    """Read ``run_dir``; ``ReportError`` when it is not a directory or holds none of ``RUN_FILES``."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ReportError(f"RUN_DIR: {d} is not a directory (give a run's train.output_dir)")
    if not any((d / f).is_file() for f in RUN_FILES):
        raise ReportError(f"RUN_DIR: {d} holds none of {', '.join(RUN_FILES)}; is it a run's train.output_dir?")
    rows = []
    metrics = d / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash (the logger's resume skips it the same way)
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return RunData(d, rows, _json(d / "placement.json"), _json(d / "eval.json"), _yaml(d / "config.yaml"))


def _json(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON: {exc}") from None


def _yaml(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ReportError(f"{path}: not valid YAML: {exc}") from None
    return loaded if isinstance(loaded, dict) else None


def finite(values: list[float]) -> bool:
    """Whether any value is finite (a series of only NaN draws nothing)."""
    return any(math.isfinite(v) for v in values)
