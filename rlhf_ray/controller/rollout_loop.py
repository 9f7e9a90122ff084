"""What the rollout loops (``RLLoop``, ``OnlineDPOLoop``) share: prompts, generation, scoring, weight sync,
hybrid memory moves, evaluation and the efficiency report of a step.

Where a step's samples come from (``rollout.mode``):

    sync           step k generates its batch with the weights of every update so far (v_k), trains, syncs
    one_step_off   step k trains on the batch the engines generated during step k-1 (with v_{k-1}): it takes
                   that batch, syncs v_k into the now idle engines, starts them on batch k+1 and trains on batch
                   k meanwhile, so generation overlaps scoring, reference / critic forwards and the update. Each
                   sample is one policy version old (``rollout/staleness``); the off-policy correction against
                   the engine's own log-probs (``algo.off_policy_correction``) accounts for it.
    async          the engines fill a queue of finished, scored groups from a background thread
                   (``controller.rollout_stream``); step k takes the oldest ``prompts_per_step`` of them, each at most
                   ``rollout.max_staleness`` versions old, and the weights reach the engines between their requests
                   (``rollout.partial``: interrupting them, to continue the same samples under the new weights).

Checkpoints of a one_step_off run hold the batch in flight, those of an async run the queue with the samples in
flight finished (``rollouts_ahead.pt``): a resumed one_step_off run trains on the very samples the uninterrupted
run trained on, a resumed async run on each prompt of the epoch once.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import numpy as np
import torch

from rlhf_ray.controller.loop import PromptCursor, Schedule, TrainLoop
from rlhf_ray.controller.recovery import classify
from rlhf_ray.controller.reward_scoring import RewardScorer, attach_prompts, reward_means, score_batch
from rlhf_ray.controller.rl_metrics import rollout_metrics
from rlhf_ray.controller.rollout_stream import RolloutStream
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
AHEAD_FILE = "rollouts_ahead.pt"
ROLLOUTS_FILE = "rollouts.jsonl"


@dataclass
class Ahead:
    """Samples for a later step, generated while the current one trains (``rollout.mode: one_step_off``)."""

    step: int
    """The step that trains on them."""
    indices: list[int]
    """Their prompts' positions in the prompt set (taken from the cursor when the engines started on them)."""
    pending: Any
    """A ``PendingGeneration`` (``result()`` -> batch, generations), the ``Future`` of a thread running multi-turn
    episodes (the same result), or those already at hand (``Done``)."""
    version: int
    """The policy version (updates applied) of the weights that sampled them."""


