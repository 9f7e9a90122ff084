"""The failure policy (``controller.recovery``): which errors are faults, what each fault does, the budget.

The errors are the ones ``wait_named`` raises (built here as it builds them); tests/e2e/test_recovery.py drives
the same policy with real SIGKILL / SIGSTOP on the real stack.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_ray.config import load_config, resolve
from rlhf_ray.controller.recovery import Fault, Recoveries, RecoveryLimitError, classify
from rlhf_ray.controller.worker_group import RemoteCallError, RemoteCallTimeout, Who

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ENGINE0, ENGINE1, ACTOR1 = Who("rollout", 0, "node n, pid 1"), Who("rollout", 1), Who("actor", 1, "node n, pid 2")


def test_a_dead_engine_is_replaced_in_place_and_any_other_death_restarts():
    assert classify(RemoteCallError("gen failed", ENGINE0, died=True)) == Fault("replace_engines", "gen failed", (0,))
    assert classify(RemoteCallError("step failed", ACTOR1, died=True)) == Fault("restart", "step failed")


def test_stalled_engines_alone_are_replaced_a_stalled_learner_restarts():
    assert classify(RemoteCallTimeout("t", [ENGINE1, ENGINE0])).engines == (0, 1)
    # A weight sync stalled by an engine also holds up the sending learner rank: both stalled -> restart.
    assert classify(RemoteCallTimeout("t", [Who("actor", 0), ENGINE0])).action == "restart"


def test_an_error_raised_by_the_code_is_no_fault():
    """A reward function's exception or a non-finite loss would happen again after any restart."""
    assert classify(RemoteCallError("non-finite loss", ACTOR1, died=False)) is None
    assert classify(RemoteCallError("bad reward", ENGINE0, died=False)) is None
    assert classify(ValueError("bad row")) is None


def test_the_budget_counts_both_kinds_and_the_fault_past_it_stops_with_its_cause(tmp_path):
    rec = Recoveries(2, tmp_path)
    rec.step = 2
    assert rec.admit(RemoteCallError("engine gone", ENGINE0, died=True), in_place=True).action == "replace_engines"
    # Reached the job front (not replaced in place): an engine fault is recovered by a restart.
    assert rec.admit(RemoteCallError("engine gone", ENGINE0, died=True)).action == "restart"
    assert rec.metrics() == {"recovery/engine_replacements": 1.0, "recovery/restarts": 1.0}
    with pytest.raises(RecoveryLimitError, match=r"(?s)^learner gone\n.*2 recoveries of train.max_restarts=2"):
        rec.admit(RemoteCallError("learner gone", ACTOR1, died=True))
    with pytest.raises(ValueError, match="bad row"):  # no fault: re-raised as is, nothing counted
        rec.admit(ValueError("bad row"))
    records = [json.loads(line) for line in (tmp_path / "recoveries.jsonl").read_text().splitlines()]
    assert [(r["step"], r["action"], r["engines"], r["cause"]) for r in records] == [
        (3, "replace_engines", [0], "engine gone"), (3, "restart", [], "engine gone")]


@pytest.mark.parametrize("job, expected", [("grpo", 3), ("ppo", 3), ("online_dpo", 3), ("best_of_n", 0), ("sft", 0),
                                            ("dpo", 0)])
def test_recovery_is_on_by_default_for_the_rl_jobs(job, expected, tiny_model_dir):
    example = EXAMPLES / f"{job}_tiny_cpu.yaml"
    values = {"model.path": tiny_model_dir}
    assert resolve(load_config(example, values=values)).max_restarts == expected
    assert resolve(load_config(example, values={**values, "train.max_restarts": 1})).max_restarts == 1
