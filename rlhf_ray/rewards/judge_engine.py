"""A generative judge hosted by the reward server: ``reward.judge`` on one vLLM engine in the server's process.

    python -m rlhf_ray.rewards.server --judge examples/judges/tiny_cpu.yaml --port 8000

The ``--judge`` file is a ``reward.judge`` section (the keys a training config's ``reward.judge`` takes, checked the
same way, errors naming ``reward.judge.<key>`` and the file), or a whole training config whose ``reward.judge`` is
served. Each request is one batch: every sample's judge prompt (``PointwiseJudge.prompts``, wrapped in the judge
tokenizer's chat template by ``judge_ids``) goes to the engine in one ``generate`` call, and the verdicts are scored
as in training (``PointwiseJudge.rewards``)::

    reward_b = weight * (clip(s_b, min_score, max_score) - min_score) / (max_score - min_score)   in [0, weight]

with s_b the first match of ``score_pattern`` in verdict b; a verdict without one is an error naming the sample
(``on_unparsable: error``: the server answers 500) or scores ``default_score`` (``default``: counted in the log).
The engine is ``engines.rollout_engine.RolloutEngine`` (no Ray), set up like the training job's judge engines
(``config.resolve.judge_rollout``). Requests are served on threads and one lock serializes the engine: a batch waits
for the one before it (at most the server's ``--timeout-s``), so concurrent requests are safe.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.config.errors import ConfigError
from rlhf_ray.config.job_sections import JudgeConfig
from rlhf_ray.rewards.base import RewardError, RewardSource, RowFields
from rlhf_ray.rewards.judge import PointwiseJudge

log = logging.getLogger(__name__)

KEY = "reward.judge"
"""The config section a ``--judge`` file holds; errors name its keys with this prefix."""


def load_judge_config(path: Path) -> JudgeConfig:
    """The ``reward.judge`` section in ``path``: the section itself (``model: ...``, ``template: ...``), or a training
    config holding it under ``reward: judge:``. ``ConfigError`` naming the file and the key when the file is missing,
    not a YAML mapping, has an unknown or ill-typed key, fails ``JudgeConfig``'s checks, names no ``model``, a local
    model that does not exist, or asks for ``pairwise`` judging (the server scores each response on its own)."""
    from rlhf_ray.config.loader import build, read_yaml_mapping
    from rlhf_ray.config.resolve import check_judge_model

    tree = read_yaml_mapping(path, ConfigError, f"--judge: {path} does not exist (a YAML file holding a reward.judge "
                                                "section: model, template, score_pattern, ...)",
                             "a reward.judge section (model: ..., template: ..., ...)", prefix="--judge ")
    if "reward" in tree:  # a training config: serve its judge (JudgeConfig has no key 'reward')
        section = tree["reward"].get("judge") if isinstance(tree["reward"], dict) else None
        if not isinstance(section, dict):
            raise ConfigError(f"--judge {path}: has a 'reward' section but no reward.judge mapping in it")
        tree = section
    try:
        cfg = build(JudgeConfig, tree, prefix=KEY)
        if not cfg.model:
            raise ConfigError(f"{KEY}.model: the path (or hub name) of the judge model to serve is missing")
        check_judge_model(cfg.model)
        if cfg.pairwise:
            raise ConfigError(f"{KEY}.pairwise: the reward server scores each response on its own (the HTTP protocol "
                              "has one response per sample); pairwise judging labels online DPO's pairs in training, "
                              "so set it false here")
        PointwiseJudge.from_config(cfg)  # the template: read, placeholders checked
    except ConfigError as exc:
        raise ConfigError(f"--judge {path}: {exc}") from None
    if cfg.num_engines != 1:
        log.warning("--judge %s: %s.num_engines=%d is for training; the server runs one engine", path, KEY,
                    cfg.num_engines)
    return cfg


class JudgeEngineReward(RewardSource):
    """``reward.judge`` as a reward source: one batch -> one ``generate`` call on an in-process vLLM engine.

    Built cheaply (the config and template checked); ``start()`` loads the model. ``lock_timeout_s`` bounds how long
    a batch waits for the engine while another batch is generating.
    """

    name = "judge"

    def __init__(self, cfg: JudgeConfig, lock_timeout_s: float, seed: int = 0, dtype: str = "auto",
                 trust_remote_code: bool = False):
        if not cfg.model:
            raise ConfigError(f"{KEY}.model: the judge model to serve is missing")
        self.cfg, self.judge = cfg, PointwiseJudge.from_config(cfg)
        self.lock_timeout_s, self.seed = lock_timeout_s, seed
        self.dtype, self.trust_remote_code = dtype, trust_remote_code
        # set by start()
        self.engine: Any = None
        self.tokenizer: Any = None
        self.max_model_len: Optional[int] = None
        self.sampling: Any = None
        self._lock = threading.Lock()  # vLLM's LLM is one engine loop: one generate call at a time

    def describe(self) -> str:
        return f"judge {self.cfg.model!r}"

    def public_describe(self) -> str:
        return "judge"  # no local path to a remote client

    def start(self) -> float:
        """Load the judge model on a vLLM engine (and its tokenizer); returns the seconds it took."""
        import torch
        from transformers import AutoTokenizer

        from rlhf_ray.config.resolve import judge_rollout
        from rlhf_ray.config.resolved import RolloutRoleSpec, auto_dtype
        from rlhf_ray.config.schema import RolloutConfig
        from rlhf_ray.engines.rollout_engine import RolloutEngine, SamplingSpec

        t0 = time.perf_counter()
        model = self.cfg.model
        assert model is not None  # checked in __init__
        local = Path(model).expanduser()
        path = str(local.resolve()) if local.exists() else model
        # max_model_len None: the model's own context length (vLLM reads it from the model's config).
        spec = RolloutRoleSpec(
            model_path=path, tokenizer_path=path, trust_remote_code=self.trust_remote_code,
            rollout=judge_rollout(RolloutConfig(), self.cfg), dtype=auto_dtype(self.dtype, torch.cuda.is_available()),
            max_model_len=self.cfg.max_model_len, sleep_mode=False, gpus=float(self.cfg.tensor_parallel_size),
            cpus=self.cfg.cpus_per_engine, seed=self.seed, name="judge", placement_role="judge")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.trust_remote_code)
        self.engine = RolloutEngine(spec, self.seed)
        self.max_model_len = int(self.engine.llm.model_config.max_model_len)
        self.sampling = SamplingSpec(n=1, temperature=self.cfg.temperature, max_tokens=self.cfg.max_new_tokens)
        return time.perf_counter() - t0

    def score(self, prompts: list[str], responses: list[str], row_fields: RowFields) -> list[float]:
        """weight * the judge's scaled score of each sample (B,); ``RewardError`` naming the sample for a prompt
        longer than the engine takes and, under ``on_unparsable: error``, for a verdict without a score."""
        from rlhf_ray.controller.reward_scoring import judge_ids, ordered_verdicts

        if self.engine is None:
            raise RuntimeError("JudgeEngineReward.score before start(): the judge model is not loaded")
        ids = [judge_ids(self.tokenizer, text) for text in self.judge.prompts(prompts, responses, row_fields)]
        assert self.max_model_len is not None
        for b, sample in enumerate(ids):
            if len(sample) + self.cfg.max_new_tokens > self.max_model_len:
                message = (f"reward.judge.max_model_len: the judge prompt of sample {b} is {len(sample)} tokens; with "
                           f"max_new_tokens {self.cfg.max_new_tokens} it does not fit the judge's {self.max_model_len} "
                           "(raise reward.judge.max_model_len where the server runs, or send shorter samples)")
                raise RewardError(message, public=message)
        if not self._lock.acquire(timeout=self.lock_timeout_s):
            message = (f"judge: the engine was busy with another batch for {self.lock_timeout_s:g} s (raise the "
                       "server's --timeout-s, or lower --max-concurrent)")
            raise RewardError(message, public=message)
        try:
            gens = self.engine.generate(ids, self.sampling)
        except Exception as exc:
            # Named here, not replayed sample by sample by checked_scores (each replay a generate call on a
            # judge that just failed); the message can hold the samples' text, so the client gets its type only.
            raise RewardError(f"{self.describe()}: generation failed on a batch of {len(ids)} samples: "
                              f"{type(exc).__name__}: {exc}",
                              f"judge: generation failed on a batch of {len(ids)} samples ({type(exc).__name__}; "
                              "see the server's log)") from exc
        finally:
            self._lock.release()
        rewards, unparsable = self.judge.rewards(ordered_verdicts(gens))
        if unparsable:
            log.info("judge: %d of %d verdicts had no score matching %r; scored default_score %s", unparsable,
                     len(ids), self.cfg.score_pattern, self.cfg.default_score)
        return rewards
