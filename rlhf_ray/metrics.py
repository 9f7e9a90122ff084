"""Per-step metrics: ``metrics.jsonl`` (always), tensorboard, wandb, and a progress bar with ETA.

Keys are namespaced (``train/``, ``rollout/``, ``actor/``, ``critic/``, ``timing/``, ``efficiency/``)
so dashboards group them. ``metrics.jsonl`` holds one JSON object per step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rlhf_ray.config.schema import LoggingConfig

log = logging.getLogger(__name__)


def accumulate(sums: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
    """Fold one micro-batch's (or one rank's) metric values into ``sums``: added, except keys ending in ``_max``,
    which keep the largest (a maximum over micro-batches and ranks, where a sum would mean nothing)."""
    for k, v in metrics.items():
        v = float(v)
        sums[k] = (max(sums[k], v) if k in sums else v) if k.endswith("_max") else sums.get(k, 0.0) + v
    return sums


class PhaseTimer:
    """One wall-clock timer per phase; ``with timer("generate"): ...`` adds to ``timing/generate_s``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out = {f"timing/{k}_s": v for k, v in self.seconds.items()}
        self.seconds = {}
        return out


class MetricsLogger:
    """Writes each step's metrics to every enabled sink; safe to resume (appends, drops later steps)."""

    def __init__(self, cfg: LoggingConfig, output_dir: str | os.PathLike, total_steps: int,
                 config_dict: dict[str, Any], start_step: int = 0, job: str = "train"):
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        self.total_steps, self.start_step = total_steps, start_step
        self._t0 = time.perf_counter()
        self._truncate_after(start_step)
        self._file = open(self.path, "a")
        self._tb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError as exc:  # tensorboard is a declared dependency; say so if missing
                log.warning("tensorboard logging disabled: %s", exc)
        self._wandb = None
        if cfg.wandb != "off":
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, mode=cfg.wandb,
                                     dir=str(self.dir), config=config_dict, resume="allow")
        self._bar = None
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=job, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, keep only the lines up to the checkpoint's step (later ones will be redone)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one step (``step`` is 1-based: the number of optimizer steps done)."""
        row = {"step": step, "time_s": round(time.perf_counter() - self._t0, 3)}
        row.update({k: _clean(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in row.items()
                     if isinstance(v, float) and k in _BAR_KEYS}
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()


_BAR_KEYS = {"train/loss", "rollout/reward_mean", "train/lr", "eval/loss", "eval/accuracy"}


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    return v


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Load a ``metrics.jsonl`` file (used by tests and benchmarks)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
