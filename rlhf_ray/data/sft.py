"""SFT rows -> ``input_ids`` and ``labels`` with the loss on response tokens only.

Three row shapes (``tokenize_sft``):

(a) ``prompt`` / ``response`` fields: the prompt becomes a user message (after ``data.system_prompt``
    as a system message, if set), rendered by the tokenizer's chat template with the generation
    prompt; the response tokens follow, then the end-of-turn token (``tokenizer.eos_token``).
    Prompt and response are tokenized separately, so the ids are exactly those a generation from
    this prompt would produce (no token merges across the boundary).
(b) OpenAI ``messages`` lists: the loss is on every assistant turn. Each assistant span is found by
    rendering the conversation up to that turn with the generation prompt and up to its end without,
    and both must be prefixes of the whole rendering; a template that rewrites earlier turns (so it
    is not prefix-consistent) raises ``DataError``, since no prompt mask could be right. Template
    text after the first end-of-turn token of an assistant turn (ChatML's trailing newline) stays
    in the input but is not trained on.
(c) ``data.apply_chat_template: false``: raw ``prompt`` text (with the tokenizer's own special tokens,
    e.g. BOS) followed by the response and the EOS token.

Labels are ``-100`` on prompt tokens (and, after ``pad_batch``, on padding). Over-length examples
follow ``data.overlength``; malformed rows follow ``data.on_bad_row``. The helpers in the second half
(rendering, encoding, field checks) are shared with ``prompts.py`` and ``preference.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data.batching import IGNORE_INDEX
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.sources import MAX_REASONS_KEPT, RowSet

log = logging.getLogger(__name__)


@dataclass
class TokenizedSet:
    """Tokenized SFT examples and what happened to the other rows."""

    examples: list[dict[str, Any]]
    """Each ``{"input_ids": list[int], "labels": list[int], "location": str}``; labels are -100 off-response."""
    source: str
    rows: int
    """Rows given to the tokenizer."""
    truncated: int = 0
    """Examples whose response was cut from the right to fit ``max_length`` (overlength: truncate)."""
    dropped: int = 0
    """Rows over ``max_length`` left out (overlength: drop)."""
    dropped_prompt_too_long: int = 0
    """Rows left out under overlength: truncate because the prompt alone leaves no response token."""
    skipped: int = 0
    """Rows unusable for this job (missing / mistyped field, ...) skipped under on_bad_row: skip."""
    skipped_at_load: int = 0
    """Rows skipped as malformed while reading the file (``RowSet.skipped_malformed``)."""
    skip_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def counts(self) -> dict[str, int]:
        """The counters, for logs and the job's result."""
        return {"examples": len(self.examples), "truncated": self.truncated, "dropped": self.dropped,
                "dropped_prompt_too_long": self.dropped_prompt_too_long, "skipped": self.skipped,
                "skipped_at_load": self.skipped_at_load}


