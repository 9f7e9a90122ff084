"""Sequence rewards for a rollout batch: reward functions (file, built-in, HTTP) plus a reward-model group.

reward_b = sum_k w_k * f_k(prompt_b, response_b, row_b) + RM(prompt_b + response_b) [+ judge_b] [+ overlong_b]
           [+ env_b]

judge_b is a generative judge's verdict on the sample (``reward.judge``, RLAIF; ``rewards/judge.py``), written by
the ``judge`` engines while the functions run.

overlong_b is DAPO's soft overlong punishment (``reward.overlong_penalty``), added in the training jobs only;
env_b the sum of a multi-turn episode's step rewards (``rollout.env``). A sample whose environment failed under
``rollout.on_env_error: zero_reward`` gets reward 0.

Each function runs through ``checked_scores`` (timeout; raises, wrong length, NaN -> ``RewardError``
naming the function and the sample). The reward model's forward runs on its group while the functions
run here. When the reward model's tokenizer differs from the policy's, its input is re-rendered
from text with its own chat template.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Optional

import torch

from rlhf_ray.algos.reward_shaping import overlong_penalty
from rlhf_ray.config.job_sections import JudgeConfig
from rlhf_ray.config.schema import DataConfig, RewardConfig
from rlhf_ray.rewards import CombinedReward, RewardError, build_reward_source, checked_scores
from rlhf_ray.types import RolloutBatch
from rlhf_ray.objectives.common import SequenceScores

log = logging.getLogger(__name__)


def metric_name(source_name: str) -> str:
    """A short metric-key piece for a reward source: ``builtin:math`` -> ``math``, a file -> its function name."""
    name = source_name.split(" from ")[0].removeprefix("builtin:")
    name = re.sub(r"^https?://", "", name)
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")[:40] or "reward"


def build_function_reward(cfg: RewardConfig) -> Optional[CombinedReward]:
    """The weighted sum of ``reward.functions`` (None when the config names none)."""
    from rlhf_ray.config import ConfigError

    if not cfg.functions:
        return None
    token = http_token(cfg)
    try:
        sources = [build_reward_source(spec, cfg.timeout_s, token) for spec in cfg.functions]
    except ValueError as exc:
        raise ConfigError(f"reward.functions: {exc}") from exc
    for source in sources:
        source.check()  # an endpoint that is down fails here, not at step 1
    return CombinedReward(sources, cfg.weights or None)


def http_token(cfg: RewardConfig) -> Optional[str]:
    """The bearer token for the HTTP endpoints in ``reward.functions``: ``$<reward.http_token_env>``.

    None without an endpoint or with ``http_token_env: null``; ConfigError naming the key when the variable is
    unset, so a run that would get 401 at step 1 stops before any actor starts.
    """
    urls = [spec for spec in cfg.functions if spec.strip().startswith(("http://", "https://"))]
    if not urls or cfg.http_token_env is None:
        return None
    token = os.environ.get(cfg.http_token_env, "").strip()
    if not token:
        from rlhf_ray.config import ConfigError

        raise ConfigError(
            f"reward.http_token_env: the environment variable {cfg.http_token_env} is not set here, and the reward "
            f"endpoint {urls[0]} needs its bearer token (the reward server prints the one it generated when it "
            "starts); set it, name another variable, or null for an endpoint without authentication")
    return token


def judge_ids(tokenizer: Any, text: str) -> list[int]:
    """A judge prompt's tokens: ``text`` as one user turn of the judge's chat template when it has one."""
    if tokenizer.chat_template:
        # Rendered as text, then tokenized: apply_chat_template(tokenize=True) returns a list or a BatchEncoding
        # depending on the transformers version.
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(chat, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def ordered_verdicts(gens: Any) -> list[str]:
    """A ``Generations``' texts (one sample per prompt) in prompt order."""
    verdicts = [""] * len(gens.texts)
    for i, text in zip(gens.prompt_index.tolist(), gens.texts):
        verdicts[int(i)] = text
    return verdicts


