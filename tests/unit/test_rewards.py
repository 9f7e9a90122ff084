"""Reward sources: loading user files, the guarded call, weighted sums, and the HTTP client + reference server.

Networking is loopback only: each HTTP test starts the real server from ``rlhf_ray.rewards.server``
on 127.0.0.1 with port 0 in a thread, and shuts it down at the end.
"""

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from rlhf_ray.rewards import (CombinedReward, FunctionReward, RewardError, RewardSource, build_reward_source,
                              checked_scores, load_reward_fn)
from rlhf_ray.rewards.http import HttpReward
from rlhf_ray.rewards.server import make_server, serve_in_thread

REPO = Path(__file__).resolve().parents[2]


def write_reward(tmp_path, body, name="user_reward.py"):
    """Write a reward file from dedented source; returns its path as a string."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


# ---------------------------------------------------------------- loading reward files

def test_load_default_function_and_named_function(tmp_path):
    path = write_reward(tmp_path, """
        def reward_fn(prompts, responses, **row_fields):
            return [float(len(r)) for r in responses]

        def exact(prompts, responses, answer, **_):
            return [1.0 if r == a else 0.0 for r, a in zip(responses, answer)]
    """)
    src = load_reward_fn(path)
    assert isinstance(src, RewardSource)
    assert src.name == f"reward_fn from {path}"
    assert src.score(["p", "p"], ["ab", "abcd"], {"answer": ["x", "y"]}) == [2.0, 4.0]

    named = load_reward_fn(f"{path}:exact")
    assert named.name == f"exact from {path}"
    assert named.score(["p", "p"], ["x", "z"], {"answer": ["x", "y"]}) == [1.0, 0.0]


def test_row_fields_the_function_does_not_declare_are_left_out(tmp_path):
    # No **kwargs: only the declared `answer` is passed, the extra `source` field is not.
    path = write_reward(tmp_path, """
        def reward_fn(prompts, responses, answer):
            return [1.0 if r == a else 0.0 for r, a in zip(responses, answer)]
    """)
    assert load_reward_fn(path).score(["p"], ["7"], {"answer": ["7"], "source": ["gsm8k"]}) == [1.0]


def test_reward_file_can_import_a_helper_beside_it(tmp_path):
    (tmp_path / "reward_helpers.py").write_text("BONUS = 2.5\n")
    path = write_reward(tmp_path, """
        from reward_helpers import BONUS

        def reward_fn(prompts, responses, **_):
            return [BONUS for _ in responses]
    """)
    assert load_reward_fn(path).score(["p"], ["r"], {}) == [2.5]
    assert str(tmp_path) not in sys.path  # the folder is importable only while the file loads


def test_loaded_reward_pickles_as_its_spec(tmp_path):
    path = write_reward(tmp_path, """
        def scaled(prompts, responses, **_):
            return [3.0 * len(r) for r in responses]
    """)
    blob = pickle.dumps(load_reward_fn(f"{path}:scaled"))
    # Unpickled in a fresh interpreter, as on a Ray worker: the file's module exists only there
    # if unpickling re-imports the file (pickling the function by reference would fail).
    code = ("import pickle, sys; src = pickle.loads(sys.stdin.buffer.read()); "
            "print(src.name, src.score(['p'], ['ab'], {}))")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, cwd=REPO, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == f"scaled from {path} [6.0]"  # 3 * len("ab")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(ValueError, match=r"reward file not found: .*nope\.py"):
        load_reward_fn(str(missing))


def test_file_that_fails_to_import_shows_the_exception_and_line(tmp_path):
    path = write_reward(tmp_path, """
        import math
        SCALE = 1 / 0

        def reward_fn(prompts, responses, **_):
            return [0.0] * len(responses)
    """)
    # dedent keeps the leading newline, so `1 / 0` sits on line 3.
    with pytest.raises(ValueError, match=rf"reward file {path} failed to import: ZeroDivisionError: .* \(line 3\)"):
        load_reward_fn(path)


def test_file_with_a_syntax_error(tmp_path):
    path = write_reward(tmp_path, "def reward_fn(prompts, responses:\n    return []\n")
    with pytest.raises(ValueError, match=rf"reward file {path} failed to import: SyntaxError"):
        load_reward_fn(path)


def test_missing_function_lists_what_the_file_defines(tmp_path):
    path = write_reward(tmp_path, """
        import os
        from math import sqrt

        def helper(x):
            return x

        def score_it(prompts, responses, **_):
            return [0.0] * len(responses)

        def _private():
            pass
    """)
    with pytest.raises(ValueError) as info:
        load_reward_fn(path)
    msg = str(info.value)
    assert f"reward file {path} has no function 'reward_fn'" in msg
    # Only public callables defined in the file: not the imported sqrt, not _private.
    assert "callables defined there: helper, score_it" in msg


def test_name_that_is_not_callable(tmp_path):
    path = write_reward(tmp_path, "reward_fn = 3\n")
    with pytest.raises(ValueError, match=rf"'reward_fn' in reward file {path} is a int, not a function"):
        load_reward_fn(path)


def test_function_that_cannot_take_prompts_and_responses(tmp_path):
    path = write_reward(tmp_path, "def reward_fn(responses):\n    return []\n")
    with pytest.raises(ValueError, match=rf"reward function 'reward_fn' in {path} must accept \(prompts, responses"):
        load_reward_fn(path)


def test_example_length_penalty_file():
    path = REPO / "examples" / "rewards" / "length_penalty.py"
    src = load_reward_fn(str(path))
    # TARGET_CHARS = 400: 400 chars -> 0; 600 -> -(200/400) = -0.5; 2000 -> floored at -1.
    assert src.score(["p"] * 3, ["a" * 400, "a" * 600, "a" * 2000], {"answer": ["", "", ""]}) == [0.0, -0.5, -1.0]
    bonus = load_reward_fn(f"{path}:brevity_bonus")
    # prompt of 10 chars: 10 -> 1.0; 15 -> 2 - 1.5 = 0.5; 25 -> 0.0.
    assert bonus.score(["p" * 10] * 3, ["a" * 10, "a" * 15, "a" * 25], {}) == [1.0, 0.5, 0.0]


# ---------------------------------------------------------------- checked_scores

PROMPTS = ["What is 1+1?", "What is 2+2?", "What is 3+3?"]
RESPONSES = ["2", "4", "bad response"]


def load_my_reward(tmp_path, body):
    """Load `my_reward` from a temp file; returns (source, the description errors must contain)."""
    path = write_reward(tmp_path, body)
    return load_reward_fn(f"{path}:my_reward"), f"reward function 'my_reward' from {path}"


def test_checked_scores_passes_good_scores_through_as_floats(tmp_path):
    src, _ = load_my_reward(tmp_path, """
        def my_reward(prompts, responses, **_):
            return [1, 0.5, True]
    """)
    out = checked_scores(src, PROMPTS, RESPONSES, {}, timeout_s=5)
    assert out == [1.0, 0.5, 1.0] and all(type(v) is float for v in out)


def test_checked_scores_raises_names_function_exception_and_sample(tmp_path):
    src, who = load_my_reward(tmp_path, """
        def my_reward(prompts, responses, **_):
            return [float(r) for r in responses]
    """)
    with pytest.raises(RewardError) as info:
        checked_scores(src, PROMPTS, RESPONSES, {}, timeout_s=5)
    msg = str(info.value)
    assert msg.startswith(who)
    assert "raised ValueError: could not convert string to float: 'bad response'" in msg
    assert "on sample 2 (prompt: 'What is 3+3?', response: 'bad response')" in msg  # found by replaying alone
    assert isinstance(info.value.__cause__, ValueError)


def test_checked_scores_batch_only_failure_says_no_single_sample(tmp_path):
    src, who = load_my_reward(tmp_path, """
        def my_reward(prompts, responses, **_):
            if len(responses) > 1:
                raise RuntimeError("batch too big")
            return [0.0]
    """)
    with pytest.raises(RewardError, match=r"raised RuntimeError: batch too big .* on a batch of 3 samples "
                                          r"\(no single sample reproduces it alone\)") as info:
        checked_scores(src, PROMPTS, RESPONSES, {}, timeout_s=5)
    assert str(info.value).startswith(who)


def test_checked_scores_timeout(tmp_path):
    src, who = load_my_reward(tmp_path, """
        import time

        def my_reward(prompts, responses, **_):
            time.sleep(3)
            return [0.0] * len(responses)
    """)
    t0 = time.monotonic()
    with pytest.raises(RewardError) as info:
        checked_scores(src, PROMPTS, RESPONSES, {}, timeout_s=0.2)
    assert time.monotonic() - t0 < 1.5  # gave up at the timeout, did not wait for the 3 s sleep
    msg = str(info.value)
    assert msg.startswith(f"{who} timed out after 0.2 s on a batch of 3 samples")
    assert "first: prompt: 'What is 1+1?'" in msg


def test_checked_scores_wrong_length(tmp_path):
    src, who = load_my_reward(tmp_path, """
        def my_reward(prompts, responses, **_):
            return [1.0, 1.0]
    """)
    with pytest.raises(RewardError, match=r"returned 2 scores for a batch of 3 samples \(expected 3, got 2\)") as info:
        checked_scores(src, PROMPTS, RESPONSES, {}, timeout_s=5)
    assert str(info.value).startswith(who)


@pytest.mark.parametrize("bad, shown", [("float('nan')", "nan"), ("float('-inf')", "-inf")])
def test_checked_scores_nan_or_inf_names_the_index(tmp_path, bad, shown):
    src, who = load_my_reward(tmp_path, f"""
        def my_reward(prompts, responses, **_):
            return [0.0, {bad}, 1.0]
    """)
    with pytest.raises(RewardError) as info:
        checked_scores(src, PROMPTS, RESPONSES, {}, timeout_s=5)
    assert str(info.value) == f"{who} returned {shown} at index 1 (prompt: 'What is 2+2?', response: '4')"


def test_checked_scores_string_element_names_the_index(tmp_path):
    src, who = load_my_reward(tmp_path, """
        def my_reward(prompts, responses, **_):
            return [0.0, 1.0, "0.5"]
    """)
    with pytest.raises(RewardError) as info:
        checked_scores(src, PROMPTS, RESPONSES, {}, timeout_s=5)
    assert str(info.value).startswith(f"{who} returned a non-number at index 2: str '0.5'")


def test_checked_scores_non_list_result(tmp_path):
    src, who = load_my_reward(tmp_path, """
        def my_reward(prompts, responses, **_):
            return "1.0, 0.0, 1.0"
    """)
    with pytest.raises(RewardError) as info:
        checked_scores(src, PROMPTS, RESPONSES, {}, timeout_s=5)
    assert str(info.value) == f"{who} returned str '1.0, 0.0, 1.0'; expected a list of 3 floats"


def test_checked_scores_accepts_numpy_arrays():
    np = pytest.importorskip("numpy")
    src = FunctionReward(lambda p, r, **_: np.array([0.25, 2.0, -1.0]), name="np_reward")
    assert checked_scores(src, PROMPTS, RESPONSES, {}, timeout_s=5) == [0.25, 2.0, -1.0]


def test_checked_scores_rejects_misaligned_row_fields():
    src = FunctionReward(lambda p, r, **_: [0.0] * len(r), name="zero")
    with pytest.raises(ValueError, match=r"row field 'answer' has 2 values for 3 prompts"):
        checked_scores(src, PROMPTS, RESPONSES, {"answer": ["1", "2"]}, timeout_s=5)


# ---------------------------------------------------------------- CombinedReward and the factory

def constant(value, name):
    return FunctionReward(lambda p, r, **_: [value] * len(r), name=name)


def test_combined_reward_weighted_sum():
    length = FunctionReward(lambda p, r, **_: [float(len(x)) for x in r], name="length")
    combo = CombinedReward([length, constant(1.0, "one"), constant(0.5, "half")], weights=[2.0, -1.0, 4.0])
    # sample "ab": 2*2 - 1*1 + 4*0.5 = 5;  sample "abcd": 2*4 - 1 + 2 = 9
    assert combo.score(["p", "p"], ["ab", "abcd"], {}) == [5.0, 9.0]
    assert checked_scores(combo, ["p", "p"], ["ab", "abcd"], {}, timeout_s=5) == [5.0, 9.0]
    assert combo.score_components(["p"], ["ab"], {}) == [[2.0], [1.0], [0.5]]  # unweighted, per source
    assert CombinedReward([length, constant(1.0, "one")]).score(["p"], ["abc"], {}) == [4.0]  # default weights 1


def test_combined_reward_errors_name_the_component():
    with pytest.raises(ValueError, match=r"one weight per source \(2\), got 1"):
        CombinedReward([constant(1.0, "a"), constant(1.0, "b")], weights=[1.0])
    combo = CombinedReward([constant(1.0, "fine"), constant(float("nan"), "broken")])
    with pytest.raises(RewardError, match=r"^reward function 'broken' returned nan at index 0"):
        checked_scores(combo, ["p"], ["r"], {}, timeout_s=5)
    with pytest.raises(RewardError, match=r"^reward function 'broken' returned nan at index 0"):
        combo.score(["p"], ["r"], {})


def test_build_reward_source_specs(tmp_path):
    math_src = build_reward_source("builtin:math", timeout_s=5)
    assert math_src.name == "builtin:math"
    assert checked_scores(math_src, ["q", "q"], ["\\boxed{4}", "5"], {"answer": ["4", "4"]}, 5) == [1.0, 0.0]
    think = build_reward_source("builtin:format_think", timeout_s=5)
    assert think.score(["q"], ["<think>x</think> 4"], {}) == [1.0]
    with pytest.raises(ValueError, match=r"unknown built-in reward 'builtin:maths'; built-ins: builtin:math, "
                                         r"builtin:format_think"):
        build_reward_source("builtin:maths", timeout_s=5)
    http_src = build_reward_source("http://127.0.0.1:1/score", timeout_s=7)
    assert isinstance(http_src, HttpReward) and http_src.timeout_s == 7
    path = write_reward(tmp_path, "def f(prompts, responses, **_):\n    return [0.0] * len(responses)\n")
    assert build_reward_source(f"{path}:f", timeout_s=5).name == f"f from {path}"


def test_package_import_is_light():
    code = ("import sys, rlhf_ray.rewards; "
            "heavy = [m for m in ('torch', 'ray', 'vllm', 'deepspeed', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


# ---------------------------------------------------------------- HTTP reward against the reference server

TOKEN = "test-token"
"""The bearer token of the servers below (``served``); their clients send it."""


@contextmanager
def served(source, timeout_s=5.0, token=TOKEN, **options):
    """The reference server on 127.0.0.1:<free port> in a thread, requiring ``token``; yields its scoring URL."""
    server = make_server(source, timeout_s, token, **options)
    thread = serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        assert not thread.is_alive()


class Recorder:
    """A reward that records each batch it receives; optionally fails its first `fail_first` calls."""

    def __init__(self, fail_first=0):
        self.batches, self.fail_first = [], fail_first
        self.lock = threading.Lock()

    def __call__(self, prompts, responses, answer, **_):
        with self.lock:
            self.batches.append(list(responses))
            if len(self.batches) <= self.fail_first:
                raise ZeroDivisionError("remote boom")
        return [len(r) + float(a) for r, a in zip(responses, answer)]


def test_http_reward_success_in_chunks():
    rec = Recorder()
    with served(FunctionReward(rec, name="remote_len")) as url:
        client = HttpReward(url, timeout_s=5, batch_size=2, token=TOKEN, backoff_s=0.01)
        responses = ["a", "bb", "ccc", "dddd", "eeeee"]
        out = checked_scores(client, ["p"] * 5, responses, {"answer": [10, 20, 30, 40, 50]}, timeout_s=5)
    assert out == [11.0, 22.0, 33.0, 44.0, 55.0]  # len(response) + answer, in order
    assert rec.batches == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]]  # batch_size 2 -> 3 requests


def test_http_reward_retries_a_5xx_then_succeeds():
    rec = Recorder(fail_first=1)
    with served(FunctionReward(rec, name="flaky")) as url:
        client = HttpReward(url, timeout_s=5, batch_size=8, token=TOKEN, backoff_s=0.01)
        out = client.score(["p"], ["xy"], {"answer": [1]})
    assert out == [3.0]  # 2 + 1
    assert len(rec.batches) == 2  # the 500, then the retry


def test_http_reward_server_error_names_url_and_remote_function():
    rec = Recorder(fail_first=100)
    with served(FunctionReward(rec, name="always_fails")) as url:
        client = HttpReward(url, timeout_s=5, batch_size=8, token=TOKEN, retries=2, backoff_s=0.01)
        with pytest.raises(RewardError) as info:
            checked_scores(client, ["p"], ["xy"], {"answer": [1]}, timeout_s=5)
    msg = str(info.value)
    assert msg.startswith(f"reward endpoint {url} failed after 3 attempts; last: HTTP 500:")
    # The server's body carries its own RewardError, naming the remote function and exception.
    assert "reward function 'always_fails' raised ZeroDivisionError: remote boom" in msg
    assert len(rec.batches) == 3  # 1 try + 2 retries (a batch of 1 is not replayed server-side)


def test_http_reward_unreachable_port_gives_up_after_retries():
    with socket.socket() as s:  # a port that was free a moment ago and now has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    client = HttpReward(url, timeout_s=2, batch_size=8, token=TOKEN, retries=2, backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=rf"^reward endpoint {url} failed after 3 attempts; last: connection failed"):
        checked_scores(client, ["p"], ["r"], {}, timeout_s=5)
    assert time.monotonic() - t0 < 2  # backoff 0.01 + 0.02 s, not the request timeout


def test_http_reward_bad_response_shape():
    # The reward itself returns 2 scores for 1 sample: the server reports it, as a 500.
    with served(FunctionReward(lambda p, r, **_: [1.0, 2.0], name="too_many")) as url:
        client = HttpReward(url, timeout_s=5, batch_size=8, token=TOKEN, retries=0)
        with pytest.raises(RewardError, match=r"failed after 1 attempts; last: HTTP 500: .*'too_many' returned "
                                              r"2 scores for a batch of 1 samples"):
            client.score(["p"], ["r"], {})


def post(url, body: bytes, token=TOKEN):
    """POST ``body`` to ``url`` with ``token`` (none when None); the HTTPError of a non-2xx answer is raised."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers, method="POST"),
                                timeout=5) as resp:
        return json.load(resp)


