"""Roles as the RL loop sees them: one object per model, batch in, tensors / metrics out.

``LearnerRole`` wraps a learner ``WorkerGroup`` (policy, reference, critic or reward model) and hides
the data-parallel plumbing: sequences are dealt to ranks balanced by length, cut into micro-batches,
and the per-rank results put back in batch order. ``RolloutRole`` wraps the vLLM engines: prompts are
split across engines, samples come back as one ``RolloutBatch``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from rlhf_ray.controller.worker_group import WorkerGroup, wait_named
from rlhf_ray.objectives.common import BatchTotals, Forward, Objective
from rlhf_ray.types import RolloutBatch
from rlhf_ray.workers.learner import LearnerWorker
from rlhf_ray.workers.rollout import RolloutWorker

log = logging.getLogger(__name__)


def deal_by_length(indices: Sequence[int], lengths: torch.Tensor, world: int) -> list[list[int]]:
    """Split ``indices`` into ``world`` equal shares, longest first, round-robin: similar token counts per rank,
    and consecutive indices in each share have similar lengths (less padding per micro-batch)."""
    order = sorted(indices, key=lambda i: -int(lengths[i]))
    return [order[r::world] for r in range(world)]


def chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[s:s + size] for s in range(0, len(items), size)]


@dataclass
class PendingForward:
    """A forward pass running on a group; ``result()`` waits (bounded) and reassembles batch order."""

    role: "LearnerRole"
    refs: list
    shards: list[list[list[int]]]
    batch_size: int
    width: int
    what: str
    started: float

    def result(self) -> tuple[torch.Tensor, float]:
        """(values in batch order, seconds from start to the slowest rank's answer)."""
        per_rank = self.role.group.wait(self.refs, self.what)
        seconds = time.perf_counter() - self.started
        out: Optional[torch.Tensor] = None
        for rank_mbs, rank_out in zip(self.shards, per_rank):
            for idx, values in zip(rank_mbs, rank_out):
                if out is None:
                    shape = (self.batch_size, self.width) if values.dim() == 2 else (self.batch_size,)
                    out = torch.zeros(shape, dtype=torch.float32)
                if values.dim() == 2:
                    out[idx, : values.shape[1]] = values
                else:
                    out[idx] = values
        assert out is not None
        return out, seconds


class LearnerRole:
    """A learner group used as one model by the RL loop."""

    def __init__(self, name: str, group: WorkerGroup, micro_batch_size: int):
        self.name, self.group, self.micro_batch_size = name, group, micro_batch_size

    @property
    def world(self) -> int:
        return len(self.group)

    # ---- no-grad forwards -----------------------------------------------------------------------
    def forward_async(self, batch: RolloutBatch, forward: Forward) -> PendingForward:
        """Start the ``forward`` spec over the whole batch; every rank gets the same number of micro-batches."""
        lengths = batch.attention_mask.sum(dim=1)
        shares = deal_by_length(range(batch.size), lengths, self.world)
        shards = [chunks(share, self.micro_batch_size) for share in shares]
        per_rank = [[batch.tensors(idx, forward.fields) for idx in rank_mbs] for rank_mbs in shards]
        refs = self.group.async_split(LearnerWorker.infer, per_rank, forward)
        return PendingForward(self, refs, shards, batch.size, batch.input_ids.shape[1] - 1,
                              f"infer[{type(forward).__name__}]", time.perf_counter())

    def forward(self, batch: RolloutBatch, forward: Forward) -> torch.Tensor:
        return self.forward_async(batch, forward).result()[0]

    # ---- updates --------------------------------------------------------------------------------
    def update(self, batch: RolloutBatch, objective: Objective, mini_batches: int, epochs: int, seed: int,
               horizon: int) -> list[dict[str, float]]:
        """``epochs`` passes over the batch in ``mini_batches`` optimizer steps each (a seeded shuffle per epoch).

        Each mini-batch is dealt to ranks by length and cut into micro-batches (gradient accumulation) of the
        fields ``objective`` reads; it gets the mini-batch's ``BatchTotals``, so its loss aggregation does not
        depend on the split. Returns one dict of summed metrics (plus lr, grad_norm) per optimizer step.
        """
        size = batch.size // mini_batches
        lengths = batch.attention_mask.sum(dim=1)
        results = []
        for epoch in range(epochs):
            order = np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(batch.size).tolist()
            for m in range(mini_batches):
                idx = order[m * size:(m + 1) * size]
                shares = deal_by_length(idx, lengths, self.world)
                per_rank = [[batch.tensors(mb, objective.fields) for mb in chunks(share, self.micro_batch_size)]
                            for share in shares]
                totals = BatchTotals(tokens=int(batch.action_mask[idx].sum()), sequences=len(idx), horizon=horizon,
                                     grad_scale=float(len(per_rank[0]) * self.world))
                results.append(merge_rank_metrics(self.train_step(per_rank, objective, totals)))
        return results

    def train_step(self, per_rank: list[list[dict]], objective: Objective, totals: BatchTotals) -> list[dict]:
        """One optimizer step: rank r trains on its micro-batches ``per_rank[r]``; per-rank metric sums back."""
        return self.group.call_split(LearnerWorker.train_step, per_rank, objective, totals)

    def evaluate(self, per_rank: list[list[dict]], objective: Objective, totals: BatchTotals) -> list[dict]:
        """``objective``'s metric sums per rank, without updating."""
        return self.group.call_split(LearnerWorker.evaluate, per_rank, objective, totals)

    def infer(self, per_rank: list[list[dict]], forward: Forward) -> list[list[torch.Tensor]]:
        """The ``forward`` spec on each rank's micro-batches; per rank, one output per micro-batch."""
        return self.group.call_split(LearnerWorker.infer, per_rank, forward)

    # ---- state ----------------------------------------------------------------------------------
    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        self.group.call_all(LearnerWorker.save_state, directory, client_state)

    def load(self, directory: str) -> dict[str, Any]:
        return self.group.call_all(LearnerWorker.load_state, directory)[0]

    def export_hf(self, directory: str, tokenizer_path: Optional[str]) -> None:
        self.group.call_all(LearnerWorker.export_hf, directory, tokenizer_path)

    def offload(self) -> float:
        return max(self.group.call_all(LearnerWorker.offload))

    def reload(self) -> float:
        return max(self.group.call_all(LearnerWorker.reload))

    def calibrate(self) -> dict:
        """Rank 0's device measurement for the efficiency report."""
        return self.group.call_rank0(LearnerWorker.calibrate)

    @property
    def on_gpu(self) -> bool:
        """Whether this group really runs on CUDA (logical GPUs on a CPU machine do not)."""
        return self.group.facts[0]["device"].startswith("cuda")

    @property
    def trainable_params(self) -> int:
        return int(self.group.facts[0]["trainable_params"])


def merge_rank_metrics(ranks: list[dict]) -> dict[str, float]:
    """Per-rank metric sums -> one dict: sums added (``_max`` keys: the largest), seconds of the slowest rank, and
    from rank 0 what every rank shares: lr, grad_norm and skipped_updates (ranks drop an update together)."""
    from rlhf_ray.metrics import accumulate

    shared = ("lr", "grad_norm", "skipped_updates")
    merged: dict[str, float] = {}
    for r in ranks:  # sums added, ``_max`` keys the largest
        accumulate(merged, {k: v for k, v in r.items() if k not in (*shared, "seconds")})
    merged.update({k: ranks[0][k] for k in shared}, seconds=max(r["seconds"] for r in ranks))
    return merged


@dataclass
class PendingGeneration:
    """A ``RolloutRole.generate_async`` in flight: one request per engine; ``result()`` waits (bounded) once."""

    refs: list
    parts: list
    who: list
    prompt_ids: list[list[int]]
    pad_id: int
    timeout_s: float
    started: float = dataclasses.field(default_factory=time.perf_counter)
    _result: Optional[tuple[RolloutBatch, Any]] = None

    def result(self) -> tuple[RolloutBatch, Any]:
        """The batch (group_index = prompt position) and the merged ``Generations``."""
        if self._result is None:
            outs = wait_named(self.refs, self.who, "rollout.generate", self.timeout_s)
            self._result = merge_generations(self.prompt_ids, self.parts, outs, self.pad_id)
        return self._result


def merge_generations(prompt_ids: list[list[int]], parts: list, outs: list, pad_id: int) -> tuple[RolloutBatch, Any]:
    """Each engine's ``Generations`` (for prompt positions ``parts[e]``) as one batch and one ``Generations``."""
    from rlhf_ray.engines.rollout_engine import Generations

    index, tokens, logps, texts, reasons = [], [], [], [], []
    for part, gen in zip(parts, outs):
        index.append(part[gen.prompt_index])
        tokens += gen.token_ids
        logps += gen.logprobs
        texts += gen.texts
        reasons += gen.finish_reasons
    group_index = np.concatenate(index).tolist()
    merged = Generations(np.asarray(group_index), tokens, logps, texts, reasons, max(g.seconds for g in outs))
    return batch_of(prompt_ids, merged, pad_id), merged


def batch_of(prompt_ids: list[list[int]], gens: Any, pad_id: int) -> RolloutBatch:
    """The ``RolloutBatch`` of ``gens`` (samples of ``prompt_ids``, ``gens.prompt_index`` = prompt position).
    Multi-turn samples start from their own first prompts, with observation tokens outside the action mask."""
    group_index = [int(g) for g in gens.prompt_index]
    multi_turn = gens.trajectories
    prompts = [prompt_ids[g] for g in group_index] if multi_turn is None else multi_turn.prompt_ids
    batch = RolloutBatch.from_generations(prompts, gens.token_ids, gens.logprobs, group_index, pad_id,
                                          None if multi_turn is None else multi_turn.action_masks)
    batch.responses = list(gens.texts)
    batch.finish_reasons = list(gens.finish_reasons)
    if multi_turn is not None:
        multi_turn.annotate(batch)
    return batch


class RolloutRole:
    """The vLLM engines: generation across engines, log-probs, sleep / wake (weights come in through
    ``rlhf_ray.weight_sync.channel``)."""

    def __init__(self, group: WorkerGroup, timeout_s: float):
        self.group, self.timeout_s = group, timeout_s

    @property
    def num_engines(self) -> int:
        return len(self.group)

    def generate(self, prompt_ids: list[list[int]], spec, pad_id: int) -> tuple[RolloutBatch, Any]:
        """``spec.n`` samples of every prompt, prompts split evenly over the engines (a prompt's samples stay
        on one engine, so its prefix is cached once). Returns the batch (group_index = prompt position)
        and the merged ``Generations`` (texts, finish reasons)."""
        return self.generate_async(prompt_ids, spec, pad_id).result()

    def generate_async(self, prompt_ids: list[list[int]], spec, pad_id: int) -> "PendingGeneration":
        """``generate`` started: the engines work while the caller does something else; ``result()`` waits."""
        splits = np.array_split(np.arange(len(prompt_ids)), self.num_engines)
        refs, used, names = [], [], []
        for e, (engine, part) in enumerate(zip(self.group.actors, splits)):
            if len(part):
                refs.append(engine.generate.remote([prompt_ids[i] for i in part], spec))
                used.append(part)
                names.append(self.group.who(e))
        return PendingGeneration(refs, used, names, prompt_ids, pad_id, self.timeout_s)

    def sequence_logprobs(self, sequences: list[list[int]], engine: int = 0) -> list[np.ndarray]:
        """Log-probs of tokens 1.. of each sequence under engine ``engine``'s current weights."""
        ref = self.group.actors[engine].sequence_logprobs.remote(sequences)
        return wait_named([ref], [self.group.who(engine)], "rollout.sequence_logprobs", self.timeout_s)[0]

    # ---- memory ---------------------------------------------------------------------------------
    def reseed(self, seed: int) -> None:
        """Seed every engine's next sampling (engine i: seed + i)."""
        self.group.call_all(RolloutWorker.reseed, seed)

    def sleep(self) -> float:
        return max(self.group.call_all(RolloutWorker.sleep))

    def wake_up(self, tags: Optional[list[str]] = None) -> float:
        return max(self.group.call_all(RolloutWorker.wake_up, tags))
