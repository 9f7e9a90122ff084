"""DAPO's dynamic sampling (Yu et al. 2025): which prompt groups carry a learning signal.

A group whose samples all got the same reward has zero advantage under any group-relative estimator (GRPO,
RLOO, Dr. GRPO): it adds nothing to the policy gradient but still dilutes a token-mean loss. DAPO drops such
groups and samples more prompts until the batch is full.
"""

from __future__ import annotations

from torch import Tensor


def varied_groups(rewards: Tensor, group_index: Tensor, tol: float = 0.0) -> list[int]:
    """The groups (ids in ``group_index``, in first-seen order) whose rewards are not all equal:
    max_i r_i - min_i r_i > ``tol`` over the group's samples. ``rewards``, ``group_index``: (B,)."""
    out, seen = [], set()
    for g in group_index.tolist():
        if g in seen:
            continue
        seen.add(g)
        r = rewards[group_index == g]
        if float(r.max() - r.min()) > tol:
            out.append(g)
    return out
