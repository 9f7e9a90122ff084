"""The benchmarks' reward: cheap, deterministic and varied, so advantages are not all zero and the learners do
their real work. Used by our runs (``reward.functions``) and by the TRL run alike."""

from __future__ import annotations


def digit_fraction(prompts, responses, **_):
    """Fraction of the response's characters that are digits (0 for an empty response)."""
    return [sum(c.isdigit() for c in r) / max(1, len(r)) for r in responses]


DELAY_ENV = "RLHF_RAY_BENCH_REWARD_DELAY_S"
"""Seconds ``slow_digit_fraction`` spends per sample (``bench_rl.py --reward-delay-s`` over a step's samples): a
step's batch costs the same whether it is scored at once (sync) or group by group as it finishes (async)."""


def slow_digit_fraction(prompts, responses, **_):
    """``digit_fraction`` after ``$RLHF_RAY_BENCH_REWARD_DELAY_S`` seconds of waiting per response: a reward that
    spends wall time without compute (a remote verifier, a judge behind an API), to show what overlapping hides."""
    import os
    import time

    time.sleep(float(os.environ.get(DELAY_ENV, "0")) * len(responses))
    return digit_fraction(prompts, responses)


def trl_digit_fraction(prompts, completions, **_):
    """The same reward in TRL's signature (``completions`` are strings for string prompts)."""
    return digit_fraction(prompts, completions)
