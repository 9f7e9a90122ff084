"""References between stages: ``${sft.final}`` in a stage's config or overrides is a path an earlier stage writes.

Pure string work (no Ray, no files read): ``find_refs`` lists the references of a value, ``substitute`` replaces
them. Which stages exist and what each writes is the caller's (``rlhf_ray.pipeline.spec``); here a reference is
checked against the names of the stages before the one that holds it, so a reference to a later stage (a forward
reference) or to the stage itself (a cycle) is refused with the key that holds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

REF = re.compile(r"\$\{([^}]*)\}")
"""``${...}``: what is inside must be ``<stage>.<output>``."""
NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
REF_BODY = re.compile(rf"({NAME})\.({NAME})")
OUTPUTS = ("final", "best", "output_dir")
"""What a reference can name of a stage: its ``final/`` model, its ``best/`` model (``train.keep_best``), or its
``train.output_dir`` (e.g. for a file a job writes there: ``${bon.output_dir}/best_of_n.jsonl``)."""


class RefError(ValueError):
    """A reference that does not name an earlier stage's output; the message says which and why."""


@dataclass(frozen=True)
class Ref:
    """``${stage.output}`` as found in a value."""

    stage: str
    output: str

    def __str__(self) -> str:
        return f"${{{self.stage}.{self.output}}}"


def find_refs(value: Any) -> list[Ref]:
    """Every ``${stage.output}`` in ``value`` (a string, or lists / mappings of them, walked in order).
    ``RefError`` for a ``${...}`` that is not of that form or names an output other than ``OUTPUTS``."""
    found: list[Ref] = []
    if isinstance(value, str):
        for m in REF.finditer(value):
            body = REF_BODY.fullmatch(m.group(1).strip())
            if body is None:
                raise RefError(f"'{m.group(0)}' is not a reference of the form ${{<stage>.<output>}} with output "
                               f"one of {', '.join(OUTPUTS)}")
            if body.group(2) not in OUTPUTS:
                raise RefError(f"'{m.group(0)}': a stage's outputs are {', '.join(OUTPUTS)}, not {body.group(2)!r}")
            found.append(Ref(body.group(1), body.group(2)))
    elif isinstance(value, Mapping):
        for v in value.values():
            found += find_refs(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            found += find_refs(v)
    return found


def check_order(refs: list[Ref], stage: str, earlier: list[str], later: list[str]) -> None:
    """Each reference of stage ``stage`` must name one of the ``earlier`` stages (those that run before it).
    ``RefError`` names a reference to the stage itself (a cycle), to a ``later`` one (a forward reference: it has
    not run yet when this one starts) and to no stage at all."""
    for ref in refs:
        if ref.stage in earlier:
            continue
        if ref.stage == stage:
            raise RefError(f"'{ref}' refers to this stage itself (a cycle): a stage reads what earlier stages wrote")
        if ref.stage in later:
            raise RefError(f"'{ref}' is a forward reference: stage '{ref.stage}' runs after '{stage}'; stages run in "
                           "the order written, so move it before, or refer to an earlier stage")
        known = ", ".join(earlier) if earlier else "none, it is the first"
        raise RefError(f"'{ref}' names no stage; the stages before '{stage}' are: {known}")


def substitute(value: Any, outputs: Mapping[Ref, str]) -> Any:
    """``value`` with every reference replaced by ``outputs[ref]`` (strings inside lists and mappings too; a
    reference may sit inside a longer string). Every reference must be in ``outputs`` (``find_refs`` first)."""
    if isinstance(value, str):
        def repl(m: re.Match) -> str:
            body = REF_BODY.fullmatch(m.group(1).strip())
            assert body is not None, m.group(0)
            return outputs[Ref(body.group(1), body.group(2))]

        return REF.sub(repl, value)
    if isinstance(value, Mapping):
        return {k: substitute(v, outputs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [substitute(v, outputs) for v in value]
    return value