def tokenize_sft(rows: RowSet, tokenizer, cfg: DataConfig) -> TokenizedSet:
    """Tokenize SFT rows (prompt/response, messages, or raw text; see the module docstring).

    Raises ``DataError`` for a malformed row under ``on_bad_row: error`` (naming the field, the row's
    location and its keys), for an over-length example under ``overlength: error``, for a chat
    template that is not prefix-consistent, and when no example is left.
    """
    check_template(tokenizer, cfg)
    eos = eos_id(tokenizer)
    out = TokenizedSet([], rows.source, len(rows), skipped_at_load=rows.skipped_malformed)
    bad = BadRows(cfg)
    warned_system = False
    for loc, row in rows.items():
        try:
            if row.get(cfg.messages_field) is not None:
                if not cfg.apply_chat_template:
                    raise DataError(f"{loc}: has a '{cfg.messages_field}' conversation but data.apply_chat_template "
                                    "is false; conversations need the chat template")
                ids, labels = conversation_ids(tokenizer, with_system(require_messages(row, cfg.messages_field),
                                                                     cfg.system_prompt), eos, loc)
            else:
                prompt = require_text(row, cfg.prompt_field, also=cfg.messages_field)
                response = require_text(row, cfg.response_field)
                if cfg.apply_chat_template:
                    prompt_ids = chat_prompt_ids(tokenizer, prompt_messages(prompt, cfg.system_prompt))
                else:
                    if cfg.system_prompt and not warned_system:
                        log.warning("data.system_prompt is not used when data.apply_chat_template is false")
                        warned_system = True
                    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
                response_ids = encode(tokenizer, response) + [eos]
                ids = prompt_ids + response_ids
                labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        except RowProblem as exc:
            bad.add(loc, str(exc))
            continue
        if len(ids) > cfg.max_length:
            n_prompt = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
            if cfg.overlength == "error":
                raise DataError(f"{loc}: {len(ids)} tokens (prompt {n_prompt}, response {len(ids) - n_prompt}) "
                                f"is over data.max_length={cfg.max_length}; raise it or set data.overlength "
                                "to truncate or drop")
            if cfg.overlength == "drop":
                out.dropped += 1
                continue
            ids, labels = ids[:cfg.max_length], labels[:cfg.max_length]
            # labels[0] never carries loss (nothing predicts the first token), so look from 1.
            if all(t == IGNORE_INDEX for t in labels[1:]):
                out.dropped_prompt_too_long += 1
                continue
            out.truncated += 1
        out.examples.append({"input_ids": ids, "labels": labels, "location": loc})
    out.skipped, out.skip_reasons = bad.count, bad.reasons
    log.info("sft data %s: %d rows -> %d examples (truncated %d, dropped %d over max_length=%d, "
             "dropped %d prompt too long, skipped %d malformed, %d at load)", rows.source, len(rows),
             len(out.examples), out.truncated, out.dropped, cfg.max_length, out.dropped_prompt_too_long,
             out.skipped, out.skipped_at_load)
    if not out.examples:
        raise DataError(no_examples_message("SFT", out.source, len(rows), out.counts(), bad.reasons, cfg))
    return out


# ---- building blocks shared with prompts.py and preference.py ----------------------------------

class RowProblem(Exception):
    """A row this job cannot use (missing / mistyped field, ...); ``BadRows`` raises or counts it."""


class BadRows:
    """Applies ``data.on_bad_row`` to row problems: raise ``DataError`` now, or count and keep going."""

    def __init__(self, cfg: DataConfig) -> None:
        self.policy = cfg.on_bad_row
        self.count = 0
        self.reasons: list[str] = []

    def add(self, loc: str, reason: str) -> None:
        msg = f"{loc}: {reason}"
        if self.policy == "error":
            raise DataError(f"{msg} (set data.on_bad_row=skip to skip such rows)")
        self.count += 1
        if len(self.reasons) < MAX_REASONS_KEPT:
            self.reasons.append(msg)


def no_examples_message(kind: str, source: str, n_rows: int, counts: dict[str, int], reasons: list[str],
                        cfg: DataConfig) -> str:
    """The ``DataError`` text when every row was dropped or skipped: the counts and the first reason."""
    parts = ", ".join(f"{k} {v}" for k, v in counts.items() if v and k != "examples")
    msg = f"no {kind} examples left from {source}: {n_rows} rows, {parts or 'none usable'}"
    if reasons:
        msg += f" (first skipped: {reasons[0]})"
    if counts.get("dropped") or counts.get("dropped_prompt_too_long"):
        msg += (f"; data.max_length={cfg.max_length}, data.max_prompt_length={cfg.max_prompt_length}, "
                f"data.overlength={cfg.overlength}")
    return msg


def _keys(row: dict) -> str:
    return str(sorted(row))