class OnJudgeEngines:
    """What both judges hold: the ``judge`` engines, the judge's tokenizer, and how a verdict is sampled (one per
    judge prompt, ``reward.judge.temperature`` / ``max_new_tokens``)."""

    def __init__(self, cfg: JudgeConfig, engines: Any, tokenizer: Any):
        from rlhf_ray.engines.rollout_engine import SamplingSpec

        self.cfg, self.engines, self.tokenizer = cfg, engines, tokenizer
        self.spec = SamplingSpec(n=1, temperature=cfg.temperature, max_tokens=cfg.max_new_tokens)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class PairJudge(OnJudgeEngines):
    """``reward.judge.pairwise`` (online DPO): the judge compares two responses of a prompt in both orders; the
    pair is labelled only when the two verdicts agree (``rewards.judge.pair_label``)."""

    def __init__(self, cfg: JudgeConfig, engines: Any, tokenizer: Any):
        from rlhf_ray.rewards.judge import load_pair_template

        super().__init__(cfg, engines, tokenizer)
        self.template = load_pair_template(cfg.pairwise_template, cfg.reference_field)
        self.pattern = re.compile(cfg.preference_pattern)

    def label(self, candidates: list[tuple[int, int]], prompt_texts: list[str], responses: list[str],
              row_fields: dict[str, list]) -> tuple[list[tuple[int, int]], dict[str, float]]:
        """(chosen, rejected) for each candidate pair (x, y) of sample indices the judge decides, and the counts:
        ``online_dpo/judge_inconsistent`` (the two orders disagree), ``online_dpo/judge_unparsable`` (verdicts
        without A or B; an error naming the sample under ``on_unparsable: error``)."""
        from rlhf_ray.rewards.judge import pair_label, parse_preference, render_pair

        refs = row_fields.get(self.cfg.reference_field) if self.cfg.reference_field else None
        texts = []
        for x, y in candidates:
            ref = refs[x] if refs is not None else None
            texts.append(render_pair(self.template, prompt_texts[x], responses[x], responses[y], ref))
            texts.append(render_pair(self.template, prompt_texts[x], responses[y], responses[x], ref))
        if not texts:
            return [], {"online_dpo/judge_inconsistent": 0.0, "online_dpo/judge_unparsable": 0.0}
        pending = self.engines.generate_async([judge_ids(self.tokenizer, t) for t in texts], self.spec, self.pad_id)
        verdicts = ordered_verdicts(pending.result()[1])
        pairs, inconsistent, unparsable = [], 0, 0
        for k, (x, y) in enumerate(candidates):
            ab, ba = (parse_preference(v, self.pattern) for v in verdicts[2 * k: 2 * k + 2])
            if ab is None or ba is None:
                if self.cfg.on_unparsable == "error":
                    from rlhf_ray.rewards import RewardError

                    bad = verdicts[2 * k] if ab is None else verdicts[2 * k + 1]
                    raise RewardError(
                        f"reward.judge: the pairwise verdict on samples {x} and {y} names neither A nor B by "
                        f"{self.pattern.pattern!r}: {bad[:200]!r} (fix pairwise_template or preference_pattern, or "
                        "set reward.judge.on_unparsable: default to skip such pairs)")
                unparsable += 1
                continue
            winner = pair_label(ab, ba)
            if winner is None:
                inconsistent += 1
                continue
            pairs.append((x, y) if winner == 0 else (y, x))
        return pairs, {"online_dpo/judge_inconsistent": float(inconsistent),
                       "online_dpo/judge_unparsable": float(unparsable)}


class JudgeScorer(OnJudgeEngines):
    """``reward.judge``: renders each sample through the template (the judge tokenizer's chat template around it
    when it has one), has the ``judge`` engines write verdicts, and parses them (``rewards.judge``)."""

    def __init__(self, cfg: JudgeConfig, engines: Any, tokenizer: Any):
        from rlhf_ray.rewards.judge import PointwiseJudge

        super().__init__(cfg, engines, tokenizer)
        self.judge = PointwiseJudge.from_config(cfg)

    def prompt_ids(self, prompt_texts: list[str], responses: list[str], row_fields: dict[str, list]) -> list[list[int]]:
        """The judge's prompt tokens for each sample."""
        return [judge_ids(self.tokenizer, text) for text in self.judge.prompts(prompt_texts, responses, row_fields)]

    def start(self, prompt_texts: list[str], responses: list[str], row_fields: dict[str, list]):
        """The verdicts' generation, started (``finish`` waits)."""
        return self.engines.generate_async(self.prompt_ids(prompt_texts, responses, row_fields), self.spec,
                                           self.pad_id)

    def finish(self, pending) -> tuple[torch.Tensor, dict[str, float]]:
        """(weight * the judge's scaled scores (B,), metrics: ``timing/judge_s``, ``reward/judge_unparsable``)."""
        _, gens = pending.result()
        seconds = time.perf_counter() - pending.started
        rewards, unparsable = self.judge.rewards(ordered_verdicts(gens))
        return (torch.tensor(rewards, dtype=torch.float32),
                {"timing/judge_s": seconds, "reward/judge_unparsable": float(unparsable)})