def test_server_health_and_bad_request():
    with served(constant(1.0, "one")) as url:
        base = url.rsplit("/", 1)[0]
        with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
            assert json.load(resp) == {"status": "ok", "reward": "one"}
        with pytest.raises(urllib.error.HTTPError) as info:
            post(url, json.dumps({"prompts": ["a", "b"], "responses": ["x"]}).encode())
        assert info.value.code == 400
        assert json.load(info.value) == {"error": "2 prompts but 1 responses"}


def test_server_refuses_a_request_without_its_token():
    body = json.dumps({"prompts": ["p"], "responses": ["r"]}).encode()
    with served(constant(1.0, "one")) as url:
        for token in (None, "wrong"):
            with pytest.raises(urllib.error.HTTPError) as info:
                post(url, body, token)
            assert info.value.code == 401 and "missing or wrong bearer token" in json.load(info.value)["error"]
        assert post(url, body) == {"rewards": [1.0]}
    with pytest.raises(ValueError, match="needs a bearer token"):  # there is no open mode
        make_server(constant(1.0, "one"), 5.0, "")


def start_cli(tmp_path, *args, env_token=None):
    """``python -m rlhf_ray.rewards.server`` on a free port; returns (process, its scoring URL). Waits for the
    "serving ..." line, logged after any token was printed."""
    from rlhf_ray.rewards.http import TOKEN_ENV

    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV} | {"PYTHONPATH": str(REPO)}
    if env_token is not None:
        env[TOKEN_ENV] = env_token
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.rewards.server", "--port", "0", *args], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # "... serving reward function 'reward_fn' from ... on http://127.0.0.1:PORT ..."
        if " serving " in line:
            return proc, line.split(" on ", 1)[1].split()[0] + "/score"
    raise AssertionError(f"the server did not start: {proc.wait(10)}")


