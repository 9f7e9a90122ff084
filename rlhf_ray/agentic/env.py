"""Environments of multi-turn rollouts: the protocol, loading one from a file, checking what it returns, and
calling many at once with a timeout.

An environment is a class in a Python file (``rollout.env: path/env.py:Class``), built without arguments once per
sample::

    class Env:
        def reset(self, row: dict) -> Observation          # the first observation; row: every field of the data row
        def step(self, response: str) -> tuple[Observation, float, bool]   # (observation, reward, done)
        def close(self) -> None                            # optional: called once the episode is over

``reset`` and ``step`` may be ``async def``. An observation is text (one user turn), a message
``{"role": ..., "content": ...}``, or a list of messages (e.g. tool results); ``reset`` may return None for "the
row's prompt, as the data section renders it". ``step`` gets the text of the model's turn (decoded from the tokens
the engine sampled) and runs after every model turn, the last one too (its reward counts, its observation is not
shown). The episode ends when ``step`` says ``done`` or after ``rollout.max_turns`` turns; its reward is the sum of
the rewards ``step`` returned. An environment may count ``tool_calls`` and ``tool_errors`` in attributes of those
names; they are logged (``env/tool_calls_mean``, ``env/tool_errors``). One with a ``tools`` attribute (JSON schemas)
has them rendered into its prompt by the chat template (``tools=``). One with an ``assistant_message(text)`` method
has each model turn, once ``step`` has taken it, recorded in the conversation as the message it returns instead of
``{"role": "assistant", "content": text}`` (the tool environment adds the turn's ``tool_calls`` where the chat
template needs them); the sampled tokens stay as they are.

Every call gets ``rollout.env_timeout_s``. A call that raises, hangs or returns something else is a failure: the
run stops with an ``EnvError`` naming the environment, the sample and the turn, or (``rollout.on_env_error:
zero_reward``) that trajectory ends with reward 0 and is counted (``env/failed``). A hung synchronous call cannot
be killed (Python threads cannot be); it is abandoned in a daemon thread.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

DEFAULT_CLASS = "Env"
"""The class looked up when ``rollout.env`` names a file only."""
MAX_THREADS = 64
"""Synchronous environment calls running at once (a hung one is replaced by a fresh thread)."""

Message = dict[str, Any]


class EnvError(RuntimeError):
    """An environment failed: raised, timed out, or returned something that is not what the protocol says."""


@dataclass(frozen=True)
class EnvSpec:
    """An environment class loaded from its file."""

    name: str
    """How errors name it: ``environment 'Class' from /abs/path.py``."""
    cls: Callable[[], Any]

    def make(self) -> Any:
        return self.cls()


def load_env(spec: str) -> EnvSpec:
    """The environment class ``spec`` (``path.py:Class``, or ``path.py`` for the class ``Env``) names; ValueError
    naming the file when it is missing or fails to import, has no such class, the class lacks ``reset`` / ``step``,
    or it cannot be built without arguments."""
    import os

    from rlhf_ray.rewards.python_file import import_user_file, parse_spec

    path, name = parse_spec(spec, DEFAULT_CLASS)
    module = import_user_file(path, "environment file")
    abspath = os.path.abspath(path)
    if not hasattr(module, name):
        classes = sorted(n for n, v in vars(module).items()
                         if inspect.isclass(v) and getattr(v, "__module__", None) == module.__name__)
        raise ValueError(f"environment file {abspath} has no class {name!r}; classes defined there: "
                         f"{', '.join(classes) or 'none'}. Name one as '{path}:<Class>'")
    cls = getattr(module, name)
    if not callable(cls):
        raise ValueError(f"{name!r} in environment file {abspath} is a {type(cls).__name__}, not a class")
    for method, arg in (("reset", "row"), ("step", "response")):
        fn = getattr(cls, method, None)
        if not callable(fn):
            raise ValueError(f"environment {name!r} in {abspath} has no {method}({arg}) method; an environment "
                             "needs reset(row) -> observation and step(response) -> (observation, reward, done)")
    try:
        inspect.signature(cls).bind()
    except TypeError:
        raise ValueError(f"environment {name!r} in {abspath} must be constructible without arguments (one is "
                         f"built per sample); its signature is {inspect.signature(cls)}") from None
    except ValueError:
        pass  # no inspectable signature
    return EnvSpec(f"environment {name!r} from {abspath}", cls)


# ---- what an environment returns --------------------------------------------------------------------------

def as_messages(value: Any, default_role: str = "user") -> list[Message]:
    """An observation as chat messages: text -> one ``default_role`` message; a message or a list of messages as
    given (each a dict with string ``role`` and ``content``; other keys, e.g. a tool's ``name``, kept). ValueError
    saying what is wrong otherwise."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"an observation is text, a message dict or a non-empty list of them; got {_show(value)}")
    for i, m in enumerate(items):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"observation message {i} is not a dict with string 'role' and 'content': {_show(m)}")
    return [dict(m) for m in items]


