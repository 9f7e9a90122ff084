"""The one typed config tree. Every default is defined here (and in ``job_sections``), once.

YAML files, ``key=value`` CLI overrides and ``ray job submit -- rlhf-ray train ...`` all fill these
dataclasses through ``rlhf_ray.config.load_config``. Each ``__post_init__`` checks its own section's
ranges and raises ``ConfigError`` with the key and what to change; checks across sections, and every
value a run derives from the config, live in ``rlhf_ray.config.resolve`` (nothing here is written after
it is built).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from rlhf_ray.config.errors import check as _check
from rlhf_ray.config.job_sections import (AlgoConfig, BestOfNConfig, CriticConfig, DPOConfig, EvalConfig, KTOConfig,
                                          RewardConfig, RewardModelTrainConfig, RolloutConfig)

__all__ = ["AlgoConfig", "BestOfNConfig", "Config", "CriticConfig", "DPOConfig", "DataConfig", "EvalConfig", "JOBS",
           "KTOConfig",
           "LearnerConfig", "LoggingConfig", "LoraConfig", "ModelConfig", "OptimConfig", "PLACEMENT_ROLES",
           "PLACEMENT_STRATEGIES", "PlacementConfig", "RL_JOBS", "RayConfig", "RewardConfig",
           "RewardModelTrainConfig", "RolloutConfig", "TrainConfig"]

JOBS = ("sft", "rm", "dpo", "kto", "best_of_n", "online_dpo", "ppo", "grpo", "eval")
"""Values of the root ``job`` key (``rlhf_ray.jobs.JOBS`` maps each to its module)."""
RL_JOBS = ("ppo", "grpo", "online_dpo", "best_of_n", "eval")
"""Jobs that sample from vLLM rollout engines and score with rewards (all but best_of_n and eval also train a
policy)."""


@dataclass
class LoraConfig:
    """Low-rank adapters through peft; merged into the base weights on export and weight sync."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    load_in_4bit: bool = False
    """QLoRA: the frozen base in 4 bit (bitsandbytes NF4), LoRA adapters trained on top; needs ``enabled``,
    bitsandbytes installed and ZeRO stage 0-2. Exports and weight syncs are dense (base dequantized, adapters
    merged), and the learner computes with exactly those weights in training and in eval (bitsandbytes' bf16
    CPU inference kernel, which repacks the weights, is kept off)."""

    def __post_init__(self) -> None:
        _check(self.rank > 0, "rank", f"must be > 0, got {self.rank}")
        _check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "target_modules", "must name at least one module")


@dataclass
class ModelConfig:
    """The policy (or trained) model: a hub name or a local directory in HF format."""

    path: str = ""
    """Hub name or local directory; `rlhf-ray make-tiny-model DIR` writes a tiny one."""
    tokenizer: Optional[str] = None
    """Tokenizer name or path; defaults to `path`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto = bfloat16 on GPU, float32 on CPU."""
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _check(bool(self.path), "path", "is required: a hub name or a local model directory")


@dataclass
class DataConfig:
    """Where the rows come from and how they become token ids."""

    path: str = "demo:arithmetic"
    """A local .jsonl / .json / .parquet file, a `datasets` hub name, or `demo:<name>` (built in)."""
    split: str = "train"
    subset: Optional[str] = None
    """Hub data sets: the configuration name (``datasets.load_dataset(path, subset)``, e.g. gsm8k's "main")."""
    format: Literal["auto", "jsonl", "json", "parquet", "hf"] = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    """OpenAI-style list of {role, content}; used when rows carry it instead of prompt/response."""
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    answer_field: str = "answer"
    """Ground truth for verifiable rewards (RL jobs): the row field reward functions receive as ``answer``
    (``builtin:math`` grades against it); the row's other fields reach them under their own names."""
    system_prompt: Optional[str] = None
    apply_chat_template: bool = True
    max_length: int = 512
    """Maximum tokens per example (prompt + response)."""
    max_prompt_length: int = 256
    """RL / preference jobs: maximum prompt tokens."""
    overlength: Literal["truncate", "drop", "error"] = "truncate"
    on_bad_row: Literal["error", "skip"] = "error"
    packing: bool = False
    """Concatenate several examples into one row of `max_length` tokens (attention kept per example)."""
    shuffle: bool = True
    max_samples: Optional[int] = None
    eval_fraction: float = 0.0
    """Fraction of rows held out for evaluation (taken after a seeded shuffle)."""
    eval_path: Optional[str] = None
    demo_size: int = 512
    """Rows in the built-in `demo:` data sets."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "path", "is required")
        _check(self.max_length > 1, "max_length", f"must be > 1, got {self.max_length}")
        _check(self.max_prompt_length > 0, "max_prompt_length", f"must be > 0, got {self.max_prompt_length}")
        _check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        _check(self.max_samples is None or self.max_samples > 0, "max_samples", "must be > 0")
        _check(self.demo_size > 0, "demo_size", "must be > 0")


@dataclass
class OptimConfig:
    """AdamW with warmup and a decay schedule."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables it."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        _check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")


