"""Gates: checks on a stage's numbers after it ran; a gate that fails stops the pipeline with what failed and why.

A gate reads one metric of its stage (``stage_metrics``: the last logged value of each key in ``metrics.jsonl``,
and an eval's ``eval.json`` numbers as ``eval/<name>``) and checks it:

- ``min`` / ``max``: value >= min, value <= max (both: a range);
- ``max_regression`` against ``baseline``, an earlier stage evaluated on the same held-out set: the drop from the
  baseline's value, in the direction the metric improves (``mode``: max = higher is better, the default except for
  losses), is at most ``max_regression``: for max, baseline - value <= max_regression; for min,
  value - baseline <= max_regression.

A missing or non-finite value fails the gate: a number that was not measured passes no check. ``check_gate`` is
pure; the pipeline (``rlhf_ray.pipeline.run``) reads the numbers and records the results.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from rlhf_ray.config.errors import check as _check
from rlhf_ray.config.resolve import best_mode


@dataclass(frozen=True)
class GateSpec:
    """One gate of a stage (``stages.<name>.gates[i]`` in the pipeline file)."""

    metric: str
    """A key the stage logs: ``eval/pass@1``, ``eval/loss``, ``rollout/reward_mean``, ..."""
    min: Optional[float] = None
    """Passes when the value is >= this."""
    max: Optional[float] = None
    """Passes when the value is <= this."""
    max_regression: Optional[float] = None
    """Passes when the value is worse than ``baseline``'s by at most this (needs ``baseline``; an ``eval/`` metric)."""
    baseline: Optional[str] = None
    """An earlier stage whose value of the same metric, on the same held-out set, is the one not to regress from."""
    mode: Optional[Literal["max", "min"]] = None
    """Which way the metric improves, for ``max_regression``; unset: min for a metric with "loss" in its name, else
    max."""

    def __post_init__(self) -> None:
        _check(bool(self.metric.strip()), "metric", "must name a metric, e.g. eval/pass@1")
        has_bound = self.min is not None or self.max is not None
        _check(has_bound or self.max_regression is not None, "metric",
               f"gate on {self.metric!r} checks nothing; give min and / or max, or max_regression with baseline")
        _check(not (has_bound and self.max_regression is not None), "max_regression",
               "a gate is either a bound (min / max) or a regression (max_regression, baseline); split it in two")
        _check(self.min is None or self.max is None or self.min <= self.max, "min",
               f"min {self.min} is above max {self.max}: no value passes")
        _check(self.max_regression is None or self.max_regression >= 0, "max_regression",
               f"must be >= 0 (how much worse than the baseline is allowed), got {self.max_regression}")
        _check((self.max_regression is None) == (self.baseline is None), "baseline",
               "max_regression and baseline go together: the regression is measured from the baseline stage")
        _check(self.max_regression is None or self.metric.startswith("eval/"), "metric",
               f"a regression compares held-out evaluations; {self.metric!r} is not an eval/ metric")

    def rule(self) -> str:
        """The check in words, e.g. ``>= 0.2``, ``in [0.1, 0.9]``, ``regression <= 0.05 vs sft_eval``."""
        if self.max_regression is not None:
            return f"regression <= {self.max_regression:g} vs {self.baseline}"
        if self.min is not None and self.max is not None:
            return f"in [{self.min:g}, {self.max:g}]"
        return f">= {self.min:g}" if self.min is not None else f"<= {self.max:g}"


@dataclass(frozen=True)
class GateResult:
    """A gate checked: what was compared, whether it passed, and why."""

    stage: str
    metric: str
    rule: str
    passed: bool
    reason: str
    value: Optional[float] = None
    baseline_value: Optional[float] = None
    limits: tuple[float, ...] = ()
    """The values the metric was held to: min and / or max, or the baseline's value less (more, for a metric that
    improves downwards) max_regression; empty when there was nothing to compare."""


