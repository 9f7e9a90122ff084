"""Example user reward file: penalise responses longer than a target length.

A reward file is plain Python; the trainer calls ``reward_fn(prompts, responses, **row_fields)``
with lists aligned by sample, and expects one float per sample. Use it alone or next to a
verifiable reward, weighting the two::

    reward:
      functions: [builtin:math, examples/rewards/length_penalty.py]
      weights: [1.0, 0.5]

Another function in the same file is named with ``:``
(``examples/rewards/length_penalty.py:brevity_bonus``). To host it on another machine::

    python -m rlhf_ray.rewards.server --reward examples/rewards/length_penalty.py --port 8000
    # then in the config: reward.functions: [http://that-host:8000/score]
"""

TARGET_CHARS = 400
"""Responses up to this many characters are not penalised."""


def reward_fn(prompts: list[str], responses: list[str], **row_fields) -> list[float]:
    """0.0 up to TARGET_CHARS, then -1.0 per TARGET_CHARS beyond it, floored at -1.0.

    Row fields (``answer`` and the like) are accepted and ignored: this reward only looks at length.
    """
    return [-min(1.0, max(0, len(r) - TARGET_CHARS) / TARGET_CHARS) for r in responses]


def brevity_bonus(prompts: list[str], responses: list[str], **row_fields) -> list[float]:
    """1.0 for a response no longer than its prompt, falling linearly to 0.0 at twice the prompt's length."""
    out = []
    for p, r in zip(prompts, responses):
        limit = max(len(p), 1)
        out.append(max(0.0, min(1.0, 2.0 - len(r) / limit)))
    return out
