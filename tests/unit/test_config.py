"""The typed config tree: loading, overrides, and a clear error for each kind of bad value."""

import subprocess
import sys

import pytest
import yaml

from rlhf_ray.config import Config, ConfigError, load_config, to_dict


def write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, {"model": {"path": "m"}, "optim": {"lr": "2e-5"}})
    cfg = load_config(p, ["learner.num_workers=2", "learner.global_batch_size=16", "train.max_steps=7"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == 2e-5  # YAML reads "2e-5" as a string; the loader converts it
    assert cfg.learner.num_workers == 2 and cfg.learner.global_batch_size == 16
    assert cfg.learner.grad_accum_steps == 16 // (4 * 2)
    assert cfg.train.max_steps == 7
    assert cfg.data.path == "demo:arithmetic"  # default defined once in schema.py


def test_unknown_key_suggests_closest(tmp_path):
    p = write(tmp_path, {"model": {"path": "m"}, "optim": {"learning_rate": 1e-5}})
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"Did you mean 'micro_batch_size'"):
        load_config(write(tmp_path, {"model": {"path": "m"}, "learner": {"micro_batchsize": 2}}))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'lerner'.*Did you mean 'learner'"):
        load_config(write(tmp_path, {"model": {"path": "m"}, "lerner": {}}))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"learner.num_workers: expected an integer, got 'two'"):
        load_config(write(tmp_path, {"model": {"path": "m"}, "learner": {"num_workers": "two"}}))
    with pytest.raises(ConfigError, match=r"train.resume: expected true/false"):
        load_config(write(tmp_path, {"model": {"path": "m"}}), ["train.resume=maybe"])
    with pytest.raises(ConfigError, match=r"learner.zero_stage: must be one of \[0, 1, 2, 3\], got 4"):
        load_config(write(tmp_path, {"model": {"path": "m"}}), ["learner.zero_stage=4"])


def test_out_of_range_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.lr: must be > 0"):
        load_config(write(tmp_path, {"model": {"path": "m"}, "optim": {"lr": -1}}))
    with pytest.raises(ConfigError, match=r"learner.global_batch_size: must be a multiple of .* = 8, got 12"):
        load_config(write(tmp_path, {"model": {"path": "m"}}),
                    ["learner.num_workers=2", "learner.micro_batch_size=4", "learner.global_batch_size=12"])
    with pytest.raises(ConfigError, match=r"model.lora.rank: must be > 0"):
        load_config(write(tmp_path, {"model": {"path": "m", "lora": {"enabled": True, "rank": 0}}}))


def test_missing_required(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required config key 'model'"):
        load_config(write(tmp_path, {"job": "sft"}))


def test_missing_file():
    with pytest.raises(ConfigError, match=r"config file not found: /nonexistent.yaml"):
        load_config("/nonexistent.yaml")


def test_roundtrip_resolved_config(tmp_path):
    cfg = load_config(write(tmp_path, {"model": {"path": "m"}}), ["learner.zero_stage=3"])
    again = load_config(values=to_dict(cfg))
    assert again == cfg


def test_cli_config_error_is_one_line(tmp_path):
    """A bad key exits with code 2 and a message naming it: no traceback from a worker."""
    p = write(tmp_path, {"model": {"path": "m"}, "learner": {"num_wrkers": 2}})
    proc = subprocess.run([sys.executable, "-m", "rlhf_ray", "validate", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "config error: unknown config key 'learner.num_wrkers'. Did you mean 'num_workers'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_qlora_needs_lora_bitsandbytes_and_unpartitioned_weights(tmp_path, monkeypatch):
    qlora = {"model": {"path": "m", "lora": {"enabled": True, "load_in_4bit": True}}}
    assert load_config(write(tmp_path, qlora), ["learner.zero_stage=2"]).model.lora.load_in_4bit
    with pytest.raises(ConfigError, match=r"model.lora.load_in_4bit: QLoRA trains LoRA adapters .* "
                                          r"set model.lora.enabled=true"):
        load_config(write(tmp_path, qlora), ["model.lora.enabled=false"])
    with pytest.raises(ConfigError, match=r"learner.zero_stage: ZeRO-3 partitions parameters"):
        load_config(write(tmp_path, qlora), ["learner.zero_stage=3"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model.lora.load_in_4bit: needs bitsandbytes \(pip install bitsandbytes\)"):
        load_config(write(tmp_path, qlora))
