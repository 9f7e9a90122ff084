"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"), on the RL machinery.

Each round, read top to bottom in ``OnlineDPOLoop.step``:

    1. generate   the current policy samples ``rollout.n_samples`` responses per prompt (vLLM engines)
    2. score      reward functions and / or a reward model label them
    3. pairs      per prompt, the best response is chosen and the worst rejected (ties are skipped, counted)
    4. update     reference log-probs of both (frozen reference group; none for SimPO), one DPO step with
                  the offline ``dpo`` objective and the losses of ``rlhf_ray.algos.preference``
    5. sync       the new weights into the engines

Generation, scoring, weight sync, checkpoints and resume are ``RolloutLoop``'s; only the update differs. With
``rollout.env`` / ``rollout.tools`` a sample is a whole episode: its DPO log-prob sum counts the model's tokens only
(the observations' labels are IGNORE_INDEX, ``sequence_example``), which each step's ``online_dpo/loss_tokens`` and
``online_dpo/sampled_tokens`` show.
Every round's pairs go into one optimizer step, each learner rank taking its share as one micro-batch
(``learner.micro_batch_size x learner.num_workers >= algo.prompts_per_step``, checked at load).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rlhf_ray.controller.roles import merge_rank_metrics
from rlhf_ray.controller.rollout_loop import RolloutLoop
from rlhf_ray.data.batching import IGNORE_INDEX, pad_batch
from rlhf_ray.metrics import PhaseTimer
from rlhf_ray.objectives.common import BatchTotals
from rlhf_ray.objectives.preference import REF_KEY, DPOLoss, PairLogprobs


def best_worst_pairs(rewards: torch.Tensor, group_index: torch.Tensor) -> tuple[list[tuple[int, int]], int]:
    """For each prompt (``group_index`` value), the (chosen, rejected) indices of its highest- and lowest-reward
    samples; prompts whose samples all score the same give no pair and are counted. The first of equal scores
    wins, so the choice is deterministic. rewards: (B,), group_index: (B,) -> (pairs in prompt order, ties)."""
    pairs, ties = [], 0
    for g in torch.unique(group_index, sorted=True).tolist():
        idx = (group_index == g).nonzero().flatten().tolist()
        scores = [float(rewards[i]) for i in idx]
        hi, lo = max(scores), min(scores)
        if hi == lo:
            ties += 1
            continue
        pairs.append((idx[scores.index(hi)], idx[scores.index(lo)]))
    return pairs, ties


def judge_candidates(rewards: torch.Tensor, group_index: torch.Tensor, responses: list[str]
                     ) -> tuple[list[tuple[int, int]], int]:
    """For each prompt, the two samples a pairwise judge compares: the best and worst by ``rewards`` when they
    differ (``best_worst_pairs``), else its first two samples with different texts; prompts whose samples are all
    the same text give none and are counted. rewards: (B,), group_index: (B,) -> (pairs in prompt order, ties)."""
    pairs, ties = [], 0
    for g in torch.unique(group_index, sorted=True).tolist():
        idx = (group_index == g).nonzero().flatten().tolist()
        by_reward, _ = best_worst_pairs(rewards[idx], torch.zeros(len(idx), dtype=torch.long))
        if by_reward:
            pairs.append((idx[by_reward[0][0]], idx[by_reward[0][1]]))
            continue
        other = next((i for i in idx[1:] if responses[i] != responses[idx[0]]), None)
        if other is None:
            ties += 1
        else:
            pairs.append((idx[0], other))
    return pairs, ties


def pair_engine_sums(batch, gens, pairs: list[tuple[int, int]]) -> dict[str, float]:
    """What the engines sampled in the pairs' sequences (chosen and rejected together), the counts the learners'
    DPO log-prob sums must match, over b in the pairs' rows:

        sampled_tokens    = sum_b sum_t action_mask[b, t]                     (the model's tokens only)
        completion_tokens = sum_b len(completion_b)                           (multi-turn: observations too)
        logps             = sum_b sum_t rollout_logprobs[b, t] * action_mask[b, t]

    batch: a ``RolloutBatch`` (action_mask, rollout_logprobs: (B, T-1)); gens: its ``Generations``
    (token_ids[b]: row b's completion)."""
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    mask = batch.action_mask[rows]
    return {"sampled_tokens": float(mask.sum()),
            "completion_tokens": float(sum(len(gens.token_ids[b]) for b in rows)),
            "logps": float((batch.rollout_logprobs[rows] * mask).sum())}


def sequence_example(batch, b: int) -> dict[str, list[int]]:
    """Row ``b`` of a rollout batch as ``{"input_ids", "labels"}`` with labels IGNORE_INDEX off the response."""
    n = int(batch.attention_mask[b].sum())
    ids = batch.input_ids[b, :n].tolist()
    action = batch.action_mask[b, : n - 1].bool().tolist()
    labels = [IGNORE_INDEX] + [t if a else IGNORE_INDEX for t, a in zip(ids[1:], action)]
    return {"input_ids": ids, "labels": labels}


class OnlineDPOLoop(RolloutLoop):
    """A rollout loop with a DPO update on each round's best / worst samples."""

    name = "online_dpo"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss = DPOLoss.from_config(self.cfg)
        self.pair_judge = None
        if self.cfg.reward.judge.pairwise:
            from transformers import AutoTokenizer

            from rlhf_ray.controller.reward_scoring import PairJudge

            judge_path = self.resolved.paths.judge_model
            self.pair_judge = PairJudge(self.cfg.reward.judge, self.roles.get("judge"),
                                        AutoTokenizer.from_pretrained(judge_path))

    def step(self, step: int) -> dict[str, float]:
        timer = PhaseTimer()
        t_step = time.perf_counter()

        # 1-2. generate and score
        batch, gens, rows, metrics = self.rollout_batch(step, timer)
        if batch.rewards is None:
            metrics.update(self.score(batch, rows, timer))

        # 3. pairs: best / worst by reward, or (reward.judge.pairwise) as the judge decides
        if self.pair_judge is None:
            pairs, ties = best_worst_pairs(batch.rewards, batch.group_index)
        else:
            with timer("judge"):
                candidates, ties = judge_candidates(batch.rewards, batch.group_index, batch.responses)
                pairs, judged = self.pair_judge.label(candidates, batch.prompts, batch.responses, batch.row_fields)
            metrics.update(judged)
        metrics.update({"online_dpo/pairs": float(len(pairs)), "online_dpo/ties_skipped": float(ties)})

        # 4. update (skipped, and said so, when too few prompts had a better and a worse sample)
        with timer("train"):
            if len(pairs) >= self.policy.world:
                metrics.update(self.dpo_update(batch, pairs, timer, pair_engine_sums(batch, gens, pairs)))
            metrics["online_dpo/update_skipped"] = float(len(pairs) < self.policy.world)

        # 5. sync
        with timer("weight_sync"):
            sync = self.publish_weights()
        return self.finish_metrics(metrics, timer, batch, gens, sync, t_step)

    def dpo_update(self, batch, pairs: list[tuple[int, int]], timer: PhaseTimer, engine: dict[str, float]
                   ) -> dict[str, float]:
        """One optimizer step of ``DPOLoss`` on ``pairs``, each rank's share as one two-halves micro-batch.

        Besides the loss terms: the tokens the learners' log-prob sums counted (``online_dpo/loss_tokens``) next to
        the tokens the engines sampled in those sequences and their whole completions (``engine``, from
        ``pair_engine_sums``): multi-turn, the first two are equal and below the third (observations outside the
        loss). Where the engines' log-probs are the policy's own (temperature 1, no top-p / top-k), the gap
        ``online_dpo/logprob_diff_learner_vllm`` = |sum learner log-probs - sum engine log-probs| / sampled tokens
        over the pairs, the learners' taken before the update (one optimizer step, after the forward)."""
        world, pad = self.policy.world, self.tokenizer.pad_token_id
        shares = [pairs[r::world] for r in range(world)]
        per_rank = [[pad_batch([sequence_example(batch, c) for c, _ in share]
                               + [sequence_example(batch, r) for _, r in share], pad)] for share in shares]
        if self.roles.reference is not None:
            with timer("reference"):
                refs = self.roles.reference.infer(per_rank, PairLogprobs())
            for rank_mbs, rank_out in zip(per_rank, refs):
                for mb, ref in zip(rank_mbs, rank_out):
                    mb[REF_KEY] = ref
        # One micro-batch per rank: grad_scale = world undoes DeepSpeed's mean over ranks.
        ranks = self.policy.train_step(per_rank, self.loss, BatchTotals(sequences=len(pairs), grad_scale=world))
        s = merge_rank_metrics(ranks)
        n = s["pairs"]
        out = {"actor/dpo_loss": s["loss_sum"] / n, "actor/reward_accuracy": s["correct"] / n,
               "actor/margin": (s["chosen_sum"] - s["rejected_sum"]) / n,
               "actor/rewards_chosen": s["chosen_sum"] / n, "actor/rewards_rejected": s["rejected_sum"] / n,
               "actor/grad_norm": s["grad_norm"], "actor/lr": s["lr"], "actor/skipped_updates": s["skipped_updates"],
               "online_dpo/loss_tokens": s["tokens_sum"], "online_dpo/sampled_tokens": engine["sampled_tokens"],
               "online_dpo/completion_tokens": engine["completion_tokens"]}
        r = self.cfg.rollout
        if r.temperature == 1.0 and r.top_p == 1.0 and r.top_k <= 0:  # else the engines' are processed log-probs
            gap = abs(s["logps_chosen_sum"] + s["logps_rejected_sum"] - engine["logps"])
            out["online_dpo/logprob_diff_learner_vllm"] = gap / max(engine["sampled_tokens"], 1.0)
        return out
