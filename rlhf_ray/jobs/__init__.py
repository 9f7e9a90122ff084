"""Jobs: short compositions of data, learner groups, engines and algorithms.

Each job module exposes ``run(cfg) -> dict`` and ``prepare_data(cfg, tokenizer)`` (used by
``rlhf-ray validate``). The config's ``job`` key picks one from ``JOBS``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

JOBS: dict[str, str] = {
    "sft": "rlhf_ray.jobs.sft",
    "rm": "rlhf_ray.jobs.rm",
    "dpo": "rlhf_ray.jobs.dpo",
    "kto": "rlhf_ray.jobs.kto",
    "best_of_n": "rlhf_ray.jobs.best_of_n",
    "online_dpo": "rlhf_ray.jobs.online_dpo",
    "ppo": "rlhf_ray.jobs.ppo",
    "grpo": "rlhf_ray.jobs.grpo",
    "eval": "rlhf_ray.jobs.eval",
}


def get_job(name: str) -> ModuleType:
    if name not in JOBS:
        raise ValueError(f"job: unknown job '{name}'; choose one of {sorted(JOBS)}")
    return importlib.import_module(JOBS[name])
