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


def check_model_path(cfg: Config) -> None:
    """Fail at load time (not in a worker) if the model path is neither a local model nor hub-like."""
    p = Path(cfg.model.path)
    looks_local = cfg.model.path.startswith((".", "/", "~")) or p.exists()
    if looks_local and not (p / "config.json").is_file():
        raise ConfigError(f"model.path: '{cfg.model.path}' is not a model directory (no config.json there)")
