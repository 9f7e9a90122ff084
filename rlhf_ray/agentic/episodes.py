"""The multi-turn driver: what ``RolloutLoop`` calls instead of one ``generate`` when ``rollout.env`` or
``rollout.tools`` is set. ``EpisodeRunner.run`` returns what ``RolloutRole.generate`` does, a ``RolloutBatch`` and
its ``Generations``, so the RL step (GRPO, PPO, online DPO) runs on episodes unchanged.

One step's episodes, read top to bottom in ``run``:

    1. reset   every sample gets its own environment; ``reset(row)`` (all at once, each within
               ``rollout.env_timeout_s``) gives its first observation, rendered with the chat template's
               generation prompt (and the environment's ``tools``)
    2. turns   the samples go to the engines in two waves; while the engines generate one wave's turn, the other
               wave's environments step, so environment time hides behind generation. Each turn continues every
               unfinished trajectory from its token ids (prefix caching makes that cheap); the sampled tokens are
               kept as sampled (mask 1, the engine's log-probs), then ``step(text)`` runs (all of the wave at once)
               and its observation is appended in the template's turn markup (``turns.ChatTurns``; mask 0)
    3. end     a trajectory ends when its environment says done, after ``rollout.max_turns`` model turns, or when the
               next turn would not fit in the engines' ``max_model_len`` (finish reason ``length``); its reward is
               the sum of its step rewards (added to the reward functions' scores by ``RewardScorer``)

An environment that raises, hangs or returns a bad value raises ``EnvError`` naming it, the sample (its position in
the batch, its prompt and data row) and the turn; with ``rollout.on_env_error: zero_reward`` that trajectory ends
there instead, with reward 0, counted in ``env/failed``.

Engine RNG: the loop reseeds the engines before ``run``; the turns then reach each engine in program order (wave 0's
turn t, wave 1's turn t, wave 0's turn t+1...), so a step's episodes are a function of its seed and the
environments' own behaviour.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import numpy as np

from rlhf_ray.agentic.env import (Caller, EnvError, EnvSpec, as_messages, checked_assistant, checked_step, is_async,
                                  load_env)
from rlhf_ray.agentic.trajectories import COUNTS, Trajectories
from rlhf_ray.agentic.turns import ChatTurns

log = logging.getLogger(__name__)

WAVES = 2
"""The samples are split into this many waves, each generating while another's environments step."""


@dataclass(frozen=True)
class EpisodeSettings:
    """What ``run`` needs from the config, resolved once."""

    max_turns: int
    max_model_len: int
    on_env_error: str
    env_timeout_s: float
    system_prompt: Optional[str]
    prompt_field: str
    messages_field: str

    @staticmethod
    def from_resolved(resolved: Any) -> "EpisodeSettings":
        cfg = resolved.config
        r, d = cfg.rollout, cfg.data
        return EpisodeSettings(r.max_turns, resolved.role("rollout").max_model_len, r.on_env_error, r.env_timeout_s,
                               d.system_prompt, d.prompt_field, d.messages_field)


def build_env(rollout_cfg: Any, tokenizer: Any) -> EnvSpec:
    """The environment ``rollout.env`` names, or the tool environment of ``rollout.tools``; ConfigError naming the
    key when the file, class or a tool is unusable (so a bad spec fails before any actor starts)."""
    from rlhf_ray.config import ConfigError

    try:
        if rollout_cfg.env is not None:
            return load_env(rollout_cfg.env)
        from rlhf_ray.agentic.tools import call_format, load_tools, tool_env_spec

        return tool_env_spec(load_tools(rollout_cfg.tools), call_format(rollout_cfg.tool_call_format, tokenizer),
                             rollout_cfg.tool_timeout_s)
    except ValueError as exc:
        raise ConfigError(f"{'rollout.env' if rollout_cfg.env is not None else 'rollout.tools'}: {exc}") from exc


