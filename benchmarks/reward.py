"""The benchmarks' reward: cheap, deterministic and varied, so advantages are not all zero and the learners do
their real work. Used by our runs (``reward.functions``) and by the TRL run alike."""

from __future__ import annotations


def digit_fraction(prompts, responses, **_):
    """Fraction of the response's characters that are digits (0 for an empty response)."""
    return [sum(c.isdigit() for c in r) / max(1, len(r)) for r in responses]


def trl_digit_fraction(prompts, completions, **_):
    """The same reward in TRL's signature (``completions`` are strings for string prompts)."""
    return digit_fraction(prompts, completions)
