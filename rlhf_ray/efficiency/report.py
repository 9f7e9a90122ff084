"""A run's step -> its ``StepCounts``: where each phase ran and what each sequence held.

Where things run is read from the run's ``Resolved`` description (``rlhf_ray.config.resolve``): its placement
plan (roles, workers, GPUs each, and the pools colocated roles share), whether it is on GPUs, whether it swaps
memory (hybrid placement), and the policy's resolved dtype. Nothing here re-derives a placement rule from the
config's strings. What each sequence held is read from the loop's batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from rlhf_ray.efficiency.floors import StepCounts
from rlhf_ray.efficiency.shapes import DTYPE_BYTES, ModelShape

if TYPE_CHECKING:
    from rlhf_ray.config.resolve import Resolved
    from rlhf_ray.controller.placement import PlacementPlan

_POLICY = ("actor", "learner")
_PHASE_ROLES = (("generate", ("rollout",)), ("old_logprobs", _POLICY), ("train", _POLICY), ("reference", _POLICY),
                ("critic", ("critic",)), ("critic_train", ("critic",)), ("reward", ("reward",)))
"""Each phase and the placement roles whose devices it runs on (the first one the plan has)."""


def phase_devices(plan: "PlacementPlan", on_gpu: bool) -> dict[str, float]:
    """Devices of each phase from a run's placement plan (GPU runs; on a CPU the machine is one device).

    generate: engines x GPUs each (tensor parallel); old_logprobs / train: policy workers (actor, or the
    offline learner) x GPUs each; reference the same (its group mirrors the policy's learner settings);
    critic, critic_train: critic workers x GPUs each; reward: reward-model workers x GPUs each. A phase whose
    role the plan lacks is left out (it counts as 1 device). Hybrid placement puts every role on the
    learners' GPUs; the counts are the same.
    """
    if not on_gpu:
        return {}
    devices: dict[str, float] = {}
    for phase, roles in _PHASE_ROLES:
        req = next((plan.requests[r] for r in roles if r in plan.requests), None)
        if req is not None:
            devices[phase] = req.num_workers * req.gpus
    return devices


def learner_state_bytes(params: int, trainable: bool, dtype_bytes: int) -> float:
    """Bytes a learner moves when it offloads: parameters in the compute dtype, plus for a trained model its
    gradients (same dtype) and fp32 optimizer state (master copy and two moments, 12 bytes)."""
    return float(params * (2 * dtype_bytes + 12 if trainable else dtype_bytes))


def _hybrid_offload_bytes(resolved: "Resolved", policy: ModelShape, critic: Optional[ModelShape],
                          reward_model: Optional[ModelShape]) -> float:
    """What the learner groups move to the host and back per step in hybrid placement: the policy's training
    state, the reference's weights (when the run has a reference group), the critic's training state and the
    reward model's weights (when given)."""
    b = DTYPE_BYTES[resolved.policy.dtype]
    offload = learner_state_bytes(policy.params, True, b)
    offload += learner_state_bytes(policy.params, False, b) if resolved.role("reference") is not None else 0.0
    offload += learner_state_bytes(critic.params, True, b) if critic is not None else 0.0
    offload += learner_state_bytes(reward_model.params, False, b) if reward_model is not None else 0.0
    return offload


def rl_step_counts(batch: Any, resolved: "Resolved", weight_sync_bytes: float, policy: ModelShape,
                   critic: Optional[ModelShape] = None, reward_model: Optional[ModelShape] = None,
                   trainable_params: Optional[int] = None) -> StepCounts:
    """``StepCounts`` of one RL step from its ``RolloutBatch`` (``attention_mask`` (B, T), ``response_lengths``
    (B,), ``group_index`` (B,)) and the run's ``Resolved``; ``weight_sync_bytes`` as the sync reported;
    ``trainable_params`` the policy's (LoRA: the adapters'; None: all of them).

    ``total_devices`` is the GPUs the placement plan's pools hold (hybrid: the learners'; shared: colocated
    roles counted once; separate: every role's), None on a CPU."""
    total = [int(x) for x in batch.attention_mask.sum(-1).tolist()]
    resp = [int(x) for x in batch.response_lengths.tolist()]
    a, r = resolved.config.algo, resolved.config.rollout
    on_gpu, hybrid = resolved.on_gpu, resolved.swaps_memory
    plan = resolved.plan  # a property that plans afresh: read once
    offload = _hybrid_offload_bytes(resolved, policy, critic, reward_model) if hybrid else 0.0
    return StepCounts(prompt_lengths=[t - x for t, x in zip(total, resp)], response_lengths=resp,
                      group_index=[int(g) for g in batch.group_index.tolist()], train_passes=a.ppo_epochs,
                      optimizer_steps=a.mini_batches * a.ppo_epochs, weight_sync_bytes=float(weight_sync_bytes),
                      sync_link="device_to_device" if on_gpu and not hybrid else "copy", engines=r.num_engines,
                      devices=phase_devices(plan, on_gpu),
                      total_devices=plan.total()["GPU"] if on_gpu else None, hybrid=hybrid,
                      learner_offload_bytes=offload, trainable_params=trainable_params)


def offline_step_counts(micro_batches: Any, plan: "PlacementPlan", on_gpu: bool,
                        trainable_params: Optional[int] = None) -> StepCounts:
    """``StepCounts`` of one offline step (SFT, RM, DPO, KTO) from every rank's micro-batches (dicts with
    ``attention_mask`` (B, T); a list of lists, one per rank, as the loop hands them to ``train_step``) and
    the run's placement plan (the ``learner`` role's workers x GPUs; a reference group shares them)."""
    lengths: list[int] = []
    for rank in micro_batches:
        for mb in rank:
            lengths += [int(x) for x in mb["attention_mask"].sum(-1).tolist()]
    devices: dict[str, float] = {}
    if on_gpu:
        learner = plan.requests["learner"]
        devices = {"train": learner.num_workers * learner.gpus, "reference": learner.num_workers * learner.gpus}
    return StepCounts.offline(lengths, devices=devices, total_devices=devices.get("train"),
                              trainable_params=trainable_params)
