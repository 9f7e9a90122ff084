"""Reward model, DPO and KTO end to end on the real stack (2 DeepSpeed learner actors in Ray, ZeRO-2 over
gloo, the demo preference sets), plus the bad-input paths of the jobs' ``prepare_data`` and the objectives
on a tiny model without Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import ConfigError, load_config, resolve
from rlhf_ray.data.errors import DataError
from rlhf_ray.jobs import get_job
from rlhf_ray.metrics import read_metrics


REPO = Path(__file__).resolve().parents[2]
EXAMPLES = {"rm": "examples/rm_tiny_cpu.yaml", "dpo": "examples/dpo_tiny_cpu.yaml", "kto": "examples/kto_tiny_cpu.yaml"}


def pref_config(job: str, model_dir: str, out: Path, **over):
    """examples/<job>_tiny_cpu.yaml (the README's example of the job), with the tests' settings."""
    values = {
        "model.path": model_dir,
        "train.save_every": 0,
        "data.path": "demo:kto" if job == "kto" else "demo:preferences",
        "data.demo_size": 512,
        "data.max_length": 96,
        "data.eval_fraction": 0.1,
        "learner.num_workers": 2,
        "learner.gpus_per_worker": 0,
        "learner.zero_stage": 2,
        "learner.micro_batch_size": 8,
        "learner.global_batch_size": 16,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 5,
        "train.output_dir": str(out),
        "train.timeout_s": 180,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
    }
    values.update(over)
    return load_config(REPO / EXAMPLES[job], values=values)


def evals(out: Path) -> list[dict]:
    """The metrics rows that carry an evaluation (step 0 = before training)."""
    return [r for r in read_metrics(out / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]


# ---- reward model --------------------------------------------------------------------------------

def test_reward_model_learns_and_exports_a_sequence_classifier(trained_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, result, out = trained_rm  # the rm job, 120 steps (tests/e2e/conftest.py)
    rows = evals(out)
    assert rows[0]["step"] == 0 and result["initial_eval"] == {k: v for k, v in rows[0].items() if k.startswith("eval/")}
    assert result["metrics"]["eval/accuracy"] > 0.9, [r["eval/accuracy"] for r in rows]
    assert result["metrics"]["eval/loss"] < rows[0]["eval/loss"] - 0.4  # from ~log 2
    assert result["metrics"]["eval/margin"] > 1.0
    train_rows = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
    assert all(k.split("/")[0] in ("train", "eval", "timing", "efficiency") for r in train_rows for k in r
               if k not in ("step", "time_s"))

    # The export is a plain sequence classifier: one label, a pad token, the trained score head.
    final = result["final_model"]
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    tok = AutoTokenizer.from_pretrained(final)
    _, held_out, _ = get_job("rm").prepare_data(cfg, tok)
    with torch.no_grad():  # transformers' own forward: the score at the last token of an unpadded sequence
        score = lambda ids: model(input_ids=torch.tensor([ids])).logits[0, 0].item()  # noqa: E731
        wins = [score(ex["chosen"]["input_ids"]) > score(ex["rejected"]["input_ids"]) for ex in held_out]
    assert sum(wins) / len(wins) > 0.9, sum(wins)


# ---- DPO -----------------------------------------------------------------------------------------

DPO_STEPS = 40


@pytest.fixture(scope="module")
def dpo_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    """One DPO run (precomputed reference, constant LR so early steps do not depend on the run length)."""
    out = tmp_path_factory.mktemp("dpo") / "run"
    cfg = pref_config("dpo", tiny_model_dir, out, **{
        "train.max_steps": DPO_STEPS, "train.eval_every": 20, "optim.schedule": "constant", "optim.warmup_steps": 0})
    return get_job("dpo").run(cfg), out


def test_dpo_raises_heldout_preference_accuracy_and_margin(dpo_run):
    result, out = dpo_run
    rows = evals(out)
    first, last = rows[0], result["metrics"]
    # Before training the policy is the reference: every implicit reward is 0 (a tie, so accuracy 0).
    assert first["step"] == 0 and first["eval/margin"] == pytest.approx(0.0, abs=1e-4)
    assert first["eval/reward_accuracy"] < 0.5 and first["eval/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert last["eval/reward_accuracy"] > 0.8, [r["eval/reward_accuracy"] for r in rows]
    assert last["eval/margin"] > 0.5 and last["eval/rewards_chosen"] > last["eval/rewards_rejected"]
    assert last["eval/loss"] < first["eval/loss"] - 0.2
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
    assert len(train) == DPO_STEPS and {"train/reward_accuracy", "train/margin", "train/rewards_chosen",
                                        "train/rewards_rejected", "train/logps_chosen"} <= set(train[-1])


def test_dpo_reference_group_matches_precomputed_reference(dpo_run, tiny_model_dir, tmp_path):
    """A frozen reference group scoring each step gives the losses the precomputed reference gave."""
    _, base_out = dpo_run
    out = tmp_path / "group"
    cfg = pref_config("dpo", tiny_model_dir, out, **{
        "train.max_steps": 3, "dpo.reference": "group", "data.eval_fraction": 0.1,
        "optim.schedule": "constant", "optim.warmup_steps": 0})
    get_job("dpo").run(cfg)
    base = [r for r in read_metrics(base_out / "metrics.jsonl") if r["step"] > 0][:3]
    group = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
    for key in ("train/loss", "train/margin", "train/logps_chosen"):
        assert [r[key] for r in group] == pytest.approx([r[key] for r in base], rel=1e-4, abs=1e-4), key
    assert evals(out)[0]["eval/margin"] == pytest.approx(0.0, abs=1e-4)


# ---- KTO -----------------------------------------------------------------------------------------

def test_kto_moves_implicit_rewards_the_right_way(ray_cluster, tiny_model_dir, tmp_path):
    out = tmp_path / "kto"
    beta = 0.1
    cfg = pref_config("kto", tiny_model_dir, out, **{
        "train.max_steps": 60, "train.eval_every": 30, "optim.lr": 1e-3, "kto.beta": beta})
    result = get_job("kto").run(cfg)
    assert 1.0 <= result["data"]["weighted_desirable_ratio"] <= 4 / 3  # demo:kto is ~55% desirable
    first, last = evals(out)[0], result["metrics"]
    assert first["eval/reward_margin"] == pytest.approx(0.0, abs=1e-4) and first["eval/loss"] == pytest.approx(0.5, abs=1e-4)
    # KTO's value is relative to its reference point beta * z0 (z0 = the policy-vs-reference KL estimate):
    # desirable completions end above it, undesirable ones below, on held-out data.
    point = beta * last["eval/kl"]
    assert last["eval/rewards_desirable"] > point > last["eval/rewards_undesirable"], last
    assert last["eval/reward_margin"] > 0.5
    assert last["eval/loss"] < first["eval/loss"] - 0.05


# ---- bad inputs (no Ray) ------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "What is 1 + 1?", "chosen": "1 + 1 = 2. The answer is 2.", "rejected": "1 + 1 = 3. The answer is 3."}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from rlhf_ray.jobs.common import load_tokenizer

    return load_tokenizer(resolve(load_config(values={"model.path": tiny_model_dir})))


@pytest.mark.parametrize("job", ["rm", "dpo"])
def test_bad_pairs_name_the_row_or_are_counted(job, tiny_model_dir, tmp_path, tok):
    cases = {
        "missing": ({"prompt": "q", "chosen": "a"}, r"bad.jsonl:2: missing field 'rejected'", "skipped"),
        "identical": ({"prompt": "q", "chosen": "a", "rejected": "a"}, r"bad.jsonl:2: 'chosen' and 'rejected' are identical",
                      "skipped"),
    }
    for name, (bad, message, counter) in cases.items():
        path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad, GOOD])
        cfg = pref_config(job, tiny_model_dir, tmp_path / "o", **{"data.path": path, "data.eval_fraction": 0.0})
        with pytest.raises(DataError, match=message):
            get_job(job).prepare_data(cfg, tok)
        cfg = pref_config(job, tiny_model_dir, tmp_path / "o", **{"data.path": path, "data.eval_fraction": 0.0,
                                                                   "data.on_bad_row": "skip"})
        train, _, counts = get_job(job).prepare_data(cfg, tok)
        assert len(train) == 2 and counts[counter] == 1, (name, counts)

    # A prompt that leaves no room for the response: counted and dropped under truncate, named under error.
    long_prompt = dict(GOOD, prompt="x" * 200)
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, long_prompt, GOOD])
    cfg = pref_config(job, tiny_model_dir, tmp_path / "o", **{
        "data.path": path, "data.eval_fraction": 0.0, "data.max_prompt_length": 256, "data.overlength": "truncate"})
    train, _, counts = get_job(job).prepare_data(cfg, tok)
    assert len(train) == 2 and counts["dropped_prompt_too_long"] == 1
    cfg = pref_config(job, tiny_model_dir, tmp_path / "o", **{
        "data.path": path, "data.eval_fraction": 0.0, "data.max_prompt_length": 256, "data.overlength": "error"})
    with pytest.raises(DataError, match=r"long.jsonl:2: prompt of \d+ tokens .* does not fit"):
        get_job(job).prepare_data(cfg, tok)

    # Nothing usable at all: one error with the counts.
    path = write_jsonl(tmp_path / "none.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 3)
    cfg = pref_config(job, tiny_model_dir, tmp_path / "o", **{"data.path": path, "data.eval_fraction": 0.0,
                                                               "data.on_bad_row": "skip"})
    with pytest.raises(DataError, match=r"no preference examples left .*skipped 3"):
        get_job(job).prepare_data(cfg, tok)


def test_rm_margin_field(tiny_model_dir, tmp_path, tok):
    rows = [dict(GOOD, m=2.0), dict(GOOD), dict(GOOD, m="big")]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    over = {"data.path": path, "data.eval_fraction": 0.0, "rm.margin_field": "m", "rm.margin": 0.5}
    with pytest.raises(DataError, match=r"m.jsonl:3: field 'm' \(rm.margin_field\) must be a finite number >= 0"):
        get_job("rm").prepare_data(pref_config("rm", tiny_model_dir, tmp_path / "o", **over), tok)
    train, _, counts = get_job("rm").prepare_data(
        pref_config("rm", tiny_model_dir, tmp_path / "o", **over, **{"data.on_bad_row": "skip"}), tok)
    assert [ex["margin"] for ex in train] == [2.0, 0.5] and counts["skipped_bad_margin"] == 1


def test_bad_kto_rows(tiny_model_dir, tmp_path, tok):
    good = {"prompt": "What is 1 + 1?", "completion": "1 + 1 = 2. The answer is 2.", "label": True}
    bad_label = dict(good, label="yes")
    path = write_jsonl(tmp_path / "k.jsonl", [good, bad_label, dict(good, label=False)])
    cfg = pref_config("kto", tiny_model_dir, tmp_path / "o", **{"data.path": path, "data.eval_fraction": 0.0})
    with pytest.raises(DataError, match=r"k.jsonl:2: field 'label' must be true/false"):
        get_job("kto").prepare_data(cfg, tok)
    cfg = pref_config("kto", tiny_model_dir, tmp_path / "o", **{"data.path": path, "data.eval_fraction": 0.0,
                                                                 "data.on_bad_row": "skip"})
    train, _, counts = get_job("kto").prepare_data(cfg, tok)
    assert counts["skipped"] == 1 and [ex["desirable"] for ex in train] == [True, False]
    # each example's mismatched half is its prompt with the other example's completion
    assert train[0]["kl"]["input_ids"] == train[0]["prompt_ids"] + train[1]["completion_ids"]
    path = write_jsonl(tmp_path / "one.jsonl", [good])
    cfg = pref_config("kto", tiny_model_dir, tmp_path / "o", **{"data.path": path, "data.eval_fraction": 0.0})
    with pytest.raises(DataError, match=r"single example"):
        get_job("kto").prepare_data(cfg, tok)


def test_bad_preference_config_names_the_key(tiny_model_dir, tmp_path):
    for over, key in (({"dpo.loss": "hinge"}, "dpo.loss"), ({"dpo.loss": "ipo", "dpo.label_smoothing": 0.1},
                                                           "dpo.label_smoothing"),
                      ({"dpo.beta": 0}, "dpo.beta"), ({"kto.undesirable_weight": -1}, "kto.undesirable_weight"),
                      ({"rm.margin": -1}, "rm.margin"), ({"dpo.reference": "frozen"}, "dpo.reference")):
        with pytest.raises(ConfigError, match=rf"^{key}: "):
            pref_config("dpo", tiny_model_dir, tmp_path, **over)


# ---- objectives and the lockstep split, on a tiny model without Ray -------------------------------

def test_lockstep_calls_keep_ranks_in_step():
    from rlhf_ray.controller.offline_batches import lockstep_calls

    calls = lockstep_calls(range(11), world=2, micro=2)  # 6 micro-batches: 3 rounds of 2 ranks, no remainder
    assert len(calls) == 1 and calls[0].per_rank == [[[0, 1], [2, 3], [4, 5]], [[6, 7], [8, 9], [10]]]
    calls = lockstep_calls(range(5), world=2, micro=2)  # [0,1] [2,3] [4]: one round, then [4] + a repeat
    assert [c.per_rank for c in calls] == [[[[0, 1]], [[2, 3]]], [[[4]], [[4]]]]
    assert [c.counted for c in calls] == [[True, True], [True, False]]


def test_ipo_length_normalized_takes_per_token_mean_log_ratios(tiny_model_dir, tok):
    """dpo.length_normalized: IPO's regression target on the mean log-ratio per completion token (policy and
    reference alike); unset, IPO keeps the paper's summed form; simpo refuses to be un-normalised."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.config.schema import DataConfig
    from rlhf_ray.data.batching import pad_batch
    from rlhf_ray.data.demo import make_demo_rows
    from rlhf_ray.data.preference import tokenize_pairs
    from rlhf_ray.data.sources import RowSet
    from rlhf_ray.objectives.common import BatchTotals
    from rlhf_ray.objectives.preference import DPOLoss, completion_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pairs = tokenize_pairs(RowSet(make_demo_rows("preferences", 3), ["0", "1", "2"], "p"), tok, DataConfig()).examples
    mb = pad_batch([e["chosen"] for e in pairs] + [e["rejected"] for e in pairs], tok.pad_token_id)
    mb["ref_logps"] = torch.tensor([[-40.0, -45.0], [-50.0, -38.0], [-30.0, -60.0]])  # (B, 2) chosen, rejected
    cfg = lambda **o: load_config(values={"job": "dpo", "model.path": tiny_model_dir, "dpo.loss": "ipo",  # noqa: E731
                                          "dpo.beta": 0.5, **o})
    assert not DPOLoss.from_config(cfg()).length_normalized
    normalized = DPOLoss.from_config(cfg(**{"dpo.length_normalized": True}))
    with torch.no_grad():
        _, m = normalized(model, mb, BatchTotals(sequences=3))
        logps, lengths = completion_logps(model, mb)
    ratios = (logps - mb["ref_logps"].T.reshape(-1)) / lengths  # chosen rows, then rejected rows
    c, r = ratios.view(2, -1)
    assert m["loss_sum"] == pytest.approx(float(((c - r - 1 / (2 * 0.5)) ** 2).sum()), rel=1e-5)
    with pytest.raises(ConfigError, match="dpo.length_normalized: simpo is defined on per-token averages"):
        cfg(**{"dpo.loss": "simpo", "dpo.length_normalized": False})


