"""PPO and GRPO end to end on the real stack: vLLM CPU engines and DeepSpeed learner groups in Ray actors.

The session's Ray instance declares 8 logical GPUs, so the runs below ask for GPUs and Ray places the
roles as each placement mode says (they compute on the CPU all the same); each run checks where its
roles landed (``placement.json``) and that learner and vLLM log-probs agree after every weight sync.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray.cli import main as cli_main
from rlhf_ray.controller.reward_scoring import metric_name
from rlhf_ray.metrics import read_metrics
from rlhf_ray.rewards import build_reward_source
from rlhf_ray.rewards.server import make_server, serve_in_thread

REPO = Path(__file__).resolve().parents[2]


def _gpu_sets(report: dict, role: str) -> list[set]:
    return [set(map(str, r["gpu_ids"])) for r in report["roles"][role]]


def _assert_synced_every_step(rows: list[dict]) -> None:
    """From step 2 on, the policy's log-probs of the sampled tokens equal vLLM's: the last sync was applied."""
    diffs = [r["rollout/logprob_diff_learner_vllm"] for r in rows[1:]]
    assert diffs and max(diffs) < 1e-3, diffs


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_grpo_learns_from_the_reward_alone(ray_cluster, tiny_model_dir, tmp_path, mode):
    """`rlhf-ray train examples/grpo_tiny_cpu.yaml` as its own process on this Ray cluster, placement separate:
    a random-init model learns to repeat the number in the prompt from the built-in math reward alone.
    80 of the example's 100 steps: the mean reward is ~0.04 over steps 1-10 and ~0.59 over steps 71-80 here.
    async (max_staleness 1, partial rollouts) must clear the same bar while training on samples up to one update
    old (the issue's staleness-1 criterion: the importance correction keeps the stale update pointed the right
    way). one_step_off's correctness is held to the KL-regularised optimum in test_kl_optimum.py."""
    out = tmp_path / "grpo"
    address = ray_cluster.get_runtime_context().gcs_address
    extra = ["rollout.max_staleness=1", "rollout.partial=true"] if mode == "async" else []
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_ray", "train", "examples/grpo_tiny_cpu.yaml", f"model.path={tiny_model_dir}",
         f"train.output_dir={out}", f"ray.address={address}", "learner.gpus_per_worker=1",
         "placement.mode=separate", "algo.total_steps=80", "logging.progress_bar=false", f"rollout.mode={mode}",
         *extra], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(out / "metrics.jsonl")
    rewards = [r["rollout/reward_mean"] for r in rows]
    assert len(rewards) == 80
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    # Chance is ~0.03 (one digit of ~100 tokens, then a stop); the learned policy repeats the digit.
    assert first < 0.15 and last > first + 0.25, [round(x, 2) for x in rewards]
    if mode == "sync":
        _assert_synced_every_step(rows)
    else:  # the gap then holds up to one update's change as well; what must hold is the staleness bound
        staleness = [r["rollout/staleness"] for r in rows]
        assert staleness[0] == 0 and max(staleness) == 1, staleness
    report = json.loads((out / "placement.json").read_text())
    actor, rollout = set().union(*_gpu_sets(report, "actor")), set().union(*_gpu_sets(report, "rollout"))
    assert report["mode"] == "separate" and len(actor) == 2 and len(rollout) == 1 and not actor & rollout


