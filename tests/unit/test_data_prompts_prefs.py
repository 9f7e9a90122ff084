"""RL prompts (ids + row fields for rewards) and preference data (pairs for RM / DPO, unpaired for
KTO): row shapes, bad rows with their location, and the length rules with their counts."""

import re

import pytest

from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.preference import tokenize_pairs, tokenize_unpaired
from rlhf_ray.data.prompts import tokenize_prompts
from rlhf_ray.data.sft import IGNORE_INDEX
from rlhf_ray.data.sources import RowSet, load_rows
from rlhf_ray.models.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def rowset(*rows, name="d.jsonl"):
    return RowSet(list(rows), [f"{name}:{i + 1}" for i in range(len(rows))], name)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def gen_prompt(tok, msgs):
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def user(text):
    return [{"role": "user", "content": text}]


# ---- prompts ------------------------------------------------------------------------------------

def test_prompts_keep_ids_text_and_every_other_field(tok):
    out = tokenize_prompts(rowset({"prompt": "What is 2 + 3?", "answer": "5", "level": 1}), tok, DataConfig())
    p = out.prompts[0]
    assert p.prompt_text == gen_prompt(tok, user("What is 2 + 3?"))
    assert p.prompt_ids == ids(tok, p.prompt_text)
    assert p.prompt == "What is 2 + 3?" and p.fields == {"answer": "5", "level": 1}
    assert p.location == "d.jsonl:1" and out.counts() == {"prompts": 1, "dropped": 0, "skipped": 0,
                                                          "skipped_at_load": 0}


def test_answer_field_reaches_the_rewards_as_answer(tok):
    out = tokenize_prompts(rowset({"prompt": "What is 2 + 3?", "solution": "5"}), tok,
                           DataConfig(answer_field="solution"))
    assert out.prompts[0].fields == {"solution": "5", "answer": "5"}


def test_prompt_from_messages_leaves_out_a_trailing_assistant_turn(tok):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ref"}]
    p = tokenize_prompts(rowset({"messages": msgs, "answer": "x"}), tok, DataConfig(system_prompt="S")).prompts[0]
    assert p.prompt_text == gen_prompt(tok, [{"role": "system", "content": "S"}] + msgs[:1])
    assert p.prompt == msgs and p.fields == {"answer": "x"}


def test_prompt_raw_mode(tok):
    p = tokenize_prompts(rowset({"prompt": "3+4="}), tok, DataConfig(apply_chat_template=False)).prompts[0]
    assert p.prompt_ids == ids(tok, "3+4=") and p.prompt_text == "3+4="


def test_overlength_prompts_are_dropped_never_cut(tok):
    rows = rowset({"prompt": "a"}, {"prompt": "x" * 30})  # 20 and 49 prompt tokens
    for policy in ("drop", "truncate"):
        out = tokenize_prompts(rows, tok, DataConfig(max_prompt_length=32, overlength=policy))
        assert len(out) == 1 and out.dropped == 1 and out.prompts[0].prompt == "a"
    with pytest.raises(DataError, match=r"d.jsonl:2: prompt of 49 tokens is over data.max_prompt_length=32"):
        tokenize_prompts(rows, tok, DataConfig(max_prompt_length=32, overlength="error"))


def test_prompt_missing_field(tok):
    with pytest.raises(DataError, match=re.escape("d.jsonl:1: missing field 'prompt' (or 'messages' for "
                                                  "conversations); the row has keys ['answer']")):
        tokenize_prompts(rowset({"answer": "1"}), tok, DataConfig())
    with pytest.raises(DataError, match=r"no prompt examples left .* skipped 1"):
        tokenize_prompts(rowset({"answer": "1"}), tok, DataConfig(on_bad_row="skip"))


def test_demo_rl_prompts_carry_the_answer(tok):
    out = tokenize_prompts(load_rows(DataConfig(path="demo:arithmetic_rl", demo_size=20)), tok, DataConfig())
    assert len(out) == 20 and all(p.fields["answer"] for p in out.prompts)


# ---- pairs --------------------------------------------------------------------------------------

def test_string_pair(tok):
    ex = tokenize_pairs(rowset({"prompt": "q", "chosen": "good", "rejected": "bad"}), tok, DataConfig()).examples[0]
    eos = tok.eos_token_id
    prompt_ids = ids(tok, gen_prompt(tok, user("q")))
    assert ex["prompt_ids"] == prompt_ids
    assert ex["chosen_ids"] == ids(tok, "good") + [eos] and ex["rejected_ids"] == ids(tok, "bad") + [eos]
    assert ex["chosen"] == {"input_ids": prompt_ids + ex["chosen_ids"],
                            "labels": [IGNORE_INDEX] * len(prompt_ids) + ex["chosen_ids"]}
    assert ex["rejected"]["input_ids"] == prompt_ids + ex["rejected_ids"]
    assert ex["location"] == "d.jsonl:1"


