"""Reward-model training: a scalar head on a causal-LM backbone, Bradley-Terry loss on preference pairs.

The model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` built from ``model.path``
(a causal LM gets a new, randomly initialised ``score`` head); its score of a sequence is read at
the last real token. Loss: ``-log sigmoid(r(x, y_w) - r(x, y_l) - m)`` averaged over the pairs of
the global batch (InstructGPT's pairwise loss; ``rm.margin`` / ``rm.margin_field`` give Llama 2's
margin ``m``). Chosen and rejected run as one concatenated forward per micro-batch. Held-out
accuracy (score of chosen above rejected) is logged as ``eval/accuracy`` when ``data.eval_fraction``
or ``data.eval_path`` is set. The final model in ``<output_dir>/final`` loads with
``AutoModelForSequenceClassification.from_pretrained`` and serves as ``reward.model`` of an RL job.

Departs from InstructGPT: pairs are independent examples (InstructGPT puts all K-choose-2 pairs of
one prompt in the same batch), and there is no reward normalisation after training.

Launch:
    rlhf-ray train examples/rm_tiny_cpu.yaml                        # this machine (CPU or GPUs)
    rlhf-ray train my_rm.yaml model.path=Qwen/Qwen2.5-0.5B-Instruct learner.num_workers=8
    ray job submit --working-dir . -- rlhf-ray train my_rm.yaml      # a Ray cluster
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from rlhf_ray.config import Config
from rlhf_ray.controller.offline_loop import SupervisedTask
from rlhf_ray.jobs.front import offline_job, run_job

log = logging.getLogger(__name__)


def rm_reduce(rank_sums: list[dict]) -> dict[str, float]:
    s = {k: sum(r[k] for r in rank_sums) for k in ("loss_sum", "pairs", "correct", "margin_sum", "chosen_sum",
                                                  "rejected_sum")}
    n = max(1.0, s["pairs"])
    return {"train/loss": s["loss_sum"] / n, "train/accuracy": s["correct"] / n, "train/margin": s["margin_sum"] / n,
            "train/score_chosen": s["chosen_sum"] / n, "train/score_rejected": s["rejected_sum"] / n,
            "train/pairs": s["pairs"]}


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded together (2B, T), plus ``margin`` (B,)."""
    from rlhf_ray.data.batching import pad_batch

    mb = pad_batch([ex["chosen"] for ex in examples] + [ex["rejected"] for ex in examples], pad_id)
    mb["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float32)
    return mb


def with_margins(examples: list[dict], rows, cfg: Config) -> tuple[list[dict], int]:
    """Each pair with its margin: ``rm.margin_field`` of its row when present, else ``rm.margin``.

    A margin that is not a finite number >= 0 is a bad row (``data.on_bad_row``); returns the kept
    examples and how many were skipped.
    """
    from rlhf_ray.data.sft import BadRows

    field = cfg.rm.margin_field
    by_location = dict(rows.items()) if field else {}
    bad = BadRows(cfg.data)
    out = []
    for ex in examples:
        value = by_location[ex["location"]].get(field) if field else None
        if value is None:
            value = cfg.rm.margin
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            bad.add(ex["location"], f"field '{field}' (rm.margin_field) must be a finite number >= 0, "
                                    f"got {value!r:.40}")
            continue
        out.append({**ex, "margin": float(value)})
    return out, bad.count


def prepare_data(cfg: Config, tokenizer) -> tuple[list, list, dict]:
    """Load, validate and tokenize the preference pairs (before any GPU is reserved)."""
    from rlhf_ray.data.preference import tokenize_pairs
    from rlhf_ray.data.sources import load_rows, split_eval

    rows = load_rows(cfg.data)
    train_rows, eval_rows = split_eval(rows, cfg.data, seed=cfg.train.seed)
    train_set = tokenize_pairs(train_rows, tokenizer, cfg.data)
    train, skipped = with_margins(train_set.examples, train_rows, cfg)
    evaluation: list = []
    if eval_rows is not None and len(eval_rows):
        evaluation, eval_skipped = with_margins(tokenize_pairs(eval_rows, tokenizer, cfg.data).examples, eval_rows,
                                                cfg)
        skipped += eval_skipped
    if not train:
        from rlhf_ray.data.errors import DataError

        raise DataError(f"no preference pairs left from {train_set.source}: every row's rm.margin_field "
                        f"'{cfg.rm.margin_field}' was unusable")
    counts = {"rows": len(rows), **train_set.counts(), "examples": len(train), "eval_examples": len(evaluation)}
    if cfg.rm.margin_field:
        counts["skipped_bad_margin"] = skipped
    log.info("rm data: %s", counts)
    return train, evaluation, counts


def make_task(cfg: Config, pad_id: int) -> SupervisedTask:
    """The reward model's task: Bradley-Terry loss on a scalar head over chosen / rejected pairs."""
    from rlhf_ray.objectives.preference import RMLoss

    return SupervisedTask(name="rm", objective=RMLoss(), collate=lambda exs: collate_pairs(exs, pad_id),
                          reduce=rm_reduce, eval_before_training=True)


JOB = offline_job(prepare_data, make_task)


def run(cfg: Config) -> dict[str, Any]:
    """Train the reward model as configured; returns paths and final metrics."""
    return run_job(cfg, JOB)
