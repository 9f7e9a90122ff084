"""What every reward source is, and the one guarded way to call it.

A *reward function* scores a batch::

    reward_fn(prompts: list[str], responses: list[str], **row_fields) -> list[float]

where each row field (``answer=[...]``, ...) is a list aligned with ``prompts``. A
:class:`RewardSource` wraps one such scorer (a Python function, a built-in, an HTTP endpoint) behind
``score(prompts, responses, row_fields)``. Callers go through :func:`checked_scores`, which adds a
timeout and turns every way a user function can go wrong into a :class:`RewardError` that names the
function and, where one exists, the sample: a run that stops on a bad reward should say which file
and which row to look at.

Standard library only, so rollout workers and tests import it without torch or ray.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import threading
import time
import traceback
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Sequence

RowFields = dict[str, list]


class RewardError(RuntimeError):
    """A reward source failed, timed out, or returned something that is not one finite float per sample.

    ``public``: the same failure without the samples' text, file paths or the raised message (what the reward
    server may send to a client); None where there is no such summary.
    """

    def __init__(self, message: str, public: Optional[str] = None):
        super().__init__(message)
        self.public = public


class RewardSource(ABC):
    """One scorer of (prompt, response) batches: a function, a built-in, an HTTP endpoint, a sum of these."""

    name: str
    """Short name, used in metric keys and logs."""

    @abstractmethod
    def score(self, prompts: list[str], responses: list[str], row_fields: RowFields) -> list[float]:
        """Rewards ``(B,)`` for a batch of ``B`` samples; ``row_fields`` values are lists of length ``B``."""

    def describe(self) -> str:
        """How error messages name this source (e.g. ``reward function 'f' from /path/file.py``)."""
        return f"reward {self.name!r}"

    def public_describe(self) -> str:
        """``describe()`` without local file paths (what the reward server may show a remote client)."""
        return self.describe()

    def check(self) -> None:
        """Raise ``RewardError`` when the source cannot work at all (an endpoint that is down), before a run
        reserves anything; the default has nothing to check."""


class FunctionReward(RewardSource):
    """A Python reward function called as ``fn(prompts, responses, **row_fields)``.

    Row fields the function does not declare are left out when it takes no ``**kwargs``, so
    ``def reward_fn(prompts, responses, answer)`` works on rows that also carry other fields.
    """

    def __init__(self, fn: Callable[..., Any], name: str, description: Optional[str] = None):
        self.fn = fn
        self.name = name
        self._description = description or f"reward function {name!r}"
        self._accepts = _accepted_keywords(fn)

    def score(self, prompts: list[str], responses: list[str], row_fields: RowFields) -> list[float]:
        if self._accepts is not None:
            row_fields = {k: v for k, v in row_fields.items() if k in self._accepts}
        return self.fn(prompts, responses, **row_fields)

    def describe(self) -> str:
        return self._description


def _accepted_keywords(fn: Callable[..., Any]) -> Optional[set[str]]:
    """Keyword names ``fn`` accepts, or None when it takes ``**kwargs`` (or cannot be inspected)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins / C callables have no signature
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


