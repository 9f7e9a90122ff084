"""Kahneman-Tversky optimisation (KTO) on unpaired completions labelled desirable or undesirable.

Rows: ``prompt``, a completion (``kto.completion_field``) and a boolean label (``kto.label_field``).
With the log-ratio rho = log pi(y|x) - log pi_ref(y|x) (summed over completion tokens, reference =
the starting model), the loss is a mean over the examples of the global batch of
    desirable:    kto.desirable_weight   * (1 - sigmoid(beta * (rho - z0)))
    undesirable:  kto.undesirable_weight * (1 - sigmoid(beta * (z0 - rho)))
(``rlhf_ray.algos.preference.kto_loss``). The reference point z0 = max(0, mean KL estimate), detached,
is estimated as in the paper from *mismatched* pairs: each example's prompt with another example's
completion (a fixed, seeded pairing made when the data is prepared), whose log-ratios estimate
KL(pi || pi_ref) on the prompt distribution without depending on the very completions whose rewards
the step pushes. Before each update the policy scores the mismatched halves of the whole global batch
(no grad), so z0 is one number per step, the same for any split into workers and micro-batches.

Reference log-probs (``kto.reference``): ``precompute`` (default, one pass of the untrained policy
before training, stored with the data) or ``group`` (a frozen reference learner group), as for DPO.
Logged: ``train/`` and ``eval/`` ``rewards_desirable`` / ``rewards_undesirable`` (mean beta * rho of
each class, which training should push up / down), their ``reward_margin``, ``kl`` (z0) and ``loss``.

Departs from the paper: the mismatched pairing is fixed per data set (the paper and TRL re-pair
within each micro-batch), and z0 covers the global batch rather than a micro-batch. The paper's
advice on weights: keep desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in
[1, 4/3]; the job logs that ratio and warns outside it.

Launch:
    rlhf-ray train examples/kto_tiny_cpu.yaml                       # this machine (CPU or GPUs)
    rlhf-ray train my_kto.yaml model.path=runs/sft/final learner.num_workers=8
    ray job submit --working-dir . -- rlhf-ray train my_kto.yaml     # a Ray cluster
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable

import torch

from rlhf_ray.config import Config
from rlhf_ray.objectives.preference import KTOKLLogratios, KTOLoss
from rlhf_ray.controller.offline_loop import SupervisedTask
from rlhf_ray.jobs.front import offline_job, run_job

log = logging.getLogger(__name__)


def kto_pre_step(objective: KTOLoss, infer: Callable[[Any], list[torch.Tensor]]) -> KTOLoss:
    """z0 of the batch: the policy's log-ratios on the mismatched halves, through ``kto_reference_point``."""
    return objective.with_z0(infer(KTOKLLogratios()))


def kto_reduce(rank_sums: list[dict]) -> dict[str, float]:
    keys = ("loss_sum", "examples", "desirable", "rewards_desirable_sum", "rewards_undesirable_sum",
            "logps_desirable_sum", "logps_undesirable_sum", "kl_sum")
    s = {k: sum(r[k] for r in rank_sums) for k in keys}
    n, n_good = max(1.0, s["examples"]), s["desirable"]
    n_bad = s["examples"] - n_good
    mean = lambda total, count: total / count if count else float("nan")  # noqa: E731 - a class absent this step
    out = {"train/loss": s["loss_sum"] / n, "train/kl": s["kl_sum"] / n,
           "train/rewards_desirable": mean(s["rewards_desirable_sum"], n_good),
           "train/rewards_undesirable": mean(s["rewards_undesirable_sum"], n_bad),
           "train/logps_desirable": mean(s["logps_desirable_sum"], n_good),
           "train/logps_undesirable": mean(s["logps_undesirable_sum"], n_bad),
           "train/desirable_fraction": n_good / n, "train/examples": s["examples"]}
    out["train/reward_margin"] = out["train/rewards_desirable"] - out["train/rewards_undesirable"]
    return out