def stop_cli(proc) -> str:
    """Stop the server; returns what it printed on stdout."""
    proc.terminate()
    out = proc.communicate(timeout=10)[0]
    return out


def test_server_cli_generates_prints_and_stores_a_token_when_none_is_given(tmp_path):
    path = write_reward(tmp_path, "def reward_fn(prompts, responses, **_):\n    return [7.0] * len(responses)\n")
    token_file = tmp_path / "reward.token"
    proc, url = start_cli(tmp_path, "--reward", path, "--token-file", str(token_file))
    try:
        printed = proc.stdout.readline().strip()  # RLHF_RAY_REWARD_TOKEN=<token>, flushed before "serving"
        name, _, token = printed.partition("=")
        assert name == "RLHF_RAY_REWARD_TOKEN" and len(token) >= 40, printed  # token_urlsafe(32): 43 characters
        assert token_file.read_text().strip() == token and (token_file.stat().st_mode & 0o777) == 0o600
        with pytest.raises(RewardError, match="HTTP 401"):
            HttpReward(url, timeout_s=5, batch_size=8, retries=0).score(["p"], ["a"], {})
        assert HttpReward(url, timeout_s=5, batch_size=8, token=token, retries=0).score(["p", "q"], ["a", "b"],
                                                                                        {}) == [7.0, 7.0]
    finally:
        rest = stop_cli(proc)
    assert token not in rest  # printed once


