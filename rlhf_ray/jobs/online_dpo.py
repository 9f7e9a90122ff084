"""Online DPO: each round the current policy samples pairs with vLLM, a reward labels them, a DPO step follows,
and the new weights sync back into the engines.

Guo et al. (2024) label fresh on-policy pairs with an AI / reward-model judge; here the judge is any
``reward.functions`` / ``reward.model``, the pair is each prompt's best and worst of ``rollout.n_samples``
samples, and the loss is any of the DPO family (``dpo.loss``: sigmoid, ipo, simpo; ``dpo.beta`` ...) against
a frozen reference group holding the initial policy. Generation, scoring, sync and checkpoints are the
PPO / GRPO machinery's (``rlhf_ray.controller.online_dpo.OnlineDPOLoop`` extends ``RLLoop``).

Launch:
    rlhf-ray train examples/online_dpo_tiny_cpu.yaml
    ray job submit --working-dir . -- python -m rlhf_ray train examples/online_dpo_tiny_cpu.yaml
"""

from __future__ import annotations

from typing import Any

from rlhf_ray.config import Config
from rlhf_ray.jobs import rl
from rlhf_ray.jobs.front import Job, JobContext, run_job

prepare_data = rl.prepare_data


def _body(ctx: JobContext) -> dict[str, Any]:
    from rlhf_ray.controller.online_dpo import OnlineDPOLoop

    return OnlineDPOLoop(ctx.resolved, ctx.roles, ctx.schedule, ctx.train, ctx.evaluation, ctx.tokenizer,
                         ctx.output_dir, ctx.recoveries).run()


JOB = Job(prepare_data, _body)


def run(cfg: Config) -> dict[str, Any]:
    return run_job(cfg, JOB)
