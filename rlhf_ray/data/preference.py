"""Preference data: chosen / rejected pairs (reward model, DPO) and unpaired labelled completions (KTO).

Row shapes (field names from ``DataConfig``):

- ``prompt`` string + ``chosen`` / ``rejected`` strings. The prompt is rendered like an SFT prompt
  (user message after ``data.system_prompt``, chat template with generation prompt); each completion
  is its tokens followed by the EOS token, exactly as ``tokenize_sft`` builds a response.
- ``prompt`` string or message list + ``chosen`` / ``rejected`` message lists (the assistant turn(s)),
  TRL's conversational format: a completion is the template's rendering of prompt + completion minus
  that of the prompt with the generation prompt, up to the first EOS.
- no ``prompt`` field, ``chosen`` / ``rejected`` full conversations that differ only in their last,
  assistant, message: the shared messages are the prompt.

With ``data.apply_chat_template: false`` all three fields must be strings, joined as raw text.

Lengths: a prompt over ``max_prompt_length`` or an example (prompt + longer completion) over
``max_length`` raises under ``overlength: error`` and is dropped (``dropped``) under ``drop``. Under
``truncate`` the completions are cut from the right to fit ``max_length``; the row is dropped instead
(``dropped_prompt_too_long``) when the prompt is over ``max_prompt_length`` or leaves no room for a
completion token, and (``dropped_identical_after_truncation``) when the cut makes the pair identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional

from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.sft import (IGNORE_INDEX, BadRows, RowProblem, TokenizedSet, chat_prompt_ids, check_messages,
                               check_template, completion_ids, encode, eos_id, no_examples_message, prompt_messages,
                               with_system)
from rlhf_ray.data.sources import RowSet

log = logging.getLogger(__name__)


@dataclass
class PreferenceSet(TokenizedSet):
    """Tokenized preference examples (pairs or unpaired) and what happened to the other rows.

    Pair examples: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (completion tokens only), and
    ``chosen`` / ``rejected``, each an SFT-shaped ``{"input_ids": prompt + completion, "labels":
    -100 on the prompt}`` ready for ``pad_batch``: the labels are the completion masks (``!= -100``),
    ``pad_batch`` adds the attention masks. Unpaired examples: ``prompt_ids``, ``completion_ids``,
    ``input_ids``, ``labels`` (as above) and ``desirable`` (bool). Both carry ``location``.
    The row counters are ``TokenizedSet``'s, read with "completion" for "response".
    """

    kind: Literal["pairs", "unpaired"] = "pairs"
    dropped_identical_after_truncation: int = 0
    """overlength: truncate cut a pair's two completions to the same tokens."""

    def counts(self) -> dict[str, int]:
        """The counters, for logs and the job's result."""
        out = super().counts()
        if self.kind == "pairs":
            out["dropped_identical_after_truncation"] = self.dropped_identical_after_truncation
        else:
            out["desirable"] = sum(1 for ex in self.examples if ex["desirable"])
            out["undesirable"] = len(self.examples) - out["desirable"]
        return out


def _missing(row: dict, name: str) -> RowProblem:
    return RowProblem(f"missing field '{name}'; the row has keys {sorted(row)}")


