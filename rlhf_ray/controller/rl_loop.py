"""The RL step (PPO, GRPO and the REINFORCE family), read top to bottom in ``RLLoop.step``:

    1. generate    the vLLM engines sample ``rollout.n_samples`` responses per prompt (token ids + log-probs);
                   with ``algo.filter_groups`` (DAPO) they are scored at once, and groups whose rewards are all
                   equal are replaced by groups of the next prompts;
                   with ``rollout.mode: one_step_off`` they sampled them during the previous step, and now start
                   on the next batch while this one trains; with ``async`` they sample and score continuously
                   (the reference's log-probs too), and the step takes the oldest groups of their queue
    2. score       reward functions here, while the reward model, reference, policy (old log-probs,
                   unless ``algo.old_logprobs: update`` takes them from step 4's own forward pass) and
                   critic run their forward passes on their own groups
    3. advantages  KL penalty (in the reward, or later in the loss), then the configured estimator
    4. update      policy (and critic) optimizer steps over mini-batches and epochs
    5. sync        the policy's new weights into every vLLM engine (one step off: when they are idle, at the
                   start of the next step)

What the step asks of a learner is a typed spec from ``rlhf_ray.objectives`` (``PolicyLoss``, ``ValueLoss``,
``TokenLogprobs``...), built once from the resolved config (``rlhf_ray.config.resolve``). Everything
distributed (which rank gets which sequences, placement, the sync channel) lives in ``roles.py``,
``launch.py`` and ``rlhf_ray.weight_sync``; the math lives in ``rlhf_ray.algos``; generation, scoring,
sync and evaluation are ``RolloutLoop``'s, and epochs, checkpoints and the run are ``TrainLoop``'s.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch

from rlhf_ray.algos.advantages import AdvantageParams, get_advantage
from rlhf_ray.algos.aggregation import masked_mean, masked_whiten
from rlhf_ray.algos.kl import AdaptiveKLController, FixedKLController, kl_in_reward, kl_penalty
from rlhf_ray.controller.rl_metrics import critic_metrics, policy_metrics
from rlhf_ray.controller.rollout_loop import RolloutLoop
from rlhf_ray.metrics import PhaseTimer
from rlhf_ray.objectives.common import TokenLogprobs
from rlhf_ray.objectives.rl import PolicyLoss, TokenValues, ValueLoss
from rlhf_ray.types import RolloutBatch


class RLLoop(RolloutLoop):
    """One PPO / GRPO / REINFORCE-family run: the rollout loop plus the KL controller and the two losses."""

    name = "rl"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        a, self.rl = self.cfg.algo, self.resolved.rl
        assert self.rl is not None
        self.kl = (AdaptiveKLController(a.kl_coef, a.adaptive_kl_target, a.adaptive_kl_horizon)
                   if a.adaptive_kl_target is not None else FixedKLController(a.kl_coef))
        self.adv_params = AdvantageParams(gamma=a.gamma, lam=a.lam, norm_by_std=a.norm_adv_by_std)
        self.policy_loss = PolicyLoss.from_resolved(self.resolved)
        self.value_loss = ValueLoss.from_resolved(self.resolved)
        self.logprobs = TokenLogprobs(temperature=self.spec.temperature)

    def step(self, step: int) -> dict[str, float]:
        a, rl, roles, timer = self.cfg.algo, self.rl, self.roles, PhaseTimer()
        kl_coef = self.kl.value  # the coefficient this step uses (the adaptive controller moves it at the end)
        t_step = time.perf_counter()

        # 1. generate (algo.filter_groups: and score, refilling the groups whose rewards were all equal;
        #    rollout.mode async: taken from the queue the engines fill, scored as they finished)
        batch, gens, rows, metrics = self.rollout_batch(step, timer)

        # 2. score: remote forwards start first, the reward functions run here meanwhile
        forwards = {}
        if rl.old_logprobs == "learner":
            forwards["old_logprobs"] = self.policy.forward_async(batch, self.logprobs)
        if roles.reference is not None and batch.ref_logprobs is None:  # async: computed as the groups finished
            forwards["reference"] = roles.reference.forward_async(batch, self.logprobs)
        if roles.critic is not None:
            forwards["critic"] = roles.critic.forward_async(batch, TokenValues())
        if batch.rewards is None:
            metrics.update(self.score(batch, rows, timer))
        results = {name: f.result() for name, f in forwards.items()}
        for name, (_, seconds) in results.items():
            metrics[f"timing/{name}_s"] = seconds
        if rl.old_logprobs != "update":  # update: pi_old comes from the update's own forward pass
            batch.old_logprobs = results["old_logprobs"][0] if "old_logprobs" in results else batch.rollout_logprobs
        if "reference" in results:
            batch.ref_logprobs = results["reference"][0]
        batch.values = results["critic"][0] if "critic" in results else None

        # 3. advantages
        mask = batch.action_mask
        kl = kl_penalty(batch.old_logprobs, batch.ref_logprobs, a.kl_estimator) if batch.ref_logprobs is not None else None
        batch.token_rewards = kl_in_reward(batch.rewards, kl if kl is not None else torch.zeros_like(mask), mask,
                                           kl_coef if rl.kl_in_reward else 0.0)
        batch.advantages, batch.returns = get_advantage(rl.advantage)(
            batch.token_rewards, mask, batch.group_index, batch.values, self.adv_params, scores=batch.rewards)
        if rl.whiten_advantages:
            batch.advantages = masked_whiten(batch.advantages, mask) * mask

        # 4. update policy (and critic)
        seed, horizon = self.cfg.train.seed + step, self.cfg.rollout.response_budget
        with timer("train"):
            actor_steps = self.policy.update(batch, self.policy_loss.with_kl_coef(kl_coef), a.mini_batches,
                                             a.ppo_epochs, seed, horizon)
            critic_steps = []
            if roles.critic is not None:
                critic_steps = roles.critic.update(batch, self.value_loss, a.mini_batches, a.ppo_epochs, seed, horizon)

        # 5. sync the new policy into the engines
        with timer("weight_sync"):
            sync = self.publish_weights()

        if kl is not None:
            self.kl.update(float(masked_mean(kl, mask)), batch.size)
        metrics.update(policy_metrics(batch, kl, actor_steps, self.policy_loss.old_from_update))
        metrics.update(critic_metrics(critic_steps))
        metrics["kl/coef"] = kl_coef
        return self.finish_metrics(metrics, timer, batch, gens, sync, t_step)

    def group_reference(self) -> Optional[Callable[[RolloutBatch], Any]]:
        reference = self.roles.reference
        if reference is None:
            return None
        logprobs = TokenLogprobs(temperature=self.spec.temperature)
        return lambda batch: reference.forward_async(batch, logprobs)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "kl": self.kl.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.kl.load_state_dict(state["kl"])