def test_ppo_with_critic_reward_model_reward_file_and_http_endpoint(ray_cluster, tiny_model_dir, trained_rm,
                                                                   tmp_path, capsys, monkeypatch):
    """job: ppo from the CLI, placement shared: actor+reference on the same GPUs, critic+reward model on the same
    GPUs, the engine apart. Rewards: the reward model trained by job rm (its export used as is), a Python file
    and an HTTP endpoint, summed with weights."""
    rm_dir = trained_rm[1]["final_model"]
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("def reward_fn(prompts, responses, answer, **_):\n"
                           "    return [1.0 if a in r else 0.0 for r, a in zip(responses, answer)]\n")
    monkeypatch.setenv("RLHF_RAY_REWARD_TOKEN", "ppo-test-token")  # reward.http_token_env's default variable
    server = make_server(build_reward_source("examples/rewards/length_penalty.py:brevity_bonus", 30.0), 30.0,
                         "ppo-test-token")
    serve_in_thread(server)
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    out = tmp_path / "ppo"
    try:
        code = cli_main(["train", str(REPO / "examples/ppo_tiny_cpu.yaml"),
                         f"model.path={tiny_model_dir}", f"reward.model={rm_dir}",
                         f"reward.functions=[{reward_file}, '{url}']", "reward.weights=[1.0, 0.5]",
                         "learner.gpus_per_worker=1", "reward.gpus_per_worker=1", "reward.num_workers=1",
                         "critic.num_workers=1",
                         "placement.mode=shared", "algo.total_steps=3", f"train.output_dir={out}",
                         "logging.progress_bar=false", "ray.num_cpus=null"])
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    last = rows[-1]
    http_key = f"reward/{metric_name(url)}_mean"
    for key in ("rollout/reward_mean", "reward/model_mean", "reward/reward_fn_mean", http_key,
                "critic/value_loss", "critic/values_mean", "critic/skipped_updates", "actor/skipped_updates",
                "actor/pg_loss", "actor/clip_fraction", "actor/entropy",
                "kl/policy_reference", "kl/coef", "timing/generate_s", "timing/reward_s", "timing/reference_s",
                "timing/critic_s", "timing/old_logprobs_s", "timing/train_s", "timing/weight_sync_s",
                "efficiency/tokens_per_s", "efficiency/step_floor_s", "efficiency/mfu",
                "efficiency/generate_vs_floor", "efficiency/train_vs_floor", "efficiency/weight_sync_vs_floor",
                "efficiency/critic_vs_floor", "efficiency/reward_floor_s", "efficiency/idle_s"):
        assert key in last and isinstance(last[key], float), key
    # A phase never beats its physical floor (the floors are lower bounds on the device measured in-run).
    assert all(v >= 1.0 for k, v in last.items() if k.endswith("_vs_floor")), last
    # Every source moved the total: reward = 1.0 * file + 0.5 * http + reward model.
    for r in rows:
        want = r["reward/reward_fn_mean"] + 0.5 * r[http_key] + r["reward/model_mean"]
        assert r["rollout/reward_mean"] == pytest.approx(want, abs=1e-5)
    assert any(r[http_key] > 0 for r in rows)  # the brevity bonus is > 0 for short answers
    assert rows[0]["kl/coef"] == pytest.approx(0.05) and rows[-1]["kl/coef"] != rows[0]["kl/coef"]  # adaptive
    _assert_synced_every_step(rows)
    # Placement: actor+reference share GPUs rank by rank, critic+reward model too, the engine has its own.
    report = json.loads((out / "placement.json").read_text())
    assert report["mode"] == "shared"
    assert _gpu_sets(report, "actor") == _gpu_sets(report, "reference")
    assert _gpu_sets(report, "critic") == _gpu_sets(report, "reward_model")
    actor_gpus = set().union(*_gpu_sets(report, "actor"))
    critic_gpus = set().union(*_gpu_sets(report, "critic"))
    rollout_gpus = set().union(*_gpu_sets(report, "rollout"))
    assert len(actor_gpus) == 2 and len(critic_gpus) == 1 and len(rollout_gpus) == 1
    assert not (actor_gpus & critic_gpus) and not (rollout_gpus & (actor_gpus | critic_gpus))
    assert (out / "final" / "model.safetensors").is_file()
    assert "outputs in" in capsys.readouterr().out


def test_a_failing_reward_function_stops_the_run_naming_it_and_the_sample(ray_cluster, tiny_model_dir, tmp_path,
                                                                          capsys):
    """job: grpo, placement hybrid (learner rank i and engine i on GPU i); the reward raises on some samples."""
    reward_file = tmp_path / "fragile.py"
    # Divides by zero on rows whose answer has two digits (sums 10..18), about half of them.
    reward_file.write_text("def reward_fn(prompts, responses, answer, **_):\n"
                           "    return [1.0 / (2 - len(a)) if len(a) == 2 else 0.0 for a in answer]\n")
    out = tmp_path / "bad"
    code = cli_main(["train", str(REPO / "examples/grpo_tiny_cpu.yaml"), f"model.path={tiny_model_dir}",
                     "data.path=demo:arithmetic_rl", "data.max_prompt_length=64", f"reward.functions=[{reward_file}]",
                     "learner.gpus_per_worker=1",
                     "placement.mode=hybrid", "rollout.num_engines=2", "algo.total_steps=2", "algo.prompts_per_step=4",
                     "rollout.n_samples=4", "learner.micro_batch_size=4", f"train.output_dir={out}",
                     "logging.progress_bar=false", "ray.num_cpus=null"])
    err = capsys.readouterr().err
    assert code == 2
    line = [ln for ln in err.splitlines() if ln.startswith("reward error:")]
    assert line, err
    assert f"reward function 'reward_fn' from {reward_file}" in line[0]
    assert "ZeroDivisionError" in line[0] and "on sample " in line[0] and "(prompt: " in line[0]
    report = json.loads((out / "placement.json").read_text())
    assert report["mode"] == "hybrid"
    actor, rollout = _gpu_sets(report, "actor"), _gpu_sets(report, "rollout")
    assert len(actor) == 2 and all(len(g) == 1 for g in actor) and actor[0] != actor[1]
    assert rollout == actor  # engine i shares GPU i with learner rank i


