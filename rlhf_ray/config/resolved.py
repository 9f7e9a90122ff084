"""What a resolution produces: the frozen ``Resolved`` description of one run and its parts (paths, batch
shape, RL choices, sync settings, role specs). ``rlhf_ray.config.resolve.resolve`` builds it; the job front,
the loops, the roles and the efficiency report read it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from rlhf_ray.config.schema import RL_JOBS, LearnerConfig, ModelConfig, OptimConfig, RolloutConfig

if TYPE_CHECKING:
    from rlhf_ray.config.schema import Config
    from rlhf_ray.controller.placement import PlacementPlan, RoleRequest
    from rlhf_ray.evaluation.summary import EvalSettings

Accelerator = Literal["cuda", "cpu"]
Head = Literal["causal_lm", "sequence_score", "token_value"]

POLICY_JOBS = ("ppo", "grpo", "online_dpo")
"""Rollout jobs that train a policy and sync it into the engines (best_of_n only samples)."""

COLOCATE: dict[str, list[list[str]]] = {
    "separate": [],
    "shared": [["actor", "reference"], ["critic", "reward"]],
    "hybrid": [["actor", "reference", "critic", "reward", "rollout"]],
}
"""Rollout jobs: ``placement.mode`` -> the role sets that share devices (roles a job lacks are skipped).
separate: every role on its own GPUs; shared: actor + reference and critic + reward model share GPUs;
hybrid: every role on the learners' GPUs (rank i of each group and engine i on GPU i)."""
OFFLINE_COLOCATE: dict[str, list[list[str]]] = {"separate": [], "shared": [["learner", "reference"]],
                                               "hybrid": [["learner", "reference"]]}
"""Offline jobs: a reference group shares the learners' GPUs in shared and hybrid placement."""


def auto_dtype(name: str, on_cuda: bool) -> str:
    """``auto`` is bfloat16 on CUDA and float32 on CPU (CPU bf16 matmuls are slow and less exact); other names
    are kept. The one place this rule lives: learners, engines and the efficiency report read the result."""
    if name == "auto":
        return "bfloat16" if on_cuda else "float32"
    return name


@dataclass(frozen=True)
class Paths:
    """Paths a run reads and writes, absolute where they exist locally (hub names and URLs as given)."""

    model: str
    tokenizer: str
    """``model.tokenizer``, or the model's own."""
    output_dir: str
    reward_model: Optional[str] = None
    critic_model: Optional[str] = None
    """``critic.model``, or None for the policy's."""
    judge_model: Optional[str] = None
    """``reward.judge.model``: the generative judge's engines (role ``judge``), or None."""


@dataclass(frozen=True)
class BatchShape:
    """How many sequences (RL) or examples (offline jobs) one step takes, and how they split."""

    per_step: int
    """Sequences per RL step (prompts_per_step x n_samples); offline: examples per optimizer step."""
    per_update: int
    """Rows per optimizer step across the policy's workers: DeepSpeed's global batch."""
    updates_per_step: int
    """Optimizer steps per step (mini_batches x ppo_epochs; 1 for offline jobs and online DPO)."""


@dataclass(frozen=True)
class RLSettings:
    """The policy-gradient step's resolved choices (jobs ppo and grpo)."""

    advantage: str
    """``algo.advantage`` with its default applied (gae for ppo, grpo for grpo)."""
    old_logprobs: Literal["learner", "update", "rollout"]
    """Where pi_old comes from (``algo.old_logprobs`` with ``auto`` resolved)."""
    kl_in_loss: bool
    """A reference model exists and its KL is a term of the policy loss."""
    kl_in_reward: bool
    """A reference model exists and its KL is subtracted from the token rewards."""
    whiten_advantages: bool
    """GAE advantages are whitened over the batch (standard PPO practice)."""
    off_policy_correction: Optional[str] = None
    """``algo.off_policy_correction`` where the loss applies it; None where pi_old is the engine's own log-probs
    (``old_logprobs: rollout``): the ratio is 1 by definition and the rollout log-probs are not shipped."""


@dataclass(frozen=True)
class BestSettings:
    """``train.keep_best``: which eval metric picks the model kept in ``<output_dir>/best/``, and which way."""

    metric: str
    mode: Literal["max", "min"]
    """``train.keep_best_mode``, or its default: min for a metric with "loss" in its name, else max."""


@dataclass(frozen=True)
class SyncSettings:
    """The weight sync from the policy's rank 0 into the engines."""

    backend: Literal["gloo", "nccl", "ipc"]
    bucket_mb: int
    dtype: str
    """The engines' dtype: weights are cast to it before they travel."""
    tensor_parallel_size: int
    """Receivers per engine."""


@dataclass(frozen=True)
class LearnerRoleSpec:
    """One DeepSpeed learner group: its model, head, whether it trains, and the resources of each worker."""

    name: str
    """The group's name in logs, metrics and placement.json: actor, reference, critic, reward_model, learner."""
    placement_role: str
    """Its name under ``placement.*``: actor, reference, critic, reward, learner."""
    model: ModelConfig
    learner: LearnerConfig
    """With ``global_batch_size`` resolved (what DeepSpeed is configured with)."""
    optim: OptimConfig
    head: Head
    trainable: bool
    gpus: float
    """Per worker, before colocated roles split a device."""
    cpus: float
    dtype: str
    seed: int
    on_nonfinite: Literal["stop", "skip"]
    """``train.on_nonfinite``: what a non-finite loss or gradient norm does to this group's optimizer step."""

    @property
    def num_workers(self) -> int:
        return self.learner.num_workers


