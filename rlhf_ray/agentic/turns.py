"""Token ids of a multi-turn conversation, turn by turn, in the tokenizer's chat template.

A trajectory is one token sequence: the first prompt, then each model turn exactly as the engine sampled it (never
decoded and encoded again), then each observation. An observation's tokens are what the chat template adds to the
conversation for it::

    before = render(conversation)                                   # ends with the model's turn, closed
    after  = render(conversation + observation, add_generation_prompt=True)
    tokens = unclosed + encode(after[len(before):])

``unclosed`` are the tokens of the template's closing of an assistant turn (e.g. ChatML's ``<|im_end|>\\n``) that the
model did not sample itself: ``\\n`` after a turn that ended with ``<|im_end|>``, all of it after a turn cut at
``max_new_tokens``. The closing is read off the template once, with a placeholder message.

This needs a *prefix-stable* template: rendering the conversation with one more message must begin with the
rendering without it. ChatML templates (Qwen2.5, Qwen3 within a tool loop, the tiny test model's) are; a template
that rewrites earlier turns (e.g. one that drops reasoning of earlier assistant turns once a new user turn
arrives) is not, and is refused with a ``TemplateError`` naming the turn, since no token suffix would then make
the sequence the template's conversation.

The suffix is encoded on its own. It starts after the model's end-of-turn token in every template this was
written for, where tokenizers split anyway; wherever it did not, the learner and the engine would still see the
same ids (they are the trajectory's), only not the ids a fresh encoding of the whole text would give.
"""

from __future__ import annotations

from typing import Any, Optional

from rlhf_ray.data.errors import DataError

PLACEHOLDER = "RLHF-RAY-ASSISTANT-TURN"
"""Content of the probe message whose rendering shows how the template closes an assistant turn."""


class TemplateError(DataError):
    """The chat template cannot carry a multi-turn trajectory (no template, not prefix-stable, ...)."""


class ChatTurns:
    """Renders and encodes a conversation's turns with one tokenizer's chat template (``tools`` passed to it as
    ``tools=`` when given)."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("multi-turn rollouts append observations as chat turns, and the tokenizer has no chat "
                                "template; use a tokenizer that has one (or set tokenizer.chat_template)")
        self.tokenizer = tokenizer
        self.closing = self._closing()
        """What the template writes after an assistant message's content (ChatML: ``<|im_end|>\\n``)."""
        self.closing_ids = self.encode(self.closing)

    def render(self, messages: list[dict], generation_prompt: bool, tools: Optional[list[dict]] = None) -> str:
        kwargs = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt, **kwargs)
        except Exception as exc:  # noqa: BLE001 - jinja raises anything (incl. the template's own raise_exception)
            roles = [m.get("role") for m in messages]
            raise TemplateError(f"the chat template cannot render the conversation with roles {roles} "
                                f"({type(exc).__name__}: {exc})") from exc

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without added special tokens (special-token text in it maps to those tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: list[dict], tools: Optional[list[dict]] = None) -> list[int]:
        """The first prompt: ``messages`` rendered with the generation prompt."""
        return self.encode(self.render(messages, True, tools))

    def observation_ids(self, conversation: list[dict], turn_ids: list[int], observation: list[dict],
                        tools: Optional[list[dict]] = None) -> list[int]:
        """The ids that follow the model's last turn (``turn_ids``, the last message of ``conversation``) when
        ``observation`` (messages) comes next: the rest of the turn's closing, the observation's turns and the
        generation prompt of the next model turn."""
        before = self.render(conversation, False, tools)
        after = self.render(conversation + observation, True, tools)
        if not after.startswith(before) or not before.endswith(self.closing):
            at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
            raise TemplateError(
                f"the chat template is not prefix-stable: with the observation (roles "
                f"{[m['role'] for m in observation]}) after turn {sum(m['role'] == 'assistant' for m in conversation)}"
                f", it renders the conversation so far differently (first difference at character {at}: "
                f"{before[at:at + 40]!r} vs {after[at:at + 40]!r}), so no token suffix continues the sampled "
                "trajectory; use a template that renders each turn independently of the later ones")
        return self.unclosed(turn_ids) + self.encode(after[len(before):])

    def unclosed(self, turn_ids: list[int]) -> list[int]:
        """The ids of ``closing`` the model's turn does not already end with: its longest prefix (in tokens) that the
        turn ends with is left out (ChatML's ``<|im_end|>`` sampled as the end-of-turn token leaves ``\\n``; a turn
        cut at max_new_tokens gets all of it)."""
        turn = [int(t) for t in turn_ids]
        for j in range(len(self.closing_ids), 0, -1):
            if len(turn) >= j and turn[-j:] == self.closing_ids[:j]:
                return self.closing_ids[j:]
        return list(self.closing_ids)

    def _closing(self) -> str:
        probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": PLACEHOLDER}]
        text = self.render(probe, False)
        if PLACEHOLDER not in text:
            raise TemplateError("the chat template does not render an assistant message's content as given, so the "
                                "end of a model turn cannot be found in it; multi-turn rollouts need one that does")
        return text[text.rindex(PLACEHOLDER) + len(PLACEHOLDER):]
