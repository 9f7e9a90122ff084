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


def _token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]


def test_qlora_learner_scores_with_the_weights_it_exports(tiny_model_dir):
    """A QLoRA learner computes the same log-probs and LoRA gradients before and after an eval forward
    (reference / old log-probs, the check after a sync), and a plain HF model holding its dense export scores
    like it. On an AVX512-BF16 CPU bitsandbytes would otherwise repack the 4-bit weights at the first eval
    forward and run every later forward in bf16, without a backward: log-probs 4e-3 off, gradients lost,
    export 0.87 off (see engines.learner._keep_4bit_forward_exact). Elsewhere that kernel is never chosen and
    this passes as is."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from rlhf_ray.config.schema import LoraConfig, ModelConfig
    from rlhf_ray.engines.learner import load_model

    model = load_model(ModelConfig(path=tiny_model_dir, lora=LoraConfig(enabled=True, load_in_4bit=True, rank=4)),
                       "causal_lm", torch.float32, trainable=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft initialises B = 0; make the merged delta and A's gradients non-zero
    ids = torch.randint(4, 100, (2, 12))
    lora = [p for name, p in model.named_parameters() if "lora_" in name]

    def train_forward():  # lora_dropout is 0: train / eval changes only which bitsandbytes path runs
        model.train()
        model.zero_grad(set_to_none=True)
        lp = _token_logprobs(model, ids)
        lp.sum().backward()
        return lp.detach(), [p.grad.clone() for p in lora]

    lp_before, grads_before = train_forward()
    model.eval()
    with torch.no_grad():
        eval_lp = _token_logprobs(model, ids)
    lp_after, grads_after = train_forward()
    # Same dequantized weights and fp32 matmuls on every path: bit-identical (with the bf16 repacking these ids'
    # eval log-probs were 1.6e-3 from the first training forward's).
    torch.testing.assert_close(eval_lp, lp_before, rtol=0, atol=1e-6)
    torch.testing.assert_close(lp_after, lp_before, rtol=0, atol=1e-6)
    for got, want in zip(grads_after, grads_before):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    exported = {n: t.clone() for n, t in iter_named_params_for_sync(model, zero3=False)}
    assert all(t.dtype == torch.float32 for t in exported.values())
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    dense.load_state_dict(exported, strict=True)
    with torch.no_grad():
        dense_lp = _token_logprobs(dense, ids)
    # Same weights, fp32 throughout: only summation order differs (5e-7 measured).
    torch.testing.assert_close(dense_lp, eval_lp, rtol=0, atol=1e-5)


def test_weights_repacked_for_the_cpu_bf16_kernel_are_refused():
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_functional

    if not hasattr(bnb_functional, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU repacking")
    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4"))
    model = model.to("cpu")  # quantizes the weight
    weight = model[0].weight
    # What Linear4bit.forward does in eval mode without gradients on an AVX512-BF16 CPU (called directly here so
    # the test runs on any CPU): the data is reordered and the block scales become bf16, in place.
    weight.data, weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    with pytest.raises(RuntimeError, match="0.weight \\(and 0 more 4-bit weights\\) were repacked"):
        next(iter_named_params_for_sync(model, zero3=False))
    with pytest.raises(RuntimeError, match="cannot be exported exactly"):
        sync_entries(model)
