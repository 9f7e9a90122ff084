"""Shaping terms added to the sequence rewards before the advantages: DAPO's overlong punishment."""

from __future__ import annotations

from torch import Tensor


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), scaled by ``penalty``. lengths: (B,) -> (B,).

        R(L) = 0                                              L <= max_len - buffer
             = penalty * ((max_len - buffer) - L) / buffer    max_len - buffer < L <= max_len
             = -penalty                                       L > max_len

    L is a response's generated tokens, max_len its limit (``rollout.max_new_tokens``), buffer the last tokens
    before it over which the penalty grows linearly from 0 to -penalty (DAPO: L_cache = 4096 of 20480). A
    truncated response gets -penalty: the reward learns that length costs before the cut-off, not only at it.
    """
    start = max_len - buffer
    excess = (lengths.float() - start).clamp(min=0.0, max=float(buffer))
    return -penalty * excess / buffer