def test_bad_reward_spec_fails_before_any_actor_starts(tiny_model_dir, tmp_path, capsys):
    code = cli_main(["train", str(REPO / "examples/grpo_tiny_cpu.yaml"), f"model.path={tiny_model_dir}",
                     f"reward.functions=[{tmp_path / 'missing.py'}]", f"train.output_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert code == 2 and "config error: reward.functions: reward file not found" in err, err
    assert not (tmp_path / "x" / "placement.json").exists()


@pytest.mark.parametrize("mode", ["one_step_off", "async"])
def test_grpo_dynamic_sampling_refills_groups_without_signal(ray_cluster, tiny_model_dir, tmp_path, mode):
    """algo.filter_groups (DAPO) on the untrained model and the math reward: most groups are all 0 (chance ~0.03
    per sample), so steps refill from the next prompts, up to 2 extra rounds, then top up with dropped groups.
    Every step trains on exactly prompts_per_step groups. One step off (whose first step is sampled as sync samples,
    through the same refill loop) counts rounds, and the checkpoint's cursor is the prompts taken: the refills are
    sampled at step time, the next batch after them. Async drops a flat group as it is scored and starts another
    prompt in its place, within the same bound."""
    from rlhf_ray.config import load_config
    from rlhf_ray.jobs import rl

    out = tmp_path / "dapo"
    cfg = load_config(REPO / "examples" / "grpo_tiny_cpu.yaml", values={
        "model.path": tiny_model_dir, "train.output_dir": str(out), "algo.total_steps": 3,
        "algo.prompts_per_step": 4, "rollout.n_samples": 4, "learner.micro_batch_size": 8,
        "algo.filter_groups": True, "algo.max_filter_rounds": 2, "logging.progress_bar": False,
        "rollout.mode": mode})
    rl.run(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 3
    for r in rows:
        assert r["filter/kept_groups"] + r["filter/topped_up_groups"] == 4  # the batch shape holds
        assert r["rollout/sequences"] == 16
        assert r["rollout/staleness"] <= 1
        if mode != "async":
            assert 0 <= r["filter/rounds"] <= 2
            # round 0 takes 4 prompts, each later round the shortfall of varied groups
            assert 4 <= r["filter/prompts_taken"] <= 4 + 2 * 4
            assert r["filter/dropped_groups"] >= r["filter/topped_up_groups"]
    # chance 0.03: all-zero groups are the common case, so refills happen
    assert sum(r["filter/dropped_groups"] for r in rows) > 0, rows
    if mode == "async":  # at most 2 step batches of refills per step admitted (3 steps: 2 * 4 * 3)
        assert sum(r["filter/dropped_groups"] for r in rows) <= 2 * 4 * 3
        return
    assert any(r["filter/rounds"] > 0 for r in rows), rows
    state = json.loads((out / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["prompts_taken"] == sum(r["filter/prompts_taken"] for r in rows)


def test_grpo_with_a_generative_judge_on_its_own_engines(ray_cluster, tiny_model_dir, tmp_path):
    """reward.judge (RLAIF) with the tiny model as judge, on its own vLLM engine (role judge, placement separate):
    2 GRPO steps. The random judge writes random text, so verdicts without a digit score the default and are
    counted; the check is that the judge engines ran on every step and their scores reached the reward."""
    out = tmp_path / "judged"
    code = cli_main(["train", str(REPO / "examples/grpo_tiny_cpu.yaml"), f"model.path={tiny_model_dir}",
                     f"reward.judge.model={tiny_model_dir}", "reward.judge.template='Q {prompt} A {response} Score: '",
                     r"reward.judge.score_pattern=(\d)", "reward.judge.min_score=0", "reward.judge.max_score=9",
                     "reward.judge.on_unparsable=default", "reward.judge.default_score=4.5",
                     "reward.judge.max_new_tokens=4", "reward.judge.max_model_len=128", "reward.judge.enforce_eager=true",
                     "algo.total_steps=2", "algo.prompts_per_step=4", "rollout.n_samples=4",
                     "learner.micro_batch_size=8", f"train.output_dir={out}", "logging.progress_bar=false"])
    assert code == 0
    report = json.loads((out / "placement.json").read_text())
    assert len(report["roles"]["judge"]) == 1
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2
    for r in rows:
        assert r["timing/judge_s"] > 0
        assert r["reward/judge_unparsable"] == int(r["reward/judge_unparsable"])
        assert 0 <= r["reward/judge_unparsable"] <= r["rollout/sequences"] == 16
        # each unparsable verdict scores the default 4.5 / 9 = 0.5, each parsed one digit / 9 in [0, 1]
        bad = r["reward/judge_unparsable"]
        assert 0.5 * bad / 16 - 1e-6 <= r["reward/judge_mean"] <= (0.5 * bad + (16 - bad)) / 16 + 1e-6
