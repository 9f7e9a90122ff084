"""Config sections of the rollout jobs (rollout engines, the RL algorithm, rewards, the critic) and of the
preference / sampling jobs (rm, dpo, kto, best_of_n). Part of the one tree rooted at ``schema.Config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from rlhf_ray.algos.names import (ADVANTAGE_ESTIMATORS, KL_ESTIMATOR_NAMES, LOSS_AGG_MODES, OFF_POLICY_CORRECTIONS,
                                  POLICY_LOSS_NAMES, PREFERENCE_LOSS_NAMES, RATIO_LEVELS)
from rlhf_ray.config.errors import ConfigError, check as _check


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
    weight_sync_backend: Literal["auto", "nccl", "gloo", "ipc"] = "auto"
    """auto: CUDA IPC when engines share GPUs with the policy (hybrid), NCCL on other GPUs, gloo on CPU."""
    weight_sync_bucket_mb: int = 256
    seed: Optional[int] = None
    """Base seed of the engines' sampling (engine i: seed + i); default ``train.seed``."""
    mode: Literal["sync", "one_step_off", "async"] = "sync"
    """sync: each step samples with the current policy, then trains. one_step_off: the engines sample the next
    step's batch while the learners train on this one (generation overlaps training; every sample is one policy
    version old, corrected by ``algo.off_policy_correction``). async: the engines fill a queue of finished,
    scored groups without waiting for the steps; a step trains on the first ``prompts_per_step`` groups ready,
    each at most ``max_staleness`` policy versions old. one_step_off and async need the engines on their own
    devices (not ``placement.mode: hybrid``)."""
    max_staleness: int = 1
    """async: how many policy versions a sample may lag the policy that trains on it (0: every sample comes from
    the current weights, exactly as sync). The engines start a group only while it can be trained in time; one
    that is older when its step takes it (a long response) is dropped, counted, and its prompt sampled again."""
    partial: bool = False
    """async: at a weight sync, interrupt the samples in flight and continue them under the new weights (each
    token keeps the version that sampled it; a sample's age is its oldest token's). Off: the engines finish the
    samples they have before taking the new weights, and start no new ones meanwhile."""
    env: Optional[str] = None
    """Multi-turn rollouts (``rlhf_ray.agentic``): an environment class in a Python file, ``path/env.py:Class``
    (``path/env.py`` alone: the class ``Env``). Each sample gets its own instance: ``reset(row)`` gives the first
    observation (messages or text; None: the row's prompt), ``step(response)`` -> (observation, reward, done) after
    each model turn; either may be ``async def``. Its rewards add up to the sample's reward (plus any
    ``reward.functions`` / ``reward.model``). Needs ``rollout.mode: sync``."""
    tools: list[str] = field(default_factory=list)
    """Multi-turn rollouts with the built-in tool environment: Python functions the model may call, each
    ``path.py:fn`` (``path.py`` alone: every public function defined there), or ``builtin:python_sandbox`` (the model's
    Python program run in ``rlhf_ray.agentic.sandbox``). Each needs type hints and a docstring
    (its JSON schema goes to the chat template's ``tools=``); a parameter named ``row`` gets the data row and is
    hidden from the model. A turn without a tool call ends the trajectory; ``reward.functions`` score it."""
    max_turns: int = 4
    """Model turns per trajectory at most (``env`` / ``tools``); ``max_new_tokens`` bounds each turn."""
    max_observation_tokens: int = 256
    """Room each observation gets in the default ``max_model_len`` of a multi-turn run (data.max_prompt_length +
    max_turns x max_new_tokens + (max_turns - 1) x this). A trajectory whose next turn would not fit in
    ``max_model_len`` ends there (finish reason ``length``)."""
    env_timeout_s: float = 60.0
    """Seconds an environment's ``reset`` or ``step`` may take before it counts as hung."""
    on_env_error: Literal["raise", "zero_reward"] = "raise"
    """An environment that raises, hangs or returns a bad value: raise stops the run with an error naming the
    environment, the sample and the turn; zero_reward ends that trajectory with reward 0 and counts it
    (``env/failed``)."""
    tool_timeout_s: float = 30.0
    """Seconds one tool call may take; a slower call is abandoned and the model gets an error message instead."""
    tool_call_format: Literal["auto", "hermes", "llama3", "mistral", "fallback"] = "auto"
    """How tool calls are written (``rlhf_ray.agentic.tools``). hermes: ``<tool_call>{"name": ..., "arguments":
    {...}}</tool_call>`` (Qwen2.5 / Qwen3, Hermes); llama3: the turn is ``{"name": ..., "parameters": {...}}``,
    optionally after ``<|python_tag|>`` (Llama 3.1 / 3.2); mistral: ``[TOOL_CALLS][{"name": ..., "arguments":
    {...}}, ...]`` (its results paired with their calls by id, as Mistral's template requires); fallback: a first
    line ``name`` or ``name <arguments>``; auto: the format whose marker the chat template holds (``<tool_call>``
    hermes, ``[TOOL_CALLS]`` mistral, ``<|python_tag|>`` or the ``ipython`` role llama3), else fallback."""

    @property
    def multi_turn(self) -> bool:
        """Whether rollouts are multi-turn episodes (``env`` or ``tools`` set)."""
        return self.env is not None or bool(self.tools)

    @property
    def response_budget(self) -> int:
        """The most tokens a sample's model turns hold together: max_new_tokens per turn, max_turns turns."""
        return self.max_new_tokens * (self.max_turns if self.multi_turn else 1)

    def __post_init__(self) -> None:
        _check(self.num_engines >= 1, "num_engines", "must be >= 1")
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        _check(self.n_samples >= 1, "n_samples", "must be >= 1")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        _check(self.weight_sync_bucket_mb >= 1, "weight_sync_bucket_mb", "must be >= 1")
        _check(self.max_staleness >= 0, "max_staleness", "must be >= 0")
        _check(self.max_turns >= 1, "max_turns", f"must be >= 1, got {self.max_turns}")
        _check(self.max_observation_tokens >= 1, "max_observation_tokens", "must be >= 1")
        _check(self.env_timeout_s > 0, "env_timeout_s", f"must be > 0, got {self.env_timeout_s}")
        _check(0 < self.tool_timeout_s < self.env_timeout_s, "tool_timeout_s",
               f"must be > 0 and below rollout.env_timeout_s={self.env_timeout_s} (a turn's tool calls run inside "
               f"the tool environment's step), got {self.tool_timeout_s}")
        _check(self.env is None or not self.tools, "env",
               "set rollout.env or rollout.tools, not both (the tools run in the built-in tool environment)")