def test_server_cli_takes_the_token_from_its_file_then_the_environment(tmp_path):
    token_file = tmp_path / "reward.token"
    token_file.write_text("from-the-file\n")
    proc, url = start_cli(tmp_path, "--reward", "builtin:format_think", "--token-file", str(token_file),
                          env_token="from-the-env")
    try:
        with pytest.raises(RewardError, match="HTTP 401"):
            HttpReward(url, timeout_s=5, batch_size=8, token="from-the-env", retries=0).score(["p"], ["a"], {})
        assert HttpReward(url, timeout_s=5, batch_size=8, token="from-the-file", retries=0).score(["p"], ["a"],
                                                                                               {}) == [0.0]
    finally:
        assert stop_cli(proc) == ""  # a token given is never printed
    proc, url = start_cli(tmp_path, "--reward", "builtin:format_think", env_token="from-the-env")
    try:
        assert HttpReward(url, timeout_s=5, batch_size=8, token="from-the-env", retries=0).score(["p"], ["a"],
                                                                                              {}) == [0.0]
    finally:
        assert stop_cli(proc) == ""


def test_client_token_comes_from_the_variable_the_config_names(monkeypatch):
    from rlhf_ray.config import ConfigError
    from rlhf_ray.config.schema import RewardConfig
    from rlhf_ray.controller.reward_scoring import build_function_reward

    with served(constant(1.0, "one"), token="s3cret") as url:
        cfg = RewardConfig(functions=[url], http_token_env="MY_REWARD_TOKEN")
        monkeypatch.delenv("MY_REWARD_TOKEN", raising=False)
        with pytest.raises(ConfigError, match=r"^reward.http_token_env: the environment variable MY_REWARD_TOKEN "
                                              r"is not set here, and the reward endpoint http://127.0.0.1:\d+/score"):
            build_function_reward(cfg)
        monkeypatch.setenv("MY_REWARD_TOKEN", "wrong")
        with pytest.raises(RewardError, match=r"answered HTTP 401: .*missing or wrong bearer token"):
            build_function_reward(cfg).score(["p"], ["r"], {})
        monkeypatch.setenv("MY_REWARD_TOKEN", "s3cret")
        assert build_function_reward(cfg).score(["p"], ["r"], {}) == [1.0]
        assert "s3cret" not in repr(cfg)  # the config (as logged and written) holds the variable's name only
        # null: no token sent (an endpoint without authentication), so this server refuses it
        with pytest.raises(RewardError, match="HTTP 401"):
            build_function_reward(RewardConfig(functions=[url], http_token_env=None)).score(["p"], ["r"], {})
    with pytest.raises(ValueError, match="carries a credential in its URL") as info:
        HttpReward("http://user:s3cret@127.0.0.1:1/score", timeout_s=5, batch_size=8)
    assert "s3cret" not in str(info.value)


