"""What a learner process pays before its first step: DeepSpeed start-up costs that rlhf_ray skips on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A fresh process (the default process group and the import state are per process): join a 1-rank gloo
# group through our init_distributed, build a ZeRO-2 engine through our DeepSpeed config, take one step.
PROBE = r"""
import json, socket, sys
import torch
import deepspeed
from deepspeed.runtime import compiler
from rlhf_ray.config.schema import LearnerConfig, OptimConfig
from rlhf_ray.engines.learner import deepspeed_config, init_distributed

with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
init_distributed(0, 1, "127.0.0.1", port, 60.0)
model = torch.nn.Linear(8, 1)
cfg = deepspeed_config(LearnerConfig(num_workers=1, zero_stage=2, micro_batch_size=4, global_batch_size=4),
                       OptimConfig(), torch.float32)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1), config=cfg)
before = model.weight.detach().clone()
loss = engine(torch.ones(4, 8)).pow(2).mean()
engine.backward(loss)
engine.step()
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
print(json.dumps({
    "inductor": "torch._inductor.compile_fx" in sys.modules,
    "muon_loaded": "deepspeed.runtime.zero.muon.original_muon" in sys.modules,
    "compile_restored": compiler.compile() is torch.compile,
    "shm_comm": deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm"),
    "stepped": bool((model.weight.detach() != before).any()),
}))
"""


def test_learner_start_skips_muon_compilation_and_the_shm_kernel():
    """DeepSpeed 0.19 imports its Muon module (three ``torch.compile`` kernels: TorchInductor, ~4 s of CPU) when it
    builds a ZeRO engine, and on gloo would JIT-build a shared-memory all-reduce kernel; a learner needs neither."""
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts == {"inductor": False, "muon_loaded": True, "compile_restored": True, "shm_comm": False,
                     "stepped": True}, facts
