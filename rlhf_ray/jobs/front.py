"""The one front every job goes through, read top to bottom in ``run_job``:

    resolve the config -> check paths -> tokenizer -> data (and its schedule) -> lock the output directory ->
    join Ray, probe where GPUs really run -> placement plan, checked against the cluster -> run directory ->
    start the roles -> the job's body (a loop's ``run``) -> teardown, in a ``finally``: no actor or placement
    group outlives the job, also when a role fails to start -> the run's report.html (``rlhf_ray.report``).

A fault (an actor died, a call timed out: ``controller.recovery``) that the body does not recover from itself
ends that attempt; within ``train.max_restarts`` the roles start again and the body resumes from the latest
checkpoint.

A job is a ``Job``: its data step and its body. Everything slow or remote starts only after every check that
can fail on the driver has passed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from rlhf_ray.config import Config, Resolved, resolve
from rlhf_ray.controller.loop import Schedule, make_schedule

if TYPE_CHECKING:
    from rlhf_ray.controller.launch import Roles
    from rlhf_ray.controller.recovery import Recoveries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What a job's body gets: everything resolved, loaded and started."""

    resolved: Resolved
    roles: "Roles"
    tokenizer: Any
    train: Any
    evaluation: Any
    schedule: Optional[Schedule]
    output_dir: Path
    recoveries: "Recoveries"


@dataclass(frozen=True)
class Job:
    """One job: how its data is loaded and what it does once its roles run."""

    prepare_data: Callable[[Config, Any], tuple[Any, Any, dict]]
    """``(cfg, tokenizer) -> (train, evaluation, counts)``; bad data fails here, before any GPU is reserved."""
    body: Callable[[JobContext], dict[str, Any]]
    """Runs the job on started roles; returns paths and metrics."""
    trains: bool = True
    """Walks its data in steps (has a ``Schedule``); best_of_n only samples once over it."""


def prepare(cfg: Config) -> tuple[Resolved, Any, tuple[Any, Any, dict]]:
    """The steps ``rlhf-ray validate`` shares with a run: resolve, check paths, tokenizer, data."""
    from rlhf_ray.jobs.common import check_paths, load_tokenizer

    resolved = resolve(cfg)
    check_paths(resolved)
    tokenizer = load_tokenizer(resolved)
    return resolved, tokenizer, job_of(cfg).prepare_data(cfg, tokenizer)


def job_of(cfg: Config) -> Job:
    """The ``Job`` named by ``cfg.job``."""
    from rlhf_ray.jobs import get_job

    return get_job(cfg.job).JOB


def run_job(cfg: Config, job: Optional[Job] = None) -> dict[str, Any]:
    """Run ``job`` (default: the one ``cfg.job`` names) end to end; returns its result plus ``data`` (row counts)."""
    from rlhf_ray.jobs.common import OutputDirLock, check_output_dir, check_resume

    job = job or job_of(cfg)
    resolved, tokenizer, (train, evaluation, counts) = prepare(cfg)
    schedule = make_schedule(resolved, len(train)) if job.trains else None
    check_output_dir(resolved)
    check_resume(resolved, len(train))
    with OutputDirLock(resolved.paths.output_dir):
        result = _run_locked(cfg, job, tokenizer, train, evaluation, schedule)
        from rlhf_ray.report import write_report_or_warn  # a report failure warns, never fails a finished run

        result["report"] = write_report_or_warn(resolved.paths.output_dir)
    result["data"] = counts
    return result


def _run_locked(cfg: Config, job: Job, tokenizer: Any, train: Any, evaluation: Any,
                schedule: Optional[Schedule]) -> dict[str, Any]:
    """``run_job`` from Ray on, holding the output directory: probe, plan, run directory, roles, body, teardown."""
    from rlhf_ray.controller.cluster import init_ray, node_resources, probe_accelerator
    from rlhf_ray.controller.launch import Roles
    from rlhf_ray.controller.placement import check_plan
    from rlhf_ray.controller.recovery import Recoveries
    from rlhf_ray.jobs.common import prepare_output_dir

    cluster = init_ray(cfg.ray)
    resolved = resolve(cfg, probe_accelerator(cfg.learner.gpus_per_worker))
    plan = resolved.plan
    check_plan(plan, cluster, node_resources())
    log.info(plan.describe())
    output_dir = prepare_output_dir(resolved)
    recoveries = Recoveries(resolved.max_restarts, output_dir)

    while True:
        roles = Roles(plan, cfg.train.timeout_s, cfg.train.start_timeout_s)
        try:
            roles.start(resolved, schedule.optimizer_steps if schedule else 1, output_dir)
            return job.body(JobContext(resolved, roles, tokenizer, train, evaluation, schedule, output_dir,
                                       recoveries))
        except Exception as exc:  # noqa: BLE001 -- admit() re-raises whatever is not a fault
            recoveries.admit(exc)
        finally:
            roles.teardown()
        resolved = resolved.resuming()


def offline_job(prepare_data: Callable[[Config, Any], tuple[Any, Any, dict]],
                make_task: Callable[[Config, int], Any]) -> Job:
    """An offline job (SFT, RM, DPO, KTO): its data step, and ``OfflineLoop`` on its ``SupervisedTask``."""
    def body(ctx: JobContext) -> dict[str, Any]:
        from rlhf_ray.controller.offline_loop import OfflineLoop

        task = make_task(ctx.resolved.config, ctx.tokenizer.pad_token_id)
        return OfflineLoop(ctx.resolved, ctx.roles, ctx.schedule, task, ctx.train, ctx.evaluation,
                           ctx.output_dir, ctx.recoveries).run()

    return Job(prepare_data, body)
