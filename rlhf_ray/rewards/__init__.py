"""Reward sources for RL jobs: built-in verifiable rewards, user Python files, HTTP endpoints, and sums.

A config names each source with one spec string (``reward.functions``)::

    builtin:math                      final-answer match against the row's ``answer`` (math_verify.py)
    builtin:format_think              ``<think>...</think>`` then an answer
    builtin:python_sandbox            the response's code passes the row's ``tests`` in a sandbox (code_exec.py)
    path/to/file.py[:func]            a user function ``func(prompts, responses, **row_fields)``
    http://host:8000/score            a remote reward (protocol in http.py; server.py hosts one)

:func:`build_reward_source` turns a spec into a :class:`RewardSource`; :func:`checked_scores` calls
one with a timeout and turns every failure into a :class:`RewardError` naming the source and sample.

Import-light on purpose (standard library only): no torch, no ray.
"""

from __future__ import annotations

from typing import Callable, Optional

from rlhf_ray.rewards.base import (CombinedReward, FunctionReward, RewardError, RewardSource, RowFields,
                                   checked_scores)
from rlhf_ray.rewards.code_exec import python_sandbox_reward
from rlhf_ray.rewards.math_verify import extract_answer, format_think_reward, math_reward
from rlhf_ray.rewards.python_file import load_reward_fn

BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {
    "math": math_reward,
    "format_think": format_think_reward,
    "python_sandbox": python_sandbox_reward,
}
"""Reward functions named in config as ``builtin:<key>``."""

BUILTIN_PREFIX = "builtin:"


def build_reward_source(spec: str, timeout_s: float, http_token: Optional[str] = None) -> RewardSource:
    """The reward source a config spec names; ``timeout_s`` bounds each HTTP request.

    ``builtin:<name>`` (a key of ``BUILTIN_REWARDS``), ``http://...`` / ``https://...`` (sent ``http_token`` as
    its bearer token), or a Python file spec ``path.py[:func]``. ValueError with the accepted forms for an unknown
    built-in.
    """
    spec = spec.strip()
    if spec.startswith(BUILTIN_PREFIX):
        key = spec[len(BUILTIN_PREFIX):]
        if key not in BUILTIN_REWARDS:
            raise ValueError(f"unknown built-in reward {spec!r}; built-ins: "
                             f"{', '.join(BUILTIN_PREFIX + k for k in BUILTIN_REWARDS)}")
        return FunctionReward(BUILTIN_REWARDS[key], name=spec, description=f"built-in reward {spec!r}")
    if spec.startswith(("http://", "https://")):
        # Imported here: urllib.request pulls in ssl and email, which a file-only run never needs.
        from rlhf_ray.rewards.http import HTTP_BATCH_SIZE, HttpReward

        return HttpReward(spec, timeout_s=timeout_s, batch_size=HTTP_BATCH_SIZE, token=http_token)
    return load_reward_fn(spec)


__all__ = [
    "BUILTIN_REWARDS", "CombinedReward", "FunctionReward", "RewardError", "RewardSource", "RowFields",
    "build_reward_source", "checked_scores", "extract_answer", "load_reward_fn", "math_reward",
]
