"""A model's shape -> its FLOPs and bytes; MFU.

Notation (one model): ``L`` layers, ``d`` hidden size, ``f`` MLP width, ``a = heads x head_dim`` (the
attention width), ``k = kv_heads x head_dim``, ``V`` vocabulary, ``h`` the output head's width (``V``
for a causal LM, 1 for a value / score head). Matmul parameters (embedding lookup and norms excluded,
they do no matmul):

    N_body = L (d a + 2 d k + a d + m d f)        m = 3 for a gated (SwiGLU) MLP, 2 otherwise
    N_head = d h

**Forward FLOPs** of one sequence of ``S`` tokens with the head applied at ``H`` positions
(multiply-add = 2 FLOPs; causal attention counts only the keys each query sees, i.e. the useful work):

    F(S, H) = 2 N_body S + 2 N_head H + 2 L a S (S + 1)

(``QK^T`` and ``AV``: query ``i`` meets ``i`` keys, ``2 a`` FLOPs each, ``sum_i 2 * 2 a i = 2 a S (S+1)``.)
Training is ``3 F`` (backward = 2 x forward; recomputation under gradient checkpointing is not
useful work and is not counted). Generating ``R`` tokens after a ``P``-token prompt feeds
``T = P + R - 1`` tokens through the model and applies the head at ``R`` positions: ``F(T, R)``.

MFU = training FLOPs / (train seconds x D x peak FLOP/s) (``D`` the devices training; the peak as in
``calibration``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

UNGATED_MLP_MODELS = ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2")
"""Model types whose MLP is two matrices (up, down); every other decoder is taken as gated (gate, up, down:
Llama, Qwen2, Mistral, Gemma, ...)."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that set a decoder's FLOPs and bytes (see the module docstring for the formulas)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    head_out: int
    """Width of the output projection: ``vocab`` for a causal LM, 1 for a value or score head."""
    gated_mlp: bool = True
    qkv_bias: bool = False
    tied: bool = False
    """Output head shares the embedding matrix (counted once in ``params``; its matmul still runs)."""

    @classmethod
    def from_hf_config(cls, config: Any, head: Literal["causal_lm", "token_value", "sequence_score"] = "causal_lm"
                       ) -> "ModelShape":
        """From a transformers config (Llama / Qwen2 / Mistral-style decoders) or a model directory path."""
        if isinstance(config, (str, os.PathLike)):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(config))
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        qkv_bias = getattr(config, "attention_bias", None)
        if qkv_bias is None:
            qkv_bias = getattr(config, "model_type", "") == "qwen2"
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=config.vocab_size, head_out=config.vocab_size if head == "causal_lm" else 1,
                   gated_mlp=getattr(config, "model_type", "") not in UNGATED_MLP_MODELS,
                   qkv_bias=bool(qkv_bias),
                   tied=bool(getattr(config, "tie_word_embeddings", False)) and head == "causal_lm")

    def with_head(self, head_out: int) -> "ModelShape":
        """The same backbone with another output head (e.g. a critic's 1-wide value head)."""
        return dataclasses.replace(self, head_out=head_out, tied=self.tied and head_out == self.vocab)

    @property
    def attn_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def body_params(self) -> int:
        """N_body = L (d a + 2 d k + a d + m d f): the matmul weights of the transformer blocks."""
        d, a, k = self.hidden, self.attn_dim, self.kv_dim
        mlp = (3 if self.gated_mlp else 2) * d * self.intermediate
        return self.layers * (d * a + 2 * d * k + a * d + mlp)

    @property
    def head_params(self) -> int:
        """N_head = d h."""
        return self.hidden * self.head_out

    @property
    def matmul_params(self) -> int:
        return self.body_params + self.head_params

    @property
    def params(self) -> int:
        """Every parameter: matmul weights, embedding, norms (2 per layer + final), q/k/v biases."""
        norms = self.hidden * (2 * self.layers + 1)
        biases = self.layers * (self.attn_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        head = 0 if self.tied else self.head_params
        return self.body_params + head + self.vocab * self.hidden + norms + biases

    def weight_bytes(self, dtype_bytes: int) -> int:
        """Bytes of matmul weights one forward step reads (the embedding is only gathered row by row)."""
        return self.matmul_params * dtype_bytes

    def kv_bytes_per_position(self, dtype_bytes: int) -> int:
        """Key + value cache of one position across layers: 2 L k x dtype bytes."""
        return 2 * self.layers * self.kv_dim * dtype_bytes


def forward_flops(shape: ModelShape, seq_len: int, head_positions: Optional[int] = None) -> float:
    """F(S, H) = 2 N_body S + 2 N_head H + 2 L a S (S + 1); ``head_positions`` H defaults to S."""
    S = int(seq_len)
    H = S if head_positions is None else int(head_positions)
    attention = 2.0 * shape.layers * shape.attn_dim * S * (S + 1)
    return 2.0 * shape.body_params * S + 2.0 * shape.head_params * H + attention


def train_flops(shape: ModelShape, seq_lens: Sequence[int], passes: int = 1) -> float:
    """3 F(S, S) per sequence (forward + backward), ``passes`` times over the batch (PPO epochs)."""
    return 3.0 * passes * sum(forward_flops(shape, s) for s in seq_lens)


def generate_flops(shape: ModelShape, prompt_len: int, response_len: int) -> float:
    """F(P + R - 1, R): the prompt and all but the last sampled token go through the model; the head runs
    once per sampled token (vLLM computes logits only where it samples)."""
    if response_len <= 0:
        return forward_flops(shape, prompt_len, 0)
    return forward_flops(shape, prompt_len + response_len - 1, response_len)


def decode_kv_reads(prompt_lens: Sequence[int], response_lens: Sequence[int],
                    group_index: Optional[Sequence[int]] = None) -> float:
    """Cache positions read while decoding, prompt prefixes shared within a group.

    The token at position p (0-based) attends to p + 1 positions. Decoding processes positions
    P .. P + R - 2 of each sequence; their reads split into the prompt's P positions, read once per
    decode step by the whole group (``P (R_max,group - 1)``), and the sequence's own generated
    positions, ``sum_{j=1}^{R-1} j = R (R - 1) / 2``. Without ``group_index`` every sequence is its own
    group, giving ``(R - 1)(2P + R) / 2`` per sequence.
    """
    groups = group_index if group_index is not None else range(len(prompt_lens))
    longest: dict[Any, tuple[int, int]] = {}
    total = 0.0
    for g, P, R in zip(groups, prompt_lens, response_lens):
        P, R = int(P), int(R)
        total += R * (R - 1) / 2
        prev = longest.get(g, (P, 0))
        longest[g] = (P, max(prev[1], R))
    total += sum(P * max(Rmax - 1, 0) for P, Rmax in longest.values())
    return total


def mfu(flops: float, seconds: float, devices: float, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: flops / (seconds x devices x peak)."""
    return flops / max(seconds * devices * peak_flops_per_device, 1e-30)