@dataclass
class LearnerConfig:
    """A DeepSpeed learner group: N Ray actors, one per GPU (or CPU process)."""

    num_workers: int = 1
    gpus_per_worker: float = 1.0
    """Set 0 to run on CPU (gloo); `auto` device selection follows this."""
    cpus_per_worker: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = False
    """ZeRO-Offload: optimizer state (and parameters at stage 3) in host memory."""
    micro_batch_size: int = 4
    """Rows per worker per forward pass."""
    global_batch_size: Optional[int] = None
    """Rows per optimizer step across all workers = micro_batch_size x workers x accumulation. Unset: one
    micro-batch per worker (SFT / RM / DPO / KTO); RL jobs derive it from the rollout batch
    (prompts_per_step x n_samples / mini_batches) and refuse a different explicit value."""
    zero3_bucket_mb: int = 256
    """Bucket size for ZeRO-3 parameter gathering when exporting / syncing weights."""

    @property
    def grad_accum_steps(self) -> int:
        return (self.global_batch_size or self.micro_batch_size * self.num_workers) // (
            self.micro_batch_size * self.num_workers)

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        _check(self.gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0")
        _check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        per_pass = self.micro_batch_size * self.num_workers
        _check(
            self.global_batch_size is None or (self.global_batch_size >= per_pass
                                               and self.global_batch_size % per_pass == 0),
            "global_batch_size",
            f"must be a multiple of micro_batch_size x num_workers = {per_pass}, got {self.global_batch_size}",
        )


@dataclass
class TrainConfig:
    """The step loop: how long, how often to save / evaluate, where outputs go."""

    output_dir: str = "runs/sft"
    epochs: int = 1
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs when set)."""
    save_every: int = 0
    """Checkpoint every K steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    eval_every: int = 0
    """Evaluate on the held-out set (``data.eval_fraction`` / ``data.eval_path``) every K steps and after the last
    (0 = never). Rollout training jobs also evaluate before the first step (logged at step 0) and sample as the
    ``eval`` section says; the preference jobs evaluate at step 0 too."""
    keep_best: Optional[str] = None
    """An eval metric (e.g. ``eval/pass@1``, ``eval/loss``): after every evaluation that beats the best so far by
    it (``keep_best_mode``), the policy is exported to ``<output_dir>/best/`` (with ``best.json``: metric, value,
    step), replaced atomically as ``final/`` is. Needs ``eval_every`` and a held-out set."""
    keep_best_mode: Optional[Literal["max", "min"]] = None
    """max: higher is better; min: lower is. Unset: min for a metric with "loss" in its name, else max."""
    resume: bool = False
    """Continue from the latest checkpoint in output_dir: step, data position, optimizer, scheduler, RNG. A
    checkpoint of another job is refused; one trained from another model or data is refused unless
    ``resume_mismatch_ok``."""
    resume_mismatch_ok: bool = False
    """Resume a checkpoint whose model path or data (path, item count) differ from this config's, on purpose."""
    overwrite: bool = False
    """Start over in an output_dir that already holds a run (its metrics and checkpoints are deleted)."""
    seed: int = 1234
    timeout_s: float = 600.0
    """Upper bound for any one remote call or collective; a stall past it ends the run with an error naming it
    (or, within ``max_restarts``, starts a recovery)."""
    start_timeout_s: float = 1800.0
    """Upper bound for starting a role (placement groups ready, models loaded, vLLM engines up): far longer
    than any step's call on GPUs, where an engine start loads weights and captures CUDA graphs."""
    max_restarts: Optional[int] = None
    """How many faults a run recovers from by itself (default: 3 for rollout jobs, 0 for the others). A fault
    is an actor that died (a rollout engine or a learner rank) or a call past ``timeout_s``: a dead or stalled
    rollout engine is replaced in place and its step redone; anything else removes every role, starts them
    again and resumes from the latest checkpoint. An error raised by the code itself (bad data, a non-finite
    loss, a reward function's exception) is not a fault: it would happen again, so the run stops on it."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm on a learner: ``stop`` ends the run with an error naming the optimizer
    step, rank and value, before the weights reach the rollout engines or a checkpoint; ``skip`` drops that
    optimizer step's update on every data-parallel rank (weights, optimizer moments and LR schedule stay as they
    were), logs it, counts it in the step's ``*/skipped_updates`` metric and goes on."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        _check(self.save_every >= 0, "save_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.eval_every >= 0, "eval_every", "must be >= 0")
        _check(self.keep_best is None or bool(self.keep_best.strip()), "keep_best",
               "must name an eval metric (e.g. eval/pass@1), or be null")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
        _check(self.start_timeout_s > 0, "start_timeout_s", "must be > 0")
        _check(self.max_restarts is None or self.max_restarts >= 0, "max_restarts", "must be >= 0")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
"""Ray placement-group strategies (``controller.placement.Strategy`` is this ``Literal``)."""


@dataclass
class PlacementConfig:
    """How roles share GPUs and which nodes they run on.

    Role names: ``actor``, ``reference``, ``critic``, ``reward``, ``rollout`` (ppo, grpo) and
    ``learner``, ``reference`` (sft, rm, dpo, kto, ...). The plan (pools, strategies, selectors) is
    printed and checked against the cluster before any actor starts.
    """

    mode: Literal["separate", "shared", "hybrid"] = "separate"
    """separate: every role on its own GPUs; shared: actor+reference and critic+reward share;
    hybrid: learners and vLLM on the same GPUs (vLLM sleeps while learners train)."""
    strategy: Literal[PLACEMENT_STRATEGIES] = "PACK"
    """How each role's placement group spreads its bundles (one bundle per worker / engine): PACK fills a
    node first; SPREAD prefers different nodes; STRICT_PACK requires one node; STRICT_SPREAD requires a
    different node per bundle."""
    role_strategy: dict[str, str] = field(default_factory=dict)
    """Per role, a strategy overriding ``strategy``, e.g. ``{rollout: SPREAD, actor: STRICT_PACK}``
    (colocated roles share one placement group and must agree)."""
    node_selector: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per role, the Ray node labels its workers require, e.g.
    ``{actor: {rlhf-ray/pool: learner}, rollout: {rlhf-ray/pool: rollout}}`` puts the learners on nodes
    started with ``--labels rlhf-ray/pool=learner`` and the vLLM engines on the ``rollout`` ones. Nodes
    get labels from ``ray start --labels k=v``, ``labels:`` of a cluster-launcher node type, or
    ``labels:`` of a KubeRay worker group (see cluster_configs/). A value may be Ray selector syntax:
    ``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``; Ray's own labels work too (``ray.io/accelerator-type: H100``).
    Colocated roles share one placement group: their selectors are merged. A selector no alive node
    satisfies stops the job before any actor starts. Override one label from the command line with
    ``placement.node_selector.rollout.rlhf-ray/pool=rollout`` (keys without dots)."""

    def __post_init__(self) -> None:
        import re

        name = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"  # Kubernetes / Ray label syntax
        label_key = re.compile(rf"({name}(\.{name})*/)?{name}")
        label_selector = re.compile(rf"!?(in\({name}(, ?{name})*\)|{name})")
        for key, mapping in (("role_strategy", self.role_strategy), ("node_selector", self.node_selector)):
            unknown = sorted(set(mapping) - set(PLACEMENT_ROLES))
            _check(not unknown, key, f"unknown role(s) {unknown}; roles are {list(PLACEMENT_ROLES)}")
        for role, strat in self.role_strategy.items():
            _check(strat in PLACEMENT_STRATEGIES, f"role_strategy.{role}",
                   f"must be one of {list(PLACEMENT_STRATEGIES)}, got {strat!r}")
        for role, selector in self.node_selector.items():
            _check(isinstance(selector, dict), f"node_selector.{role}",
                   f"must be a mapping of node label to value, e.g. {{rlhf-ray/pool: {role}}}, got {selector!r}")
            for label, value in selector.items():
                _check(isinstance(label, str) and label_key.fullmatch(label) is not None, f"node_selector.{role}",
                       f"{label!r} is not a valid label key ([prefix/]name, e.g. rlhf-ray/pool)")
                _check(isinstance(value, str) and label_selector.fullmatch(value) is not None,
                       f"node_selector.{role}.{label}",
                       f"{value!r} is not a label value or selector (v, !v, in(a,b), !in(a,b))")


