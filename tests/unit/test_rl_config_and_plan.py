"""RL configs: load-time checks that name the key, and the placement plan each mode computes."""

from __future__ import annotations

import re

import pytest

from rlhf_ray.config import ConfigError, load_config, resolve
from rlhf_ray.controller.placement import PlacementError, check_plan


BASE = {"model.path": "m", "reward.functions": ["builtin:math"], "learner.num_workers": 2,
        "learner.gpus_per_worker": 1, "learner.micro_batch_size": 2, "rollout.n_samples": 4,
        "algo.prompts_per_step": 4}


def cfg(**over):
    return load_config(values={**BASE, **over})


def pools(plan):
    return {p.name: (p.size, p.gpus_per_bundle, tuple(p.roles)) for p in plan.pools}


def test_ppo_separate_gives_every_role_its_own_gpus():
    c = cfg(job="ppo", **{"algo.kl_coef": 0.1, "reward.model": "rm", "reward.num_workers": 1, "rollout.num_engines": 2})
    plan = resolve(c).plan
    assert pools(plan) == {"actor": (2, 1.0, ("actor",)), "reference": (2, 1.0, ("reference",)),
                           "critic": (2, 1.0, ("critic",)), "reward": (1, 1.0, ("reward",)),
                           "rollout": (2, 1.0, ("rollout",))}
    assert plan.total()["GPU"] == 9


def test_ppo_shared_colocates_actor_with_reference_and_critic_with_reward():
    c = cfg(job="ppo", **{"algo.kl_coef": 0.1, "reward.model": "rm", "reward.num_workers": 2,
                          "placement.mode": "shared"})
    plan = resolve(c).plan
    assert pools(plan) == {"actor+reference": (2, 1.0, ("actor", "reference")),
                           "critic+reward": (2, 1.0, ("critic", "reward")), "rollout": (1, 1.0, ("rollout",))}
    assert plan.role_share["actor"] == plan.role_share["reference"] == 0.5
    assert plan.total()["GPU"] == 5


def test_grpo_hybrid_puts_everything_on_the_learner_gpus():
    c = cfg(job="grpo", **{"placement.mode": "hybrid", "rollout.num_engines": 2, "algo.kl_coef": 0.01})
    plan = resolve(c).plan
    assert pools(plan) == {"actor+reference+rollout": (2, 1.0, ("actor", "reference", "rollout"))}
    assert plan.role_share["rollout"] == pytest.approx(1 / 3)
    assert plan.total()["GPU"] == 2


def test_impossible_plan_names_the_shortfall():
    c = cfg(job="grpo", **{"rollout.num_engines": 4})
    with pytest.raises(PlacementError, match="placement needs 6 GPU but the cluster has 4"):
        check_plan(resolve(c).plan, {"GPU": 4, "CPU": 64})


def test_shared_with_mismatched_sizes_is_refused():
    c = cfg(job="ppo", **{"reward.model": "rm", "reward.num_workers": 1, "placement.mode": "shared"})
    with pytest.raises(PlacementError, match="colocated roles 'critic' and 'reward' must have the same workers"):
        resolve(c).plan


