"""Which roles an RL job needs, where they go, and starting them all at once.

Placement modes (``placement.mode``):

- ``separate``: every role has its own GPUs (its own placement group).
- ``shared``: actor + reference share GPUs, critic + reward model share GPUs; rollout engines apart.
- ``hybrid``: every role on the same GPUs, one bundle per GPU (rank i of each learner group and engine i
  share GPU i). vLLM sleeps while learners train, learners offload while vLLM generates.

The plan is computed from the config and checked against the cluster before any actor starts; an
impossible plan is a ``PlacementError`` naming the role.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.config import Config
from rlhf_ray.config.schema import LearnerConfig
from rlhf_ray.controller.placement import PlacementPlan, RoleRequest, create_pools, plan_placement

log = logging.getLogger(__name__)

COLOCATE = {
    "separate": [],
    "shared": [["actor", "reference"], ["critic", "reward"]],
    "hybrid": [["actor", "reference", "critic", "reward", "rollout"]],
}


def needs_actor(cfg: Config) -> bool:
    """Every rollout job trains a policy except best_of_n, which only samples and scores."""
    return cfg.job != "best_of_n"


def needs_reference(cfg: Config) -> bool:
    if cfg.job == "online_dpo":
        return cfg.dpo.loss != "simpo"  # SimPO is reference-free
    return cfg.job in ("ppo", "grpo") and cfg.algo.uses_reference


def needs_critic(cfg: Config) -> bool:
    from rlhf_ray.algos.advantages import NEEDS_CRITIC

    return cfg.job == "ppo" and cfg.algo.advantage in NEEDS_CRITIC


def critic_learner(cfg: Config) -> LearnerConfig:
    """The critic trains on the policy's mini-batches, possibly with its own number of workers."""
    workers = cfg.critic.num_workers or cfg.learner.num_workers
    return dataclasses.replace(cfg.learner, num_workers=workers)


def reward_learner(cfg: Config) -> LearnerConfig:
    r = cfg.reward
    per_pass = cfg.learner.micro_batch_size * r.num_workers
    return dataclasses.replace(cfg.learner, num_workers=r.num_workers, gpus_per_worker=r.gpus_per_worker,
                               global_batch_size=per_pass, zero_stage=0 if cfg.learner.zero_stage < 3 else 3)


def gpus_per_engine(cfg: Config) -> float:
    """Engines run on GPUs exactly when the learners do (tensor_parallel_size GPUs each)."""
    return float(cfg.rollout.tensor_parallel_size) if cfg.learner.gpus_per_worker > 0 else 0.0


def role_requests(cfg: Config) -> list[RoleRequest]:
    """What each role needs, in start order."""
    lc = cfg.learner
    reqs = [RoleRequest("actor", lc.num_workers, lc.gpus_per_worker, lc.cpus_per_worker)] if needs_actor(cfg) else []
    if needs_reference(cfg):
        reqs.append(RoleRequest("reference", lc.num_workers, lc.gpus_per_worker, lc.cpus_per_worker))
    if needs_critic(cfg):
        reqs.append(RoleRequest("critic", cfg.critic.num_workers or lc.num_workers, lc.gpus_per_worker,
                                lc.cpus_per_worker))
    if cfg.reward.model:
        reqs.append(RoleRequest("reward", cfg.reward.num_workers, cfg.reward.gpus_per_worker, lc.cpus_per_worker))
    reqs.append(RoleRequest("rollout", cfg.rollout.num_engines, gpus_per_engine(cfg), cfg.rollout.cpus_per_engine))
    return reqs


def make_plan(cfg: Config) -> PlacementPlan:
    """The RL job's pools: colocation from ``placement.mode``; strategies and node selectors per role."""
    pc = cfg.placement
    return plan_placement(role_requests(cfg), COLOCATE[pc.mode], pc.strategy, pc.node_selector, pc.role_strategy)


@dataclass
class RLRoles:
    """Every started role of one RL job (absent roles are None)."""

    rollout: Any
    actor: Any = None
    reference: Any = None
    critic: Any = None
    reward_model: Any = None
    plan: Optional[PlacementPlan] = None
    pools: dict = field(default_factory=dict)

    def placement_report(self) -> dict[str, list[dict[str, Any]]]:
        """Per role, where each rank landed (node, GPU ids, pool, bundle): written to ``placement.json``."""
        out = {}
        for name in ("actor", "reference", "critic", "reward_model", "rollout"):
            role = getattr(self, name)
            if role is None:
                continue
            pool = self.plan.role_pool["reward" if name == "reward_model" else name] if self.plan else None
            out[name] = [{"rank": i, "node": f.get("node"), "node_id": f.get("node_id"), "gpu_ids": f.get("gpu_ids"),
                          "pid": f.get("pid"),
                          "pool": pool, "bundle": i} for i, f in enumerate(role.group.facts)]
        return out

    @property
    def on_gpu(self) -> bool:
        """Whether the learners really run on CUDA (logical GPUs on a CPU machine do not)."""
        return (self.actor or self.rollout).group.facts[0]["device"].startswith("cuda")

    def kill(self) -> None:
        for name in ("actor", "reference", "critic", "reward_model", "rollout"):
            role = getattr(self, name)
            if role is not None:
                role.group.kill()


