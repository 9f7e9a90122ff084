"""Learner objectives on a real tiny model: what carries loss, and how losses are scaled for DeepSpeed."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algos.logprobs import gather_token_logprobs
from rlhf_ray.data.batching import pad_batch
from rlhf_ray.objectives.common import BatchTotals, SFTLoss, TokenLogprobs
from rlhf_ray.objectives.rl import PolicyLoss


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).float()


def _logit_grads(model, batch, totals):
    """d loss / d logits, through the real model and the real SFT objective."""
    captured = {}

    def keep(_, __, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.lm_head.register_forward_hook(keep)
    try:
        loss, metrics = SFTLoss()(model, batch, totals)
        loss.backward()
    finally:
        handle.remove()
        model.zero_grad()
    return loss, metrics, captured["logits"].grad


def test_prompt_tokens_carry_no_loss(model):
    # Prompt of 5 tokens (labels -100), response of 4. Position t predicts token t+1, so positions 0..3 predict
    # prompt tokens and must get exactly zero gradient; positions 4..7 predict the response.
    ids = [5, 6, 7, 8, 9, 20, 21, 22, 2]
    labels = [-100] * 5 + ids[5:]
    batch = pad_batch([{"input_ids": ids, "labels": labels}], pad_id=0)
    loss, metrics, grad = _logit_grads(model, batch, BatchTotals(tokens=4))  # scale 1 / 4
    assert metrics["response_tokens"] == 4
    assert torch.count_nonzero(grad[0, :4]) == 0
    assert all(torch.count_nonzero(grad[0, t]) > 0 for t in range(4, 8))
    # The value is the mean NLL of the 4 response tokens, computed here independently.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0, 4:8]
        want = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[5:]))
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    # Unmasking the prompt labels adds their terms: the masking is what keeps them out.
    full = pad_batch([{"input_ids": ids, "labels": ids}], pad_id=0)
    unmasked, m2, _ = _logit_grads(model, full, BatchTotals(tokens=8))  # scale 1 / 8
    assert m2["response_tokens"] == 8 and float(unmasked.detach()) != pytest.approx(float(loss.detach()), rel=1e-3)


def test_changing_what_prompt_positions_predict_leaves_the_masked_loss_unchanged(model):
    """Replace the logits at every prompt position (what they predict) with noise: the SFT loss stays the same."""
    ids = [5, 6, 7, 8, 9, 20, 21, 22, 2]
    batch = pad_batch([{"input_ids": ids, "labels": [-100] * 5 + ids[5:]}], pad_id=0)

    def loss_with(noise):
        def perturb(_, __, output):
            output = output.clone()
            output[0, :4] += noise  # positions 0..3 predict prompt tokens 1..4
            return output

        handle = model.lm_head.register_forward_hook(perturb)
        try:
            with torch.no_grad():
                return float(SFTLoss()(model, batch, BatchTotals(tokens=1))[0])
        finally:
            handle.remove()

    torch.manual_seed(1)
    base = loss_with(0.0)
    assert loss_with(10 * torch.randn(4, model.config.vocab_size)) == base
    # The same perturbation one position later (the first response prediction) does change it.
    labels_shifted = pad_batch([{"input_ids": ids, "labels": [-100] * 4 + ids[4:]}], pad_id=0)
    batch.update(labels_shifted)
    assert loss_with(10 * torch.randn(4, model.config.vocab_size)) != pytest.approx(loss_with(0.0))


def test_packed_rows_score_like_the_examples_alone(model):
    """Two SFT examples packed into one row give the NLL sum and token count of the two run separately: the
    second example does not attend to the first."""
    from rlhf_ray.data.batching import pack_examples

    a = {"input_ids": [5, 6, 7, 20, 21, 2], "labels": [-100, -100, -100, 20, 21, 2], "location": "a"}
    b = {"input_ids": [8, 9, 30, 31, 32], "labels": [-100, -100, 30, 31, 32], "location": "b"}
    packed = pad_batch(pack_examples([a, b], max_length=16), pad_id=0)
    assert packed["input_ids"].shape[0] == 1 and "segment_ids" in packed
    with torch.no_grad():
        _, together = SFTLoss()(model, packed, BatchTotals(tokens=1))
        alone = [SFTLoss()(model, pad_batch([e], pad_id=0), BatchTotals(tokens=1))[1] for e in (a, b)]
    assert together["response_tokens"] == sum(m["response_tokens"] for m in alone) == 6
    assert together["nll_sum"] == pytest.approx(sum(m["nll_sum"] for m in alone), abs=1e-4)


def test_policy_objective_on_policy_is_minus_mean_advantage(model):
    """With pi_old = pi (first epoch, no update yet) the PPO ratio is 1, so the token-mean loss is
    -sum(A * mask) / num_tokens, times grad_scale; the KL and entropy terms are off."""
    ids = torch.tensor([[5, 6, 7, 20, 21, 22, 0], [8, 9, 10, 11, 30, 31, 2]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7])
    action = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        old = gather_token_logprobs(model(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:])
    adv = torch.tensor([[0, 0, 1.0, 1.0, 1.0, 0], [0, 0, 0, -2.0, -2.0, -2.0]])
    mb = {"input_ids": ids, "attention_mask": attention, "action_mask": action, "old_logprobs": old,
          "advantages": adv, "rollout_logprobs": old}
    objective = PolicyLoss(policy_loss="ppo_clip", clip_low=0.2, clip_high=0.2, dual_clip=None, loss_agg="token_mean",
                           temperature=1.0, entropy_coef=0.0, kl_estimator="k3", kl_in_loss=False,
                           off_policy_correction="token_tis", old_from_update=False)
    loss, metrics = objective(model, mb, BatchTotals(tokens=12, sequences=4, horizon=3, grad_scale=2.0))
    # sum(A * mask) = 3 * 1 + 3 * (-2) = -3 over a mini-batch of 12 action tokens: -(-3) / 12 * 2 = 0.5
    assert float(loss.detach()) == pytest.approx(0.5, abs=1e-5)
    assert metrics["action_tokens"] == 6 and metrics["clipped_sum"] == 0
    assert metrics["approx_kl_sum"] == pytest.approx(0.0, abs=1e-10)


def test_policy_objective_old_from_update_equals_a_separate_old_pass(model):
    """algo.old_logprobs: update. pi_old taken from the update's own forward pass gives the loss, the gradient
    and the metrics that a separate pi_old pass over the same weights gives (importance weights included),
    and reports sum |pi_old - rollout| over action tokens."""
    ids = torch.tensor([[5, 6, 7, 20, 21, 22, 0], [8, 9, 10, 11, 30, 31, 2]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7])
    action = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        old = gather_token_logprobs(model(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:])
    rollout = old + 0.25 * action  # vLLM's numbers off by 0.25 on action tokens: w = exp(-0.25) there
    adv = torch.tensor([[0, 0, 1.0, -0.5, 2.0, 0], [0, 0, 0, -2.0, 0.5, -1.0]])
    kwargs = dict(policy_loss="ppo_clip", clip_low=0.2, clip_high=0.2, dual_clip=3.0, loss_agg="token_mean",
                  temperature=1.0, entropy_coef=0.0, kl_estimator="k3", kl_in_loss=False,
                  off_policy_correction="token_tis")
    totals = BatchTotals(tokens=6, sequences=2, horizon=3, grad_scale=1.0)
    base = {"input_ids": ids, "attention_mask": attention, "action_mask": action, "advantages": adv,
            "rollout_logprobs": rollout}
    results = []
    for mb, old_from_update in (({**base, "old_logprobs": old}, False), (base, True)):
        model.zero_grad()
        loss, metrics = PolicyLoss(**kwargs, old_from_update=old_from_update)(model, mb, totals)
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, m_a, g_a), (loss_b, m_b, g_b) = results
    # ratio 1 and w = exp(-0.25) on every action token: loss = -exp(-0.25) * sum(A * mask) / 6
    want = -float(torch.exp(torch.tensor(-0.25))) * (1.0 - 0.5 + 2.0 - 2.0 + 0.5 - 1.0) / 6
    assert float(loss_a) == pytest.approx(want, abs=1e-5) and float(loss_b) == pytest.approx(want, abs=1e-5)
    assert len(g_a) == len(g_b) > 0 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_a, g_b))
    assert {k: v for k, v in m_b.items() if k != "old_rollout_absdiff_sum"} == pytest.approx(m_a, abs=1e-5)
    assert m_b["old_rollout_absdiff_sum"] == pytest.approx(6 * 0.25, abs=1e-5)  # 6 action tokens x 0.25
    model.zero_grad()


# On-policy (pi_old = the model's own log-probs, PPO ratio 1, loss -w_t A_t per token) with vLLM's numbers off by
# d = old - rollout on the action tokens: token ratios exp(d) row 0 [3, 0.4, 1], row 1 [1, 1.2, 1.25]; sequence
# ratios 3 * 0.4 * 1 = 1.2 and 1 * 1.2 * 1.25 = 1.5. A = +1 on row 0, -2 on row 1; token_mean over 6 tokens.
OFF_POLICY_CASES = [
    # name, params, sum_t w_t A_t -> loss = -sum / 6, metric sums (units, ratio, capped, masked)
    ("none", {}, 3 * 1 - 3 * 2.0, ("tokens", 6, 7.85, 0, 0)),                 # w = 1: -3; ratios sum 7.85
    ("token_tis", {"cap": 2.0}, (2 + 0.4 + 1) - 2 * (1 + 1.2 + 1.25), ("tokens", 6, 7.85, 1, 0)),  # 3 -> 2: -3.5
    ("seq_tis", {"cap": 1.4}, 3 * 1.2 - 2 * 3 * 1.4, ("sequences", 2, 2.7, 1, 0)),   # 1.5 -> 1.4: 3.6 - 8.4 = -4.8
    ("seq_mask", {"low": 0.5, "high": 1.3}, 3 * 1.2 - 0.0, ("sequences", 2, 2.7, 0, 1)),  # row 1 dropped: 3.6
    ("icepop", {"low": 0.5, "high": 2.0}, 1.0 - 2 * (1 + 1.2 + 1.25), ("tokens", 6, 7.85, 0, 2)),  # 3, 0.4 dropped
]


def _off_policy_batch(model):
    """``OFF_POLICY_CASES``' two sequences: (ids, attention, action mask, the model's log-probs as pi_old, d = old -
    rollout with the token ratios exp(d) of the cases on the action tokens)."""
    ids = torch.tensor([[5, 6, 7, 20, 21, 22, 0], [8, 9, 10, 11, 30, 31, 2]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7])
    action = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        old = gather_token_logprobs(model(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:])
    d = torch.zeros(2, 6)
    d[0, 2:5] = torch.log(torch.tensor([3.0, 0.4, 1.0]))
    d[1, 3:6] = torch.log(torch.tensor([1.0, 1.2, 1.25]))
    return ids, attention, action, old, d


@pytest.mark.parametrize("name, params, weighted_adv_sum, sums", OFF_POLICY_CASES)
def test_policy_objective_applies_the_off_policy_correction(model, name, params, weighted_adv_sum, sums):
    """The configured correction's weights multiply the per-token policy loss, and its metric sums come back."""
    from rlhf_ray.algos.off_policy import OffPolicyParams

    ids, attention, action, old, d = _off_policy_batch(model)
    adv = torch.tensor([[0, 0, 1.0, 1.0, 1.0, 0], [0, 0, 0, -2.0, -2.0, -2.0]])
    mb = {"input_ids": ids, "attention_mask": attention, "action_mask": action, "old_logprobs": old,
          "advantages": adv, "rollout_logprobs": old - d}
    objective = PolicyLoss(policy_loss="ppo_clip", clip_low=0.2, clip_high=0.2, dual_clip=None, loss_agg="token_mean",
                           temperature=1.0, entropy_coef=0.0, kl_estimator="k3", kl_in_loss=False,
                           off_policy_correction=name, old_from_update=False, off_policy=OffPolicyParams(**params))
    assert "rollout_logprobs" in objective.fields
    loss, metrics = objective(model, mb, BatchTotals(tokens=6, sequences=2, horizon=3, grad_scale=1.0))
    assert float(loss.detach()) == pytest.approx(-weighted_adv_sum / 6, abs=1e-5)
    level, units, ratio_sum, capped, masked = sums
    assert metrics[f"importance_{level}"] == units
    assert metrics["importance_ratio_sum"] == pytest.approx(ratio_sum, abs=1e-5)
    assert (metrics["importance_capped_sum"], metrics["importance_masked_sum"]) == (capped, masked)


