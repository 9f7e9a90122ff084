"""A pipeline's page (``<pipeline output_dir>/report.html``, also ``rlhf-ray report`` of that directory), drawn from
``pipeline_state.json`` and the stages' run directories:

- the outcome: passed, or which gate of which stage failed and why (or the error that stopped a stage);
- one panel per stage: its headline curves over steps (reward or loss, and its eval), or an evaluation's bars, with
  each gate's threshold drawn across it (green passed, red failed);
- the stages: job, status, runs, seconds, what it produced, and a link to its own report.html;
- the gates: metric, rule, value, baseline value, passed or failed, the reason;
- each stage's own report, embedded below (collapsed), so this one file holds the whole pipeline.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.report.figures import StagePanel, stage_panels
from rlhf_ray.report.page import (PAGE_TEMPLATE, SECTIONS_END, SECTIONS_START, ReportError, figure_html,
                                  render_sections, run_head)
from rlhf_ray.report.run_data import RUN_FILES, RunData, finite, load_run

STATE_FILE = "pipeline_state.json"  # rlhf_ray.pipeline.state.STATE_FILE (not imported: the report reads files only)
TRAINING_HEADLINES = ("rollout/reward_mean", "train/loss")
"""A training stage's panel draws the first of these it logged ..."""
EVAL_HEADLINES = ("eval/pass@1", "eval/accuracy", "eval/reward_mean", "eval/loss")
"""... and the first of these, its held-out evaluation over steps."""
MAX_LINES = 3


