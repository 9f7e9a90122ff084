"""From tokenized examples to tensors, and from a data set to each step's and each rank's indices.

- ``pad_batch``: right-padded ``input_ids`` / ``labels`` / ``attention_mask`` / ``position_ids``.
- ``pack_examples``: several examples per row of ``max_length`` tokens (greedy first-fit), with
  ``position_ids`` restarting at 0 for each example, and ``packed_attention_mask`` for the 4D
  block-diagonal causal mask that keeps attention inside each example on the eager / sdpa path.
- ``iter_epoch_batches``: each epoch's global batches of indices, seeded by (seed, epoch) so that a
  resumed run sees the same order; ``shard_for_rank``: a global batch -> each rank's micro-batches.

Packing: restarting ``position_ids`` alone does not stop attention across examples in a row. With
flash-attention varlen, or transformers' own packed-sequence detection (transformers 5 reads the restarts
from ``position_ids`` only when neither an ``attention_mask`` nor a KV cache is passed, i.e.
``attention_mask=None, use_cache=False``), each example attends only to itself. With eager or sdpa
attention and the 2D ``attention_mask`` that ``pad_batch`` returns, every token would also attend to the
earlier examples of its row, so the learners' forward (``objectives.common.causal_lm_logits``) passes
``packed_attention_mask(batch["segment_ids"])`` (4D) for packed rows. The loss itself is not
contaminated at the boundaries: the first token of each packed example has label -100, as nothing
inside that example predicts it (the same loss as unpacked, where position 0 is never predicted).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt, template glue, padding): PyTorch's cross-entropy default. The one
definition: data pipelines, objectives and online DPO import it."""


