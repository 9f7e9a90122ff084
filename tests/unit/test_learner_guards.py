"""A non-finite loss never reaches a learner's weights: the step stops with an error saying where (the error ends
the run: the learner's accumulated gradients are not meant to be stepped on after it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert facts["error"] and "non-finite loss (nan) on micro-batch 1 of optimizer step 1" in facts["error"], facts
    assert facts["unchanged"] and facts["steps"] == 0, facts
