"""pass@k and maj@k against hand-computed values, and one evaluation's summary of a known set of samples."""

import itertools
import math

import pytest

from rlhf_ray.evaluation.metrics import maj_at_k, majority_correct, pass_at_k
from rlhf_ray.evaluation.summary import EvalSettings, SampleSet, format_table, summarize, vote_key

TOL = 1e-12


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 2 / 5),        # 1 - C(3,1)/C(5,1) = 1 - 3/5: pass@1 is the fraction correct
    (5, 2, 2, 7 / 10),       # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 2, 3, 9 / 10),       # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (5, 2, 4, 1.0),          # n - c = 3 < k = 4: every 4 of the 5 include a correct one
    (5, 0, 3, 0.0),          # no correct sample: C(5,3)/C(5,3) = 1
    (4, 4, 1, 1.0),          # all correct
    (20, 5, 4, 232 / 323),   # 1 - C(15,4)/C(20,4) = 1 - 1365/4845 = 1 - 91/323
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=TOL)


def test_pass_at_k_is_the_fraction_of_k_subsets_holding_a_correct_sample():
    # The definition the estimator is unbiased for, counted by brute force over every k-subset of 6 samples.
    correct = [1, 0, 0, 1, 0, 0]
    for k in range(1, 7):
        subsets = list(itertools.combinations(correct, k))
        want = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(6, 2, k) == pytest.approx(want, abs=TOL), k


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(2000, 1000) ~ 2e600 is no float; with c = 1, C(n-1, k)/C(n, k) = (n-k)/n, so pass@k = k/n = 1000/2000.
    with pytest.raises(OverflowError):
        float(math.comb(2000, 1000))
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5, abs=1e-9)
    # Exact integer arithmetic as the reference: 1 - C(990,100)/C(1000,100).
    exact = 1 - math.comb(990, 100) / math.comb(1000, 100)
    assert pass_at_k(1000, 10, 100) == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("n, c, k, what", [(5, 2, 0, "k=0"), (5, 2, 6, "k=6"), (5, 6, 1, "c=6"), (5, -1, 1, "c=-1")])
def test_pass_at_k_refuses_impossible_counts(n, c, k, what):
    with pytest.raises(ValueError, match=what):
        pass_at_k(n, c, k)


def test_maj_at_k_hand_values():
    answers, correct = ["a", "a", "b", None], [True, True, False, False]
    # k=4: one block; votes a:2, b:1 (None abstains) -> a, whose samples are correct -> 1
    assert maj_at_k(answers, correct, 4) == pytest.approx(1.0, abs=TOL)
    # k=2: blocks [a, a] -> a correct (1); [b, None] -> b wrong (0); mean 0.5
    assert maj_at_k(answers, correct, 2) == pytest.approx(0.5, abs=TOL)
    # k=1: a 1, a 1, b 0, None abstains in its block of one (0); mean 2/4
    assert maj_at_k(answers, correct, 1) == pytest.approx(0.5, abs=TOL)
    # k=3: floor(4/3) = 1 block [a, a, b] -> a -> 1; the 4th sample is not used
    assert maj_at_k(answers, correct, 3) == pytest.approx(1.0, abs=TOL)


def test_majority_ties_abstentions_and_mixed_answers():
    # a tie a:1, b:1 is a fair draw: (c(a) + c(b)) / 2 = (1 + 0) / 2
    assert majority_correct(["a", "b"], [True, False]) == pytest.approx(0.5, abs=TOL)
    # a three-way tie with one right answer: 1/3
    assert majority_correct(["a", "b", "c"], [False, True, False]) == pytest.approx(1 / 3, abs=TOL)
    # a wins 2:1 but only one of its two samples is correct (another reward term differed): c(a) = 1/2
    assert majority_correct(["a", "a", "b"], [True, False, False]) == pytest.approx(0.5, abs=TOL)
    # nobody answers: 0
    assert majority_correct([None, None], [False, False]) == 0.0
    # a wrong majority beats a right minority, where pass@3 counts the one right sample
    assert maj_at_k(["x", "x", "y"], [False, False, True], 3) == 0.0
    assert pass_at_k(3, 1, 3) == 1.0


@pytest.mark.parametrize("k, what", [(0, "k=0"), (3, "k=3")])
def test_maj_at_k_refuses_impossible_k(k, what):
    with pytest.raises(ValueError, match=what):
        maj_at_k(["a", "b"], [True, False], k)