class CombinedReward(RewardSource):
    """The weighted sum ``sum_k weights[k] * sources[k]`` of several reward sources.

    Each component is checked on its own (its own timeout and its own name in errors) when called
    through :func:`checked_scores`; :meth:`score_components` gives the per-source scores for metrics.
    """

    def __init__(self, sources: Sequence[RewardSource], weights: Optional[Sequence[float]] = None):
        if not sources:
            raise ValueError("CombinedReward needs at least one reward source")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"CombinedReward needs one weight per source ({len(sources)}), got {len(weights)}")
        bad = [w for w in weights if not math.isfinite(w)]
        if bad:
            raise ValueError(f"CombinedReward weights must be finite numbers, got {bad}")
        self.sources = list(sources)
        self.weights = weights
        self.name = " + ".join(f"{w:g}*{s.name}" for w, s in zip(weights, self.sources))

    def describe(self) -> str:
        return f"combined reward ({self.name})"

    def score_components(self, prompts: list[str], responses: list[str], row_fields: RowFields,
                         timeout_s: Optional[float] = None) -> list[list[float]]:
        """Unweighted scores of each source, ``(K, B)``; with ``timeout_s`` each goes through checked_scores."""
        if timeout_s is not None:
            return [checked_scores(s, prompts, responses, row_fields, timeout_s) for s in self.sources]
        out = []
        for s in self.sources:
            try:
                raw = s.score(prompts, responses, row_fields)
            except RewardError:
                raise
            except Exception as exc:
                raise RewardError(_raised_message(s, exc, len(prompts), None, prompts, responses)) from exc
            out.append(_validate(s, raw, prompts, responses))
        return out

    def weighted_sum(self, components: list[list[float]]) -> list[float]:
        """``(B,)`` rewards: ``sum_k weights[k] * components[k][i]``."""
        return [sum(w * c[i] for w, c in zip(self.weights, components)) for i in range(len(components[0]))]

    def score(self, prompts: list[str], responses: list[str], row_fields: RowFields) -> list[float]:
        return self.weighted_sum(self.score_components(prompts, responses, row_fields))


def checked_scores(source: RewardSource, prompts: list[str], responses: list[str], row_fields: RowFields,
                   timeout_s: float) -> list[float]:
    """Call ``source.score`` in a worker thread and return ``(B,)`` finite floats, or raise RewardError.

    Every failure becomes a :class:`RewardError` whose message starts with ``source.describe()``:
    the function raised (original type and message, chained; the first sample that reproduces it
    alone is named), it did not return within ``timeout_s``, it returned a non-list or the wrong
    length, or a value at some index is not a number / is NaN / inf. A timed-out call cannot be
    killed (Python threads cannot be); it is abandoned in a daemon thread, which is fine because a
    reward error stops the run. A :class:`CombinedReward` is checked component by component, each
    with its own ``timeout_s``.
    """
    n = len(prompts)
    if len(responses) != n:
        raise ValueError(f"checked_scores: {n} prompts but {len(responses)} responses")
    for key, values in row_fields.items():
        if len(values) != n:
            raise ValueError(f"checked_scores: row field {key!r} has {len(values)} values for {n} prompts")
    if n == 0:
        return []  # nothing to score; not worth a thread, and no sample to name
    if isinstance(source, CombinedReward):
        return source.weighted_sum(source.score_components(prompts, responses, row_fields, timeout_s))

    deadline = time.monotonic() + timeout_s
    try:
        raw = _call_with_timeout(lambda: source.score(prompts, responses, row_fields), timeout_s)
    except _TimedOut:
        raise RewardError(f"{source.describe()} timed out after {timeout_s:g} s on a batch of {n} samples "
                          f"(first: {_sample(prompts, responses, 0)})",
                          f"{source.public_describe()} timed out after {timeout_s:g} s on a batch of {n} samples") from None
    except _Raised as raised:
        exc = raised.exc
        if isinstance(exc, RewardError):
            raise exc  # already names its source (an HTTP endpoint, a nested check)
        index = _first_failing_sample(source, prompts, responses, row_fields, deadline)
        on = f"on a batch of {n} samples" if index is None else f"on sample {index}"
        message = _redact(str(exc), prompts, responses)
        public = f"{source.public_describe()} raised {type(exc).__name__}: {message} {on}"
        raise RewardError(_raised_message(source, exc, n, index, prompts, responses), public) from exc
    return _validate(source, raw, prompts, responses)


class _TimedOut(Exception):
    pass


class _Raised(Exception):
    """Carries what the reward call raised, so an interrupt of the waiting thread is not mistaken for it."""

    def __init__(self, exc: BaseException):
        super().__init__(exc)
        self.exc = exc


_MISSING = object()


def _call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    # A daemon thread rather than a ThreadPoolExecutor: executor threads are joined at interpreter
    # exit, so one hung reward function would keep the process from ever exiting.
    box: dict[str, Any] = {"value": _MISSING, "error": None}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # SystemExit from user code too: it must not pass silently
            box["error"] = exc

    t = threading.Thread(target=run, name="reward-call", daemon=True)
    t.start()
    t.join(max(timeout_s, 0.0))
    if t.is_alive():
        raise _TimedOut
    if box["error"] is not None:
        raise _Raised(box["error"])
    return box["value"]


