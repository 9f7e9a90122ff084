"""What every vLLM worker process of our rollout engines gets (``LLM(worker_extension_cls=EXTENSION)``): the
weight-sync endpoints (``rlhf_ray.weight_sync.vllm_receiver``) and the per-step reseeding of sampling."""

from __future__ import annotations

from rlhf_ray.weight_sync.vllm_receiver import WeightSyncExtension

EXTENSION = "rlhf_ray.engines.vllm_extension.RolloutWorkerExtension"


class RolloutWorkerExtension(WeightSyncExtension):
    """Methods reached with ``llm.collective_rpc("rlhf_...")`` on every worker of one engine."""

    def rlhf_reseed(self, seed: int) -> None:
        """Seed the generators vLLM samples with (the default CPU and CUDA ones): a step's samples then depend on
        the seed and the step's requests only, not on what the engine sampled before (a resumed run redraws
        what an uninterrupted one drew). Every tensor-parallel rank gets the same seed, as vLLM's own start-up
        seeding does."""
        import torch

        torch.manual_seed(seed)
