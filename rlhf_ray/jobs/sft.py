"""Supervised fine-tuning (SFT) on DeepSpeed learners.

Loss: mean negative log-likelihood over *response* tokens of the global batch (prompt tokens are
masked with IGNORE_INDEX by the data pipeline), i.e. a token mean across ranks and accumulation steps, so
1 worker x 8 accumulation steps and 2 workers x 4 give the same update.

Launch:
    rlhf-ray train examples/sft_tiny_cpu.yaml                       # this machine (CPU or GPUs)
    rlhf-ray train my.yaml model.path=Qwen/Qwen2.5-0.5B learner.num_workers=8
    ray job submit --working-dir . -- rlhf-ray train my.yaml         # a Ray cluster
"""

from __future__ import annotations

import logging
from typing import Any

from rlhf_ray.config import Config
from rlhf_ray.controller.offline_loop import SupervisedTask
from rlhf_ray.data.batching import IGNORE_INDEX
from rlhf_ray.jobs.front import offline_job, run_job

log = logging.getLogger(__name__)


def response_tokens(batch: list[dict]) -> int:
    """Loss-carrying (response) tokens of a batch of examples: the SFT loss is a mean over them."""
    return sum(sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX) for ex in batch)


def sft_reduce(rank_sums: list[dict]) -> dict[str, float]:
    nll = sum(r["nll_sum"] for r in rank_sums)
    tokens = sum(r["response_tokens"] for r in rank_sums)
    return {"train/loss": nll / max(1.0, tokens), "train/response_tokens": tokens}


def prepare_data(cfg: Config, tokenizer) -> tuple[list, list, dict]:
    """Load, validate and tokenize the SFT rows (before any GPU is reserved)."""
    from rlhf_ray.data.batching import pack_examples
    from rlhf_ray.data.sft import tokenize_sft
    from rlhf_ray.data.sources import load_rows, split_eval

    rows = load_rows(cfg.data)
    train_rows, eval_rows = split_eval(rows, cfg.data, seed=cfg.train.seed)
    train = tokenize_sft(train_rows, tokenizer, cfg.data)
    evaluation = tokenize_sft(eval_rows, tokenizer, cfg.data) if eval_rows is not None and len(eval_rows) else None
    train_ex = list(train.examples)
    if cfg.data.packing:
        train_ex = pack_examples(train_ex, cfg.data.max_length)
    counts = {"rows": len(rows), **train.counts()}
    log.info("sft data: %s", counts)
    return train_ex, list(evaluation.examples) if evaluation else [], counts


def make_task(cfg: Config, pad_id: int) -> SupervisedTask:
    """SFT's task: next-token loss on response tokens."""
    from rlhf_ray.data.batching import pad_batch
    from rlhf_ray.objectives.common import SFTLoss

    return SupervisedTask(name="sft", objective=SFTLoss(), collate=lambda exs: pad_batch(exs, pad_id),
                          reduce=sft_reduce, loss_tokens=response_tokens)


JOB = offline_job(prepare_data, make_task)


def run(cfg: Config) -> dict[str, Any]:
    """Run SFT as configured; returns paths and final metrics."""
    return run_job(cfg, JOB)