def with_mismatched(examples: list[dict], max_length: int, seed: int) -> list[dict]:
    """Each example with ``kl``: its prompt + another example's completion (cut to ``max_length``).

    The partner of the j-th example of a seeded permutation is the (j+1)-th, so no example is its own
    partner and every completion is used once.
    """
    from rlhf_ray.data.batching import IGNORE_INDEX

    n = len(examples)
    order = list(range(n))
    random.Random(f"kto-mismatch:{seed}").shuffle(order)
    partner = {order[j]: order[(j + 1) % n] for j in range(n)}
    out = []
    for i, ex in enumerate(examples):
        prompt = ex["prompt_ids"]
        completion = examples[partner[i]]["completion_ids"][:max_length - len(prompt)]
        out.append({**ex, "kl": {"input_ids": prompt + completion,
                                 "labels": [IGNORE_INDEX] * len(prompt) + completion}})
    return out


def collate_kto(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Labelled rows then mismatched rows, right-padded together (2B, T), plus ``desirable`` (B,) bool."""
    from rlhf_ray.data.batching import pad_batch

    mb = pad_batch([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
                   + [e["kl"] for e in examples], pad_id)
    mb["desirable"] = torch.tensor([e["desirable"] for e in examples], dtype=torch.bool)
    return mb


def _check_balance(examples: list[dict], cfg: Config) -> float:
    """desirable_weight * n_desirable / (undesirable_weight * n_undesirable); warns outside the paper's [1, 4/3]."""
    n_good = sum(1 for e in examples if e["desirable"])
    n_bad = len(examples) - n_good
    if not n_good or not n_bad:
        log.warning("kto data has %s; KTO still trains, but the loss then only pushes one way",
                    "no undesirable examples" if n_good else "no desirable examples")
        return float("inf") if n_good else 0.0
    ratio = cfg.kto.desirable_weight * n_good / (cfg.kto.undesirable_weight * n_bad)
    if not 1.0 <= ratio <= 4.0 / 3.0:
        log.warning("kto: desirable_weight x %d desirable / (undesirable_weight x %d undesirable) = %.2f; the KTO "
                    "paper recommends [1, 4/3]: adjust kto.desirable_weight / kto.undesirable_weight",
                    n_good, n_bad, ratio)
    return ratio


def prepare_data(cfg: Config, tokenizer) -> tuple[list, list, dict]:
    """Load, validate and tokenize the labelled completions, and pair each with a mismatched completion."""
    from rlhf_ray.data.errors import DataError
    from rlhf_ray.data.preference import tokenize_unpaired
    from rlhf_ray.data.sources import load_rows, split_eval

    rows = load_rows(cfg.data)
    train_rows, eval_rows = split_eval(rows, cfg.data, seed=cfg.train.seed)
    fields = dict(completion_field=cfg.kto.completion_field, label_field=cfg.kto.label_field)
    train_set = tokenize_unpaired(train_rows, tokenizer, cfg.data, **fields)
    evaluation: list = []
    if eval_rows is not None and len(eval_rows):
        evaluation = tokenize_unpaired(eval_rows, tokenizer, cfg.data, **fields).examples
    for name, exs in (("training", train_set.examples), ("evaluation", evaluation)):
        if len(exs) == 1:
            raise DataError(f"kto: the {name} set has a single example; the KL estimate pairs each prompt with "
                            "another example's completion, so it needs at least 2")
    train = with_mismatched(train_set.examples, cfg.data.max_length, cfg.train.seed)
    evaluation = with_mismatched(evaluation, cfg.data.max_length, cfg.train.seed) if evaluation else []
    counts = {"rows": len(rows), **train_set.counts(), "eval_examples": len(evaluation),
              "weighted_desirable_ratio": round(_check_balance(train, cfg), 3)}
    log.info("kto data: %s", counts)
    return train, evaluation, counts


def make_task(cfg: Config, pad_id: int) -> SupervisedTask:
    """KTO's task: reference log-probs per example, the reference point from a no-grad pass per step."""
    from rlhf_ray.objectives.preference import PairLogprobs

    return SupervisedTask(
        name="kto", objective=KTOLoss.from_config(cfg), collate=lambda exs: collate_kto(exs, pad_id),
        reduce=kto_reduce, reference_forward=PairLogprobs(), pre_step=kto_pre_step, eval_before_training=True)


JOB = offline_job(prepare_data, make_task)


def run(cfg: Config) -> dict[str, Any]:
    """Run KTO as configured; returns paths and final metrics."""
    return run_job(cfg, JOB)
