"""The names the config and the algorithm registries share, defined once (plain Python: no torch import).

``rlhf_ray.config.schema`` builds its ``Literal`` types from these tuples, and each registry in
``rlhf_ray.algos`` registers exactly these names (``tests/unit/test_algos_*`` check both sides agree).
"""

from __future__ import annotations

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
"""``algo.advantage``; the functions are ``rlhf_ray.algos.advantages.ADVANTAGES``."""
NEEDS_CRITIC = frozenset({"gae"})
"""Estimators that need critic values (job ppo)."""
GROUP_BASED = frozenset({"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"})
"""Estimators that compare the samples of one prompt (need ``rollout.n_samples >= 2``)."""

POLICY_LOSS_NAMES = ("ppo_clip", "vanilla_pg")
"""``algo.policy_loss``; the functions are ``rlhf_ray.algos.policy_loss.POLICY_LOSSES``."""
RATIO_LEVELS = ("token", "sequence")
"""``algo.ratio_level``; the functions are ``rlhf_ray.algos.policy_loss.RATIO_LEVELS``."""
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
"""``algo.loss_agg``; see ``rlhf_ray.algos.aggregation.agg_loss``."""
KL_ESTIMATOR_NAMES = ("k1", "k2", "k3")
"""``algo.kl_estimator``; the functions are ``rlhf_ray.algos.kl.KL_ESTIMATORS``."""
OFF_POLICY_CORRECTIONS = ("none", "token_tis", "seq_tis", "seq_mask", "icepop")
"""``algo.off_policy_correction``; the functions are ``rlhf_ray.algos.off_policy.CORRECTIONS``."""

PREFERENCE_LOSS_NAMES = ("sigmoid", "ipo", "simpo")
"""``dpo.loss``; the losses are ``rlhf_ray.algos.preference.PREFERENCE_LOSSES``."""
REFERENCE_FREE_PREFERENCE_LOSSES = frozenset({"simpo"})
"""Pairwise losses that need no reference model (no reference pass, no reference group)."""
