"""Roles as the RL loop sees them: one object per model, batch in, tensors / metrics out.

``LearnerRole`` wraps a learner ``WorkerGroup`` (policy, reference, critic or reward model) and hides
the data-parallel plumbing: sequences are dealt to ranks balanced by length, cut into micro-batches,
and the per-rank results put back in batch order. ``RolloutRole`` wraps the vLLM engines: prompts are
split across engines, samples come back as one ``RolloutBatch``, and weights flow in from the policy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from rlhf_ray.controller.worker_group import WorkerGroup, wait_named
from rlhf_ray.types import RolloutBatch

log = logging.getLogger(__name__)

SEQUENCE_FIELDS = ("input_ids", "attention_mask")


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
    def forward_async(self, batch: RolloutBatch, forward: str, fields: Sequence[str] = SEQUENCE_FIELDS,
                      **kwargs: Any) -> PendingForward:
        """Start ``FORWARDS[forward]`` over the whole batch; every rank gets the same number of micro-batches."""
        lengths = batch.attention_mask.sum(dim=1)
        shares = deal_by_length(range(batch.size), lengths, self.world)
        shards = [chunks(share, self.micro_batch_size) for share in shares]
        per_rank = [[batch.tensors(idx, tuple(fields)) for idx in rank_mbs] for rank_mbs in shards]
        refs = [getattr(a, "infer").remote(mbs, forward, kwargs) for a, mbs in zip(self.group.actors, per_rank)]
        return PendingForward(self, refs, shards, batch.size, batch.input_ids.shape[1] - 1,
                              f"infer[{forward}]", time.perf_counter())

    def forward(self, batch: RolloutBatch, forward: str, fields: Sequence[str] = SEQUENCE_FIELDS,
                **kwargs: Any) -> torch.Tensor:
        return self.forward_async(batch, forward, fields, **kwargs).result()[0]

    # ---- updates --------------------------------------------------------------------------------
    def update(self, batch: RolloutBatch, objective: str, fields: Sequence[str], kwargs: dict[str, Any],
               mini_batches: int, epochs: int, seed: int, horizon: int) -> list[dict[str, float]]:
        """``epochs`` passes over the batch in ``mini_batches`` optimizer steps each (a seeded shuffle per epoch).

        Each mini-batch is dealt to ranks by length and cut into micro-batches (gradient accumulation);
        the objective gets the mini-batch's action-token and sequence counts, so its loss aggregation
        does not depend on the split. Returns one dict of summed metrics (plus lr, grad_norm) per step.
        """
        size = batch.size // mini_batches
        results = []
        for epoch in range(epochs):
            order = np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(batch.size).tolist()
            for m in range(mini_batches):
                idx = order[m * size:(m + 1) * size]
                lengths = batch.attention_mask.sum(dim=1)
                shares = deal_by_length(idx, lengths, self.world)
                per_rank = [[batch.tensors(mb, tuple(fields)) for mb in chunks(share, self.micro_batch_size)]
                            for share in shares]
                accum = len(per_rank[0])
                step_kwargs = dict(kwargs, num_tokens=int(batch.action_mask[idx].sum()), num_seqs=len(idx),
                                   horizon=horizon, grad_scale=float(accum * self.world))
                ranks = self.group.call_split("train_step", per_rank, objective, step_kwargs)
                merged = {k: sum(r[k] for r in ranks) for k in ranks[0] if k not in ("lr", "grad_norm", "seconds")}
                merged.update(lr=ranks[0]["lr"], grad_norm=ranks[0]["grad_norm"],
                              seconds=max(r["seconds"] for r in ranks))
                results.append(merged)
        return results

    # ---- state ----------------------------------------------------------------------------------
    def save(self, directory: str, client_state: dict[str, Any]) -> None:
        self.group.call_all("save_state", directory, client_state)

    def load(self, directory: str) -> dict[str, Any]:
        return self.group.call_all("load_state", directory)[0]

    def export_hf(self, directory: str, tokenizer_path: Optional[str]) -> None:
        self.group.call_all("export_hf", directory, tokenizer_path)

    def offload(self) -> float:
        return max(self.group.call_all("offload"))

    def reload(self) -> float:
        return max(self.group.call_all("reload"))


class RolloutRole:
    """The vLLM engines: generation across engines, and the weight-sync channel from the policy."""

    def __init__(self, group: WorkerGroup, timeout_s: float):
        self.group, self.timeout_s = group, timeout_s
        self.sync_mode: Optional[str] = None

    @property
    def num_engines(self) -> int:
        return len(self.group)

    def generate(self, prompt_ids: list[list[int]], spec, pad_id: int) -> tuple[RolloutBatch, Any]:
        """``spec.n`` samples of every prompt, prompts split evenly over the engines (a prompt's samples stay
        on one engine, so its prefix is cached once). Returns the batch (group_index = prompt position)
        and the merged ``Generations`` (texts, finish reasons)."""
        from rlhf_ray.engines.rollout_engine import Generations

        splits = np.array_split(np.arange(len(prompt_ids)), self.num_engines)
        refs, used = [], []
        for engine, part in zip(self.group.actors, splits):
            if len(part):
                refs.append(engine.generate.remote([prompt_ids[i] for i in part], spec))
                used.append(part)
        outs = wait_named(refs, [f"rollout[engine {i}]" for i in range(len(refs))], "rollout.generate", self.timeout_s)
        index, tokens, logps, texts, reasons = [], [], [], [], []
        for part, gen in zip(used, outs):
            index.append(part[gen.prompt_index])
            tokens += gen.token_ids
            logps += gen.logprobs
            texts += gen.texts
            reasons += gen.finish_reasons
        group_index = np.concatenate(index).tolist()
        merged = Generations(np.asarray(group_index), tokens, logps, texts, reasons,
                             max(g.seconds for g in outs))
        batch = RolloutBatch.from_generations([prompt_ids[g] for g in group_index], tokens, logps, group_index, pad_id)
        batch.responses = texts
        batch.finish_reasons = reasons
        return batch, merged

    def sequence_logprobs(self, sequences: list[list[int]], engine: int = 0) -> list[np.ndarray]:
        """Log-probs of tokens 1.. of each sequence under engine ``engine``'s current weights."""
        ref = self.group.actors[engine].sequence_logprobs.remote(sequences)
        return wait_named([ref], [f"rollout[engine {engine}]"], "rollout.sequence_logprobs", self.timeout_s)[0]

    # ---- weight sync ----------------------------------------------------------------------------
    def init_sync(self, actor: LearnerRole, mode: str, dtype: str, bucket_mb: int, tp: int) -> dict[str, Any]:
        """Agree on the sync plan with the policy group and open the channel (``mode``: nccl, gloo or ipc)."""
        plans = actor.group.call_all("weight_sync_plan", dtype, bucket_mb)
        self.sync_mode = mode
        if mode == "ipc":
            if actor.world != self.num_engines:
                raise ValueError(f"CUDA IPC weight sync pairs each learner rank with the engine on its GPU: "
                                 f"{actor.world} learner ranks but {self.num_engines} engines")
            return {"mode": mode, "buckets": len(plans[0])}
        host, port = actor.group.call_rank0("rendezvous")
        world = 1 + self.num_engines * tp
        refs = [actor.group.actors[0].init_weight_sync.remote(host, port, world, mode, self.timeout_s)]
        names = [f"{actor.name}[rank 0]"]
        for e, engine in enumerate(self.group.actors):
            refs.append(engine.init_weight_sync.remote(host, port, 1 + e * tp, world, mode, self.timeout_s, plans[0]))
            names.append(f"rollout[engine {e}]")
        # All ranks must join at once (a rendezvous); a missing one is named when the wait times out.
        wait_named(refs, names, "weight_sync.init", self.timeout_s)
        return {"mode": mode, "buckets": len(plans[0]), "world": world}

    def sync_from(self, actor: LearnerRole) -> dict[str, float]:
        """Push the policy's current weights into every engine; returns seconds and bytes."""
        t0 = time.perf_counter()
        if self.sync_mode == "ipc":
            sent = actor.group.call_split("send_weights_ipc", list(self.group.actors), self.timeout_s)
            refs = [e.finish_ipc_sync.remote() for e in self.group.actors]
            wait_named(refs, [f"rollout[engine {i}]" for i in range(len(refs))], "weight_sync.finish", self.timeout_s)
        else:
            send = actor.group.async_all("send_weights")
            recv = [e.receive_weights.remote(self.timeout_s) for e in self.group.actors]
            names = ([f"{actor.name}[rank {r}]" for r in range(actor.world)]
                     + [f"rollout[engine {i}]" for i in range(self.num_engines)])
            # One bounded wait over senders and receivers: a stall names whoever did not finish.
            results = wait_named(send + recv, names, "weight_sync", self.timeout_s)
            sent = results[: actor.world]
        nbytes = sum(r["bytes"] for r in sent)
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes}

    # ---- memory ---------------------------------------------------------------------------------
    def sleep(self) -> float:
        return max(self.group.call_all("sleep"))

    def wake_up(self, tags: Optional[list[str]] = None) -> float:
        return max(self.group.call_all("wake_up", tags))
