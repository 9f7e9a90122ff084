"""SFT end to end on the real stack: 2 DeepSpeed learner actors in Ray, gloo, the demo data set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_ray.config import load_config
from rlhf_ray.jobs import get_job
from rlhf_ray.metrics import read_metrics


REPO = Path(__file__).resolve().parents[2]


def sft_config(model_dir: str, out: Path, **over):
    """examples/sft_tiny_cpu.yaml (the README's SFT example), shortened for tests."""
    values = {
        "model.path": model_dir,
        "data.eval_fraction": 0.0,
        "train.eval_every": 0,
        "train.save_every": 0,
        "data.path": "demo:arithmetic",
        "data.demo_size": 512,
        "data.max_length": 64,
        "learner.num_workers": 2,
        "learner.gpus_per_worker": 0,
        "learner.zero_stage": 2,
        "learner.micro_batch_size": 4,
        "learner.global_batch_size": 16,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 2,
        "train.output_dir": str(out),
        "train.max_steps": 12,
        "train.timeout_s": 180,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
    }
    values.update(over)
    return load_config(REPO / "examples" / "sft_tiny_cpu.yaml", values=values)


STEPS, SAVE_AT = 8, 4
"""The runs below: 8 optimizer steps, a checkpoint at step 4 (the resume test stops a run there)."""


@pytest.fixture(scope="module")
def sft_runs(ray_cluster, tiny_model_dir, tmp_path_factory):
    """One SFT run per ZeRO stage (2 learner workers, gloo): {stage: (result, output dir)}.

    The tests below share them: the loss and ZeRO-2/3 agreement, the exported ZeRO-3 checkpoint, and the ZeRO-2
    run as the uninterrupted reference of the resume test."""
    runs = {}
    for stage in (2, 3):
        out = tmp_path_factory.mktemp("sft") / f"z{stage}"
        cfg = sft_config(tiny_model_dir, out, **{"learner.zero_stage": stage, "train.max_steps": STEPS,
                                                 "train.save_every": SAVE_AT, "optim.warmup_steps": 1})
        runs[stage] = (get_job("sft").run(cfg), out)
    return runs


def test_sft_with_zero2_and_zero3_lowers_the_response_loss_identically(sft_runs):
    """2 learner workers over gloo: the response-token loss falls, and ZeRO-2 and ZeRO-3 agree step by step (fp32)."""
    losses = {}
    for stage, (result, out) in sft_runs.items():
        rows = read_metrics(out / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        losses[stage] = [r["train/loss"] for r in rows]
        # A random-init char model starts near ln(vocab) ~ 4.6 and must drop clearly on this set.
        assert sum(losses[stage][-3:]) / 3 < sum(losses[stage][:3]) / 3 - 0.5, losses[stage]
        assert all(r["train/response_tokens"] > 0 for r in rows)
        assert all(r["train/skipped_updates"] == 0.0 for r in rows)  # train.on_nonfinite's count, in every step
        # The efficiency report rides along in every run: train time beside its FLOP floor, and MFU.
        assert all(r["efficiency/train_vs_floor"] > 1.0 and 0 < r["efficiency/mfu"] < 1 for r in rows)
        final = Path(result["final_model"])
        assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert losses[2] == pytest.approx(losses[3], rel=1e-4, abs=1e-5)


def test_final_checkpoint_loads_in_transformers_and_vllm_and_generates(sft_runs, tiny_model_dir):
    """The exported ZeRO-3 checkpoint is a plain HF model directory: both load it as is and generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = sft_runs[3][0]["final_model"]
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8 or tok.eos_token_id in out[0].tolist()
    # The exported weights are the trained ones, not the initial ones.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(base.model.embed_tokens.weight, model.model.embed_tokens.weight)
    # vLLM (its CPU build here) in a process of its own, as a serving job would load it (engine core in that
    # process: the checkpoint loads the same way, without two more processes importing vLLM).
    script = (
        "from vllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({final!r}, dtype='float32', kv_cache_memory_bytes=128 << 20, enforce_eager=True)\n"
        "    out = llm.generate(['What is 2 + 3?'], SamplingParams(max_tokens=6, temperature=0))\n"
        "    print('GENERATED', len(out[0].outputs[0].token_ids))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("GENERATED")]
    assert line and int(line[0].split()[1]) >= 1, proc.stdout[-2000:]


def test_lora_trains_only_adapters_and_merged_export_is_plain(ray_cluster, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = sft_config(tiny_model_dir, tmp_path / "lora", **{
        "model.lora.enabled": True, "model.lora.rank": 4, "model.lora.target_modules": ["q_proj", "v_proj"],
        "train.max_steps": 4, "optim.lr": 1e-2})
    result = get_job("sft").run(cfg)
    final = Path(result["final_model"])
    assert not (final / "adapter_config.json").exists()  # merged: a plain model directory
    merged = AutoModelForCausalLM.from_pretrained(final).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert set(merged) == set(base)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    # Only the LoRA targets moved (W + scale * B @ A merged in); everything else is bit-identical.
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed


def test_resume_after_a_crash_gives_the_uninterrupted_losses(ray_cluster, sft_runs, tmp_path):
    """Kill a run after its step-4 checkpoint, resume it, and get steps 5..8 as the uninterrupted ZeRO-2 run has them."""
    whole_dir = sft_runs[2][1]
    whole = {r["step"]: r["train/loss"] for r in read_metrics(whole_dir / "metrics.jsonl")}

    # The same run as a separate `rlhf-ray train` process on this Ray cluster, killed once step 4 is saved.
    out = tmp_path / "crashed"
    cfg_path = tmp_path / "crashed.yaml"
    values = yaml.safe_load((whole_dir / "config.yaml").read_text())
    values["train"]["output_dir"] = str(out)
    cfg_path.write_text(yaml.safe_dump(values))
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray", "train", str(cfg_path), f"ray.address={address}",
                             "train.timeout_s=120"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() == f"step_{SAVE_AT:06d}"):
        assert proc.poll() is None, f"the run ended before its step-{SAVE_AT} checkpoint"
        assert time.monotonic() < deadline, f"no step-{SAVE_AT} checkpoint in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)

    resumed = load_config(cfg_path, ["train.resume=true"])
    get_job("sft").run(resumed)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # lines past the checkpoint dropped and redone
    after = {r["step"]: r["train/loss"] for r in rows}
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert after[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6), (step, after[step], whole[step])
