"""A pipeline file -> the typed ``PipelineSpec``, every stage's config built and checked at load time.

The file::

    output_dir: runs/pipeline          # stage <name> writes <output_dir>/<name>/; the pipeline its state and report
    ray: {num_cpus: 8}                 # optional: the Ray instance every stage shares (default: the most any asks)
    stages:                            # run in the order written
      sft:
        config: sft_tiny_cpu.yaml      # a config file (relative to this file) or an inline mapping
        overrides: {train.max_steps: 40}
      grpo:
        config: grpo_tiny_cpu.yaml
        overrides: {model.path: "${sft.final}"}
        gates:
          - {metric: eval/pass@1, min: 0.2}

``${<stage>.final}`` (its ``final/`` model), ``${<stage>.best}`` (its ``best/``, with ``train.keep_best``) and
``${<stage>.output_dir}`` may appear in any string of a stage's config or overrides and name an earlier stage's
output (``rlhf_ray.pipeline.refs``). Overrides are ``section.key: value`` pairs (nested mappings are flattened
to them), applied after the config file, as on the command line. A stage's ``train.output_dir`` is
``<output_dir>/<name>`` unless its overrides set one.

Everything that can be checked before a stage runs is checked here, each error naming the stage and key: unknown
keys, missing config files, unknown jobs and every other config error of the stage's config (the same checks
``rlhf-ray validate`` makes of a config), references to no stage / to the stage itself / to a later stage, a
``best`` of a stage without ``train.keep_best`` or a ``final`` of a stage that trains nothing, gates' settings,
their baselines, and that a regression is measured on the same held-out set.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.config import Config, ConfigError, to_dict
from rlhf_ray.config.loader import RESOLVED_KEY, build, merge_override, parse_override, read_yaml_mapping
from rlhf_ray.config.schema import RL_JOBS, RayConfig
from rlhf_ray.pipeline.gates import GateSpec
from rlhf_ray.pipeline.refs import NAME, Ref, RefError, check_order, find_refs, substitute

PIPELINE_KEYS = ("output_dir", "ray", "stages")
STAGE_KEYS = ("config", "overrides", "gates")
NO_FINAL = ("eval", "best_of_n")
"""Jobs that train no model (their stage has no ``final``)."""


class PipelineError(ConfigError):
    """A pipeline file that cannot run as written; the message names the stage and key (``rlhf-ray pipeline`` exits
    with code 2, before any stage starts)."""


@dataclass(frozen=True)
class StageSpec:
    """One stage, its config built (references replaced by the paths they name)."""

    name: str
    config: Config
    source: str
    """Where its config came from: the file, or ``inline``."""
    gates: tuple[GateSpec, ...] = ()

    @property
    def job(self) -> str:
        return self.config.job

    @property
    def output_dir(self) -> Path:
        return Path(self.config.train.output_dir).expanduser().resolve()

    def outputs(self) -> dict[str, str]:
        """What later stages may refer to, by output name (``refs.OUTPUTS``)."""
        out = {"output_dir": str(self.output_dir)}
        if self.job not in NO_FINAL:
            out["final"] = str(self.output_dir / "final")
        if self.config.train.keep_best:
            out["best"] = str(self.output_dir / "best")
        return out


@dataclass(frozen=True)
class PipelineSpec:
    """A loaded pipeline file: where it writes, the Ray instance its stages share, its stages in order."""

    path: Path
    output_dir: Path
    ray: RayConfig
    stages: tuple[StageSpec, ...] = field(default_factory=tuple)

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)


def load_pipeline(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> PipelineSpec:
    """Read and check the pipeline file ``path``; ``overrides`` are dotted ``key=value`` pairs on the file's tree
    (e.g. ``output_dir=runs/p2``, ``stages.sft.overrides.train.max_steps=10``). ``PipelineError`` names what is
    wrong."""
    p = Path(path)
    tree = read_yaml_mapping(p, PipelineError, f"pipeline file not found: {p}",
                             f"a mapping with {', '.join(PIPELINE_KEYS)}")
    for text in overrides or []:
        merge_override(tree, *parse_override(text))
    return build_pipeline(tree, p)


def build_pipeline(tree: dict[str, Any], path: Path) -> PipelineSpec:
    """``load_pipeline`` on an already read tree; relative config files are found beside ``path``."""
    _known(tree, PIPELINE_KEYS, "pipeline")
    output_dir = Path(str(tree.get("output_dir") or "runs/pipeline")).expanduser().resolve()
    stages_tree = tree.get("stages")
    if not isinstance(stages_tree, dict) or not stages_tree:
        raise PipelineError("stages: the pipeline needs a mapping of stage name -> {config, overrides, gates}, "
                            "run in the order written")
    names = [str(n) for n in stages_tree]
    stages: list[StageSpec] = []
    for i, name in enumerate(names):
        if not re.fullmatch(NAME, name):
            raise PipelineError(f"stages.{name}: a stage name is letters, digits, _ and - (starting with a letter "
                                "or _), as references ${<stage>.final} spell it")
        stages.append(_stage(name, stages_tree[name], path.parent, output_dir, stages, names[i + 1:]))
    _check_gates(stages, names)
    ray_tree = tree.get("ray")
    if ray_tree is not None:
        ray = _build(RayConfig, ray_tree, "ray", "pipeline")
    else:
        ray = shared_ray([s.config.ray for s in stages])
    return PipelineSpec(path.resolve(), output_dir, ray, tuple(stages))


def shared_ray(configs: list[RayConfig]) -> RayConfig:
    """The one Ray instance every stage runs in: the first address any stage names, else a local instance with the
    most CPUs and GPUs any stage asks for (a stage started alone would start it with its own)."""
    address = next((c.address for c in configs if c.address), None)
    cpus = [c.num_cpus for c in configs if c.num_cpus is not None]
    gpus = [c.num_gpus for c in configs if c.num_gpus is not None]
    return RayConfig(address=address, num_cpus=max(cpus) if cpus else None, num_gpus=max(gpus) if gpus else None)


# ---- one stage ------------------------------------------------------------------------------------------------

def _stage(name: str, tree: Any, base: Path, output_dir: Path, earlier: list[StageSpec],
           later: list[str]) -> StageSpec:
    where = f"stages.{name}"
    if not isinstance(tree, dict):
        raise PipelineError(f"{where}: a stage is a mapping with {', '.join(STAGE_KEYS)}, got {tree!r}")
    _known(tree, STAGE_KEYS, f"stage '{name}'")
    config, source = _stage_config(name, tree.get("config"), base)
    overrides = tree.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise PipelineError(f"stage '{name}': overrides: a mapping of section.key: value, got {overrides!r}")
    flat = _flatten(overrides)

    # References, checked and replaced: each key that holds one is named in the error.
    outputs: dict[Ref, str] = {}
    for key, value in [*((f"config.{k}", v) for k, v in _flatten(config).items()),
                       *((f"overrides.{k}", v) for k, v in flat.items())]:
        try:
            refs = find_refs(value)
            check_order(refs, name, [s.name for s in earlier], later)
        except RefError as exc:
            raise PipelineError(f"stage '{name}': {key}: {exc}") from None
        for ref in refs:
            target = next(s for s in earlier if s.name == ref.stage)
            available = target.outputs()
            if ref.output not in available:
                why = (f"job {target.job} trains no model" if ref.output == "final" else
                       "it does not set train.keep_best" if ref.output == "best" else "")
                raise PipelineError(f"stage '{name}': {key}: '{ref}': stage '{ref.stage}' has no {ref.output} ({why}); "
                                    f"it has {', '.join(available)}")
            outputs[ref] = available[ref.output]
    config = substitute(config, outputs)
    flat = substitute(flat, outputs)

    config.pop(RESOLVED_KEY, None)  # a run's config.yaml: what it derived is derived again
    for key, value in flat.items():
        try:
            merge_override(config, key.split("."), value)
        except ConfigError as exc:
            raise PipelineError(f"stage '{name}': overrides: {exc}") from None
    if "train.output_dir" not in flat:
        merge_override(config, ["train", "output_dir"], str(output_dir / name))
    built = _build(Config, config, "", f"stage '{name}'")
    gates = tree.get("gates") or []
    if not isinstance(gates, list):
        raise PipelineError(f"stage '{name}': gates: a list of {{metric, min / max / max_regression, baseline}}, "
                            f"got {gates!r}")
    specs = tuple(_build(GateSpec, g, f"gates[{i}]", f"stage '{name}'") for i, g in enumerate(gates))
    return StageSpec(name, built, source, specs)


def _stage_config(name: str, value: Any, base: Path) -> tuple[dict[str, Any], str]:
    """The stage's config tree (a copy) and where it came from."""
    if isinstance(value, dict):
        return copy.deepcopy(value), "inline"
    if not isinstance(value, str) or not value:
        raise PipelineError(f"stage '{name}': config: a config file (relative to the pipeline file) or an inline "
                            f"mapping of the config, got {value!r}")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    loaded = read_yaml_mapping(p, PipelineError, f"stage '{name}': config: file not found: {p} (relative paths are "
                               "read beside the pipeline file)", "a mapping of sections", f"stage '{name}': config: ")
    return loaded, str(p.resolve())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"max_steps": 3}, "optim.lr": 1e-3}`` -> ``{"train.max_steps": 3, "optim.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _known(tree: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for k in tree:
        if k not in keys:
            match = difflib.get_close_matches(str(k), keys, n=1, cutoff=0.5)
            hint = f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(keys)}."
            raise PipelineError(f"{where}: unknown key '{k}'.{hint}")


