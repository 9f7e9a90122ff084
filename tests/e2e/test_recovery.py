"""Exact resume and automatic recovery on the real stack: a GRPO run that is resumed, or whose engine is really
killed (SIGKILL) and then frozen (SIGSTOP) mid-run, and a one-step-off PPO run (critic, adaptive KL, a batch in
flight at every checkpoint) whose learner rank is killed, log every step once with the metrics of the
uninterrupted run.

Why equality and not a tolerance: on CPU every step is deterministic given the weights and the sampling seed,
the engines are reseeded per step (``RolloutLoop.sampling_seed``), and a checkpoint restores the learners'
state, so a recovered or resumed step recomputes exactly what the uninterrupted step computed. Any lost or
repeated update, a sample drawn from another seed or a step redone on stale weights changes the rewards and
losses in their leading digits.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Callable

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.metrics import read_metrics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS = 4
FAULT_STEP = 2
"""0-based: a learner fault comes at the start of step 3, after the checkpoint of step 2."""


def _grpo(tiny_model_dir, out: Path, steps: int = STEPS, loop_cls=None, **values) -> list[dict]:
    """The GRPO example with a reward that varies within every group (the math reward is 0 for an untrained
    model, which would make every update zero and a lost or repeated update invisible)."""
    return _rl("grpo", tiny_model_dir, out, steps, loop_cls,
               **{"reward.functions": [str(Path(__file__).with_name("parity_reward.py"))], **values})


def _ppo(tiny_model_dir, out: Path, loop_cls=None) -> list[dict]:
    """The PPO example without its trained reward model (the math reward alone), one step off: a critic, GAE,
    2 mini-batches x 2 epochs (old log-probs from the learner), the adaptive KL controller and the batch the
    engines generate during each step, all restored by a resume."""
    return _rl("ppo", tiny_model_dir, out, STEPS, loop_cls, **{"reward.model": None, "learner.micro_batch_size": 4,
                                                               "rollout.mode": "one_step_off"})


def _rl(job: str, tiny_model_dir, out: Path, steps: int, loop_cls, **values) -> list[dict]:
    from rlhf_ray.jobs import rl

    cfg = load_config(EXAMPLES / f"{job}_tiny_cpu.yaml", values={
        "model.path": tiny_model_dir, "train.output_dir": str(out), "algo.total_steps": steps,
        "algo.prompts_per_step": 4, "rollout.n_samples": 4, "learner.micro_batch_size": 8,
        "algo.kl_coef": 0.05, "train.save_every": 2, "logging.progress_bar": False, **values})
    rl.run(cfg, loop_cls)
    return read_metrics(out / "metrics.jsonl")


def _compared(rows: list[dict]) -> list[dict]:
    """Each step's rollout, policy, critic and KL metrics (what a lost, repeated or re-sampled step changes), less
    wall-clock seconds."""
    keys = [k for k in rows[0] if k.startswith(("rollout/", "actor/", "critic/", "kl/")) and not k.endswith("_s")]
    assert len(keys) > 10
    return [{k: r[k] for k in ["step", *keys]} for r in rows]


def _uninterrupted(rows: list[dict]) -> list[dict]:
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # Every step updates the policy: a lost or repeated update would change the later steps' metrics.
    assert all(r["actor/grad_norm"] > 0 for r in rows), [r["actor/grad_norm"] for r in rows]
    assert all(r["recovery/restarts"] == r["recovery/engine_replacements"] == 0 for r in rows)
    return _compared(rows)


@pytest.fixture(scope="module")
def straight(ray_cluster, tiny_model_dir, tmp_path_factory) -> list[dict]:
    """The uninterrupted GRPO run the GRPO tests here are held to."""
    return _uninterrupted(_grpo(tiny_model_dir, tmp_path_factory.mktemp("straight") / "run"))


@pytest.fixture(scope="module")
def straight_ppo(ray_cluster, tiny_model_dir, tmp_path_factory) -> list[dict]:
    rows = _ppo(tiny_model_dir, tmp_path_factory.mktemp("straight_ppo") / "run")
    # Step 1 trains on samples of the initial weights (nothing overlapped yet); every later step on samples of
    # the weights one update older than the policy it trains.
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 1, 1]
    return _uninterrupted(rows)


def _faulty(faults: dict[int, Callable[[object], None]]) -> type:
    """``RLLoop`` that calls ``faults[s](loop)`` once, at the start of step ``s`` (0-based; test scaffolding: each
    fault itself is a real signal to a real process)."""
    from rlhf_ray.controller.rl_loop import RLLoop

    fired = set()

    class FaultyLoop(RLLoop):
        def step(self, step: int) -> dict[str, float]:
            if step in faults and step not in fired:
                fired.add(step)
                faults[step](self)
            return super().step(step)

    return FaultyLoop


def _pid(loop, group: str, rank: int) -> int:
    return int(loop.roles.get(group).group.facts[rank]["pid"])


def _recoveries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "recoveries.jsonl").read_text().splitlines()]


def test_a_resumed_grpo_run_reproduces_the_uninterrupted_one(straight, tiny_model_dir, tmp_path):
    """2 steps, then a resume to 4: the engines are reseeded per step, the learners restore their state, the KL
    controller its value."""
    _grpo(tiny_model_dir, tmp_path / "resumed", steps=2)
    ckpt = tmp_path / "resumed" / "checkpoints" / "step_000002"
    state, saved = json.loads((ckpt / "trainer_state.json").read_text()), load_config(ckpt / "config.yaml")
    assert (state["step"], state["job"], state["model"]) == (2, "grpo", tiny_model_dir) and state["data"]
    assert saved.algo.total_steps == 2 and "resolved:" in (ckpt / "config.yaml").read_text()
    resumed = _grpo(tiny_model_dir, tmp_path / "resumed", **{"train.resume": True})
    assert _compared(resumed) == straight


def test_a_killed_and_then_a_frozen_engine_are_replaced_in_place(straight, tiny_model_dir, tmp_path):
    """SIGKILL at step 3: the engine's death names it. SIGSTOP of its replacement at step 4: the process lives
    but answers nothing, and the call past ``train.timeout_s`` names it. Each time a new engine takes the bundle,
    the policy's weights are synced into it and the call is redone; the learners never restart."""
    frozen = []

    def kill(loop) -> None:
        os.kill(_pid(loop, "rollout", 0), signal.SIGKILL)

    def freeze(loop) -> None:
        frozen.append(_pid(loop, "rollout", 0))
        os.kill(frozen[0], signal.SIGSTOP)

    out = tmp_path / "run"
    try:
        rows = _grpo(tiny_model_dir, out, loop_cls=_faulty({2: kill, 3: freeze}), **{"train.timeout_s": 20})
    finally:
        for pid in frozen:  # normally gone already: the recovery killed it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert _compared(rows) == straight  # every step logged once, each with the uninterrupted run's metrics
    assert [(r["recovery/engine_replacements"], r["recovery/restarts"]) for r in rows] == [
        (0, 0), (0, 0), (1, 0), (2, 0)]
    killed, stalled = _recoveries(out)
    assert (killed["step"], killed["action"], killed["engines"]) == (3, "replace_engines", [0])
    assert "rollout[rank 0]" in killed["cause"] and "died" in killed["cause"]
    assert (stalled["step"], stalled["action"], stalled["engines"]) == (4, "replace_engines", [0])
    assert "no answer from rollout[rank 0]" in stalled["cause"] and "within 20 s" in stalled["cause"]


