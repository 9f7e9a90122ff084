"""The generative judge (reward.judge, RLAIF): config checks naming the key, the template, score parsing and
scaling, unparsable verdicts (an error naming the sample, or the default counted), the judge role in the plan,
and RewardScorer adding the judge's scores with its metrics (engines faked); the reward server's judge: its file,
its CLI errors, its engine lock (the served judge end to end: tests/e2e/test_judge_server.py)."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf_ray.config import ConfigError, load_config, resolve
from rlhf_ray.rewards import RewardError
from rlhf_ray.rewards.judge import judge_rewards, load_template, parse_score, render

PATTERN = re.compile(r"(?i)score\s*[:=]\s*(-?\d+(?:\.\d+)?)")
BASE = {"job": "grpo", "model.path": "m", "learner.num_workers": 2, "learner.gpus_per_worker": 1,
        "learner.micro_batch_size": 2, "rollout.n_samples": 4, "algo.prompts_per_step": 4}


def cfg(**over):
    return load_config(values={**BASE, **over})


def test_parse_score_takes_the_first_match():
    assert parse_score("Reasoning... Score: 7\nScore: 2", PATTERN) == 7.0
    assert parse_score("score = -1.5", PATTERN) == -1.5
    assert parse_score("I give it a seven", PATTERN) is None
    assert parse_score("Score: nan", re.compile(r"Score: (\S+)")) is None  # not finite -> unparsable


def test_judge_rewards_scale_clip_and_count_unparsable():
    verdicts = ["Score: 1", "Score: 10", "Score: 4", "Score: 12", "no verdict"]
    rewards, bad = judge_rewards(verdicts, PATTERN, 1.0, 10.0, default_score=5.5)
    # (s - 1) / 9: 1 -> 0, 10 -> 1, 4 -> 3/9, 12 clipped to 10 -> 1, default 5.5 -> 4.5/9 = 0.5
    assert rewards == pytest.approx([0.0, 1.0, 3 / 9, 1.0, 0.5], abs=1e-9)
    assert bad == 1


def test_unparsable_verdict_is_an_error_naming_the_sample():
    with pytest.raises(RewardError, match=r"sample 1 has no score.*'rambling'"):
        judge_rewards(["Score: 3", "rambling"], PATTERN, 1.0, 10.0, default_score=None)


def test_template_renders_and_is_read_from_a_file(tmp_path):
    t = load_template("Q: {prompt}\nA: {response}\nRef: {reference}\n{{json}}", reference_field="answer")
    assert render(t, "2+2?", "4", 4) == "Q: 2+2?\nA: 4\nRef: 4\n{json}"
    f = tmp_path / "rubric.txt"
    f.write_text("Judge {response} against the constitution.")
    assert load_template(str(f)) == "Judge {response} against the constitution."


@pytest.mark.parametrize("template, ref, message", [
    ("Rate the answer to {prompt}.", None, r"reward.judge.template: needs a \{response\}"),
    ("{response} {answer}", None, r"reward.judge.template: unknown placeholder\(s\) \['answer'\]"),
    ("{response} vs {reference}", None, "reward.judge.reference_field must name"),
    ("{response} {", None, "reward.judge.template: .*brace"),
])
def test_bad_template_names_the_key(template, ref, message):
    with pytest.raises(ConfigError, match=message):
        load_template(template, ref)


@pytest.mark.parametrize("over, message", [
    ({"reward.judge.score_pattern": r"score: \d+"}, r"reward.judge.score_pattern: needs exactly one group"),
    ({"reward.judge.score_pattern": r"(unclosed"}, r"reward.judge.score_pattern: not a regular expression"),
    ({"reward.judge.on_unparsable": "default"}, r"reward.judge.default_score: on_unparsable: default needs"),
    ({"reward.judge.min_score": 5, "reward.judge.max_score": 5}, r"reward.judge.max_score: must be > min_score"),
    ({"reward.judge.template": "no placeholder"}, r"reward.judge.template: needs a \{response\}"),
    ({"reward.judge.model": "/nonexistent/judge"}, r"reward.judge.model: /nonexistent/judge does not exist"),
])
def test_judge_config_errors_name_the_key(over, message):
    with pytest.raises(ConfigError, match=message):
        resolve(cfg(**{"reward.judge.model": "judge-hub-name", **over}))


@pytest.mark.parametrize("mode", ["separate", "hybrid"])
def test_judge_is_a_rollout_role_with_its_own_pool(mode):
    r = resolve(cfg(**{"reward.judge.model": "judge-hub-name", "reward.judge.num_engines": 2,
                       "reward.judge.tensor_parallel_size": 2, "reward.judge.max_new_tokens": 16,
                       "placement.mode": mode, "rollout.num_engines": 2}))
    judge = {s.name: s for s in r.roles}["judge"]
    assert (judge.model_path, judge.num_workers, judge.gpus, judge.sleep_mode) == ("judge-hub-name", 2, 2.0, False)
    assert (judge.rollout.temperature, judge.rollout.max_new_tokens, judge.rollout.n_samples) == (0.0, 16, 1)
    pool = {p.name: p for p in r.plan.pools}["judge"]
    assert (pool.size, pool.gpus_per_bundle, tuple(pool.roles)) == (2, 2.0, ("judge",))
    assert r.plan.role_share["judge"] == 1.0


def test_judge_alone_is_a_reward():
    assert resolve(cfg(**{"reward.judge.model": "judge-hub-name"})).paths.judge_model == "judge-hub-name"
    with pytest.raises(ConfigError, match="reward.judge.model"):
        resolve(cfg())


class FakeTokenizer:
    chat_template = None
    pad_token_id, eos_token_id = 0, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(text)]}  # one "token": the rendered prompt's length


class FakeJudgeEngines:
    """Answers each prompt with a canned verdict, in reverse order across the merged output (as if two engines
    returned out of order), to check the verdicts are put back by prompt index."""

    def __init__(self, verdicts):
        self.verdicts, self.seen = verdicts, None

    def generate_async(self, prompt_ids, spec, pad_id):
        self.seen = (prompt_ids, spec)
        order = list(reversed(range(len(prompt_ids))))
        gens = SimpleNamespace(prompt_index=np.asarray(order), texts=[self.verdicts[i] for i in order])
        return SimpleNamespace(result=lambda: (None, gens), started=0.0)


def test_reward_scorer_adds_the_judge_with_its_metrics():
    from rlhf_ray.config.job_sections import JudgeConfig
    from rlhf_ray.config.schema import DataConfig, RewardConfig
    from rlhf_ray.controller.reward_scoring import JudgeScorer, RewardScorer

    jc = JudgeConfig(model="j", template="{prompt}|{response}", weight=2.0, on_unparsable="default",
                     default_score=1.0, min_score=0.0, max_score=4.0)
    engines = FakeJudgeEngines(["Score: 4", "Score: 1", "???"])
    scorer = RewardScorer(RewardConfig(judge=jc), DataConfig(), judge=JudgeScorer(jc, engines, FakeTokenizer()))
    batch = SimpleNamespace(size=3, responses=["r0", "r1", "r2"], env_rewards=None, env_failed=None)
    total, metrics = scorer.finish(batch, None, ["p0", "p1", "p2"], {})
    # weight 2 x (s - 0) / 4: 4 -> 2, 1 -> 0.5, unparsable -> default 1 -> 0.5
    assert total.tolist() == pytest.approx([2.0, 0.5, 0.5], abs=1e-6)
    assert metrics["reward/judge_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["reward/judge_unparsable"] == 1.0 and metrics["timing/judge_s"] > 0
    prompt_ids, spec = engines.seen
    assert prompt_ids == [[len("p0|r0")], [len("p1|r1")], [len("p2|r2")]]
    assert (spec.temperature, spec.max_tokens, spec.n) == (0.0, 64, 1)
    assert torch.is_tensor(total)


def test_readme_judge_example_loads():
    """The README's reward.judge block is a valid config: its rubric renders, its verdict format parses."""
    from pathlib import Path

    import yaml

    from rlhf_ray.config.job_sections import JudgeConfig

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b.split("```")[0] for b in text.split("```yaml\n")[1:] if "judge:" in b.split("```")[0])
    jc = JudgeConfig(**yaml.safe_load(block)["reward"]["judge"])
    prompt = render(load_template(jc.template), "1+1?", "2")
    assert "Question: 1+1?\nAnswer: 2\n" in prompt
    # the README's pattern on its own verdict format: Score: 6 on 1..10 -> (6 - 1) / 9
    assert judge_rewards(["Score: 6"], re.compile(jc.score_pattern), jc.min_score, jc.max_score, None) == ([5 / 9], 0)


