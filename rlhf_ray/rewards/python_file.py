"""Load a user's reward function from a Python file: ``path/to/file.py`` or ``path/to/file.py:func_name``.

The file is executed as a fresh module each time it is loaded. The function must accept
``(prompts, responses, **row_fields)``; see :mod:`rlhf_ray.rewards.base`. A loaded source pickles
as its spec and re-imports the file on the other side, so it can be shipped to Ray workers as long
as the path resolves there (a shared filesystem, or a relative path inside the job's working_dir).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import traceback
from types import ModuleType
from typing import Any, Callable

from rlhf_ray.rewards.base import FunctionReward

DEFAULT_FUNCTION = "reward_fn"
"""The function looked up when the spec names none."""


def parse_spec(spec: str, default: str = DEFAULT_FUNCTION) -> tuple[str, str]:
    """``"a/b.py:fn"`` -> ``("a/b.py", "fn")``; ``"a/b.py"`` -> ``("a/b.py", default)``."""
    path, sep, func = spec.rpartition(":")
    # Only split when what follows the last colon is a Python name, so "C:\\r.py" stays one path.
    if sep and path and func.isidentifier():
        return path, func
    return spec, default


class FileReward(FunctionReward):
    """A reward function loaded from a file; pickles as ``(path, func_name)`` and reloads on unpickling."""

    def __init__(self, path: str, func_name: str):
        fn = _load_function(path, func_name)
        super().__init__(fn, name=f"{func_name} from {path}",
                         description=f"reward function {func_name!r} from {os.path.abspath(path)}")
        self.path, self.func_name = path, func_name

    def public_describe(self) -> str:
        return f"reward function {self.func_name!r}"

    def __getstate__(self) -> dict[str, Any]:
        # The function object itself may not pickle (closures over module state, a module that is
        # not importable by name on the worker); the spec always does.
        return {"path": self.path, "func_name": self.func_name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["func_name"])


def load_reward_fn(spec: str) -> FileReward:
    """The reward source for ``spec`` (``path.py`` or ``path.py:func``); ValueError naming the path if unusable.

    Errors: the file does not exist; it raises while importing (the exception and line are shown);
    it has no such function (the functions it defines are listed); the name is not callable; the
    function cannot take ``(prompts, responses)`` positionally.
    """
    path, func_name = parse_spec(spec)
    return FileReward(path, func_name)


def import_user_file(path: str, kind: str = "reward file") -> ModuleType:
    """The Python file ``path`` executed as a fresh module; ValueError starting with ``kind`` (``reward file``,
    ``environment file``, ``tool file``) when it does not exist or fails to import (the exception and line shown)."""
    abspath = os.path.abspath(path)
    if not os.path.isfile(abspath):
        raise ValueError(f"{kind} not found: {abspath!r} (from {path!r}; relative paths resolve "
                         f"against the current directory {os.getcwd()!r})")
    return _import_file(abspath, kind)


def _load_function(path: str, func_name: str) -> Callable[..., Any]:
    abspath = os.path.abspath(path)
    module = import_user_file(path)
    if not hasattr(module, func_name):
        defined = sorted(n for n, v in vars(module).items()
                         if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        found = ", ".join(defined) if defined else "none"
        raise ValueError(f"reward file {abspath} has no function {func_name!r}; callables defined there: {found}. "
                         f"Name one as '{path}:<function>'")
    fn = getattr(module, func_name)
    if not callable(fn):
        raise ValueError(f"{func_name!r} in reward file {abspath} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind_partial(None, None)
    except TypeError:
        raise ValueError(f"reward function {func_name!r} in {abspath} must accept (prompts, responses, "
                         f"**row_fields); its signature is {inspect.signature(fn)}") from None
    except ValueError:
        pass  # no inspectable signature (a C callable); the call itself will tell
    return fn


def _import_file(abspath: str, kind: str = "reward file") -> ModuleType:
    # A unique module name per path, so two reward files both named "reward.py" do not collide.
    digest = hashlib.sha1(abspath.encode()).hexdigest()[:10]
    name = f"rlhf_ray_user_{kind.split()[0]}_{os.path.splitext(os.path.basename(abspath))[0]}_{digest}"
    spec = importlib.util.spec_from_file_location(name, abspath)
    if spec is None or spec.loader is None:
        raise ValueError(f"{kind} {abspath} cannot be imported as Python (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    # Registered before executing: dataclasses and pickling inside the file look the module up here.
    sys.modules[name] = module
    # The file's own folder is importable while it runs, so it can import helper modules beside it.
    folder = os.path.dirname(abspath)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        line = _line_in(exc, abspath)
        raise ValueError(f"{kind} {abspath} failed to import: {type(exc).__name__}: {exc}{line}") from exc
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass  # the file removed it itself
    return module


def _line_in(exc: BaseException, abspath: str) -> str:
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f" (line {exc.lineno})"
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == abspath]
    return f" (line {lines[-1]})" if lines else ""
