"""Run a loaded pipeline, read top to bottom in ``run_pipeline``:

    state       read pipeline_state.json (a rerun): done stages are skipped, interrupted ones resume; a done
                stage whose config has changed since is refused before anything runs
    for each stage, in order:
      run       its job in this process, all stages in one Ray instance (``train.resume`` from its latest
                checkpoint when an earlier run of it was interrupted, else ``train.overwrite``: the stage's
                directory belongs to the pipeline)
      gates     its gates, checked on what it logged (``rlhf_ray.pipeline.gates``); a failed gate stops the
                pipeline, and the rest of the stages do not run
    report      <output_dir>/report.html: stages, gates, and each stage's own report (``rlhf_ray.report``)

The state is saved atomically before and after each stage and after its gates, so a crash anywhere leaves a file
the next run continues from.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.pipeline.gates import GateResult, check_gate, stage_metrics
from rlhf_ray.pipeline.spec import PipelineError, PipelineSpec, StageSpec
from rlhf_ray.pipeline.state import STATE_FILE, PipelineState, StageRecord, changed_keys, fingerprint

log = logging.getLogger(__name__)

RESULT_PATHS = ("final_model", "best_model", "report", "eval_path")
"""What a stage record keeps of its job's result."""


@dataclass(frozen=True)
class PipelineResult:
    """How a run of the pipeline ended."""

    state: PipelineState
    state_path: Path
    report: Optional[Path]
    failed_gates: tuple[GateResult, ...] = ()

    @property
    def passed(self) -> bool:
        return self.state.status == "passed"


def plan(spec: PipelineSpec, state: Optional[PipelineState]) -> list[tuple[StageSpec, str]]:
    """What a run would do with each stage: ``skip (done)``, ``resume``, ``run again`` or ``run``."""
    out = []
    for stage in spec.stages:
        rec = state.stages.get(stage.name) if state else None
        if rec is None:
            out.append((stage, "run"))
        elif rec.status == "done":
            out.append((stage, "skip (done)"))
        else:
            out.append((stage, "resume" if _checkpoint(stage) else "run again"))
    return out


def run_pipeline(spec: PipelineSpec, restart: Optional[str] = None) -> PipelineResult:
    """Run ``spec`` (continuing a previous run in its ``output_dir``); ``restart`` runs that stage and every later
    one again even if done. Raises what a stage's job raises (its record says ``failed``); a failed gate is not an
    exception but ``PipelineResult.passed`` False with the failed gates."""
    state = _state(spec, restart)
    state_path = state.save()
    failed: list[GateResult] = []
    try:
        for stage, action in plan(spec, state):
            log.info("pipeline stage %s (job %s): %s -> %s", stage.name, stage.job, action, stage.output_dir)
            if action != "skip (done)":
                _run_stage(spec, stage, state, resume=action == "resume")
            results = _gates(spec, stage)
            state.gates[stage.name] = [dataclasses.asdict(r) for r in results]
            failed = [r for r in results if not r.passed]
            for r in results:
                log.info("gate %s %s %s: %s", stage.name, r.metric, "passed" if r.passed else "FAILED", r.reason)
            if failed:
                state.status = "failed"
                state.failure = f"stage '{stage.name}': " + "; ".join(f"gate {r.metric} {r.rule} failed: {r.reason}"
                                                                       for r in failed)
                state.save()
                break
            state.save()
        else:
            state.status, state.failure = "passed", None
            state.save()
    except BaseException as exc:
        state.status, state.failure = "error", f"{type(exc).__name__}: {exc}"
        state.save()
        raise
    finally:
        from rlhf_ray.report import write_report_or_warn

        report = write_report_or_warn(spec.output_dir)
    return PipelineResult(state, state_path, report, tuple(failed))


def _state(spec: PipelineSpec, restart: Optional[str]) -> PipelineState:
    """The saved state of this pipeline (or a new one), with ``restart`` and later stages forgotten; a done stage
    whose config differs from the one it ran with is refused here, before anything runs."""
    old = PipelineState.load(spec.output_dir)
    names = [s.name for s in spec.stages]
    state = PipelineState(str(spec.path), str(spec.output_dir), names)
    if old is not None:
        state.stages = {n: rec for n, rec in old.stages.items() if n in names}
    if restart is not None:
        if restart not in names:
            raise PipelineError(f"--restart: no stage '{restart}'; the stages are {', '.join(names)}")
        for name in names[names.index(restart):]:
            state.stages.pop(name, None)
    for stage in spec.stages:
        rec = state.stages.get(stage.name)
        if rec is not None and rec.status == "done":
            changed = changed_keys(rec.config, fingerprint(stage.config))
            if changed:
                raise PipelineError(
                    f"stage '{stage.name}': done, but with another config than the pipeline now gives it ("
                    f"{', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}); rerun it and every later stage "
                    f"with --restart {stage.name}, or restore its config")
    return state


