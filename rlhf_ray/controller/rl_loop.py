"""The RL step loop (PPO, GRPO and the REINFORCE family), read top to bottom in ``RLLoop.step``:

    1. generate    the vLLM engines sample ``rollout.n_samples`` responses per prompt (token ids + log-probs)
    2. score       reward functions here, while the reward model, reference, policy (old log-probs,
                   unless ``algo.old_logprobs: update`` takes them from step 4's own forward pass) and
                   critic run their forward passes on their own groups
    3. advantages  KL penalty (in the reward, or later in the loss), then the configured estimator
    4. update      policy (and critic) optimizer steps over mini-batches and epochs
    5. sync        the policy's new weights into every vLLM engine

Everything distributed (which rank gets which sequences, placement, the sync channel) lives in
``roles.py`` / ``rl_roles.py``; the math lives in ``rlhf_ray.algos``. With ``placement.mode: hybrid``
on GPUs the loop also moves memory: vLLM sleeps outside generation, learners offload during it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from rlhf_ray.algos.advantages import AdvantageParams, get_advantage
from rlhf_ray.algos.aggregation import masked_mean, masked_whiten
from rlhf_ray.algos.kl import AdaptiveKLController, FixedKLController, kl_in_reward, kl_penalty
from rlhf_ray.checkpoint import CheckpointDir, publish_final
from rlhf_ray.config import Config, ConfigError, to_dict
from rlhf_ray.controller.reward_scoring import RewardScorer
from rlhf_ray.controller.rl_roles import RLRoles
from rlhf_ray.data.batching import iter_epoch_batches
from rlhf_ray.data.prompts import PromptSet
from rlhf_ray.efficiency import ModelShape, efficiency_metrics, rl_step_counts
from rlhf_ray.engines.rollout_engine import SamplingSpec
from rlhf_ray.metrics import MetricsLogger, PhaseTimer

log = logging.getLogger(__name__)

POLICY_FIELDS = ("input_ids", "attention_mask", "action_mask", "old_logprobs", "advantages")


def batch_shape(cfg: Config) -> tuple[int, int, int]:
    """(sequences per step B, sequences per optimizer step M, optimizer steps per rollout step)."""
    a = cfg.algo
    B = a.prompts_per_step * cfg.rollout.n_samples
    if cfg.job == "online_dpo":  # one DPO step per round on its pairs
        return B, a.prompts_per_step, 1
    return B, B // a.mini_batches, a.mini_batches * a.ppo_epochs


def attach_prompts(batch, prompts: list) -> list:
    """Give ``batch`` its prompt texts and row fields (for reward functions); returns each sequence's prompt."""
    rows = [prompts[g] for g in batch.group_index.tolist()]
    batch.prompts = [p.prompt_text for p in rows]
    batch.row_fields = {k: [p.fields.get(k) for p in rows] for k in rows[0].fields}
    return rows


def score_batch(scorer: RewardScorer, batch, rows: list) -> dict[str, float]:
    """``batch.rewards`` from ``scorer`` (reward model started first, functions meanwhile); returns its metrics."""
    reward_model = scorer.start(batch, [p.prompt for p in rows])
    batch.rewards, metrics = scorer.finish(batch, reward_model, batch.prompts, batch.row_fields)
    return metrics