def test_a_killed_learner_rank_restarts_the_roles_and_resumes_ppo_exactly(straight_ppo, tiny_model_dir, tmp_path):
    """The run resumes from the step-2 checkpoint, which holds the batch the engines had generated for step 3
    with the step-1 weights; training on it (not on a batch sampled anew with the step-2 weights) is part of
    what makes every step equal the uninterrupted run's."""
    out = tmp_path / "run"
    kill = _faulty({FAULT_STEP: lambda loop: os.kill(_pid(loop, "actor", 1), signal.SIGKILL)})
    rows = _ppo(tiny_model_dir, out, loop_cls=kill)
    assert (out / "checkpoints" / "step_000002" / "rollouts_ahead.pt").exists()
    assert _compared(rows) == straight_ppo  # steps 3-4 redone from the step-2 checkpoint, each logged once
    assert any(k.startswith("critic/") for k in straight_ppo[0])
    assert [r["recovery/restarts"] for r in rows] == [0, 0, 1, 1]
    record, resumed = _recoveries(out)
    assert record["action"] == "restart" and "actor[rank 1]" in record["cause"] and "died" in record["cause"]
    assert resumed["action"] == "resumed" and resumed["step"] == FAULT_STEP  # from the step-2 checkpoint, not 0
    assert resumed["checkpoint"].endswith("step_000002")

# ---- evaluation during training (train.eval_every with sampling, train.keep_best) --------------------------------

