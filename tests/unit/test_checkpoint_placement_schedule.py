"""Atomic checkpoint directories, placement plans and the LR schedule (no cluster needed)."""

import json
import math

import pytest

from rlhf_ray.checkpoint import CheckpointDir
from rlhf_ray.controller.placement import PlacementError, RoleRequest, check_plan, plan_placement
from rlhf_ray.engines.lr_schedule import lr_multiplier


def test_checkpoint_atomic_and_latest(tmp_path):
    ck = CheckpointDir(tmp_path, keep=2)
    assert ck.latest() is None
    for step in (10, 20):
        d = ck.staging(step)
        (d / "payload").write_text(str(step))
        ck.finalize(step, {"step": step})
    assert ck.latest().name == "step_000020"
    # A crash while writing step 30 leaves only a .tmp dir: latest still points at the good one.
    (ck.staging(30) / "payload").write_text("half")
    assert ck.latest().name == "step_000020"
    assert CheckpointDir.read_state(ck.latest()) == {"step": 20}
    ck.finalize(30, {"step": 30})
    assert [p.name for p in ck.complete()] == ["step_000020", "step_000030"]  # keep=2 pruned step 10
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_checkpoint_files_are_synced_before_the_rename(tmp_path, monkeypatch):
    """Every file the ranks wrote reaches the disk before the rename that marks the checkpoint complete."""
    import os

    from rlhf_ray import checkpoint

    ckpt = CheckpointDir(tmp_path)
    stage = ckpt.staging(3)
    (stage / "model").mkdir()
    for rel in ("model/model.safetensors", "rng_rank0.pt"):
        (stage / rel).write_bytes(b"x")
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                             real_fsync(fd)))
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (renamed.append((str(a), len(synced))),
                                                                 real_replace(a, b)))
    ckpt.finalize(3, {"step": 3})
    step_rename = next(n for a, n in renamed if a.endswith(".tmp-step_000003"))
    before = set(synced[:step_rename])
    assert {str(stage / "model/model.safetensors"), str(stage / "rng_rank0.pt"), str(stage / "trainer_state.json"),
            str(stage / "model"), str(stage)} <= before, before


def test_checkpoint_latest_ignores_incomplete(tmp_path):
    ck = CheckpointDir(tmp_path)
    ck.staging(5)
    ck.finalize(5, {"step": 5})
    (tmp_path / "checkpoints" / "step_000009").mkdir()  # no trainer_state.json: not complete
    (tmp_path / "checkpoints" / "latest").write_text("step_000009")
    assert ck.latest().name == "step_000005"


def test_plan_separate_and_colocated():
    reqs = [RoleRequest("actor", 2, 1), RoleRequest("ref", 2, 1), RoleRequest("rollout", 2, 1)]
    plan = plan_placement(reqs)
    assert plan.total() == {"CPU": 6.0, "GPU": 6.0}
    plan = plan_placement(reqs, colocate=[["actor", "ref"]])
    # actor and ref share 2 bundles of 1 GPU, each actor asks for half a GPU of its bundle
    assert plan.total()["GPU"] == 4.0
    assert plan.role_share == {"actor": 0.5, "ref": 0.5, "rollout": 1.0}
    assert plan.role_pool["actor"] == plan.role_pool["ref"] == "actor+ref"


def test_plan_errors():
    with pytest.raises(PlacementError, match="colocated roles 'actor' and 'critic' must have the same"):
        plan_placement([RoleRequest("actor", 2, 1), RoleRequest("critic", 1, 1)], colocate=[["actor", "critic"]])
    plan = plan_placement([RoleRequest("actor", 4, 1), RoleRequest("rollout", 4, 1)])
    with pytest.raises(PlacementError, match=r"placement needs 8 GPU but the cluster has 4"):
        check_plan(plan, {"GPU": 4, "CPU": 64})
    plan = plan_placement([RoleRequest("rollout", 1, 4)])
    with pytest.raises(PlacementError, match=r"needs 4 GPUs in one bundle but no node has more than 2"):
        check_plan(plan, {"GPU": 4, "CPU": 8}, nodes=[{"GPU": 2, "CPU": 4}, {"GPU": 2, "CPU": 4}])


def test_lr_schedule_values():
    # warmup 2 steps: (0+1)/2, (1+1)/2
    assert lr_multiplier(0, 10, 2, "cosine", 0.0) == 0.5
    assert lr_multiplier(1, 10, 2, "cosine", 0.0) == 1.0
    # cosine at progress p = (6-2)/(10-2) = 0.5 -> 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert math.isclose(lr_multiplier(6, 10, 2, "cosine", 0.1), 0.55, rel_tol=1e-12)
    # linear at p = 0.5 -> 0.1 + 0.9 * 0.5 = 0.55 as well; at the end -> min ratio
    assert math.isclose(lr_multiplier(6, 10, 2, "linear", 0.1), 0.55, rel_tol=1e-12)
    assert math.isclose(lr_multiplier(10, 10, 2, "linear", 0.1), 0.1, rel_tol=1e-12)
    assert lr_multiplier(7, 10, 0, "constant", 0.0) == 1.0


# ---- best/ (train.keep_best) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, best, mode, expected", [
    (0.5, None, "max", True),              # anything beats no best yet
    (0.6, 0.5, "max", True), (0.5, 0.5, "max", False), (0.4, 0.5, "max", False),   # strictly: ties keep the earlier
    (0.4, 0.5, "min", True), (0.5, 0.5, "min", False), (0.6, 0.5, "min", False),
    (float("nan"), None, "max", False),    # a NaN evaluation is never the best
    (0.1, float("nan"), "min", True),
])
def test_improves(value, best, mode, expected):
    from rlhf_ray.checkpoint import improves

    assert improves(value, best, mode) is expected


def test_best_model_is_replaced_only_by_a_better_evaluation_and_read_back_on_resume(tmp_path):
    from rlhf_ray.checkpoint import BestModel
    from rlhf_ray.config import ConfigError

    def export(tag):
        def write(d):  # what LearnerRole.export_hf does: a fresh directory holding the model files
            d.mkdir(parents=True)
            (d / "model.safetensors").write_text(tag)
        return write

    best = BestModel(tmp_path, "eval/pass@1", "max", resume=False)
    assert best.offer(0, {"eval/pass@1": 0.25}, export("step0"))
    assert not best.offer(2, {"eval/pass@1": 0.25}, export("step2"))       # a tie keeps step 0's model
    assert best.offer(4, {"eval/pass@1": 0.5}, export("step4"))
    assert not best.offer(6, {"eval/pass@1": 0.375}, export("step6"))
    assert (tmp_path / "best" / "model.safetensors").read_text() == "step4"
    record = {"metric": "eval/pass@1", "mode": "max", "value": 0.5, "step": 4}
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == record == best.record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]          # the staging directory is gone
    # A resumed run competes with the record; a fresh one (or another rule) starts over.
    assert BestModel(tmp_path, "eval/pass@1", "max", resume=True).record == record
    assert BestModel(tmp_path, "eval/pass@1", "min", resume=True).record is None
    assert BestModel(tmp_path, "eval/pass@1", "max", resume=False).record is None
    with pytest.raises(ConfigError, match=r"train.keep_best: the evaluation logged no 'eval/pass@1'; it logs "
                                          r"eval/loss"):
        best.offer(8, {"eval/loss": 1.0}, export("step8"))
