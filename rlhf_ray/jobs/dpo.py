"""Direct preference optimisation (DPO) and its family on offline preference pairs.

Loss (``dpo.loss``, from ``rlhf_ray.algos.preference.PREFERENCE_LOSSES``), a mean over the pairs of
the global batch, on summed completion log-probs of chosen / rejected under the policy and a frozen
reference (the starting model, ``model.path``):
    sigmoid  DPO, -log sigmoid(beta * h) with h the chosen minus rejected log-ratio; conservative DPO
             with ``dpo.label_smoothing`` > 0
    ipo      IPO, (h - 1 / (2 beta))^2
(``dpo.length_normalized: true`` takes per-token mean log-probs instead of sums, for sigmoid and ipo)
    simpo    SimPO, reference-free: -log sigmoid(beta * (avg logp_w - avg logp_l) - dpo.simpo_gamma)
plus ``dpo.nll_coef`` x the chosen completion's per-token NLL (RPO). Chosen and rejected run as one
concatenated forward per micro-batch. Logged (``train/`` and, on held-out pairs, ``eval/``): implicit
rewards ``rewards_chosen`` / ``rewards_rejected`` (beta x log-ratio), their ``margin``, the
``reward_accuracy`` (chosen reward above rejected) and the raw ``logps_chosen`` / ``logps_rejected``;
the held-out set is also evaluated before the first step (logged at step 0).

Reference log-probs (``dpo.reference``): ``precompute`` (default) runs the still-untrained policy
group once over train and eval pairs before training and keeps the numbers with the data, so no
second model is in memory; ``group`` starts a frozen reference learner group (same model and learner
settings; it shares the policy's GPUs under ``placement.mode: shared``) that scores every step.

Departs from the paper: the reference is the model you start from (the paper first fine-tunes on
the chosen completions when no SFT model exists: run ``job: sft`` first for that). IPO sums the log-probs
as the paper's formula does; ``dpo.length_normalized: true`` gives the per-token mean that TRL trains and
the IPO authors' reported results used. The NLL term is normalised per pair.

Launch:
    rlhf-ray train examples/dpo_tiny_cpu.yaml                       # this machine (CPU or GPUs)
    rlhf-ray train my_dpo.yaml model.path=runs/sft/final learner.num_workers=8 dpo.beta=0.1
    ray job submit --working-dir . -- rlhf-ray train my_dpo.yaml     # a Ray cluster
"""

from __future__ import annotations

import logging
from typing import Any

from rlhf_ray.config import Config
from rlhf_ray.controller.offline_loop import SupervisedTask
from rlhf_ray.jobs.front import offline_job, run_job

log = logging.getLogger(__name__)


def dpo_reduce(rank_sums: list[dict]) -> dict[str, float]:
    keys = ("loss_sum", "pairs", "correct", "chosen_sum", "rejected_sum", "logps_chosen_sum", "logps_rejected_sum")
    s = {k: sum(r[k] for r in rank_sums) for k in keys}
    n = max(1.0, s["pairs"])
    out = {"train/loss": s["loss_sum"] / n, "train/reward_accuracy": s["correct"] / n,
           "train/margin": (s["chosen_sum"] - s["rejected_sum"]) / n,
           "train/rewards_chosen": s["chosen_sum"] / n, "train/rewards_rejected": s["rejected_sum"] / n,
           "train/logps_chosen": s["logps_chosen_sum"] / n, "train/logps_rejected": s["logps_rejected_sum"] / n,
           "train/pairs": s["pairs"]}
    if "nll_sum" in rank_sums[0]:
        out["train/nll"] = sum(r["nll_sum"] for r in rank_sums) / n
    return out


def prepare_data(cfg: Config, tokenizer) -> tuple[list, list, dict]:
    """Load, validate and tokenize the preference pairs (before any GPU is reserved)."""
    from rlhf_ray.data.preference import tokenize_pairs
    from rlhf_ray.data.sources import load_rows, split_eval

    rows = load_rows(cfg.data)
    train_rows, eval_rows = split_eval(rows, cfg.data, seed=cfg.train.seed)
    train = tokenize_pairs(train_rows, tokenizer, cfg.data)
    evaluation = tokenize_pairs(eval_rows, tokenizer, cfg.data).examples if eval_rows is not None and len(eval_rows) else []
    counts = {"rows": len(rows), **train.counts(), "eval_examples": len(evaluation)}
    log.info("dpo data: %s", counts)
    return list(train.examples), list(evaluation), counts


def make_task(cfg: Config, pad_id: int) -> SupervisedTask:
    """The DPO family's task: chosen and rejected in one padded batch, reference log-probs unless reference-free."""
    from rlhf_ray.data.batching import pad_batch
    from rlhf_ray.objectives.preference import DPOLoss, PairLogprobs

    loss = DPOLoss.from_config(cfg)
    if not loss.uses_reference:
        log.info("dpo.loss=%s is reference-free: no reference log-probs (dpo.reference is ignored)", cfg.dpo.loss)
    return SupervisedTask(
        name="dpo", objective=loss,
        collate=lambda exs: pad_batch([e["chosen"] for e in exs] + [e["rejected"] for e in exs], pad_id),
        reduce=dpo_reduce, reference_forward=PairLogprobs() if loss.uses_reference else None,
        eval_before_training=True)


JOB = offline_job(prepare_data, make_task)


def run(cfg: Config) -> dict[str, Any]:
    """Run DPO (or IPO / SimPO) as configured; returns paths and final metrics."""
    return run_job(cfg, JOB)