class RLLoop:
    """State of one RL run (roles, prompt order, KL controller, logger, checkpoints) and its step."""

    def __init__(self, cfg: Config, roles: RLRoles, prompts: PromptSet, eval_prompts: Optional[PromptSet],
                 tokenizer, output_dir: Path):
        self.cfg, self.roles, self.prompts, self.eval_prompts = cfg, roles, prompts, eval_prompts
        self.tokenizer, self.output_dir = tokenizer, output_dir
        a = cfg.algo
        self.B, self.M, self.updates_per_step = batch_shape(cfg)
        self.total_steps = a.total_steps
        self.steps_per_epoch = len(prompts) // a.prompts_per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(f"algo.prompts_per_step: {a.prompts_per_step} is more than the {len(prompts)} prompts")
        self.kl = (AdaptiveKLController(a.kl_coef, a.adaptive_kl_target, a.adaptive_kl_horizon)
                   if a.adaptive_kl_target is not None else FixedKLController(a.kl_coef))
        self.spec = SamplingSpec.from_config(cfg.rollout)
        self.adv_params = AdvantageParams(gamma=a.gamma, lam=a.lam, norm_by_std=a.norm_adv_by_std)
        self.scorer = RewardScorer.from_config(cfg, roles.reward_model, tokenizer)
        # The efficiency report: every phase beside its floor on the device measured here, once per run.
        self.shapes = {"policy": ModelShape.from_hf_config(cfg.model.path),
                       "critic": (ModelShape.from_hf_config(cfg.critic.model or cfg.model.path, head="token_value")
                                  if roles.critic is not None else None),
                       "reward_model": (ModelShape.from_hf_config(cfg.reward.model, head="sequence_score")
                                        if roles.reward_model is not None else None)}
        self.calibration = roles.actor.group.call_rank0("calibrate") if roles.actor is not None else None
        self.ckpt = CheckpointDir(output_dir, keep=cfg.train.keep_checkpoints)
        self.hybrid = cfg.placement.mode == "hybrid" and roles.on_gpu
        self._epoch_cache: tuple[int, list] = (-1, [])

    # ---- the step ---------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        a, timer = self.cfg.algo, PhaseTimer()
        kl_coef = self.kl.value  # the coefficient this step uses (the adaptive controller moves it at the end)
        prompts = self.prompt_batch(step)
        t_step = time.perf_counter()

        # 1. generate
        batch, gens, rows = self.generate(prompts, timer)

        # 2. score: remote forwards start first, the reward functions run here meanwhile
        forwards = {}
        if a.old_logprobs == "learner":
            forwards["old_logprobs"] = self.roles.actor.forward_async(batch, "token_logprobs",
                                                                      temperature=self.spec.temperature)
        if self.roles.reference is not None:
            forwards["reference"] = self.roles.reference.forward_async(batch, "token_logprobs",
                                                                       temperature=self.spec.temperature)
        if self.roles.critic is not None:
            forwards["critic"] = self.roles.critic.forward_async(batch, "token_values")
        metrics = self.score(batch, rows, timer)
        results = {name: f.result() for name, f in forwards.items()}
        for name, (_, seconds) in results.items():
            metrics[f"timing/{name}_s"] = seconds
        if a.old_logprobs != "update":  # update: pi_old comes from the update's own forward pass
            batch.old_logprobs = results["old_logprobs"][0] if "old_logprobs" in results else batch.rollout_logprobs
        batch.ref_logprobs = results["reference"][0] if "reference" in results else None
        batch.values = results["critic"][0] if "critic" in results else None

        # 3. advantages
        mask = batch.action_mask
        kl = kl_penalty(batch.old_logprobs, batch.ref_logprobs, a.kl_estimator) if batch.ref_logprobs is not None else None
        kl_reward_coef = kl_coef if (kl is not None and a.kl_in == "reward") else 0.0
        batch.token_rewards = kl_in_reward(batch.rewards, kl if kl is not None else torch.zeros_like(mask), mask,
                                           kl_reward_coef)
        batch.advantages, batch.returns = get_advantage(a.advantage)(
            batch.token_rewards, mask, batch.group_index, batch.values, self.adv_params)
        if a.advantage == "gae":  # standard PPO practice: whiten GAE advantages over the batch
            batch.advantages = masked_whiten(batch.advantages, mask) * mask

        # 4. update policy (and critic)
        with timer("train"):
            actor_steps = self.roles.actor.update(batch, "policy", self.policy_fields(), self.policy_kwargs(),
                                                  a.mini_batches, a.ppo_epochs, self.cfg.train.seed + step,
                                                  self.cfg.rollout.max_new_tokens)
            critic_steps = []
            if self.roles.critic is not None:
                critic_steps = self.roles.critic.update(
                    batch, "value", ("input_ids", "attention_mask", "action_mask", "values", "returns"),
                    {"value_clip": a.value_clip, "loss_agg": a.loss_agg}, a.mini_batches, a.ppo_epochs,
                    self.cfg.train.seed + step, self.cfg.rollout.max_new_tokens)

        # 5. sync the new policy into the engines
        with timer("weight_sync"):
            sync = self.sync_weights()

        if kl is not None:
            self.kl.update(float(masked_mean(kl, mask)), self.B)
        metrics.update(self.step_metrics(batch, gens, kl, actor_steps, critic_steps, sync))
        metrics["kl/coef"] = kl_coef
        return self.finish_metrics(metrics, timer, batch, gens, t_step)

    # ---- pieces of the step -------------------------------------------------------------------------
    def generate(self, prompts: list, timer: PhaseTimer) -> tuple[Any, Any, list]:
        """``rollout.n_samples`` responses per prompt as a ``RolloutBatch`` (with prompt texts and row fields),
        the raw generations, and each sequence's prompt example."""
        with timer("generate"):
            batch, gens = self.roles.rollout.generate([p.prompt_ids for p in prompts], self.spec,
                                                      self.tokenizer.pad_token_id)
        self.after_generation(timer)
        return batch, gens, attach_prompts(batch, prompts)

    def score(self, batch, rows: list, timer: PhaseTimer) -> dict[str, float]:
        """Fill ``batch.rewards`` (reward functions here, the reward model on its group); returns reward metrics."""
        with timer("reward"):
            return score_batch(self.scorer, batch, rows)

    def prompt_batch(self, step: int) -> list:
        """The prompts of ``step``: epochs over the prompt set, reshuffled per epoch from (seed, epoch)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._epoch_cache[0] != epoch:
            batches = iter_epoch_batches(len(self.prompts), self.cfg.algo.prompts_per_step, self.cfg.train.seed,
                                         epoch, self.cfg.data.shuffle)
            self._epoch_cache = (epoch, list(batches))
        return [self.prompts[i] for i in self._epoch_cache[1][pos]]

    def policy_fields(self) -> tuple[str, ...]:
        a = self.cfg.algo
        fields = POLICY_FIELDS
        if a.old_logprobs == "update":
            fields = tuple(f for f in fields if f != "old_logprobs") + ("rollout_logprobs",)
        elif a.importance_cap is not None and a.old_logprobs == "learner":
            fields += ("rollout_logprobs",)
        if self.cfg.algo.kl_in == "loss" and self.roles.reference is not None:
            fields += ("ref_logprobs",)
        return fields

    def policy_kwargs(self) -> dict[str, Any]:
        a = self.cfg.algo
        kl_in_loss = a.kl_in == "loss" and self.roles.reference is not None
        return dict(policy_loss=a.policy_loss, clip_low=a.clip_ratio_low, clip_high=a.clip_ratio_high,
                    dual_clip=a.dual_clip, loss_agg=a.loss_agg, temperature=self.spec.temperature,
                    entropy_coef=a.entropy_coef, kl_coef=self.kl.value if kl_in_loss else 0.0,
                    kl_estimator=a.kl_estimator,
                    importance_cap=a.importance_cap if a.old_logprobs in ("learner", "update") else None,
                    old_from_update=a.old_logprobs == "update")

    def sync_weights(self) -> dict[str, float]:
        """Policy -> engines. In hybrid mode the engines wake their weights first and their KV cache after."""
        if self.hybrid:
            self.roles.rollout.wake_up(["weights"])
        result = self.roles.rollout.sync_from(self.roles.actor)
        if self.hybrid:
            for role in self.learner_roles():
                role.offload()
            self.roles.rollout.wake_up(["kv_cache"])
        return result

    def after_generation(self, timer: PhaseTimer) -> None:
        if self.hybrid:
            with timer("sleep_wake"):
                self.roles.rollout.sleep()
                for role in self.learner_roles():
                    role.reload()

    def learner_roles(self) -> list:
        r = self.roles
        return [x for x in (r.actor, r.reference, r.critic, r.reward_model) if x is not None]

    def rollout_metrics(self, batch, gens, sync) -> dict[str, float]:
        """Rollout statistics and the weight sync of one step (shared by every RL-style loop)."""
        lengths, rewards = batch.response_lengths, batch.rewards
        return {
            "rollout/reward_mean": float(rewards.mean()), "rollout/reward_std": float(rewards.std(unbiased=False)),
            "rollout/reward_max": float(rewards.max()), "rollout/reward_min": float(rewards.min()),
            "rollout/response_length_mean": float(lengths.mean()), "rollout/response_length_max": float(lengths.max()),
            "rollout/truncated_fraction": sum(r == "length" for r in batch.finish_reasons) / batch.size,
            "rollout/sequences": float(batch.size), "rollout/generated_tokens": float(gens.num_tokens),
            "weight_sync/seconds": sync["seconds"], "weight_sync/bytes": sync["bytes"],
            "weight_sync/gb_per_s": sync["bytes"] / 1e9 / max(sync["seconds"], 1e-9),
        }

    def finish_metrics(self, metrics: dict[str, float], timer: PhaseTimer, batch, gens, t_step: float) -> dict:
        """Add the phase timings and throughput of the step that started at ``t_step``."""
        metrics.update(timer.pop())
        metrics["timing/step_s"] = time.perf_counter() - t_step
        metrics["efficiency/tokens_per_s"] = float(batch.attention_mask.sum()) / metrics["timing/step_s"]
        metrics["efficiency/generate_tokens_per_s"] = gens.num_tokens / max(metrics["timing/generate_s"], 1e-9)
        if self.calibration is not None:
            sh = self.shapes
            trainable = self.roles.actor.group.facts[0]["trainable_params"] if self.cfg.model.lora.enabled else None
            counts = rl_step_counts(batch, self.cfg, self.roles.on_gpu, metrics.get("weight_sync/bytes", 0.0),
                                    sh["policy"], sh["critic"], sh["reward_model"], trainable)
            metrics.update(efficiency_metrics(metrics, counts, sh["policy"], self.calibration, sh["critic"],
                                              sh["reward_model"]))
        return metrics

    def step_metrics(self, batch, gens, kl, actor_steps, critic_steps, sync) -> dict[str, float]:
        mask = batch.action_mask
        m = self.rollout_metrics(batch, gens, sync)
        tokens = sum(s["action_tokens"] for s in actor_steps)
        if self.cfg.algo.old_logprobs == "update":  # one optimizer step: every micro-batch saw the pre-update policy
            gap = sum(s["old_rollout_absdiff_sum"] for s in actor_steps) / tokens
        else:
            gap = float(masked_mean((batch.old_logprobs - batch.rollout_logprobs).abs(), mask))
        m.update({"rollout/advantage_mean": float(masked_mean(batch.advantages, mask)),
                  "rollout/logprob_diff_learner_vllm": gap})
        if kl is not None:
            m["kl/policy_reference"] = float(masked_mean(kl, mask))
        m.update({
            "actor/pg_loss": sum(s["pg_loss_sum"] for s in actor_steps) / tokens,
            "actor/clip_fraction": sum(s["clipped_sum"] for s in actor_steps) / tokens,
            "actor/entropy": sum(s["entropy_sum"] for s in actor_steps) / tokens,
            "actor/approx_kl": sum(s["approx_kl_sum"] for s in actor_steps) / tokens,
            "actor/grad_norm": float(np.mean([s["grad_norm"] for s in actor_steps])),
            "actor/lr": actor_steps[-1]["lr"],
        })
        if any("kl_sum" in s for s in actor_steps):
            m["actor/kl_loss"] = sum(s.get("kl_sum", 0.0) for s in actor_steps) / tokens
        if critic_steps:
            ctokens = sum(s["action_tokens"] for s in critic_steps)
            m.update({"critic/value_loss": sum(s["value_loss_sum"] for s in critic_steps) / ctokens,
                      "critic/clip_fraction": sum(s["value_clipped_sum"] for s in critic_steps) / ctokens,
                      "critic/values_mean": sum(s["values_sum"] for s in critic_steps) / ctokens,
                      "critic/grad_norm": float(np.mean([s["grad_norm"] for s in critic_steps])),
                      "critic/lr": critic_steps[-1]["lr"]})
        return m

    def evaluate(self) -> dict[str, float]:
        """Mean reward of one greedy response per held-out prompt (``data.eval_fraction`` / ``eval_path``)."""
        prompts = list(self.eval_prompts)
        spec = dataclasses.replace(self.spec, n=1, temperature=0.0)
        batch, _ = self.roles.rollout.generate([p.prompt_ids for p in prompts], spec, self.tokenizer.pad_token_id)
        score_batch(self.scorer, batch, attach_prompts(batch, prompts))
        return {"eval/reward_mean": float(batch.rewards.mean()),
                "eval/response_length_mean": float(batch.response_lengths.mean())}

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        staging = self.ckpt.staging(step)
        state = {"step": step}
        self.roles.actor.save(str(staging / "actor"), state)
        if self.roles.critic is not None:
            self.roles.critic.save(str(staging / "critic"), state)
        self.roles.actor.export_hf(str(staging / "model"), self.cfg.model.tokenizer or self.cfg.model.path)
        return self.ckpt.finalize(step, {"step": step, "job": self.cfg.job, "kl": self.kl.state_dict()})

    def resume(self) -> int:
        latest = self.ckpt.latest() if self.cfg.train.resume else None
        if latest is None:
            return 0
        self.roles.actor.load(str(latest / "actor"))
        if self.roles.critic is not None:
            self.roles.critic.load(str(latest / "critic"))
        state = CheckpointDir.read_state(latest)
        self.kl.load_state_dict(state["kl"])
        log.info("resumed from %s at step %d", latest, state["step"])
        return int(state["step"])

    # ---- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, tc = self.cfg, self.cfg.train
        start = self.resume()
        if start or cfg.model.lora.load_in_4bit:
            # The engines loaded model.path. A resumed policy is another model, and so is a QLoRA one (its base
            # is the 4-bit rounding of those weights): give the engines its weights before the first rollout.
            self.sync_weights()
        elif self.hybrid:  # engines asleep since start-up (rl_roles): learners make room, engines wake
            for role in self.learner_roles():
                role.offload()
            self.roles.rollout.wake_up()
        logger = MetricsLogger(cfg.logging, self.output_dir, self.total_steps, to_dict(cfg), start, job=cfg.job)
        last: dict[str, float] = {}
        try:
            for step in range(start, self.total_steps):
                metrics = self.step(step)
                if self.eval_prompts is not None and tc.eval_every and (step + 1) % tc.eval_every == 0:
                    metrics.update(self.evaluate())
                logger.log(step + 1, metrics)
                last = metrics
                if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < self.total_steps:
                    self.save(step + 1)
            if self.eval_prompts is not None and tc.eval_every:
                last.update(self.evaluate())
            final_ckpt = self.save(self.total_steps) if self.total_steps > start else self.ckpt.latest()
        finally:
            logger.close()
        final = publish_final(final_ckpt / "model", self.output_dir)
        return {"output_dir": str(self.output_dir), "final_model": str(final), "steps": self.total_steps,
                "metrics": last}
