"""Pieces every job shares: the run directory, the tokenizer, resolving ``auto`` settings."""

from __future__ import annotations

import logging
from pathlib import Path

from rlhf_ray.config import Config, ConfigError, save_config

log = logging.getLogger(__name__)


def prepare_output_dir(cfg: Config) -> Path:
    """Create ``train.output_dir`` and write the resolved config; refuse to clobber another run."""
    out = Path(cfg.train.output_dir)
    has_run = (out / "metrics.jsonl").exists() or (out / "checkpoints").exists()
    if has_run and not cfg.train.resume and not cfg.train.overwrite:
        raise ConfigError(
            f"train.output_dir: {out} already holds a run. Set train.resume=true to continue it, "
            "train.overwrite=true to start over there, or pick another output_dir.")
    if has_run and cfg.train.overwrite and not cfg.train.resume:
        import shutil

        for part in ("metrics.jsonl", "checkpoints", "final", "tensorboard"):
            p = out / part
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


def load_tokenizer(cfg: Config):
    """The tokenizer named by ``model.tokenizer`` (or ``model.path``), with a pad token guaranteed."""
    from transformers import AutoTokenizer

    name = cfg.model.tokenizer or cfg.model.path
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - re-raised with the config key that names the culprit
        raise ConfigError(f"model.{'tokenizer' if cfg.model.tokenizer else 'path'}: cannot load a tokenizer "
                          f"from '{name}': {type(exc).__name__}: {exc}") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_paths(cfg: Config) -> None:
    """Make the config's local paths absolute, then check the model path, before any worker starts.

    Absolute because Ray workers do not share the driver's working directory when the driver joins an
    existing cluster: a relative ``runs/tiny-model`` would point elsewhere there (and be taken for a hub
    name). A path that does not exist here is left as written (a hub name, or a path on shared storage
    only the workers see). Under ``ray job submit --working-dir`` the driver runs inside the uploaded
    directory, so relative paths in the config resolve against it.
    """
    def absolute(value: str | None, must_exist: bool = True) -> str | None:
        if not value or value.startswith(("http://", "https://", "demo:")):
            return value
        p = Path(value).expanduser()
        return str(p.resolve()) if (p.exists() or not must_exist) else value

    cfg.model.path = absolute(cfg.model.path)
    cfg.model.tokenizer = absolute(cfg.model.tokenizer)
    cfg.reward.model = absolute(cfg.reward.model)
    cfg.critic.model = absolute(cfg.critic.model)
    cfg.train.output_dir = absolute(cfg.train.output_dir, must_exist=False)
    p = Path(cfg.model.path)
    looks_local = cfg.model.path.startswith((".", "/", "~")) or p.exists()
    if looks_local and not (p / "config.json").is_file():
        raise ConfigError(f"model.path: '{cfg.model.path}' is not a model directory (no config.json there)")
    for key, value in (("reward.model", cfg.reward.model), ("critic.model", cfg.critic.model)):
        if value and value.startswith(("/", ".", "~")) and not (Path(value) / "config.json").is_file():
            raise ConfigError(f"{key}: '{value}' is not a model directory (no config.json there)")