def start_rl_roles(cfg: Config, plan: PlacementPlan, optimizer_steps: int, output_dir: Path) -> RLRoles:
    """Create the placement groups and start every role concurrently; returns them ready to use."""
    from rlhf_ray.controller.groups import launch_learner_group, launch_rollout_group
    from rlhf_ray.controller.roles import LearnerRole, RolloutRole

    tc, lc = cfg.train, cfg.learner
    pools = create_pools(plan, tc.timeout_s)
    share = plan.role_share
    pg = {role: pools[plan.role_pool[role]] for role in plan.role_pool}
    bundles = lambda n: list(range(n))  # noqa: E731 - rank i of every role takes bundle i of its pool
    actor_lc = lc  # global_batch_size was resolved at load: one optimizer step per mini-batch (or round)
    max_len = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    hybrid = cfg.placement.mode == "hybrid"
    rollout = launch_rollout_group(
        cfg.model.path, cfg.model.tokenizer, cfg.rollout, cfg.model.dtype, tc.seed,
        cfg.rollout.max_model_len or max_len, cfg.model.trust_remote_code, hybrid,
        gpus_per_engine(cfg) * share["rollout"], cfg.rollout.cpus_per_engine, tc.timeout_s, pg["rollout"],
        bundles(cfg.rollout.num_engines))
    pending: dict[str, Any] = {"rollout": rollout}
    if hybrid:
        # vLLM sizes its KV cache from the GPU memory free when it starts: let it start alone, then sleep
        # (a no-op on CPU) before the learners load onto the same GPUs. RLLoop.run wakes it.
        rollout.ready().call_all("sleep")
    if "actor" in pg:
        pending["actor"] = launch_learner_group("actor", cfg.model, cfg.optim, actor_lc, optimizer_steps, "causal_lm",
                                                True, tc.seed, tc.timeout_s, pg["actor"], bundles(lc.num_workers),
                                                share["actor"])
    if "reference" in pg:
        pending["reference"] = launch_learner_group(
            "reference", cfg.model, cfg.optim, actor_lc, optimizer_steps, "causal_lm", False, tc.seed, tc.timeout_s,
            pg["reference"], bundles(lc.num_workers), share["reference"])
    if "critic" in pg:
        critic_model = dataclasses.replace(cfg.model, path=cfg.critic.model or cfg.model.path)
        critic_optim = dataclasses.replace(cfg.optim, lr=cfg.critic.lr, warmup_steps=cfg.critic.warmup_steps)
        clc = critic_learner(cfg)
        pending["critic"] = launch_learner_group(
            "critic", critic_model, critic_optim, clc, optimizer_steps, "token_value", True, tc.seed, tc.timeout_s,
            pg["critic"], bundles(clc.num_workers), share["critic"])
    if "reward" in pg:
        rm_model = dataclasses.replace(cfg.model, path=cfg.reward.model, tokenizer=None,
                                       lora=dataclasses.replace(cfg.model.lora, enabled=False))
        rlc = reward_learner(cfg)
        pending["reward_model"] = launch_learner_group(
            "reward_model", rm_model, cfg.optim, rlc, 1, "sequence_score", False, tc.seed, tc.timeout_s,
            pg["reward"], bundles(rlc.num_workers), share["reward"])
    groups = {name: p.ready() for name, p in pending.items()}
    roles = RLRoles(
        actor=LearnerRole("actor", groups["actor"], lc.micro_batch_size) if "actor" in groups else None,
        rollout=RolloutRole(groups["rollout"], tc.timeout_s),
        reference=LearnerRole("reference", groups["reference"], lc.micro_batch_size) if "reference" in groups else None,
        critic=LearnerRole("critic", groups["critic"], lc.micro_batch_size) if "critic" in groups else None,
        reward_model=(LearnerRole("reward_model", groups["reward_model"], lc.micro_batch_size)
                      if "reward_model" in groups else None),
        plan=plan, pools=pools)
    (output_dir / "placement.json").write_text(json.dumps(
        {"mode": cfg.placement.mode, "plan": plan.describe(), "roles": roles.placement_report()}, indent=2))
    return roles
