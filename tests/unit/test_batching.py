"""Padding, packing (every token once, positions restart, per-example attention), the seeded epoch
order with its drop_last report, and the split of a global batch into each rank's micro-batches."""

import pytest
import torch

from rlhf_ray.data.batching import (iter_epoch_batches, pack_examples, packed_attention_mask, pad_batch,
                                    shard_for_rank)

NEG = torch.finfo(torch.float32).min


def ex(n, start=0, prompt=1):
    """An example of n tokens start..start+n-1 whose first ``prompt`` tokens are masked."""
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "location": f"f:{start}"}


def test_pad_batch_right_pads():
    b = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert "segment_ids" not in b and b["input_ids"].dtype == torch.long
    assert "labels" not in pad_batch([{"input_ids": [1]}], pad_id=0)  # e.g. reward-model inputs


def test_pack_first_fit_keeps_every_token_once():
    lengths = [5, 4, 3, 2, 6]
    examples, start = [], 0
    for n in lengths:
        examples.append(ex(n, start, prompt=2))
        start += 100
    rows = pack_examples(examples, max_length=8)
    # First fit: 5 -> row 0 (3 left), 4 -> row 1 (4 left), 3 -> row 0 (full), 2 -> row 1, 6 -> new row 2.
    assert [r["seq_lens"] for r in rows] == [[5, 3], [4, 2], [6]]
    assert [r["locations"] for r in rows] == [["f:0", "f:200"], ["f:100", "f:300"], ["f:400"]]
    all_tokens = sorted(t for r in rows for t in r["input_ids"])
    assert all_tokens == sorted(t for e in examples for t in e["input_ids"])
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[1]["position_ids"] == [0, 1, 2, 3, 0, 1]


def test_pack_labels_match_the_unpacked_loss():
    a = {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}  # labels on every token, even the first
    b = {"input_ids": [4, 5], "labels": [4, 5]}
    (row,) = pack_examples([a, b], max_length=8)
    # Each example's first label becomes -100: unpacked, position 0 is never predicted; packed, it would
    # be predicted from the previous example.
    assert row["labels"] == [-100, 2, 3, -100, 5]
    with pytest.raises(ValueError, match=r"example 0 has 3 tokens; each must have 1..max_length=2"):
        pack_examples([a], max_length=2)


def test_pad_packed_rows_gives_segments_and_restarting_positions():
    rows = pack_examples([ex(3), ex(2, 10), ex(4, 20)], max_length=5)
    assert [r["seq_lens"] for r in rows] == [[3, 2], [4]]
    b = pad_batch(rows, pad_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]  # padding continues counting
    assert b["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]  # padding is its own segment
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_packed_attention_mask_is_block_diagonal_causal():
    m = packed_attention_mask(torch.tensor([[0, 0, 1, 1, 2]]))
    assert m.shape == (1, 1, 5, 5)
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 1]]
    assert m[0, 0, 0, 1] == NEG


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_forward_equals_separate_forwards(attn):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=attn)
    model = AutoModelForCausalLM.from_config(config).eval()
    examples = [ex(7, 1), ex(5, 20), ex(9, 40)]
    rows = pack_examples(examples, max_length=16)
    assert [r["seq_lens"] for r in rows] == [[7, 5], [9]]
    b = pad_batch(rows, pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False,
                       attention_mask=packed_attention_mask(b["segment_ids"])).logits
        leaky = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False,
                      attention_mask=b["attention_mask"]).logits
        alone = [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples]
    torch.testing.assert_close(packed[0, :7], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, 7:12], alone[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1, :9], alone[2], atol=1e-5, rtol=0)
    # The documented caveat: with the plain 2D mask the second example sees the first.
    assert (leaky[0, 7:12] - alone[1]).abs().max() > 1e-3


def test_epoch_order_is_seeded_per_epoch():
    e0 = iter_epoch_batches(10, 4, seed=7, epoch=0, shuffle=True)
    assert list(e0) == list(iter_epoch_batches(10, 4, seed=7, epoch=0, shuffle=True))  # a resumed run agrees
    e1 = iter_epoch_batches(10, 4, seed=7, epoch=1, shuffle=True)
    other_seed = iter_epoch_batches(10, 4, seed=8, epoch=0, shuffle=True)
    assert list(e1) != list(e0) and list(other_seed) != list(e0)
    for e in (e0, e1):
        # 10 // 4 = 2 full batches; 10 % 4 = 2 examples left out, reported, never repeated.
        assert len(e) == 2 and all(len(b) == 4 for b in e) and len(e.dropped) == 2
        assert sorted([i for b in e for i in b] + e.dropped) == list(range(10))


def test_epoch_order_without_shuffle_and_without_drop_last():
    assert list(iter_epoch_batches(7, 3, seed=0, epoch=5, shuffle=False)) == [[0, 1, 2], [3, 4, 5]]
    assert iter_epoch_batches(7, 3, seed=0, epoch=5, shuffle=False).dropped == [6]
    keep = iter_epoch_batches(7, 3, seed=0, epoch=0, shuffle=False, drop_last=False)
    assert list(keep) == [[0, 1, 2], [3, 4, 5], [6]] and keep.dropped == []


def test_shard_for_rank():
    batch = [10, 11, 12, 13, 14, 15, 16, 17]
    # 2 ranks x micro-batches of 2: each rank takes a contiguous half, in 2 accumulation steps.
    assert shard_for_rank(batch, 2, 2) == [[[10, 11], [12, 13]], [[14, 15], [16, 17]]]
    assert shard_for_rank(batch, 2, 2, rank=1) == [[14, 15], [16, 17]]
    assert shard_for_rank(batch, 1, 8) == [[batch]]
    with pytest.raises(ValueError, match=r"must be a multiple of 6"):
        shard_for_rank(batch, 3, 2)
