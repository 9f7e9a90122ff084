"""The one typed config tree. Every default is defined here, once.

YAML files, ``key=value`` CLI overrides and ``ray job submit -- rlhf-ray train ...`` all fill these
dataclasses through ``rlhf_ray.config.load_config``. Each ``__post_init__`` checks ranges and
raises ``ConfigError`` with the key and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from rlhf_ray.config.loader import ConfigError


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


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
    merged)."""

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
    """Ground truth for verifiable rewards (RL jobs); passed to reward functions as a row field."""
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
    resume: bool = False
    """Continue from the latest checkpoint in output_dir: step, data position, optimizer, scheduler, RNG."""
    overwrite: bool = False
    """Start over in an output_dir that already holds a run (its metrics and checkpoints are deleted)."""
    seed: int = 1234
    timeout_s: float = 600.0
    """Upper bound for any one remote call or collective; a stall past it ends the run with an error naming it."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        _check(self.save_every >= 0, "save_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")


@dataclass
class RolloutConfig:
    """vLLM engines (Ray actors) that generate rollouts from the current policy."""

    num_engines: int = 1
    tensor_parallel_size: int = 1
    """GPUs per engine (engines run on GPUs exactly when learner.gpus_per_worker > 0)."""
    cpus_per_engine: float = 1.0
    n_samples: int = 4
    """Responses per prompt (the GRPO / RLOO group size)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take (weights + KV cache) on GPU builds."""
    kv_cache_memory_gb: Optional[float] = None
    """Explicit KV-cache size in GiB; unset: from gpu_memory_utilization on GPU, 0.5 GiB on CPU builds."""
    ignore_eos: bool = False
    """Always generate max_new_tokens (benchmarks with fixed response length)."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``vllm.LLM`` arguments passed as is (e.g. compilation_config), for tuning beyond the keys above."""
    max_num_seqs: int = 256
    max_model_len: Optional[int] = None
    """Defaults to data.max_prompt_length + max_new_tokens."""
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    sleep_between_steps: bool = False
    """Hybrid placement: vLLM releases its memory while the learners train."""
    weight_sync_backend: Literal["auto", "nccl", "gloo", "ipc"] = "auto"
    """auto: CUDA IPC when engines share GPUs with the policy (hybrid), NCCL on other GPUs, gloo on CPU."""
    weight_sync_bucket_mb: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.num_engines >= 1, "num_engines", "must be >= 1")
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        _check(self.n_samples >= 1, "n_samples", "must be >= 1")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        _check(self.weight_sync_bucket_mb >= 1, "weight_sync_bucket_mb", "must be >= 1")