class RewardScorer:
    """Scores a ``RolloutBatch``; ``start`` launches the reward model, ``finish`` runs the functions and sums.

    ``overlong_max_len``: the response-length limit L_max of the overlong penalty (``rollout.max_new_tokens``),
    None to leave the rewards unshaped. ``env_rewards`` / ``pair_judged``: the batch's rewards come from an
    environment / the pairs from a pairwise judge (online DPO), so the config may name no other reward."""

    def __init__(self, cfg: RewardConfig, data: DataConfig, reward_model: Any = None, policy_tokenizer=None,
                 rm_tokenizer=None, overlong_max_len: Optional[int] = None, env_rewards: bool = False,
                 judge: Optional[JudgeScorer] = None, pair_judged: bool = False):
        self.cfg, self.data = cfg, data
        self.judge = judge
        self.overlong_max_len = overlong_max_len
        self.functions = build_function_reward(cfg)
        self.reward_model = reward_model
        self.rm_tokenizer = rm_tokenizer
        self.retokenize = rm_tokenizer is not None and not _same_vocab(policy_tokenizer, rm_tokenizer)
        if self.functions is None and reward_model is None and judge is None and not env_rewards and not pair_judged:
            from rlhf_ray.config import ConfigError

            raise ConfigError("reward: name at least one reward (reward.functions, reward.model or reward.judge.model)")

    @classmethod
    def from_resolved(cls, resolved, reward_model: Any, policy_tokenizer, judge_engines: Any = None
                      ) -> "RewardScorer":
        """The scorer a job's config describes (the reward model's own tokenizer loaded when there is one, the
        judge's with its engines, the ``judge`` role); the overlong penalty shapes the rewards of the jobs that
        train on them (``POLICY_JOBS``) only."""
        from rlhf_ray.config.resolve import POLICY_JOBS

        rm_tok = None
        if resolved.paths.reward_model:
            from transformers import AutoTokenizer

            rm_tok = AutoTokenizer.from_pretrained(resolved.paths.reward_model)
        judge = None
        if resolved.paths.judge_model and not resolved.config.reward.judge.pairwise:
            if judge_engines is None:
                raise RuntimeError("reward.judge.model is set but the job started no judge engines")
            from transformers import AutoTokenizer

            judge = JudgeScorer(resolved.config.reward.judge, judge_engines,
                                AutoTokenizer.from_pretrained(resolved.paths.judge_model))
        cfg = resolved.config
        shaped = cfg.job in POLICY_JOBS and cfg.reward.overlong_penalty > 0
        return cls(cfg.reward, cfg.data, reward_model, policy_tokenizer, rm_tok,
                   overlong_max_len=cfg.rollout.response_budget if shaped else None,
                   env_rewards=cfg.rollout.env is not None, judge=judge,
                   pair_judged=cfg.reward.judge.pairwise)

    def start(self, batch: RolloutBatch, prompts: list[Any]):
        """Start the reward model's forward (if any); returns a handle for ``finish``."""
        if self.reward_model is None:
            return None
        rm_batch = self._rm_batch(batch, prompts) if self.retokenize else batch
        return self.reward_model.forward_async(rm_batch, SequenceScores())

    def finish(self, batch: RolloutBatch, pending, prompt_texts: list[str],
               row_fields: dict[str, list]) -> tuple[torch.Tensor, dict[str, float]]:
        """(rewards (B,), metrics): the functions' weighted sum plus the reward model's score (plus the overlong
        penalty where it is on); each source's mean over the batch in ``reward/<source>_mean``."""
        total, parts, timings = self.finish_samples(batch, pending, prompt_texts, row_fields)
        return total, {**reward_means(parts), **timings}

    def finish_samples(self, batch: RolloutBatch, pending, prompt_texts: list[str], row_fields: dict[str, list]
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """``finish`` per sample: (rewards (B,), each source's values (B,) by metric key, seconds). Streaming
        rollouts (``rollout.mode: async``) score groups as they finish and take the means over the step's batch."""
        B = batch.size
        total = torch.zeros(B, dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        timings: dict[str, float] = {}
        judging = self.judge.start(prompt_texts, batch.responses, row_fields) if self.judge is not None else None
        if self.functions is not None:
            components = [checked_scores(s, prompt_texts, batch.responses, row_fields, self.cfg.timeout_s)
                          for s in self.functions.sources]
            for w, source, comp in zip(self.functions.weights, self.functions.sources, components):
                values = torch.tensor(comp, dtype=torch.float32)
                total += w * values
                parts[f"reward/{metric_name(source.name)}_mean"] = values
        if pending is not None:
            scores, seconds = pending.result()
            if not torch.isfinite(scores).all():
                bad = int((~torch.isfinite(scores)).nonzero()[0])
                raise RewardError(f"reward model {self.cfg.model} returned {float(scores[bad])} for sample {bad} "
                                  f"(response: {batch.responses[bad][:80]!r})")
            total += scores
            parts["reward/model_mean"] = scores
            timings["timing/reward_model_s"] = seconds
        if judging is not None:
            values, judge_metrics = self.judge.finish(judging)
            total += values
            parts["reward/judge_mean"] = values
            timings.update(judge_metrics)
        if self.overlong_max_len is not None:
            shaping = overlong_penalty(batch.response_lengths, self.overlong_max_len, self.cfg.overlong_buffer,
                                       self.cfg.overlong_penalty)
            total += shaping
            parts["reward/overlong_penalty_mean"] = shaping
        if batch.env_rewards is not None:
            total += batch.env_rewards
            parts["reward/env_mean"] = batch.env_rewards
        if batch.env_failed is not None:
            total = torch.where(batch.env_failed, torch.zeros_like(total), total)
        return total, parts, timings

    def _rm_batch(self, batch: RolloutBatch, prompts: list[Any]) -> RolloutBatch:
        """The batch re-rendered with the reward model's tokenizer and chat template."""
        from rlhf_ray.data.batching import pad_batch
        from rlhf_ray.data.sft import prompt_messages

        tok = self.rm_tokenizer
        examples = []
        for prompt, response in zip(prompts, batch.responses):
            msgs = list(prompt) if isinstance(prompt, list) else prompt_messages(prompt, self.data.system_prompt)
            msgs = msgs + [{"role": "assistant", "content": response}]
            if tok.chat_template:
                ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
                if isinstance(ids, dict):
                    ids = ids["input_ids"]
            else:
                ids = tok("\n".join(m["content"] for m in msgs))["input_ids"]
            examples.append({"input_ids": list(ids)})
        padded = pad_batch(examples, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        T = padded["input_ids"].shape[1]
        return RolloutBatch(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                            action_mask=torch.zeros(batch.size, T - 1), group_index=batch.group_index,
                            rollout_logprobs=torch.zeros(batch.size, T - 1))


def reward_means(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each source's per-sample values -> its mean (the ``reward/<source>_mean`` metrics)."""
    return {key: float(values.mean()) for key, values in parts.items()}


def _same_vocab(a, b) -> bool:
    if a is None or b is None:
        return True
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template


def attach_prompts(batch: RolloutBatch, prompts: list) -> list:
    """Give ``batch`` its prompt texts and row fields (for reward functions); returns each sequence's prompt."""
    rows = [prompts[g] for g in batch.group_index.tolist()]
    batch.prompts = [p.prompt_text for p in rows]
    # Fields already there are the samples' own (a multi-turn episode's ``trajectory``); they stay.
    batch.row_fields = {**{k: [p.fields.get(k) for p in rows] for k in rows[0].fields}, **batch.row_fields}
    return rows


def score_batch(scorer: RewardScorer, batch: RolloutBatch, rows: list) -> dict[str, float]:
    """``batch.rewards`` from ``scorer`` (reward model started first, functions meanwhile); returns its metrics."""
    reward_model = scorer.start(batch, [p.prompt for p in rows])
    batch.rewards, metrics = scorer.finish(batch, reward_model, batch.prompts, batch.row_fields)
    return metrics
