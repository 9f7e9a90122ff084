"""SFT tokenization: the loss mask against the tokenizer's own rendering, conversations, raw text,
missing / mistyped fields with their location, and the over-length policies with their counts."""

import re

import pytest

from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.sft import IGNORE_INDEX, tokenize_sft
from rlhf_ray.data.sources import RowSet, load_rows
from rlhf_ray.models.tiny import build_tokenizer

PROMPT = "What is 1 + 1?"
RESPONSE = "1 + 1 = 2. The answer is 2."


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def rowset(*rows, name="train.jsonl"):
    return RowSet(list(rows), [f"{name}:{i + 1}" for i in range(len(rows))], name)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trained(ex):
    """Label tokens that carry loss."""
    return [t for t in ex["labels"] if t != IGNORE_INDEX]


def test_prompt_response_masks_exactly_the_prompt(tok):
    ex = tokenize_sft(rowset({"prompt": PROMPT, "response": RESPONSE}), tok, DataConfig()).examples[0]
    prompt_text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                          add_generation_prompt=True)
    prompt_ids = ids(tok, prompt_text)
    # <|im_start|> + "user\n" (5) + 14 chars + <|im_end|> + "\n" + <|im_start|> + "assistant\n" (10) = 33
    assert len(prompt_ids) == 33
    assert ex["input_ids"] == prompt_ids + ids(tok, RESPONSE) + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * 33 + ids(tok, RESPONSE) + [tok.eos_token_id]
    # The whole example is the template's rendering of the finished conversation (minus its trailing "\n").
    full = tok.apply_chat_template([{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}],
                                   tokenize=False)
    assert tok.decode(ex["input_ids"]) == full.removesuffix("\n")
    assert ex["location"] == "train.jsonl:1"


def test_changing_the_prompt_moves_ids_not_the_trained_tokens(tok):
    out = tokenize_sft(rowset({"prompt": PROMPT, "response": RESPONSE},
                              {"prompt": "What is 10 + 10?", "response": RESPONSE}), tok, DataConfig())
    a, b = out.examples
    assert a["input_ids"] != b["input_ids"]
    assert trained(a) == trained(b) == ids(tok, RESPONSE) + [tok.eos_token_id]
    # The prompt grew by 2 characters ("10" vs "1", twice): 2 more masked positions, same response positions.
    assert b["labels"].count(IGNORE_INDEX) == a["labels"].count(IGNORE_INDEX) + 2
    n = len(trained(a))
    assert a["labels"][-n:] == b["labels"][-n:] and IGNORE_INDEX not in a["labels"][-n:]


def test_system_prompt_is_in_the_input_and_masked(tok):
    ex = tokenize_sft(rowset({"prompt": PROMPT, "response": RESPONSE}), tok,
                      DataConfig(system_prompt="Be brief.")).examples[0]
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert trained(ex) == ids(tok, RESPONSE) + [tok.eos_token_id]


def test_messages_train_every_assistant_turn(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "x"},
            {"role": "assistant", "content": "zz"}]
    ex = tokenize_sft(rowset({"messages": msgs}), tok, DataConfig()).examples[0]
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    eos = tok.eos_token_id
    assert trained(ex) == ids(tok, "yo") + [eos] + ids(tok, "zz") + [eos]
    # Each assistant span starts right after the rendering of the conversation so far + generation prompt.
    for k, content in [(2, "yo"), (4, "zz")]:
        start = len(ids(tok, tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)))
        n = len(content) + 1
        assert ex["labels"][start:start + n] == ex["input_ids"][start:start + n]
        assert ex["labels"][start - 1] == IGNORE_INDEX and ex["labels"][start + n] == IGNORE_INDEX


def test_messages_and_prompt_response_train_the_same_tokens(tok):
    conv = tokenize_sft(rowset({"messages": [{"role": "user", "content": PROMPT},
                                             {"role": "assistant", "content": RESPONSE}]}), tok, DataConfig())
    pr = tokenize_sft(rowset({"prompt": PROMPT, "response": RESPONSE}), tok, DataConfig())
    # The conversation keeps the template's trailing "\n" after <|im_end|> as untrained input.
    assert conv.examples[0]["input_ids"][:-1] == pr.examples[0]["input_ids"]
    assert conv.examples[0]["labels"][:-1] == pr.examples[0]["labels"]
    assert conv.examples[0]["labels"][-1] == IGNORE_INDEX


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    bad = build_tokenizer()
    # Earlier assistant turns are rendered empty (as reasoning templates do with their thoughts).
    bad.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n<|im_end|>\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(DataError, match=r"train.jsonl:1: the chat template is not prefix-consistent"):
        tokenize_sft(rowset({"messages": msgs}), bad, DataConfig())


