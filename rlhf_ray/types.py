"""The one batch object that crosses actor boundaries in RL jobs.

Shapes: B sequences (prompts x samples), T tokens per padded sequence (prompt + response, right
padded). Per-token tensors have shape (B, T-1): entry t belongs to token ``input_ids[:, t+1]``
(what a causal LM predicts from position t), so log-probs, values, rewards and advantages line up
without further shifting. ``action_mask`` is 1 on generated (response) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class RolloutBatch:
    """Sequences, masks and every per-token quantity of one RL step."""

    # sequences
    input_ids: torch.Tensor                    # (B, T) prompt + response, right padded
    attention_mask: torch.Tensor               # (B, T) 1 on real tokens
    action_mask: torch.Tensor                  # (B, T-1) 1 where input_ids[:, t+1] was generated
    group_index: torch.Tensor                  # (B,) which prompt each sequence answers
    # log-probs of the generated tokens
    rollout_logprobs: torch.Tensor             # (B, T-1) from vLLM at sampling time
    old_logprobs: Optional[torch.Tensor] = None  # (B, T-1) learner's, before this step's update
    ref_logprobs: Optional[torch.Tensor] = None  # (B, T-1) reference model's
    # value / reward / advantage
    values: Optional[torch.Tensor] = None      # (B, T-1) critic
    rewards: Optional[torch.Tensor] = None     # (B,) sequence reward (functions + reward model + environment)
    env_rewards: Optional[torch.Tensor] = None  # (B,) multi-turn: the sum of the environment's step rewards
    env_failed: Optional[torch.Tensor] = None  # (B,) bool, multi-turn: the environment failed (reward forced to 0)
    token_rewards: Optional[torch.Tensor] = None  # (B, T-1) with KL-in-reward applied
    advantages: Optional[torch.Tensor] = None  # (B, T-1)
    returns: Optional[torch.Tensor] = None     # (B, T-1)
    # text and row fields for reward functions and logging (not sent to learners)
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    row_fields: dict[str, list[Any]] = field(default_factory=dict)
    finish_reasons: list[str] = field(default_factory=list)
    staleness: int = 0                         # policy updates between the weights that sampled it and training

    @staticmethod
    def from_generations(prompt_ids: list[list[int]], response_ids: list, response_logprobs: list,
                         group_index: list[int], pad_id: int,
                         sampled_masks: Optional[list] = None) -> "RolloutBatch":
        """Right-padded sequences ``prompt + response`` with masks and rollout log-probs aligned to (B, T-1).

        Row b's response token k sits at ``input_ids[b, P_b + k]``; it is predicted at position
        ``P_b + k - 1``, where ``action_mask`` is 1 and ``rollout_logprobs`` holds its log-prob. A multi-turn
        response holds observation tokens too: ``sampled_masks[b][k]`` (1 sampled, 0 environment) is then
        its ``action_mask`` entry instead of 1.
        """
        B = len(prompt_ids)
        lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
        T = max(lengths)
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        action_mask = torch.zeros((B, T - 1), dtype=torch.float32)
        logprobs = torch.zeros((B, T - 1), dtype=torch.float32)
        for b, (p, r, lp) in enumerate(zip(prompt_ids, response_ids, response_logprobs)):
            P, R = len(p), len(r)
            input_ids[b, :P] = torch.tensor(p, dtype=torch.long)
            if R:  # torch.tensor copies: vLLM's arrays arrive read-only through Ray's object store
                input_ids[b, P:P + R] = torch.tensor(r, dtype=torch.long)
                action_mask[b, P - 1:P - 1 + R] = (1.0 if sampled_masks is None
                                                   else torch.tensor(sampled_masks[b], dtype=torch.float32))
                logprobs[b, P - 1:P - 1 + R] = torch.tensor(lp, dtype=torch.float32)
            attention_mask[b, :P + R] = 1
        return RolloutBatch(input_ids=input_ids, attention_mask=attention_mask, action_mask=action_mask,
                            group_index=torch.as_tensor(group_index, dtype=torch.long), rollout_logprobs=logprobs)

    def at_actions(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per sequence, the entries of a (B, T-1) tensor at its sampled tokens (``action_mask`` 1), in order."""
        return [values[b][self.action_mask[b] > 0].clone() for b in range(self.size)]

    def from_actions(self, per_sample: list[torch.Tensor]) -> torch.Tensor:
        """The (B, T-1) tensor holding ``per_sample[b]`` at sequence b's sampled tokens and 0 elsewhere (the
        inverse of ``at_actions``)."""
        out = torch.zeros_like(self.action_mask)
        for b, values in enumerate(per_sample):
            out[b][self.action_mask[b] > 0] = values.to(out.dtype)
        return out

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) generated tokens per sequence."""
        return self.action_mask.sum(dim=-1)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def tensors(self, indices: list[int] | torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The named tensor fields for ``indices``, trimmed to the longest sequence among them.

        Trimming keeps micro-batches of short responses cheap when the step's longest is long.
        """
        idx = torch.as_tensor(indices, dtype=torch.long)
        length = int(self.attention_mask[idx].sum(dim=1).max())
        out: dict[str, torch.Tensor] = {}
        for name in names:
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"RolloutBatch.{name} is not filled in yet")
            value = value[idx]
            if value.dim() == 2:
                value = value[:, : length if name in ("input_ids", "attention_mask") else length - 1]
            out[name] = value.contiguous()
        return out