# ---- pairwise (online DPO) --------------------------------------------------------------------------------------

PREF = re.compile(r"(?i)better\s*(?:response)?\s*[:=]\s*\(?([AB])\b")


def test_parse_preference_and_both_orders():
    from rlhf_ray.rewards.judge import pair_label, parse_preference

    assert parse_preference("Both fine. Better: b", PREF) == "B"
    assert parse_preference("Better response = (A)", PREF) == "A"
    assert parse_preference("Better: C", PREF) is None and parse_preference("A is nicer", PREF) is None
    # ab shows (x, y) as (A, B), ba shows (y, x): x wins only when both verdicts point at x
    assert pair_label("A", "B") == 0 and pair_label("B", "A") == 1
    assert pair_label("A", "A") is None and pair_label("B", "B") is None  # position bias: always the first/second
    assert pair_label(None, "B") is None


def test_judge_candidates_by_reward_else_first_different_text():
    from rlhf_ray.controller.online_dpo import judge_candidates

    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    texts = ["a", "b", "c", "x", "x", "y", "z", "z"]
    # prompt 0: rewards differ -> best 1, worst 0; prompt 1: tied -> 3 and the first other text, 5;
    # prompt 2: tied and all "z" -> nothing to compare, counted
    assert judge_candidates(rewards, group, texts) == ([(1, 0), (3, 5)], 1)