@dataclass
class AlgoConfig:
    """The RL algorithm (PPO / GRPO / REINFORCE family): advantages, losses, KL, update schedule."""

    advantage: Optional[Literal[ADVANTAGE_ESTIMATORS]] = None
    """Advantage estimator (``rlhf_ray.algos.advantages.ADVANTAGES``). Unset: ``gae`` for job ppo (with a critic),
    ``grpo`` for job grpo; job grpo also runs the critic-free rloo, dr_grpo and reinforce_pp(_baseline)."""
    policy_loss: Literal[POLICY_LOSS_NAMES] = "ppo_clip"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    """Upper clip (set above clip_ratio_low for DAPO-style asymmetric clipping)."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 for negative advantages (Ye et al. 2020); None disables it."""
    ratio_level: Literal[RATIO_LEVELS] = "token"
    """The policy ratio pi / pi_old of the clipped loss. token: PPO's, per token. sequence: GSPO's (Zheng et al.
    2025), s_b = exp(mean_t (logp - old_logp)) for the whole response b, clipped to [1 - sequence_clip_ratio_low,
    1 + sequence_clip_ratio_high] (clip_ratio_low / _high are then unused), in the paper's token form (each token's
    gradient scaled by s_b). The paper's objective averages per sequence: pair it with loss_agg:
    seq_mean_token_mean."""
    sequence_clip_ratio_low: float = 3e-4
    """Lower clip of GSPO's sequence ratio (ratio_level: sequence); the paper used 3e-4."""
    sequence_clip_ratio_high: float = 4e-4
    """Upper clip of GSPO's sequence ratio (ratio_level: sequence); the paper used 4e-4."""
    loss_agg: Literal[LOSS_AGG_MODES] = "token_mean"
    kl_coef: float = 0.0
    """KL penalty against the reference model; 0 skips the reference forward entirely."""
    kl_estimator: Literal[KL_ESTIMATOR_NAMES] = "k3"
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
    off_policy_correction: Literal[OFF_POLICY_CORRECTIONS] = "token_tis"
    """How the loss corrects for the rollout engine's sampling distribution mu differing from the learner's pi_old
    (vLLM-vs-learner numerics, and staleness when the engines run behind the policy), from the ratio
    rho = pi_old / mu of the engine's and the learner's log-probs (``rlhf_ray.algos.off_policy``). Each weight
    multiplies a token's policy loss. none: w = 1. token_tis: w_t = min(rho_t, importance_cap). seq_tis:
    w = min(rho_b, importance_cap) for every token of sequence b, rho_b the product of its token ratios.
    seq_mask: w = rho_b inside [importance_mask_low, importance_mask_high], else 0 (the sequence dropped).
    icepop: w_t = rho_t inside the band, else 0 (the token dropped). With ``old_logprobs: rollout`` pi_old is
    mu itself, so there is nothing to correct: the default token_tis is then off, and the others are refused."""
    importance_cap: Optional[float] = 2.0
    """Cap of the truncating corrections (token_tis, seq_tis): w = min(rho, importance_cap); must be >= 1. This
    key was the on/off switch of today's token_tis before ``off_policy_correction`` existed: ``null`` is refused
    with those two (set ``off_policy_correction: none`` to turn the correction off); unused by the masks."""
    importance_mask_low: float = 0.5
    """seq_mask, icepop: a ratio rho below this is masked (in [0, 1); IcePop used 0.5)."""
    importance_mask_high: float = 2.0
    """seq_mask, icepop: a ratio rho above this is masked (> 1; IcePop used 5)."""
    prompts_per_step: int = 8
    """Prompts per rollout step (x rollout.n_samples responses)."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch, per epoch."""
    ppo_epochs: int = 1
    total_steps: int = 20
    """Rollout steps (each = generate, score, update, sync)."""
    filter_groups: bool = False
    """DAPO's dynamic sampling (job grpo, any ``rollout.mode``): a prompt whose samples all got the same reward gives
    every one of them zero advantage; drop it and sample the next prompts until the step has
    ``prompts_per_step`` groups with differing rewards (counted in ``filter/*``). Prompts are taken in epoch
    order, so a step may take more than ``prompts_per_step`` of them."""
    max_filter_rounds: int = 3
    """Extra sampling rounds a step may take to fill its batch; still short after them, it trains with dropped
    groups in the empty places (``filter/topped_up_groups``)."""

    @property
    def uses_reference(self) -> bool:
        """Whether PPO / GRPO need a reference model: a KL penalty, fixed or adaptive."""
        return self.kl_coef > 0 or self.adaptive_kl_target is not None

    def __post_init__(self) -> None:
        _check(0 < self.clip_ratio_low < 1, "clip_ratio_low", "must be in (0, 1)")
        _check(self.max_filter_rounds >= 0, "max_filter_rounds", "must be >= 0")
        _check(self.clip_ratio_high > 0, "clip_ratio_high", "must be > 0")
        _check(self.dual_clip is None or self.dual_clip > 1, "dual_clip", "must be > 1 (or null)")
        _check(0 < self.sequence_clip_ratio_low < 1, "sequence_clip_ratio_low",
               f"must be in (0, 1), got {self.sequence_clip_ratio_low}")
        _check(self.sequence_clip_ratio_high > 0, "sequence_clip_ratio_high",
               f"must be > 0, got {self.sequence_clip_ratio_high}")
        _check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        _check(self.adaptive_kl_target is None or self.kl_coef > 0, "kl_coef",
               "adaptive_kl_target scales kl_coef from its start, so it must start > 0 (from 0 it stays 0)")
        _check(self.entropy_coef >= 0, "entropy_coef", "must be >= 0")
        _check(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "gamma in (0, 1], lam in [0, 1]")
        _check(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        _check(self.mini_batches >= 1 and self.ppo_epochs >= 1, "mini_batches", "mini_batches and ppo_epochs must be >= 1")
        _check(self.total_steps >= 1, "total_steps", "must be >= 1")
        truncating = self.off_policy_correction in ("token_tis", "seq_tis")
        _check(self.importance_cap is not None or not truncating, "importance_cap",
               "null no longer turns the importance correction off; "
               f"off_policy_correction={self.off_policy_correction} truncates at this cap, so give a cap >= 1 "
               "(2.0 by default), or set off_policy_correction: none")
        _check(self.importance_cap is None or self.importance_cap >= 1, "importance_cap",
               f"must be >= 1 (a cap below 1 would shrink even the tokens the engine and the learner agree on, "
               f"ratio 1), got {self.importance_cap}")
        _check(0 <= self.importance_mask_low < 1, "importance_mask_low", "must be in [0, 1): the band must keep "
               f"ratio 1 (engine and learner agreeing), got {self.importance_mask_low}")
        _check(self.importance_mask_high > 1, "importance_mask_high", "must be > 1: the band must keep ratio 1 "
               f"(engine and learner agreeing), got {self.importance_mask_high}")


DEFAULT_JUDGE_TEMPLATE = (
    "Rate how well the response answers the question, from 1 (useless or wrong) to 10 (correct, clear and "
    "complete).\n\nQuestion:\n{prompt}\n\nResponse:\n{response}\n\nReply with one line: Score: <1-10>")
"""The rubric ``reward.judge.template`` defaults to."""
DEFAULT_PAIR_TEMPLATE = (
    "Which response answers the question better (correct, clear and complete)?\n\nQuestion:\n{prompt}\n\n"
    "Response A:\n{response_a}\n\nResponse B:\n{response_b}\n\nReply with one line: Better: A or Better: B")
"""The comparison ``reward.judge.pairwise_template`` defaults to."""


@dataclass
class JudgeConfig:
    """A generative judge (RLAIF): a model served by its own vLLM engines reads each (prompt, response) through
    ``template`` and writes a verdict; ``score_pattern`` pulls the score out, scaled from [min_score, max_score]
    to [0, 1] and added to the reward with ``weight``."""

    model: Optional[str] = None
    """Path of the judge model (a causal LM vLLM serves); unset: no judge."""
    template: str = DEFAULT_JUDGE_TEMPLATE
    """The judge's prompt (a rubric or a constitution), or the path of a file holding it: ``{prompt}`` and
    ``{response}`` are filled in, ``{reference}`` with the row's ``reference_field``; other braces are doubled
    (``{{`` ``}}``). The judge tokenizer's chat template is applied to it (as one user turn) when it has one."""
    reference_field: Optional[str] = None
    """Row field the template's ``{reference}`` takes (e.g. a reference answer)."""
    score_pattern: str = r"(?i)score\s*[:=]\s*(-?\d+(?:\.\d+)?)"
    """Regular expression with one group capturing the score as a number; its first match in the verdict counts."""
    min_score: float = 1.0
    max_score: float = 10.0
    """The template's scale: a parsed score s gives reward weight * (s - min_score) / (max_score - min_score);
    a score outside the scale is clipped to it."""
    weight: float = 1.0
    on_unparsable: Literal["error", "default"] = "error"
    """A verdict the pattern does not match: error stops the run naming the sample and the verdict; default scores
    it ``default_score`` (on the judge's scale) and counts it in reward/judge_unparsable."""
    default_score: Optional[float] = None
    pairwise: bool = False
    """Job online_dpo: instead of scoring each response, the judge compares two responses of each prompt, shown in
    both orders (A/B, then B/A, to cancel position bias); the pair is labelled when both verdicts agree and skipped
    (counted in online_dpo/judge_inconsistent) when not. The pair: the best and worst by the other rewards when they
    differ, else the first two different responses."""
    pairwise_template: str = DEFAULT_PAIR_TEMPLATE
    """The pairwise prompt (or a file's path): ``{prompt}``, ``{response_a}``, ``{response_b}`` (and ``{reference}``)."""
    preference_pattern: str = r"(?i)better\s*(?:response)?\s*[:=]\s*\(?([AB])\b"
    """Regular expression with one group capturing A or B in a pairwise verdict."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0: greedy verdicts (the same response gets the same score)."""
    num_engines: int = 1
    tensor_parallel_size: int = 1
    """GPUs per judge engine (on GPU runs; the judge has its own GPUs in every placement mode)."""
    cpus_per_engine: float = 1.0
    max_model_len: Optional[int] = None
    """Defaults to data.max_prompt_length + rollout.max_new_tokens + the template's length + max_new_tokens."""
    kv_cache_memory_gb: Optional[float] = None
    gpu_memory_utilization: float = 0.8
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        import re

        k = "reward.judge."
        _check(self.max_score > self.min_score, k + "max_score",
               f"must be > min_score ({self.min_score}), got {self.max_score}")
        try:
            groups = re.compile(self.score_pattern).groups
        except re.error as exc:
            raise ConfigError(f"{k}score_pattern: not a regular expression ({exc})") from exc
        _check(groups == 1, k + "score_pattern", f"needs exactly one group (the number), has {groups}")
        try:
            groups = re.compile(self.preference_pattern).groups
        except re.error as exc:
            raise ConfigError(f"{k}preference_pattern: not a regular expression ({exc})") from exc
        _check(groups == 1, k + "preference_pattern", f"needs exactly one group (A or B), has {groups}")
        _check(self.on_unparsable == "error" or self.default_score is not None, k + "default_score",
               "on_unparsable: default needs the score an unparsable verdict gets (on the judge's scale)")
        _check(self.max_new_tokens >= 1, k + "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature >= 0, k + "temperature", f"must be >= 0, got {self.temperature}")
        _check(self.num_engines >= 1, k + "num_engines", f"must be >= 1, got {self.num_engines}")
        _check(self.tensor_parallel_size >= 1, k + "tensor_parallel_size",
               f"must be >= 1, got {self.tensor_parallel_size}")


@dataclass
class RewardConfig:
    """Where rewards come from: functions (file, built-in, HTTP) and/or a trained reward model."""

    functions: list[str] = field(default_factory=list)
    """Each one of: `builtin:math`, `builtin:format_think`, `builtin:python_sandbox` (the response's code runs the
    row's `tests` in a sandbox), `path/file.py[:fn]`, `http(s)://host/score`."""
    weights: list[float] = field(default_factory=list)
    """One weight per function (default 1 each); the reward model, if any, has weight 1."""
    model: Optional[str] = None
    """Path of a reward model (sequence classifier, e.g. from `job: rm`) scored by a reward group."""
    num_workers: int = 1
    gpus_per_worker: float = 1.0
    timeout_s: float = 120.0
    """Per call; a reward function or endpoint that takes longer stops the run with its name."""
    http_token_env: Optional[str] = "RLHF_RAY_REWARD_TOKEN"
    """The NAME of the environment variable holding the bearer token sent to ``http(s)://`` reward endpoints (the
    reward server's token: it prints the one it generates at start). The token itself never goes in a config, a
    URL or a log; with an endpoint in ``functions``, an unset variable stops the run before any actor starts.
    null: send no token (an endpoint without authentication)."""
    overlong_penalty: float = 0.0
    """DAPO's soft overlong punishment (Yu et al. 2025), added to each sequence's reward in the training jobs (ppo,
    grpo, online_dpo; eval and best_of_n score without it): 0 for a response of at most L_max - overlong_buffer
    tokens, then linear down to -overlong_penalty at L_max = rollout.max_new_tokens (a truncated response gets all
    of it). 0: off; DAPO used 1.0. Logged as reward/overlong_penalty_mean (rollout/reward_* include it)."""
    overlong_buffer: Optional[int] = None
    """L_cache: the tokens before rollout.max_new_tokens over which the overlong penalty grows (DAPO: 4096 of
    20480); needed when overlong_penalty > 0, at most rollout.max_new_tokens."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """A generative judge model (RLAIF), scored as the source ``judge`` (reward/judge_mean)."""

    def __post_init__(self) -> None:
        _check(self.http_token_env is None or bool(self.http_token_env.strip()), "http_token_env",
               "must name an environment variable, or be null to send no token")
        _check(not self.weights or len(self.weights) == len(self.functions), "weights",
               f"needs one weight per function ({len(self.functions)}), got {len(self.weights)}")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
        _check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        _check(self.overlong_penalty >= 0, "overlong_penalty", f"must be >= 0 (0: off), got {self.overlong_penalty}")
        _check(self.overlong_penalty == 0 or self.overlong_buffer is not None, "overlong_buffer",
               "overlong_penalty > 0 needs the buffer length L_cache over which the penalty grows before "
               "rollout.max_new_tokens (DAPO: 4096 of 20480), e.g. a quarter of max_new_tokens")
        _check(self.overlong_buffer is None or self.overlong_buffer >= 1, "overlong_buffer",
               f"must be >= 1 token, got {self.overlong_buffer}")


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

    loss: Literal[PREFERENCE_LOSS_NAMES] = "sigmoid"
    """sigmoid = DPO (conservative DPO with label_smoothing > 0); ipo = IPO; simpo = reference-free, length-normalised."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    """Conservative DPO: assumed probability that a preference label is flipped, in [0, 0.5)."""
    nll_coef: float = 0.0
    """Weight of an extra NLL term on the chosen response (RPO-style)."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin."""
    length_normalized: Optional[bool] = None
    """Average the completion log-probs per token instead of summing them; None: the loss's own form (summed for
    sigmoid and ipo as in their papers, averaged for simpo). ``ipo`` with true is the form TRL trains and the IPO
    authors' reported results used (summed, a long pair's gap cannot settle near 1 / (2 beta))."""
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
        _check(self.loss != "simpo" or self.length_normalized is not False, "length_normalized",
               "simpo is defined on per-token averages; leave it unset (or true) with loss: simpo")


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
class EvalConfig:
    """How a model is evaluated on held-out prompts: job ``eval`` (``rlhf-ray eval``), and the rollout training jobs
    (ppo, grpo, online_dpo) every ``train.eval_every`` steps and once before training (logged at step 0).
    ``n_samples`` samples per prompt at ``temperature`` are scored by the ``reward`` section as in training; pass@k,
    maj@k, mean reward, response length and each reward source's mean are logged under ``eval/`` (job eval also
    writes them to ``<train.output_dir>/eval.json`` and prints a table). What these resolve to is
    ``Resolved.evaluation`` (``rlhf_ray.config.resolve``)."""

    n_samples: Optional[int] = None
    """Samples per prompt. Unset: ``rollout.n_samples`` in job eval (its rollout section is the evaluation's); 1
    during training (one greedy response per prompt, unless ``temperature`` is set)."""
    temperature: Optional[float] = None
    """Sampling temperature of the evaluation. Unset: ``rollout.temperature``, except during training with one
    sample per prompt, which is greedy (0)."""
    ks: list[int] = field(default_factory=list)
    """The k of pass@k and maj@k, each in 1..n_samples; empty: 1 and n_samples."""
    correct_threshold: float = 1.0
    """A sample counts as correct (pass@k, maj@k, accuracy) when its total reward is >= this. 1.0: the full
    reward of ``builtin:math`` (a right final answer); lower it for rewards on another scale."""
    vote_on: Literal["math_answer", "response"] = "math_answer"
    """What maj@k votes over. math_answer: the final answer ``builtin:math`` grades (the last ``\\boxed{}``,
    ``####``, "the answer is" or the last number), normalised, numbers compared exactly (``0.5`` = ``1/2``); a
    response without one abstains. response: the response text, stripped of surrounding whitespace."""
    greedy: bool = False
    """Also one greedy response per prompt (temperature 0), reported apart under ``greedy`` (``eval/greedy/``)."""

    def __post_init__(self) -> None:
        import math

        _check(self.n_samples is None or self.n_samples >= 1, "n_samples", f"must be >= 1, got {self.n_samples}")
        _check(self.temperature is None or self.temperature >= 0, "temperature",
               f"must be >= 0, got {self.temperature}")
        _check(all(k >= 1 for k in self.ks), "ks", f"each k must be >= 1, got {self.ks}")
        _check(len(set(self.ks)) == len(self.ks), "ks", f"lists a k twice: {self.ks}")
        _check(math.isfinite(self.correct_threshold), "correct_threshold",
               f"must be a finite number, got {self.correct_threshold}")
