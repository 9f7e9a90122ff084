"""The weight-sync channel on its own: plan bucketing, gloo broadcast of buckets, names, stale plans, LoRA merge."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from rlhf_ray.weight_sync.plan import SyncPlan
from rlhf_ray.weight_sync.producer import iter_named_params_for_sync, sync_entries
from rlhf_ray.weight_sync.transport import SyncGroup, receive_weights, send_weights


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plan_buckets_by_bytes():
    meta = [("a", (4, 4), "float32"), ("b", (4,), "float32"), ("c", (8, 8), "float32"), ("d", (2,), "bfloat16")]
    # a = 64 B, b = 16 B, c = 256 B, d = 4 B; with 100 B buckets: [a, b] (80 B), then c alone (256 B > 100), then [d].
    plan = SyncPlan.build(meta, bucket_bytes=100)
    assert [[n for n, _, _ in b] for b in plan.buckets] == [["a", "b"], ["c"], ["d"]]
    assert plan.num_tensors == 4 and plan.num_bytes == 64 + 16 + 256 + 4


def _run_pair(sender_fn, receiver_fn):
    port = _port()
    out, errors = {}, []

    def rank(r, fn):
        try:
            group = SyncGroup("127.0.0.1", port, r, 2, "gloo", 30.0, torch.device("cpu"))
            out[r] = fn(group)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append((r, exc))

    threads = [threading.Thread(target=rank, args=(0, sender_fn)), threading.Thread(target=rank, args=(1, receiver_fn))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out, errors


def test_send_receive_roundtrip_over_gloo():
    torch.manual_seed(0)
    weights = {"w1": torch.randn(3, 5), "w2": torch.randn(7), "h": torch.randn(2, 2).to(torch.bfloat16)}
    plan = SyncPlan.build([(n, tuple(t.shape), str(t.dtype).replace("torch.", "")) for n, t in weights.items()], 64)
    assert len(plan.buckets) >= 2  # several collectives, each a flat buffer per dtype
    out, errors = _run_pair(lambda g: send_weights(g, iter(weights.items()), plan),
                            lambda g: {n: t.clone() for n, t in receive_weights(g, plan)})
    assert not errors, errors
    assert out[0] == plan.num_bytes
    assert list(out[1]) == list(weights)
    for name, t in weights.items():
        assert out[1][name].dtype == t.dtype and torch.equal(out[1][name], t), name


def test_stale_plan_is_named_before_sending():
    plan = SyncPlan.build([("a", (2,), "float32")], 1 << 20)
    group = object.__new__(SyncGroup)  # never reached: the mismatch is found while packing the bucket
    group.device = torch.device("cpu")
    with pytest.raises(ValueError, match="expected 'a' \\(2,\\), the model gave 'b' \\(2,\\)"):
        send_weights(group, iter([("b", torch.zeros(2))]), plan)
    with pytest.raises(ValueError, match="has a tensor the plan lacks: 'extra'"):
        group.broadcast = lambda t: None
        send_weights(group, iter([("a", torch.zeros(2)), ("extra", torch.zeros(1))]), plan)


def test_lora_is_merged_under_hf_names(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected_names = [n for n, _ in base.named_parameters()]
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)  # peft initialises B = 0; make the delta non-zero
    exported = dict(iter_named_params_for_sync(model, zero3=False, bucket_bytes=1 << 16))
    assert list(exported) == expected_names  # plain HF names, same order, nothing LoRA-specific
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    # merged = W + (B @ A) * alpha / r
    want = layer.base_layer.weight + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (4 / 2)
    torch.testing.assert_close(exported["model.layers.0.self_attn.q_proj.weight"], want, rtol=0, atol=1e-6)
    # Unadapted weights pass through untouched.
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj.weight
    assert torch.equal(exported["model.layers.0.self_attn.k_proj.weight"], k_proj)
    assert len(sync_entries(model)) == len(expected_names)
