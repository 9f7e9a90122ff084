"""Weight sync on the real stack: DeepSpeed learners (Ray actors, gloo) -> a vLLM CPU engine (Ray actor).

After an update and a sync, vLLM's log-probs of fixed sequences must match the learners' to 1e-3 (fp32);
before the sync they must differ clearly, so a skipped sync or stale weights fail the test.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import load_config, resolve
from rlhf_ray.controller.launch import Roles
from rlhf_ray.data.batching import pad_batch
from rlhf_ray.objectives.common import BatchTotals, SFTLoss, TokenLogprobs
from rlhf_ray.types import RolloutBatch

TEXTS = ["What is 2 + 3? 5", "Repeat the number 7. 7", "hello world, this is a fixed sequence", "0123456789"]


def _config(model_dir, out, **over):
    values = {"job": "grpo", "model.path": model_dir, "reward.functions": ["builtin:math"],
              "learner.num_workers": 2, "learner.gpus_per_worker": 0, "learner.micro_batch_size": 2,
              "rollout.n_samples": 2, "algo.prompts_per_step": 2, "rollout.max_new_tokens": 8,
              "optim.lr": 1e-2, "optim.schedule": "constant", "train.output_dir": str(out), "train.timeout_s": 180,
              "rollout.weight_sync_bucket_mb": 1}
    values.update(over)
    return load_config(values=values)


def _max_diff(learner_lp: torch.Tensor, vllm_lp: list, seqs: list[list[int]]) -> float:
    return max(float((learner_lp[i, : len(s) - 1] - torch.as_tensor(vllm_lp[i])).abs().max()) for i, s in enumerate(seqs))


@pytest.mark.parametrize("variant", ["zero3", "qlora"])
def test_sync_makes_vllm_match_the_updated_learner(ray_cluster, tiny_model_dir, tmp_path, variant):
    """zero3: ZeRO-3 shards gathered in buckets, into vLLM's compiled model (its default: synced weights must
    reach the compiled graph). qlora: LoRA adapters on a bitsandbytes 4-bit base, sent as dense weights (base
    dequantized, adapters merged) into an eager engine; its HF export is that same dense model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    over = ({"learner.zero_stage": 3} if variant == "zero3" else
            {"learner.zero_stage": 2, "model.lora.enabled": True, "model.lora.load_in_4bit": True,
             "model.lora.rank": 4, "optim.lr": 5e-2, "rollout.enforce_eager": True})
    cfg = _config(tiny_model_dir, tmp_path, **over)
    (tmp_path).mkdir(exist_ok=True)
    from rlhf_ray.weight_sync.channel import SyncChannel

    resolved = resolve(cfg, "cpu")
    assert resolved.sync.backend == "gloo" and resolved.sync.dtype == "float32"
    roles = Roles(resolved.plan, cfg.train.timeout_s, cfg.train.start_timeout_s)
    try:
        roles.start(resolved, total_steps=4, output_dir=tmp_path)
        channel = SyncChannel(roles.actor, roles.rollout, resolved.sync, cfg.train.timeout_s)
        info = channel.open()
        assert info["buckets"] >= 2  # 1 MB buckets: the tiny model's ~1.3 MB goes in several collectives
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
        batch = RolloutBatch.from_generations([s[:3] for s in seqs], [s[3:] for s in seqs],
                                              [[0.0] * (len(s) - 3) for s in seqs], [0, 1, 2, 3], tok.pad_token_id)

        def learner_lp():
            return roles.actor.forward(batch, TokenLogprobs())

        def vllm_lp():
            return roles.rollout.sequence_logprobs(seqs)

        if variant == "qlora":
            # The engine loaded the full-precision checkpoint; the learner computes with its 4-bit rounding.
            assert _max_diff(learner_lp(), vllm_lp(), seqs) > 1e-3
            channel.push()
        # Same weights on both sides.
        assert _max_diff(learner_lp(), vllm_lp(), seqs) < 1e-3

        # One large SFT step on the learners changes their log-probs a lot ...
        examples = [{"input_ids": s, "labels": s} for s in seqs]
        per_rank = [[pad_batch(examples[:2], tok.pad_token_id)], [pad_batch(examples[2:], tok.pad_token_id)]]
        n_tokens = sum(len(s) - 1 for s in seqs)
        roles.actor.train_step(per_rank, SFTLoss(), BatchTotals(tokens=n_tokens, grad_scale=2.0))
        updated = learner_lp()
        before_sync = _max_diff(updated, vllm_lp(), seqs)
        assert before_sync > 0.05, before_sync  # ... so vLLM, not yet synced, is clearly stale

        result = channel.push()
        assert result["bytes"] > 0
        after_sync = _max_diff(updated, vllm_lp(), seqs)
        assert after_sync < 1e-3, (before_sync, after_sync)

        # The HF export is the same model: a plain checkpoint transformers loads, scoring like the learner.
        roles.actor.export_hf(str(tmp_path / "export"), tiny_model_dir)
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
        assert all(t.is_floating_point() for t in exported.state_dict().values())
        with torch.no_grad():
            hf_lp = torch.log_softmax(exported(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1], -1)
            hf_lp = hf_lp.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
        for i, s in enumerate(seqs):
            assert float((hf_lp[i, : len(s) - 1] - updated[i, : len(s) - 1]).abs().max()) < 1e-3, i
    finally:
        roles.teardown()