def test_server_caps_bodies_and_drops_silent_clients():
    import socket

    with served(constant(1.0, "one"), max_body_bytes=100, read_timeout_s=0.5) as url:
        with pytest.raises(RewardError, match=r"HTTP 400: .*expected a JSON body of 1..100 bytes"):
            HttpReward(url, timeout_s=5, batch_size=8, token=TOKEN, retries=0).score(["p" * 200], ["r"], {})
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        stalls = (b"POST /score HTTP/1.1\r\nHost: x\r\n",  # headers, and then nothing more
                  b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                  + b"\r\nContent-Length: 50\r\n\r\n{\"prompts\"")  # 11 bytes of a 50-byte body
        for partial in stalls:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(partial)
                t0 = time.monotonic()
                while sock.recv(1024):  # until the server closes the connection
                    pass
                assert time.monotonic() - t0 < 3


def test_an_endpoint_that_is_down_is_named_when_the_rewards_are_built(monkeypatch):
    import socket

    from rlhf_ray.rewards.http import TOKEN_ENV

    from rlhf_ray.config.schema import RewardConfig
    from rlhf_ray.controller.reward_scoring import build_function_reward

    with socket.socket() as s:  # a port nobody listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(RewardError, match=rf"^reward endpoint {url} is not reachable: .*refused"):
        build_function_reward(RewardConfig(functions=["builtin:math", url]))
    with served(constant(1.0, "one")) as up:
        assert build_function_reward(RewardConfig(functions=[up])) is not None


def test_server_errors_keep_prompts_paths_and_messages_home(tmp_path):
    path = write_reward(tmp_path, "def reward_fn(prompts, responses, **_):\n"
                                  "    raise ValueError('secret-in-message ' + prompts[0])\n")
    from rlhf_ray.rewards import build_reward_source

    with served(build_reward_source(path, 5.0)) as url:
        with pytest.raises(RewardError) as info:
            HttpReward(url, timeout_s=5, batch_size=8, token=TOKEN, retries=0).score(["private prompt"], ["r"], {})
    msg = str(info.value)
    assert "HTTP 500" in msg and "reward function 'reward_fn' raised ValueError: secret-in-message <sample> on " \
                                 "sample 0" in msg, msg
    assert "private prompt" not in msg and str(tmp_path) not in msg, msg
