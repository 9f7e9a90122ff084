"""The built-in verifiable rewards: final-answer extraction, normalisation, and the think-format check."""

import pytest

from rlhf_ray.rewards import BUILTIN_REWARDS
from rlhf_ray.rewards.math_verify import (answers_match, extract_answer, format_think_reward, math_reward,
                                          normalize_answer)


@pytest.mark.parametrize("text, expected", [
    # \boxed wins over everything else, and its braces are matched, not cut at the first "}".
    ("First 3, then 7, so \\boxed{\\frac{1}{2}} and later 9", "\\frac{1}{2}"),
    ("\\boxed{1} no wait \\boxed{ 2 }", "2"),                      # the last box, stripped
    ("Cut off: \\boxed{12", None),                                # an unclosed box is no answer
    # GSM8K: the rest of the line after the last ####.
    ("18 - 3 = 15 eggs, 15 * 2 = 30\n#### 30\nextra", "30"),
    ("#### 1,234", "1,234"),
    # "answer is" / "Answer:": the rest of that sentence; a decimal point is not a sentence end.
    ("So 40 + 2. The answer is 42.", "42"),
    ("The answer is 3.5. Next question: 7", "3.5"),
    ("Answer: -4", "-4"),
    # Otherwise the last number, with its sign, decimals, thousands commas or a slash.
    ("It drops to -3.5", "-3.5"),
    ("Total: 1,234 apples", "1,234"),
    ("half is 1/2", "1/2"),
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("raw, expected", [
    (" 1,234 ", "1234"),        # thousands commas dropped from a number
    ("$42$.", "42"),            # dollar signs and a trailing period go
    ("\\frac{3}{4}", "3/4"),    # LaTeX fraction -> a/b
    ("x = 5", "x=5"),           # spaces go; non-numbers stay strings
    ("B", "b"),                 # letters compare case-insensitively
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("predicted, gold, same", [
    ("1.0", "1", True),            # 1.0 == 1 exactly
    ("1/2", "0.5", True),          # Fraction(1, 2) == Fraction("0.5")
    ("\\frac{1}{2}", 0.5, True),   # gold may be a number from JSON
    ("0.33", "1/3", False),        # exact comparison: 33/100 != 1/3
    ("1,234", 1234, True),
    ("-3.5", "3.5", False),        # the sign counts
    ("42 apples", "42", True),     # against a numeric gold, the first number of a phrase counts
    ("x=5", "x = 5", True),        # non-numeric: normalised string equality
    (None, "1", False),            # nothing extracted never matches
])
def test_answers_match(predicted, gold, same):
    assert answers_match(predicted, gold) is same


def test_math_reward_scores_each_row():
    responses = [
        "2 + 2 = \\boxed{4}",                     # boxed 4 vs 4 -> 1
        "Adding up: #### 1,234",                   # 1,234 vs 1234 -> 1
        "The answer is 42.",                       # 42 vs 41 -> 0
        "I get 0.5",                               # last number 0.5 vs 1/2 -> 1
        "I cannot solve this.",                    # no number -> 0
        "-3.5",                                    # -3.5 vs -3.5 -> 1
    ]
    answers = ["4", "1234", "41", "1/2", "7", "-3.5"]
    assert math_reward(["q"] * 6, responses, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_math_reward_reads_a_gsm8k_style_gold_solution():
    # GSM8K stores the worked solution; its "#### 72" is the gold answer.
    gold = "48 / 2 = 24 clips in May.\n48 + 24 = 72\n#### 72"
    assert math_reward(["q", "q"], ["so \\boxed{72}", "so 24"], answer=[gold, gold]) == [1.0, 0.0]


def test_math_reward_missing_answer_names_the_row():
    with pytest.raises(ValueError, match=r"row 1 has no 'answer'"):
        math_reward(["q", "q"], ["1", "2"], answer=["1", None])


def test_format_think():
    prompts = ["q"] * 6
    responses = [
        "<think>2 + 2 is 4</think> The answer is 4.",   # reasoning then an answer -> 1
        "  <think>\nhmm\n</think>\n\\boxed{4}",          # whitespace around the block is fine -> 1
        "The answer is 4.",                             # no think block -> 0
        "<think>reasoning never closes",                # unclosed -> 0
        "<think>done</think>   ",                       # nothing after the block -> 0
        "<think>a</think> b <think>c</think> d",        # a second block after the answer -> 0
    ]
    assert format_think_reward(prompts, responses) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_format_think_counts_a_think_tag_that_ends_the_prompt():
    # Reasoning-model chat templates end the prompt with "<think>\n"; the response starts inside.
    assert format_think_reward(["user: hi\nassistant: <think>\n"], ["plan</think> hello"]) == [1.0]
    assert format_think_reward(["user: hi\nassistant:"], ["plan</think> hello"]) == [0.0]


def test_builtin_registry():
    assert BUILTIN_REWARDS["math"] is math_reward
    assert BUILTIN_REWARDS["format_think"] is format_think_reward
