"""The reward server hosting a generative judge (``python -m rlhf_ray.rewards.server --judge judge.yaml``), end to
end: one server process with the judge on an in-process vLLM engine, scored through the trainer's HTTP client.

The judge is the tiny model (``make_tiny_model``) turned into an *echo*: embeddings and unembeddings the identity
and every layer's output projections zero, so the hidden state at each position is its own token's one-hot and the
logits are sqrt(hidden) on that token and 0 elsewhere: greedy decoding repeats the prompt's last character. Its
tokenizer has no chat template and the judge template ends with ``{response}``, so a verdict is the response's last
character repeated: a digit d parses as score d, a letter does not. Every expected reward below is therefore known,
while the model, the engine, the template, the parsing and the HTTP path are the real ones. (The README's command
serves the random tiny model with its chat template: ``test_readme.test_reward_server_command_serves``.)
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from rlhf_ray.rewards import RewardError
from rlhf_ray.rewards.http import TOKEN_ENV, HttpReward

REPO = Path(__file__).resolve().parents[2]
TOKEN = "judge-test-token"
WEIGHT, MIN_SCORE, MAX_SCORE = 2.0, 1.0, 8.0
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def echo_judge_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny model whose greedy output repeats the last prompt token (see the module docstring)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("echo_judge") / "model"
    shutil.copytree(tiny_model_dir, out)
    (out / "chat_template.jinja").unlink()  # the judge prompt goes in as plain text (judge_ids without a template)
    weights = load_file(str(out / "model.safetensors"))
    vocab, hidden = weights["lm_head.weight"].shape
    assert vocab == hidden, (vocab, hidden)  # the tiny shape: 128 tokens, 128 dims, so the identity fits
    weights["model.embed_tokens.weight"] = torch.eye(vocab)
    weights["lm_head.weight"] = torch.eye(vocab)
    for name in weights:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])  # each layer adds 0 to the residual stream
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def judge_url(echo_judge_dir, tmp_path_factory):
    """The scoring URL of ``python -m rlhf_ray.rewards.server --judge judge.yaml`` serving the echo judge (one
    server for the module; stopped at its end)."""
    d = tmp_path_factory.mktemp("judge_server")
    (d / "judge.yaml").write_text("\n".join([
        f"model: {echo_judge_dir}",
        "template: '{prompt} [ref {reference}] {response}'",  # ends with the response: the echo repeats its end
        "reference_field: answer",
        r"score_pattern: '(\d)'",
        f"min_score: {MIN_SCORE}", f"max_score: {MAX_SCORE}", f"weight: {WEIGHT}",
        "on_unparsable: error",
        "max_new_tokens: 3",
        f"max_model_len: {MAX_MODEL_LEN}",
        "enforce_eager: true", ""]))
    env = {**os.environ, "PYTHONPATH": str(REPO), TOKEN_ENV: TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.rewards.server", "--judge", "judge.yaml", "--port", "0",
                             "--timeout-s", "60"], cwd=d, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    # Drained all along: vLLM logs enough to fill a pipe nobody reads, which would block the server.
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    seen, deadline, url = [], time.monotonic() + 180, None
    try:
        while url is None:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError("the judge server did not start in 180 s:\n" + "".join(seen[-40:])) from None
            seen.append(line)
            if " serving " in line:  # "... serving judge '/.../model' on http://127.0.0.1:PORT (POST ..."
                url = line.split(" on ", 1)[1].split()[0] + "/score"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def client(url: str) -> HttpReward:
    """The trainer's client for ``reward.functions: [<url>]``; no retries, so a 500 is seen once."""
    return HttpReward(url, timeout_s=60, batch_size=64, token=TOKEN, retries=0)


def scaled(score: float) -> float:
    """weight * (clip(s, lo, hi) - lo) / (hi - lo) with weight 2 on the scale 1..8."""
    return WEIGHT * (min(max(score, MIN_SCORE), MAX_SCORE) - MIN_SCORE) / (MAX_SCORE - MIN_SCORE)


def test_health_names_the_judge(judge_url):
    with urllib.request.urlopen(judge_url.replace("/score", "/health"), timeout=10) as resp:
        assert json.load(resp) == {"status": "ok", "reward": "judge"}


def test_a_batch_is_scored_by_the_judge_scaled_and_clipped(judge_url):
    responses = ["7", "it is 3", "0", "9", "5"]
    rewards = client(judge_url).score(["q"] * 5, responses, {"answer": ["a", "b", "c", "d", "e"]})
    # verdicts "777", "333", "000", "999", "555": 2 * (s - 1) / 7 -> 12/7, 4/7; 0 clipped to 1 -> 0; 9 clipped to
    # 8 -> 2; 5 -> 8/7
    assert rewards == pytest.approx([12 / 7, 4 / 7, 0.0, 2.0, 8 / 7], abs=1e-6)
    assert rewards == pytest.approx([scaled(7), scaled(3), scaled(0), scaled(9), scaled(5)], abs=1e-6)
    assert all(0.0 <= r <= WEIGHT for r in rewards)


def test_an_unparsable_verdict_is_a_500_naming_the_sample(judge_url):
    with pytest.raises(RewardError) as info:
        client(judge_url).score(["q"] * 3, ["4", "no digit here", "z"], {"answer": ["a", "b", "c"]})
    message = str(info.value)
    # sample 1's verdict "eee" has no digit; it is the first, so it is the one named
    assert "HTTP 500" in message and "the verdict on sample 1 has no score matching" in message, message
    assert "eee" not in message  # the verdict stays in the server's log


def test_concurrent_requests_each_get_their_own_scores(judge_url):
    results: dict[int, list[float]] = {}

    def post(d: int) -> None:
        results[d] = client(judge_url).score(["q"] * 2, [f"x{d}", f"y{d}"], {"answer": ["a", "b"]})

    threads = [threading.Thread(target=post, args=(d,)) for d in (2, 4, 6, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {d: pytest.approx([scaled(d)] * 2, abs=1e-6) for d in (2, 4, 6, 8)}


def test_a_missing_reference_field_or_a_prompt_too_long_is_named(judge_url):
    with pytest.raises(RewardError, match=r"HTTP 500.*reward.judge.reference_field: the batch has no row field "
                                          r"'answer'"):
        client(judge_url).score(["q"], ["1"], {})
    # sample 1's prompt alone is longer than max_model_len (the character tokenizer: one token per character)
    with pytest.raises(RewardError, match=r"HTTP 500.*reward.judge.max_model_len: the judge prompt of sample 1 is \d+ "
                                          r"tokens"):
        client(judge_url).score(["q", "q" * MAX_MODEL_LEN], ["1", "2"], {"answer": ["a", "b"]})