PLACEMENT_ROLES = ("actor", "reference", "critic", "reward", "rollout", "learner")
"""Role names ``placement.role_strategy`` and ``placement.node_selector`` accept."""


@dataclass
class LoggingConfig:
    wandb: Literal["off", "online", "offline"] = "off"
    wandb_project: str = "rlhf_ray"
    run_name: Optional[str] = None
    tensorboard: bool = True
    progress_bar: bool = True
    rollouts: bool = False
    """Rollout jobs: write every sample a step trained on to ``<output_dir>/rollouts.jsonl`` (step, the prompt's
    row, response, reward, staleness), to read what the policy did and to check which prompts each step took."""


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Ray address; None starts (or joins, if RAY_ADDRESS is set) a local instance."""
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    """Logical GPUs to declare when starting a local instance (tests declare GPUs on CPU nodes)."""


@dataclass
class Config:
    """The root: which job to run and its sections."""

    model: ModelConfig
    job: Literal[JOBS] = "sft"
    data: DataConfig = field(default_factory=DataConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    rm: RewardModelTrainConfig = field(default_factory=RewardModelTrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    best_of_n: BestOfNConfig = field(default_factory=BestOfNConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # The checks across sections are the resolution of the whole tree (``rlhf_ray.config.resolve``): a
        # config is valid when it resolves. The result is not kept: the tree stays as the user gave it.
        from rlhf_ray.config.resolve import resolve

        resolve(self)
