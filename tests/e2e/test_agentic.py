"""Multi-turn agentic RL end to end (``rlhf_ray.agentic``): vLLM CPU engines and DeepSpeed learners in Ray actors,
episodes of several turns with a tool environment and with a user environment file, trained by GRPO, PPO and online
DPO."""

from __future__ import annotations

import textwrap
from pathlib import Path

from rlhf_ray.config import load_config
from rlhf_ray.metrics import read_metrics
from tests.e2e.test_rl import _assert_synced_every_step

REPO = Path(__file__).resolve().parents[2]
LEARNING_STEPS = 60


def test_a_tiny_model_learns_a_two_turn_tool_task_from_reward_alone(ray_cluster, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    """`rlhf-ray train examples/agentic_tiny_cpu.yaml`, 60 of its 100 steps, in this process on the session's Ray: a
    random-init model must call the tool k (a first line `k`, one token; the tool reads the row's secret bit), then
    answer with the bit from the tool's turn. Reward (examples/rewards/tool_use.py): 0.5 for looking it up and
    answering, 0.5 more for the right answer.

    Chance is ~0.004: the call is one token of 128 (P ~ 1/128), and the right answer after it another (1/128).
    A policy that calls the tool and then guesses a bit is capped at 0.75 (the bits are equally frequent), so a
    mean above 0.9 over the last 10 steps needs the answer taken from the tool's result in >= 80% of episodes.
    The same run is the multi-turn check of the learner-vs-vLLM log-prob gap (< 1e-3 after every sync) on
    trajectories with an observation in the middle (loss mask 0), and of the held-out evaluation running episodes
    too (greedy, every 30 steps and before the first)."""
    from rlhf_ray.jobs import rl

    monkeypatch.chdir(REPO)  # the example names its tool and reward files relative to the repo
    out = tmp_path / "agentic"
    cfg = load_config(REPO / "examples" / "agentic_tiny_cpu.yaml", values={
        "model.path": tiny_model_dir, "train.output_dir": str(out), "algo.total_steps": LEARNING_STEPS,
        "data.eval_fraction": 0.05, "train.eval_every": 30, "logging.progress_bar": False})
    rl.run(cfg)
    every = read_metrics(out / "metrics.jsonl")
    rows = [r for r in every if "rollout/reward_mean" in r]
    evals = [r for r in every if "eval/reward_mean" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[0]["eval/reward_mean"] < 0.1 and evals[-1]["eval/reward_mean"] > 0.9, evals
    rewards = [r["rollout/reward_mean"] for r in rows]
    assert len(rewards) == LEARNING_STEPS
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    assert first < 0.05 and last > 0.9, [round(x, 2) for x in rewards]
    late = rows[-10:]
    assert all(r["env/turns_mean"] > 1.9 and r["env/tool_calls_mean"] > 0.9 for r in late), late[-1]
    assert all(r["env/tool_errors"] == 0 and r["env/failed"] == 0 and r["env/seconds"] >= 0 for r in rows)
    _assert_synced_every_step(rows)  # measured on two-turn trajectories from the step the tool is called on


GUESS_ENV = '''
    class Env:
        """The model must say the row's number; a wrong say gets "no" and another turn. Rows whose number is odd
        break the environment at the first step (rollout.on_env_error: zero_reward ends them)."""

        async def reset(self, row):
            self.answer = row["answer"]
            return None  # the row's prompt

        async def step(self, response):
            if int(self.answer) % 2:
                raise RuntimeError("odd numbers are not allowed")
            hit = self.answer in response
            return ("no" if not hit else None), float(hit), hit
'''


def test_ppo_trains_on_episodes_of_an_environment_that_is_the_only_reward(ray_cluster, tiny_model_dir, tmp_path):
    """job: ppo (critic, GAE over the model's tokens) with an async environment file and no reward function, 3 turns
    of at most 4 tokens; an environment failing on some rows ends those trajectories with reward 0, counted.
    rollout.mode one_step_off: step 2 trains on episodes a thread drove through the engines while step 1 trained."""
    from rlhf_ray.jobs import rl

    env_file = tmp_path / "guess_env.py"
    env_file.write_text(textwrap.dedent(GUESS_ENV))
    out = tmp_path / "ppo-env"
    cfg = load_config(REPO / "examples" / "ppo_tiny_cpu.yaml", values={
        "model.path": tiny_model_dir, "train.output_dir": str(out), "data.path": "demo:repeat_number",
        "reward.model": None, "reward.functions": [], "rollout.env": str(env_file), "rollout.max_turns": 3,
        "rollout.max_new_tokens": 4, "rollout.on_env_error": "zero_reward", "algo.total_steps": 2,
        "algo.kl_coef": 0.0, "algo.adaptive_kl_target": None, "critic.num_workers": 1, "learner.num_workers": 1,
        "logging.progress_bar": False, "rollout.mode": "one_step_off"})
    rl.run(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["rollout/staleness"] for r in rows] == [0, 1]
    for r in rows:
        for key in ("critic/value_loss", "actor/pg_loss", "env/turns_mean", "env/reward_mean", "reward/env_mean"):
            assert key in r, key
        assert 1.0 <= r["env/turns_mean"] <= 3.0 and r["env/turns_max"] <= 3.0
        assert r["env/failed"] % 4 == 0  # every sample (n_samples 4) of a row whose number is odd
        assert abs(r["rollout/reward_mean"] - r["env/reward_mean"]) < 1e-6  # the environment is the only reward
    assert sum(r["env/failed"] for r in rows) > 0  # 16 prompts of the digits 0-9: some are odd
    # step 1's episodes came from the weights the learner holds: its log-probs of them equal vLLM's (step 2's
    # are one update old; the learning test checks the gap on every step of a sync run)
    assert rows[0]["rollout/logprob_diff_learner_vllm"] < 1e-3


def test_online_dpo_pairs_episodes_with_observations_outside_the_loss(ray_cluster, tiny_model_dir, tmp_path):
    """job: online_dpo on episodes of the environment above (the only reward: 1 for a turn that says the row's
    number): 4 samples per prompt, at most 3 turns of 4 tokens, a wrong turn answered "no" (an observation of ~20
    tokens in the ChatML markup). A prompt's best and worst episodes make its pair; a missed episode (the rejected
    side) always runs 3 turns with 2 observations, so every pair holds observation tokens.

    The learners' DPO log-prob sums must count exactly the tokens the engines sampled in the pairs' sequences
    (fewer than their completions hold), and equal the engines' own log-probs of them before the update (< 1e-3 per
    token: an observation token counted, or a mask off by one, moves the sum by ~log(1/128) = -4.9 per token)."""
    import torch
    from safetensors.torch import load_file

    from rlhf_ray.jobs import get_job

    env_file = tmp_path / "guess_env.py"
    env_file.write_text(textwrap.dedent(GUESS_ENV))
    out = tmp_path / "odpo-env"
    cfg = load_config(REPO / "examples" / "online_dpo_tiny_cpu.yaml", values={
        "model.path": tiny_model_dir, "train.output_dir": str(out), "data.apply_chat_template": True,
        "data.max_prompt_length": 64,
        "reward.functions": [], "rollout.env": str(env_file), "rollout.max_turns": 3, "rollout.max_new_tokens": 4,
        "rollout.on_env_error": "zero_reward", "algo.total_steps": 3, "learner.num_workers": 1,
        "learner.micro_batch_size": 16, "logging.progress_bar": False})
    get_job("online_dpo").run(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("env/turns_mean", "env/turns_max", "env/tool_calls_mean", "env/failed", "env/reward_mean"):
            assert key in r, key
        assert 1.0 <= r["env/turns_mean"] <= 3.0 and r["env/turns_max"] == 3.0
        assert abs(r["rollout/reward_mean"] - r["env/reward_mean"]) < 1e-6  # the environment is the only reward
    updated = [r for r in rows if r["online_dpo/update_skipped"] == 0]
    assert updated, [(r["online_dpo/pairs"], r["online_dpo/ties_skipped"]) for r in rows]
    for r in updated:
        assert r["online_dpo/loss_tokens"] == r["online_dpo/sampled_tokens"], r
        assert r["online_dpo/completion_tokens"] > r["online_dpo/sampled_tokens"] + 30 * r["online_dpo/pairs"], r
        assert r["online_dpo/logprob_diff_learner_vllm"] < 1e-3, r
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not change"
