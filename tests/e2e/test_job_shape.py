"""What the one job shape promises, on the real stack: a role that fails to start leaves nothing behind, and the
loss of a step does not depend on how the batch is split (ranks x accumulation) or where the roles sit.

Tolerances: the runs below differ only in the order fp32 sums are reduced (across ranks, accumulation steps or
devices), which moves a step's loss by ~1e-7 relative; 1e-4 leaves room for that after a few Adam steps and is
far below what a wrong scale gives (a factor of 2 for a doubled rank count or accumulation).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.metrics import read_metrics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REL = 1e-4


def _alive_actors() -> set[str]:
    import ray

    return {a for a, info in ray._private.state.actors().items() if info["State"] == "ALIVE"}


def _our_pools_left() -> list[str]:
    import ray

    return [pg["name"] for pg in ray.util.placement_group_table().values()
            if pg["name"].startswith("rlhf_ray-") and pg["state"] != "REMOVED"]


def _wait_until(predicate, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def test_a_role_that_fails_to_start_leaves_no_actor_or_placement_group(ray_cluster, tiny_model_dir, tmp_path):
    """The engine's start-up fails (an argument vLLM does not know) while the learners are still starting:
    the error names the engine, and every actor and placement group of the job is gone afterwards."""
    import ray

    from rlhf_ray.controller.worker_group import RemoteCallError
    from rlhf_ray.jobs.front import run_job

    cfg = load_config(EXAMPLES / "grpo_tiny_cpu.yaml", values={
        "model.path": tiny_model_dir, "train.output_dir": str(tmp_path / "run"), "learner.gpus_per_worker": 1,
        "rollout.engine_kwargs": {"no_such_vllm_argument": 1}, "logging.progress_bar": False})
    before = _alive_actors()
    with pytest.raises(RemoteCallError, match=r"rollout\.setup failed on rollout\[rank 0\]"):
        run_job(cfg)
    assert _wait_until(lambda: _alive_actors() <= before), _alive_actors() - before
    assert not _our_pools_left()
    total = ray.cluster_resources()
    assert _wait_until(lambda: all(ray.available_resources().get(k, 0) == total[k] for k in ("CPU", "GPU")))


def test_a_dead_rank_is_named_before_the_peers_it_broke(ray_cluster):
    """A peer fails first on the closed connection; the rank that died a moment later is the one named."""
    import os

    import ray

    from rlhf_ray.controller.worker_group import RemoteCallError, Who, wait_named

    @ray.remote(num_cpus=0)
    class Rank:
        def fail(self) -> None:
            raise ConnectionError("Connection closed by peer")

        def die(self, after_s: float) -> None:
            time.sleep(after_s)
            os._exit(1)

    peer, doomed = Rank.remote(), Rank.remote()
    t0 = time.monotonic()
    with pytest.raises(RemoteCallError, match=r"(?s)^weight_sync failed on rollout\[rank 0\]: .*died.*"
                                              r"\(then also failed: actor\[rank 0\]\)$") as raised:
        wait_named([peer.fail.remote(), doomed.die.remote(1.0)], [Who("actor", 0), Who("rollout", 0)],
                   "weight_sync", timeout_s=120)
    assert time.monotonic() - t0 < 30  # ended by the failures, not by the 120 s timeout
    # What the failure policy reads (controller.recovery): who, and that its process is gone.
    assert raised.value.culprit == Who("rollout", 0) and raised.value.died


def _sft(tiny_model_dir, out: Path, workers: int) -> list[dict]:
    from rlhf_ray.jobs.front import run_job

    cfg = load_config(EXAMPLES / "sft_tiny_cpu.yaml", values={
        "model.path": tiny_model_dir, "train.output_dir": str(out), "learner.num_workers": workers,
        "learner.micro_batch_size": 1, "learner.global_batch_size": 8, "train.max_steps": 3,
        "train.save_every": 0, "train.eval_every": 0, "data.eval_fraction": 0.0, "logging.tensorboard": False,
        "logging.progress_bar": False, "optim.warmup_steps": 0})
    run_job(cfg)
    return read_metrics(out / "metrics.jsonl")


def test_sft_one_learner_times_8_accumulation_equals_two_times_4(ray_cluster, tiny_model_dir, tmp_path):
    one, two = _sft(tiny_model_dir, tmp_path / "one", 1), _sft(tiny_model_dir, tmp_path / "two", 2)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=REL)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=REL)


def _grpo(tiny_model_dir, out: Path, workers: int, mode: str) -> list[dict]:
    from rlhf_ray.jobs.front import run_job

    cfg = load_config(EXAMPLES / "grpo_tiny_cpu.yaml", values={
        "model.path": tiny_model_dir, "train.output_dir": str(out), "learner.num_workers": workers,
        "learner.gpus_per_worker": 1, "placement.mode": mode, "learner.micro_batch_size": 1,
        "algo.prompts_per_step": 2, "rollout.n_samples": 4, "algo.total_steps": 2, "algo.kl_coef": 0.05,
        "logging.progress_bar": False})
    run_job(cfg)
    return read_metrics(out / "metrics.jsonl")


def test_grpo_loss_is_the_same_for_any_split_and_placement(ray_cluster, tiny_model_dir, tmp_path):
    """8 sequences a step with a reference KL in the loss: 1 learner x 8 micro-batches on its own devices, and 2
    learners x 4 sharing their devices with the reference group, give the same losses at both steps (the split
    and the placement changed together: either one changing a loss fails it)."""
    one = _grpo(tiny_model_dir, tmp_path / "one", 1, "separate")
    shared = _grpo(tiny_model_dir, tmp_path / "shared", 2, "shared")
    keys = ("rollout/reward_mean", "actor/pg_loss", "actor/kl_loss", "kl/policy_reference", "actor/entropy",
            "actor/grad_norm")
    assert len(one) == len(shared) == 2
    for a, b in zip(one, shared):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=REL, abs=1e-7), (k, a[k], b[k])
