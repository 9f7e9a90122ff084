"""``builtin:python_sandbox``: 1.0 when the response's code passes the row's tests in the sandbox, else 0.0.

For each sample the program is::

    <code>                 the last ```python (or ```py) fenced block of the response, else the whole response
    <the row's tests>      field ``tests``: Python source (e.g. ``assert f(2) == 4``), or a list of such lines
    print("<nonce>")       a random marker, new for every sample

run by :func:`rlhf_ray.agentic.sandbox.run_python` with empty stdin. It scores 1.0 when the program exits 0
within the limits and its last line of stdout is the marker, else 0.0. The marker is there because an
``exit(0)`` / ``os._exit(0)`` before the tests would otherwise pass them: a policy learns that quickly. It
does not stop code written to defeat this harness on purpose (reading its own ``main.py`` for the marker,
objects whose ``__eq__`` is always true); read the high-reward samples.

Samples run concurrently, at most ``max_workers`` at once (default: the CPUs this process may use, since each
program may spend a whole core). A batch of B looping programs takes about
B / max_workers x ``cpu_seconds``: keep ``reward.timeout_s`` above that. Other limits: a reward file, e.g.
``rewards/code.py`` named as ``reward.functions: [rewards/code.py]``::

    from rlhf_ray.agentic.sandbox import SandboxLimits
    from rlhf_ray.rewards.code_exec import PythonSandboxReward

    reward_fn = PythonSandboxReward(SandboxLimits(cpu_seconds=2, wall_seconds=4), max_workers=8)
"""

from __future__ import annotations

import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from rlhf_ray.agentic.sandbox import DEFAULT_LIMITS, SandboxLimits, run_python

TESTS_FIELD = "tests"
"""The row field holding each sample's tests."""

_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The content of the last ```python / ```py fenced block of ``response``, else the whole response.

    A block left open (a response cut off at the token limit) does not count as a block.
    """
    blocks = _FENCE_RE.findall(response)
    return blocks[-1] if blocks else response


def _tests_source(tests: Any, index: int) -> str:
    """A row's ``tests`` value as source: a string, or a list of strings joined by newlines."""
    if tests is None:
        raise ValueError(f"builtin:python_sandbox: sample {index} has no '{TESTS_FIELD}' (None); every row needs "
                         f"the test code its response is run against, in the row field '{TESTS_FIELD}'")
    if isinstance(tests, str):
        return tests
    if isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
        return "\n".join(tests)
    raise ValueError(f"builtin:python_sandbox: sample {index} has '{TESTS_FIELD}' of type {type(tests).__name__}; "
                     f"expected Python source (a string) or a list of strings")


class PythonSandboxReward:
    """The reward of the module docstring, with its sandbox limits and concurrency; called like a reward fn.

    ``reward(prompts, responses, tests=[...])`` -> ``(B,)`` floats in {0.0, 1.0}. Every row's ``tests`` is
    checked before any program runs: a missing field or a None names the sample index.
    """

    def __init__(self, limits: SandboxLimits = DEFAULT_LIMITS, max_workers: Optional[int] = None):
        if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int)
                                        or max_workers < 1):
            raise ValueError(f"PythonSandboxReward: max_workers must be a whole number >= 1 or None, "
                             f"got {max_workers!r}")
        self.limits = limits
        self.max_workers = max_workers

    def __call__(self, prompts: list[str], responses: list[str], tests: Optional[list[Any]] = None,
                 **_: Any) -> list[float]:
        if tests is None:
            raise ValueError(f"builtin:python_sandbox: the rows have no '{TESTS_FIELD}' field (first: sample 0); "
                             f"every row needs the test code its response is run against (e.g. "
                             f"\"assert add(2, 3) == 5\") in the row field '{TESTS_FIELD}'")
        if len(tests) != len(responses):
            raise ValueError(f"builtin:python_sandbox: {len(tests)} '{TESTS_FIELD}' values for "
                             f"{len(responses)} responses")
        programs = [self._program(extract_code(r), _tests_source(t, i)) for i, (r, t) in
                    enumerate(zip(responses, tests))]
        if not programs:
            return []
        workers = min(self.max_workers or len(os.sched_getaffinity(0)), len(programs))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="python-sandbox") as pool:
            return list(pool.map(self._score, programs))

    @staticmethod
    def _program(code: str, tests: str) -> tuple[str, str]:
        nonce = secrets.token_hex(16)
        return f"{code}\n\n# ---- tests ----\n{tests}\n\nprint({nonce!r})\n", nonce

    def _score(self, program: tuple[str, str]) -> float:
        source, nonce = program
        result = run_python(source, limits=self.limits)
        lines = result.stdout.splitlines()
        passed = result.ok and not result.stdout_truncated and bool(lines) and lines[-1] == nonce
        return 1.0 if passed else 0.0


python_sandbox_reward = PythonSandboxReward()
"""The instance ``builtin:python_sandbox`` names: default limits, one program per CPU at a time."""