@dataclass
class Episode:
    """One sample's trajectory while it is sampled."""

    index: int
    """Its position in the batch."""
    group: int
    """Its prompt's position."""
    prompt: Any
    """Its ``PromptExample`` (the data row)."""
    env: Any = None
    tools: Optional[list] = None
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    """The completion: model turns and observations."""
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    """The conversation, first prompt included (what the template renders)."""
    first: int = 0
    """How many of ``messages`` the first prompt holds."""
    last_turn: list[int] = field(default_factory=list)
    text: str = ""
    """The last model turn's text."""
    finish: str = "stop"
    turns: int = 0
    env_reward: float = 0.0
    failed: bool = False
    done: bool = False

    def context(self) -> list[int]:
        return self.prompt_ids + self.ids

    def append(self, ids: list[int], sampled: bool, logprobs: Optional[list[float]] = None) -> None:
        self.ids += ids
        self.mask += [int(sampled)] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


class EpisodeRunner:
    """Runs a step's multi-turn episodes on the rollout engines (see the module docstring)."""

    def __init__(self, env: EnvSpec, tokenizer: Any, settings: EpisodeSettings):
        self.env, self.tokenizer, self.settings = env, tokenizer, settings
        self.chat = ChatTurns(tokenizer)
        self.caller = Caller(settings.env_timeout_s)
        self.failures_logged = 0

    @classmethod
    def from_resolved(cls, resolved: Any, tokenizer: Any) -> "EpisodeRunner":
        return cls(build_env(resolved.config.rollout, tokenizer), tokenizer, EpisodeSettings.from_resolved(resolved))

    def run(self, rollout: Any, prompts: list, spec: Any, pad_id: int) -> tuple[Any, Any]:
        """``spec.n`` episodes of every prompt on ``rollout`` (a ``RolloutRole``); returns the ``RolloutBatch``
        (group_index = prompt position) and the ``Generations`` with their ``Trajectories``."""
        episodes = [Episode(g * spec.n + s, g, p) for g, p in enumerate(prompts) for s in range(spec.n)]
        engine_s = env_s = 0.0
        try:
            env_s += self.reset(episodes, spec.max_tokens)                 # 1. reset
            engine_s, turns_env_s = self.take_turns(rollout, episodes, spec, pad_id)  # 2. turns
            env_s += turns_env_s
        finally:  # 3. end: the environments are closed, also when an error (an engine's, an environment's) stops it
            env_s += self.close(episodes)
        return self.collect(prompts, episodes, engine_s, env_s, pad_id)

    def reset(self, episodes: list[Episode], max_tokens: int) -> float:
        """Build every episode's environment and take its first observation as the first prompt. Returns the seconds
        spent waiting on the environments."""
        t0 = time.perf_counter()
        made = self.caller.run([self.env.make] * len(episodes), is_async=False)
        for e, out in zip(episodes, made):
            if out.ok:
                e.env = out.value
            else:
                self.fail(e, out.describe("building it", self.settings.env_timeout_s), "start")
        live = [e for e in episodes if not e.done]
        firsts = self.call(live, "reset", lambda e: partial(e.env.reset, self.row(e.prompt)))
        seconds = time.perf_counter() - t0
        for e, out in zip(live, firsts):
            if out.ok:
                self.start(e, out.value, max_tokens)
            else:
                self.fail(e, out.describe("reset", self.settings.env_timeout_s), "reset")
        for e in episodes:
            if not e.prompt_ids:  # its environment failed before the first turn: the row's prompt, no response
                e.prompt_ids = list(e.prompt.prompt_ids)
        return seconds

    def take_turns(self, rollout: Any, episodes: list[Episode], spec: Any, pad_id: int) -> tuple[float, float]:
        """Every turn of every episode, in ``WAVES`` waves: when a wave's turn comes back, its environments step
        and its next turn is queued on the engines behind the other wave's. Returns (engine seconds, seconds spent
        waiting on the environments)."""
        turn_spec = dataclasses.replace(spec, n=1)
        size = -(-len(episodes) // WAVES)
        waves = [episodes[w * size:(w + 1) * size] for w in range(WAVES)]
        engine_s = env_s = 0.0
        pending = [self.launch(rollout, wave, turn_spec, pad_id) for wave in waves]
        while any(p is not None for p in pending):
            for w, wave in enumerate(waves):
                if pending[w] is None:
                    continue
                active, handle = pending[w]
                _, gens = handle.result()
                engine_s += gens.seconds
                env_s += self.turn(active, gens, spec.max_tokens)
                pending[w] = self.launch(rollout, wave, turn_spec, pad_id)
        return engine_s, env_s

    # ---- pieces of ``run`` -------------------------------------------------------------------------------------
    def row(self, prompt: Any) -> dict:
        """The data row ``reset`` gets: every field, the prompt under its own field name (a copy per sample)."""
        key = self.settings.messages_field if isinstance(prompt.prompt, list) else self.settings.prompt_field
        return copy.deepcopy({**prompt.fields, key: prompt.prompt})

    def start(self, e: Episode, first: Any, max_tokens: int) -> None:
        """The first prompt from ``reset``'s observation (None: the row's prompt), rendered with the generation
        prompt and the environment's tools."""
        from rlhf_ray.data.errors import DataError
        from rlhf_ray.data.sft import prompt_messages, with_system

        if first is None:
            prompt = e.prompt.prompt
            if isinstance(prompt, list):
                msgs = [dict(m) for m in prompt]
                msgs = msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs
                msgs = with_system(msgs, self.settings.system_prompt)
            else:
                msgs = prompt_messages(prompt, self.settings.system_prompt)
        else:
            try:
                msgs = with_system(as_messages(first), self.settings.system_prompt)
            except ValueError as exc:
                self.fail(e, f"reset returned a bad first observation: {exc}", "reset")
                return
        e.tools = getattr(e.env, "tools", None) or None
        e.messages, e.first = msgs, len(msgs)
        e.prompt_ids = self.chat.prompt_ids(msgs, e.tools)
        limit = self.settings.max_model_len
        if len(e.prompt_ids) + max_tokens > limit:
            raise DataError(f"{e.prompt.location}: the first prompt of sample {e.index} is {len(e.prompt_ids)} tokens "
                            f"(with the tools' schemas, if any); with max_new_tokens={max_tokens} it does not fit the "
                            f"engines' max_model_len={limit}: raise rollout.max_model_len")

    def launch(self, rollout: Any, wave: list[Episode], spec: Any, pad_id: int) -> Optional[tuple[list[Episode], Any]]:
        """Start the next turn of the wave's unfinished trajectories that have room for it; None when none is left."""
        active = []
        for e in wave:
            if not e.done and len(e.context()) + spec.max_tokens > self.settings.max_model_len:
                e.done, e.finish = True, "length"
            if not e.done:
                active.append(e)
        if not active:
            return None
        return active, rollout.generate_async([e.context() for e in active], spec, pad_id)

    def turn(self, active: list[Episode], gens: Any, max_tokens: int) -> float:
        """Take a wave's sampled turn: tokens kept as sampled, ``step`` on each, observations appended. Returns the
        seconds spent waiting on the environments."""
        for e, ids, logprobs, reason in zip(active, gens.token_ids, gens.logprobs, gens.finish_reasons):
            ids = [int(t) for t in ids]
            e.append(ids, True, [float(x) for x in logprobs])
            e.last_turn, e.finish, e.turns = ids, reason, e.turns + 1
            e.text = self.tokenizer.decode(ids, skip_special_tokens=True)
            e.messages.append({"role": "assistant", "content": e.text})
        t0 = time.perf_counter()
        outcomes = self.call(active, "step", lambda e: partial(e.env.step, e.text))
        seconds = time.perf_counter() - t0
        for e, out in zip(active, outcomes):
            if not out.ok:
                self.fail(e, out.describe("step", self.settings.env_timeout_s), f"turn {e.turns}")
                continue
            try:
                observation, reward, done = checked_step(out.value)
            except ValueError as exc:
                self.fail(e, f"step returned a bad value: {exc}", f"turn {e.turns}")
                continue
            shaped = getattr(e.env, "assistant_message", None)
            if callable(shaped):  # the turn as the environment records it (e.g. with its tool_calls)
                try:
                    e.messages[-1] = checked_assistant(shaped(e.text))
                except Exception as exc:  # noqa: BLE001 - the environment's own code
                    self.fail(e, f"assistant_message raised or returned a bad value: {type(exc).__name__}: {exc}",
                              f"turn {e.turns}")
                    continue
            e.env_reward += reward
            if done:
                e.done = True
            elif e.turns >= self.settings.max_turns:
                e.done, e.finish = True, "max_turns"
            else:
                assert observation is not None
                ids = self.chat.observation_ids(e.messages, e.last_turn, observation, e.tools)
                e.messages += observation
                if len(e.context()) + len(ids) + max_tokens > self.settings.max_model_len:
                    e.done, e.finish = True, "length"  # no room for another turn: the observation is not shown
                else:
                    e.append(ids, False)
        return seconds

    def call(self, episodes: list[Episode], method: str, make: Callable[[Episode], Callable[[], Any]]) -> list:
        """``method`` of each episode's environment, all at once (see ``env.Caller``)."""
        if not episodes:
            return []
        return self.caller.run([make(e) for e in episodes], is_async(episodes[0].env, method))

    def fail(self, e: Episode, what: str, when: str) -> None:
        """An environment failed: raise ``EnvError``, or (``on_env_error: zero_reward``) end the trajectory."""
        prompt = e.prompt.prompt
        text = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", "")) if prompt else ""
        excerpt = repr(text[:80]) + ("..." if len(text) > 80 else "")
        message = f"{self.env.name}: {what}, on sample {e.index} (prompt {e.group}, {e.prompt.location}: {excerpt}), {when}"
        if self.settings.on_env_error == "raise":
            raise EnvError(f"{message}; set rollout.on_env_error=zero_reward to end such a trajectory with reward 0 "
                           "and go on")
        e.failed = e.done = True
        if self.failures_logged < 5:
            self.failures_logged += 1
            log.warning("%s; the trajectory ends with reward 0 (rollout.on_env_error: zero_reward)", message)

    def close(self, episodes: list[Episode]) -> float:
        """``close()`` on the environments that have one; a failing close is logged, not raised. Returns seconds."""
        t0 = time.perf_counter()
        closable = [e for e in episodes if e.env is not None and callable(getattr(e.env, "close", None))]
        for e, out in zip(closable, self.call(closable, "close", lambda e: e.env.close)):
            if not out.ok:
                log.warning("%s: %s on sample %d", self.env.name,
                            out.describe("close", self.settings.env_timeout_s), e.index)
        return time.perf_counter() - t0

    def collect(self, prompts: list, episodes: list[Episode], engine_s: float, env_s: float,
                pad_id: int) -> tuple[Any, Any]:
        from rlhf_ray.controller.roles import batch_of
        from rlhf_ray.engines.rollout_engine import Generations

        def count(e: Episode, name: str) -> float:
            value = getattr(e.env, name, 0) if e.env is not None else 0
            return float(value) if isinstance(value, (int, float)) else 0.0

        values = {"turns": [e.turns for e in episodes], "tool_calls": [count(e, "tool_calls") for e in episodes],
                  "tool_errors": [count(e, "tool_errors") for e in episodes],
                  "failed": [float(e.failed) for e in episodes], "env_reward": [e.env_reward for e in episodes]}
        trajectories = Trajectories([np.asarray(e.prompt_ids, dtype=np.int64) for e in episodes],
                                    [np.asarray(e.mask, dtype=np.int64) for e in episodes],
                                    [e.messages[e.first:] for e in episodes],
                                    {k: np.asarray(values[k], dtype=np.float64) for k in COUNTS}, env_s)
        gens = Generations(np.asarray([e.group for e in episodes], dtype=np.int64),
                           [np.asarray(e.ids, dtype=np.int64) for e in episodes],
                           [np.asarray(e.logprobs, dtype=np.float32) for e in episodes],
                           [e.text for e in episodes], [e.finish for e in episodes], engine_s, trajectories)
        return batch_of([p.prompt_ids for p in prompts], gens, pad_id), gens