class PairEngines:
    """Writes the verdict ``decide(prompt text)`` for each judge prompt (the fake tokenizer's ids hold the text)."""

    def __init__(self, decide):
        self.decide, self.calls = decide, 0

    def generate_async(self, prompt_ids, spec, pad_id):
        self.calls += 1
        texts = [self.decide("".join(map(chr, ids))) for ids in prompt_ids]
        gens = SimpleNamespace(prompt_index=np.arange(len(texts)), texts=texts)
        return SimpleNamespace(result=lambda: (None, gens), started=0.0)


class CharTokenizer(FakeTokenizer):
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def pair_judge(decide, **over):
    from rlhf_ray.config.job_sections import JudgeConfig
    from rlhf_ray.controller.reward_scoring import PairJudge

    jc = JudgeConfig(model="j", pairwise=True, pairwise_template="A={response_a} B={response_b}", **over)
    return PairJudge(jc, PairEngines(decide), CharTokenizer())


def test_pair_judge_labels_agreeing_verdicts_and_counts_the_rest():
    def decide(text):  # prefers "good" wherever it is shown; "biased" pairs always get A; "mute" pairs no verdict
        if "biased" in text:
            return "Better: A"
        if "mute" in text:
            return "hmm"
        return "Better: A" if text.startswith("A=good") else "Better: B"

    responses = ["bad", "good", "good", "bad", "biased", "x", "mute", "y"]
    judge = pair_judge(decide, on_unparsable="default", default_score=0.0)
    pairs, counts = judge.label([(0, 1), (2, 3), (4, 5), (6, 7)], ["p"] * 8, responses, {})
    # (0, 1): "good" is 1 -> chosen 1; (2, 3): "good" is 2 -> chosen 2; (4, 5) inconsistent; (6, 7) unparsable
    assert pairs == [(1, 0), (2, 3)]
    assert counts == {"online_dpo/judge_inconsistent": 1.0, "online_dpo/judge_unparsable": 1.0}
    assert judge.engines.calls == 1  # both orders of every pair in one request


def test_pair_judge_unparsable_is_an_error_naming_the_samples():
    judge = pair_judge(lambda text: "no idea")
    with pytest.raises(RewardError, match=r"samples 4 and 7 names neither A nor B.*'no idea'"):
        judge.label([(4, 7)], ["p"] * 8, ["r"] * 8, {})


@pytest.mark.parametrize("over, message", [
    ({"job": "grpo"}, r"reward.judge.pairwise: labels online DPO's pairs"),
    ({"reward.judge.pairwise_template": "{response_a} only"},
     r"reward.judge.pairwise_template: needs the placeholder\(s\) \['response_b'\]"),
    ({"reward.judge.preference_pattern": "Better: [AB]"}, r"reward.judge.preference_pattern: needs exactly one group"),
])
def test_pairwise_config_errors_name_the_key(over, message):
    with pytest.raises(ConfigError, match=message):
        resolve(cfg(**{"job": "online_dpo", "reward.judge.model": "j", "reward.judge.pairwise": True, **over}))


