"""Token log-probabilities and entropy from logits (shared by every objective)."""

from __future__ import annotations

import torch


def gather_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under ``softmax(logits)``, computed in fp32.

    logits: (B, T, V); tokens: (B, T) long. Returns (B, T):
        logp[b, t] = logits[b, t, tokens[b, t]] - logsumexp_v logits[b, t, v]
    The logsumexp form avoids materialising a second (B, T, V) tensor of log-softmax values.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position, in nats, computed in fp32.

    logits: (B, T, V). Returns (B, T):  H = logsumexp(z) - sum_v softmax(z)_v * z_v
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