@dataclass
class AlgoConfig:
    """The RL algorithm (PPO / GRPO / REINFORCE family): advantages, losses, KL, update schedule."""

    advantage: Optional[Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]] = None
    """Advantage estimator (``rlhf_ray.algos.advantages.ADVANTAGES``). Unset: ``gae`` for job ppo (with a critic),
    ``grpo`` for job grpo; job grpo also runs the critic-free rloo, dr_grpo and reinforce_pp(_baseline)."""
    policy_loss: Literal["ppo_clip", "vanilla_pg"] = "ppo_clip"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    """Upper clip (set above clip_ratio_low for DAPO-style asymmetric clipping)."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 for negative advantages (Ye et al. 2020); None disables it."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"] = "token_mean"
    kl_coef: float = 0.0
    """KL penalty against the reference model; 0 skips the reference forward entirely."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in: Literal["reward", "loss"] = "loss"
    adaptive_kl_target: Optional[float] = None
    """Target KL for the adaptive controller (Ziegler et al.); None keeps kl_coef fixed."""
    adaptive_kl_horizon: int = 10000
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    norm_adv_by_std: bool = True
    """GRPO: divide by the group std (off = Dr. GRPO-like centering only)."""
    old_logprobs: Literal["auto", "learner", "update", "rollout"] = "auto"
    """pi_old of the PPO ratio. learner: a forward pass of the policy learners before the update. update: the
    update's own forward pass, detached (one forward pass less per step, as TRL does when on-policy; exact only
    when a step makes one optimizer step, mini_batches 1 and ppo_epochs 1, and without a reference model, whose
    KL is taken at pi_old before the update). rollout: the log-probs vLLM returned while sampling (also one
    pass less; the ratio is then taken against the engine's numbers). auto: update where it is exact, else
    learner (resolved at load)."""
    importance_cap: Optional[float] = 2.0
    """Truncated importance weight min(exp(old - rollout logp), cap) correcting vLLM/learner mismatch; None disables."""
    prompts_per_step: int = 8
    """Prompts per rollout step (x rollout.n_samples responses)."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch, per epoch."""
    ppo_epochs: int = 1
    total_steps: int = 20
    """Rollout steps (each = generate, score, update, sync)."""

    @property
    def uses_reference(self) -> bool:
        """Whether PPO / GRPO need a reference model: a KL penalty, fixed or adaptive."""
        return self.kl_coef > 0 or self.adaptive_kl_target is not None

    def __post_init__(self) -> None:
        _check(0 < self.clip_ratio_low < 1, "clip_ratio_low", "must be in (0, 1)")
        _check(self.clip_ratio_high > 0, "clip_ratio_high", "must be > 0")
        _check(self.dual_clip is None or self.dual_clip > 1, "dual_clip", "must be > 1 (or null)")
        _check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        _check(self.entropy_coef >= 0, "entropy_coef", "must be >= 0")
        _check(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "gamma in (0, 1], lam in [0, 1]")
        _check(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        _check(self.mini_batches >= 1 and self.ppo_epochs >= 1, "mini_batches", "mini_batches and ppo_epochs must be >= 1")
        _check(self.total_steps >= 1, "total_steps", "must be >= 1")


@dataclass
class RewardConfig:
    """Where rewards come from: functions (file, built-in, HTTP) and/or a trained reward model."""

    functions: list[str] = field(default_factory=list)
    """Each one of: `builtin:math`, `builtin:format_think`, `path/file.py[:fn]`, `http(s)://host/score`."""
    weights: list[float] = field(default_factory=list)
    """One weight per function (default 1 each); the reward model, if any, has weight 1."""
    model: Optional[str] = None
    """Path of a reward model (sequence classifier, e.g. from `job: rm`) scored by a reward group."""
    num_workers: int = 1
    gpus_per_worker: float = 1.0
    timeout_s: float = 120.0
    """Per call; a reward function or endpoint that takes longer stops the run with its name."""

    def __post_init__(self) -> None:
        _check(not self.weights or len(self.weights) == len(self.functions), "weights",
               f"needs one weight per function ({len(self.functions)}), got {len(self.weights)}")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")


@dataclass
class CriticConfig:
    """PPO value model: its own learner group (defaults: the policy's model and learner settings)."""

    model: Optional[str] = None
    """Defaults to model.path (a token-value head is added)."""
    lr: float = 5e-6
    num_workers: Optional[int] = None
    warmup_steps: int = 0


@dataclass
class RewardModelTrainConfig:
    """Job ``rm``: a scalar head on a causal-LM backbone trained with the Bradley-Terry loss."""

    margin: float = 0.0
    """Constant margin m in -log sigmoid(r_chosen - r_rejected - m)."""
    margin_field: Optional[str] = None
    """Row field holding a per-pair margin (overrides ``margin`` for rows that have it); a value that is not
    a number >= 0 is a bad row (data.on_bad_row)."""

    def __post_init__(self) -> None:
        _check(self.margin >= 0, "margin", f"must be >= 0, got {self.margin}")
        _check(self.margin_field is None or bool(self.margin_field), "margin_field", "must be a field name or null")


@dataclass
class DPOConfig:
    """Jobs ``dpo`` and ``online_dpo``: the DPO family of pairwise losses."""

    loss: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    """sigmoid = DPO (conservative DPO with label_smoothing > 0); ipo = IPO; simpo = reference-free, length-normalised."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    """Conservative DPO: assumed probability that a preference label is flipped, in [0, 0.5)."""
    nll_coef: float = 0.0
    """Weight of an extra NLL term on the chosen response (RPO-style)."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin."""
    reference: Literal["precompute", "group"] = "precompute"
    """precompute: reference log-probs in one pass of the untrained policy before training (no second model
    in memory); group: a frozen reference learner group scores every step. Unused by simpo."""

    def __post_init__(self) -> None:
        _check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        _check(self.loss != "ipo" or self.label_smoothing == 0, "label_smoothing",
               "applies to the sigmoid and simpo losses only; set it to 0 with loss: ipo")
        _check(self.nll_coef >= 0, "nll_coef", "must be >= 0")
        _check(self.simpo_gamma >= 0, "simpo_gamma", f"must be >= 0, got {self.simpo_gamma}")


@dataclass
class KTOConfig:
    """Job ``kto``: unpaired desirable / undesirable completions."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    """lambda_D; the paper advises desirable_weight x n_desirable / (undesirable_weight x n_undesirable) in [1, 4/3]."""
    undesirable_weight: float = 1.0
    """lambda_U."""
    completion_field: str = "completion"
    """Row field with the completion (a string or assistant message(s))."""
    label_field: str = "label"
    """Row field with the label: true (desirable) / false, or 1 / 0."""
    reference: Literal["precompute", "group"] = "precompute"
    """As dpo.reference: precompute the reference log-probs once before training, or a frozen reference group."""

    def __post_init__(self) -> None:
        _check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _check(self.desirable_weight > 0, "desirable_weight", f"must be > 0, got {self.desirable_weight}")
        _check(self.undesirable_weight > 0, "undesirable_weight", f"must be > 0, got {self.undesirable_weight}")
        _check(bool(self.completion_field), "completion_field", "must be a field name")
        _check(bool(self.label_field), "label_field", "must be a field name")


@dataclass
class BestOfNConfig:
    """Job ``best_of_n``: sample ``rollout.n_samples`` per prompt, score, keep the best as an SFT data set."""

    output_path: str = "best_of_n.jsonl"
    """Relative paths are inside train.output_dir."""
    select: Literal["best", "threshold"] = "best"
    threshold: float = 0.0
    """select=threshold: keep every response scoring at least this."""


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
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
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
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class LoggingConfig:
    wandb: Literal["off", "online", "offline"] = "off"
    wandb_project: str = "rlhf_ray"
    run_name: Optional[str] = None
    tensorboard: bool = True
    progress_bar: bool = True


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
    job: Literal["sft", "rm", "dpo", "kto", "best_of_n", "online_dpo", "ppo", "grpo"] = "sft"
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

    def __post_init__(self) -> None:
        _check_qlora(self)
        if self.job in RL_JOBS:
            _check_rl(self)
        elif self.learner.global_batch_size is None:
            self.learner.global_batch_size = self.learner.micro_batch_size * self.learner.num_workers


RL_JOBS = ("ppo", "grpo", "online_dpo", "best_of_n")
"""Jobs that sample from vLLM rollout engines and score with rewards (all but best_of_n also train a policy)."""


def _check_qlora(cfg: "Config") -> None:
    """QLoRA (``model.lora.load_in_4bit``) needs LoRA on, bitsandbytes, and parameters ZeRO does not partition."""
    if not cfg.model.lora.load_in_4bit:
        return
    import importlib.util

    if not cfg.model.lora.enabled:
        raise ConfigError("model.lora.load_in_4bit: QLoRA trains LoRA adapters on the 4-bit base; set "
                          "model.lora.enabled=true (or load_in_4bit=false)")
    if cfg.learner.zero_stage == 3:
        raise ConfigError("learner.zero_stage: ZeRO-3 partitions parameters, which bitsandbytes' packed 4-bit "
                          "weights do not support; use zero_stage 0-2 with model.lora.load_in_4bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.lora.load_in_4bit: needs bitsandbytes (pip install bitsandbytes)")


def _check_rl(cfg: "Config") -> None:
    """Cross-section checks of rollout-based configs, at load time (before any GPU is reserved)."""
    a, r, lc = cfg.algo, cfg.rollout, cfg.learner
    if not cfg.reward.functions and not cfg.reward.model:
        raise ConfigError(f"reward.functions: job {cfg.job} needs a reward: reward.functions (e.g. [builtin:math]) "
                          "and/or reward.model")
    if (a.prompts_per_step * r.n_samples) % cfg.reward.num_workers:
        raise ConfigError(f"reward.num_workers: {cfg.reward.num_workers} does not divide the "
                          f"{a.prompts_per_step * r.n_samples} sequences of a step (prompts_per_step x n_samples)")
    if cfg.job in ("online_dpo", "best_of_n") and r.n_samples < 2:
        raise ConfigError(f"rollout.n_samples: job {cfg.job} compares samples of a prompt; needs >= 2, "
                          f"got {r.n_samples}")
    if cfg.job == "best_of_n":
        return
    if cfg.job == "online_dpo":
        per_pass = lc.micro_batch_size * lc.num_workers
        if lc.micro_batch_size * lc.num_workers < a.prompts_per_step:
            raise ConfigError(f"learner.micro_batch_size: online DPO puts a round's pairs (up to algo.prompts_per_step="
                              f"{a.prompts_per_step}) in one micro-batch per worker; needs micro_batch_size x "
                              f"num_workers >= {a.prompts_per_step}, got {per_pass}")
        if lc.global_batch_size is not None and lc.global_batch_size != per_pass:
            raise ConfigError("learner.global_batch_size: online DPO takes one optimizer step per round; leave it unset")
        lc.global_batch_size = per_pass
        _check_placement(cfg)
        return
    if a.advantage is None:
        a.advantage = "gae" if cfg.job == "ppo" else "grpo"
    if cfg.job == "ppo" and a.advantage != "gae":
        raise ConfigError(f"algo.advantage: job ppo trains a critic for GAE; '{a.advantage}' is critic-free, "
                          "use job: grpo for it")
    if cfg.job == "grpo" and a.advantage == "gae":
        raise ConfigError("algo.advantage: gae needs a critic; use job: ppo (job grpo runs critic-free estimators)")
    if a.advantage in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline") and r.n_samples < 2:
        raise ConfigError(f"rollout.n_samples: algo.advantage={a.advantage} compares samples of the same prompt; "
                          f"needs n_samples >= 2, got {r.n_samples}")
    B = a.prompts_per_step * r.n_samples
    if B % a.mini_batches:
        raise ConfigError(f"algo.mini_batches: {a.mini_batches} does not divide the {B} sequences of a step "
                          f"(prompts_per_step {a.prompts_per_step} x n_samples {r.n_samples})")
    M = B // a.mini_batches
    # The update's forward pass is pi_old only while no optimizer step has moved the policy yet and nothing
    # needs pi_old before the update (the reference KL, in the reward or as a metric for the controller).
    update_is_exact = a.mini_batches == 1 and a.ppo_epochs == 1 and not a.uses_reference
    if a.old_logprobs == "auto":
        a.old_logprobs = "update" if update_is_exact else "learner"
    elif a.old_logprobs == "update" and not update_is_exact:
        raise ConfigError("algo.old_logprobs: update takes pi_old from the update's own forward pass, which is exact "
                          "only with mini_batches 1, ppo_epochs 1 and no reference model (kl_coef 0, no "
                          f"adaptive_kl_target); got mini_batches {a.mini_batches}, ppo_epochs {a.ppo_epochs}, "
                          f"kl_coef {a.kl_coef}; use learner")
    if lc.global_batch_size is not None and lc.global_batch_size != M:
        raise ConfigError(f"learner.global_batch_size: RL jobs take one optimizer step per mini-batch of "
                          f"prompts_per_step x n_samples / mini_batches = {M} sequences; leave it unset "
                          f"(got {lc.global_batch_size})")
    lc.global_batch_size = M
    critic_workers = cfg.critic.num_workers or lc.num_workers
    for key, workers in (("learner.num_workers", lc.num_workers), ("critic.num_workers", critic_workers)):
        if M % (lc.micro_batch_size * workers):
            raise ConfigError(f"{key}: a mini-batch of {M} sequences (prompts_per_step x n_samples / mini_batches) "
                              f"must split into {workers} workers x micro-batches of learner.micro_batch_size="
                              f"{lc.micro_batch_size}")
    _check_placement(cfg)


def _check_placement(cfg: "Config") -> None:
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