def _encode_row(row: dict, tokenizer, cfg: DataConfig, names: list[str], eos: int,
                loc: str) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, one completion's ids per field in ``names``) for any of the module's row shapes."""
    values = [row.get(n) for n in names]
    for n, v in zip(names, values):
        if v is None:
            raise _missing(row, n)
        if not isinstance(v, (str, list)):
            raise RowProblem(f"field '{n}' must be a string or a message list, got {type(v).__name__}")
    prompt = row.get(cfg.prompt_field)
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise RowProblem(f"field '{cfg.prompt_field}' must be a string or a message list, got {type(prompt).__name__}")

    if not cfg.apply_chat_template:
        if isinstance(prompt, list) or any(isinstance(v, list) for v in values):
            raise DataError(f"{loc}: has message lists but data.apply_chat_template is false; "
                            "conversations need the chat template")
        if prompt is None:
            raise _missing(row, cfg.prompt_field)
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"]), [encode(tokenizer, v) + [eos] for v in values]

    if prompt is not None:
        msgs = (prompt_messages(prompt, cfg.system_prompt) if isinstance(prompt, str)
                else with_system(check_messages(prompt, cfg.prompt_field), cfg.system_prompt))
        completions: list[Any] = values
    elif all(isinstance(v, list) for v in values):
        convs = [check_messages(v, n) for n, v in zip(names, values)]
        shared = convs[0][:-1]
        if not shared or any(c[:-1] != shared or c[-1]["role"] != "assistant" for c in convs):
            raise RowProblem(f"without a '{cfg.prompt_field}' field, {', '.join(repr(n) for n in names)} must be "
                             "conversations that share their opening messages and end in one assistant message")
        msgs = with_system(shared, cfg.system_prompt)
        completions = [[c[-1]] for c in convs]
    else:
        raise _missing(row, cfg.prompt_field)

    prompt_ids = chat_prompt_ids(tokenizer, msgs)
    out = []
    for n, v in zip(names, completions):
        if isinstance(v, str):
            out.append(encode(tokenizer, v) + [eos])
        else:
            out.append(completion_ids(tokenizer, msgs, check_messages(v, n), eos, loc))
    return prompt_ids, out


def _fit(loc: str, prompt_ids: list[int], comps: list[list[int]], cfg: DataConfig,
         out: PreferenceSet) -> Optional[list[list[int]]]:
    """The completions fitted to the length limits, or None when the row is dropped (and counted)."""
    n_prompt = len(prompt_ids)
    longest = n_prompt + max(len(c) for c in comps)
    prompt_over = n_prompt > cfg.max_prompt_length
    if not prompt_over and longest <= cfg.max_length:
        return comps
    if cfg.overlength == "error":
        raise DataError(f"{loc}: prompt of {n_prompt} tokens (data.max_prompt_length={cfg.max_prompt_length}) + "
                        f"longest completion of {longest - n_prompt} = {longest} tokens "
                        f"(data.max_length={cfg.max_length}) does not fit; raise the limits or set "
                        "data.overlength to truncate or drop")
    if cfg.overlength == "drop":
        out.dropped += 1
        return None
    room = cfg.max_length - n_prompt
    if prompt_over or room < 1:
        out.dropped_prompt_too_long += 1
        return None
    out.truncated += 1
    return [c[:room] for c in comps]


def _side(prompt_ids: list[int], comp: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt_ids + comp, "labels": [IGNORE_INDEX] * len(prompt_ids) + comp}


def _finish(out: PreferenceSet, bad: BadRows, rows: RowSet, cfg: DataConfig) -> PreferenceSet:
    out.skipped, out.skip_reasons = bad.count, bad.reasons
    log.info("%s data %s: %d rows -> %s", out.kind, rows.source, len(rows), out.counts())
    if not out.examples:
        raise DataError(no_examples_message("preference" if out.kind == "pairs" else "unpaired preference",
                                            out.source, len(rows), out.counts(), bad.reasons, cfg))
    return out


def tokenize_pairs(rows: RowSet, tokenizer, cfg: DataConfig) -> PreferenceSet:
    """Chosen / rejected pairs for reward models and DPO (row shapes and length rules: module docstring).

    A pair whose chosen and rejected completions are identical is a bad row (``on_bad_row``): it
    carries no preference. Raises ``DataError`` for a missing ``chosen`` / ``rejected`` / ``prompt``
    under ``on_bad_row: error`` (naming the field, the location and the row's keys), for over-length
    rows under ``overlength: error``, and when nothing is left.
    """
    check_template(tokenizer, cfg)
    eos = eos_id(tokenizer)
    out = PreferenceSet([], rows.source, len(rows), skipped_at_load=rows.skipped_malformed, kind="pairs")
    bad = BadRows(cfg)
    for loc, row in rows.items():
        try:
            prompt_ids, comps = _encode_row(row, tokenizer, cfg, [cfg.chosen_field, cfg.rejected_field], eos, loc)
            if comps[0] == comps[1]:
                raise RowProblem(f"'{cfg.chosen_field}' and '{cfg.rejected_field}' are identical; "
                                 "the pair states no preference")
        except RowProblem as exc:
            bad.add(loc, str(exc))
            continue
        fitted = _fit(loc, prompt_ids, comps, cfg, out)
        if fitted is None:
            continue
        chosen, rejected = fitted
        if chosen == rejected:
            out.truncated -= 1
            out.dropped_identical_after_truncation += 1
            continue
        out.examples.append({"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected,
                             "chosen": _side(prompt_ids, chosen), "rejected": _side(prompt_ids, rejected),
                             "location": loc})
    return _finish(out, bad, rows, cfg)


def _desirable(row: dict, name: str) -> bool:
    if name not in row or row[name] is None:
        raise _missing(row, name)
    value = row[name]
    # bool is an int subclass: the check admits True/False and 0/1 but not 2 or "yes".
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise RowProblem(f"field '{name}' must be true/false (or 1/0), got {value!r:.40}")


def tokenize_unpaired(rows: RowSet, tokenizer, cfg: DataConfig, completion_field: str = "completion",
                      label_field: str = "label") -> PreferenceSet:
    """Unpaired completions labelled desirable or not, for KTO.

    ``completion_field`` is a string or assistant message(s) (shapes as for pairs, with one
    completion); ``label_field`` is a bool (or 1/0). Length rules as for pairs.
    """
    check_template(tokenizer, cfg)
    eos = eos_id(tokenizer)
    out = PreferenceSet([], rows.source, len(rows), skipped_at_load=rows.skipped_malformed, kind="unpaired")
    bad = BadRows(cfg)
    for loc, row in rows.items():
        try:
            desirable = _desirable(row, label_field)
            prompt_ids, comps = _encode_row(row, tokenizer, cfg, [completion_field], eos, loc)
        except RowProblem as exc:
            bad.add(loc, str(exc))
            continue
        fitted = _fit(loc, prompt_ids, comps, cfg, out)
        if fitted is None:
            continue
        out.examples.append({"prompt_ids": prompt_ids, "completion_ids": fitted[0], **_side(prompt_ids, fitted[0]),
                             "desirable": desirable, "location": loc})
    return _finish(out, bad, rows, cfg)