def test_raw_text_without_chat_template(tok):
    ex = tokenize_sft(rowset({"prompt": "2+2=", "response": "4"}), tok,
                      DataConfig(apply_chat_template=False)).examples[0]
    assert ex["input_ids"] == ids(tok, "2+2=") + ids(tok, "4") + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * 4 + ids(tok, "4") + [tok.eos_token_id]
    with pytest.raises(DataError, match=r"train.jsonl:1: has a 'messages' conversation but data.apply_chat_template"):
        tokenize_sft(rowset({"messages": [{"role": "user", "content": "a"}]}), tok,
                     DataConfig(apply_chat_template=False))


def test_tokenizer_without_chat_template(tok):
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match=r"no chat template; set data.apply_chat_template=false"):
        tokenize_sft(rowset({"prompt": "a", "response": "b"}), plain, DataConfig())


def test_missing_field_names_field_location_and_keys(tok):
    rows = rowset({"prompt": "a", "response": "b"}, {"prompt": "a", "answer": "b"})
    with pytest.raises(DataError, match=re.escape("train.jsonl:2: missing field 'response'; the row has keys "
                                                  "['answer', 'prompt']")):
        tokenize_sft(rows, tok, DataConfig())
    with pytest.raises(DataError, match=r"train.jsonl:1: missing field 'question' \(or 'messages'"):
        tokenize_sft(rows, tok, DataConfig(prompt_field="question"))
    out = tokenize_sft(rows, tok, DataConfig(on_bad_row="skip"))
    assert len(out) == 1 and out.skipped == 1 and out.skip_reasons[0].startswith("train.jsonl:2:")


def test_mistyped_fields_are_bad_rows(tok):
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'response' must be a string, got int"):
        tokenize_sft(rowset({"prompt": "a", "response": 3}), tok, DataConfig())
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'messages' message 0 must be"):
        tokenize_sft(rowset({"messages": [{"role": "user", "content": [{"type": "text"}]}]}), tok, DataConfig())
    with pytest.raises(DataError, match=r"train.jsonl:1: the conversation has no assistant message"):
        tokenize_sft(rowset({"messages": [{"role": "user", "content": "a"}]}), tok, DataConfig())


# Prompt of "What is 1 + 1?" = 33 tokens, response 27 chars + eos = 28: 61 tokens in all.
LONG = {"prompt": PROMPT, "response": RESPONSE}
SHORT = {"prompt": "a", "response": "b"}  # 20-token prompt + 2 = 22 tokens
TOO_LONG_PROMPT = {"prompt": "x" * 40, "response": "b"}  # 59-token prompt


def test_overlength_truncate_counts(tok):
    out = tokenize_sft(rowset(LONG, SHORT, TOO_LONG_PROMPT), tok, DataConfig(max_length=40, overlength="truncate"))
    assert out.counts() == {"examples": 2, "truncated": 1, "dropped": 0, "dropped_prompt_too_long": 1,
                            "skipped": 0, "skipped_at_load": 0}
    cut = out.examples[0]
    assert len(cut["input_ids"]) == 40 and len(cut["labels"]) == 40
    # The response is cut from the right: its first 40 - 33 = 7 tokens stay, the eos goes.
    assert trained(cut) == ids(tok, RESPONSE)[:7]
    assert [e["location"] for e in out.examples] == ["train.jsonl:1", "train.jsonl:2"]


def test_prompt_that_fills_max_length_exactly_is_dropped(tok):
    # 33 prompt tokens and max_length 33: no response token would be left to train on.
    out = tokenize_sft(rowset(LONG, SHORT), tok, DataConfig(max_length=33))
    assert out.dropped_prompt_too_long == 1 and len(out) == 1


def test_overlength_drop_and_error(tok):
    out = tokenize_sft(rowset(LONG, SHORT), tok, DataConfig(max_length=40, overlength="drop"))
    assert (len(out), out.dropped, out.truncated) == (1, 1, 0)
    with pytest.raises(DataError, match=r"train.jsonl:1: 61 tokens \(prompt 33, response 28\) is over "
                                        r"data.max_length=40"):
        tokenize_sft(rowset(LONG, SHORT), tok, DataConfig(max_length=40, overlength="error"))


def test_everything_dropped_is_an_error(tok):
    with pytest.raises(DataError, match=r"no SFT examples left from train.jsonl: 1 rows, dropped 1"):
        tokenize_sft(rowset(LONG), tok, DataConfig(max_length=40, overlength="drop"))
    with pytest.raises(DataError, match=r"no SFT examples left .*skipped 1 \(first skipped: train.jsonl:1: missing"):
        tokenize_sft(rowset({"x": 1}), tok, DataConfig(on_bad_row="skip"))


def test_demo_set_tokenizes_within_demo_length(tok):
    # The shipped demo config uses max_length 96: no demo example may be cut there.
    out = tokenize_sft(load_rows(DataConfig(demo_size=300)), tok, DataConfig(max_length=96))
    assert len(out) == 300 and out.truncated == 0 and max(len(e["input_ids"]) for e in out.examples) <= 96
