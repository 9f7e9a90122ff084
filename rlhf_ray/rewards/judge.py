"""A generative judge (RLAIF): the judge's prompt for each sample, and its score read back from the verdict.

    judge_b = weight * (clip(s_b, lo, hi) - lo) / (hi - lo),   s_b = float(first match of score_pattern in verdict_b)

lo, hi = ``reward.judge.min_score``, ``max_score``. A verdict without a match raises ``RewardError`` naming the sample
(``on_unparsable: error``) or scores ``default_score`` and is counted (``default``). Pure Python: the engines that
write the verdicts are ``JudgeScorer``'s (``controller/reward_scoring.py``) in training and the reward server's
(``rewards/judge_engine.py``); both go through ``PointwiseJudge``. Nothing here imports ray or vllm.
"""

from __future__ import annotations

import math
import os
import re
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from rlhf_ray.rewards.base import RewardError

if TYPE_CHECKING:
    from rlhf_ray.config.job_sections import JudgeConfig

TEMPLATE_FIELDS = ("prompt", "response", "reference")
"""The placeholders a judge template may use; ``{response}`` is required."""


def _template_text(template: str, key: str) -> tuple[str, set[str]]:
    """A judge template as text (read from the file it names when it names one) and its placeholder names;
    ``ConfigError`` naming ``key`` when its braces do not parse."""
    from rlhf_ray.config import ConfigError

    text = template
    if "{" not in template and os.path.isfile(os.path.expanduser(template)):
        with open(os.path.expanduser(template), encoding="utf-8") as f:
            text = f.read()
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc} (write a literal brace as {{{{ or }}}})") from exc
    return text, names


def load_template(template: str, reference_field: Optional[str] = None) -> str:
    """``reward.judge.template`` as text (read from the file it names when it names one), checked: ``{response}``
    present, no placeholder beyond ``TEMPLATE_FIELDS``, ``{reference}`` only with ``reference_field``.
    Raises ``ConfigError`` naming the key."""
    from rlhf_ray.config import ConfigError

    key = "reward.judge.template"
    text, names = _template_text(template, key)
    unknown = sorted(names - set(TEMPLATE_FIELDS))
    if unknown:
        raise ConfigError(f"{key}: unknown placeholder(s) {unknown}; the template may use {list(TEMPLATE_FIELDS)} "
                          "(write a literal brace as {{ or }})")
    if "response" not in names:
        where = "" if text is template else f" (read from {template})"
        raise ConfigError(f"{key}: needs a {{response}} placeholder where the judged response goes{where}; "
                          "a string without one that is not a file's path is taken as the template itself")
    if "reference" in names and not reference_field:
        raise ConfigError(f"{key}: uses {{reference}}, so reward.judge.reference_field must name the row field "
                          "it takes")
    return text


def render(template: str, prompt: str, response: str, reference: Any = None) -> str:
    """The judge's prompt for one sample (``template`` checked by ``load_template``)."""
    return template.format(prompt=prompt, response=response, reference="" if reference is None else str(reference))


def parse_score(verdict: str, pattern: "re.Pattern[str]") -> Optional[float]:
    """The number ``pattern``'s group captures at its first match in ``verdict``; None when there is none
    (or it is not a finite number)."""
    m = pattern.search(verdict)
    if m is None:
        return None
    try:
        value = float(m.group(1))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def judge_rewards(verdicts: list[str], pattern: "re.Pattern[str]", min_score: float, max_score: float,
                  default_score: Optional[float]) -> tuple[list[float], int]:
    """(rewards in [0, 1] (B,), how many verdicts did not parse). ``default_score`` None: an unparsable verdict
    raises ``RewardError`` naming the sample and quoting the verdict."""
    rewards, unparsable = [], 0
    for b, verdict in enumerate(verdicts):
        score = parse_score(verdict, pattern)
        if score is None:
            if default_score is None:
                # public: what the reward server may tell a client (the verdict can quote the sample's text)
                raise RewardError(
                    f"reward.judge: the verdict on sample {b} has no score matching {pattern.pattern!r}: "
                    f"{verdict[:200]!r} (fix the template or score_pattern, or set reward.judge.on_unparsable: "
                    "default with a default_score)",
                    public=f"reward.judge: the verdict on sample {b} has no score matching {pattern.pattern!r} "
                           "(on_unparsable: error; the verdict is in the server's log)")
            unparsable += 1
            score = default_score
        score = min(max(score, min_score), max_score)
        rewards.append((score - min_score) / (max_score - min_score))
    return rewards, unparsable


