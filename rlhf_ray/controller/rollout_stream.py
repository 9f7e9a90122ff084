"""The engines as a stream of finished, scored groups (``rollout.mode: async``).

A background thread keeps the engines busy: it starts prompts (``rollout.n_samples`` requests each), polls the
engines for finished samples, scores each group once its samples are all in (reward functions and reward model,
and the reference model's log-probs, while the learners train) and queues it, every token tagged with the policy
version that sampled it. A step takes
the ``prompts_per_step`` oldest groups ready; one more than ``max_staleness`` versions older than the policy (its
oldest token) is dropped, counted, and its prompt given back to be sampled again, so every prompt of an epoch is
still trained on once. With ``algo.filter_groups`` (DAPO's dynamic sampling) a group whose rewards are all equal
is dropped as it is scored and one more prompt is started in its place, at most ``algo.max_filter_rounds`` step
batches of refills per step admitted; past that bound such groups are queued as they are (zero advantage), as
sync tops a step up.

Admission bounds the age: at policy version v the stream has started at most (v + max_staleness + 1) groups per
step (plus one for each group dropped or refilled), so a group is old only when a long response outlives its turn. With
``max_staleness`` 0 the engines sample a step's prompts only once the policy has the weights of every update
before it, with the step's seed: exactly what ``rollout.mode: sync`` samples.

Weight sync stays in the controller's thread, because every learner rank takes part and the step calls them too.
After an update ``RolloutStream.sync_if_due`` interrupts the engines at once (``rollout.partial``: their samples
continue under the new weights) or, without partial, stops starting prompts and syncs as soon as the engines are
done with those they have (tried after each update and while a step waits for groups). The thread calls the
engines only while it is not paused; the controller pauses it for every other use of them: a weight sync, an
evaluation, a checkpoint (which waits for the samples in flight and saves them with the queue).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
import ray
import torch

from rlhf_ray.algos.filtering import varied_groups
from rlhf_ray.controller.reward_scoring import attach_prompts
from rlhf_ray.controller.worker_group import RemoteCallTimeout, wait_named
from rlhf_ray.engines.rollout_engine import Generations, SamplingSpec, StreamPiece, StreamRequest

if TYPE_CHECKING:
    from rlhf_ray.controller.loop import PromptCursor
    from rlhf_ray.controller.reward_scoring import RewardScorer
    from rlhf_ray.controller.roles import RolloutRole
    from rlhf_ray.data.prompts import PromptSet
    from rlhf_ray.types import RolloutBatch

log = logging.getLogger(__name__)

POLL_S = 0.05
"""How long one engine call runs generation steps before it reports (sooner when a sample finishes)."""


@dataclass
class StreamedGroup:
    """A prompt's samples, finished and scored, waiting for a step."""

    gid: int
    """Its place in the order the stream started groups (steps take the oldest first)."""
    prompt: int
    """The prompt's position in the prompt set."""
    gens: Generations
    """Its ``n`` samples (``prompt_index`` 0)."""
    versions: list[np.ndarray]
    """Per sample, the policy version of the weights that sampled each token."""
    rewards: torch.Tensor
    parts: dict[str, torch.Tensor]
    """Each reward source's value per sample (``reward/<source>_mean`` keys)."""
    score_s: float = 0.0
    continued: int = 0
    """Samples interrupted by a weight sync and continued under the new weights (``rollout.partial``)."""
    ref_logprobs: Optional[list[torch.Tensor]] = None
    """Per sample, the reference model's log-probs of its sampled tokens (when the run has a reference)."""
    reference_s: float = 0.0
    """Its share of the seconds the reference forward of its chunk took."""
    flat: bool = False
    """Its rewards are all equal and it was queued past the refill bound (``algo.filter_groups``)."""

    def oldest(self) -> int:
        """The version of its oldest token."""
        return min(int(v.min()) for v in self.versions if len(v))

    def to_state(self) -> dict[str, Any]:
        return {"gid": self.gid, "prompt": self.prompt, "gens": self.gens.to_state(),
                "versions": [torch.as_tensor(v) for v in self.versions], "rewards": self.rewards,
                "parts": dict(self.parts), "continued": self.continued, "ref_logprobs": self.ref_logprobs,
                "flat": self.flat}

    @staticmethod
    def from_state(state: dict[str, Any]) -> "StreamedGroup":
        return StreamedGroup(int(state["gid"]), int(state["prompt"]), Generations.from_state(state["gens"]),
                             [v.numpy() for v in state["versions"]], state["rewards"], dict(state["parts"]),
                             continued=int(state["continued"]), ref_logprobs=state.get("ref_logprobs"),
                             flat=bool(state.get("flat", False)))


