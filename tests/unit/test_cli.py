"""Bad input through the real CLI: one clear line naming the culprit (exit code 2), before any worker starts."""

from __future__ import annotations

import json

import pytest

from rlhf_ray.cli import main


@pytest.fixture()
def base(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(8)))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"job: sft\nmodel:\n  path: {tiny_model_dir}\ndata:\n  path: {data}\n"
                   f"train:\n  output_dir: {tmp_path / 'out'}\n")
    return cfg, data


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_valid_config_validates(base, capsys):
    cfg, _ = base
    assert main(["validate", str(cfg)]) == 0
    assert "config OK: job=sft" in capsys.readouterr().out


@pytest.mark.parametrize("override, expected", [
    (["optim.lrr=1e-4"], "config error: unknown config key 'optim.lrr'. Did you mean 'lr'?"),
    (["learner.num_workers=two"], "config error: learner.num_workers: expected an integer, got 'two'"),
    (["data.path=/nope/missing.jsonl"], "data error: data.path: file '/nope/missing.jsonl' does not exist"),
    (["model.path=/nope/model"], "config error: model.path: '/nope/model' is not a model directory"),
])
def test_bad_config_values(base, capsys, override, expected):
    cfg, _ = base
    for command in ("validate", "train"):
        code, err = _run(capsys, command, str(cfg), *override)
        assert code == 2 and err.startswith(expected) and "\n" not in err, err


def test_malformed_jsonl_line_names_file_and_line(base, capsys):
    cfg, data = base
    lines = data.read_text().splitlines()
    lines[4] = '{"prompt": "broken", "response": '
    data.write_text("\n".join(lines) + "\n")
    code, err = _run(capsys, "train", str(cfg))
    assert code == 2 and err.startswith(f"data error: {data}:5: not valid JSON"), err


def test_empty_data_set(base, capsys):
    cfg, data = base
    data.write_text("")
    code, err = _run(capsys, "train", str(cfg))
    assert code == 2 and err == f"data error: data set {data} has no rows", err


def test_missing_field_names_row_and_field(base, capsys):
    cfg, data = base
    lines = data.read_text().splitlines()
    lines[2] = json.dumps({"prompt": "q2", "answer": "no response field"})
    data.write_text("\n".join(lines) + "\n")
    code, err = _run(capsys, "train", str(cfg))
    assert code == 2 and err.startswith(f"data error: {data}:3:") and "'response'" in err, err


def test_missing_config_file(capsys, tmp_path):
    code, err = _run(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and err == f"config error: config file not found: {tmp_path / 'nope.yaml'}"