@dataclass(frozen=True)
class PointwiseJudge:
    """``reward.judge`` (pointwise) without its engine: the judge's prompt for each sample, and the rewards its
    verdicts give. Shared by the training job's judge engines (``JudgeScorer``) and the reward server's
    in-process judge (``rewards/judge_engine.py``), so both read and score verdicts the same way.

        reward_b = weight * (clip(s_b, lo, hi) - lo) / (hi - lo)    (s_b = default_score when unparsable and
                                                                     on_unparsable is default)
    """

    cfg: "JudgeConfig"
    template: str
    """``cfg.template`` as text, checked (``load_template``)."""
    pattern: "re.Pattern[str]"
    uses_reference: bool
    """The template has a ``{reference}`` placeholder (filled from the row field ``cfg.reference_field``)."""

    @staticmethod
    def from_config(cfg: "JudgeConfig") -> "PointwiseJudge":
        """The judge ``cfg`` describes; ``ConfigError`` naming the key for a bad template."""
        template = load_template(cfg.template, cfg.reference_field)
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        return PointwiseJudge(cfg, template, re.compile(cfg.score_pattern), "reference" in names)

    def prompts(self, prompts: list[str], responses: list[str], row_fields: dict[str, list]) -> list[str]:
        """The rendered judge prompt of each sample (B,), before any chat template. ``RewardError`` naming
        ``reference_field`` when the template takes ``{reference}`` and the batch lacks that row field."""
        refs: list[Any] = [None] * len(responses)
        if self.uses_reference:
            if self.cfg.reference_field not in row_fields:
                message = (f"reward.judge.reference_field: the batch has no row field {self.cfg.reference_field!r} "
                           f"for the template's {{reference}} (it has {sorted(row_fields)})")
                raise RewardError(message, public=message)
            refs = list(row_fields[self.cfg.reference_field])
        return [render(self.template, p, r, ref) for p, r, ref in zip(prompts, responses, refs)]

    def rewards(self, verdicts: list[str]) -> tuple[list[float], int]:
        """(weight * scaled score of each verdict (B,), how many did not parse); ``RewardError`` naming the
        first unparsable sample under ``on_unparsable: error`` (``judge_rewards``)."""
        default = self.cfg.default_score if self.cfg.on_unparsable == "default" else None
        scaled, unparsable = judge_rewards(verdicts, self.pattern, self.cfg.min_score, self.cfg.max_score, default)
        return [self.cfg.weight * x for x in scaled], unparsable


# ---- pairwise judging (online DPO) ------------------------------------------------------------------------------

PAIR_FIELDS = ("prompt", "response_a", "response_b", "reference")
"""The placeholders a pairwise template may use; ``{response_a}`` and ``{response_b}`` are required."""


def load_pair_template(template: str, reference_field: Optional[str] = None) -> str:
    """``reward.judge.pairwise_template`` as text (or read from the file it names), checked like ``load_template``:
    ``{response_a}`` and ``{response_b}`` present, nothing beyond ``PAIR_FIELDS``. Raises ``ConfigError``."""
    from rlhf_ray.config import ConfigError

    key = "reward.judge.pairwise_template"
    text, names = _template_text(template, key)
    unknown = sorted(names - set(PAIR_FIELDS))
    if unknown:
        raise ConfigError(f"{key}: unknown placeholder(s) {unknown}; the template may use {list(PAIR_FIELDS)}")
    missing = [f for f in ("response_a", "response_b") if f not in names]
    if missing:
        raise ConfigError(f"{key}: needs the placeholder(s) {missing}: the two responses the judge compares")
    if "reference" in names and not reference_field:
        raise ConfigError(f"{key}: uses {{reference}}, so reward.judge.reference_field must name the row field")
    return text


def render_pair(template: str, prompt: str, a: str, b: str, reference: Any = None) -> str:
    return template.format(prompt=prompt, response_a=a, response_b=b,
                           reference="" if reference is None else str(reference))


def parse_preference(verdict: str, pattern: "re.Pattern[str]") -> Optional[str]:
    """"A" or "B": the group of ``pattern``'s first match, upper-cased; None when there is none or it is another
    string."""
    m = pattern.search(verdict)
    if m is None or m.group(1) is None:
        return None
    choice = m.group(1).strip().upper()
    return choice if choice in ("A", "B") else None


def pair_label(ab: Optional[str], ba: Optional[str]) -> Optional[int]:
    """Which of (x, y) wins from the verdicts on both orders: ``ab`` shown x as A, ``ba`` shown y as A.
    0: x (A then B), 1: y (B then A), None: the verdicts disagree once positions are undone (position bias) or one
    did not parse."""
    if ab == "A" and ba == "B":
        return 0
    if ab == "B" and ba == "A":
        return 1
    return None
