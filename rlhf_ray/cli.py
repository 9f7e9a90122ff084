"""The ``rlhf-ray`` command: train, validate, eval, pipeline, report, make-tiny-model, demo.

Thin on purpose: parse -> build the config -> run the job -> report. Config errors exit with code 2
and a one-line message naming the key (no traceback); anything else propagates.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEMO_PIPELINE = Path(__file__).parent / "configs" / "demo_pipeline.yaml"
"""The embedded pipeline behind ``rlhf-ray demo`` (its stages' configs sit beside it)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-ray", description="LLM post-training on Ray, vLLM and DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "run the job a config describes"),
                        ("validate", "check a config and its inputs without training")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")
    e = sub.add_parser("eval", help="sample a model on a prompt set, score with the rewards: pass@k, maj@k, reward")
    e.add_argument("config", help="YAML config file (run as job: eval, whatever its job key says)")
    e.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.path=runs/grpo/final")
    pl = sub.add_parser("pipeline", help="run named stages in order (outputs feed later stages), gates between them")
    pl.add_argument("pipeline", help="pipeline YAML file: output_dir, stages (config, overrides, gates)")
    pl.add_argument("overrides", nargs="*", help="dotted key=value overrides of the pipeline file, e.g. "
                                                 "stages.sft.overrides.train.max_steps=10")
    pl.add_argument("--restart", metavar="STAGE", help="run STAGE and every later stage again, even if done")
    pl.add_argument("--dry-run", action="store_true", help="check the file and print the plan; run nothing")
    r = sub.add_parser("report", help="one HTML page of a run: metrics over steps, phase times, placement, eval")
    r.add_argument("run_dir", help="a run's train.output_dir")
    r.add_argument("--out", default=None, help="where to write the page (default: RUN_DIR/report.html)")
    t = sub.add_parser("make-tiny-model", help="write a small random-init model + tokenizer (no download)")
    t.add_argument("out_dir")
    t.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    t.add_argument("--shape", default="tiny", help="tiny, small, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--reward-model", action="store_true", help="a sequence classifier with one score")
    d = sub.add_parser("demo", help="tiny pipeline on CPU: make a tiny model, SFT -> GRPO (vLLM rollouts) -> eval")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: the embedded config's)")
    d.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps (default: the embedded config's)")
    return p


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def cmd_train(config: str, overrides: list[str]) -> int:
    from rlhf_ray.config import load_config
    from rlhf_ray.jobs import get_job

    cfg = load_config(config, overrides)
    result = get_job(cfg.job).run(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2, default=str))
    print(f"outputs in {result['output_dir']}")
    return 0


def cmd_validate(config: str, overrides: list[str]) -> int:
    from rlhf_ray.config import load_config
    from rlhf_ray.jobs.front import prepare

    cfg = load_config(config, overrides)
    _, _, (_, _, counts) = prepare(cfg)
    print(f"config OK: job={cfg.job} model={cfg.model.path} data={cfg.data.path} {counts}")
    return 0


def cmd_eval(config: str, overrides: list[str]) -> int:
    """The config as job eval (a training config evaluates its model on its prompts with its rewards)."""
    from rlhf_ray.config import ConfigError, load_config
    from rlhf_ray.evaluation.summary import format_table
    from rlhf_ray.jobs import get_job

    cfg = load_config(config, ["job=eval", *overrides])
    if cfg.job != "eval":
        raise ConfigError(f"job: rlhf-ray eval runs job eval; drop the job={cfg.job} override (or use rlhf-ray train)")
    result = get_job("eval").run(cfg)
    print(format_table(result["eval"]))
    print(f"eval.json: {result['eval_path']}")
    if result.get("report"):
        print(f"report: {result['report']}")
    return 0


def cmd_report(run_dir: str, out: str | None) -> int:
    from rlhf_ray.report import write_report

    print(f"report: {write_report(run_dir, out)}")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from rlhf_ray.models.tiny import make_tiny_model

    out = make_tiny_model(args.out_dir, arch=args.arch, shape=args.shape, seed=args.seed,
                          num_labels=1 if args.reward_model else None)
    print(f"wrote {args.shape} {args.arch} {'reward model' if args.reward_model else 'causal LM'} to {out}")
    return 0


def cmd_pipeline(path: str, overrides: list[str], restart: str | None, dry_run: bool) -> int:
    """Exit code 0 when every stage ran and every gate passed, 1 when a gate failed (what and why printed)."""
    from rlhf_ray.pipeline import load_pipeline
    from rlhf_ray.pipeline.run import describe, run_pipeline, summary

    spec = load_pipeline(path, overrides)
    if dry_run:
        print(describe(spec, restart))
        return 0
    result = run_pipeline(spec, restart)
    print(summary(result))
    return 0 if result.passed else 1


def cmd_demo(output_dir: str, sft_steps: int | None, grpo_steps: int | None) -> int:
    """The embedded pipeline on a tiny model made here: SFT -> GRPO (vLLM engines, weight sync) -> eval."""
    from rlhf_ray.models.tiny import make_tiny_model
    from rlhf_ray.pipeline import load_pipeline
    from rlhf_ray.pipeline.run import run_pipeline, summary

    out = Path(output_dir)
    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        make_tiny_model(model_dir)
    overrides = [f"output_dir={out}", f"stages.sft.overrides.model.path={model_dir.resolve()}"]
    if sft_steps is not None:
        overrides.append(f"stages.sft.overrides.train.max_steps={sft_steps}")
    if grpo_steps is not None:
        overrides.append(f"stages.grpo.overrides.algo.total_steps={grpo_steps}")
    spec = load_pipeline(DEMO_PIPELINE, overrides)
    result = run_pipeline(spec)
    print("\n" + summary(result))
    stages = result.state.stages
    print("\ndemo " + ("done" if result.passed else "stopped") + f": {spec.output_dir}")
    for name in result.state.order:
        if name in stages:
            print(f"  {name + ':':6} metrics {stages[name].output_dir}/metrics.jsonl")
    for name, key in (("sft", "final_model"), ("grpo", "final_model"), ("grpo", "best_model")):
        if name in stages and key in stages[name].result:
            print(f"  model   {stages[name].result[key]}  (AutoModelForCausalLM.from_pretrained / vllm.LLM load it)")
    if "eval" in stages and "eval_path" in stages["eval"].result:
        print(f"  eval    {stages['eval'].result['eval_path']}")
    if result.report:
        print(f"  report  {result.report}  (each stage's own report.html beside its metrics)")
    return 0 if result.passed else 1


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.config import ConfigError

    args = _parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "train":
            return cmd_train(args.config, args.overrides)
        if args.command == "validate":
            return cmd_validate(args.config, args.overrides)
        if args.command == "eval":
            return cmd_eval(args.config, args.overrides)
        if args.command == "pipeline":
            return cmd_pipeline(args.pipeline, args.overrides, args.restart, args.dry_run)
        if args.command == "report":
            return cmd_report(args.run_dir, args.out)
        if args.command == "make-tiny-model":
            return cmd_make_tiny_model(args)
        if args.command == "demo":
            return cmd_demo(args.output_dir, args.sft_steps, args.grpo_steps)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # data, reward and placement errors are user errors too: one clear line
        from rlhf_ray.agentic.env import EnvError
        from rlhf_ray.controller.placement import PlacementError
        from rlhf_ray.data.errors import DataError
        from rlhf_ray.report.run_data import ReportError
        from rlhf_ray.rewards import RewardError

        for kind, label in ((DataError, "data error"), (RewardError, "reward error"), (EnvError, "environment error"),
                            (PlacementError, "placement error"), (ReportError, "report error")):
            if isinstance(exc, kind):
                print(f"{label}: {exc}", file=sys.stderr)
                return 2
        raise
    return 1