def _build(cls: type, values: Any, prefix: str, where: str) -> Any:
    """``loader.build`` with the error prefixed by ``where`` (the stage or the pipeline)."""
    if not isinstance(values, dict):
        raise PipelineError(f"{where}: {prefix}: expected a mapping, got {values!r}")
    try:
        return build(cls, values, prefix=prefix)
    except ConfigError as exc:
        raise PipelineError(f"{where}: {exc}") from None


# ---- gates across stages --------------------------------------------------------------------------------------

def _check_gates(stages: list[StageSpec], names: list[str]) -> None:
    """Baselines name earlier stages; a regression compares evaluations of the same prompts, sampled and counted
    the same way; an eval metric of a rollout or eval stage is one its evaluation logs."""
    from rlhf_ray.config import resolve
    from rlhf_ray.evaluation.summary import eval_metric_names

    for i, stage in enumerate(stages):
        for g, gate in enumerate(stage.gates):
            key = f"stage '{stage.name}': gates[{g}]"
            evaluation = resolve(stage.config).evaluation
            if evaluation is not None and gate.metric.startswith("eval/") and not gate.metric.startswith(
                    "eval/reward/") and gate.metric not in eval_metric_names(evaluation):
                raise PipelineError(f"{key}.metric: the evaluation of job {stage.job} logs no {gate.metric!r}; it "
                                    f"logs {', '.join(eval_metric_names(evaluation))} and eval/reward/<source>_mean")
            if gate.baseline is None:
                continue
            if gate.baseline not in names[:i]:
                why = ("is this stage itself" if gate.baseline == stage.name else
                       f"runs after '{stage.name}'" if gate.baseline in names[i + 1:] else "names no stage")
                raise PipelineError(f"{key}.baseline: '{gate.baseline}' {why}; a baseline is an earlier stage, one of: "
                                    f"{', '.join(names[:i]) or 'none, this is the first'}")
            base = stages[names.index(gate.baseline)]
            mine, theirs = eval_set(stage.config), eval_set(base.config)
            if mine is None or theirs is None:
                which = stage.name if mine is None else base.name
                raise PipelineError(f"{key}.baseline: stage '{which}' has no held-out set to compare on (data.eval_path, "
                                    "data.eval_fraction, or job eval)")
            differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            if differ:
                shown = "; ".join(f"{k}: {theirs.get(k)!r} in '{base.name}', {mine.get(k)!r} here" for k in differ)
                raise PipelineError(f"{key}.baseline: a regression is measured on the same held-out set, evaluated "
                                    f"the same way; stage '{base.name}' and this one differ in {shown}")