@pytest.mark.parametrize("name, params, weight_sum", [
    ("none", {}, 6.0),                                                   # w = 1 on the 6 action tokens
    ("token_tis", {"cap": 2.0}, (2 + 0.4 + 1) + (1 + 1.2 + 1.25)),     # 3 capped to 2: 6.85
    ("icepop", {"low": 0.5, "high": 2.0}, 1 + (1 + 1.2 + 1.25)),        # 3 and 0.4 masked: 4.45
])
def test_policy_objective_weighs_the_kl_in_the_loss_like_the_policy_term(model, name, params, weight_sum):
    """algo.kl_in: loss with a correction: the KL term of a token sampled by the engine is weighed by the same w_t
    as its policy-gradient term. Zero advantages leave the KL term alone: pi = pi_old and ref = pi_old - 0.5 on
    the action tokens, so k1 = logp - ref = 0.5 there, and loss = kl_coef * 0.5 * sum_t w_t / 6 (token_mean),
    with the token ratios of ``OFF_POLICY_CASES`` (row 0 [3, 0.4, 1], row 1 [1, 1.2, 1.25])."""
    from rlhf_ray.algos.off_policy import OffPolicyParams

    ids, attention, action, old, d = _off_policy_batch(model)
    mb = {"input_ids": ids, "attention_mask": attention, "action_mask": action, "old_logprobs": old,
          "advantages": torch.zeros(2, 6), "rollout_logprobs": old - d, "ref_logprobs": old - 0.5 * action}
    objective = PolicyLoss(policy_loss="ppo_clip", clip_low=0.2, clip_high=0.2, dual_clip=None, loss_agg="token_mean",
                           temperature=1.0, entropy_coef=0.0, kl_estimator="k1", kl_in_loss=True,
                           off_policy_correction=None if name == "none" else name, old_from_update=False,
                           off_policy=OffPolicyParams(**params)).with_kl_coef(0.1)
    loss, metrics = objective(model, mb, BatchTotals(tokens=6, sequences=2, horizon=3, grad_scale=1.0))
    assert float(loss.detach()) == pytest.approx(0.1 * 0.5 * weight_sum / 6, abs=1e-6)
    assert metrics["kl_sum"] == pytest.approx(6 * 0.5, abs=1e-5)  # the KL metric itself stays unweighted