def _checkpoint(stage: StageSpec) -> bool:
    from rlhf_ray.checkpoint import CheckpointDir

    return CheckpointDir(stage.output_dir).latest() is not None


def _run_stage(spec: PipelineSpec, stage: StageSpec, state: PipelineState, resume: bool) -> None:
    """The stage's job, in this process, in the pipeline's Ray instance; its record saved before and after."""
    from rlhf_ray.controller.cluster import init_ray
    from rlhf_ray.jobs import get_job

    init_ray(spec.ray)  # once: every stage's own init_ray then joins this instance
    cfg = stage.config
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=resume, overwrite=not resume))
    rec = state.stages.get(stage.name)
    rec = StageRecord(stage.job, str(stage.output_dir), "running", fingerprint(stage.config),
                      attempts=(rec.attempts if rec else 0) + 1, seconds=rec.seconds if rec else 0.0, resumed=resume)
    state.stages[stage.name] = rec
    state.status = "running"
    state.save()
    t0 = time.perf_counter()
    try:
        result: dict[str, Any] = get_job(cfg.job).run(cfg)
    except BaseException as exc:
        rec.status, rec.error = "failed", f"{type(exc).__name__}: {exc}"
        rec.seconds += time.perf_counter() - t0
        state.save()
        raise
    rec.seconds += time.perf_counter() - t0
    rec.status, rec.error = "done", None
    rec.result = {k: str(result[k]) for k in RESULT_PATHS if result.get(k)}
    state.save()


def _gates(spec: PipelineSpec, stage: StageSpec) -> list[GateResult]:
    """The stage's gates checked on what it (and each gate's baseline stage) logged."""
    if not stage.gates:
        return []
    mine = stage_metrics(stage.output_dir)
    return [check_gate(g, stage.name, mine, stage_metrics(spec.stage(g.baseline).output_dir) if g.baseline else None)
            for g in stage.gates]


def describe(spec: PipelineSpec, restart: Optional[str] = None) -> str:
    """The plan ``rlhf-ray pipeline --dry-run`` prints: each stage's job, config, model, output and what a run would
    do with it (with ``--restart``), its gates, and the Ray instance the stages share. Raises what the run would
    raise before starting anything (a done stage whose config changed)."""
    state = _state(spec, restart)
    r = spec.ray
    ray = f"joins {r.address}" if r.address else f"starts a local Ray instance ({r.num_cpus or 'all'} CPUs)"
    lines = [f"pipeline {spec.path} -> {spec.output_dir}; {ray}"]
    for stage, action in plan(spec, state):
        lines.append(f"  {stage.name}: job {stage.job}, {action}; config {stage.source}; model "
                     f"{stage.config.model.path} -> {stage.output_dir}")
        for g in stage.gates:
            lines.append(f"    gate {g.metric} {g.rule()}")
    return "\n".join(lines)


def summary(result: PipelineResult) -> str:
    """What ``rlhf-ray pipeline`` prints at the end: the outcome, each stage, each gate, where things are."""
    st = result.state
    lines = [f"pipeline {st.status}" + (f": {st.failure}" if st.failure else f" ({len(st.order)} stages)")]
    width = max(len(n) for n in st.order) + 2
    for name in st.order:
        rec = st.stages.get(name)
        if rec is None:
            lines.append(f"  {name.ljust(width)}not run")
            continue
        model = rec.result.get("best_model") or rec.result.get("final_model") or rec.result.get("eval_path") or ""
        lines.append(f"  {name.ljust(width)}{rec.job:<11}{rec.status:<8}{rec.seconds:7.1f} s  {model or rec.output_dir}")
        for g in st.gates.get(name, []):
            lines.append(f"  {'':{width}}gate {g['metric']} {g['rule']}: {'passed' if g['passed'] else 'FAILED'} "
                         f"({g['reason']})")
    lines.append(f"  state:   {result.state_path}")
    if result.report:
        lines.append(f"  report:  {result.report}")
    return "\n".join(lines)


__all__ = ["PipelineResult", "STATE_FILE", "describe", "plan", "run_pipeline", "summary"]