def eval_set(cfg: Config) -> Optional[dict[str, Any]]:
    """The held-out set a stage's ``eval/`` numbers come from, and how they are counted, as plain data: equal for
    two stages exactly when their evaluations are comparable. None: the stage evaluates nothing.

    The prompts are ``data.eval_path``, the ``data.eval_fraction`` share of ``data.path`` held out with
    ``train.seed``, or (job eval without either) all of ``data.path``; demo sets read from ``eval_path`` use
    another seed than from ``path``. Prompt formatting, and for rollout jobs the resolved sampling
    (``Resolved.evaluation``), are part of it."""
    from rlhf_ray.config import resolve

    d = cfg.data
    if d.eval_path:
        # data.eval_path demo sets are drawn with another seed than the same set as data.path
        source, rows = d.eval_path, "all (eval seed)" if d.eval_path.startswith("demo:") else "all"
    elif d.eval_fraction > 0:
        source, rows = d.path, f"held out: {d.eval_fraction:g} with train.seed {cfg.train.seed}"
    elif cfg.job == "eval":
        source, rows = d.path, "all"
    else:
        return None
    local = Path(source).expanduser()
    ident: dict[str, Any] = {"data": str(local.resolve()) if local.exists() else source, "rows": rows}
    if source.startswith("demo:"):
        ident["data.demo_size"] = d.demo_size
    fields = ["split", "subset", "max_samples", "prompt_field", "answer_field", "system_prompt", "apply_chat_template",
              "max_prompt_length"]
    if cfg.job not in RL_JOBS:
        fields.append("max_length")  # an offline eval loss depends on where long examples are cut
    ident.update({f"data.{key}": getattr(d, key) for key in fields})
    evaluation = resolve(cfg).evaluation
    if evaluation is not None:
        ident.update({f"eval.{k}": v for k, v in to_dict(evaluation).items()})
    return ident
