"""Resolution: the loaded config (never written to) -> the frozen ``Resolved`` description of one run.

Every value a run derives from its config is computed here, once, and read from ``Resolved`` by the job
front, the loops, the roles and the efficiency report:

- ``paths``: local model, tokenizer and output paths made absolute (Ray workers on other nodes do not
  share the driver's working directory);
- ``batch``: sequences per step, per optimizer step (the learners' global batch), optimizer steps per step;
- ``rl``: the advantage estimator, where pi_old comes from, and where the reference KL goes;
- ``roles``: which models run (policy, reference, critic, reward model, rollout engines, the offline
  learner) with their heads, dtypes, workers and devices; ``plan``: the placement they make;
- ``sync``: the weight-sync backend, bucket size and dtype;
- ``evaluation``: how an evaluation samples and counts (job eval, and a rollout training job's held-out eval);
  ``best``: the metric and direction that pick the model kept in ``best/`` (``train.keep_best``).

Every check across config sections lives here too, each a ``ConfigError`` naming the key: a config is
valid when it resolves (``Config.__post_init__`` resolves it once for that). ``accelerator`` says where the
GPU roles really run. The job front probes the cluster for it (``controller.cluster.probe_accelerator``):
Ray's logical GPUs on a CPU machine run on the CPU. Without a probe (``rlhf-ray validate``, unit tests),
the config is taken at its word: GPUs asked for -> CUDA.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from rlhf_ray.algos.names import GROUP_BASED, NEEDS_CRITIC, REFERENCE_FREE_PREFERENCE_LOSSES
from rlhf_ray.config.errors import ConfigError
from rlhf_ray.config.job_sections import JudgeConfig, RolloutConfig
from rlhf_ray.config.resolved import (COLOCATE, OFFLINE_COLOCATE, POLICY_JOBS, Accelerator, BatchShape, BestSettings,
                                      Head, LearnerRoleSpec, Paths, RLSettings, RoleSpec, RolloutRoleSpec, Resolved,
                                      SyncSettings, auto_dtype, request)
from rlhf_ray.config.schema import RL_JOBS, LearnerConfig, ModelConfig, OptimConfig
from rlhf_ray.evaluation.summary import EvalSettings, eval_metric_names

if TYPE_CHECKING:
    from rlhf_ray.config.schema import Config

__all__ = ["COLOCATE", "OFFLINE_COLOCATE", "POLICY_JOBS", "Accelerator", "BatchShape", "BestSettings", "EvalSettings",
           "Head", "LearnerRoleSpec", "Paths", "RLSettings", "RoleSpec", "RolloutRoleSpec", "Resolved", "SyncSettings",
           "auto_dtype", "best_mode", "check_judge_model", "judge_rollout", "request", "resolve"]

def resolve(cfg: "Config", accelerator: Optional[Accelerator] = None) -> Resolved:
    """Check ``cfg`` across its sections and derive what the run needs (see the module docstring)."""
    on_cuda = cfg.learner.gpus_per_worker > 0 and (accelerator or "cuda") == "cuda"
    accel: Accelerator = "cuda" if on_cuda else "cpu"
    _check_qlora(cfg)
    _check_rollout_mode(cfg)
    _check_multi_turn(cfg)
    paths = _paths(cfg)
    if cfg.job in RL_JOBS:
        batch, rl = _rollout_job_shape(cfg)
    else:
        g = cfg.learner.global_batch_size or cfg.learner.micro_batch_size * cfg.learner.num_workers
        batch, rl = BatchShape(per_step=g, per_update=g, updates_per_step=1), None
    reference = _reference(cfg)
    sync = None
    if cfg.job in POLICY_JOBS:
        _check_placement(cfg)
        _check_overlong(cfg)
        sync = SyncSettings(_sync_backend(cfg, accel), cfg.rollout.weight_sync_bucket_mb,
                            auto_dtype(cfg.model.dtype, on_cuda), cfg.rollout.tensor_parallel_size)
    roles = _roles(cfg, paths, batch, reference, on_cuda)
    max_restarts = cfg.train.max_restarts
    if max_restarts is None:
        max_restarts = 3 if cfg.job in ("ppo", "grpo", "online_dpo") else 0  # the long runs that use engines
    evaluation = _evaluation(cfg)
    return Resolved(cfg, accel, paths, batch, reference, rl, sync, roles, max_restarts, evaluation,
                    _best(cfg, evaluation))


# ---- paths ----------------------------------------------------------------------------------------

def _absolute(value: Optional[str], must_exist: bool = True) -> Optional[str]:
    """An existing local path made absolute; hub names, URLs, ``demo:`` sets and missing paths as written."""
    if not value or value.startswith(("http://", "https://", "demo:")):
        return value
    p = Path(value).expanduser()
    return str(p.resolve()) if (p.exists() or not must_exist) else value


def _paths(cfg: "Config") -> Paths:
    model = _absolute(cfg.model.path)
    assert model is not None
    return Paths(model=model, tokenizer=_absolute(cfg.model.tokenizer) or model,
                 output_dir=str(_absolute(cfg.train.output_dir, must_exist=False)),
                 reward_model=_absolute(cfg.reward.model), critic_model=_absolute(cfg.critic.model),
                 judge_model=_absolute(cfg.reward.judge.model))


# ---- batch shape and the RL choices -----------------------------------------------------------------

def _rollout_job_shape(cfg: "Config") -> tuple[BatchShape, Optional[RLSettings]]:
    """Batch shape of a rollout job, checked, and (ppo / grpo) its RL settings."""
    a, r, lc = cfg.algo, cfg.rollout, cfg.learner
    if not cfg.reward.functions and not cfg.reward.model and not cfg.reward.judge.model and r.env is None:
        raise ConfigError(f"reward.functions: job {cfg.job} needs a reward: reward.functions (e.g. [builtin:math]), "
                          "reward.model, a judge (reward.judge.model), or an environment's rewards (rollout.env)")
    per_pass = lc.micro_batch_size * lc.num_workers
    if cfg.job == "eval":  # samples once over its prompts; no learner, so no batch split to check
        return BatchShape(per_step=a.prompts_per_step * r.n_samples, per_update=per_pass, updates_per_step=0), None
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature: job {cfg.job} samples several responses and the learners score "
                          f"them at logits / temperature; needs a temperature > 0, got {r.temperature}")
    B = a.prompts_per_step * r.n_samples
    if B % cfg.reward.num_workers:
        raise ConfigError(f"reward.num_workers: {cfg.reward.num_workers} does not divide the "
                          f"{B} sequences of a step (prompts_per_step x n_samples)")
    if cfg.job in ("online_dpo", "best_of_n") and r.n_samples < 2:
        raise ConfigError(f"rollout.n_samples: job {cfg.job} compares samples of a prompt; needs >= 2, "
                          f"got {r.n_samples}")
    if cfg.job == "best_of_n":
        return BatchShape(per_step=B, per_update=per_pass, updates_per_step=0), None
    if cfg.job == "online_dpo":
        if per_pass < a.prompts_per_step:
            raise ConfigError(f"learner.micro_batch_size: online DPO puts a round's pairs (up to algo.prompts_per_step="
                              f"{a.prompts_per_step}) in one micro-batch per worker; needs micro_batch_size x "
                              f"num_workers >= {a.prompts_per_step}, got {per_pass}")
        if lc.global_batch_size is not None and lc.global_batch_size != per_pass:
            raise ConfigError("learner.global_batch_size: online DPO takes one optimizer step per round; leave it unset")
        return BatchShape(per_step=B, per_update=per_pass, updates_per_step=1), None
    advantage = a.advantage or ("gae" if cfg.job == "ppo" else "grpo")
    if cfg.job == "ppo" and advantage not in NEEDS_CRITIC:
        raise ConfigError(f"algo.advantage: job ppo trains a critic for GAE; '{advantage}' is critic-free, "
                          "use job: grpo for it")
    if cfg.job == "grpo" and advantage in NEEDS_CRITIC:
        raise ConfigError("algo.advantage: gae needs a critic; use job: ppo (job grpo runs critic-free estimators)")
    if advantage in GROUP_BASED and r.n_samples < 2:
        raise ConfigError(f"rollout.n_samples: algo.advantage={advantage} compares samples of the same prompt; "
                          f"needs n_samples >= 2, got {r.n_samples}")
    if B % a.mini_batches:
        raise ConfigError(f"algo.mini_batches: {a.mini_batches} does not divide the {B} sequences of a step "
                          f"(prompts_per_step {a.prompts_per_step} x n_samples {r.n_samples})")
    M = B // a.mini_batches
    old_logprobs = _old_logprobs(cfg)
    if lc.global_batch_size is not None and lc.global_batch_size != M:
        raise ConfigError(f"learner.global_batch_size: RL jobs take one optimizer step per mini-batch of "
                          f"prompts_per_step x n_samples / mini_batches = {M} sequences; leave it unset "
                          f"(got {lc.global_batch_size})")
    critic_workers = cfg.critic.num_workers or lc.num_workers
    for key, workers in (("learner.num_workers", lc.num_workers), ("critic.num_workers", critic_workers)):
        if M % (lc.micro_batch_size * workers):
            raise ConfigError(f"{key}: a mini-batch of {M} sequences (prompts_per_step x n_samples / mini_batches) "
                              f"must split into {workers} workers x micro-batches of learner.micro_batch_size="
                              f"{lc.micro_batch_size}")
    reference = a.uses_reference
    rl = RLSettings(advantage=advantage, old_logprobs=old_logprobs, kl_in_loss=reference and a.kl_in == "loss",
                    kl_in_reward=reference and a.kl_in == "reward", whiten_advantages=advantage == "gae",
                    off_policy_correction=_off_policy_correction(cfg, old_logprobs))
    return BatchShape(per_step=B, per_update=M, updates_per_step=a.mini_batches * a.ppo_epochs), rl


def _evaluation(cfg: "Config") -> Optional[EvalSettings]:
    """How an evaluation samples and counts: job eval's, or the held-out evaluation of a rollout training job
    (``train.eval_every``); None for the other jobs. Job eval samples as its rollout section says unless ``eval.*``
    says otherwise; training evaluates one greedy response per prompt unless ``eval.n_samples`` /
    ``eval.temperature`` say otherwise (the rollout section is the training's sampling)."""
    if cfg.job not in ("eval", *POLICY_JOBS):
        return None
    e, r, training = cfg.eval, cfg.rollout, cfg.job != "eval"
    n_key = "eval.n_samples" if e.n_samples is not None or training else "rollout.n_samples"
    n = e.n_samples if e.n_samples is not None else (1 if training else r.n_samples)
    if e.temperature is not None:
        t_key, temperature = "eval.temperature", e.temperature
    elif training and n == 1:
        t_key, temperature = "eval.temperature", 0.0  # one greedy response per prompt
    else:
        t_key, temperature = "rollout.temperature", r.temperature
    for k in e.ks:
        if k > n:
            raise ConfigError(f"eval.ks: k={k} is more than the {n_key}={n} samples per prompt; pass@k and maj@k "
                              f"take k of a prompt's n samples, so raise {n_key} to >= {k}")
    if temperature == 0 and n > 1:
        raise ConfigError(f"{t_key}: 0 is greedy decoding, which makes the {n_key}={n} samples of a prompt one and "
                          "the same response; set a temperature > 0 for pass@k / maj@k (and eval.greedy=true for a "
                          f"greedy response beside them), or {n_key}=1")
    return EvalSettings(n=n, temperature=temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                        ks=tuple(e.ks) or tuple(sorted({1, n})), correct_threshold=e.correct_threshold,
                        vote_on=e.vote_on, greedy=e.greedy)


def best_mode(metric: str, mode: Optional[str]) -> Literal["max", "min"]:
    """Which way ``metric`` improves: ``mode`` when given, else min for a loss (a metric with "loss" in its
    name) and max for anything else (rewards, accuracies, pass@k)."""
    if mode is not None:
        return mode  # type: ignore[return-value]
    return "min" if "loss" in metric.rsplit("/", 1)[-1] else "max"


def _best(cfg: "Config", evaluation: Optional[EvalSettings]) -> Optional[BestSettings]:
    """``train.keep_best``, checked: a job that trains, evaluations to choose among, and for the rollout jobs a
    metric their evaluation logs (the offline jobs' eval keys are checked at their first evaluation)."""
    tc, metric = cfg.train, cfg.train.keep_best
    if metric is None:
        return None
    if cfg.job in ("eval", "best_of_n"):
        raise ConfigError(f"train.keep_best: job {cfg.job} trains no model to keep; leave it unset")
    if not metric.startswith("eval/"):
        raise ConfigError(f"train.keep_best: names a held-out eval metric (eval/...), got {metric!r}; the best model "
                          "is chosen among the evaluations")
    if not tc.eval_every:
        raise ConfigError("train.keep_best: the best model is chosen among the evaluations; set train.eval_every > 0")
    if not cfg.data.eval_path and cfg.data.eval_fraction <= 0:
        raise ConfigError("train.keep_best: needs a held-out set to evaluate on: data.eval_fraction or data.eval_path")
    if evaluation is not None and not metric.startswith("eval/reward/"):
        names = eval_metric_names(evaluation)
        if metric not in names:
            raise ConfigError(f"train.keep_best: the evaluation of job {cfg.job} logs no {metric!r}; it logs "
                              f"{', '.join(names)} and eval/reward/<source>_mean")
    return BestSettings(metric, best_mode(metric, tc.keep_best_mode))


def _old_logprobs(cfg: "Config") -> Literal["learner", "update", "rollout"]:
    """``algo.old_logprobs`` with ``auto`` resolved: the update's own forward pass where that is exact, else a
    learner pass. The update's forward pass is pi_old only while no optimizer step has moved the policy yet and
    nothing needs pi_old before the update (the reference KL, in the reward or as a metric for the controller)."""
    a = cfg.algo
    update_is_exact = a.mini_batches == 1 and a.ppo_epochs == 1 and not a.uses_reference
    if a.old_logprobs == "auto":
        return "update" if update_is_exact else "learner"
    if a.old_logprobs == "update" and not update_is_exact:
        raise ConfigError("algo.old_logprobs: update takes pi_old from the update's own forward pass, which is exact "
                          "only with mini_batches 1, ppo_epochs 1 and no reference model (kl_coef 0, no "
                          f"adaptive_kl_target); got mini_batches {a.mini_batches}, ppo_epochs {a.ppo_epochs}, "
                          f"kl_coef {a.kl_coef}; use learner")
    return a.old_logprobs  # type: ignore[return-value]


def _off_policy_correction(cfg: "Config", old_logprobs: str) -> Optional[str]:
    """``algo.off_policy_correction`` where it has something to correct: None when pi_old is the rollout engine's
    own log-probs (the ratio pi_old / mu is then 1). The default token_tis turns off there by itself; a
    correction chosen on purpose is refused, since it would do nothing."""
    name = cfg.algo.off_policy_correction
    if old_logprobs != "rollout":
        return name
    if name not in ("none", "token_tis"):
        raise ConfigError(f"algo.off_policy_correction: {name} weighs the learner's pi_old against the rollout "
                          "engine's log-probs, and algo.old_logprobs: rollout makes them the same numbers, so it "
                          "would do nothing; use old_logprobs learner (or auto), or off_policy_correction: none")
    return None


def _reference(cfg: "Config") -> Optional[Literal["precompute", "group"]]:
    """Whether the job scores against a frozen reference model, and how."""
    if cfg.job in ("ppo", "grpo"):
        return "group" if cfg.algo.uses_reference else None
    if cfg.job == "online_dpo":
        return None if cfg.dpo.loss in REFERENCE_FREE_PREFERENCE_LOSSES else "group"
    if cfg.job == "dpo":
        return None if cfg.dpo.loss in REFERENCE_FREE_PREFERENCE_LOSSES else cfg.dpo.reference
    if cfg.job == "kto":
        return cfg.kto.reference
    return None


# ---- roles ----------------------------------------------------------------------------------------

def _roles(cfg: "Config", paths: Paths, batch: BatchShape, reference: Optional[str],
           on_cuda: bool) -> tuple[RoleSpec, ...]:
    """The job's roles in placement-request order: the policy, reference, critic, reward model, engines."""
    lc, tc = cfg.learner, cfg.train
    model = dataclasses.replace(cfg.model, path=paths.model, tokenizer=paths.tokenizer)

    def learner(name: str, placement_role: str, model_cfg: ModelConfig, learner_cfg: LearnerConfig, head: str,
                trainable: bool, optim: OptimConfig = cfg.optim) -> LearnerRoleSpec:
        gpus = learner_cfg.gpus_per_worker
        return LearnerRoleSpec(name, placement_role, model_cfg, learner_cfg, optim, head,  # type: ignore[arg-type]
                               trainable, gpus, learner_cfg.cpus_per_worker,
                               auto_dtype(cfg.model.dtype, on_cuda and gpus > 0), tc.seed, tc.on_nonfinite)

    policy_lc = dataclasses.replace(lc, global_batch_size=batch.per_update)
    if cfg.job not in RL_JOBS:
        head = "sequence_score" if cfg.job == "rm" else "causal_lm"
        roles: list[RoleSpec] = [learner("learner", "learner", model, policy_lc, head, True)]
        if reference == "group":
            roles.append(learner("reference", "reference", model, policy_lc, head, False))
        return tuple(roles)
    roles = []
    if cfg.job in POLICY_JOBS:
        roles.append(learner("actor", "actor", model, policy_lc, "causal_lm", True))
    if reference == "group":
        roles.append(learner("reference", "reference", model, policy_lc, "causal_lm", False))
    if cfg.job == "ppo":
        critic_model = dataclasses.replace(model, path=paths.critic_model or paths.model)
        critic_lc = dataclasses.replace(policy_lc, num_workers=cfg.critic.num_workers or lc.num_workers)
        critic_optim = dataclasses.replace(cfg.optim, lr=cfg.critic.lr, warmup_steps=cfg.critic.warmup_steps)
        roles.append(learner("critic", "critic", critic_model, critic_lc, "token_value", True, critic_optim))
    if paths.reward_model:
        r = cfg.reward
        rm_model = dataclasses.replace(cfg.model, path=paths.reward_model, tokenizer=None,
                                       lora=dataclasses.replace(cfg.model.lora, enabled=False, load_in_4bit=False))
        rm_lc = dataclasses.replace(lc, num_workers=r.num_workers, gpus_per_worker=r.gpus_per_worker,
                                    global_batch_size=lc.micro_batch_size * r.num_workers,
                                    zero_stage=0 if lc.zero_stage < 3 else 3)
        roles.append(learner("reward_model", "reward", rm_model, rm_lc, "sequence_score", False))
    ro = cfg.rollout
    engine_gpus = float(ro.tensor_parallel_size) if lc.gpus_per_worker > 0 else 0.0
    roles.append(RolloutRoleSpec(
        model_path=paths.model, tokenizer_path=paths.tokenizer, trust_remote_code=cfg.model.trust_remote_code,
        rollout=ro, dtype=auto_dtype(cfg.model.dtype, on_cuda), sleep_mode=cfg.placement.mode == "hybrid",
        max_model_len=ro.max_model_len or _default_max_model_len(cfg), gpus=engine_gpus,
        cpus=ro.cpus_per_engine, seed=tc.seed if ro.seed is None else ro.seed))
    if paths.judge_model:
        roles.append(_judge_role(cfg, paths.judge_model, lc.gpus_per_worker > 0, on_cuda))
    return tuple(roles)


def _judge_role(cfg: "Config", path: str, on_gpus: bool, on_cuda: bool) -> RolloutRoleSpec:
    """``reward.judge``'s engines: a rollout role of their own (own pool in every placement mode, never asleep),
    greedy by default, sampling ``max_new_tokens`` verdict tokens."""
    from rlhf_ray.rewards.judge import load_template

    j = cfg.reward.judge
    check_judge_model(path)
    if j.pairwise and cfg.job != "online_dpo":
        raise ConfigError(f"reward.judge.pairwise: labels online DPO's pairs (job online_dpo); job {cfg.job} scores "
                          "each response, so set it false (the judge then scores with reward.judge.template)")
    if j.pairwise:
        from rlhf_ray.rewards.judge import load_pair_template

        # the prompt and two responses: the policy's prompt + response budget and one more response
        template = load_pair_template(j.pairwise_template, j.reference_field) + " " * cfg.rollout.response_budget
    else:
        template = load_template(j.template, j.reference_field)
    # The template's characters bound its tokens; the judged prompt and response fit the policy's own length.
    max_len = j.max_model_len or _default_max_model_len(cfg) + len(template) + j.max_new_tokens
    return RolloutRoleSpec(
        model_path=path, tokenizer_path=path, trust_remote_code=cfg.model.trust_remote_code,
        rollout=judge_rollout(cfg.rollout, j), dtype=auto_dtype(cfg.model.dtype, on_cuda), sleep_mode=False,
        max_model_len=max_len, gpus=float(j.tensor_parallel_size) if on_gpus else 0.0, cpus=j.cpus_per_engine,
        seed=cfg.train.seed, name="judge", placement_role="judge")


def check_judge_model(path: str) -> None:
    """``ConfigError`` naming ``reward.judge.model`` when it is a local path (``/``, ``./``, ``../``, ``~``) that
    does not exist; anything else is taken as a hub name."""
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise ConfigError(f"reward.judge.model: {path} does not exist (a local judge model's directory, or a hub name)")


def judge_rollout(base: RolloutConfig, j: JudgeConfig) -> RolloutConfig:
    """The engine settings of ``reward.judge``'s engines: ``base``'s (the run's ``rollout`` section, or its
    defaults for the reward server's judge) with the judge's own sampling (one greedy-by-default verdict of
    ``max_new_tokens``), devices and memory, synchronous, no stop strings or extra engine arguments."""
    return dataclasses.replace(
        base, num_engines=j.num_engines, tensor_parallel_size=j.tensor_parallel_size,
        cpus_per_engine=j.cpus_per_engine, n_samples=1, temperature=j.temperature, top_p=1.0, top_k=-1,
        max_new_tokens=j.max_new_tokens, stop=[], ignore_eos=False, kv_cache_memory_gb=j.kv_cache_memory_gb,
        gpu_memory_utilization=j.gpu_memory_utilization, enforce_eager=j.enforce_eager, max_model_len=None,
        engine_kwargs={}, mode="sync")


# ---- checks across sections -------------------------------------------------------------------------

def _check_qlora(cfg: "Config") -> None:
    """QLoRA (``model.lora.load_in_4bit``) needs LoRA on, bitsandbytes, and parameters ZeRO does not partition."""
    if not cfg.model.lora.load_in_4bit:
        return
    if not cfg.model.lora.enabled:
        raise ConfigError("model.lora.load_in_4bit: QLoRA trains LoRA adapters on the 4-bit base; set "
                          "model.lora.enabled=true (or load_in_4bit=false)")
    if cfg.learner.zero_stage == 3:
        raise ConfigError("learner.zero_stage: ZeRO-3 partitions parameters, which bitsandbytes' packed 4-bit "
                          "weights do not support; use zero_stage 0-2 with model.lora.load_in_4bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.lora.load_in_4bit: needs bitsandbytes (pip install bitsandbytes)")


def _check_placement(cfg: "Config") -> None:
    """What hybrid placement and the CUDA-IPC sync need of the engines and the learners."""
    r, lc = cfg.rollout, cfg.learner
    if cfg.placement.mode == "hybrid":
        if r.tensor_parallel_size != 1:
            raise ConfigError("rollout.tensor_parallel_size: hybrid placement puts one engine on each learner GPU; "
                              "it needs tensor_parallel_size 1 (use placement.mode separate or shared for TP)")
        if r.num_engines != lc.num_workers:
            raise ConfigError(f"rollout.num_engines: hybrid placement needs one engine per learner GPU "
                              f"({lc.num_workers}), got {r.num_engines}")
        # While vLLM generates, the learners move their training state to host memory with DeepSpeed's
        # offload_states, which only ZeRO's optimizers offer, and not for parameters ZeRO-3 already offloads.
        if lc.zero_stage == 0:
            raise ConfigError("learner.zero_stage: hybrid placement offloads the learners' optimizer state while "
                              "vLLM generates, which DeepSpeed does for ZeRO stages 1-3 only; use zero_stage 1-3")
        if lc.zero_stage == 3 and lc.offload:
            raise ConfigError("learner.offload: with ZeRO-3 it keeps parameters in host memory, which DeepSpeed "
                              "cannot move again for hybrid placement; use learner.offload false or zero_stage 1-2")
    if r.weight_sync_backend == "ipc" and cfg.placement.mode != "hybrid":
        raise ConfigError("rollout.weight_sync_backend: ipc shares GPU memory, so it needs placement.mode hybrid")


def _check_rollout_mode(cfg: "Config") -> None:
    """Overlapping generation with training needs a training rollout job and engines on their own devices;
    DAPO's refills need group-relative advantages (any rollout mode: async refills as groups are scored)."""
    r = cfg.rollout
    if cfg.algo.filter_groups:
        if cfg.job != "grpo":
            raise ConfigError(f"algo.filter_groups: drops prompts whose samples' rewards are all equal, which carry "
                              f"no group-relative advantage; job {cfg.job} does not use one (use job grpo)")
        if r.n_samples < 2:
            raise ConfigError("algo.filter_groups: a group of rollout.n_samples=1 never has differing rewards; "
                              "use n_samples >= 2")
    if r.mode != "sync":
        if cfg.job not in ("ppo", "grpo", "online_dpo"):
            raise ConfigError(f"rollout.mode: {r.mode} overlaps generation with training; job {cfg.job} does not "
                              "train on rollouts (use sync)")
        if cfg.placement.mode == "hybrid":
            raise ConfigError(f"rollout.mode: {r.mode} generates while the learners train, which needs the engines "
                              "on their own devices; hybrid placement time-shares one GPU (use placement.mode "
                              "separate or shared, or rollout.mode sync)")


def _default_max_model_len(cfg: "Config") -> int:
    """The engines' context when ``rollout.max_model_len`` is unset: a prompt and a response, or (multi-turn) a
    prompt, ``max_turns`` responses and an observation between each two."""
    r = cfg.rollout
    if not r.multi_turn:
        return cfg.data.max_prompt_length + r.max_new_tokens
    return cfg.data.max_prompt_length + r.response_budget + (r.max_turns - 1) * r.max_observation_tokens


MULTI_TURN_JOBS = ("ppo", "grpo", "online_dpo")
"""The jobs whose rollouts may be multi-turn episodes (``rollout.env`` / ``rollout.tools``)."""


def _check_multi_turn(cfg: "Config") -> None:
    """Multi-turn episodes (``rlhf_ray.agentic``): a training job that samples with sync or one-step-off rollouts
    (the async stream samples one request per sample, not episodes), observations
    rendered as chat turns, and a reward for the tool environment (which gives none itself)."""
    r = cfg.rollout
    if not r.multi_turn:
        return
    key = "rollout.env" if r.env is not None else "rollout.tools"
    if cfg.job not in MULTI_TURN_JOBS:
        raise ConfigError(f"{key}: job {cfg.job} does not run multi-turn episodes yet; jobs "
                          f"{', '.join(MULTI_TURN_JOBS)} do")
    if r.mode == "async":
        raise ConfigError(f"{key}: multi-turn episodes run with rollout.mode sync or one_step_off for now, got "
                          f"rollout.mode async; set rollout.mode=one_step_off (or drop {key})")
    if not cfg.data.apply_chat_template:
        raise ConfigError(f"{key}: observations are appended as chat turns in the chat template's markup; set "
                          "data.apply_chat_template=true (the tokenizer needs a chat template)")
    if r.tools and not cfg.reward.functions and not cfg.reward.model and not cfg.reward.judge.model:
        raise ConfigError("reward.functions: the tool environment (rollout.tools) gives no reward of its own; "
                          "name a reward function (it gets the last turn as the response and the whole episode as "
                          "the row field 'trajectory'), a reward.model or a judge (reward.judge.model)")


def _check_overlong(cfg: "Config") -> None:
    """The overlong penalty's buffer fits in the responses it shapes."""
    r = cfg.reward
    if r.overlong_penalty > 0 and r.overlong_buffer is not None and r.overlong_buffer > cfg.rollout.max_new_tokens:
        raise ConfigError(f"reward.overlong_buffer: {r.overlong_buffer} tokens is more than the "
                          f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} a response may have; the penalty "
                          "grows over the last overlong_buffer tokens before that limit, so give at most that many")


def _sync_backend(cfg: "Config", accelerator: Accelerator) -> Literal["gloo", "nccl", "ipc"]:
    """``rollout.weight_sync_backend`` resolved: auto is CUDA IPC when the engines share the policy's GPUs
    (hybrid), NCCL to engines on other GPUs, gloo on CPU; NCCL and IPC need CUDA learners."""
    wanted = cfg.rollout.weight_sync_backend
    if wanted == "auto":
        if accelerator == "cpu":
            return "gloo"
        return "ipc" if cfg.placement.mode == "hybrid" else "nccl"
    if wanted in ("nccl", "ipc") and accelerator == "cpu":
        raise ConfigError(f"rollout.weight_sync_backend: {wanted} needs CUDA learners; these run on CPU "
                          "(use auto or gloo)")
    return wanted
