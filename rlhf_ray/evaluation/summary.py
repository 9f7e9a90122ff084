"""One evaluation's samples -> its numbers, the ``eval.json`` document and the printed table.

A sample is *correct* when its total reward (the weighted sum of ``reward.functions`` plus ``reward.model``, as in
training) is at or above ``eval.correct_threshold``. pass@k and maj@k (``rlhf_ray.evaluation.metrics``) are taken
per prompt from its n samples and averaged over prompts; the other numbers are means over samples.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Hashable, Optional

from rlhf_ray.evaluation.metrics import maj_at_k, pass_at_k


@dataclass(frozen=True)
class EvalSettings:
    """What one evaluation samples and how it counts: ``eval.*`` and ``rollout.*`` resolved once
    (``rlhf_ray.config.resolve``, ``Resolved.evaluation``)."""

    n: int
    """Samples per prompt (``eval.n_samples``, or its default)."""
    temperature: float
    top_p: float
    max_new_tokens: int
    ks: tuple[int, ...]
    """The k of pass@k and maj@k: ``eval.ks``, or (1, n) when it is empty."""
    correct_threshold: float
    vote_on: str
    """``math_answer`` or ``response`` (see ``vote_key``)."""
    greedy: bool


SAMPLE_MEANS = ("reward_mean", "reward_std", "accuracy", "response_length_mean", "truncated_fraction")
"""The numbers ``summarize`` gives of every pass, beside each reward source's ``reward/<name>_mean``."""


def eval_metric_names(settings: EvalSettings) -> list[str]:
    """The ``eval/`` keys an evaluation with ``settings`` logs, without the per-source ``eval/reward/<name>_mean``
    (what ``summarize`` returns, prefixed: the sampled pass, then the greedy one under ``eval/greedy/``)."""
    names = [*SAMPLE_MEANS, *(f"pass@{k}" for k in settings.ks), *(f"maj@{k}" for k in settings.ks)]
    greedy = [f"greedy/{n}" for n in SAMPLE_MEANS] if settings.greedy else []
    return [f"eval/{n}" for n in names + greedy]


def vote_key(response: str, vote_on: str) -> Optional[Hashable]:
    """What a response votes for in maj@k. ``math_answer``: the final answer ``builtin:math`` extracts from it, as
    ``math_verify.answer_key`` (None when it has none: the sample abstains); ``response``: the stripped text."""
    if vote_on == "response":
        return response.strip()
    from rlhf_ray.rewards.math_verify import answer_key, extract_answer

    return answer_key(extract_answer(response))


@dataclass
class SampleSet:
    """Every sample of one pass over the prompt set, in the order drawn. Each list has one entry per sample."""

    prompt_index: list[int] = field(default_factory=list)
    """Position of the sample's prompt in the prompt set."""
    responses: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    """Response tokens."""
    finish_reasons: list[str] = field(default_factory=list)
    source_sums: dict[str, float] = field(default_factory=dict)
    """Per reward source (``reward/<name>_mean`` keys of ``RewardScorer``), the sum of its per-batch means times
    the batch size: divided by the sample count, the source's mean over every sample."""

    def add(self, prompt_index: list[int], responses: list[str], rewards: list[float], lengths: list[int],
            finish_reasons: list[str], source_means: dict[str, float]) -> None:
        """One scored batch; ``source_means`` are the batch's per-source means."""
        self.prompt_index += prompt_index
        self.responses += responses
        self.rewards += rewards
        self.lengths += lengths
        self.finish_reasons += finish_reasons
        for key, mean in source_means.items():
            self.source_sums[key] = self.source_sums.get(key, 0.0) + mean * len(rewards)

    def add_batch(self, batch: Any, reward_metrics: dict[str, float], offset: int = 0) -> None:
        """One scored ``RolloutBatch`` (its ``group_index`` is the prompt's position in the generate call, shifted by
        ``offset``) with the metrics ``score_batch`` returned for it (its ``reward/`` keys are the sources' means)."""
        self.add([offset + g for g in batch.group_index.tolist()], list(batch.responses), batch.rewards.tolist(),
                 [int(n) for n in batch.response_lengths.tolist()], list(batch.finish_reasons),
                 {k: v for k, v in reward_metrics.items() if k.startswith("reward/")})

    def __len__(self) -> int:
        return len(self.rewards)

    def correct(self, threshold: float) -> list[bool]:
        return [r >= threshold for r in self.rewards]

    def groups(self) -> list[list[int]]:
        """Sample indices per prompt, prompts in order, samples in the order drawn."""
        by_prompt: dict[int, list[int]] = {}
        for j, p in enumerate(self.prompt_index):
            by_prompt.setdefault(p, []).append(j)
        return [by_prompt[p] for p in sorted(by_prompt)]