def is_pipeline_dir(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` is a pipeline's output directory (it holds ``pipeline_state.json``)."""
    return (Path(run_dir) / STATE_FILE).is_file()


def render_pipeline(run_dir: str | os.PathLike) -> str:
    """The HTML page of the pipeline in ``run_dir``."""
    d = Path(run_dir)
    try:
        state = json.loads((d / STATE_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{d / STATE_FILE}: not valid JSON: {exc}") from None
    order: list[str] = state.get("order") or []
    records: dict[str, Any] = state.get("stages") or {}
    gates: dict[str, list[dict]] = state.get("gates") or {}
    runs = {name: _run(records[name]) for name in order if name in records}

    parts = []
    status = str(state.get("status"))
    outcome = f"<p class='{'passed' if status == 'passed' else 'failed'}'>pipeline {html.escape(status)}"
    if state.get("failure"):
        outcome += f": {html.escape(str(state['failure']))}"
    parts.append(outcome + "</p>")
    panels = [p for p in (_panel(name, runs.get(name), gates.get(name, [])) for name in order) if p is not None]
    if panels:
        keys = sorted({k for p in panels for k, _, _ in p.lines} | {f"eval/{n}" for p in panels for n, _ in p.bars})
        parts.append(figure_html("Stage curves", stage_panels(panels), keys,
                                 "each stage's headline curves over its steps (an eval stage: its numbers), its gates' "
                                 "thresholds across them: green passed, red failed"))
    parts.append(_stages_table(d, order, records))
    all_gates = [g for name in order for g in gates.get(name, [])]
    if all_gates:
        parts.append(_gates_table(all_gates))
    for name in order:
        run = runs.get(name)
        if run is None:
            continue
        rec = records[name]
        summary = (f"stage <b>{html.escape(name)}</b>: job {html.escape(rec['job'])}, {html.escape(rec['status'])} "
                   f"&middot; {run_head(run)}")
        parts.append(f"<details><summary>{summary}</summary>{_sections(run)}</details>")
    head = (f"pipeline file <code>{html.escape(str(state.get('pipeline')))}</code> &middot; {len(order)} stages "
            f"&middot; state <code>{STATE_FILE}</code>")
    return PAGE_TEMPLATE.format(title=html.escape(f"rlhf_ray pipeline: {d.name}"), run_dir=html.escape(str(d)),
                                head=head, body="\n".join(parts))


def _run(record: dict[str, Any]) -> Optional[RunData]:
    """A stage's run directory, read; None when it wrote nothing yet."""
    d = Path(record.get("output_dir", ""))
    if not d.is_dir() or not any((d / f).is_file() for f in RUN_FILES):
        return None
    return load_run(d)


def _panel(name: str, run: Optional[RunData], gates: list[dict]) -> Optional[StagePanel]:
    """The stage's panel: an evaluation's bars (job eval), else its headline curves and any gated metric logged
    over steps; each gate with limits on something drawn there adds its line."""
    if run is None:
        return None
    lines: list[tuple[str, tuple[int, ...], tuple[float, ...]]] = []
    bars: list[tuple[str, float]] = []
    if run.eval_doc and len(run.rows) <= 1:
        sampled = run.eval_doc.get("sampled") or {}
        bars = [(k, float(v)) for k, v in sampled.items() if k == "accuracy" or k.startswith(("pass@", "maj@"))]
    else:
        wanted = [next((k for k in TRAINING_HEADLINES if _drawable(run, k)), None),
                  next((k for k in EVAL_HEADLINES if _drawable(run, k)), None)]
        wanted += [g["metric"] for g in gates if _drawable(run, g["metric"])]
        for key in dict.fromkeys(k for k in wanted if k):
            if len(lines) < MAX_LINES:
                steps, values = run.series(key)
                lines.append((key, tuple(steps), tuple(values)))
    shown = {k for k, _, _ in lines} | {f"eval/{n}" for n, _ in bars}
    marks = tuple((f"{g['metric']} {g['rule']}", float(limit), bool(g["passed"])) for g in gates
                  if g["metric"] in shown for limit in g.get("limits") or ())
    if not lines and not bars:
        return None
    return StagePanel(f"{name} ({(run.config or {}).get('job', '?')})", tuple(lines), tuple(bars), marks)


def _sections(run: RunData) -> str:
    """A stage's report sections: those of the report.html its run wrote (no picture drawn twice), or drawn now
    when it has none."""
    page = run.run_dir / "report.html"
    text = page.read_text() if page.is_file() else ""
    start, end = text.find(SECTIONS_START), text.rfind(SECTIONS_END)
    if start >= 0 and end > start:
        return text[start + len(SECTIONS_START):end]
    return "".join(render_sections(run))


def _drawable(run: RunData, key: str) -> bool:
    steps, values = run.series(key)
    return len(steps) >= 2 and finite(values)


def _stages_table(d: Path, order: list[str], records: dict[str, Any]) -> str:
    rows = []
    for name in order:
        rec = records.get(name)
        if rec is None:
            rows.append(f"<tr><td>{html.escape(name)}</td><td colspan='6'>not run</td></tr>")
            continue
        out = Path(rec["output_dir"])
        made = ", ".join(f"{k}: <code>{html.escape(_rel(v, d))}</code>" for k, v in (rec.get("result") or {}).items()
                         if k != "report")
        report = out / "report.html"
        link = f"<a href='{html.escape(_rel(str(report), d))}'>report</a>" if report.is_file() else "-"
        status = html.escape(rec["status"]) + (f" ({html.escape(rec['error'])})" if rec.get("error") else "")
        cls = "passed" if rec["status"] == "done" else "failed"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(rec['job'])}</td><td class='{cls}'>{status}"
                    f"</td><td>{rec.get('attempts', 0)}{' (resumed)' if rec.get('resumed') else ''}</td>"
                    f"<td>{float(rec.get('seconds', 0.0)):.1f}</td><td>{made or '-'}</td><td>{link}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("stage", "job", "status", "runs", "seconds", "outputs", "its report"))
    return (f"<section><h2>Stages</h2><p class='note'>in the order they run; a rerun skips done stages and resumes "
            f"an interrupted one from its latest checkpoint</p><table><thead><tr>{head}</tr></thead><tbody>"
            f"{''.join(rows)}</tbody></table></section>")


def _gates_table(gates: list[dict]) -> str:
    rows = []
    for g in gates:
        cls = "passed" if g["passed"] else "failed"
        cells = [g["stage"], g["metric"], g["rule"], _fmt(g.get("value")), _fmt(g.get("baseline_value"))]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                    + f"<td class='{cls}'>{'passed' if g['passed'] else 'FAILED'}</td>"
                    + f"<td>{html.escape(g['reason'])}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("stage", "metric", "rule", "value", "baseline", "result", "why"))
    return (f"<section><h2>Gates</h2><p class='note'>checked after their stage on what it logged (metrics.jsonl's last "
            f"values, eval.json); a failed gate stops the pipeline</p><table><thead><tr>{head}</tr></thead><tbody>"
            f"{''.join(rows)}</tbody></table></section>")


def _rel(path: str, base: Path) -> str:
    """``path`` relative to the page's directory when it is inside it (links keep working when the directory is
    copied), else as it is."""
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return path


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{float(v):.6g}"
