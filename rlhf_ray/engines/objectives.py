"""Objectives: the glue between a model's forward pass and the pure losses in ``rlhf_ray.algos``.

Each objective takes ``(model, micro_batch, **kwargs)`` and returns ``(loss, metrics)`` where
``loss`` is already scaled so that DeepSpeed's averaging (1/accumulation steps, mean over ranks)
yields the *global* objective, and ``metrics`` holds sums (the controller adds ranks together and
divides by the global counts). Looked up by name so learner actors receive no pickled closures.
"""

from __future__ import annotations

from typing import Callable

import torch

OBJECTIVES: dict[str, Callable] = {}
"""Training objectives: ``(model, micro_batch, **kwargs) -> (scaled loss, metric sums)``."""
FORWARDS: dict[str, Callable] = {}
"""No-grad forward functions: ``(model, micro_batch, **kwargs) -> tensor`` (log-probs, values, scores)."""

# Modules that register more objectives / forwards; imported on first lookup so that a learner actor
# resolves any name without the caller shipping code.
_PROVIDERS = ("rlhf_ray.engines.rl_objectives", "rlhf_ray.engines.preference_objectives")


def register(name: str):
    """Decorator: add a training objective to ``OBJECTIVES``."""
    def deco(fn: Callable) -> Callable:
        OBJECTIVES[name] = fn
        return fn
    return deco


def register_forward(name: str):
    """Decorator: add a no-grad forward function to ``FORWARDS``."""
    def deco(fn: Callable) -> Callable:
        FORWARDS[name] = fn
        return fn
    return deco


def _load_providers() -> None:
    import importlib

    for module in _PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a provider that exists but fails to import is a real error
                raise


def get_objective(name: str) -> Callable:
    if name not in OBJECTIVES:
        _load_providers()
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}'; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def get_forward(name: str) -> Callable:
    if name not in FORWARDS:
        _load_providers()
    if name not in FORWARDS:
        raise ValueError(f"unknown forward function '{name}'; known: {sorted(FORWARDS)}")
    return FORWARDS[name]


def causal_lm_logits(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) of a causal LM, passing position ids when the batch is packed."""
    kwargs = {"input_ids": mb["input_ids"], "attention_mask": mb.get("attention_mask")}
    if "position_ids" in mb:
        kwargs["position_ids"] = mb["position_ids"]
    return model(**kwargs, use_cache=False).logits


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
    """Log-probs (B, T-1) of each next token and the mask (labels != -100) they count under."""
    from rlhf_ray.algos.logprobs import gather_token_logprobs

    logits = causal_lm_logits(model, mb)[:, :-1]
    labels = mb["labels"][:, 1:]
    mask = labels != -100
    logps = gather_token_logprobs(logits, labels.clamp(min=0))
    return logps, mask


@register("sft")
def sft_objective(model: torch.nn.Module, mb: dict[str, torch.Tensor], loss_scale: float):
    """Negative log-likelihood of response tokens, a token mean over the whole global batch.

    loss = -sum_{response tokens} log p(y_t | y_<t) * loss_scale,
    loss_scale = accumulation_steps * world_size / (response tokens in the global batch).
    """
    logps, mask = shifted_token_logprobs(model, mb)
    nll_sum = -(logps * mask).sum()
    return nll_sum * loss_scale, {"nll_sum": nll_sum.detach().item(), "response_tokens": mask.sum().item()}


@register_forward("token_logprobs")
def token_logprobs_forward(model: torch.nn.Module, mb: dict[str, torch.Tensor], temperature: float = 1.0):
    """Log-probs (B, T-1) of ``input_ids[:, 1:]`` under ``softmax(logits / temperature)``."""
    from rlhf_ray.algos.logprobs import gather_token_logprobs

    logits = causal_lm_logits(model, mb)[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    return gather_token_logprobs(logits, mb["input_ids"][:, 1:])


@register_forward("sequence_scores")
def sequence_scores_forward(model: torch.nn.Module, mb: dict[str, torch.Tensor]):
    """Reward-model scores (B,) at each sequence's last real token."""
    return sequence_scores(model, mb)