@pytest.mark.parametrize("over, message", [
    ({"job": "grpo", "reward.functions": []}, "reward.functions: job grpo needs a reward"),
    ({"job": "grpo", "rollout.temperature": 0.0}, "rollout.temperature: job grpo samples several responses"),
    ({"job": "online_dpo", "rollout.temperature": 0.0}, "rollout.temperature: job online_dpo samples"),
    ({"job": "grpo", "reward.num_workers": 0}, "reward.num_workers: must be >= 1, got 0"),
    ({"job": "ppo", "algo.adaptive_kl_target": 6.0}, "algo.kl_coef: adaptive_kl_target scales kl_coef"),
    ({"job": "ppo", "algo.advantage": "grpo"}, "algo.advantage: job ppo trains a critic for GAE"),
    ({"job": "grpo", "algo.advantage": "gae"}, "algo.advantage: gae needs a critic"),
    ({"job": "grpo", "rollout.n_samples": 1}, "rollout.n_samples: algo.advantage=grpo compares samples"),
    ({"job": "grpo", "algo.mini_batches": 3}, "algo.mini_batches: 3 does not divide the 16 sequences"),
    ({"job": "grpo", "learner.micro_batch_size": 3}, "learner.num_workers: a mini-batch of 16 sequences"),
    ({"job": "grpo", "learner.global_batch_size": 8}, "learner.global_batch_size: RL jobs take one optimizer step"),
    ({"job": "grpo", "placement.mode": "hybrid", "rollout.num_engines": 1},
     "rollout.num_engines: hybrid placement needs one engine per learner GPU"),
    ({"job": "grpo", "placement.mode": "hybrid", "rollout.num_engines": 2, "rollout.tensor_parallel_size": 2},
     "rollout.tensor_parallel_size: hybrid placement"),
    ({"job": "grpo", "rollout.weight_sync_backend": "ipc"}, "rollout.weight_sync_backend: ipc shares GPU memory"),
    ({"job": "grpo", "placement.mode": "hybrid", "rollout.num_engines": 2, "learner.zero_stage": 0},
     "learner.zero_stage: hybrid placement offloads the learners' optimizer state"),
    ({"job": "grpo", "placement.mode": "hybrid", "rollout.num_engines": 2, "learner.zero_stage": 3,
      "learner.offload": True}, "learner.offload: with ZeRO-3 it keeps parameters in host memory"),
    ({"job": "grpo", "placement.mode": "hybrid", "rollout.num_engines": 2, "rollout.mode": "one_step_off"},
     "rollout.mode: one_step_off generates while the learners train, which needs the engines on their own"),
    ({"job": "best_of_n", "rollout.mode": "one_step_off"}, "rollout.mode: one_step_off overlaps generation with "
                                                            "training; job best_of_n does not train on rollouts"),
    ({"job": "grpo", "rollout.mode": "fully_async"}, "rollout.mode"),
    ({"job": "grpo", "rollout.mode": "async", "rollout.max_staleness": -1}, "rollout.max_staleness: must be >= 0"),
    ({"job": "grpo", "placement.mode": "hybrid", "rollout.num_engines": 2, "rollout.mode": "async"},
     "rollout.mode: async generates while the learners train, which needs the engines on their own"),
    ({"job": "sft", "rollout.mode": "async"}, "rollout.mode: async overlaps generation with training; job sft"),
    ({"job": "ppo", "algo.filter_groups": True}, "algo.filter_groups: drops prompts whose samples' rewards are all"),
    ({"job": "grpo", "algo.max_filter_rounds": -1}, "algo.max_filter_rounds: must be >= 0"),
    ({"job": "grpo", "algo.importance_cap": None},
     "algo.importance_cap: null no longer turns the importance correction off; off_policy_correction=token_tis"),
    ({"job": "grpo", "algo.off_policy_correction": "seq_tis", "algo.importance_cap": None},
     "algo.importance_cap: null no longer turns the importance correction off; off_policy_correction=seq_tis"),
    ({"job": "grpo", "algo.importance_cap": 0.8}, "algo.importance_cap: must be >= 1"),
    ({"job": "grpo", "algo.importance_mask_low": 1.0}, "algo.importance_mask_low: must be in [0, 1)"),
    ({"job": "grpo", "algo.importance_mask_high": 0.9}, "algo.importance_mask_high: must be > 1"),
    ({"job": "grpo", "algo.off_policy_correction": "tis"}, "algo.off_policy_correction: must be one of"),
    ({"job": "grpo", "algo.ratio_level": "group"}, "algo.ratio_level: must be one of ['token', 'sequence']"),
    ({"job": "grpo", "algo.sequence_clip_ratio_low": 0.0}, "algo.sequence_clip_ratio_low: must be in (0, 1)"),
    ({"job": "grpo", "algo.sequence_clip_ratio_high": -1e-4}, "algo.sequence_clip_ratio_high: must be > 0"),
    ({"job": "grpo", "algo.old_logprobs": "rollout", "algo.off_policy_correction": "icepop"},
     "algo.off_policy_correction: icepop weighs the learner's pi_old against the rollout engine's log-probs"),
])
def test_rl_config_errors_name_the_key(over, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg(**over)


def test_rl_job_resolves_defaults_at_load():
    c = resolve(cfg(job="ppo"))
    assert c.rl.advantage == "gae" and c.batch.per_update == 16
    c = resolve(cfg(job="grpo", **{"algo.mini_batches": 2}))
    assert c.rl.advantage == "grpo" and c.batch.per_update == 8


@pytest.mark.parametrize("over, want", [
    ({"job": "grpo"}, "update"),                                # one optimizer step, no reference: exact
    ({"job": "grpo", "algo.mini_batches": 2}, "learner"),       # the second mini-batch sees an updated policy
    ({"job": "grpo", "algo.ppo_epochs": 2}, "learner"),
    ({"job": "grpo", "algo.kl_coef": 0.01}, "learner"),         # the reference KL is taken at pi_old first
    ({"job": "ppo", "algo.adaptive_kl_target": 6.0, "algo.kl_coef": 0.05}, "learner"),
    ({"job": "grpo", "algo.old_logprobs": "rollout"}, "rollout"),
    ({"job": "grpo", "algo.old_logprobs": "learner"}, "learner"),
])
def test_old_logprobs_auto_takes_the_update_pass_only_where_it_is_exact(over, want):
    assert resolve(cfg(**over)).rl.old_logprobs == want


def test_old_logprobs_update_off_policy_names_the_key():
    with pytest.raises(ConfigError, match="algo.old_logprobs: update takes pi_old from the update's own forward "
                                          "pass, which is exact only with mini_batches 1"):
        cfg(job="grpo", **{"algo.old_logprobs": "update", "algo.mini_batches": 2})


@pytest.mark.parametrize("over, want", [
    ({}, "token_tis"),                                                         # the default: today's TIS
    ({"algo.off_policy_correction": "icepop"}, "icepop"),
    ({"algo.off_policy_correction": "none"}, "none"),
    ({"algo.old_logprobs": "rollout"}, None),                                  # pi_old is the engine's: ratio 1
    ({"algo.old_logprobs": "rollout", "algo.off_policy_correction": "none"}, None),
])
def test_off_policy_correction_resolves_to_what_the_loss_applies(over, want):
    from rlhf_ray.objectives.rl import PolicyLoss

    resolved = resolve(cfg(job="grpo", **over))
    assert resolved.rl.off_policy_correction == want
    loss = PolicyLoss.from_resolved(resolved)
    assert loss.off_policy_correction == want
    assert ("rollout_logprobs" in loss.fields) == (want is not None or loss.old_from_update)


def test_off_policy_thresholds_reach_the_loss():
    from rlhf_ray.objectives.rl import PolicyLoss

    over = {"algo.importance_cap": 3.0, "algo.importance_mask_low": 0.2, "algo.importance_mask_high": 5.0}
    p = PolicyLoss.from_resolved(resolve(cfg(job="grpo", **over))).off_policy
    assert (p.cap, p.low, p.high) == (3.0, 0.2, 5.0)
    # A mask needs no cap: null is accepted there and the loss keeps a placeholder it never reads.
    loss = PolicyLoss.from_resolved(resolve(cfg(job="grpo", **{"algo.off_policy_correction": "seq_mask",
                                                               "algo.importance_cap": None})))
    assert loss.off_policy_correction == "seq_mask"


def test_sequence_ratio_level_clips_with_its_own_range():
    from rlhf_ray.objectives.rl import PolicyLoss

    token = PolicyLoss.from_resolved(resolve(cfg(job="grpo", **{"algo.clip_ratio_high": 0.28})))
    assert (token.ratio_level, token.clip_low, token.clip_high) == ("token", 0.2, 0.28)
    gspo = PolicyLoss.from_resolved(resolve(cfg(job="grpo", **{"algo.ratio_level": "sequence",
                                                               "algo.clip_ratio_high": 0.28})))
    assert (gspo.ratio_level, gspo.clip_low, gspo.clip_high) == ("sequence", 3e-4, 4e-4)   # the paper's range