def test_evaluating_during_training_changes_no_training_sample_and_keeps_the_best(straight, tiny_model_dir, tmp_path):
    """An evaluation before the first step and after every step, sampling 4 responses per held-out prompt at
    temperature 1 (engines reseeded for it from another stream): every step's training metrics equal those of the
    run that never evaluates, and best/ holds the model of the evaluation with the highest pass@1."""
    from safetensors.torch import load_file

    heldout = tmp_path / "heldout.jsonl"  # data.eval_path: the training prompts stay those of the straight run
    heldout.write_text("".join(json.dumps({"prompt": f"Repeat the number {i % 10}.", "answer": str(i % 10)}) + "\n"
                               for i in range(16)))
    out = tmp_path / "run"
    rows = _grpo(tiny_model_dir, out, **{
        "data.eval_path": str(heldout), "train.eval_every": 1, "eval.n_samples": 4, "eval.temperature": 1.0,
        "train.keep_best": "eval/pass@1", "train.save_every": 1, "train.keep_checkpoints": STEPS})
    assert [r["step"] for r in rows] == list(range(STEPS + 1))  # step 0: the model as given, before training
    assert _compared(rows[1:]) == straight
    for r in rows:
        # 16 prompts x 4 samples: pass@1 is the fraction correct; pass@4 the prompts with any correct sample
        assert r["eval/pass@1"] == pytest.approx(r["eval/accuracy"], abs=1e-9) and r["eval/pass@1"] <= r["eval/pass@4"]
        assert r["eval/pass@1"] * 64 == pytest.approx(round(r["eval/pass@1"] * 64), abs=1e-9)
        assert {"eval/maj@1", "eval/maj@4", "eval/reward_mean"} <= set(r)
        assert any(k.startswith("eval/reward/") and k.endswith("_mean") for k in r)  # the reward source's own mean

    scores = [(r["eval/pass@1"], -r["step"]) for r in rows]
    value, step = max(scores)[0], -max(scores)[1]  # the highest, the earliest of equals
    record = json.loads((out / "best" / "best.json").read_text())
    assert record == {"metric": "eval/pass@1", "mode": "max", "value": value, "step": step}
    # best/ is the policy at that evaluation: the model as given (step 0) or the checkpoint of that step.
    source = Path(tiny_model_dir) if step == 0 else out / "checkpoints" / f"step_{step:06d}" / "model"
    best, want = load_file(out / "best" / "model.safetensors"), load_file(source / "model.safetensors")
    assert best.keys() == want.keys() and all(bool((best[k] == want[k]).all()) for k in best)


# ---- asynchronous rollouts (rollout.mode: async) --------------------------------------------------------------

def test_async_rollouts_with_max_staleness_0_train_exactly_as_sync(straight, tiny_model_dir, tmp_path):
    """max_staleness 0: the stream may start a step's prompts only once the policy has every earlier update, and
    starts them with the step's seed, split over the engines as sync splits them; it scores each group as it
    finishes, and the reference model's log-probs of it come from a forward of its chunk of groups, not of the
    step's batch. Every step's metrics equal the sync run's (rewards, losses, KL, the learner-vs-vLLM gap)."""
    rows = _grpo(tiny_model_dir, tmp_path / "run", **{"rollout.mode": "async", "rollout.max_staleness": 0})
    assert [{k: r[k] for k in straight[0]} for r in rows] == straight
    assert all(r["rollout/dropped_stale"] == r["rollout/partial_samples"] == 0 for r in rows)
    assert all(r["rollout/reference_s"] > 0 for r in rows)  # the reference ran on the groups as they finished


def test_async_partial_rollouts_survive_a_learner_kill_taking_every_prompt_once(tiny_model_dir, tmp_path):
    """max_staleness 1 with partial rollouts (samples in flight at each weight sync are interrupted and continued
    under the new weights), 32-token responses so that syncs do interrupt them, a checkpoint every 3 steps and a
    learner rank SIGKILLed at the start of step 5: the run restarts its roles, resumes from the step-3 checkpoint
    (which holds the groups the engines had finished or had in flight for later steps) and trains on the first 6
    step batches of the epoch order, each prompt once (``rollouts.jsonl``). The learning rate is ~0, so every
    sync pushes the same weights: a continued sample's stitched tokens and log-probs must then match the
    learner's exactly as an uninterrupted sample's do (gap < 1e-3), which checks the stitching itself."""
    expected: list[str] = []

    def kill(loop) -> None:
        expected.extend(loop.prompts[i].location for s in range(6) for i in loop.order.batch(s))
        os.kill(_pid(loop, "actor", 1), signal.SIGKILL)

    out = tmp_path / "run"
    rows = _grpo(tiny_model_dir, out, steps=6, loop_cls=_faulty({4: kill}), **{
        "rollout.mode": "async", "rollout.max_staleness": 1, "rollout.partial": True, "rollout.max_new_tokens": 32,
        "train.save_every": 3, "optim.lr": 1e-12, "logging.rollouts": True, "algo.kl_coef": 0.0})
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["recovery/restarts"] for r in rows] == [0, 0, 0, 1, 1, 1]  # steps 4-6 run after the restart
    record, resumed = _recoveries(out)
    assert record["action"] == "restart" and resumed["checkpoint"].endswith("step_000003")
    import torch

    queued = torch.load(out / "checkpoints" / "step_000003" / "rollouts_ahead.pt", weights_only=True)
    assert queued["groups"], "the step-3 checkpoint holds the groups started for later steps"
    samples = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    by_step: dict[int, list[str]] = {}
    for s in samples:
        by_step.setdefault(s["step"], []).append(s["row"])
    assert sorted(by_step) == list(range(1, 7)) and all(len(v) == 16 for v in by_step.values())
    trained = [row for step in sorted(by_step) for row in dict.fromkeys(by_step[step])]
    assert len(trained) == len(set(trained)) == 24 and set(trained) == set(expected)
    assert all(r["rollout/staleness"] <= 1 for r in rows)
    assert sum(r["rollout/partial_samples"] for r in rows) > 0
    assert max(r["rollout/logprob_diff_learner_vllm"] for r in rows) < 1e-3
