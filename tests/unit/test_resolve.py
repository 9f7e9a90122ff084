"""The resolved config: derived once, never written into the user's config, recorded in config.yaml; the name
tables config and algos share agree with the algorithm registries."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_ray.config import ConfigError, load_config, resolve, save_config, to_dict

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")
                                            if not p.name.startswith("pipeline_")))  # test_pipeline loads those
def test_resolving_writes_nothing_into_the_config(example):
    cfg = load_config(EXAMPLES / example, ["model.path=m"])
    before = to_dict(cfg)
    resolved = resolve(cfg)
    assert to_dict(cfg) == before
    # What the loaders left unset stays unset: the derived values live in Resolved only.
    assert cfg.learner.global_batch_size == before["learner"]["global_batch_size"]
    assert resolved.policy.learner.global_batch_size == resolved.batch.per_update if resolved.job not in ("best_of_n", "eval") \
        else resolved.role("rollout") is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.batch.per_step = 1  # type: ignore[misc]


def test_config_yaml_records_given_and_resolved_and_loads_back(tmp_path):
    cfg = load_config(values={"job": "grpo", "model.path": "m", "reward.functions": ["builtin:math"],
                              "algo.mini_batches": 2})
    resolved = resolve(cfg, "cpu")
    save_config(cfg, tmp_path / "config.yaml", resolved)
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["algo"]["advantage"] is None and data["learner"]["global_batch_size"] is None  # as given
    r = data["resolved"]
    assert r["rl"]["advantage"] == "grpo" and r["rl"]["old_logprobs"] == "learner"
    assert r["batch"]["per_update"] == cfg.algo.prompts_per_step * cfg.rollout.n_samples // 2
    assert r["sync"]["backend"] == "gloo" and r["accelerator"] == "cpu"
    assert set(r["roles"]) == {"actor", "rollout"}
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_sync_backend_is_chosen_at_resolution():
    values = {"job": "grpo", "model.path": "m", "reward.functions": ["builtin:math"], "learner.gpus_per_worker": 1}
    cfg = load_config(values=values)
    assert resolve(cfg, "cuda").sync.backend == "nccl" and resolve(cfg, "cpu").sync.backend == "gloo"
    assert resolve(cfg, "cpu").policy.dtype == "float32" and resolve(cfg, "cuda").policy.dtype == "bfloat16"
    nccl = load_config(values={**values, "rollout.weight_sync_backend": "nccl"})
    with pytest.raises(ConfigError, match="rollout.weight_sync_backend: nccl needs CUDA learners"):
        resolve(nccl, "cpu")


def test_config_and_name_tables_import_without_torch():
    code = ("import sys, rlhf_ray.config, rlhf_ray.algos.names; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_name_tables_match_the_registries():
    import typing

    from rlhf_ray.algos import names
    from rlhf_ray.algos.advantages import ADVANTAGES
    from rlhf_ray.algos.kl import KL_ESTIMATORS
    from rlhf_ray.algos.policy_loss import POLICY_LOSSES
    from rlhf_ray.algos.preference import PREFERENCE_LOSSES
    from rlhf_ray.config.job_sections import AlgoConfig, DPOConfig

    assert set(ADVANTAGES) == set(names.ADVANTAGE_ESTIMATORS) >= names.GROUP_BASED | names.NEEDS_CRITIC
    assert set(POLICY_LOSSES) == set(names.POLICY_LOSS_NAMES)
    assert set(KL_ESTIMATORS) == set(names.KL_ESTIMATOR_NAMES)
    assert set(PREFERENCE_LOSSES) == set(names.PREFERENCE_LOSS_NAMES)
    assert {n for n, loss in PREFERENCE_LOSSES.items() if not loss.uses_reference} == \
        names.REFERENCE_FREE_PREFERENCE_LOSSES
    hints = typing.get_type_hints(AlgoConfig)
    assert typing.get_args(typing.get_args(hints["advantage"])[0]) == names.ADVANTAGE_ESTIMATORS
    assert typing.get_args(typing.get_type_hints(DPOConfig)["loss"]) == names.PREFERENCE_LOSS_NAMES


def test_resuming_another_job_model_or_data_is_refused_before_anything_starts(tmp_path):
    from rlhf_ray.checkpoint import CheckpointDir
    from rlhf_ray.jobs.common import check_resume

    ckpt = CheckpointDir(tmp_path)
    ckpt.staging(2)
    ckpt.finalize(2, {"step": 2, "job": "sft", "model": "/elsewhere/model", "data": {"path": "d.jsonl", "items": 10}})
    values = {"model.path": "/elsewhere/model", "data.path": "d.jsonl", "train.output_dir": str(tmp_path),
              "train.resume": True}
    with pytest.raises(ConfigError, match=r"train.resume: the latest checkpoint in .* \(step_000002\) is of job sft, "
                                          r"not dpo"):
        check_resume(resolve(load_config(values={**values, "job": "dpo"})), 10)
    check_resume(resolve(load_config(values=values)), 10)  # the same job, model and data
    with pytest.raises(ConfigError, match=r"was trained on another model.path and data: model.path /elsewhere/model "
                                          r"-> /mine; data .*'items': 10.* -> .*'items': 12"):
        check_resume(resolve(load_config(values={**values, "model.path": "/mine"})), 12)
    check_resume(resolve(load_config(values={**values, "model.path": "/mine", "train.resume_mismatch_ok": True})), 12)


def test_a_missing_local_model_dir_is_named_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    from rlhf_ray.jobs.common import check_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    cfg = load_config(values={"model.path": "runs/tiny-model"})
    with pytest.raises(ConfigError, match=r"model.path: 'runs/tiny-model' does not exist \(its directory 'runs' does"):
        check_paths(resolve(cfg))
    check_paths(resolve(load_config(values={"model.path": "Qwen/Qwen2.5-0.5B"})))  # a hub name stays one


def test_one_run_per_output_dir_and_no_resume_that_would_drop_metrics(tmp_path):
    from rlhf_ray.jobs.common import OutputDirLock, check_output_dir

    with OutputDirLock(str(tmp_path)):
        with pytest.raises(ConfigError, match=r"train.output_dir: another run \(pid \d+\) is using"):
            OutputDirLock(str(tmp_path)).__enter__()
    with OutputDirLock(str(tmp_path)):  # released when the first run ended
        pass
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = load_config(values={"model.path": "m", "train.output_dir": str(tmp_path), "train.resume": True})
    with pytest.raises(ConfigError, match="train.resume: .* has no complete checkpoint to resume from"):
        check_output_dir(resolve(cfg))


# ---- evaluation settings and train.keep_best ----------------------------------------------------------------

def _rl(job="grpo", **values):
    return load_config(values={"job": job, "model.path": "m", "reward.functions": ["builtin:math"],
                               "rollout.n_samples": 4, "rollout.temperature": 0.7, **values})


def test_training_evaluates_one_greedy_response_unless_told_to_sample():
    ev = resolve(_rl()).evaluation
    assert (ev.n, ev.temperature, ev.ks) == (1, 0.0, (1,))        # as before: one greedy response per prompt
    ev = resolve(_rl(**{"eval.n_samples": 8})).evaluation
    assert (ev.n, ev.temperature, ev.ks) == (8, 0.7, (1, 8))      # sampled at the rollout temperature
    ev = resolve(_rl(**{"eval.n_samples": 8, "eval.temperature": 1.0, "eval.ks": [2]})).evaluation
    assert (ev.n, ev.temperature, ev.ks) == (8, 1.0, (2,))
    ev = resolve(_rl("eval")).evaluation                          # job eval: its rollout section is the eval's
    assert (ev.n, ev.temperature, ev.ks) == (4, 0.7, (1, 4))
    assert resolve(load_config(values={"job": "sft", "model.path": "m"})).evaluation is None


@pytest.mark.parametrize("values, expected", [
    ({"eval.ks": [2]}, "eval.ks: k=2 is more than the eval.n_samples=1 samples per prompt"),
    ({"eval.n_samples": 4, "eval.temperature": 0.0}, "eval.temperature: 0 is greedy decoding, which makes the "
                                                     "eval.n_samples=4 samples"),
    ({"train.keep_best": "eval/pass@2", "train.eval_every": 2, "data.eval_fraction": 0.1},
     "train.keep_best: the evaluation of job grpo logs no 'eval/pass@2'; it logs eval/reward_mean"),
    ({"train.keep_best": "rollout/reward_mean", "train.eval_every": 2, "data.eval_fraction": 0.1},
     "train.keep_best: names a held-out eval metric (eval/...)"),
    ({"train.keep_best": "eval/pass@1", "data.eval_fraction": 0.1}, "train.keep_best: the best model is chosen "
                                                                    "among the evaluations; set train.eval_every"),
    ({"train.keep_best": "eval/pass@1", "train.eval_every": 2}, "train.keep_best: needs a held-out set"),
    ({"train.keep_best": "eval/pass@1", "job": "eval"}, "train.keep_best: job eval trains no model"),
    ({"eval.n_samples": 0}, "eval.n_samples: must be >= 1"),
])
def test_bad_eval_and_keep_best_settings_name_the_key(values, expected):
    with pytest.raises(ConfigError) as err:
        _rl(**values)
    assert expected in str(err.value), str(err.value)


def test_keep_best_resolves_its_direction():
    base = {"train.eval_every": 2, "data.eval_fraction": 0.1}
    assert resolve(_rl(**base, **{"train.keep_best": "eval/pass@1"})).best.mode == "max"
    assert resolve(_rl(**base, **{"train.keep_best": "eval/reward/math_mean"})).best.mode == "max"  # a source's mean
    sft = load_config(values={"job": "sft", "model.path": "m", **base, "train.keep_best": "eval/loss"})
    assert resolve(sft).best.mode == "min"                         # offline keys are checked at the first eval
    assert resolve(_rl(**base, **{"train.keep_best": "eval/response_length_mean", "train.keep_best_mode": "min"})
                   ).best.mode == "min"


def test_eval_metric_names_are_what_summarize_returns():
    from rlhf_ray.evaluation.summary import EvalSettings, SampleSet, eval_metric_names, summarize

    settings = EvalSettings(n=2, temperature=1.0, top_p=1.0, max_new_tokens=2, ks=(1, 2), correct_threshold=1.0,
                            vote_on="response", greedy=True)
    s = SampleSet()
    s.add([0, 0], ["1", "2"], [1.0, 0.0], [1, 1], ["stop", "stop"], {})
    logged = [f"eval/{k}" for k in summarize(s, settings, settings.ks)]
    logged += [f"eval/greedy/{k}" for k in summarize(s, settings, ())]
    assert sorted(eval_metric_names(settings)) == sorted(logged)