def require_text(row: dict, name: str, also: Optional[str] = None) -> str:
    """``row[name]`` as a string, or ``RowProblem`` naming the field and the row's keys."""
    if name not in row or row[name] is None:
        alt = f" (or '{also}' for conversations)" if also else ""
        raise RowProblem(f"missing field '{name}'{alt}; the row has keys {_keys(row)}")
    value = row[name]
    if not isinstance(value, str):
        raise RowProblem(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def require_messages(row: dict, name: str) -> list[dict]:
    """``row[name]`` as a list of ``{"role": str, "content": str}`` (extra keys kept), or ``RowProblem``."""
    if name not in row or row[name] is None:
        raise RowProblem(f"missing field '{name}'; the row has keys {_keys(row)}")
    return check_messages(row[name], name)


def check_messages(value: Any, name: str) -> list[dict]:
    """Validate an OpenAI-style message list found in field ``name``."""
    if not isinstance(value, list) or not value:
        raise RowProblem(f"field '{name}' must be a non-empty list of {{role, content}} messages, "
                         f"got {type(value).__name__}{' (empty)' if isinstance(value, list) else ''}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowProblem(f"field '{name}' message {i} must be {{'role': str, 'content': str}}, got {m!r:.80}")
    return value


def with_system(messages: list[dict], system_prompt: Optional[str]) -> list[dict]:
    """Prepend ``data.system_prompt`` unless the conversation already opens with a system message."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def prompt_messages(prompt: str, system_prompt: Optional[str]) -> list[dict]:
    """A prompt string as the conversation it stands for: [system,] user."""
    return with_system([{"role": "user", "content": prompt}], system_prompt)


def check_template(tokenizer, cfg: DataConfig) -> None:
    if cfg.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; set data.apply_chat_template=false to train on "
                        "raw prompt + response text, or use a tokenizer that has one")


def eos_id(tokenizer) -> int:
    """The end-of-turn token appended to responses: the tokenizer's EOS."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; responses need an end-of-turn token to end on")
    return int(tokenizer.eos_token_id)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens (special-token text in it still maps to them)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages``; a template error is a ``RowProblem`` of this row."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raises anything (incl. the template's own raise_exception)
        raise RowProblem(f"the chat template cannot render this conversation ({type(exc).__name__}: {exc})") from exc


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of ``messages`` rendered with the generation prompt (what the model continues from)."""
    return encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def _not_prefix(loc: str, k: int) -> DataError:
    return DataError(
        f"{loc}: the chat template is not prefix-consistent: rendered up to message {k}, the conversation is "
        "not a prefix of its whole rendering (the template rewrites earlier turns), so prompt tokens cannot be "
        "masked. Use prompt/response rows or a template that renders each turn independently")


def _assistant_labels(ids: list[int], eos: int) -> list[int]:
    """Labels of one assistant span: its tokens up to and including the first EOS; template glue after it is -100."""
    if eos in ids:
        cut = ids.index(eos) + 1
        return ids[:cut] + [IGNORE_INDEX] * (len(ids) - cut)
    return list(ids)


def conversation_ids(tokenizer, messages: list[dict], eos: int, loc: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation with loss on every assistant turn (see the module docstring).

    The rendering is split at each assistant span's start and end and the pieces are tokenized one by
    one, so each span's ids are what generating that turn would produce.
    """
    if messages[0]["role"] == "assistant":
        raise RowProblem("the conversation opens with an assistant message; there is nothing it answers")
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise RowProblem("the conversation has no assistant message to train on")
    full = render(tokenizer, messages, add_generation_prompt=False)
    cuts: list[tuple[int, int]] = []
    for k in turns:
        start_text = render(tokenizer, messages[:k], add_generation_prompt=True)
        end_text = render(tokenizer, messages[:k + 1], add_generation_prompt=False)
        if not (full.startswith(start_text) and full.startswith(end_text) and len(start_text) <= len(end_text)):
            raise _not_prefix(loc, k)
        if cuts and len(start_text) < cuts[-1][1]:
            raise _not_prefix(loc, k)
        cuts.append((len(start_text), len(end_text)))
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in cuts:
        context = encode(tokenizer, full[pos:start])
        span = encode(tokenizer, full[start:end])
        ids += context + span
        labels += [IGNORE_INDEX] * len(context) + _assistant_labels(span, eos)
        pos = end
    tail = encode(tokenizer, full[pos:])
    return ids + tail, labels + [IGNORE_INDEX] * len(tail)


def completion_ids(tokenizer, prompt_msgs: list[dict], completion_msgs: list[dict], eos: int, loc: str) -> list[int]:
    """Ids of assistant message(s) ``completion_msgs`` answering ``prompt_msgs``, ending at the first EOS.

    The completion is the rendering of the whole conversation minus that of the prompt with the
    generation prompt (which must be its prefix); template glue after the first EOS is dropped.
    """
    start_text = render(tokenizer, prompt_msgs, add_generation_prompt=True)
    full = render(tokenizer, prompt_msgs + completion_msgs, add_generation_prompt=False)
    if not full.startswith(start_text):
        raise _not_prefix(loc, len(prompt_msgs))
    ids = encode(tokenizer, full[len(start_text):])
    return ids[:ids.index(eos) + 1] if eos in ids else ids
