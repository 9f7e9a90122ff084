"""What the rollout loops (``RLLoop``, ``OnlineDPOLoop``) share: prompts, generation, scoring, weight sync,
hybrid memory moves, evaluation and the efficiency report of a step."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import numpy as np

from rlhf_ray.controller.loop import Schedule, TrainLoop
from rlhf_ray.controller.recovery import classify
from rlhf_ray.controller.reward_scoring import RewardScorer, attach_prompts, score_batch
from rlhf_ray.controller.rl_metrics import rollout_metrics
from rlhf_ray.controller.worker_group import RemoteCallError, RemoteCallTimeout
from rlhf_ray.efficiency import ModelShape, efficiency_metrics, rl_step_counts
from rlhf_ray.engines.rollout_engine import SamplingSpec
from rlhf_ray.evaluation.summary import SampleSet, summarize
from rlhf_ray.metrics import PhaseTimer
from rlhf_ray.weight_sync.channel import SyncChannel

if TYPE_CHECKING:
    from rlhf_ray.controller.recovery import Recoveries
    from rlhf_ray.config.resolve import Resolved
    from rlhf_ray.controller.launch import Roles
    from rlhf_ray.controller.roles import LearnerRole
    from rlhf_ray.data.prompts import PromptSet

T = TypeVar("T")

EVAL_STREAM = 1
"""The third entropy word of ``RolloutLoop.eval_seed``: evaluation seeds are drawn apart from the training steps'."""


