"""Built-in verifiable rewards: final-answer match for math, and a ``<think>`` format check.

``math_reward`` reads the final answer from a response, in this order of preference:

1. the content of the last ``\\boxed{...}`` (braces balanced, so ``\\boxed{\\frac{1}{2}}`` works;
   a box left open by a cut-off response gives no answer);
2. the rest of the line after the last ``####`` (GSM8K style);
3. the rest of the sentence after the last "answer is" / "Answer:";
4. the last number in the text.

Both sides are then normalised (spaces, ``$``, a trailing ``.``, thousands commas, ``\\frac{a}{b}``)
and compared numerically when both are numbers (``1.0 == 1``, ``1/2 == 0.5``, exactly, via
``Fraction``), else as lower-cased strings. A gold answer that is itself a worked solution
(``... #### 72``) is reduced the same way. Deliberately small: no symbolic algebra, no units.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Optional

# A number as people write it: optional sign, thousands commas only in groups of three (so "1, 2"
# is two numbers), optional decimals, optional "/denominator".
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?|answer\s*:", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def extract_answer(text: str) -> Optional[str]:
    """The final answer in ``text`` (see the module docstring for the order), or None if there is none."""
    if _BOXED_RE.search(text):
        # An unclosed box means the response was cut off mid-answer: no answer, not the last number.
        boxed = _last_boxed(text)
        return boxed.strip() if boxed is not None else None
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    marks = list(_ANSWER_IS_RE.finditer(text))
    if marks:
        tail = text[marks[-1].end():].strip()
        if tail:
            line = tail.splitlines()[0]
            # End at a sentence break (". " or a final "."), not inside "3.5".
            return re.split(r"\.(?:\s|$)", line, maxsplit=1)[0].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def _last_boxed(text: str) -> Optional[str]:
    starts = list(_BOXED_RE.finditer(text))
    if not starts:
        return None
    i = starts[-1].end()
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: the response was cut off inside the box


def normalize_answer(answer: str) -> str:
    """Canonical string form: no spaces / ``$`` / trailing ``.``, no thousands commas, fractions as ``a/b``."""
    s = answer.strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = _FRAC_RE.sub(r"\1/\2", s)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.replace("$", "").replace(" ", "")
    s = s.rstrip(".")
    if re.fullmatch(_NUMBER, s):
        s = s.replace(",", "")
    return s.lower()


def _as_number(s: str) -> Optional[Fraction]:
    if not re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?", s):
        return None
    try:
        return Fraction(s)  # exact: "0.5" and "1/2" are the same Fraction, "1.0" equals 1
    except (ValueError, ZeroDivisionError):
        return None


def answer_key(answer: Optional[str]) -> Optional[str]:
    """A canonical key of an extracted answer, for counting votes: ``normalize_answer``'s form, and a number as
    its exact fraction (``0.5``, ``1/2`` and ``\\frac{1}{2}`` all give ``1/2``); None stays None (no answer)."""
    if answer is None:
        return None
    s = normalize_answer(answer)
    n = _as_number(s)
    return s if n is None else str(n)


def answers_match(predicted: Optional[str], gold: Any) -> bool:
    """Whether ``predicted`` (from :func:`extract_answer`) equals the ``gold`` answer after normalising."""
    if predicted is None:
        return False
    gold = str(gold)
    if "####" in gold or _BOXED_RE.search(gold):
        gold = extract_answer(gold) or gold
    p, g = normalize_answer(predicted), normalize_answer(gold)
    gn = _as_number(g)
    if gn is None:
        return p == g
    pn = _as_number(p)
    if pn is None:
        # "The answer is 42 apples" extracts "42 apples"; against a numeric gold, its first number counts.
        first = _NUMBER_RE.search(p)
        pn = _as_number(first.group().replace(",", "")) if first else None
    return pn == gn


def math_reward(prompts: list[str], responses: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 where the response's final answer equals the row's ``answer``, else 0.0. Shapes: all ``(B,)``."""
    out = []
    for i, (response, gold) in enumerate(zip(responses, answer)):
        if gold is None:
            raise ValueError(f"math reward: row {i} has no 'answer' (None); set data.answer_field")
        out.append(1.0 if answers_match(extract_answer(response), gold) else 0.0)
    return out


_THINK_RE = re.compile(r"\s*<think>(.+?)</think>\s*(\S.*)", re.DOTALL)


def format_think_reward(prompts: list[str], responses: list[str], **_: Any) -> list[float]:
    """1.0 where the response is ``<think>reasoning</think>`` followed by a non-empty answer, else 0.0.

    Chat templates of reasoning models often end the prompt with ``<think>``; then the response
    starts inside the block, so the prompt's opening tag is counted as the response's.
    """
    out = []
    for prompt, response in zip(prompts, responses):
        if prompt.rstrip().endswith("<think>") and "<think>" not in response:
            response = "<think>" + response
        m = _THINK_RE.fullmatch(response)
        ok = m is not None and m.group(1).strip() and "<think>" not in m.group(2) and "</think>" not in m.group(2)
        out.append(1.0 if ok else 0.0)
    return out
