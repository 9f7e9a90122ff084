"""``rlhf-ray eval`` refuses bad input with one line naming the key, row or file (exit code 2), before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_ray.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = str(REPO / "examples" / "eval_tiny_cpu.yaml")


@pytest.fixture()
def prompts(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Repeat the number {i}.", "answer": str(i)}) + "\n"
                            for i in range(6)))
    return data


def _eval(capsys, tiny_model_dir, tmp_path, *overrides) -> tuple[int, str]:
    code = main(["eval", EXAMPLE, f"model.path={tiny_model_dir}", f"train.output_dir={tmp_path / 'out'}", *overrides])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("overrides, expected", [
    (["eval.ks=[1,9]"], "config error: eval.ks: k=9 is more than the rollout.n_samples=8 samples per prompt"),
    (["eval.ks=[0]"], "config error: eval.ks: each k must be >= 1"),
    (["eval.ks=[2,2]"], "config error: eval.ks: lists a k twice"),
    (["eval.vote_on=answer"], "config error: eval.vote_on: must be one of ['math_answer', 'response']"),
    (["eval.correct_threshold=.nan"], "config error: eval.correct_threshold: must be a finite number"),
    (["rollout.temperature=0"], "config error: rollout.temperature: 0 is greedy decoding"),
    (["reward.functions=[]"], "config error: reward.functions: job eval needs a reward"),
    (["job=sft"], "config error: job: rlhf-ray eval runs job eval"),
])
def test_bad_eval_settings_name_the_key(tiny_model_dir, tmp_path, capsys, overrides, expected):
    code, err = _eval(capsys, tiny_model_dir, tmp_path, *overrides)
    assert code == 2 and err.startswith(expected) and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # refused before the output directory (or Ray) was touched


def test_a_prompt_row_without_its_field_is_named(tiny_model_dir, tmp_path, capsys, prompts):
    lines = prompts.read_text().splitlines()
    lines[3] = json.dumps({"question": "Repeat the number 3.", "answer": "3"})
    prompts.write_text("\n".join(lines) + "\n")
    code, err = _eval(capsys, tiny_model_dir, tmp_path, f"data.path={prompts}")
    assert code == 2 and err.startswith(f"data error: {prompts}:4:") and "'prompt'" in err, err


def test_a_row_without_the_answer_builtin_math_grades_against_is_named(tiny_model_dir, tmp_path, capsys, prompts):
    lines = prompts.read_text().splitlines()
    lines[2] = json.dumps({"prompt": "Repeat the number 2."})
    prompts.write_text("\n".join(lines) + "\n")
    code, err = _eval(capsys, tiny_model_dir, tmp_path, f"data.path={prompts}")
    assert code == 2 and err.startswith(f"data error: {prompts}:3: has no 'answer' field (data.answer_field)"), err


def test_a_run_directory_as_the_model_points_at_its_final(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    code, err = main(["eval", EXAMPLE, f"model.path={run}"]), capsys.readouterr().err.strip()
    assert code == 2 and err == (f"config error: model.path: '{run}' is not a model directory (no config.json there); "
                                 f"it holds a run: its model is {run / 'final'}"), err


def test_validate_accepts_the_example_as_job_eval(tiny_model_dir, capsys):
    assert main(["validate", EXAMPLE, f"model.path={tiny_model_dir}"]) == 0
    assert "config OK: job=eval" in capsys.readouterr().out


def test_any_config_runs_as_job_eval(tiny_model_dir, tmp_path, capsys):
    # The GRPO example read by `rlhf-ray eval`: job eval's checks apply to its rollout section (n_samples 16).
    grpo = str(REPO / "examples" / "grpo_tiny_cpu.yaml")
    code = main(["eval", grpo, f"model.path={tiny_model_dir}", f"train.output_dir={tmp_path / 'out'}",
                 "eval.ks=[1,17]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("config error: eval.ks: k=17 is more than the rollout.n_samples=16"), err
