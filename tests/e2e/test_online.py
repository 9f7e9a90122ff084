"""Best-of-N and online DPO on the real stack: vLLM CPU engines in Ray actors, rewards, DeepSpeed learners."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_ray.cli import main as cli_main
from rlhf_ray.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]

# A dense reward a tiny random-init model can move within a few rounds: shorter responses score higher
# (1.0 for an empty response, 0.0 at 8 characters or more).
SHORT = "def reward_fn(prompts, responses, **_):\n    return [1.0 - min(len(r), 8) / 8 for r in responses]\n"


def test_best_of_n_beats_plain_sampling_and_writes_an_sft_set(ray_cluster, tiny_model_dir, trained_rm, tmp_path,
                                                              capsys):
    """Scored by the trained reward model plus a reward file; the selection is an SFT data set sft validates."""
    reward = tmp_path / "short.py"
    reward.write_text(SHORT)
    out = tmp_path / "bon"
    code = cli_main(["train", str(REPO / "examples/best_of_n_tiny_cpu.yaml"), f"model.path={tiny_model_dir}",
                     f"reward.functions=[{reward}]", "reward.weights=[1.0]",
                     f"reward.model={trained_rm[1]['final_model']}", "reward.gpus_per_worker=0",
                     "data.demo_size=32", f"train.output_dir={out}", "ray.num_cpus=null"])
    assert code == 0, capsys.readouterr().err[-2000:]
    stats = read_metrics(out / "metrics.jsonl")[0]
    assert stats["best_of_n/samples"] == 32 * 8 and stats["best_of_n/rows_written"] == 32
    assert stats["best_of_n/selected_reward_mean"] > stats["best_of_n/sampled_reward_mean"] + 0.05, stats
    rows = [json.loads(line) for line in (out / "best_of_n.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and all({"prompt", "response", "reward", "answer"} <= set(r) for r in rows)
    mean = sum(r["reward"] for r in rows) / len(rows)
    assert abs(mean - stats["best_of_n/selected_reward_mean"]) < 1e-5
    # The written file is a valid SFT data set for the next job.
    assert cli_main(["validate", str(REPO / "examples/sft_tiny_cpu.yaml"), f"model.path={tiny_model_dir}",
                     f"data.path={out / 'best_of_n.jsonl'}", "data.eval_fraction=0"]) == 0
    assert "config OK: job=sft" in capsys.readouterr().out


def test_online_dpo_rounds_raise_the_reward_and_resume(ray_cluster, tiny_model_dir, tmp_path, capsys):
    """Several rounds of generate -> label -> DPO step -> weight sync; the labelled reward rises. Resumed from
    its last checkpoint with two more rounds, the run continues from the trained policy (the new engines get
    the checkpoint's weights), not from the base model."""
    reward = tmp_path / "short.py"
    reward.write_text(SHORT)
    out = tmp_path / "odpo"
    code = cli_main(["train", str(REPO / "examples/online_dpo_tiny_cpu.yaml"), f"model.path={tiny_model_dir}",
                     f"reward.functions=[{reward}]", "rollout.max_new_tokens=8", "algo.total_steps=12",
                     "optim.lr=2e-3", "dpo.beta=0.5", f"train.output_dir={out}", "logging.progress_bar=false",
                     "ray.num_cpus=null"])
    assert code == 0, capsys.readouterr().err[-2000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    rewards = [r["rollout/reward_mean"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, [round(x, 3) for x in rewards]
    assert all(r["online_dpo/pairs"] > 0 and r["online_dpo/update_skipped"] == 0 for r in rows)
    assert all(k in rows[-1] for k in ("actor/dpo_loss", "actor/reward_accuracy", "actor/margin", "timing/reference_s",
                                       "timing/weight_sync_s", "weight_sync/bytes"))
    assert (out / "final" / "model.safetensors").is_file()

    code = cli_main(["train", str(out / "config.yaml"), "train.resume=true", "algo.total_steps=14"])
    assert code == 0, capsys.readouterr().err[-2000:]
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 15))
    assert resumed[:12] == rows  # the first run's lines are kept as they were
    after = [r["rollout/reward_mean"] for r in resumed[12:]]
    assert min(after) > sum(rewards[:3]) / 3 + 0.1, (rewards, after)
