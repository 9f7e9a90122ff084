"""PPO with a critic (GAE advantages), vLLM rollouts, an optional reward model and KL to a reference.

Ouyang et al. (2022) / Ziegler et al. (2019) style: the sequence reward (reward functions and/or a
trained reward model, ``reward.model``) sits on the last response token, a per-token KL penalty to the
reference model is added to the reward (``algo.kl_in: reward``, fixed or adaptive coefficient) or to
the loss, the critic (``critic.*``, initialised from the policy unless ``critic.model`` is set) gives
token values, and GAE advantages (whitened over the batch) drive the clipped policy loss; the value
loss is clipped around the old values. Policy and critic train on the same mini-batches and epochs.

Launch:
    rlhf-ray train examples/ppo_tiny_cpu.yaml                           # CPU, tiny
    bash launch/single_node.sh examples/ppo_7b_8gpu.yaml                # one 8-GPU node
    ray job submit --working-dir . -- python -m rlhf_ray train examples/ppo_7b_8gpu.yaml
"""

from __future__ import annotations

from typing import Any

from rlhf_ray.config import Config
from rlhf_ray.jobs import rl

prepare_data = rl.prepare_data
JOB = rl.JOB


def run(cfg: Config) -> dict[str, Any]:
    return rl.run(cfg)
