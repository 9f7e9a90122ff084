"""``rlhf-ray report RUN_DIR``: one self-contained HTML page (``report.html``) of a run's pictures and tables.

``run_data`` reads a run directory (``metrics.jsonl``, ``placement.json``, ``eval.json``, ``config.yaml``),
``figures`` draws with matplotlib's Agg canvas (PNG bytes; pyplot's global state is never touched) and ``page``
lays the page out; ``pipeline_page`` lays out a pipeline's (``rlhf-ray pipeline``: its stages, gates and each
stage's report). Every job writes its report when it finishes (``rlhf_ray.jobs.front.run_job``), every pipeline
its own when it stops (``rlhf_ray.pipeline.run``).
"""

from rlhf_ray.report.page import ReportError, write_report, write_report_or_warn

__all__ = ["ReportError", "write_report", "write_report_or_warn"]
