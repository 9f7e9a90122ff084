"""Objective and forward specs shared by every job, and what all of them are scaled by.

Scaling: DeepSpeed averages gradients over accumulation steps and data-parallel ranks. An objective returns
its micro-batch's additive share of the *global* loss (its denominators are ``BatchTotals`` of the whole
global batch) times ``BatchTotals.grad_scale`` = accumulation steps x ranks, which undoes that averaging:
the update is the gradient of the global loss however the batch is split. Metrics are sums; the controller
adds ranks together and divides by the global counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from rlhf_ray.data.batching import IGNORE_INDEX

SEQUENCE_FIELDS = ("input_ids", "attention_mask")
"""What every forward reads."""


@dataclass(frozen=True)
class BatchTotals:
    """Counts of the whole global batch (or PPO mini-batch) one optimizer step trains on."""

    tokens: int = 0
    """Loss-carrying tokens: response tokens (SFT), action tokens (RL)."""
    sequences: int = 0
    """Rows (RL), pairs (reward model, DPO) or examples (KTO)."""
    horizon: int = 1
    """The longest possible response (``rollout.max_new_tokens``): Dr. GRPO's constant normaliser."""
    grad_scale: float = 1.0
    """Accumulation steps x data-parallel ranks (undoes DeepSpeed's averaging)."""

    def scale(self, count: int) -> float:
        """``grad_scale / max(1, count)``: a micro-batch's sum times this is its share of the global mean."""
        return self.grad_scale / max(1, count)


def causal_lm_logits(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) of a causal LM. Packed rows (``segment_ids``, ``position_ids`` restarting per example)
    attend within their own example only: a block-diagonal causal mask for eager / sdpa attention, or, for
    flash attention, no mask (transformers then reads the example boundaries from the position ids)."""
    kwargs = {"input_ids": mb["input_ids"], "attention_mask": mb.get("attention_mask")}
    if "position_ids" in mb:
        kwargs["position_ids"] = mb["position_ids"]
    if "segment_ids" in mb:
        kwargs["attention_mask"] = _packed_mask(model, mb["segment_ids"])
    return model(**kwargs, use_cache=False).logits


def _packed_mask(model: torch.nn.Module, segment_ids: torch.Tensor):
    from rlhf_ray.data.batching import packed_attention_mask

    inner = getattr(model, "module", model)  # DeepSpeed engine
    attn = str(getattr(getattr(inner, "config", None), "_attn_implementation", "") or "")
    if attn.startswith("flash"):
        return None
    return packed_attention_mask(segment_ids, dtype=next(inner.parameters()).dtype)


def sequence_scores(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar score (B,) of each right-padded sequence from a sequence-classification model.

    Read at the last real token (``attention_mask.sum(-1) - 1``) rather than through transformers'
    pad-token search, which picks the wrong position when the pad token equals the EOS that ends
    every response. The score head runs on the final hidden states (B, T, H) -> (B, T, 1).
    """
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], output_hidden_states=True,
                use_cache=False)
    hidden = out.hidden_states[-1]
    last = (mb["attention_mask"].sum(dim=-1) - 1).clamp(min=0)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    head = _score_head(model)
    return head(hidden[rows, last]).squeeze(-1).float()


def _score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The ``score`` linear layer of a transformers ``*ForSequenceClassification`` (through peft / DeepSpeed)."""
    inner = getattr(model, "module", model)  # DeepSpeed engine
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    head = getattr(inner, "score", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no 'score' head; reward models must be "
                         "AutoModelForSequenceClassification models with num_labels=1")
    return head


def shifted_token_logprobs(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (B, T-1) of each next token and the mask (labels != IGNORE_INDEX) they count under."""
    from rlhf_ray.algos.logprobs import gather_token_logprobs

    logits = causal_lm_logits(model, mb)[:, :-1]
    labels = mb["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logps = gather_token_logprobs(logits, labels.clamp(min=0))
    return logps, mask


@dataclass(frozen=True)
class SFTLoss:
    """Negative log-likelihood of response tokens, a token mean over the whole global batch.

    loss = -sum_{response tokens} log p(y_t | y_<t) * grad_scale / (response tokens in the global batch)
    """

    def __call__(self, model: torch.nn.Module, mb: dict[str, torch.Tensor], totals: BatchTotals):
        logps, mask = shifted_token_logprobs(model, mb)
        nll_sum = -(logps * mask).sum()
        return nll_sum * totals.scale(totals.tokens), {"nll_sum": nll_sum.detach().item(),
                                                       "response_tokens": mask.sum().item()}


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probs (B, T-1) of ``input_ids[:, 1:]`` under ``softmax(logits / temperature)`` (policy, reference)."""

    temperature: float = 1.0
    fields: ClassVar[tuple[str, ...]] = SEQUENCE_FIELDS

    def __call__(self, model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        from rlhf_ray.algos.logprobs import gather_token_logprobs

        logits = causal_lm_logits(model, mb)[:, :-1]
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return gather_token_logprobs(logits, mb["input_ids"][:, 1:])


@dataclass(frozen=True)
class SequenceScores:
    """Reward-model scores (B,) at each sequence's last real token."""

    fields: ClassVar[tuple[str, ...]] = SEQUENCE_FIELDS

    def __call__(self, model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_scores(model, mb)


Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor], BatchTotals], tuple[torch.Tensor, dict[str, float]]]
"""A training spec called on one micro-batch: ``(model, micro_batch, totals) -> (scaled loss, metric sums)``."""
Forward = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
"""A no-grad forward spec: ``(model, micro_batch) -> tensor`` (log-probs, values, scores)."""