def pad_batch(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one.

    Each example has ``input_ids`` and optionally ``labels`` and ``position_ids`` (packed rows, with
    ``seq_lens``). Returns ``input_ids`` (B, T) padded with ``pad_id``, ``labels`` (B, T) padded with
    -100 (when the examples have labels), ``attention_mask`` (B, T) 1 on real tokens, and
    ``position_ids`` (B, T): 0..len-1 per example (restarting per packed example), padding continuing
    the count. Packed rows also get ``segment_ids`` (B, T): 0, 1, ... per packed example and one more
    id for the padding, the input of ``packed_attention_mask``.
    """
    if not examples:
        raise ValueError("pad_batch: no examples")
    T = max(len(ex["input_ids"]) for ex in examples)
    B = len(examples)
    has_labels = "labels" in examples[0]
    packed = any("seq_lens" in ex for ex in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    # Padding positions continue counting (never restart at 0), so they never look like a new sequence.
    position_ids = torch.arange(T, dtype=torch.long).repeat(B, 1)
    segment_ids = torch.zeros((B, T), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[b, :n] = 1
        if has_labels:
            if len(ex["labels"]) != n:
                raise ValueError(f"pad_batch: example {b} has {n} input_ids but {len(ex['labels'])} labels")
            labels[b, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        if "position_ids" in ex:
            pos = torch.as_tensor(ex["position_ids"], dtype=torch.long)
            position_ids[b, :n] = pos
            position_ids[b, n:] = (pos[-1] + 1 + torch.arange(T - n)) if n else torch.arange(T)
        if packed:
            lens = ex.get("seq_lens", [n])
            seg = torch.repeat_interleave(torch.arange(len(lens)), torch.as_tensor(lens, dtype=torch.long))
            segment_ids[b, :n] = seg
            segment_ids[b, n:] = len(lens)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if has_labels:
        out["labels"] = labels
    if packed:
        out["segment_ids"] = segment_ids
    return out


def pack_examples(tokenized: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Pack examples into rows of at most ``max_length`` tokens, greedy first-fit in the given order.

    Each example goes into the first row with room for it (a new row when none has). A packed row
    has ``input_ids``, ``labels`` (concatenated, with each example's first label set to -100: see the
    module docstring), ``position_ids`` (0..len-1 per example), ``seq_lens`` and ``locations``.
    Every token appears exactly once. Raises ``ValueError`` for an example longer than ``max_length``.
    """
    n = len(tokenized)
    if n == 0:
        return []
    for i, ex in enumerate(tokenized):
        if not 0 < len(ex["input_ids"]) <= max_length:
            raise ValueError(f"pack_examples: example {i} has {len(ex['input_ids'])} tokens; "
                             f"each must have 1..max_length={max_length}")
    # First-fit in O(n log n): a max segment tree over the free space of n candidate rows (an unused
    # row has max_length free), descending to the leftmost row that still has room.
    size = 1
    while size < n:
        size *= 2
    free = [0] * (2 * size)
    free[size:size + n] = [max_length] * n
    for i in range(size - 1, 0, -1):
        free[i] = max(free[2 * i], free[2 * i + 1])
    bins: list[list[int]] = []
    for i, ex in enumerate(tokenized):
        need = len(ex["input_ids"])
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(bins):
            bins.append([])
        bins[row].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    rows = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        lens: list[int] = []
        for i in members:
            ex = tokenized[i]
            m = len(ex["input_ids"])
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX] + list(ex["labels"][1:])
            pos += range(m)
            lens.append(m)
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "seq_lens": lens,
                     "locations": [tokenized[i].get("location", str(i)) for i in members]})
    log.info("packed %d examples into %d rows of <= %d tokens (%.0f%% filled)", n, len(rows), max_length,
             100.0 * sum(len(r["input_ids"]) for r in rows) / (len(rows) * max_length))
    return rows


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, T, T) from ``segment_ids`` (B, T), for eager / sdpa attention.

    Query i may attend key j iff j <= i and segment_ids[i] == segment_ids[j]. Returned additive
    (0 where allowed, the dtype's minimum elsewhere), the form HF's eager attention adds to the
    scores and sdpa accepts; a 4D mask is passed through by transformers' mask preparation as is.
    Padding forms its own segment, so every query row has at least one allowed key (no NaN).
    """
    B, T = segment_ids.shape
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None]
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class EpochBatches(Sequence[list[int]]):
    """One epoch's global batches of example indices, and the examples ``drop_last`` left out."""

    def __init__(self, batches: list[list[int]], dropped: list[int]) -> None:
        self.batches = batches
        self.dropped = dropped
        """Indices not in any batch this epoch (a different set each epoch when shuffling)."""

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):  # type: ignore[override]
        return self.batches[i]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def iter_epoch_batches(n_examples: int, global_batch_size: int, seed: int, epoch: int, shuffle: bool,
                       drop_last: bool = True) -> EpochBatches:
    """The global batches of ``epoch`` as lists of indices into the data set.

    With ``shuffle`` the order is a permutation drawn from ``(seed, epoch)`` alone, so a run resumed
    at (epoch, batch) sees exactly the batches it would have; without, it is 0..n-1. With
    ``drop_last`` the ``n_examples % global_batch_size`` examples at the end of the order are left
    out (listed in ``.dropped``); without, the last batch is smaller.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if shuffle:
        # SeedSequence mixes both words, so neighbouring (seed, epoch) pairs give unrelated orders.
        order = np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(n_examples).tolist()
    else:
        order = list(range(n_examples))
    n_full = n_examples // global_batch_size
    batches = [order[k * global_batch_size:(k + 1) * global_batch_size] for k in range(n_full)]
    rest = order[n_full * global_batch_size:]
    if rest and not drop_last:
        batches.append(rest)
        rest = []
    return EpochBatches(batches, rest)


def shard_for_rank(batch_indices: Sequence[int], world_size: int, micro_batch_size: int,
                   rank: Optional[int] = None) -> list:
    """Split one global batch into each rank's micro-batches.

    Rank r takes the r-th contiguous share of ``len(batch) / world_size`` indices, cut into
    micro-batches of ``micro_batch_size`` (so each rank runs ``len / (world x micro)`` accumulation
    steps). Returns ``[rank][micro_batch] -> indices``, or only ``rank``'s list when given. The
    batch must divide evenly: every rank has to run the same number of steps.
    """
    n = len(batch_indices)
    per_pass = world_size * micro_batch_size
    if world_size < 1 or micro_batch_size < 1 or n % per_pass:
        raise ValueError(f"a global batch of {n} does not split into {world_size} ranks x micro-batches of "
                         f"{micro_batch_size}; it must be a multiple of {per_pass}")
    share = n // world_size
    shards = [[list(batch_indices[r * share + s:r * share + s + micro_batch_size])
               for s in range(0, share, micro_batch_size)] for r in range(world_size)]
    return shards if rank is None else shards[rank]