def summarize(samples: SampleSet, settings: EvalSettings, ks: tuple[int, ...]) -> dict[str, float]:
    """The numbers of one pass: means over samples (reward, its std, accuracy = the fraction correct, response
    length, truncated fraction, each source's mean as ``reward/<name>_mean``) and, for each k in ``ks``, pass@k and
    maj@k averaged over prompts."""
    if not len(samples):
        raise ValueError("summarize: no samples")
    correct = samples.correct(settings.correct_threshold)
    S = len(samples)
    out = {"reward_mean": statistics.fmean(samples.rewards), "reward_std": statistics.pstdev(samples.rewards),
           "accuracy": sum(correct) / S, "response_length_mean": statistics.fmean(samples.lengths),
           "truncated_fraction": sum(r == "length" for r in samples.finish_reasons) / S}  # SAMPLE_MEANS
    out.update({key: total / S for key, total in sorted(samples.source_sums.items())})
    groups = samples.groups()
    keys = [vote_key(r, settings.vote_on) for r in samples.responses] if ks else []
    for k in ks:
        out[f"pass@{k}"] = statistics.fmean(pass_at_k(len(g), sum(correct[j] for j in g), k) for g in groups)
    for k in ks:
        out[f"maj@{k}"] = statistics.fmean(maj_at_k([keys[j] for j in g], [correct[j] for j in g], k) for g in groups)
    return out


def sample_rows(samples: SampleSet, settings: EvalSettings, prompt_texts: list[str], greedy: bool
                ) -> list[dict[str, Any]]:
    """One JSON row per sample (``eval_samples.jsonl``): prompt, response, reward, correct, the answer it votes
    for, response tokens, finish reason, and whether it is the greedy pass."""
    correct = samples.correct(settings.correct_threshold)
    rows = []
    for j in range(len(samples)):
        rows.append({"prompt_index": samples.prompt_index[j], "prompt": prompt_texts[samples.prompt_index[j]],
                     "greedy": greedy, "response": samples.responses[j], "reward": samples.rewards[j],
                     "correct": correct[j], "answer": vote_key(samples.responses[j], settings.vote_on),
                     "response_length": samples.lengths[j], "finish_reason": samples.finish_reasons[j]})
    return rows


def eval_document(model: str, data: str, prompts: int, settings: EvalSettings, reward: dict[str, Any],
                  sampled: dict[str, float], greedy: Optional[dict[str, float]], seconds: dict[str, float]
                  ) -> dict[str, Any]:
    """The ``eval.json`` document: what was evaluated, how, and the numbers (``sampled``; ``greedy`` or null)."""
    return {"model": model, "data": data, "prompts": prompts, "settings": {**asdict(settings), "ks": list(settings.ks)},
            "reward": reward, "sampled": sampled, "greedy": greedy, "seconds": seconds,
            "samples_file": "eval_samples.jsonl"}


def format_table(doc: dict[str, Any]) -> str:
    """The printed table of an ``eval.json`` document: one row per number, a column per pass."""
    s = doc["settings"]
    head = (f"eval of {doc['model']} on {doc['data']}: {doc['prompts']} prompts x {s['n']} samples at temperature "
            f"{s['temperature']:g} (correct: reward >= {s['correct_threshold']:g}; maj@k votes on {s['vote_on']})")
    columns = [("sampled", doc["sampled"])] + ([("greedy", doc["greedy"])] if doc.get("greedy") else [])
    names = list(doc["sampled"]) + [k for k in (doc.get("greedy") or {}) if k not in doc["sampled"]]
    width = max(len(n) for n in names) + 2
    lines = [head, "metric".ljust(width) + "".join(name.rjust(10) for name, _ in columns)]
    for n in names:
        cells = "".join(_cell(values.get(n)).rjust(10) for _, values in columns)
        lines.append(n.ljust(width) + cells)
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4f}"