class RolloutLoop(TrainLoop):
    """A loop whose steps start from fresh samples of the current policy (vLLM engines)."""

    def __init__(self, resolved: "Resolved", roles: "Roles", schedule: Schedule, prompts: "PromptSet",
                 eval_prompts: Optional["PromptSet"], tokenizer, output_dir: Path,
                 recoveries: Optional["Recoveries"] = None):
        super().__init__(resolved, roles, schedule, len(prompts), output_dir, recoveries)
        self.prompts, self.eval_prompts, self.tokenizer = prompts, eval_prompts, tokenizer
        self.spec = SamplingSpec.from_config(self.cfg.rollout)
        self.scorer = RewardScorer.from_resolved(resolved, roles.reward_model, tokenizer)
        paths = resolved.paths
        self.shapes = {"policy": ModelShape.from_hf_config(paths.model),
                       "critic": (ModelShape.from_hf_config(paths.critic_model or paths.model, head="token_value")
                                  if roles.critic is not None else None),
                       "reward_model": (ModelShape.from_hf_config(paths.reward_model, head="sequence_score")
                                        if roles.reward_model is not None else None)}
        self.hybrid = resolved.swaps_memory
        assert resolved.sync is not None
        self.channel = SyncChannel(self.policy, roles.rollout, resolved.sync, self.cfg.train.timeout_s)
        self.channel.open()

    def state_roles(self) -> dict[str, "LearnerRole"]:
        roles = {"actor": self.policy}
        if self.roles.critic is not None:
            roles["critic"] = self.roles.critic
        return roles

    def before_run(self, start: int) -> dict[str, float]:
        if start or self.cfg.model.lora.load_in_4bit:
            # The engines loaded model.path. A resumed policy is another model, and so is a QLoRA one (its base
            # is the 4-bit rounding of those weights): give the engines its weights before the first rollout.
            self.sync_weights()
        elif self.hybrid:  # engines asleep since start-up (launch.Roles.start): learners make room, engines wake
            for role in self.roles.learners():
                role.offload()
            self.roles.rollout.wake_up()
        return {}

    # ---- pieces of a step ---------------------------------------------------------------------------
    def prompt_batch(self, step: int) -> list:
        """The prompts of ``step`` (epochs over the prompt set, reshuffled per epoch)."""
        return [self.prompts[i] for i in self.order.batch(step)]

    def sampling_seed(self, step: int) -> int:
        """The seed of ``step``'s sampling: a function of (engine seed, step) only."""
        return int(np.random.SeedSequence([self.resolved.role("rollout").seed, step]).generate_state(1)[0])

    def generate(self, prompts: list, timer: PhaseTimer, step: int) -> tuple[Any, Any, list]:
        """``rollout.n_samples`` responses per prompt as a ``RolloutBatch`` (with prompt texts and row fields),
        the raw generations, and each sequence's prompt example. The engines are reseeded for ``step`` first,
        so a run resumed at any step, or an engine replaced mid-step, draws the samples an uninterrupted run
        drew."""
        def sample() -> tuple[Any, Any]:
            self.roles.rollout.reseed(self.sampling_seed(step))
            return self.roles.rollout.generate([p.prompt_ids for p in prompts], self.spec,
                                               self.tokenizer.pad_token_id)

        with timer("generate"):
            batch, gens = self.on_engines(sample)
        if self.hybrid:
            with timer("sleep_wake"):
                self.roles.rollout.sleep()
                for role in self.roles.learners():
                    role.reload()
        return batch, gens, attach_prompts(batch, prompts)

    def score(self, batch, rows: list, timer: PhaseTimer) -> dict[str, float]:
        """Fill ``batch.rewards`` (reward functions here, the reward model on its group); returns reward metrics."""
        with timer("reward"):
            return score_batch(self.scorer, batch, rows)

    def on_engines(self, call: Callable[[], T], redo: bool = True) -> T:
        """``call()`` into the engines; when an engine dies or stalls (``controller.recovery``), replace it, sync
        the policy's weights into every engine and, if ``redo``, call again (else return that sync's result)."""
        while True:
            try:
                return call()
            except (RemoteCallError, RemoteCallTimeout) as exc:
                fault = classify(exc)
                # In hybrid placement an engine shares its GPU with learner ranks: the job front restarts all.
                if fault is None or fault.action != "replace_engines" or self.hybrid:
                    raise
                self.recoveries.admit(exc, in_place=True)
                self.roles.replace_engines(fault.engines)
                self.channel.open()
                synced = self.channel.push()
                if not redo:
                    return synced  # type: ignore[return-value]

    def sync_weights(self) -> dict[str, float]:
        """Policy -> engines. In hybrid mode the engines wake their weights first and their KV cache after."""
        if self.hybrid:
            self.roles.rollout.wake_up(["weights"])
        result = self.on_engines(self.channel.push, redo=False)
        if self.hybrid:
            for role in self.roles.learners():
                role.offload()
            self.roles.rollout.wake_up(["kv_cache"])
        return result

    def finish_metrics(self, metrics: dict[str, float], timer: PhaseTimer, batch, gens, sync: dict[str, float],
                       t_step: float) -> dict[str, float]:
        """Add rollout statistics, phase timings, throughput and the efficiency report of the step from ``t_step``."""
        metrics.update(rollout_metrics(batch, gens, sync))
        metrics.update(timer.pop())
        metrics["timing/step_s"] = time.perf_counter() - t_step
        metrics["efficiency/tokens_per_s"] = float(batch.attention_mask.sum()) / metrics["timing/step_s"]
        metrics["efficiency/generate_tokens_per_s"] = gens.num_tokens / max(metrics["timing/generate_s"], 1e-9)
        sh = self.shapes
        trainable = self.policy.trainable_params if self.cfg.model.lora.enabled else None
        counts = rl_step_counts(batch, self.resolved, metrics.get("weight_sync/bytes", 0.0), sh["policy"],
                                sh["critic"], sh["reward_model"], trainable)
        metrics.update(efficiency_metrics(metrics, counts, sh["policy"], self.calibration, sh["critic"],
                                          sh["reward_model"]))
        return metrics

    # ---- evaluation ---------------------------------------------------------------------------------
    def has_eval(self) -> bool:
        return self.eval_prompts is not None

    def eval_seed(self, step: int) -> int:
        """The seed of the evaluation after ``step`` steps: a function of (engine seed, step) drawn from another
        stream than ``sampling_seed``'s (a third entropy word), so an evaluation never draws a training step's
        samples; the next step reseeds the engines for its own sampling, so evaluating or not, training samples
        the same."""
        return int(np.random.SeedSequence([self.resolved.role("rollout").seed, step, EVAL_STREAM]).generate_state(1)[0])

    def evaluate(self, step: int) -> dict[str, float]:
        """The held-out prompts (``data.eval_fraction`` / ``eval_path``) sampled as ``Resolved.evaluation`` says
        (``eval.n_samples`` per prompt at ``eval.temperature``; one greedy response by default) and scored with the
        training rewards: ``eval/`` mean reward, accuracy, pass@k and maj@k (``rlhf_ray.evaluation``), response
        length; with ``eval.greedy`` one greedy response per prompt more, under ``eval/greedy/``."""
        settings = self.resolved.evaluation
        assert settings is not None
        spec = dataclasses.replace(self.spec, n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                                   max_tokens=settings.max_new_tokens)
        numbers = summarize(self.eval_samples(spec, step), settings, settings.ks)
        out = {f"eval/{k}": v for k, v in numbers.items()}
        if settings.greedy:
            greedy = summarize(self.eval_samples(dataclasses.replace(spec, n=1, temperature=0.0), step), settings, ())
            out.update({f"eval/greedy/{k}": v for k, v in greedy.items()})
        return out

    def eval_samples(self, spec: SamplingSpec, step: int) -> SampleSet:
        """Every held-out prompt sampled as ``spec`` (engines reseeded from ``eval_seed(step)``) and scored."""
        prompts = list(self.eval_prompts)

        def sample() -> tuple[Any, Any]:
            self.roles.rollout.reseed(self.eval_seed(step))
            return self.roles.rollout.generate([p.prompt_ids for p in prompts], spec, self.tokenizer.pad_token_id)

        batch, _ = self.on_engines(sample)
        samples = SampleSet()
        samples.add_batch(batch, score_batch(self.scorer, batch, attach_prompts(batch, prompts)))
        return samples
