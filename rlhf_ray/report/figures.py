"""The report's pictures, drawn with matplotlib's object API on the Agg canvas and returned as PNG bytes.

``Figure`` + ``savefig`` renders through Agg without pyplot, so drawing a report never changes the backend or the
open figures of the process that called it (a notebook, a training driver).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from rlhf_ray.report.run_data import RunData

DPI = 90
PANEL_W, PANEL_H = 4.2, 2.6
"""Inches of one small-multiple panel."""
MAX_BAR_STEPS = 40
"""Phase-time bars are drawn for at most this many steps (evenly spaced over the run) to stay readable."""


def _png(fig: "Figure") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def line_panels(run: "RunData", keys: Sequence[str], columns: int = 3) -> bytes:
    """One panel per metric key (its own y scale), value over step; short series get markers."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = min(columns, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(PANEL_W * cols, PANEL_H * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = run.series(key)
        ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, linewidth=1.4)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _png(fig)


def phase_bars(run: "RunData", phases: Sequence[str]) -> bytes:
    """Each step's seconds per phase (``timing/<phase>_s``) stacked, beside its floors
    (``efficiency/<phase>_floor_s``) stacked the same way; below, seconds / floor per phase over steps (log scale).

    Phases that overlap (the scoring forwards) are stacked as if serial, so a measured bar can stand above the
    step's wall time, which is drawn as a black tick (``timing/step_s``).
    """
    from matplotlib.figure import Figure

    steps = [int(r["step"]) for r in run.rows if any(f"timing/{p}_s" in r for p in phases)]
    if len(steps) > MAX_BAR_STEPS:
        steps = [steps[round(i * (len(steps) - 1) / (MAX_BAR_STEPS - 1))] for i in range(MAX_BAR_STEPS)]
    by_step = {int(r["step"]): r for r in run.rows}
    has_floors = any(f"efficiency/{p}_floor_s" in r for r in run.rows for p in phases)
    has_ratio = any(run.series(f"efficiency/{p}_vs_floor")[0] for p in phases)
    fig = Figure(figsize=(max(8.0, 0.32 * len(steps) + 4), 6.4 if has_ratio else 3.6))
    axes = fig.subplots(2 if has_ratio else 1, 1, squeeze=False)[:, 0]
    colors = {p: _tab20(i) for i, p in enumerate(phases)}
    ax = axes[0]
    width = 0.4 if has_floors else 0.8
    for i, step in enumerate(steps):
        row = by_step[step]
        for offset, template in ((0.0, "timing/{}_s"), (width, "efficiency/{}_floor_s")):
            if offset and not has_floors:
                continue
            bottom = 0.0
            for p in phases:
                v = _value(row.get(template.format(p)))
                if v > 0:
                    ax.bar(i + offset, v, width, bottom=bottom, color=colors[p], edgecolor="white", linewidth=0.4,
                           hatch="//" if offset else None)
                    bottom += v
        if _value(row.get("timing/step_s")) > 0:
            ax.plot([i - width / 2, i + width / 2], [row["timing/step_s"]] * 2, color="black", linewidth=1.5)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
    ax.set_xlabel("step" + ("  (left: measured, right hatched: floor)" if has_floors else ""), fontsize=8)
    ax.set_ylabel("seconds", fontsize=8)
    ax.set_title("seconds per phase" + (" beside the floor of each phase" if has_floors else ""), fontsize=9)
    handles = [_patch(colors[p], p) for p in phases]
    ax.legend(handles=handles, fontsize=7, ncol=min(len(phases), 6), loc="upper left", bbox_to_anchor=(0, -0.18))
    ax.grid(axis="y", alpha=0.3)
    if has_ratio:
        ax = axes[1]
        for p in phases:
            s, v = run.series(f"efficiency/{p}_vs_floor")
            if s:
                ax.plot(s, v, color=colors[p], label=p, marker="o" if len(s) <= 20 else None, markersize=3)
        ax.set_yscale("log")
        ax.set_title("seconds / floor per phase (1 = at the device's limit)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return _png(fig)


def _value(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else 0.0


def _patch(color: str, label: str):
    from matplotlib.patches import Patch

    return Patch(facecolor=color, label=label)


def _tab20(i: int):
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


@dataclass(frozen=True)
class StagePanel:
    """What one pipeline stage's panel shows: lines over steps, or bars of one evaluation, and its gates."""

    title: str
    lines: tuple[tuple[str, tuple[int, ...], tuple[float, ...]], ...] = ()
    """(key, steps, values) each."""
    bars: tuple[tuple[str, float], ...] = ()
    """(metric, value) each: an evaluation's numbers (eval.json)."""
    gates: tuple[tuple[str, float, bool], ...] = ()
    """(label, threshold, passed) each: drawn as a horizontal line, green when the gate passed, red when not."""


def stage_panels(panels: Sequence[StagePanel]) -> bytes:
    """One panel per pipeline stage, in order: its headline curves over steps (or an evaluation's bars) with its
    gates' thresholds across them."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(3.4 * len(panels), PANEL_H + 0.3))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for key, steps, values in panel.lines:
            ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, linewidth=1.4, label=key)
        if panel.lines:
            ax.set_xlabel("step", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.bars:
            names = [n for n, _ in panel.bars]
            ax.bar(range(len(names)), [v for _, v in panel.bars], color="#4c72b0")
            ax.set_xticks(range(len(names)), names, fontsize=7, rotation=30)
        for label, y, passed in panel.gates:
            ax.axhline(y, color="#17702b" if passed else "#b3261e", linestyle="--", linewidth=1.2,
                       label=f"gate: {label} ({'passed' if passed else 'FAILED'})")
        ax.set_title(panel.title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if panel.bars and panel.gates:  # below the bars, which fill the axes
            ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.3))
        elif panel.lines:
            ax.legend(fontsize=6.5, loc="best")
    fig.tight_layout()
    return _png(fig)