def test_objectives_at_the_reference_and_split_invariance(tiny_model_dir, tok):
    from transformers import AutoModelForCausalLM

    from rlhf_ray.data.demo import make_demo_rows
    from rlhf_ray.data.preference import tokenize_pairs, tokenize_unpaired
    from rlhf_ray.data.sources import RowSet
    from rlhf_ray.objectives.common import BatchTotals
    from rlhf_ray.objectives.preference import DPOLoss, KTOKLLogratios, KTOLoss, PairLogprobs
    from rlhf_ray.jobs.kto import collate_kto, with_mismatched
    from rlhf_ray.config.schema import DataConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = make_demo_rows("preferences", 6)
    pairs = tokenize_pairs(RowSet(rows, [str(i) for i in range(6)], "p"), tok, DataConfig()).examples

    def collate(exs):
        from rlhf_ray.data.batching import pad_batch

        mb = pad_batch([e["chosen"] for e in exs] + [e["rejected"] for e in exs], tok.pad_token_id)
        with torch.no_grad():
            mb["ref_logps"] = PairLogprobs()(model, mb)
        return mb

    dpo = DPOLoss(loss="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.0, nll_coef=0.0)
    six = BatchTotals(sequences=6)  # scale 1 / 6
    with torch.no_grad():
        whole, m = dpo(model, collate(pairs), six)
        # policy = reference: every pair costs log 2, no pair is won
        assert whole.item() == pytest.approx(math.log(2), abs=1e-5) and m["correct"] == 0
        parts = [dpo(model, collate(pairs[s:s + 2]), six)[0] for s in (0, 2, 4)]
        assert sum(p.item() for p in parts) == pytest.approx(whole.item(), abs=1e-5)

    rows = make_demo_rows("kto", 6)
    unpaired = tokenize_unpaired(RowSet(rows, [str(i) for i in range(6)], "k"), tok, DataConfig()).examples
    mb = collate_kto(with_mismatched(unpaired, 96, 0), tok.pad_token_id)
    with torch.no_grad():
        mb["ref_logps"] = PairLogprobs()(model, mb)
        loss, m = KTOLoss(beta=0.1, desirable_weight=2.0, undesirable_weight=1.0, z0=0.0)(model, mb, six)
        kl = KTOKLLogratios()(model, mb)
    n_good = int(m["desirable"])
    # at the reference with z0 = 0 each example costs weight / 2: (2 x n_good + 1 x n_bad) / 2 / 6
    assert loss.item() == pytest.approx((2.0 * n_good + (6 - n_good)) / 2 / 6, abs=1e-6)
    assert torch.allclose(kl, torch.zeros(6), atol=1e-4)