def test_conversational_pairs_explicit_and_implicit_prompt(tok):
    eos = tok.eos_token_id
    explicit = {"prompt": user("q"), "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}]}
    implicit = {"chosen": user("q") + [{"role": "assistant", "content": "good"}],
                "rejected": user("q") + [{"role": "assistant", "content": "bad"}]}
    a, b = tokenize_pairs(rowset(explicit, implicit), tok, DataConfig()).examples
    for ex in (a, b):
        assert ex["prompt_ids"] == ids(tok, gen_prompt(tok, user("q")))
        assert ex["chosen_ids"] == ids(tok, "good") + [eos] and ex["rejected_ids"] == ids(tok, "bad") + [eos]
    diverging = {"chosen": user("q") + [{"role": "assistant", "content": "good"}],
                 "rejected": user("other") + [{"role": "assistant", "content": "bad"}]}
    with pytest.raises(DataError, match=r"d.jsonl:1: without a 'prompt' field, 'chosen', 'rejected' must be"):
        tokenize_pairs(rowset(diverging), tok, DataConfig())


def test_pair_missing_and_identical(tok):
    with pytest.raises(DataError, match=re.escape("d.jsonl:2: missing field 'rejected'; the row has keys "
                                                  "['chosen', 'prompt']")):
        tokenize_pairs(rowset({"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}),
                       tok, DataConfig())
    same = rowset({"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "a"})
    with pytest.raises(DataError, match=r"d.jsonl:2: 'chosen' and 'rejected' are identical"):
        tokenize_pairs(same, tok, DataConfig())
    out = tokenize_pairs(same, tok, DataConfig(on_bad_row="skip"))
    assert len(out) == 1 and out.skipped == 1


def test_pair_lengths(tok):
    # Prompt "q" = 20 tokens; "abcdefXgood" / "abcdefYbad" + eos = 12 / 11 tokens.
    rows = rowset({"prompt": "q", "chosen": "abcdefXgood", "rejected": "abcdefYbad"},
                  {"prompt": "q", "chosen": "abcdefghijX", "rejected": "abcdefghijY"},
                  {"prompt": "x" * 30, "chosen": "a", "rejected": "b"},  # 49-token prompt
                  {"prompt": "q", "chosen": "a", "rejected": "b"})  # 22 tokens: fits
    out = tokenize_pairs(rows, tok, DataConfig(max_length=27, max_prompt_length=40, overlength="truncate"))
    # Row 1: 7 completion tokens of room keep "abcdefX" vs "abcdefY". Row 2: both cut to "abcdefg": identical.
    assert out.counts() == {"examples": 2, "truncated": 1, "dropped": 0, "dropped_prompt_too_long": 1,
                            "skipped": 0, "skipped_at_load": 0, "dropped_identical_after_truncation": 1}
    ex = out.examples[0]
    assert ex["chosen_ids"] == ids(tok, "abcdefX") and ex["rejected_ids"] == ids(tok, "abcdefY")
    assert len(ex["chosen"]["input_ids"]) == 27
    assert [e["location"] for e in out.examples] == ["d.jsonl:1", "d.jsonl:4"]
    out = tokenize_pairs(rows, tok, DataConfig(max_length=27, max_prompt_length=40, overlength="drop"))
    assert out.dropped == 3 and [e["location"] for e in out.examples] == ["d.jsonl:4"]
    with pytest.raises(DataError, match=r"d.jsonl:1: prompt of 20 tokens .* \+ longest completion of 12 = 32 tokens"):
        tokenize_pairs(rows, tok, DataConfig(max_length=27, overlength="error"))


def test_demo_preferences(tok):
    out = tokenize_pairs(load_rows(DataConfig(path="demo:preferences", demo_size=50)), tok, DataConfig())
    assert len(out) == 50 and all(e["chosen_ids"] != e["rejected_ids"] for e in out.examples)


# ---- unpaired (KTO) -----------------------------------------------------------------------------

def test_unpaired(tok):
    rows = rowset({"prompt": "q", "completion": "yes", "label": True},
                  {"prompt": "q", "completion": [{"role": "assistant", "content": "no"}], "label": 0})
    out = tokenize_unpaired(rows, tok, DataConfig())
    a, b = out.examples
    prompt_ids = ids(tok, gen_prompt(tok, user("q")))
    assert a["desirable"] is True and b["desirable"] is False
    assert a["completion_ids"] == ids(tok, "yes") + [tok.eos_token_id]
    assert b["input_ids"] == prompt_ids + ids(tok, "no") + [tok.eos_token_id]
    assert b["labels"] == [IGNORE_INDEX] * len(prompt_ids) + b["completion_ids"]
    assert out.counts()["desirable"] == 1 and out.counts()["undesirable"] == 1
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'label' must be true/false \(or 1/0\), got 'yes'"):
        tokenize_unpaired(rowset({"prompt": "q", "completion": "a", "label": "yes"}), tok, DataConfig())
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'ok'"):
        tokenize_unpaired(rowset({"prompt": "q", "completion": "a", "label": True}), tok, DataConfig(),
                          label_field="ok")


def test_demo_kto(tok):
    out = tokenize_unpaired(load_rows(DataConfig(path="demo:kto", demo_size=40)), tok, DataConfig())
    c = out.counts()
    assert c["examples"] == 40 and c["desirable"] + c["undesirable"] == 40 and c["desirable"] > 0
