"""What a multi-turn sample adds to ``Generations``, and the ``env/`` metrics of a step.

A multi-turn sample is one token sequence ``prompt + completion``. ``Generations.token_ids[i]`` holds the whole
completion (model turns and observations, as they follow each other) and ``logprobs[i]`` the engine's log-probs of
the sampled tokens (0 on observation tokens); ``Trajectories.action_masks[i]`` says which tokens the engine sampled
(1) and which the environment added (0). ``RolloutBatch.action_mask`` takes it as is, so losses, advantages, values
and the learner-vs-vLLM log-prob gap count model tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

COUNTS = ("turns", "tool_calls", "tool_errors", "failed", "env_reward")
"""Per-sample counts: model turns, tool calls and how many of them failed, whether the environment failed (0 / 1,
``rollout.on_env_error: zero_reward``), and the sum of its step rewards."""


@dataclass
class Trajectories:
    """Per sample of a multi-turn ``Generations`` (same order, same length)."""

    prompt_ids: list[np.ndarray]
    """The first prompt the episode started from (the environment's first observation, rendered with the chat
    template's generation prompt); it may differ between the samples of one prompt."""
    action_masks: list[np.ndarray]
    """(len(token_ids[i]),) 1 on tokens the engine sampled, 0 on tokens the environment added."""
    messages: list[list[dict]]
    """The conversation after the first prompt: the model's turns (``assistant``, their text as decoded from the
    sampled tokens) and the observations. Reward functions get it as the row field ``trajectory``."""
    counts: dict[str, np.ndarray]
    """``COUNTS`` -> (N,) float64."""
    env_seconds: float = 0.0
    """Wall seconds spent waiting on environment calls (reset, step) while sampling these."""

    def select(self, samples: list[int]) -> "Trajectories":
        return Trajectories([self.prompt_ids[i] for i in samples], [self.action_masks[i] for i in samples],
                            [self.messages[i] for i in samples], {k: v[samples] for k, v in self.counts.items()},
                            self.env_seconds)

    @staticmethod
    def concat(parts: list["Trajectories"]) -> "Trajectories":
        return Trajectories([p for t in parts for p in t.prompt_ids], [m for t in parts for m in t.action_masks],
                            [m for t in parts for m in t.messages],
                            {k: np.concatenate([t.counts[k] for t in parts]) for k in COUNTS},
                            sum(t.env_seconds for t in parts))

    def to_state(self) -> dict[str, Any]:
        """As tensors, strings and numbers (what ``torch.load(weights_only=True)`` reads back)."""
        import torch

        return {"prompt_ids": [torch.tensor(p) for p in self.prompt_ids],
                "action_masks": [torch.tensor(m) for m in self.action_masks], "messages": self.messages,
                "counts": {k: torch.tensor(v) for k, v in self.counts.items()}, "env_seconds": float(self.env_seconds)}

    @staticmethod
    def from_state(state: dict[str, Any]) -> "Trajectories":
        return Trajectories([p.numpy() for p in state["prompt_ids"]], [m.numpy() for m in state["action_masks"]],
                            list(state["messages"]), {k: v.numpy() for k, v in state["counts"].items()},
                            float(state["env_seconds"]))

    @property
    def sampled_tokens(self) -> int:
        return int(sum(int(m.sum()) for m in self.action_masks))

    def annotate(self, batch: Any) -> None:
        """Give a ``RolloutBatch`` of these samples their environment rewards, failures and conversations."""
        import torch

        batch.env_rewards = torch.as_tensor(self.counts["env_reward"], dtype=torch.float32)
        batch.env_failed = torch.as_tensor(self.counts["failed"] > 0)
        batch.row_fields["trajectory"] = list(self.messages)

    def metrics(self) -> dict[str, float]:
        """The ``env/`` metrics of a step: turns per trajectory, tool calls per trajectory, tool errors and failed
        environments in the step, the mean environment reward, and the seconds spent in environment calls."""
        c = self.counts
        return {"env/turns_mean": float(c["turns"].mean()), "env/turns_max": float(c["turns"].max()),
                "env/tool_calls_mean": float(c["tool_calls"].mean()), "env/tool_calls": float(c["tool_calls"].sum()),
                "env/tool_errors": float(c["tool_errors"].sum()), "env/failed": float(c["failed"].sum()),
                "env/reward_mean": float(c["env_reward"].mean()), "env/seconds": float(self.env_seconds)}
