"""GRPO and the critic-free REINFORCE family (RLOO, Dr. GRPO, REINFORCE++) with vLLM rollouts.

Each step samples ``rollout.n_samples`` responses per prompt, scores them, and uses the group of a
prompt's samples as the baseline (``algo.advantage``: grpo = (r - mean) / std (Shao et al. 2024),
dr_grpo = r - mean with ``algo.loss_agg: seq_mean_token_sum_norm`` (Liu et al. 2025), rloo =
leave-one-out mean, reinforce_pp(_baseline) = batch-whitened returns (Hu 2025)). The KL penalty to
the reference model is off by default (``algo.kl_coef: 0``), following DAPO / Dr. GRPO; set it to add
a reference group (k3 in the loss, as in the GRPO paper). Departures from the paper: the ratio is
corrected for the rollout engine's own log-probs (``algo.off_policy_correction``: token_tis by default,
truncated importance sampling at ``algo.importance_cap``), and group advantages use the unbiased std. With the defaults (one optimizer step per batch, no
reference) pi_old is the update's own forward pass, detached (``algo.old_logprobs: auto``), so a step runs
no separate old-log-prob pass.

Launch:
    rlhf-ray train examples/grpo_tiny_cpu.yaml                          # CPU, tiny, minutes
    bash launch/single_node.sh examples/grpo_7b_8gpu.yaml               # one 8-GPU node
    ray job submit --working-dir . -- python -m rlhf_ray train examples/grpo_7b_8gpu.yaml
"""

from __future__ import annotations

from typing import Any

from rlhf_ray.config import Config
from rlhf_ray.jobs import rl

prepare_data = rl.prepare_data
JOB = rl.JOB


def run(cfg: Config) -> dict[str, Any]:
    return rl.run(cfg)
