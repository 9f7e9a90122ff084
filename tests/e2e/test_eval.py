"""`rlhf-ray eval` on the real stack: vLLM CPU engines as Ray actors sample, the built-in math reward scores, and
eval.json's numbers agree with the samples it wrote (eval_samples.jsonl), recounted here."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest

from rlhf_ray.metrics import read_metrics

SAMPLED_KEYS = {"reward_mean", "reward_std", "accuracy", "response_length_mean", "truncated_fraction",
                "reward/math_mean", "pass@1", "pass@2", "pass@8", "maj@1", "maj@2", "maj@8"}


def _samples(run_dir: Path, greedy: bool) -> dict[int, list[dict]]:
    by_prompt = defaultdict(list)
    for line in (run_dir / "eval_samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["greedy"] == greedy:
            by_prompt[row["prompt_index"]].append(row)
    return by_prompt


def test_eval_reports_pass_and_maj_at_k_that_match_its_samples(eval_tiny_run, tiny_model_dir):
    run_dir = eval_tiny_run.run_dir
    doc = json.loads((run_dir / "eval.json").read_text())
    assert doc["model"] == str(Path(tiny_model_dir).resolve()) and doc["data"] == "demo:repeat_number"
    assert doc["prompts"] == 64
    s = doc["settings"]
    assert (s["n"], s["temperature"], s["ks"], s["correct_threshold"], s["vote_on"], s["greedy"]) == (
        8, 1.0, [1, 2, 8], 1.0, "math_answer", True)
    assert doc["reward"]["functions"] == ["builtin:math"]
    sampled, greedy = doc["sampled"], doc["greedy"]
    assert set(sampled) == SAMPLED_KEYS, sorted(sampled)
    assert set(greedy) == SAMPLED_KEYS - {"pass@1", "pass@2", "pass@8", "maj@1", "maj@2", "maj@8"}

    groups = _samples(run_dir, greedy=False)
    assert sorted(groups) == list(range(64)) and all(len(g) == 8 for g in groups.values())
    rows = [r for g in groups.values() for r in g]
    assert all(r["correct"] == (r["reward"] >= 1.0) for r in rows)
    # Recounted from the samples: pass@1 is the mean of per-sample correctness (1 - C(n-c,1)/C(n,1) = c/n per
    # prompt, every prompt with n = 8); pass@8 the fraction of prompts with any correct sample (C(n-c,8)/C(8,8) is 0
    # or 1); pass@2 per prompt 1 - (n-c)(n-c-1) / (n(n-1)).
    correct = {p: sum(r["correct"] for r in g) for p, g in groups.items()}
    assert sampled["pass@1"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows), abs=1e-9)
    assert sampled["accuracy"] == pytest.approx(sampled["pass@1"], abs=1e-9)
    assert sampled["pass@8"] == pytest.approx(sum(c > 0 for c in correct.values()) / 64, abs=1e-9)
    assert sampled["pass@2"] == pytest.approx(sum(1 - (8 - c) * (7 - c) / 56 for c in correct.values()) / 64, abs=1e-9)
    assert sampled["pass@1"] <= sampled["pass@2"] <= sampled["pass@8"]
    # A vote of one is that sample's answer: maj@1 = pass@1 (a sample without an answer scores 0 under builtin:math)
    assert sampled["maj@1"] == pytest.approx(sampled["pass@1"], abs=1e-9)
    # maj@8 votes once over all 8: per prompt, the share correct among the most-given answers' samples
    maj8 = []
    for g in groups.values():
        votes = defaultdict(list)
        for r in g:
            if r["answer"] is not None:
                votes[r["answer"]].append(r["correct"])
        top = max((len(v) for v in votes.values()), default=0)
        tied = [v for v in votes.values() if len(v) == top and top]
        maj8.append(sum(sum(v) / len(v) for v in tied) / len(tied) if tied else 0.0)
    assert sampled["maj@8"] == pytest.approx(sum(maj8) / 64, abs=1e-9)
    assert sampled["reward_mean"] == pytest.approx(sum(r["reward"] for r in rows) / len(rows), abs=1e-6)
    assert sampled["reward/math_mean"] == pytest.approx(sampled["reward_mean"], abs=1e-6)  # one source, weight 1
    assert sampled["response_length_mean"] == pytest.approx(sum(r["response_length"] for r in rows) / len(rows))
    assert 0 < sampled["response_length_mean"] <= 2  # rollout.max_new_tokens: 2
    # A correct sample's extracted answer is the prompt's number ("Repeat the number 7." -> "7").
    assert all(r["answer"] == r["prompt"].split()[-1].rstrip(".") for r in rows if r["correct"])

    greedy_rows = [r for g in _samples(run_dir, greedy=True).values() for r in g]
    assert len(greedy_rows) == 64
    assert greedy["accuracy"] == pytest.approx(sum(r["correct"] for r in greedy_rows) / 64, abs=1e-9)

    # The engines: two Ray actors (the prompts split over them); the table printed; one metrics row at step 0.
    assert len(json.loads((run_dir / "placement.json").read_text())["roles"]["rollout"]) == 2
    table = eval_tiny_run.out
    assert "64 prompts x 8 samples at temperature 1" in table and f"eval.json: {run_dir / 'eval.json'}" in table
    for key in ("pass@8", "maj@8", "reward/math_mean"):
        line = next(ln for ln in table.splitlines() if ln.split() and ln.split()[0] == key)
        assert math.isclose(float(line.split()[1]), sampled[key], abs_tol=5e-5), line
    (row,) = read_metrics(run_dir / "metrics.jsonl")
    assert row["step"] == 0 and row["eval/pass@8"] == sampled["pass@8"]
    assert row["eval/greedy/accuracy"] == greedy["accuracy"]


def test_eval_of_a_runs_final_model(grpo_final_eval, grpo_tiny_run):
    """The README's eval of runs/grpo-tiny/final: the trained export loads in the engines as it is."""
    doc = json.loads((grpo_final_eval.run_dir / "eval.json").read_text())
    assert doc["model"] == str((grpo_tiny_run.run_dir / "final").resolve())
    assert doc["prompts"] == 64 and 0.0 <= doc["sampled"]["pass@1"] <= doc["sampled"]["pass@8"] <= 1.0
