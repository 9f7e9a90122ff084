"""rlhf_ray: post-training for LLMs (SFT, reward models, DPO, PPO / GRPO) on Ray, vLLM and DeepSpeed.

Kept import-light on purpose: ``import rlhf_ray`` pulls in neither torch nor ray.
"""

__version__ = "0.1.0"