def test_pairwise_judge_alone_resolves_for_online_dpo():
    r = resolve(cfg(**{"job": "online_dpo", "reward.judge.model": "j", "reward.judge.pairwise": True}))
    assert "judge" in [s.name for s in r.roles]


# ---- the reward server's judge (python -m rlhf_ray.rewards.server --judge) ---------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_pointwise_judge_renders_with_the_reference_and_scores_with_the_weight():
    from rlhf_ray.config.job_sections import JudgeConfig
    from rlhf_ray.rewards.judge import PointwiseJudge

    judge = PointwiseJudge.from_config(JudgeConfig(
        model="j", template="{prompt}|{reference}|{response}", reference_field="answer", weight=3.0, min_score=0.0,
        max_score=4.0, on_unparsable="default", default_score=2.0))
    assert judge.prompts(["p0", "p1"], ["r0", "r1"], {"answer": [1, None]}) == ["p0|1|r0", "p1||r1"]
    # 3 * (s - 0) / 4: 4 -> 3, 1 -> 0.75, unparsable -> default 2 -> 1.5
    assert judge.rewards(["Score: 4", "Score: 1", "?"]) == (pytest.approx([3.0, 0.75, 1.5], abs=1e-9), 1)
    with pytest.raises(RewardError, match=r"reward.judge.reference_field: the batch has no row field 'answer'") as info:
        judge.prompts(["p"], ["r"], {"other": ["x"]})
    assert info.value.public == str(info.value)  # names no sample text: the server may send it as is


def test_pointwise_judge_without_reference_in_its_template_needs_no_row_field():
    from rlhf_ray.config.job_sections import JudgeConfig
    from rlhf_ray.rewards.judge import PointwiseJudge

    judge = PointwiseJudge.from_config(JudgeConfig(model="j", template="{prompt}: {response} {{x}}",
                                                   reference_field="answer"))
    assert judge.prompts(["p"], ["r"], {}) == ["p: r {x}"]


def test_unparsable_error_has_a_public_message_without_the_verdict():
    with pytest.raises(RewardError) as info:
        judge_rewards(["Score: 3", "secret rambling"], PATTERN, 1.0, 10.0, default_score=None)
    assert "sample 1" in info.value.public and "secret" not in info.value.public
    assert "secret rambling" in str(info.value)  # the whole story stays in the server's log


def judge_file(tmp_path, text: str):
    path = tmp_path / "judge.yaml"
    path.write_text(text)
    return path


def test_judge_file_is_a_judge_section_or_a_training_config(tmp_path):
    from rlhf_ray.rewards.judge_engine import load_judge_config

    cfg = load_judge_config(judge_file(tmp_path, "model: hub/judge\nmax_new_tokens: 8\nweight: 0.5\n"))
    assert (cfg.model, cfg.max_new_tokens, cfg.weight, cfg.on_unparsable) == ("hub/judge", 8, 0.5, "error")
    tiny = load_judge_config(REPO / "examples" / "judges" / "tiny_cpu.yaml")  # the README's command's file
    assert (tiny.model, tiny.score_pattern, tiny.on_unparsable, tiny.default_score) == (
        "runs/tiny-model", r"(\d)", "default", 4.5)
    run = load_judge_config(REPO / "examples" / "grpo_judge_7b_8gpu.yaml")  # a training config: its judge
    assert (run.model, run.tensor_parallel_size, run.weight) == ("Qwen/Qwen2.5-7B-Instruct", 2, 0.5)


