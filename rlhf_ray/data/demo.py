"""Built-in generated data sets, named ``demo:<name>`` in ``data.path``.

Each is small-integer arithmetic, so that a tiny random-init character-level model (see
``rlhf_ray.models.tiny``) can learn it on a CPU in minutes, and so that correctness is checkable.
Every set is a pure function of ``(size, seed)``: the same config always yields the same rows.

- ``demo:arithmetic`` (SFT): ``prompt`` "What is 12 + 7?", ``response`` "12 + 7 = 19. The answer is 19.",
  ``answer`` "19". Addition and subtraction of operands 0..20 (subtraction never goes negative).
- ``demo:arithmetic_rl`` (RL with a verifiable reward): ``prompt`` "What is 3 + 5? Reply with the
  number only.", ``answer`` "8" (and ``response`` "8", so a short SFT on the same set gives RL a warm
  start, as in the usual SFT -> RL pipeline). Single-digit addition: the answer is one or two characters.
- ``demo:tool_lookup`` (multi-turn RL with a tool): ``prompt`` "Call k, then answer.", ``secret`` and
  ``answer`` "0" or "1". The tool ``k`` (``examples/tools/lookup.py``) returns the row's secret; the model must call
  it, then answer with its result.
- ``demo:preferences`` (reward model / DPO): ``prompt`` and sentences as in ``demo:arithmetic`` but only
  additions of operands 0..2 (``PREFERENCE_MAX_OPERAND``), ``chosen`` the correct response,
  ``rejected`` the same sentence with a wrong result (off by 1 to 3, never negative). The two differ
  only in the result digits, so the preference is unambiguous. The operands are small because a
  reward model has to learn the arithmetic from the pairs alone, through one scalar per sequence: a
  random-init tiny model reaches > 90% held-out accuracy on these 9 problems in about a hundred
  CPU steps, where operands 0..20 stay near chance for hundreds of steps.
- ``demo:kto`` (KTO, unpaired): the same problems, ``completion`` (correct or wrong as above) and
  ``label`` (True when correct), about 55% desirable: with KTO's default equal weights that puts
  desirable_weight x n_desirable / (undesirable_weight x n_undesirable) near 1.2, inside the KTO
  paper's advised [1, 4/3] (below 1 the shared sentence tokens drift down and the loss saturates).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

MAX_OPERAND = 20
PREFERENCE_MAX_OPERAND = 2
"""Operands of the preference sets (``demo:preferences``, ``demo:kto``): learnable from pairs on a CPU."""
KTO_DESIRABLE_FRACTION = 0.55
RL_INSTRUCTION = "Reply with the number only."


@dataclass(frozen=True)
class DemoSet:
    """A named generator ``(size, seed) -> rows`` with a one-line description."""

    description: str
    generate: Callable[[int, int], list[dict]]


def _problem(rng: random.Random, max_operand: int = MAX_OPERAND, ops: str = "+-") -> tuple[int, str, int, int]:
    """(a, op, b, result) with a non-negative result."""
    op = rng.choice(ops)
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b, (a + b if op == "+" else a - b)


def _sentence(a: int, op: str, b: int, result: int) -> str:
    return f"{a} {op} {b} = {result}. The answer is {result}."


def _wrong(rng: random.Random, result: int) -> int:
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    # A negative delta at a small result would go below 0; flip it so the wrong answer stays plausible.
    return result + delta if result + delta >= 0 else result - delta


def _rng(name: str, seed: int) -> random.Random:
    # String seeds hash through sha512, so the rows are stable across Python runs and processes.
    return random.Random(f"{name}:{seed}")


def arithmetic(size: int, seed: int) -> list[dict]:
    """SFT rows: prompt / response / answer."""
    rng = _rng("arithmetic", seed)
    rows = []
    for _ in range(size):
        a, op, b, r = _problem(rng)
        rows.append({"prompt": f"What is {a} {op} {b}?", "response": _sentence(a, op, b, r), "answer": str(r)})
    return rows


def arithmetic_rl(size: int, seed: int) -> list[dict]:
    """RL rows: prompt / answer (single-digit addition), and ``response`` = the answer for an SFT warm start."""
    rng = _rng("arithmetic_rl", seed)
    rows = []
    for _ in range(size):
        a, op, b, r = _problem(rng, max_operand=9, ops="+")
        rows.append({"prompt": f"What is {a} {op} {b}? {RL_INSTRUCTION}", "answer": str(r), "response": str(r)})
    return rows


def repeat_number(size: int, seed: int) -> list[dict]:
    """RL rows: prompt "Repeat the number 7.", answer "7" (learnable by a tiny model through RL alone)."""
    rng = _rng("repeat_number", seed)
    rows = []
    for _ in range(size):
        n = rng.randint(0, 9)
        rows.append({"prompt": f"Repeat the number {n}.", "answer": str(n), "response": str(n)})
    return rows


TOOL_LOOKUP_PROMPT = "Call k, then answer."


def tool_lookup(size: int, seed: int) -> list[dict]:
    """Multi-turn RL rows (``rollout.tools``): a constant prompt, ``secret`` a bit ("0" or "1") only the tool ``k`` of
    ``examples/tools/lookup.py`` reads (from the row), and ``answer`` the same: the model must call the tool, then
    answer with what it returned. One bit, so that a policy that looks up and then guesses is capped at 3/4 of the
    full reward (examples/rewards/tool_use.py), and only copying the result clears that."""
    rng = _rng("tool_lookup", seed)
    rows = []
    for _ in range(size):
        secret = str(rng.randint(0, 1))
        rows.append({"prompt": TOOL_LOOKUP_PROMPT, "secret": secret, "answer": secret})
    return rows


def preferences(size: int, seed: int) -> list[dict]:
    """Preference rows: prompt / chosen (correct) / rejected (wrong result) / answer."""
    rng = _rng("preferences", seed)
    rows = []
    for _ in range(size):
        a, op, b, r = _problem(rng, max_operand=PREFERENCE_MAX_OPERAND, ops="+")
        rows.append({"prompt": f"What is {a} {op} {b}?", "chosen": _sentence(a, op, b, r),
                     "rejected": _sentence(a, op, b, _wrong(rng, r)), "answer": str(r)})
    return rows


def kto(size: int, seed: int) -> list[dict]:
    """Unpaired rows: prompt / completion / label (True = desirable, i.e. correct) / answer."""
    rng = _rng("kto", seed)
    rows = []
    for _ in range(size):
        a, op, b, r = _problem(rng, max_operand=PREFERENCE_MAX_OPERAND, ops="+")
        good = rng.random() < KTO_DESIRABLE_FRACTION
        shown = r if good else _wrong(rng, r)
        rows.append({"prompt": f"What is {a} {op} {b}?", "completion": _sentence(a, op, b, shown),
                     "label": good, "answer": str(r)})
    return rows


DEMO_SETS: dict[str, DemoSet] = {
    "arithmetic": DemoSet("SFT: prompt/response, + and - of operands 0..20", arithmetic),
    "arithmetic_rl": DemoSet("RL: prompt/answer, single-digit addition, answer-only format", arithmetic_rl),
    "repeat_number": DemoSet("RL: prompt/answer, repeat a digit (learnable from scratch by RL)", repeat_number),
    "tool_lookup": DemoSet("multi-turn RL: call the tool k (reads the row's secret bit), then answer with it",
                           tool_lookup),
    "preferences": DemoSet("RM/DPO: prompt/chosen/rejected, + of operands 0..2, rejected has a wrong result",
                           preferences),
    "kto": DemoSet("KTO: prompt/completion/label, + of operands 0..2, about 55% correct", kto),
}


def make_demo_rows(name: str, size: int, seed: int = 0) -> list[dict]:
    """The rows of ``demo:<name>``; an unknown name raises ``DataError`` listing the known ones."""
    from rlhf_ray.data.errors import DataError

    if name not in DEMO_SETS:
        raise DataError(f"data.path: unknown demo set 'demo:{name}'; choose one of "
                        f"{', '.join('demo:' + n for n in sorted(DEMO_SETS))}")
    return DEMO_SETS[name].generate(size, seed)
