"""A non-finite loss or gradient never reaches a learner's weights. ``train.on_nonfinite=stop`` (the default): the step
stops with an error saying where (the error ends the run: the learner's accumulated gradients are not meant to be
stepped on after it). ``skip``: every rank drops that update alike, counts it, and the next step trains normally."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A fresh process (the default process group is per process): one real LearnerEngine (DeepSpeed ZeRO-2 over a
# 1-rank gloo group) on the tiny model, built from the resolved config as a learner actor builds it.
PROBE = r"""
import json, socket, sys
import torch
from rlhf_ray.config import load_config, resolve
from rlhf_ray.data.batching import pad_batch
from rlhf_ray.engines.learner import LearnerEngine, init_distributed
from rlhf_ray.objectives.common import BatchTotals, SFTLoss

with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
init_distributed(0, 1, "127.0.0.1", port, 60.0)
cfg = load_config(values={"job": "sft", "model.path": sys.argv[1], "learner.num_workers": 1, "learner.gpus_per_worker": 0,
                          "learner.micro_batch_size": 1, "learner.global_batch_size": 2, "optim.lr": 0.1})
engine = LearnerEngine(resolve(cfg, "cpu").policy, total_steps=4)
ids = [5, 6, 7, 8, 9, 10]
mbs = [pad_batch([{"input_ids": ids, "labels": ids}], pad_id=0) for _ in range(2)]

class NanOnSecond:
    # The first micro-batch's loss is finite (its gradient is accumulated), the second one's is NaN.
    calls = 0
    def __call__(self, model, mb, totals):
        loss, metrics = SFTLoss()(model, mb, totals)
        NanOnSecond.calls += 1
        return (loss * float("nan") if NanOnSecond.calls == 2 else loss), metrics

before = [p.detach().clone() for p in engine.module.parameters()]
try:
    engine.train_step(mbs, NanOnSecond(), BatchTotals(tokens=10, grad_scale=2.0))
    error = None
except FloatingPointError as exc:
    error = str(exc)
unchanged = all(torch.equal(a, p.detach()) for a, p in zip(before, engine.module.parameters()))
print(json.dumps({"error": error, "unchanged": unchanged, "steps": engine.step}))
"""


def test_a_nan_loss_stops_the_step_before_the_weights_change(tiny_model_dir):
    proc = subprocess.run([sys.executable, "-c", PROBE, tiny_model_dir], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["error"] and "non-finite loss (nan) on micro-batch 1 of optimizer step 1 on learner rank 0" in \
        facts["error"] and "train.on_nonfinite" in facts["error"], facts
    assert facts["unchanged"] and facts["steps"] == 0, facts


# train.on_nonfinite=skip, on 2 data-parallel ranks (one process each, a real LearnerEngine per rank). Optimizer step
# 1: rank 1's second micro-batch loss is NaN while its gradient stays finite (loss + NaN), so only the all-reduced
# flag makes rank 0 drop its update too. Step 2: rank 0's loss stays finite (+ sqrt(0) = 0) while its gradient is NaN
# (d sqrt(x)/dx at 0 is inf, times 0), found in the gradient norm. Step 3 is plain. Then a fresh engine takes one plain
# step: if the dropped steps left nothing behind (weights, Adam moments, LR schedule), both end at the same weights.
SKIP_PROBE = r"""
import json, sys
import torch
from rlhf_ray.config import load_config, resolve
from rlhf_ray.data.batching import pad_batch
from rlhf_ray.engines.learner import LearnerEngine, init_distributed
from rlhf_ray.objectives.common import BatchTotals, SFTLoss

model_dir, rank, world, port, stage = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
init_distributed(rank, world, "127.0.0.1", port, 120.0)
cfg = load_config(values={"job": "sft", "model.path": model_dir, "learner.num_workers": world,
                          "learner.gpus_per_worker": 0, "learner.zero_stage": stage, "learner.micro_batch_size": 1,
                          "learner.global_batch_size": 2 * world, "optim.lr": 0.1, "optim.schedule": "linear",
                          "train.on_nonfinite": "skip"})
spec = resolve(cfg, "cpu").policy
ids = [5, 6, 7, 8, 9, 10 + rank]
mbs = [pad_batch([{"input_ids": ids, "labels": ids}], pad_id=0) for _ in range(2)]
totals = BatchTotals(tokens=10 * world, grad_scale=2.0 * world)

class Spoiled:
    def __init__(self, what, on_rank):
        self.what, self.on_rank, self.calls = what, on_rank, 0
    def __call__(self, model, mb, totals):
        loss, metrics = SFTLoss()(model, mb, totals)
        self.calls += 1
        if self.calls == 2 and rank == self.on_rank:
            if self.what == "loss":
                loss = loss + float("nan")
            else:
                loss = loss + torch.sqrt((next(model.module.parameters()) * 0).sum())
        return loss, metrics

weights = lambda e: [t.detach().clone() for _, t in e.named_weights()]  # full tensors, ZeRO-3 shards gathered
engine = LearnerEngine(spec, total_steps=4)
steps = []
for objective in (Spoiled("loss", on_rank=1), Spoiled("grad", on_rank=0), SFTLoss()):
    before = weights(engine)
    out = engine.train_step(mbs, objective, totals)
    steps.append({"skipped": out["skipped_updates"], "grad_norm": out["grad_norm"], "lr": out["lr"],
                  "unchanged": all(torch.equal(a, b) for a, b in zip(before, weights(engine)))})
fresh = LearnerEngine(spec, total_steps=4)
fresh.train_step(mbs, SFTLoss(), totals)
adam_steps = sorted({int(s["step"]) for s in engine._base_optimizer.state.values() if "step" in s})
print(json.dumps({"steps": steps, "count": engine.skipped_updates, "adam_steps": adam_steps,
                  "sum": float(sum(p.double().sum() for p in weights(engine))),
                  "same_as_fresh": all(torch.equal(a, b) for a, b in zip(weights(engine), weights(fresh)))}))
"""


@pytest.mark.parametrize("zero_stage", [2, 3, 0])  # 2, 3: DeepSpeed's optimizer checks the norm; 0: the learner does
def test_skip_drops_a_nonfinite_update_on_every_rank_and_counts_it(tiny_model_dir, zero_stage):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", SKIP_PROBE, tiny_model_dir, str(rank), "2", str(port),
                               str(zero_stage)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for facts in ranks:
        dropped, dropped_grad, trained = facts["steps"]
        # Steps 1 and 2 dropped on both ranks (each spoiled on one rank only), weights untouched, LR not advanced
        # (linear schedule over 4 steps from 0.1: 0.1 until a step is taken, then 0.1 * (1 - 1/4) = 0.075).
        assert dropped["skipped"] == 1.0 and dropped["unchanged"] and dropped["lr"] == pytest.approx(0.1, abs=1e-12)
        assert dropped_grad["skipped"] == 1.0 and dropped_grad["unchanged"], facts
        assert not math.isfinite(dropped_grad["grad_norm"]), facts
        assert dropped_grad["lr"] == pytest.approx(0.1, abs=1e-12), facts
        # Step 3 trains as the first step of a fresh engine does: Adam has taken exactly one step.
        assert trained["skipped"] == 0.0 and not trained["unchanged"] and math.isfinite(trained["grad_norm"]), facts
        assert trained["lr"] == pytest.approx(0.075, abs=1e-12), facts
        assert facts["count"] == 2 and facts["adam_steps"] == [1] and facts["same_as_fresh"], facts
    assert ranks[0]["sum"] == ranks[1]["sum"]  # the ranks hold the same weights