@dataclass
class Done:
    """A finished generation, as ``PendingGeneration`` is once it has its result."""

    batch: Any
    gens: Any

    def result(self) -> tuple[Any, Any]:
        return self.batch, self.gens

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
        self.scorer = RewardScorer.from_resolved(resolved, roles.reward_model, tokenizer, roles.get("judge"))
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
        self.one_step_off = self.cfg.rollout.mode == "one_step_off"
        self.version = 0
        """Updates applied to the policy (the step in progress; set by ``before_run`` on resume)."""
        self.engine_version = 0
        """Updates applied to the weights the engines hold (they start with ``model.path``: version 0)."""
        self.ahead: Optional[Ahead] = None
        self.cursor = PromptCursor(self.order)
        """Where the run is in its prompts' epoch order (checkpointed: a resumed run takes the prompts next)."""
        self.stream: Optional[RolloutStream] = None
        if self.cfg.rollout.mode == "async":
            r = self.cfg.rollout
            a = self.cfg.algo
            self.stream = RolloutStream(roles.rollout, prompts, self.cursor, self.spec, self.scorer,
                                        tokenizer.pad_token_id, schedule.items_per_step, schedule.total_steps,
                                        r.max_staleness, r.partial, self.sampling_seed, self.cfg.train.timeout_s,
                                        self.group_reference(),
                                        a.max_filter_rounds if a.filter_groups else None)
        self.last_sync: dict[str, float] = {"seconds": 0.0, "bytes": 0.0}
        self.rows: list = []
        """Each sequence's prompt in the step's batch (for ``logging.rollouts``)."""
        self.episodes = None
        """Multi-turn episodes (``rollout.env`` / ``rollout.tools``): ``rlhf_ray.agentic.episodes.EpisodeRunner``."""
        if self.cfg.rollout.multi_turn:
            from rlhf_ray.agentic.episodes import EpisodeRunner

            self.episodes = EpisodeRunner.from_resolved(resolved, tokenizer)
        self.ahead_thread: Optional[ThreadPoolExecutor] = None
        """One step off with episodes: the thread that drives the next batch's turns while the step trains."""
        if self.episodes is not None and self.one_step_off:
            self.ahead_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="episodes-ahead")

    def state_roles(self) -> dict[str, "LearnerRole"]:
        roles = {"actor": self.policy}
        if self.roles.critic is not None:
            roles["critic"] = self.roles.critic
        return roles

    def before_run(self, start: int) -> dict[str, float]:
        self.version = self.engine_version = start
        if self.cfg.logging.rollouts:
            keep_rows_before(self.output_dir / ROLLOUTS_FILE, start)
        if start or self.cfg.model.lora.load_in_4bit:
            # The engines loaded model.path. A resumed policy is another model, and so is a QLoRA one (its base
            # is the 4-bit rounding of those weights): give the engines its weights before the first rollout.
            self.sync_weights()
        elif self.hybrid:  # engines asleep since start-up (launch.Roles.start): learners make room, engines wake
            for role in self.roles.learners():
                role.offload()
            self.roles.rollout.wake_up()
        if self.stream is not None:
            self.stream.start(start)
        return {}

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.ahead_thread is not None:
            self.ahead_thread.shutdown(wait=False, cancel_futures=True)

    def save_files(self, directory: Path, step: int) -> None:
        """One step off: the batch the engines are generating for ``step`` (finished first), so that a resumed
        run trains on the samples this one would have. Async: the queue, the samples in flight finished first."""
        if self.stream is not None:
            with self.stream.paused_for("drain"):  # the cursor with it: the thread takes prompts once resumed
                torch.save({"step": step, **self.stream.state(), "prompts_taken": self.cursor.taken,
                            "prompts_returned": list(self.cursor.returned)}, directory / AHEAD_FILE)
            return
        if self.ahead is None or self.ahead.step != step:
            return
        batch, gens = self.on_engines(self.ahead.pending.result)
        self.ahead = dataclasses.replace(self.ahead, pending=Done(batch, gens))
        torch.save({"step": step, "version": self.ahead.version, "generations": gens.to_state(),
                    "prompt_indices": list(self.ahead.indices)}, directory / AHEAD_FILE)

    def load_files(self, directory: Path, step: int) -> None:
        path = directory / AHEAD_FILE
        if not path.exists():
            return
        saved = torch.load(path, weights_only=True)
        if "groups" in saved:  # an async run's queue, and where its cursor was when the queue was saved
            self.cursor.taken = int(saved["prompts_taken"])
            self.cursor.returned = [int(i) for i in saved["prompts_returned"]]
            if self.stream is not None:
                self.stream.load_state(saved)
            else:  # resumed in another mode: sample those prompts again
                self.cursor.give_back([int(g["prompt"]) for g in saved["groups"]])
            return
        if self.stream is not None:  # a one-step-off batch, resumed async
            self.cursor.give_back([int(i) for i in saved["prompt_indices"]])
            return
        if not self.one_step_off:  # a sync run resumed from a one-step-off checkpoint: take those prompts again
            self.cursor.taken -= len(saved["prompt_indices"])
            return
        from rlhf_ray.controller.roles import batch_of
        from rlhf_ray.engines.rollout_engine import Generations

        gens = Generations.from_state(saved["generations"])
        indices = [int(i) for i in saved["prompt_indices"]]
        batch = batch_of([self.prompts[i].prompt_ids for i in indices], gens, self.tokenizer.pad_token_id)
        self.ahead = Ahead(step, indices, Done(batch, gens), int(saved["version"]))

    def extra_state(self) -> dict[str, Any]:
        return {"prompts_taken": self.cursor.taken, "prompts_returned": list(self.cursor.returned)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        per_step = self.schedule.items_per_step
        self.cursor.taken = int(state.get("prompts_taken", state["step"] * per_step))
        self.cursor.returned = [int(i) for i in state.get("prompts_returned", [])]

    def group_reference(self) -> Optional[Callable[[Any], Any]]:
        """What starts the reference forward of a chunk of finished groups in the async stream (so it runs as
        samples finish); None: the step runs it, or the job has no reference on its rollouts."""
        return None

    # ---- pieces of a step ---------------------------------------------------------------------------
    def sampling_seed(self, step: int, round_: int = 0) -> int:
        """The seed of ``step``'s sampling (round ``round_`` of its refills): a function of (engine seed, step,
        round) only."""
        key = [self.resolved.role("rollout").seed, step] + ([round_] if round_ else [])
        return int(np.random.SeedSequence(key).generate_state(1)[0])

    def generate(self, timer: PhaseTimer, step: int, n_prompts: Optional[int] = None,
                 round_: int = 0) -> tuple[Any, Any, list]:
        """``rollout.n_samples`` responses to each of the next ``n_prompts`` prompts (default: a step's) as a
        ``RolloutBatch`` (with prompt texts and row fields, ``batch.staleness``), the raw generations, and each
        sequence's prompt example: sampled now, or (one step off) taken from the engines' work during the
        previous step (``rollout_batch`` then starts them on the next batch).

        The engines are reseeded for the step (and refill round) they sample for, so a run resumed at any step,
        or an engine replaced mid-step, draws the samples an uninterrupted run drew."""
        fresh = self.ahead is None or self.ahead.step != step or round_ > 0
        ahead = None if fresh else self.ahead
        if ahead is not None:
            self.ahead = None
            indices = ahead.indices
        else:
            indices = self.cursor.take(n_prompts or self.schedule.items_per_step)
        prompts = [self.prompts[i] for i in indices]
        if self.hybrid and round_ > 0:  # a refill: the learners hold the GPUs since the last round; hand them back
            with timer("sleep_wake"):
                for role in self.roles.learners():
                    role.offload()
                self.roles.rollout.wake_up()

        def sample() -> tuple[Any, Any]:
            self.roles.rollout.reseed(self.sampling_seed(step, round_))
            if self.episodes is not None:
                return self.episodes.run(self.roles.rollout, prompts, self.spec, self.tokenizer.pad_token_id)
            return self.roles.rollout.generate([p.prompt_ids for p in prompts], self.spec,
                                               self.tokenizer.pad_token_id)

        with timer("generate"):  # one step off: the wait for what the engines generated meanwhile
            if ahead is not None:
                taken = []

                def take() -> tuple[Any, Any]:
                    if taken:  # an engine died on it and was replaced: sample anew under the current weights
                        return sample()
                    taken.append(True)
                    return ahead.pending.result()

                batch, gens = self.on_engines(take)
                version = ahead.version if len(taken) == 1 else self.engine_version
            else:
                batch, gens = self.on_engines(sample)
                version = self.engine_version
        batch.staleness = step - version
        if self.hybrid:
            with timer("sleep_wake"):
                self.roles.rollout.sleep()
                for role in self.roles.learners():
                    role.reload()
        return batch, gens, attach_prompts(batch, prompts)

    def rollout_batch(self, step: int, timer: PhaseTimer) -> tuple[Any, Any, list, dict[str, float]]:
        """Step 1: the step's samples as (batch, generations, each sequence's prompt, metrics). Scored already
        (``batch.rewards`` set, reward metrics included) when they are scored as they are sampled: DAPO's refills
        (``algo.filter_groups``) and the async stream; else the caller scores them, overlapping its forwards."""
        if self.stream is not None:  # with algo.filter_groups too: the stream refills as it scores
            out = self.streamed_batch(step, timer)
        elif self.cfg.algo.filter_groups:
            out = self.varied_batch(step, timer)
        else:
            out = (*self.generate(timer, step), {})
        if self.one_step_off and step + 1 < self.schedule.total_steps:  # once the step's samples (refills too) are in
            self.start_ahead(step + 1, timer)
        self.rows = out[2]
        return out

    def streamed_batch(self, step: int, timer: PhaseTimer) -> tuple[Any, Any, list, dict[str, float]]:
        """``rollout.mode: async``: the step's groups from the stream's queue (scored as they finished), as one
        batch in the order they were started, with the step's ``rollout/`` staleness and queue numbers."""
        from rlhf_ray.controller.roles import batch_of
        from rlhf_ray.engines.rollout_engine import Generations

        assert self.stream is not None
        with timer("generate"):  # the wait for the queue
            groups, numbers = self.stream.take(self.version, self.channel.push)
        self.last_sync = {"seconds": self.last_sync["seconds"] + numbers.pop("sync_seconds"),
                          "bytes": self.last_sync["bytes"] + numbers.pop("sync_bytes")}
        prompts = [self.prompts[g.prompt] for g in groups]
        # The engines' own seconds since the last step took its groups (``rollout/generate_engine_s``).
        gens = Generations.of_groups([g.gens for g in groups], numbers.pop("generate_engine_s"))
        batch = batch_of([p.prompt_ids for p in prompts], gens, self.tokenizer.pad_token_id)
        rows = attach_prompts(batch, prompts)
        batch.rewards = torch.cat([g.rewards for g in groups])
        if groups[0].ref_logprobs is not None:  # computed as the groups finished
            batch.ref_logprobs = batch.from_actions([lp for g in groups for lp in g.ref_logprobs])
        ages = np.concatenate([[self.version - int(v.min()) if len(v) else 0 for v in g.versions] for g in groups])
        batch.staleness = int(ages.max())
        metrics = reward_means({k: torch.cat([g.parts[k] for g in groups]) for k in groups[0].parts})
        metrics.update(numbers)
        metrics.update({"rollout/staleness_mean": float(ages.mean()),
                        "rollout/partial_samples": float(sum(g.continued for g in groups)),
                        "rollout/score_s": sum(g.score_s for g in groups)})
        if batch.ref_logprobs is not None:
            metrics["rollout/reference_s"] = sum(g.reference_s for g in groups)
        return batch, gens, rows, metrics

    def varied_batch(self, step: int, timer: PhaseTimer) -> tuple[Any, Any, list, dict[str, float]]:
        """DAPO's dynamic sampling (``algo.filter_groups``): generate and score a step's prompts, keep the groups
        whose rewards differ (``algos.filtering.varied_groups``), and sample the shortfall from the next prompts,
        for at most ``algo.max_filter_rounds`` more rounds; still short, the batch is topped up with dropped groups
        (zero advantage) so that its shape holds. Returns (batch with rewards, generations, rows, metrics): the
        reward metrics of the first round (the step's own prompts as sampled) and ``filter/*`` counts.

        One step off, round 0 is the batch the engines sampled during the previous step; the refills are sampled
        now, by the same weights (the sync is deferred), and the engines start on the next step's batch after them."""
        from rlhf_ray.algos.filtering import varied_groups
        from rlhf_ray.controller.roles import batch_of
        from rlhf_ray.engines.rollout_engine import Generations

        need = B = self.schedule.items_per_step
        kept, flat, metrics, seconds, round_, taken, staleness = [], [], {}, 0.0, 0, 0, 0
        while True:  # each group: (its prompt, its samples, their rewards)
            batch, gens, rows = self.generate(timer, step, need, round_)
            taken, staleness = taken + need, max(staleness, batch.staleness)
            scored = self.score(batch, rows, timer)
            metrics = metrics or scored  # the first round's: the step's own prompts, as sampled
            seconds += gens.seconds
            varied = set(varied_groups(batch.rewards, batch.group_index))
            for g in dict.fromkeys(batch.group_index.tolist()):
                at = (batch.group_index == g).nonzero().flatten().tolist()
                (kept if g in varied else flat).append((rows[at[0]], gens.select(at), batch.rewards[at]))
            if len(kept) >= B or round_ == self.cfg.algo.max_filter_rounds:
                break
            round_, need = round_ + 1, B - len(kept)
        chosen = kept[:B] + flat[:B - len(kept[:B])]
        prompts = [prompt for prompt, _, _ in chosen]
        merged = Generations.of_groups([samples for _, samples, _ in chosen], seconds)
        out = batch_of([p.prompt_ids for p in prompts], merged, self.tokenizer.pad_token_id)
        out.rewards = torch.cat([rewards for _, _, rewards in chosen])
        out.staleness = staleness
        metrics.update({"filter/rounds": float(round_), "filter/prompts_taken": float(taken),
                        "filter/kept_groups": float(min(len(kept), B)),
                        "filter/dropped_groups": float(len(flat)),
                        "filter/topped_up_groups": float(max(0, B - len(kept)))})
        return out, merged, attach_prompts(out, prompts), metrics

    def start_ahead(self, step: int, timer: PhaseTimer) -> None:
        """Bring the idle engines up to the policy's version, then start them on ``step``'s batch (one step off)."""
        with timer("weight_sync"):
            self.engines_current()
        indices = self.cursor.take(self.schedule.items_per_step)
        prompts = [self.prompts[i] for i in indices]

        def launch() -> Any:
            self.roles.rollout.reseed(self.sampling_seed(step))
            if self.ahead_thread is not None:  # multi-turn: the turns need a driver; its future is the pending result
                return self.ahead_thread.submit(self.episodes.run, self.roles.rollout, prompts, self.spec,
                                                self.tokenizer.pad_token_id)
            return self.roles.rollout.generate_async([p.prompt_ids for p in prompts], self.spec,
                                                     self.tokenizer.pad_token_id)

        self.ahead = Ahead(step, indices, self.on_engines(launch), self.engine_version)

    def engines_current(self) -> None:
        """Sync the policy into the engines if an update is not in them yet (one step off defers each step's
        sync to here: the engines were busy with the next batch when the update finished). A batch they are
        generating is finished first and kept for its step."""
        if self.ahead is not None:
            batch, gens = self.on_engines(self.ahead.pending.result)
            self.ahead = dataclasses.replace(self.ahead, pending=Done(batch, gens))
        if self.engine_version < self.version:
            self.last_sync = self.sync_weights()
            self.engine_version = self.version

    def publish_weights(self) -> dict[str, float]:
        """Step 5, after the update: sync the new policy into the engines now, or (one step off) at the start of
        the next step, when they are idle. Returns the seconds and bytes of the sync done in this step."""
        self.version += 1
        if self.stream is not None:
            self.stream.publish(self.version)
            done = self.stream.sync_if_due(self.channel.push)
            synced = {k: self.last_sync[k] + done[k] for k in done}
            self.last_sync = {"seconds": 0.0, "bytes": 0.0}
            return synced
        if self.one_step_off:
            synced, self.last_sync = self.last_sync, {"seconds": 0.0, "bytes": 0.0}
            return synced
        result = self.sync_weights()
        self.engine_version = self.version
        return result

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
                self.engine_version = self.version
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
        metrics["rollout/staleness"] = float(batch.staleness)  # the oldest sample's
        metrics.setdefault("rollout/staleness_mean", float(batch.staleness))  # async: over the samples
        # The engines' own seconds on this batch (one step off: spent while the previous step trained). Not a
        # timing/ phase: the step's phases add up to its wall time, and this one overlaps them.
        metrics["rollout/generate_engine_s"] = gens.seconds
        metrics.update(timer.pop())
        metrics["timing/step_s"] = time.perf_counter() - t_step
        if self.cfg.logging.rollouts:
            write_rollouts(self.output_dir / ROLLOUTS_FILE, self.version, batch, self.rows)
        metrics["efficiency/tokens_per_s"] = float(batch.attention_mask.sum()) / metrics["timing/step_s"]
        metrics["efficiency/generate_tokens_per_s"] = gens.num_tokens / max(gens.seconds, 1e-9)
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
        if self.stream is not None:  # the engines to evaluation, brought up to the policy's version first
            with self.stream.paused_for("interrupt" if self.cfg.rollout.partial else "drain"):
                if self.stream.engine_version < self.version:
                    self.last_sync = self.sync_weights()
                    self.stream.engine_version = self.version
                return self._evaluate(step)
        self.engines_current()  # one step off: the engines may still hold the weights before the last update
        return self._evaluate(step)

    def _evaluate(self, step: int) -> dict[str, float]:
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
            if self.episodes is not None:
                return self.episodes.run(self.roles.rollout, prompts, spec, self.tokenizer.pad_token_id)
            return self.roles.rollout.generate([p.prompt_ids for p in prompts], spec, self.tokenizer.pad_token_id)

        batch, _ = self.on_engines(sample)
        samples = SampleSet()
        samples.add_batch(batch, score_batch(self.scorer, batch, attach_prompts(batch, prompts)))
        return samples


def write_rollouts(path: Path, step: int, batch, rows: list) -> None:
    """Append the batch's samples to ``rollouts.jsonl`` (``logging.rollouts``), one JSON row each."""
    import json

    with open(path, "a") as f:
        for b, row in enumerate(rows):
            f.write(json.dumps({"step": step, "row": row.location, "group": int(batch.group_index[b]),
                                "response": batch.responses[b], "reward": float(batch.rewards[b]),
                                "staleness": int(batch.staleness), "finish_reason": batch.finish_reasons[b]}) + "\n")


def keep_rows_before(path: Path, start: int) -> None:
    """A resumed run drops the rows of steps after its checkpoint (an interrupted run wrote them, the resumed one
    writes them again)."""
    import json

    if start == 0 or not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
    path.write_text("".join(line + "\n" for line in lines))
