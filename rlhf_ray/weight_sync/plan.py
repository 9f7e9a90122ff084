"""The order and bucketing of one weight sync, and the one bucket builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")

SyncTensor = tuple[str, tuple[int, ...], str]
"""(hf_name, shape, dtype name) of one tensor in the plan."""


def numel(shape: Iterable[int]) -> int:
    """Elements of a tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    return n


def bucketize(items: Iterable[T], nbytes: Callable[[T], int], bucket_bytes: int) -> Iterator[list[T]]:
    """Consecutive groups of ``items`` of at most ``bucket_bytes`` (a larger single item is its own group)."""
    group: list[T] = []
    size = 0
    for item in items:
        n = nbytes(item)
        if group and size + n > bucket_bytes:
            yield group
            group, size = [], 0
        group.append(item)
        size += n
    if group:
        yield group


def tensor_bytes(t: SyncTensor) -> int:
    """Bytes of one plan tensor."""
    return numel(t[1]) * getattr(torch, t[2]).itemsize


@dataclass
class SyncPlan:
    """The order and bucketing of one weight sync, agreed by sender and receivers before the first sync.

    Each bucket is broadcast as one flat buffer per dtype, so a sync costs ``len(buckets)`` (x dtypes)
    collectives rather than one per tensor.
    """

    buckets: list[list[SyncTensor]]

    @staticmethod
    def build(metadata: list[SyncTensor], bucket_bytes: int) -> "SyncPlan":
        tensors = [(name, tuple(shape), dtype) for name, shape, dtype in metadata]
        return SyncPlan(list(bucketize(tensors, tensor_bytes, bucket_bytes)))

    @property
    def num_tensors(self) -> int:
        return sum(len(b) for b in self.buckets)

    @property
    def num_bytes(self) -> int:
        return sum(tensor_bytes(t) for b in self.buckets for t in b)