def test_vote_keys():
    # math_answer: the final answer builtin:math reads, numbers as exact fractions: 1/2 = 0.5 = \frac{1}{2}
    assert vote_key("so the answer is 1/2.", "math_answer") == vote_key("\\boxed{0.5}", "math_answer") == "1/2"
    assert vote_key("\\boxed{\\frac{1}{2}}", "math_answer") == "1/2"
    assert vote_key("no number here", "math_answer") is None  # abstains
    assert vote_key("  7 \n", "response") == "7"


def _settings(**kw):
    base = dict(n=4, temperature=1.0, top_p=1.0, max_new_tokens=4, ks=(1, 2, 4), correct_threshold=1.0,
                vote_on="math_answer", greedy=False)
    return EvalSettings(**{**base, **kw})


def test_summary_of_known_samples():
    s = SampleSet()
    # Prompt 0 (answer 3): responses 3, 3, 5, 3 with rewards 1, 1, 0, 1.2 (a bonus term above 1 still counts).
    # Prompt 1 (answer 4): responses 5, 5, 4, none with rewards 0, 0, 1, 0. Two batches of 2 and 6 samples.
    s.add([0, 0], ["3", "3"], [1.0, 1.0], [1, 1], ["stop", "stop"], {"reward/math_mean": 1.0})
    s.add([0, 0, 1, 1, 1, 1], ["5", "3", "5", "5", "4", "x"], [0.0, 1.2, 0.0, 0.0, 1.0, 0.0], [1, 1, 1, 1, 1, 2],
          ["stop"] * 5 + ["length"], {"reward/math_mean": 2 / 6})
    out = summarize(s, _settings(), (1, 2, 4))
    # correct: prompt 0 -> 1,1,0,1 (c=3 of 4); prompt 1 -> 0,0,1,0 (c=1 of 4); 4 of 8 overall
    assert out["accuracy"] == pytest.approx(4 / 8, abs=TOL)
    assert out["pass@1"] == pytest.approx((3 / 4 + 1 / 4) / 2, abs=TOL)   # = the fraction correct
    # pass@2: prompt 0 n-c = 1 < 2 -> 1; prompt 1: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2; mean 3/4
    assert out["pass@2"] == pytest.approx(0.75, abs=TOL)
    assert out["pass@4"] == pytest.approx(1.0, abs=TOL)                   # each prompt has a correct sample
    # maj@2 blocks: p0 [3,3] -> 1, [5,3] tie -> (0 + 1)/2; p1 [5,5] -> 0, [4,x] -> 4 (x abstains) -> 1
    # per prompt (1 + 0.5)/2 = 0.75 and (0 + 1)/2 = 0.5; mean 0.625
    assert out["maj@2"] == pytest.approx(0.625, abs=TOL)
    # maj@4: p0 votes 3:3 -> 3, its samples 1,1,1 correct -> 1; p1 5:2, 4:1 -> 5 -> 0; mean 0.5
    assert out["maj@4"] == pytest.approx(0.5, abs=TOL)
    assert out["maj@1"] == pytest.approx(out["pass@1"], abs=TOL)         # a vote of one is that sample
    assert out["reward_mean"] == pytest.approx(4.2 / 8, abs=TOL)
    assert out["response_length_mean"] == pytest.approx(9 / 8, abs=TOL)
    assert out["truncated_fraction"] == pytest.approx(1 / 8, abs=TOL)
    # per-source mean over both batches, weighted by their sizes: (2 x 1 + 6 x 2/6) / 8 = 4/8
    assert out["reward/math_mean"] == pytest.approx(0.5, abs=TOL)
    # eval.correct_threshold decides: at 1.1 only the sample with reward 1.2 is correct, 1 of 8
    assert summarize(s, _settings(correct_threshold=1.1), ())["accuracy"] == pytest.approx(1 / 8, abs=TOL)


def test_format_table_names_every_number():
    doc = {"model": "m", "data": "d", "prompts": 2, "settings": {"n": 4, "temperature": 1.0, "correct_threshold": 1.0,
                                                                  "vote_on": "math_answer"},
           "sampled": {"reward_mean": 0.5, "pass@1": 0.25}, "greedy": {"reward_mean": 1.0}}
    table = format_table(doc)
    lines = table.splitlines()
    assert "2 prompts x 4 samples" in lines[0] and lines[1].split() == ["metric", "sampled", "greedy"]
    assert lines[2].split() == ["reward_mean", "0.5000", "1.0000"] and lines[3].split() == ["pass@1", "0.2500", "-"]