def test_policy_objective_without_a_correction_needs_no_rollout_logprobs(model):
    """off_policy_correction None (pi_old is the engine's own): w = 1, no rollout log-probs, no importance sums."""
    ids = torch.tensor([[5, 6, 7, 20, 21, 22, 0]])
    action = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.float32)
    mb = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0]]), "action_mask": action,
          "advantages": 2.0 * action}
    with torch.no_grad():
        mb["old_logprobs"] = gather_token_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    objective = PolicyLoss(policy_loss="ppo_clip", clip_low=0.2, clip_high=0.2, dual_clip=None, loss_agg="token_mean",
                           temperature=1.0, entropy_coef=0.0, kl_estimator="k3", kl_in_loss=False,
                           off_policy_correction=None, old_from_update=False)
    assert "rollout_logprobs" not in objective.fields
    loss, metrics = objective(model, mb, BatchTotals(tokens=3, sequences=1, horizon=3))
    assert float(loss.detach()) == pytest.approx(-2.0, abs=1e-5)   # -sum(A) / 3 = -6 / 3
    assert not any(k.startswith("importance_") for k in metrics)


def test_policy_objective_sequence_ratio_is_gspo(model):
    """algo.ratio_level: sequence. Loss and parameter gradients equal GSPO's sequence objective computed directly,
    -1/G sum_b min(s_b A_b, clip(s_b, 1 - e_low, 1 + e_high) A_b), s_b = exp(mean_t (logp - old)) with autograd
    through s_b, on the same model; the per-token ratio gives another gradient."""
    ids = torch.tensor([[5, 6, 7, 20, 21, 22, 0], [8, 9, 10, 11, 30, 31, 2]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1] * 7])
    action = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        logp0 = gather_token_logprobs(model(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:])
    delta = torch.zeros(2, 6)   # logp - old on the action tokens
    delta[0, 2:5] = torch.tensor([0.1, 0.3, 0.2])     # mean 0.2  -> s_0 = e^0.2 = 1.2214, above 1 + 0.2: clipped
    delta[1, 3:6] = torch.tensor([-0.2, 0.0, -0.1])   # mean -0.1 -> s_1 = e^-0.1 = 0.9048, inside
    old = logp0 - delta
    adv = torch.tensor([[0, 0, 1.0, 1.0, 1.0, 0], [0, 0, 0, -1.0, -1.0, -1.0]])
    mb = {"input_ids": ids, "attention_mask": attention, "action_mask": action, "old_logprobs": old,
          "advantages": adv}
    totals = BatchTotals(tokens=6, sequences=2, horizon=3, grad_scale=1.0)

    def run(ratio_level):
        model.zero_grad()
        loss, metrics = PolicyLoss(policy_loss="ppo_clip", clip_low=0.2, clip_high=0.2, dual_clip=None,
                                   loss_agg="seq_mean_token_mean", temperature=1.0, entropy_coef=0.0,
                                   kl_estimator="k3", kl_in_loss=False, off_policy_correction=None,
                                   old_from_update=False, ratio_level=ratio_level)(model, mb, totals)
        loss.backward()
        return float(loss.detach()), metrics, [p.grad.clone() for p in model.parameters()]

    loss, metrics, grads = run("sequence")
    # -(1/2) [min(1.2214 * 1, 1.2 * 1) + min(0.9048 * -1, 0.9048 * -1)] = -(1.2 - 0.9048374) / 2 = -0.1475813
    assert loss == pytest.approx(-(1.2 - math.exp(-0.1)) / 2, abs=1e-5)
    assert metrics["clipped_sum"] == 3   # row 0's three tokens: the sequence is clipped as a whole

    model.zero_grad()
    logp = gather_token_logprobs(model(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), ids[:, 1:])
    s = torch.exp(((logp - old) * action).sum(-1) / action.sum(-1))
    a = torch.tensor([1.0, -1.0])
    direct = -torch.minimum(s * a, s.clamp(0.8, 1.2) * a).mean()
    direct.backward()
    assert float(direct.detach()) == pytest.approx(loss, abs=1e-5)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))
    _, _, token_grads = run("token")   # row 0's first token (e^0.1 < 1.2) is not clipped per token: another step
    assert not all(torch.allclose(g, t, atol=1e-6) for g, t in zip(grads, token_grads))
    model.zero_grad()


def test_token_logprobs_forward_applies_temperature(model):
    ids = torch.tensor([[5, 6, 7, 8]])
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1] / 0.5
        want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        got = TokenLogprobs(temperature=0.5)(model, mb)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