def check_gate(gate: GateSpec, stage: str, metrics: dict[str, float],
               baseline_metrics: Optional[dict[str, float]] = None) -> GateResult:
    """Check ``gate`` of ``stage`` on the stage's ``metrics`` (and, for a regression, the baseline stage's)."""
    limits = tuple(v for v in (gate.min, gate.max) if v is not None)

    def result(passed: bool, reason: str, value: Optional[float] = None, base: Optional[float] = None) -> GateResult:
        return GateResult(stage, gate.metric, gate.rule(), passed, reason, value, base, limits)

    value = _lookup(metrics, gate.metric)
    if value is None:
        return result(False, f"stage '{stage}' logged no {gate.metric!r} (it logged {_some(metrics)})")
    if not math.isfinite(value):
        return result(False, f"{gate.metric} = {value} is not a finite number", value)
    if gate.max_regression is None:
        if gate.min is not None and value < gate.min:
            return result(False, f"{gate.metric} = {value:.6g} < min {gate.min:g}", value)
        if gate.max is not None and value > gate.max:
            return result(False, f"{gate.metric} = {value:.6g} > max {gate.max:g}", value)
        return result(True, f"{gate.metric} = {value:.6g} {gate.rule()}", value)
    base = _lookup(baseline_metrics or {}, gate.metric)
    if base is None or not math.isfinite(base):
        return result(False, f"baseline stage '{gate.baseline}' has no finite {gate.metric!r} to compare with "
                             f"(it logged {_some(baseline_metrics or {})})", value, base)
    mode = best_mode(gate.metric, gate.mode)  # the rule train.keep_best_mode follows
    limits = (base - gate.max_regression if mode == "max" else base + gate.max_regression,)  # type: ignore[operator]
    drop = base - value if mode == "max" else value - base  # > 0: worse than the baseline
    direction = "fell" if mode == "max" else "rose"
    change = f"{gate.metric} {direction} {abs(drop):.6g} from {base:.6g} (stage '{gate.baseline}') to {value:.6g}"
    if drop > gate.max_regression:  # type: ignore[operator]
        return result(False, f"{change}, more than max_regression {gate.max_regression:g}", value, base)
    if drop <= 0:
        change = f"{gate.metric} = {value:.6g}, no worse than {base:.6g} (stage '{gate.baseline}')"
    return result(True, f"{change}, within max_regression {gate.max_regression:g}", value, base)


def _lookup(metrics: dict[str, float], key: str) -> Optional[float]:
    v = metrics.get(key)
    return None if v is None else float(v)


def _some(metrics: dict[str, float], shown: int = 12) -> str:
    """The keys of ``metrics``, eval keys first, at most ``shown`` of them."""
    if not metrics:
        return "nothing"
    keys = sorted(metrics, key=lambda k: (not k.startswith("eval/"), k))
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def stage_metrics(run_dir: str | Path) -> dict[str, float]:
    """The numbers a stage's gates read: the last logged value of every numeric key in ``metrics.jsonl`` (a
    non-finite value as NaN / inf), then an ``eval.json``'s ``sampled`` numbers as ``eval/<name>`` and its
    ``greedy`` ones as ``eval/greedy/<name>`` (the same keys job eval logs). Empty when the directory has neither."""
    d = Path(run_dir)
    out: dict[str, float] = {}
    metrics = d / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(row, dict):
                for k, v in row.items():
                    number = _number(v)
                    if k not in ("step", "time_s") and number is not None:
                        out[k] = number
    doc = d / "eval.json"
    if doc.is_file():
        data = json.loads(doc.read_text())
        for prefix, part in (("eval/", data.get("sampled")), ("eval/greedy/", data.get("greedy"))):
            for k, v in (part or {}).items():
                number = _number(v)
                if number is not None:
                    out[prefix + k] = number
    return out


def _number(v: object) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf"):  # how the metrics logger writes them
        return float(v)
    return None