def checked_step(value: Any) -> tuple[Optional[list[Message]], float, bool]:
    """``step``'s return value as (observation messages or None, reward, done); ValueError saying what is wrong.

    The observation may be None only when ``done``; the reward is a finite real number; done a bool."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"step must return (observation, reward, done); got {_show(value)}")
    observation, reward, done = value
    if hasattr(reward, "item") and not isinstance(reward, numbers.Real):
        reward = reward.item()  # a 0-d numpy / torch number
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
        raise ValueError(f"step returned reward {_show(reward)}; expected a finite number")
    if hasattr(done, "item") and not isinstance(done, (bool, int)):
        done = done.item()  # numpy.bool_
    if not (isinstance(done, bool) or isinstance(done, int) and done in (0, 1)):
        raise ValueError(f"step returned done {_show(done)}; expected True or False")
    if observation is None:
        if not done:
            raise ValueError("step returned observation None with done False; the next turn needs an observation "
                             "(return done True to end the episode)")
        return None, float(reward), True
    return as_messages(observation), float(reward), bool(done)


def checked_assistant(value: Any) -> Message:
    """What ``assistant_message`` returned, checked: a message of role ``assistant`` with string ``content`` (other
    keys, e.g. ``tool_calls``, kept); ValueError saying what is wrong."""
    if not isinstance(value, dict) or value.get("role") != "assistant" or not isinstance(value.get("content"), str):
        raise ValueError(f"expected a dict with role 'assistant' and string 'content'; got {_show(value)}")
    return dict(value)


def _show(value: Any, limit: int = 80) -> str:
    text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= limit else text[:limit] + "..."


# ---- calling many environments at once -------------------------------------------------------------------

@dataclass
class Outcome:
    """What one call came to: its value, or what it raised, or that it ran past its timeout."""

    value: Any = None
    error: Optional[BaseException] = None
    timed_out: bool = False

    def describe(self, what: str, timeout_s: float) -> str:
        """``what`` failing, as an error message fragment (for a failed outcome)."""
        if self.timed_out:
            return f"{what} did not return within {timeout_s:g} s (rollout.env_timeout_s)"
        exc = self.error
        assert exc is not None
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
        return f"{what} raised {type(exc).__name__}: {exc}{where}"

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


@dataclass
class _Job:
    fn: Callable[[], Any]
    started: Optional[float] = None
    value: Any = None
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)


class Caller:
    """Runs batches of environment calls concurrently, each within ``timeout_s``: plain functions on up to
    ``MAX_THREADS`` daemon threads, coroutine functions on one event loop kept in a daemon thread (so an async
    environment's resources stay on one loop across turns)."""

    def __init__(self, timeout_s: float, threads: int = MAX_THREADS):
        self.timeout_s, self.threads = timeout_s, threads
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def run(self, calls: list[Callable[[], Any]], is_async: bool) -> list[Outcome]:
        """Each ``call()`` (a coroutine function when ``is_async``), started together; outcomes in call order."""
        if not calls:
            return []
        return self._run_async(calls) if is_async else self._run_threads(calls)

    def _run_threads(self, calls: list[Callable[[], Any]]) -> list[Outcome]:
        jobs = [_Job(fn) for fn in calls]
        pending: queue.SimpleQueue = queue.SimpleQueue()
        for job in jobs:
            pending.put(job)

        def work() -> None:
            while True:
                try:
                    job = pending.get_nowait()
                except queue.Empty:
                    return
                job.started = time.monotonic()
                try:
                    job.value = job.fn()
                except BaseException as exc:  # SystemExit from user code too: it must not pass silently
                    job.error = exc
                job.done.set()

        def start_worker() -> None:
            threading.Thread(target=work, name="env-call", daemon=True).start()

        for _ in range(min(self.threads, len(jobs))):
            start_worker()
        outcomes = []
        for job in jobs:
            while not job.done.wait(0.05):
                if job.started is not None and time.monotonic() - job.started > self.timeout_s:
                    start_worker()  # this one is stuck in the call: another takes the rest of the queue
                    break
            if job.done.is_set():
                outcomes.append(Outcome(job.value, job.error))
            else:
                outcomes.append(Outcome(timed_out=True))
        return outcomes

    def _run_async(self, calls: list[Callable[[], Any]]) -> list[Outcome]:
        loop = self._event_loop()

        async def one(fn: Callable[[], Any]) -> Any:
            return await asyncio.wait_for(fn(), self.timeout_s)

        futures = [asyncio.run_coroutine_threadsafe(one(fn), loop) for fn in calls]
        deadline = time.monotonic() + self.timeout_s + 1.0  # wait_for's own timeout fires first on a free loop
        outcomes = []
        for f in futures:
            try:
                outcomes.append(Outcome(f.result(max(deadline - time.monotonic(), 0.0))))
            except (asyncio.TimeoutError, TimeoutError):
                # also a loop blocked by synchronous code inside a coroutine: give up on it
                f.cancel()
                outcomes.append(Outcome(timed_out=True))
            except BaseException as exc:
                outcomes.append(Outcome(error=exc))
        return outcomes

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or not self._loop.is_running():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="env-loop", daemon=True).start()
            while not loop.is_running():
                time.sleep(0.001)
            self._loop = loop
        return self._loop


def is_async(env: Any, method: str) -> bool:
    """Whether ``env.method`` is a coroutine function (``async def``)."""
    return inspect.iscoroutinefunction(getattr(env, method))
