"""Pieces every job's front shares: checking paths, the tokenizer, the run directory."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_ray.config import ConfigError, save_config

if TYPE_CHECKING:
    from rlhf_ray.config.resolve import Resolved

log = logging.getLogger(__name__)

RUN_PARTS = ("metrics.jsonl", "checkpoints", "final", "best", "tensorboard", "eval.json", "eval_samples.jsonl",
             "report.html", "rollouts.jsonl")
"""What a run writes into ``train.output_dir`` (and ``train.overwrite`` removes)."""


def check_paths(resolved: "Resolved") -> None:
    """The model paths that look local must be model directories, before any worker starts.

    ``Resolved.paths`` holds them absolute (Ray workers do not share the driver's working directory when the
    driver joins an existing cluster). A path that does not exist here stays as written: a hub name, or a path
    on shared storage only the workers see. Under ``ray job submit --working-dir`` the driver runs inside the
    uploaded directory, so relative paths in the config resolve against it.
    """
    cfg, paths = resolved.config, resolved.paths
    p = Path(paths.model)
    relative = not cfg.model.path.startswith((".", "/", "~"))
    if relative and not p.exists() and p.parent != Path(".") and p.parent.is_dir():
        # "runs/tiny-model" reads like a hub name too; a local runs/ says which was meant.
        raise ConfigError(f"model.path: '{paths.model}' does not exist (its directory '{p.parent}' does, so it is "
                          "not taken for a hub name); write the model there first, e.g. "
                          f"rlhf-ray make-tiny-model {paths.model}")
    looks_local = cfg.model.path.startswith((".", "/", "~")) or p.exists()
    if looks_local and not (p / "config.json").is_file():
        hint = f"; it holds a run: its model is {p / 'final'}" if (p / "final" / "config.json").is_file() else ""
        raise ConfigError(f"model.path: '{paths.model}' is not a model directory (no config.json there){hint}")
    for key, value in (("reward.model", paths.reward_model), ("critic.model", paths.critic_model)):
        if value and value.startswith(("/", ".", "~")) and not (Path(value) / "config.json").is_file():
            raise ConfigError(f"{key}: '{value}' is not a model directory (no config.json there)")


def load_tokenizer(resolved: "Resolved"):
    """The tokenizer named by ``model.tokenizer`` (or ``model.path``), with a pad token guaranteed."""
    from transformers import AutoTokenizer

    cfg, name = resolved.config, resolved.paths.tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - re-raised with the config key that names the culprit
        raise ConfigError(f"model.{'tokenizer' if cfg.model.tokenizer else 'path'}: cannot load a tokenizer "
                          f"from '{name}': {type(exc).__name__}: {exc}") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_output_dir(resolved: "Resolved") -> None:
    """Refuse to clobber another run in ``train.output_dir`` unless resuming or told to overwrite, and to resume
    another job's checkpoint (no writes)."""
    from rlhf_ray.checkpoint import CheckpointDir

    cfg, out = resolved.config, Path(resolved.paths.output_dir)
    tc = cfg.train
    has_run = (out / "metrics.jsonl").exists() or (out / "checkpoints").exists()
    if has_run and not tc.resume and not tc.overwrite:
        raise ConfigError(
            f"train.output_dir: {out} already holds a run. Set train.resume=true to continue it, "
            "train.overwrite=true to start over there, or pick another output_dir.")
    latest = CheckpointDir(out).latest() if tc.resume else None
    if tc.resume and latest is None and (out / "metrics.jsonl").exists():
        raise ConfigError(f"train.resume: {out} has no complete checkpoint to resume from, and starting over there "
                          "would drop its metrics.jsonl; set train.resume=false train.overwrite=true to start over")


def check_resume(resolved: "Resolved", n_items: int) -> None:
    """With ``train.resume``: the latest checkpoint must be of this job, and of this model and data unless
    ``train.resume_mismatch_ok`` (no writes; before anything starts)."""
    from rlhf_ray.checkpoint import CheckpointDir, data_fingerprint

    cfg, out = resolved.config, Path(resolved.paths.output_dir)
    latest = CheckpointDir(out).latest() if cfg.train.resume else None
    if latest is None:
        return
    state = CheckpointDir.read_state(latest)
    if state.get("job", cfg.job) != cfg.job:
        raise ConfigError(f"train.resume: the latest checkpoint in {out} ({latest.name}) is of job "
                          f"{state['job']}, not {cfg.job}; pick another train.output_dir")
    differs = []
    if state.get("model", resolved.paths.model) != resolved.paths.model:
        differs.append(f"model.path {state['model']} -> {resolved.paths.model}")
    data = data_fingerprint(cfg.data.path, n_items)
    if state.get("data", data) != data:
        differs.append(f"data {state['data']} -> {data}")
    if differs and not cfg.train.resume_mismatch_ok:
        raise ConfigError(f"train.resume: the latest checkpoint in {out} ({latest.name}) was trained on another "
                          f"{' and '.join(d.split(' ', 1)[0] for d in differs)}: {'; '.join(differs)}. Set "
                          "train.resume_mismatch_ok=true to resume it anyway")
    for d in differs:
        log.warning("resuming %s despite a changed %s", latest, d)


class OutputDirLock:
    """An exclusive lock on ``train.output_dir`` for the life of a run: a second run there is refused at once
    (``flock``, released when the run ends or its process dies). Use as a context manager."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / ".rlhf_ray.lock"
        self._file = None

    def __enter__(self) -> "OutputDirLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ConfigError(f"train.output_dir: another run (pid {holder}) is using {self.path.parent}; "
                              "wait for it or pick another output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


def prepare_output_dir(resolved: "Resolved") -> Path:
    """Create ``train.output_dir`` (removing an old run there under ``train.overwrite``) and write config.yaml:
    the config as given plus what was resolved. Called once the placement has been checked."""
    check_output_dir(resolved)
    tc, out = resolved.config.train, Path(resolved.paths.output_dir)
    if tc.overwrite and not tc.resume:
        for part in RUN_PARTS:
            p = out / part
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_config(resolved.config, out / "config.yaml", resolved)
    return out