@dataclass
class _Sample:
    """One request in flight (or interrupted, waiting to continue)."""

    engine: int
    tokens: list[np.ndarray] = field(default_factory=list)
    logprobs: list[np.ndarray] = field(default_factory=list)
    versions: list[np.ndarray] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish_reason: Optional[str] = None
    pieces: int = 0

    def add(self, piece: StreamPiece, version: int) -> None:
        self.tokens.append(piece.token_ids)
        self.logprobs.append(piece.logprobs)
        self.versions.append(np.full(len(piece.token_ids), version, dtype=np.int64))
        self.texts.append(piece.text)
        self.finish_reason = piece.finish_reason
        self.pieces += 1

    @property
    def length(self) -> int:
        return sum(len(t) for t in self.tokens)


@dataclass
class _Group:
    gid: int
    prompt: int
    samples: list[_Sample]

    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    def generations(self) -> Generations:
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)  # noqa: E731
        return Generations(np.zeros(len(self.samples), dtype=np.int64),
                           [cat(s.tokens, np.int64) for s in self.samples],
                           [cat(s.logprobs, np.float32) for s in self.samples],
                           ["".join(s.texts) for s in self.samples], [str(s.finish_reason) for s in self.samples])


class RolloutStream:
    """The background producer of ``StreamedGroup``s; see the module docstring."""

    def __init__(self, rollout: "RolloutRole", prompts: "PromptSet", cursor: "PromptCursor", spec: SamplingSpec,
                 scorer: "RewardScorer", pad_id: int, prompts_per_step: int, total_steps: int, max_staleness: int,
                 partial: bool, seed_of: Callable[[int, int], int], timeout_s: float,
                 reference: Optional[Callable[["RolloutBatch"], Any]] = None, refill_rounds: Optional[int] = None):
        """``reference``: starts the reference model's log-prob forward of a batch (a ``PendingForward``), run on
        each scored chunk of groups; ``refill_rounds``: ``algo.max_filter_rounds`` with ``algo.filter_groups``."""
        self.rollout, self.prompts, self.cursor, self.spec = rollout, prompts, cursor, spec
        self.reference, self.refill_rounds = reference, refill_rounds
        self.scorer, self.pad_id = scorer, pad_id
        self.B, self.total_steps, self.max_staleness, self.partial = prompts_per_step, total_steps, max_staleness, partial
        self.seed_of, self.timeout_s = seed_of, timeout_s
        self.cond = threading.Condition()
        # Shared with the controller's thread (under cond):
        self.version = 0
        """Updates applied to the policy."""
        self.engine_version = 0
        """Updates applied to the weights in the engines."""
        self.ready: list[StreamedGroup] = []
        self.admitted = 0
        """Groups started so far (a prompt given back and started again counts twice)."""
        self.dropped = 0
        """Groups dropped for staleness so far."""
        self.refilled = 0
        """Groups dropped for equal rewards and replaced by another prompt so far (``algo.filter_groups``)."""
        self.refilled_since = 0
        """Of those, the ones since the last step took its groups."""
        self.pause_wanted: Optional[str] = None
        """None, "drain" (finish the samples in flight) or "interrupt" (stop them, to continue after)."""
        self.paused = False
        self.stopping = False
        self.error: Optional[BaseException] = None
        # The thread's own:
        self.groups: dict[int, _Group] = {}
        self.active: list[dict[str, _Sample]] = [{} for _ in range(rollout.num_engines)]
        """Per engine, its requests in flight by key."""
        self.waiting: list[tuple[str, _Sample, list[int]]] = []
        """Interrupted samples to continue (key, sample, prompt) once the engines have the new weights."""
        self.polls: dict[int, tuple[Any, float]] = {}
        """Per engine, its poll in flight and when it started."""
        self.busy = [0.0] * rollout.num_engines
        """Per engine, the seconds its polls ran since the last step took its groups (its generation time)."""
        self.scoring = 0
        """Chunks of finished groups being scored (under cond)."""
        # One scorer thread: the engines keep generating while groups are scored, and the scorer's calls into the
        # reward model's group keep the order a multi-rank group needs.
        self.scorer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-score")
        self.thread: Optional[threading.Thread] = None

    # ---- the controller's side --------------------------------------------------------------------
    def start(self, version: int) -> None:
        self.version = self.engine_version = version
        self.thread = threading.Thread(target=self._run, name="rollout-stream", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop the thread (samples in flight are left to the engines, which the run tears down next)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=self.timeout_s)
        self.scorer_thread.shutdown(wait=False, cancel_futures=True)

    def take(self, version: int, push: Callable[[], dict[str, float]]) -> tuple[list[StreamedGroup], dict[str, float]]:
        """The ``prompts_per_step`` oldest groups ready for a step at policy ``version``, waiting (bounded) for
        them; stale ones are dropped on the way. ``push`` syncs the weights when that is due. Returns the groups
        (in the order they were started) and the wait's numbers (``rollout/`` metrics)."""
        t0, deadline = time.perf_counter(), time.perf_counter() + self.timeout_s
        dropped, synced = 0, {"seconds": 0.0, "bytes": 0.0}
        while True:
            with self.cond:
                self._raise_error()
                fresh = []
                for g in self.ready:
                    if version - g.oldest() > self.max_staleness:
                        self.cursor.give_back([g.prompt])
                        self.dropped += 1
                        dropped += 1
                    else:
                        fresh.append(g)
                self.ready = fresh
                if len(self.ready) >= self.B:
                    self.ready.sort(key=lambda g: g.gid)
                    taken, self.ready = self.ready[:self.B], self.ready[self.B:]
                    busy, self.busy = max(self.busy), [0.0] * len(self.busy)
                    numbers = {"rollout/dropped_stale": float(dropped), "rollout/queue_ready": float(len(self.ready)),
                               "generate_engine_s": busy, "sync_seconds": synced["seconds"],
                               "sync_bytes": synced["bytes"]}
                    if self.refill_rounds is not None:
                        flat = sum(g.flat for g in taken)
                        numbers.update({"filter/kept_groups": float(self.B - flat),
                                        "filter/topped_up_groups": float(flat),
                                        "filter/dropped_groups": float(self.refilled_since)})
                        self.refilled_since = 0
                    return taken, numbers
                due = self.engine_version < self.version and not any(self.active)
            if due:
                done = self.sync_if_due(push)
                synced = {k: synced[k] + done[k] for k in synced}
                continue
            if time.perf_counter() > deadline:
                who = [self.rollout.group.who(e) for e, a in enumerate(self.active) if a]
                raise RemoteCallTimeout(f"rollout stream: {len(self.ready)} of {self.B} groups ready after "
                                        f"{time.perf_counter() - t0:.0f} s (train.timeout_s); engines with samples "
                                        f"in flight: {', '.join(map(str, who)) or 'none'}", who)
            with self.cond:
                self.cond.wait(0.05)

    def publish(self, version: int) -> None:
        """The policy is at ``version`` now (an update finished)."""
        with self.cond:
            self.version = version
            self.cond.notify_all()

    def sync_if_due(self, push: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Bring the engines to the policy's version if they lag and may be synced now: always with partial
        (their samples are interrupted, to continue after), else once they have no sample in flight."""
        with self.cond:
            if self.engine_version >= self.version or (not self.partial and any(self.active)):
                return {"seconds": 0.0, "bytes": 0.0}
        with self.paused_for("interrupt" if self.partial else "drain"):
            result = push()
            with self.cond:
                self.engine_version = self.version
        return result

    @contextmanager
    def paused_for(self, kind: str) -> Iterator[None]:
        """The engines to the controller for the block: the thread stops its samples (``kind``: "drain" lets
        them finish, "interrupt" stops them to continue after the block) and waits."""
        deadline = time.perf_counter() + self.timeout_s
        with self.cond:
            self.pause_wanted = kind
            self.cond.notify_all()
            while not self.paused:
                self._raise_error()
                if time.perf_counter() > deadline:
                    raise RemoteCallTimeout(f"rollout stream: the engines did not stop for the controller ({kind}) "
                                            f"within {self.timeout_s:.0f} s (train.timeout_s)", [])
                self.cond.wait(0.05)
        try:
            yield
        finally:
            with self.cond:
                self.pause_wanted = None
                self.cond.notify_all()
                while self.paused and self.error is None:
                    self.cond.wait(0.05)

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds (the thread paused with "drain": nothing in flight)."""
        assert not any(self.active) and not self.waiting
        return {"groups": [g.to_state() for g in self.ready], "admitted": self.admitted, "dropped": self.dropped,
                "refilled": self.refilled, "refilled_since": self.refilled_since}

    def load_state(self, state: dict[str, Any]) -> None:
        self.ready = [StreamedGroup.from_state(g) for g in state["groups"]]
        self.admitted, self.dropped = int(state["admitted"]), int(state["dropped"])
        self.refilled, self.refilled_since = int(state.get("refilled", 0)), int(state.get("refilled_since", 0))

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    # ---- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._cycle():
                pass
        except BaseException as exc:  # handed to the controller's thread, which raises it
            log.error("rollout stream stopped: %s", exc)
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def _cycle(self) -> bool:
        with self.cond:
            if self.stopping:
                return False
            pause = self.pause_wanted
            admit = self._admissible() if pause is None and self.engine_version >= self.version else 0
            prompts = self.cursor.take(admit) if admit else []
            first, self.admitted = self.admitted, self.admitted + admit
        if pause == "interrupt":
            self._interrupt()
        elif self.waiting:  # interrupted samples, to continue now that the engines have the new weights
            self._continue()
        if pause is not None and not self.polls and not any(self.active) and not self.scoring:
            self._wait_paused()
            return True
        if prompts:
            self._start(prompts, first)
        self._poll()
        return True

    def _steps_admitted(self) -> int:
        """The step batches the staleness bound lets the stream have started at the policy's version (under cond)."""
        return min(self.version + self.max_staleness + 1, self.total_steps)

    def _admissible(self) -> int:
        """Groups the bound lets the stream start now (under cond)."""
        return max(0, self._steps_admitted() * self.B + self.dropped + self.refilled - self.admitted)

    def _refill(self, group: StreamedGroup) -> bool:
        """Whether a scored group is dropped for equal rewards, another prompt started in its place
        (``algo.filter_groups``, under cond): at most ``refill_rounds`` step batches per step admitted."""
        if self.refill_rounds is None or varied_groups(group.rewards, torch.zeros(len(group.rewards))):
            return False
        if self.refilled >= self.refill_rounds * self.B * self._steps_admitted():
            group.flat = True
            return False
        self.refilled += 1
        self.refilled_since += 1
        return True

    def _start(self, prompts: list[int], first: int) -> None:
        """Start groups ``first``.. for ``prompts``: the engines reseeded for them, split as sync splits a step."""
        self.rollout.reseed(self.seed_of(first // self.B, first % self.B))
        n = self.spec.n
        for e, part in enumerate(np.array_split(np.arange(len(prompts)), self.rollout.num_engines)):
            requests = []
            for i in part.tolist():
                group = _Group(first + i, prompts[i], [_Sample(e) for _ in range(n)])
                self.groups[group.gid] = group
                ids = list(self.prompts[group.prompt].prompt_ids)
                for j, sample in enumerate(group.samples):
                    key = f"g{group.gid}s{j}"
                    self.active[e][key] = sample
                    requests.append(StreamRequest(key, ids, self.spec.max_tokens))
            if requests:
                self._call(e, "submit", requests, self.spec)

    def _continue(self) -> None:
        """Send the interrupted samples back to their engines: prompt + what they had, the rest of the budget."""
        waiting, self.waiting = self.waiting, []
        per_engine: dict[int, list[StreamRequest]] = {}
        for key, sample, prompt in waiting:
            done = np.concatenate(sample.tokens).tolist() if sample.tokens else []
            self.active[sample.engine][key] = sample
            per_engine.setdefault(sample.engine, []).append(
                StreamRequest(key, prompt + done, self.spec.max_tokens - len(done)))
        for e, requests in per_engine.items():
            self._call(e, "submit", requests, self.spec)

    def _poll(self) -> None:
        """Start a poll on every engine with samples in flight; take the results of those that answered."""
        for e, active in enumerate(self.active):
            if active and e not in self.polls:
                self.polls[e] = (self.rollout.group.actors[e].poll.remote(POLL_S), time.perf_counter())
        if not self.polls:
            with self.cond:
                if not self.stopping and self.pause_wanted is None and not self._admissible_now():
                    self.cond.wait(0.05)
            return
        refs = {ref: e for e, (ref, _) in self.polls.items()}
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=POLL_S)
        finished: list[_Group] = []
        for ref in ready:
            e = refs[ref]
            with self.cond:
                self.busy[e] += time.perf_counter() - self.polls.pop(e)[1]
            finished += self._take_pieces(e, wait_named([ref], [self.rollout.group.who(e)], "rollout.poll",
                                                        self.timeout_s)[0])
        for e, (_, since) in self.polls.items():
            if time.perf_counter() - since > self.timeout_s:
                raise RemoteCallTimeout(f"{self.rollout.group.who(e)} did not answer rollout.poll within "
                                        f"{self.timeout_s:.0f} s (train.timeout_s)", [self.rollout.group.who(e)])
        if finished:
            self._score(finished)

    def _admissible_now(self) -> bool:
        return self.engine_version >= self.version and self._admissible() > 0

    def _take_pieces(self, e: int, pieces: list[StreamPiece]) -> list[_Group]:
        """Record what engine ``e`` returned; returns the groups it completed."""
        done = []
        for piece in pieces:
            sample = self.active[e].pop(piece.key)
            sample.add(piece, self.engine_version)
            group = self.groups[int(piece.key[1:].split("s")[0])]
            if piece.finish_reason is not None and group.done():
                done.append(self.groups.pop(group.gid))
        return done

    def _interrupt(self) -> None:
        """Stop every sample in flight; keep what each had, to continue it after the sync."""
        for e in list(self.polls):
            ref, since = self.polls.pop(e)
            self.busy[e] += time.perf_counter() - since
            self._score(self._take_pieces(e, wait_named([ref], [self.rollout.group.who(e)], "rollout.poll",
                                                        self.timeout_s)[0]))
        for e, active in enumerate(self.active):
            if not active:
                continue
            for piece in self._call(e, "interrupt"):
                sample = active[piece.key]
                sample.add(piece, self.engine_version)
                group = self.groups[int(piece.key[1:].split("s")[0])]
                self.waiting.append((piece.key, sample, list(self.prompts[group.prompt].prompt_ids)))
            active.clear()

    def _wait_paused(self) -> None:
        with self.cond:
            self.paused = True
            self.cond.notify_all()
            while self.pause_wanted is not None and not self.stopping:
                self.cond.wait(0.05)
            self.paused = False
            self.cond.notify_all()

    def _score(self, groups: list[_Group]) -> None:
        """Hand finished groups to the scorer thread, which queues them once scored."""
        if not groups:
            return
        with self.cond:
            self.scoring += 1
        self.scorer_thread.submit(self._score_now, groups)

    def _score_now(self, groups: list[_Group]) -> None:
        """Score finished groups (one call for all of them) and queue them (the scorer thread)."""
        from rlhf_ray.controller.roles import batch_of

        try:
            self._queue_scored(groups, batch_of)
        except BaseException as exc:  # handed to the controller's thread, which raises it
            log.error("rollout stream: scoring failed: %s", exc)
            with self.cond:
                self.error = exc
        finally:
            with self.cond:
                self.scoring -= 1
                self.cond.notify_all()

    def _queue_scored(self, groups: list[_Group], batch_of: Callable) -> None:
        t0 = time.perf_counter()
        gens = [g.generations() for g in groups]
        prompts = [self.prompts[g.prompt] for g in groups]
        merged = Generations.of_groups(gens, 0.0)
        batch = batch_of([p.prompt_ids for p in prompts], merged, self.pad_id)
        rows = attach_prompts(batch, prompts)
        reference = self.reference(batch) if self.reference is not None else None
        pending = self.scorer.start(batch, [p.prompt for p in rows])
        rewards, parts, _ = self.scorer.finish_samples(batch, pending, batch.prompts, batch.row_fields)
        ref, ref_s = None, 0.0
        if reference is not None:
            ref_logprobs, ref_s = reference.result()
            ref = batch.at_actions(ref_logprobs)
        seconds = time.perf_counter() - t0
        out, at = [], 0
        for group, g in zip(groups, gens):
            n = len(g.texts)
            out.append(StreamedGroup(group.gid, group.prompt, g, [np.concatenate(s.versions) for s in group.samples],
                                     rewards[at:at + n].clone(), {k: v[at:at + n].clone() for k, v in parts.items()},
                                     seconds / len(groups),
                                     sum(s.pieces > 1 for s in group.samples),
                                     ref[at:at + n] if ref is not None else None, ref_s / len(groups)))
            at += n
        with self.cond:
            self.ready += [g for g in out if not self._refill(g)]
            self.cond.notify_all()

    def _call(self, e: int, method: str, *args: Any) -> Any:
        ref = getattr(self.rollout.group.actors[e], method).remote(*args)
        return wait_named([ref], [self.rollout.group.who(e)], f"rollout.{method}", self.timeout_s)[0]
