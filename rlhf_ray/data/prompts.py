"""Prompts for RL jobs (PPO, GRPO, best-of-n, online DPO): token ids for the rollout engines, plus
every other row field for the reward functions.

A row's prompt is ``data.prompt_field`` (a string, made a user message after ``data.system_prompt``)
or, when the row has one, ``data.messages_field`` (a conversation; a trailing assistant turn, e.g. a
reference answer of an SFT-style row, is not part of the prompt). It is rendered with the chat
template's generation prompt (or taken raw when ``data.apply_chat_template`` is false).

Over-length prompts (``> data.max_prompt_length`` tokens): ``drop`` and ``truncate`` both leave the
row out and count it in ``dropped``; ``error`` raises. Prompts are never cut: cutting from the right
loses the question (and the generation prompt), cutting from the left loses the template header and
system prompt, and either way the reward function would grade an answer to a question the model
never saw. Raise ``max_prompt_length`` instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.sft import (BadRows, RowProblem, check_messages, check_template, encode, no_examples_message,
                               prompt_messages, render, require_text, with_system)
from rlhf_ray.data.sources import RowSet

log = logging.getLogger(__name__)


@dataclass
class PromptExample:
    """One RL prompt."""

    prompt_ids: list[int]
    """What the rollout engine continues from (chat template with generation prompt applied)."""
    prompt_text: str
    """The text ``prompt_ids`` encode (the rendered template, or the raw prompt)."""
    prompt: Any
    """The row's prompt field as given: a string, or the message list."""
    fields: dict[str, Any]
    """Every other field of the row (e.g. ``answer``), passed on to reward functions."""
    location: str


@dataclass
class PromptSet:
    """Tokenized prompts and what happened to the other rows."""

    prompts: list[PromptExample]
    source: str
    rows: int
    dropped: int = 0
    """Prompts over ``max_prompt_length`` left out (overlength: drop or truncate)."""
    skipped: int = 0
    """Rows without a usable prompt, skipped under on_bad_row: skip."""
    skipped_at_load: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> PromptExample:
        return self.prompts[i]

    def counts(self) -> dict[str, int]:
        return {"prompts": len(self.prompts), "dropped": self.dropped, "skipped": self.skipped,
                "skipped_at_load": self.skipped_at_load}


def tokenize_prompts(rows: RowSet, tokenizer, cfg: DataConfig) -> PromptSet:
    """Turn rows into ``PromptExample``s (see the module docstring for the prompt and length rules).

    Raises ``DataError`` for a row without a prompt under ``on_bad_row: error``, for an over-length
    prompt under ``overlength: error``, and when no prompt is left.
    """
    check_template(tokenizer, cfg)
    out = PromptSet([], rows.source, len(rows), skipped_at_load=rows.skipped_malformed)
    bad = BadRows(cfg)
    for loc, row in rows.items():
        try:
            if row.get(cfg.messages_field) is not None:
                if not cfg.apply_chat_template:
                    raise DataError(f"{loc}: has a '{cfg.messages_field}' conversation but data.apply_chat_template "
                                    "is false; conversations need the chat template")
                key = cfg.messages_field
                msgs = check_messages(row[key], key)
                if msgs[-1]["role"] == "assistant":
                    msgs = msgs[:-1]
                if not msgs:
                    raise RowProblem(f"field '{key}' holds only an assistant message; there is no prompt")
                text = render(tokenizer, with_system(msgs, cfg.system_prompt), add_generation_prompt=True)
                ids = encode(tokenizer, text)
            else:
                key = cfg.prompt_field
                prompt = require_text(row, key, also=cfg.messages_field)
                if cfg.apply_chat_template:
                    text = render(tokenizer, prompt_messages(prompt, cfg.system_prompt), add_generation_prompt=True)
                    ids = encode(tokenizer, text)
                else:
                    text = prompt
                    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        except RowProblem as exc:
            bad.add(loc, str(exc))
            continue
        if len(ids) > cfg.max_prompt_length:
            if cfg.overlength == "error":
                raise DataError(f"{loc}: prompt of {len(ids)} tokens is over data.max_prompt_length="
                                f"{cfg.max_prompt_length}; raise it or set data.overlength=drop")
            out.dropped += 1
            continue
        fields = {k: v for k, v in row.items() if k != key}
        if cfg.answer_field in row:  # reward functions take the reference answer as ``answer``
            fields["answer"] = row[cfg.answer_field]
        out.prompts.append(PromptExample(ids, text, row[key], fields, loc))
    out.skipped, out.skip_reasons = bad.count, bad.reasons
    log.info("prompts %s: %d rows -> %d prompts (dropped %d over max_prompt_length=%d%s, skipped %d malformed, "
             "%d at load)", rows.source, len(rows), len(out.prompts), out.dropped, cfg.max_prompt_length,
             " (overlength=truncate drops prompts too)" if cfg.overlength == "truncate" and out.dropped else "",
             out.skipped, out.skipped_at_load)
    if not out.prompts:
        raise DataError(no_examples_message("prompt", out.source, len(rows), out.counts(), bad.reasons, cfg))
    return out
