"""The pipeline without a cluster: references, gates (expected values derived by hand beside each assertion), load
errors naming the stage and key, every shipped pipeline file loading, and a rerun over finished stages (their
outputs written here as files) that skips them, checks the gates and writes the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from rlhf_ray.cli import main
from rlhf_ray.pipeline import PipelineError, load_pipeline
from rlhf_ray.pipeline.gates import GateSpec, check_gate, stage_metrics
from rlhf_ray.pipeline.refs import Ref, RefError, check_order, find_refs, substitute

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
DEMO = REPO / "rlhf_ray" / "configs" / "demo_pipeline.yaml"


# ---- references -----------------------------------------------------------------------------------------------

def test_references_are_found_anywhere_and_replaced_in_place():
    value = {"model": {"path": "${sft.final}"}, "reward": {"functions": ["builtin:math", "${bon.output_dir}/r.py"]},
             "n": 3, "note": "plain"}
    assert find_refs(value) == [Ref("sft", "final"), Ref("bon", "output_dir")]
    out = substitute(value, {Ref("sft", "final"): "/p/sft/final", Ref("bon", "output_dir"): "/p/bon"})
    assert out == {"model": {"path": "/p/sft/final"}, "reward": {"functions": ["builtin:math", "/p/bon/r.py"]},
                   "n": 3, "note": "plain"}
    assert find_refs("${ sft.best }") == [Ref("sft", "best")]  # spaces inside the braces are allowed


@pytest.mark.parametrize("text, expected", [
    ("${sft}", "'${sft}' is not a reference of the form ${<stage>.<output>}"),
    ("${sft.model}", "'${sft.model}': a stage's outputs are final, best, output_dir, not 'model'"),
    ("${}", "'${}' is not a reference"),
])
def test_malformed_references(text, expected):
    with pytest.raises(RefError) as err:
        find_refs({"k": [text]})
    assert expected in str(err.value)


@pytest.mark.parametrize("ref, expected", [
    (Ref("grpo", "final"), "'${grpo.final}' refers to this stage itself (a cycle)"),
    (Ref("eval", "final"), "'${eval.final}' is a forward reference: stage 'eval' runs after 'grpo'"),
    (Ref("stf", "final"), "'${stf.final}' names no stage; the stages before 'grpo' are: sft"),
])
def test_references_must_name_an_earlier_stage(ref, expected):
    check_order([Ref("sft", "final")], "grpo", ["sft"], ["eval"])  # an earlier stage: fine
    with pytest.raises(RefError) as err:
        check_order([ref], "grpo", ["sft"], ["eval"])
    assert expected in str(err.value)


# ---- gates ----------------------------------------------------------------------------------------------------

def test_bounds():
    m = {"eval/pass@1": 0.25, "eval/loss": 1.5}
    r = check_gate(GateSpec("eval/pass@1", min=0.2), "s", m)
    assert r.passed and r.value == 0.25 and r.limits == (0.2,) and r.reason == "eval/pass@1 = 0.25 >= 0.2"
    r = check_gate(GateSpec("eval/pass@1", min=0.3), "s", m)
    assert not r.passed and r.reason == "eval/pass@1 = 0.25 < min 0.3"
    r = check_gate(GateSpec("eval/loss", max=1.0), "s", m)
    assert not r.passed and r.reason == "eval/loss = 1.5 > max 1"
    r = check_gate(GateSpec("eval/loss", min=1.0, max=2.0), "s", m)
    assert r.passed and r.rule == "in [1, 2]" and r.limits == (1.0, 2.0)
    assert check_gate(GateSpec("eval/pass@1", min=0.25), "s", m).passed  # the bound itself passes


def test_regression_in_the_direction_the_metric_improves():
    base = {"eval/pass@1": 0.5, "eval/loss": 1.0}
    gate = GateSpec("eval/pass@1", max_regression=0.05, baseline="sft")
    # pass@1 improves upwards: drop = 0.5 - 0.46 = 0.04 <= 0.05 passes; 0.5 - 0.44 = 0.06 > 0.05 fails
    r = check_gate(gate, "dpo", {"eval/pass@1": 0.46}, base)
    assert r.passed and r.baseline_value == 0.5 and r.limits == pytest.approx((0.45,), abs=1e-12)
    assert r.reason == "eval/pass@1 fell 0.04 from 0.5 (stage 'sft') to 0.46, within max_regression 0.05"
    r = check_gate(gate, "dpo", {"eval/pass@1": 0.44}, base)
    assert not r.passed
    assert r.reason == "eval/pass@1 fell 0.06 from 0.5 (stage 'sft') to 0.44, more than max_regression 0.05"
    assert check_gate(gate, "dpo", {"eval/pass@1": 0.9}, base).passed  # better is never a regression
    # a loss improves downwards (the default for a "loss" key): 1.03 - 1.0 = 0.03 passes, 1.06 - 1.0 = 0.06 fails
    loss = GateSpec("eval/loss", max_regression=0.05, baseline="sft")
    assert check_gate(loss, "dpo", {"eval/loss": 1.03}, base).passed
    r = check_gate(loss, "dpo", {"eval/loss": 1.06}, base)
    assert not r.passed and r.limits == pytest.approx((1.05,), abs=1e-12) and " rose 0.06 from 1 " in r.reason
    # mode says otherwise: pass@1 taken as lower-is-better, 0.44 is then 0.06 better than 0.5
    assert check_gate(GateSpec("eval/pass@1", max_regression=0.0, baseline="sft", mode="min"), "dpo",
                      {"eval/pass@1": 0.44}, base).passed


def test_a_number_not_measured_passes_no_gate():
    r = check_gate(GateSpec("eval/pass@1", min=0.0), "eval", {"eval/accuracy": 1.0})
    assert not r.passed and r.reason == "stage 'eval' logged no 'eval/pass@1' (it logged eval/accuracy)"
    r = check_gate(GateSpec("eval/pass@1", min=0.0), "eval", {"eval/pass@1": math.nan})
    assert not r.passed and "is not a finite number" in r.reason
    r = check_gate(GateSpec("eval/pass@1", max_regression=1.0, baseline="sft"), "eval", {"eval/pass@1": 0.5}, {})
    assert not r.passed and "baseline stage 'sft' has no finite 'eval/pass@1'" in r.reason


@pytest.mark.parametrize("values, expected", [
    ({"metric": "eval/pass@1"}, "checks nothing"),
    ({"metric": "eval/pass@1", "min": 0.5, "max": 0.4}, "min 0.5 is above max 0.4"),
    ({"metric": "eval/pass@1", "max_regression": 0.1}, "baseline: max_regression and baseline go together"),
    ({"metric": "eval/pass@1", "max_regression": -0.1, "baseline": "a"}, "max_regression: must be >= 0"),
    ({"metric": "train/loss", "max_regression": 0.1, "baseline": "a"}, "compares held-out evaluations"),
    ({"metric": "eval/pass@1", "min": 0.1, "max_regression": 0.1, "baseline": "a"}, "either a bound"),
])
def test_bad_gates(values, expected):
    from rlhf_ray.config import ConfigError

    with pytest.raises(ConfigError) as err:
        GateSpec(**values)
    assert expected in str(err.value)


def test_stage_metrics_are_the_last_logged_values_and_the_eval_json(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "time_s": 1.0, "eval/pass@1": 0.25}) + "\n"
        + json.dumps({"step": 1, "time_s": 2.0, "train/loss": 2.0}) + "\n"
        + json.dumps({"step": 2, "time_s": 3.0, "train/loss": "nan", "eval/pass@1": 0.5, "note": "x"}) + "\n{cut")
    assert stage_metrics(tmp_path)["eval/pass@1"] == 0.5 and math.isnan(stage_metrics(tmp_path)["train/loss"])
    (tmp_path / "eval.json").write_text(json.dumps({"sampled": {"pass@1": 0.75}, "greedy": {"accuracy": 1.0}}))
    assert stage_metrics(tmp_path) == pytest.approx({"eval/pass@1": 0.75, "train/loss": math.nan,
                                                     "eval/greedy/accuracy": 1.0}, nan_ok=True)


# ---- loading --------------------------------------------------------------------------------------------------

def _write(tmp_path: Path, stages: dict, **top) -> Path:
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({"job": "sft", "model": {"path": "m"}}))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"job": "eval", "model": {"path": "m"},
                                                        "reward": {"functions": ["builtin:math"]}}))
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **top, "stages": stages}, sort_keys=False))
    return p


GOOD = {"sft": {"config": "sft.yaml"},
        "eval": {"config": "eval.yaml", "overrides": {"model.path": "${sft.final}"},
                 "gates": [{"metric": "eval/pass@1", "min": 0.1}]}}


def test_a_pipeline_loads_with_its_references_replaced_and_output_dirs_set(tmp_path):
    spec = load_pipeline(_write(tmp_path, GOOD))
    out = tmp_path / "out"
    assert [s.name for s in spec.stages] == ["sft", "eval"] and spec.output_dir == out
    sft, ev = spec.stages
    assert sft.config.train.output_dir == str(out / "sft") and ev.config.model.path == str(out / "sft" / "final")
    assert ev.gates == (GateSpec("eval/pass@1", min=0.1),) and sft.source == str(tmp_path / "sft.yaml")
    # Inline configs, nested overrides and command-line overrides of the pipeline file.
    inline = {"sft": {"config": {"job": "sft", "model": {"path": "m"}}, "overrides": {"train": {"max_steps": 3}}}}
    spec = load_pipeline(_write(tmp_path, inline), ["stages.sft.overrides.optim.lr=0.5"])
    assert spec.stages[0].source == "inline" and spec.stages[0].config.train.max_steps == 3
    assert spec.stages[0].config.optim.lr == 0.5


@pytest.mark.parametrize("stages, top, expected", [
    ({**GOOD, "eval": {**GOOD["eval"], "overrides": {"model.path": "${sfft.final}"}}}, {},
     "stage 'eval': overrides.model.path: '${sfft.final}' names no stage; the stages before 'eval' are: sft"),
    ({"sft": {"config": "sft.yaml", "overrides": {"model.path": "${eval.final}"}}, "eval": GOOD["eval"]}, {},
     "stage 'sft': overrides.model.path: '${eval.final}' is a forward reference: stage 'eval' runs after 'sft'"),
    ({"sft": {"config": {"job": "sft", "model": {"path": "${sft.final}"}}}}, {},
     "stage 'sft': config.model.path: '${sft.final}' refers to this stage itself (a cycle)"),
    ({"sft": {"config": "sft.yaml", "overrides": {"job": "sfft"}}}, {}, "stage 'sft': job: must be one of"),
    ({"sft": {"config": "missing.yaml"}}, {}, "stage 'sft': config: file not found: "),
    ({"sft": {"config": "sft.yaml", "overrides": {"optim.lrr": 1}}}, {},
     "stage 'sft': unknown config key 'optim.lrr'. Did you mean 'lr'?"),
    ({"sft": {"config": "sft.yaml", "gate": []}}, {}, "stage 'sft': unknown key 'gate'. Did you mean 'gates'?"),
    (GOOD, {"stage": {}}, "pipeline: unknown key 'stage'. Did you mean 'stages'?"),
    ({}, {}, "stages: the pipeline needs a mapping of stage name"),
    ({**GOOD, "eval": {**GOOD["eval"], "overrides": {"model.path": "${sft.best}"}}}, {},
     "stage 'eval': overrides.model.path: '${sft.best}': stage 'sft' has no best (it does not set train.keep_best)"),
    ({**GOOD, "again": {"config": "eval.yaml", "overrides": {"model.path": "${eval.final}"}}}, {},
     "stage 'again': overrides.model.path: '${eval.final}': stage 'eval' has no final (job eval trains no model)"),
    ({**GOOD, "eval": {**GOOD["eval"], "gates": [{"metric": "eval/pass@1", "mn": 0.1}]}}, {},
     "stage 'eval': unknown config key 'gates[0].mn'. Did you mean 'min'?"),
    ({**GOOD, "eval": {**GOOD["eval"], "gates": [{"metric": "eval/pass@2", "min": 0.1}]}}, {},
     "stage 'eval': gates[0].metric: the evaluation of job eval logs no 'eval/pass@2'"),
    ({**GOOD, "eval": {**GOOD["eval"], "gates": [{"metric": "eval/pass@1", "max_regression": 0.1,
                                                  "baseline": "later"}]}, "later": {"config": "eval.yaml"}}, {},
     "stage 'eval': gates[0].baseline: 'later' runs after 'eval'; a baseline is an earlier stage, one of: sft"),
    ({"e1": {"config": "eval.yaml"},
      "e2": {"config": "eval.yaml", "overrides": {"rollout.temperature": 0.5},
             "gates": [{"metric": "eval/pass@1", "max_regression": 0.1, "baseline": "e1"}]}}, {},
     "stage 'e2': gates[0].baseline: a regression is measured on the same held-out set, evaluated the same way; "
     "stage 'e1' and this one differ in eval.temperature: 1.0 in 'e1', 0.5 here"),
    ({"sft": {"config": "sft.yaml"},
      "e2": {"config": "eval.yaml", "gates": [{"metric": "eval/pass@1", "max_regression": 0.1, "baseline": "sft"}]}},
     {}, "stage 'e2': gates[0].baseline: stage 'sft' has no held-out set to compare on"),
])
def test_bad_pipeline_files_name_the_stage_and_key(tmp_path, capsys, stages, top, expected):
    path = _write(tmp_path, stages, **top)
    with pytest.raises(PipelineError) as err:
        load_pipeline(path)
    assert expected in str(err.value), str(err.value)
    # Through the command: one line, exit code 2, nothing run.
    assert main(["pipeline", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().startswith("config error: ")
    assert not (tmp_path / "out").exists()


def test_a_missing_pipeline_file(tmp_path, capsys):
    assert main(["pipeline", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"config error: pipeline file not found: {tmp_path / 'nope.yaml'}"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("pipeline_*.yaml")) + [DEMO], ids=lambda p: p.name)
def test_shipped_pipelines_load(path, capsys, tmp_path):
    """Every stage's config builds (as `rlhf-ray validate` builds one), references resolve to earlier stages'
    outputs, gates and baselines check out; --dry-run prints each stage. Into a fresh output_dir: the file's own
    (runs/...) may hold a user's run already (the Quickstart runs the demo before the tests)."""
    out = f"output_dir={tmp_path / 'out'}"
    spec = load_pipeline(path, [out])
    names = [s.name for s in spec.stages]
    assert len(names) >= 3
    for i, stage in enumerate(spec.stages):  # a reference became an earlier stage's output path
        for model in (stage.config.model.path, stage.config.reward.model):
            if model and spec.output_dir in Path(model).parents:
                assert Path(model).parent.name in names[:i], (stage.name, model)
    assert spec.output_dir in Path(spec.stages[-1].config.model.path).parents  # it evaluates what the pipeline made
    assert main(["pipeline", str(path), out, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert all(f"  {s.name}: job {s.job}, run;" in printed for s in spec.stages), printed


# ---- a rerun over finished stages -----------------------------------------------------------------------------

def test_a_rerun_skips_done_stages_checks_their_gates_and_refuses_a_changed_one(tmp_path, capsys):
    """The stages' outputs are written here as the jobs would (a metrics.jsonl, an eval.json) and recorded done:
    the rerun starts no job (no Ray here), checks the gates on those files and writes the pipeline's report."""
    from rlhf_ray.pipeline.run import run_pipeline
    from rlhf_ray.pipeline.state import PipelineState, StageRecord, fingerprint

    path = _write(tmp_path, GOOD)
    spec = load_pipeline(path)
    state = PipelineState(str(path), str(spec.output_dir), ["sft", "eval"])
    for stage in spec.stages:
        stage.output_dir.mkdir(parents=True)
        state.stages[stage.name] = StageRecord(stage.job, str(stage.output_dir), "done", fingerprint(stage.config))
    (spec.output_dir / "sft" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/loss": 2.0 / s}) + "\n" for s in (1, 2, 3)))
    (spec.output_dir / "eval" / "eval.json").write_text(json.dumps({"sampled": {"pass@1": 0.05, "accuracy": 0.05}}))
    state.save()

    result = run_pipeline(spec)
    assert not result.passed and [g.metric for g in result.failed_gates] == ["eval/pass@1"]
    assert result.state.failure == "stage 'eval': gate eval/pass@1 >= 0.1 failed: eval/pass@1 = 0.05 < min 0.1"
    saved = json.loads((spec.output_dir / "pipeline_state.json").read_text())
    assert saved["status"] == "failed" and all(s["attempts"] == 0 for s in saved["stages"].values())  # none ran
    page = (spec.output_dir / "report.html").read_text()
    assert "pipeline failed: stage &#x27;eval&#x27;: gate eval/pass@1 &gt;= 0.1 failed" in page
    assert "<td class='failed'>FAILED</td>" in page and "<h2>Stages</h2>" in page

    # Through the command, with the gate relaxed: passes, exit code 0.
    assert main(["pipeline", str(path), "stages.eval.gates=[{metric: eval/pass@1, min: 0.05}]"]) == 0
    assert "pipeline passed (2 stages)" in capsys.readouterr().out
    # A done stage whose config changed is refused, naming what changed and the way out.
    with pytest.raises(PipelineError) as err:
        run_pipeline(load_pipeline(path, ["stages.sft.overrides.optim.lr=0.5"]))
    assert "stage 'sft': done, but with another config than the pipeline now gives it (optim.lr); rerun it and " \
           "every later stage with --restart sft" in str(err.value)
