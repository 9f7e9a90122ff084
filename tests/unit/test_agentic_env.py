"""Environments of multi-turn rollouts: loading from a file (and its errors), what ``step`` may return, and the
concurrent caller's timeouts for plain and async environments."""

from __future__ import annotations

import asyncio
import re
import textwrap
import time

import numpy as np
import pytest

from rlhf_ray.agentic.env import Caller, as_messages, checked_step, load_env


def write(tmp_path, body, name="my_env.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


GOOD = """
    class Env:
        def reset(self, row):
            return row["prompt"]

        def step(self, response):
            return "again", 1.0, False

    class Other(Env):
        pass

    VALUE = 3
"""


def test_load_the_default_class_and_a_named_one(tmp_path):
    path = write(tmp_path, GOOD)
    spec = load_env(path)
    assert spec.name == f"environment 'Env' from {path}"
    assert spec.make().reset({"prompt": "hi"}) == "hi"
    assert load_env(f"{path}:Other").name == f"environment 'Other' from {path}"


@pytest.mark.parametrize("body, spec_tail, expected", [
    (GOOD, ":Missing", "has no class 'Missing'; classes defined there: Env, Other"),
    (GOOD, ":VALUE", "'VALUE' in environment file {path} is a int, not a class"),
    ("class Env:\n    def reset(self, row):\n        return ''\n", "", "has no step(response) method"),
    ("class Env:\n    def __init__(self, size):\n        pass\n    def reset(self, row):\n        pass\n"
     "    def step(self, r):\n        pass\n", "", "must be constructible without arguments (one is built per sample)"),
    ("import no_such_module_here\n", "", "failed to import: ModuleNotFoundError"),
])
def test_bad_environment_files_are_named(tmp_path, body, spec_tail, expected):
    path = write(tmp_path, body)
    with pytest.raises(ValueError) as err:
        load_env(path + spec_tail)
    assert expected.format(path=path) in str(err.value)
    assert path in str(err.value)


def test_a_missing_file_says_where_it_was_looked_for(tmp_path):
    with pytest.raises(ValueError, match="environment file not found: .*nope.py"):
        load_env(str(tmp_path / "nope.py"))


def test_observations_become_messages():
    assert as_messages("hi") == [{"role": "user", "content": "hi"}]
    assert as_messages("r", default_role="tool") == [{"role": "tool", "content": "r"}]
    msg = {"role": "tool", "name": "k", "content": "7"}
    assert as_messages(msg) == [msg] and as_messages([msg, msg]) == [msg, msg]
    for bad in (None, [], 3, [{"role": "user"}], [{"role": "user", "content": 5}]):
        with pytest.raises(ValueError):
            as_messages(bad)


def test_step_values_are_checked():
    assert checked_step(("obs", 1, False)) == ([{"role": "user", "content": "obs"}], 1.0, False)
    assert checked_step((None, np.float32(0.5), np.bool_(True))) == (None, 0.5, True)
    assert checked_step([None, 0.0, 1]) == (None, 0.0, True)
    for bad, message in [
        ("obs", "step must return (observation, reward, done)"),
        (("obs", 1.0), "step must return (observation, reward, done)"),
        (("obs", float("nan"), False), "expected a finite number"),
        (("obs", "1", False), "expected a finite number"),
        (("obs", True, False), "expected a finite number"),  # a bool reward is a mistake, not 1.0
        (("obs", 1.0, "yes"), "expected True or False"),
        (("obs", 1.0, 2), "expected True or False"),
        ((None, 1.0, False), "observation None with done False"),
        ((7, 1.0, False), "an observation is text, a message dict or a non-empty list"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            checked_step(bad)


def test_the_caller_runs_calls_together_and_bounds_each():
    caller = Caller(timeout_s=0.5, threads=4)
    t0 = time.monotonic()

    def boom():
        raise KeyError("x")

    outcomes = caller.run([lambda: 1, lambda: time.sleep(0.2) or 2, boom, lambda: time.sleep(5)] + [lambda: 3] * 6,
                          is_async=False)
    assert [o.value for o in outcomes[:2]] == [1, 2]
    assert isinstance(outcomes[2].error, KeyError) and "step raised KeyError: 'x' (at " in outcomes[2].describe("step", 0.5)
    assert outcomes[3].timed_out and outcomes[3].describe("step", 0.5) == \
        "step did not return within 0.5 s (rollout.env_timeout_s)"
    # The hung call's thread is replaced, so the calls queued behind it still run.
    assert [o.value for o in outcomes[4:]] == [3] * 6
    assert time.monotonic() - t0 < 2.0


def test_the_caller_runs_coroutines_on_one_loop_with_the_same_bounds():
    caller = Caller(timeout_s=0.3)
    loops = []

    async def ok(v):
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0.05)
        return v

    async def hang():
        await asyncio.sleep(10)

    async def raises():
        raise ValueError("bad")

    out = caller.run([lambda: ok(1), hang, raises, lambda: ok(2)], is_async=True)
    assert [out[0].value, out[3].value] == [1, 2]
    assert out[1].timed_out and isinstance(out[2].error, ValueError)
    again = caller.run([lambda: ok(3)], is_async=True)
    assert again[0].value == 3 and len(set(map(id, loops))) == 1  # one loop across batches (turns)


def test_bad_environment_and_tool_specs_fail_before_any_actor_starts(tiny_model_dir, tmp_path, capsys):
    from pathlib import Path

    from rlhf_ray.cli import main

    example = str(Path(__file__).resolve().parents[2] / "examples" / "agentic_tiny_cpu.yaml")
    env_file = write(tmp_path, GOOD)
    for overrides, expected in [
        ([f"rollout.tools=[{tmp_path / 'missing.py'}]"], "config error: rollout.tools: tool file not found: "),
        (["rollout.tools=[]", f"rollout.env={env_file}:Nope"], f"config error: rollout.env: environment file "
                                                                f"{env_file} has no class 'Nope'"),
        (["rollout.tools=[]", f"rollout.env={env_file}", "rollout.mode=async"],
         "config error: rollout.env: multi-turn episodes run with rollout.mode sync or one_step_off for now"),
    ]:
        code = main(["validate", example, f"model.path={tiny_model_dir}", f"train.output_dir={tmp_path / 'x'}",
                     *overrides])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and err.startswith(expected), err
    assert not (tmp_path / "x").exists()


def test_an_environment_error_is_one_line_from_the_cli(monkeypatch, capsys):
    import rlhf_ray.cli as cli
    from rlhf_ray.agentic.env import EnvError

    def fail(config, overrides):
        raise EnvError("environment 'Env' from /x/env.py: step raised KeyError: 'a', on sample 3 (prompt 0, "
                       "rows.jsonl:1: 'q'), turn 2")

    monkeypatch.setattr(cli, "cmd_train", fail)
    assert cli.main(["train", "some.yaml"]) == 2
    assert capsys.readouterr().err.strip() == ("environment error: environment 'Env' from /x/env.py: step raised "
                                               "KeyError: 'a', on sample 3 (prompt 0, rows.jsonl:1: 'q'), turn 2")