@dataclass(frozen=True)
class RolloutRoleSpec:
    """The vLLM engines, one Ray actor each."""

    model_path: str
    tokenizer_path: str
    trust_remote_code: bool
    rollout: RolloutConfig
    dtype: str
    max_model_len: Optional[int]
    """``rollout.max_model_len``, or data.max_prompt_length + rollout.max_new_tokens (multi-turn: room for
    ``max_turns`` responses and the observations between them, ``resolve._default_max_model_len``). Always set in a
    run; None only for the reward server's judge without ``reward.judge.max_model_len`` (the model's own length)."""
    sleep_mode: bool
    """vLLM's sleep mode is enabled (hybrid placement; used on GPU only)."""
    gpus: float
    """Per engine: tensor_parallel_size when the learners run on GPUs, else 0."""
    cpus: float
    seed: int
    """Engine i samples with seed + i."""
    name: str = "rollout"
    placement_role: str = "rollout"

    @property
    def num_workers(self) -> int:
        return self.rollout.num_engines


RoleSpec = Union[LearnerRoleSpec, RolloutRoleSpec]


def request(spec: RoleSpec) -> "RoleRequest":
    """What a role asks of the placement planner."""
    from rlhf_ray.controller.placement import RoleRequest

    return RoleRequest(spec.placement_role, spec.num_workers, spec.gpus, spec.cpus)


@dataclass(frozen=True)
class Resolved:
    """Everything one run derives from its config (see the module docstring), read-only."""

    config: "Config"
    """The config as the user gave it (nothing here writes into it)."""
    accelerator: Accelerator
    paths: Paths
    batch: BatchShape
    reference: Optional[Literal["precompute", "group"]]
    """The frozen reference model: a learner group scoring every step, log-probs precomputed once by the
    untrained policy (offline preference jobs), or none."""
    rl: Optional[RLSettings]
    sync: Optional[SyncSettings]
    roles: tuple[RoleSpec, ...]
    """In placement-request order (the planner's pools follow it)."""
    max_restarts: int
    """``train.max_restarts``, or its default for the job (3 for the rollout jobs, 0 for the others)."""
    evaluation: Optional["EvalSettings"] = None
    """How job eval, and the held-out evaluation of a rollout training job, sample and count (``eval.*``)."""
    best: Optional[BestSettings] = None
    """``train.keep_best``, or None."""

    @property
    def job(self) -> str:
        return self.config.job

    @property
    def on_gpu(self) -> bool:
        """The learners (and engines) run on CUDA."""
        return self.accelerator == "cuda"

    @property
    def swaps_memory(self) -> bool:
        """Hybrid placement on GPUs: vLLM sleeps while the learners train, the learners offload while it generates."""
        return self.on_gpu and self.config.placement.mode == "hybrid"

    def resuming(self) -> "Resolved":
        """The same run, to be continued from its latest checkpoint (what a recovery restarts): ``train.resume``
        on, ``train.overwrite`` off. Nothing else that was derived depends on either."""
        train = dataclasses.replace(self.config.train, resume=True, overwrite=False)
        return dataclasses.replace(self, config=dataclasses.replace(self.config, train=train))

    def role(self, name: str) -> Optional[Any]:
        """The spec of role ``name`` (a group name: actor, reference, critic, reward_model, rollout, learner)."""
        return next((r for r in self.roles if r.name == name), None)

    @property
    def policy(self) -> LearnerRoleSpec:
        """The trained model's group: actor (rollout jobs) or learner (offline jobs)."""
        spec = self.role("actor") or self.role("learner")
        if spec is None:
            raise ValueError(f"job {self.job} trains no policy")
        return spec

    @functools.cached_property
    def plan(self) -> "PlacementPlan":
        """The pools (placement groups) the roles make under ``placement.*`` (planned on first use, then kept);
        raises ``PlacementError``."""
        from rlhf_ray.controller.placement import plan_placement

        pc = self.config.placement
        colocate = (COLOCATE if self.job in RL_JOBS else OFFLINE_COLOCATE)[pc.mode]
        return plan_placement([request(r) for r in self.roles], colocate, pc.strategy, pc.node_selector,
                              pc.role_strategy)

    def to_dict(self) -> dict[str, Any]:
        """What was resolved, as plain data (``config.yaml``'s ``resolved`` section and the loggers)."""
        roles = {}
        for r in self.roles:
            roles[r.name] = {"workers": r.num_workers, "gpus_per_worker": r.gpus, "cpus_per_worker": r.cpus,
                             "dtype": r.dtype}
            if isinstance(r, LearnerRoleSpec):
                roles[r.name].update(model=r.model.path, head=r.head, trainable=r.trainable,
                                     global_batch_size=r.learner.global_batch_size,
                                     grad_accum_steps=r.learner.grad_accum_steps)
            else:
                roles[r.name].update(model=r.model_path, max_model_len=r.max_model_len)
        pools = {p.name: {"size": p.size, "bundle": p.bundles[0] if p.size else {}, "roles": list(p.roles),
                          "strategy": p.strategy, "node_selector": dict(p.node_selector)} for p in self.plan.pools}
        return {"accelerator": self.accelerator, "paths": dataclasses.asdict(self.paths),
                "batch": dataclasses.asdict(self.batch), "reference": self.reference,
                "rl": dataclasses.asdict(self.rl) if self.rl else None,
                "sync": dataclasses.asdict(self.sync) if self.sync else None, "roles": roles, "placement": pools,
                "max_restarts": self.max_restarts,
                "evaluation": ({**dataclasses.asdict(self.evaluation), "ks": list(self.evaluation.ks)}
                               if self.evaluation else None),
                "best": dataclasses.asdict(self.best) if self.best else None}
