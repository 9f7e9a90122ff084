"""Submit an rlhf_ray job to a Ray cluster with the Ray Jobs API (what `ray job submit` does).

    python launch/submit.py --address http://HEAD:8265 examples/grpo_tiny_cpu.yaml [key=value ...] --follow

The working directory (this repo, minus run outputs) travels as the job's runtime environment, so
the cluster runs exactly this code; `--pip` adds packages to install on the cluster. The config and
overrides are checked here first (a bad key fails before anything is sent). The job id is printed;
`--follow` streams the logs; the exit code is 0 only if the job ends SUCCEEDED (1 if it ends FAILED
or STOPPED, 2 if it could not be submitted). The equivalent plain command is:

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m rlhf_ray train CONFIG [key=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

EXCLUDES = [".git", "runs", ".gpu", ".whl", "benchmarks/out", "**/__pycache__", "wandb", ".pytest_cache",
            # credentials never travel with the code (the upload is readable by anyone who can read the job)
            ".env", ".env.*", "**/.env", "**/.env.*", "*.pem", "*.key", ".netrc", ".aws", ".ssh", "**/credentials*"]
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "API_KEY", "ACCESS_KEY", "PRIVATE_KEY")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """The job could not be submitted (bad input, cluster unreachable); the message is one line."""


def build_entrypoint(config: str, overrides: list[str]) -> str:
    """The command the cluster runs; `python -m` so the working dir's package is used."""
    return " ".join(shlex.quote(a) for a in ["python", "-m", "rlhf_ray", "train", config, *overrides])


def check_config(config: str, overrides: list[str], working_dir: str) -> None:
    """The config file exists inside the working dir that travels, and loads with the overrides."""
    path = Path(config) if Path(config).is_absolute() else Path(working_dir) / config
    if not path.is_file():
        raise SubmitError(f"config file not found: {path} (paths are relative to --working-dir {working_dir})")
    try:
        from rlhf_ray.config import ConfigError, load_config
    except ImportError:  # rlhf_ray not importable here: the cluster checks it
        return
    try:
        load_config(path, overrides)
    except ConfigError as exc:
        raise SubmitError(f"config error: {exc}") from None


def use_local_token() -> None:
    """Send this machine's Ray auth token when there is one and RAY_AUTH_MODE is unset: `ray start --head`
    turns token authentication on whenever a token exists, clients do not guess (a cluster without
    authentication ignores the token)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or (path.is_file() and path.stat().st_size > 0):
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str):
    """A JobSubmissionClient for the dashboard at ``address``, or a one-line SubmitError."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, auth and URL errors: all one line to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {first}") from None


def secret_env_keys(env: dict[str, str]) -> list[str]:
    """The ``--env`` keys that look like secrets (their values are shown in the job's runtime env)."""
    return [k for k in env if any(word in k.upper() for word in SECRET_WORDS)]


def submit(address: str, config: str, overrides: list[str], working_dir: str = ".", pip: list[str] | None = None,
           env: dict[str, str] | None = None, submission_id: str | None = None) -> tuple[object, str]:
    """Submit and return (client, job id)."""
    use_local_token()
    client = connect(address)
    runtime_env: dict = {"working_dir": working_dir, "excludes": EXCLUDES}
    if pip:
        runtime_env["pip"] = pip
    if env:
        runtime_env["env_vars"] = env
    try:
        job_id = client.submit_job(entrypoint=build_entrypoint(config, overrides), runtime_env=runtime_env,
                                   submission_id=submission_id)
    except Exception as exc:  # noqa: BLE001 - e.g. a duplicate submission id, a working dir over the size limit
        raise SubmitError(f"submission rejected by {address}: {str(exc).strip().splitlines()[-1]}") from None
    return client, job_id


def follow_logs(client, job_id: str, timeout_s: float) -> None:
    """Stream the job's logs until it ends (or ``timeout_s``)."""
    ends_with_newline = True

    async def tail() -> None:
        nonlocal ends_with_newline
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)
            ends_with_newline = lines.endswith("\n") if lines else ends_with_newline

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=timeout_s))
    except asyncio.TimeoutError:
        pass
    if not ends_with_newline:
        print(flush=True)


def wait(client, job_id: str, follow: bool, timeout_s: float) -> str:
    """Wait for a terminal status (streaming logs when ``follow``); returns the status name."""
    deadline = time.monotonic() + timeout_s
    if follow:
        follow_logs(client, job_id, timeout_s)
    while True:
        status = client.get_job_status(job_id).value
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s (it keeps running; "
                               f"`ray job stop {job_id}` ends it)")
        time.sleep(1.0)


def failure_reason(client, job_id: str) -> str:
    """One line: the job's own last error line if its logs have one, else Ray's status message."""
    message = (getattr(client.get_job_info(job_id), "message", "") or "").strip()
    try:
        lines = [ln.strip() for ln in client.get_job_logs(job_id).splitlines() if ln.strip()]
    except Exception:  # noqa: BLE001 - the logs are a nicety here; the status message is enough
        lines = []
    return lines[-1] if lines else (message.splitlines()[0] if message else "no message")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config, relative to --working-dir (it travels with it)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.output_dir=/shared/run1")
    p.add_argument("--address", default=None,
                   help="Ray dashboard address (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--working-dir", default=".")
    p.add_argument("--pip", action="append", default=[], help="extra pip requirement for the cluster (repeatable)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE environment for the job (repeatable)")
    p.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to wait for the job to end")
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    args = p.parse_intermixed_args(argv)  # overrides may follow the options, as in `... --follow k=v`

    address = (args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
               or "http://127.0.0.1:8265")
    try:
        bad_env = [kv for kv in args.env if "=" not in kv]
        if bad_env:
            raise SubmitError(f"--env {bad_env[0]!r}: expected KEY=VALUE")
        check_config(args.config, args.overrides, args.working_dir)
        env = dict(kv.split("=", 1) for kv in args.env)
        for key in secret_env_keys(env):
            print(f"submit: warning: --env {key} looks like a secret; its value is stored in the job's runtime env, "
                  "which anyone who can list jobs (dashboard, `ray job list`) can read. Prefer a variable the "
                  "cluster's nodes already hold, or a mounted file.", file=sys.stderr)
        client, job_id = submit(address, args.config, args.overrides, args.working_dir, args.pip, env,
                                args.submission_id)
    except SubmitError as exc:
        print(f"submit: {exc}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id} to {address}\n"
          f"  logs: ray job logs --address {address} {job_id}{' --follow' if not args.follow else ''}\n"
          f"  stop: ray job stop --address {address} {job_id}", flush=True)
    if args.no_wait:
        return 0
    try:
        status = wait(client, job_id, args.follow, args.timeout)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job_id} keeps running (`ray job stop --address {address} {job_id}` ends it)",
              file=sys.stderr)
        return 130
    except TimeoutError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"job {job_id} ended {status}", flush=True)
    if status != "SUCCEEDED":
        print(f"job {job_id} {status.lower()}: {failure_reason(client, job_id)}\n"
              f"full logs: ray job logs --address {address} {job_id}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
