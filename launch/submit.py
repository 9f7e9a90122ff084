"""Submit an rlhf_ray job to a Ray cluster with the Ray Jobs API (what `ray job submit` does).

    python launch/submit.py --address http://HEAD:8265 examples/grpo_tiny_cpu.yaml [key=value ...] --follow

The working directory (this repo, minus run outputs) travels as the job's runtime environment, so
the cluster runs exactly this code; `--pip` adds packages to install on the cluster. The job id is
printed; `--follow` streams the logs; the exit code is 0 only if the job ends SUCCEEDED.
The equivalent plain command is:

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m rlhf_ray train CONFIG [key=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time

EXCLUDES = [".git", "runs", ".gpu", ".whl", "benchmarks/out", "**/__pycache__", "wandb"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def build_entrypoint(config: str, overrides: list[str]) -> str:
    """The command the cluster runs; `python -m` so the working dir's package is used."""
    return " ".join(shlex.quote(a) for a in ["python", "-m", "rlhf_ray", "train", config, *overrides])


def submit(address: str, config: str, overrides: list[str], working_dir: str = ".", pip: list[str] | None = None,
           env: dict[str, str] | None = None, submission_id: str | None = None) -> tuple[object, str]:
    """Submit and return (client, job id)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env: dict = {"working_dir": working_dir, "excludes": EXCLUDES}
    if pip:
        runtime_env["pip"] = pip
    if env:
        runtime_env["env_vars"] = env
    job_id = client.submit_job(entrypoint=build_entrypoint(config, overrides), runtime_env=runtime_env,
                               submission_id=submission_id)
    return client, job_id


def wait(client, job_id: str, follow: bool, timeout_s: float) -> str:
    """Wait for a terminal status (streaming logs when ``follow``); returns the status name."""
    if follow:
        async def tail() -> None:
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="", flush=True)
        try:
            asyncio.run(asyncio.wait_for(tail(), timeout=timeout_s))
        except asyncio.TimeoutError:
            pass
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id).value
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s (it keeps running; "
                               f"`ray job stop {job_id}` ends it)")
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--address", default=None, help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--working-dir", default=".")
    p.add_argument("--pip", action="append", default=[], help="extra pip requirement for the cluster (repeatable)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE environment for the job (repeatable)")
    p.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--timeout", type=float, default=24 * 3600.0)
    p.add_argument("--submission-id", default=None)
    args = p.parse_args(argv)
    import os

    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    env = dict(kv.split("=", 1) for kv in args.env)
    client, job_id = submit(address, args.config, args.overrides, args.working_dir, args.pip, env, args.submission_id)
    print(f"submitted job {job_id} to {address}", flush=True)
    if args.no_wait:
        return 0
    status = wait(client, job_id, args.follow, args.timeout)
    print(f"job {job_id} ended {status}", flush=True)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        print(f"job {job_id} failed: {getattr(info, 'message', '')}\n"
              f"full logs: ray job logs --address {address} {job_id}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