def _first_failing_sample(source: RewardSource, prompts: list[str], responses: list[str],
                          row_fields: RowFields, deadline: float) -> Optional[int]:
    """Index of the first sample whose batch-of-one call also raises, within what is left of the timeout.

    A batch function's exception rarely says which row caused it; replaying samples one at a time
    (only on the failure path, which stops the run anyway) usually finds it. None when the batch
    has one sample's worth of information already, time runs out, or no single sample fails alone.
    """
    n = len(prompts)
    if n == 1:
        return 0
    for i in range(n):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        one = {k: v[i:i + 1] for k, v in row_fields.items()}
        try:
            _call_with_timeout(lambda: source.score(prompts[i:i + 1], responses[i:i + 1], one), left)
        except _TimedOut:
            return None
        except _Raised:
            return i
    return None


def _raised_message(source: RewardSource, exc: BaseException, n: int, index: Optional[int],
                    prompts: list[str], responses: list[str]) -> str:
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        where = f" (at {frames[-1].filename}:{frames[-1].lineno})"
    if index is None:
        on = f"on a batch of {n} samples (no single sample reproduces it alone)"
    else:
        on = f"on sample {index} ({_sample(prompts, responses, index)})"
    return f"{source.describe()} raised {type(exc).__name__}: {exc}{where} {on}"


_ABS_PATH = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+[\w.-]+")


def _redact(text: str, prompts: list[str], responses: list[str]) -> str:
    """``text`` with the batch's prompts and responses and any absolute file path replaced by placeholders."""
    for sample in sorted(set(prompts) | set(responses), key=len, reverse=True):
        if len(sample) >= 4:
            text = text.replace(sample, "<sample>")
    return _ABS_PATH.sub("<path>", text)


def _validate(source: RewardSource, raw: Any, prompts: list[str], responses: list[str]) -> list[float]:
    """``raw`` as a list of ``len(prompts)`` finite floats, or a RewardError naming the first bad index."""
    n = len(prompts)
    if not isinstance(raw, (list, tuple)) and hasattr(raw, "tolist") and not isinstance(raw, (str, bytes)):
        raw = raw.tolist()  # numpy arrays and torch tensors are fine answers; a 0-d one becomes a scalar
    if not isinstance(raw, (list, tuple)):
        raise RewardError(f"{source.describe()} returned {type(raw).__name__} {_excerpt(repr(raw))}; "
                          f"expected a list of {n} floats",
                          f"{source.public_describe()} returned {type(raw).__name__}; expected a list of {n} floats")
    if len(raw) != n:
        raise RewardError(f"{source.describe()} returned {len(raw)} scores for a batch of {n} samples "
                          f"(expected {n}, got {len(raw)})",
                          f"{source.public_describe()} returned {len(raw)} scores for a batch of {n} samples")
    out = []
    for i, v in enumerate(raw):
        if hasattr(v, "item") and not isinstance(v, numbers.Real):
            v = v.item()  # a list of 0-d tensors / numpy scalars
        if not isinstance(v, numbers.Real):
            raise RewardError(f"{source.describe()} returned a non-number at index {i}: "
                              f"{type(v).__name__} {_excerpt(repr(v))} ({_sample(prompts, responses, i)})",
                              f"{source.public_describe()} returned a non-number ({type(v).__name__}) at index {i}")
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(f"{source.describe()} returned {f} at index {i} ({_sample(prompts, responses, i)})",
                              f"{source.public_describe()} returned {f} at index {i}")
        out.append(f)
    return out


def _excerpt(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _sample(prompts: list[str], responses: list[str], i: int) -> str:
    """``prompt: '...', response: '...'`` for sample ``i``, each cut short."""
    return f"prompt: {_excerpt(repr(prompts[i]))}, response: {_excerpt(repr(responses[i]))}"
