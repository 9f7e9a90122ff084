"""The report page: sections of pictures and tables from one run directory, in one HTML file with every image
embedded (base64 PNG), no script and nothing fetched: it opens anywhere, also copied off the cluster.

Sections, each shown when the run logged something for it: reward (``rollout/reward_*``, each source's
``reward/*``), KL (``kl/*``, the policy's approximate KL), losses (every ``*loss*`` key), response length, other
training signals (``actor/``, ``critic/``, ``train/``, ``rollout/``), eval over steps (``eval/*``), phase seconds
beside their floors (``timing/<phase>_s``, ``efficiency/<phase>_floor_s``, ``efficiency/<phase>_vs_floor``),
throughput, the placement (``placement.json``), the evaluation table (``eval.json``) and the last logged value of
every key.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rlhf_ray.report.run_data import ReportError, RunData, finite, load_run

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
MAX_PANELS = 12
"""Panels per section at most (the first keys logged); the last-values table still lists every key."""

__all__ = ["REPORT_FILE", "ReportError", "render_report", "write_report", "write_report_or_warn"]


@dataclass(frozen=True)
class Section:
    """A section of line panels: a title and which metric keys it claims (each key goes to the first that does)."""

    title: str
    claims: Callable[[str], bool]
    note: str = ""


def _leaf(key: str) -> str:
    return key.rsplit("/", 1)[-1]


_TIMING = ("timing/", "efficiency/")
LINE_SECTIONS = (
    Section("Reward", lambda k: not k.startswith(("eval/", *_TIMING)) and (
        k.startswith(("rollout/reward_", "reward/", "best_of_n/")) or "reward" in _leaf(k)),
        "mean reward of each step's rollouts and each reward source's mean"),
    Section("KL", lambda k: k.startswith("kl/") or k == "actor/approx_kl",
            "KL to the reference (kl/) and the policy's approximate KL to pi_old"),
    Section("Losses", lambda k: not k.startswith("eval/") and "loss" in _leaf(k)),
    Section("Response length", lambda k: not k.startswith("eval/") and (
        "response_length" in k or k.endswith("truncated_fraction"))),
    Section("Other training signals", lambda k: k.startswith(("actor/", "critic/", "train/", "rollout/"))),
    Section("Eval over steps", lambda k: k.startswith("eval/"),
            "held-out evaluation when it ran (train.eval_every; step 0 is the model as given)"),
    Section("Throughput", lambda k: k.startswith(("efficiency/", "weight_sync/")) and not k.endswith(
        ("_floor_s", "_vs_floor")) and k not in ("efficiency/idle_s",)),
)


def phases_of(run: RunData) -> list[str]:
    """The timed phases of the run (``timing/<phase>_s`` keys, the step's total left out), in first-logged order."""
    return [k[len("timing/"):-2] for k in run.keys() if k.startswith("timing/") and k.endswith("_s")
            and k != "timing/step_s"]


def render_report(run: RunData) -> str:
    """The HTML page of ``run``."""
    return PAGE_TEMPLATE.format(title=html.escape(f"rlhf_ray report: {run.run_dir.name}"),
                                run_dir=html.escape(str(run.run_dir)), head=run_head(run),
                                body="\n".join(render_sections(run)))


def run_head(run: RunData) -> str:
    """The line under a run's title: logged steps, job, model, data."""
    about = run.describe()
    head = " &middot; ".join(f"{html.escape(k)}: <code>{html.escape(v)}</code>" for k, v in about.items())
    steps = f"{len(run.rows)} logged step{'s' if len(run.rows) != 1 else ''}" if run.rows else "no metrics.jsonl"
    return f"{steps} &middot; {head}" if head else steps


def render_sections(run: RunData) -> list[str]:
    """The report's sections of ``run`` (HTML), each present when the run logged something for it."""
    from rlhf_ray.report import figures

    parts: list[str] = []
    claimed: set[str] = set()
    # A line needs two points: a key logged once (an eval-only run's step 0) is in the last-values table.
    keys = [k for k in run.keys() if finite(run.series(k)[1]) and len(run.series(k)[0]) >= 2]
    for section in LINE_SECTIONS:
        mine = [k for k in keys if k not in claimed and section.claims(k)]
        claimed.update(mine)
        mine.sort(key=lambda k: not k.startswith("rollout/"))  # the step's own statistics lead their section
        if mine:
            shown = mine[:MAX_PANELS]
            more = f" ({len(mine) - len(shown)} more in the table at the end)" if len(mine) > len(shown) else ""
            parts.append(figure_html(section.title, figures.line_panels(run, shown), shown, section.note + more))
    phases = phases_of(run)
    if phases:
        used = [f"timing/{p}_s" for p in phases] + [k for k in keys if k.startswith("efficiency/") and k.endswith(
            ("_floor_s", "_vs_floor"))]
        floors = any(k.startswith("efficiency/") and k.endswith("_floor_s") for k in run.keys())
        note = ("each step's seconds per phase stacked" + (
            ", beside the least time the device could take for the same work (efficiency/*_floor_s)" if floors else
            " (this run logged no floors)") + "; the black tick is the step's wall time (timing/step_s); overlapping "
            "phases stack as if serial")
        parts.append(figure_html("Phase seconds and floors", figures.phase_bars(run, phases), used, note))
    if run.placement:
        parts.append(_placement(run.placement))
    if run.eval_doc:
        parts.append(_eval_table(run.eval_doc))
    if run.rows:
        parts.append(_last_values(run))
    return parts


def write_report(run_dir: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``<run_dir>/report.html``, written aside and renamed);
    returns its path. A pipeline's directory (``pipeline_state.json``) gets the pipeline's page
    (``pipeline_page``). ``ReportError`` names the directory or file it cannot read."""
    from rlhf_ray.report.pipeline_page import is_pipeline_dir, render_pipeline

    if is_pipeline_dir(run_dir):
        path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
        page = render_pipeline(run_dir)
    else:
        run = load_run(run_dir)
        path = Path(out) if out is not None else run.run_dir / REPORT_FILE
        page = render_report(run)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path


def write_report_or_warn(run_dir: str | os.PathLike) -> Optional[Path]:
    """``write_report`` at the end of a run: a report that fails (matplotlib missing, a file it cannot read) logs
    a warning and returns None, and never fails the run that has finished."""
    try:
        path = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run's results are already written; the report is a view of them
        log.warning("report of %s not written: %s: %s (rerun: rlhf-ray report %s)", run_dir, type(exc).__name__,
                    exc, run_dir)
        return None
    log.info("report: %s", path)
    return path


def figure_html(title: str, png: bytes, keys: list[str], note: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    names = ", ".join(f"<code>{html.escape(k)}</code>" for k in keys)
    note_html = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    return (f"<section><h2>{html.escape(title)}</h2>{note_html}<figure><img alt='{html.escape(title)}: "
            f"{html.escape(', '.join(keys))}' src='data:image/png;base64,{data}'><figcaption>{names}</figcaption>"
            f"</figure></section>")


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _placement(placement: dict) -> str:
    rows = []
    for role, ranks in (placement.get("roles") or {}).items():
        for r in ranks:
            gpus = r.get("gpu_ids")
            rows.append([role, str(r.get("rank")), str(r.get("node")), ", ".join(map(str, gpus)) if gpus else "-",
                         str(r.get("pool")), str(r.get("bundle")), str(r.get("pid"))])
    plan = html.escape(str(placement.get("plan", "")))
    return (f"<section><h2>Placement</h2><p class='note'>mode <code>{html.escape(str(placement.get('mode')))}</code>"
            f"; where each rank landed (placement.json)</p><pre>{plan}</pre>"
            f"{_table(['role', 'rank', 'node', 'GPU ids', 'pool', 'bundle', 'pid'], rows)}</section>")


def _eval_table(doc: dict) -> str:
    sampled, greedy = doc.get("sampled") or {}, doc.get("greedy") or {}
    names = list(sampled) + [k for k in greedy if k not in sampled]
    header = ["metric", "sampled"] + (["greedy"] if greedy else [])
    rows = [[n, _fmt(sampled.get(n))] + ([_fmt(greedy.get(n))] if greedy else []) for n in names]
    s = doc.get("settings") or {}
    note = (f"{doc.get('prompts')} prompts x {s.get('n')} samples at temperature {s.get('temperature')} of "
            f"{doc.get('model')} on {doc.get('data')}; correct: reward >= {s.get('correct_threshold')}; maj@k votes "
            f"on {s.get('vote_on')} (eval.json)")
    return f"<section><h2>Evaluation</h2><p class='note'>{html.escape(note)}</p>{_table(header, rows)}</section>"


def _last_values(run: RunData) -> str:
    rows = []
    for k in run.keys():
        steps, values = run.series(k)
        rows.append([k, str(steps[-1]), _fmt(values[-1])])
    return (f"<section><h2>Last logged values</h2><p class='note'>every metric key of metrics.jsonl at the last step "
            f"that logged it</p>{_table(['key', 'step', 'value'], rows)}</section>")


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


SECTIONS_START, SECTIONS_END = "<!-- sections -->", "<!-- /sections -->"
"""Around a page's sections: a pipeline's page embeds a stage's written report by what lies between them."""
PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }}
img {{ max-width: 100%; }} figcaption, .note {{ color: #555; font-size: .85em; }}
table {{ border-collapse: collapse; font-size: .85em; }} td, th {{ border: 1px solid #ddd; padding: .2em .6em; }}
th {{ background: #f4f4f4; text-align: left; }} pre {{ background: #f8f8f8; padding: .6em; font-size: .8em; }}
.passed {{ color: #17702b; font-weight: 600; }} .failed {{ color: #b3261e; font-weight: 600; }}
details {{ margin: .8em 0; border-left: 3px solid #ddd; padding-left: .8em; }} summary {{ cursor: pointer; }}
</style></head>
<body><h1>{title}</h1><p class="note"><code>{run_dir}</code></p><p>{head}</p>
<!-- sections -->
{body}
<!-- /sections -->
</body></html>
"""