@pytest.mark.parametrize("text, message", [
    ("model: j\nmax_new_token: 8\n", r"--judge .*judge.yaml: unknown config key 'reward.judge.max_new_token'. "
                                     r"Did you mean 'max_new_tokens'\?"),
    ("model: j\nmin_score: high\n", r"reward.judge.min_score: expected a number, got 'high'"),
    ("model: j\nmin_score: 5\nmax_score: 5\n", r"reward.judge.max_score: must be > min_score"),
    ("model: j\non_unparsable: default\n", r"reward.judge.default_score: on_unparsable: default needs"),
    ("model: j\ntemplate: no placeholder\n", r"reward.judge.template: needs a \{response\}"),
    ("template: '{response}'\n", r"reward.judge.model: the path \(or hub name\) of the judge model to serve is "
                                 "missing"),
    ("model: /nonexistent/judge\n", r"reward.judge.model: /nonexistent/judge does not exist"),
    ("model: j\npairwise: true\n", r"reward.judge.pairwise: the reward server scores each response on its own"),
    ("reward:\n  functions: [builtin:math]\n", r"has a 'reward' section but no reward.judge mapping"),
    ("- model: j\n", r"--judge .*judge.yaml: top level must be a reward.judge section"),
])
def test_judge_file_errors_name_the_file_and_the_key(tmp_path, text, message):
    from rlhf_ray.rewards.judge_engine import load_judge_config

    with pytest.raises(ConfigError, match=message):
        load_judge_config(judge_file(tmp_path, text))


def test_server_cli_refuses_a_bad_judge_file_before_loading_anything(tmp_path, capsys):
    from rlhf_ray.rewards.server import main

    for argv, message in [
        (["--judge", str(tmp_path / "missing.yaml")], f"--judge: {tmp_path / 'missing.yaml'} does not exist"),
        (["--judge", str(judge_file(tmp_path, "model: j\nscore_patern: x\n"))],
         "unknown config key 'reward.judge.score_patern'. Did you mean 'score_pattern'?"),
        (["--judge", "j.yaml", "--reward", "builtin:math"], "not allowed with argument"),
    ]:
        with pytest.raises(SystemExit) as info:
            main([*argv, "--port", "0"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err, err


class BlockingEngine:
    """Generates once ``release`` is set (a batch that holds the judge), or raises ``fail``."""

    def __init__(self, fail=None):
        self.release, self.started, self.fail = threading.Event(), threading.Event(), fail

    def generate(self, prompt_ids, spec):
        self.started.set()
        if self.fail is not None:
            raise self.fail
        assert self.release.wait(10)
        return SimpleNamespace(prompt_index=np.arange(len(prompt_ids)), texts=["Score: 10"] * len(prompt_ids))


def engine_reward(engine, lock_timeout_s=5.0, max_model_len=64):
    from rlhf_ray.config.job_sections import JudgeConfig
    from rlhf_ray.engines.rollout_engine import SamplingSpec
    from rlhf_ray.rewards.judge_engine import JudgeEngineReward

    source = JudgeEngineReward(JudgeConfig(model="j", template="{response}", max_new_tokens=4), lock_timeout_s)
    # what start() sets up, with the engine and tokenizer given (their lock, lengths and errors are under test)
    source.engine, source.tokenizer, source.max_model_len = engine, CharTokenizer(), max_model_len
    source.sampling = SamplingSpec(n=1, temperature=0.0, max_tokens=4)
    return source


def test_engine_reward_takes_one_batch_at_a_time_and_a_waiting_one_gives_up_named():
    engine = BlockingEngine()
    source = engine_reward(engine, lock_timeout_s=0.2)
    first: list = []
    holder = threading.Thread(target=lambda: first.append(source.score(["p"], ["r"], {})))
    holder.start()
    assert engine.started.wait(10)
    with pytest.raises(RewardError, match=r"judge: the engine was busy with another batch for 0.2 s"):
        source.score(["p"], ["r"], {})
    engine.release.set()
    holder.join(10)
    assert first == [[1.0]]  # Score: 10 on the default 1..10 scale, weight 1
    assert source.score(["p"], ["r"], {}) == [1.0]  # the lock was released


def test_engine_reward_names_a_prompt_too_long_and_a_failed_generation_without_the_samples():
    source = engine_reward(BlockingEngine(fail=ValueError("bad prompt 'secret'")), max_model_len=10)
    # CharTokenizer: one token per character; sample 1 has 7 + max_new_tokens 4 > 10
    with pytest.raises(RewardError, match=r"the judge prompt of sample 1 is 7 tokens; with max_new_tokens 4 it "
                                          r"does not fit the judge's 10"):
        source.score(["p", "p"], ["ok", "toolong"], {})
    with pytest.raises(RewardError, match="secret") as info:
        source.score(["p"], ["ok"], {})
    assert info.value.public == "judge: generation failed on a batch of 1 samples (ValueError; see the server's log)"
