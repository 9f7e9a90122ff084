"""Tiny random-init causal LMs with a locally built tokenizer, for tests, the demo and benchmarks.

Nothing is downloaded: the tokenizer is a character-level ``tokenizers`` model with ChatML special
tokens and a chat template, and the model is built from a transformers config. The directory is in
plain HF format, so ``AutoModelForCausalLM.from_pretrained`` and vLLM load it as they would a hub model.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]

# Real model shapes, used by the benchmarks (random init, saved once so every framework loads the same weights).
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}


def build_tokenizer():
    """A character-level fast tokenizer (printable ASCII + ChatML specials) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(string.printable))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    out_dir: str | Path,
    arch: Literal["llama", "qwen2"] = "llama",
    shape: str = "tiny",
    seed: int = 0,
    max_positions: int = 2048,
    num_labels: int | None = None,
    dtype: str = "float32",
) -> Path:
    """Write a random-init causal LM (or, with ``num_labels``, a sequence classifier) and tokenizer.

    ``shape`` names an entry of ``SHAPES``; the large shapes keep their real vocab size, the tiny
    ones use the character tokenizer's. Returns the directory. With ``arch="qwen2"`` transformers 5
    reloads the tokenizer as Qwen2Tokenizer (byte-level), so only token-id prompts are exact there;
    the default Llama shape round-trips text exactly.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, Qwen2Config

    if shape not in SHAPES:
        raise ValueError(f"unknown shape '{shape}'; choose one of {sorted(SHAPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    dims = dict(SHAPES[shape])
    vocab_size = dims.pop("vocab_size", None) or ((len(tokenizer) + 63) // 64) * 64
    common = dict(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=dtype,
        **dims,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=False)
    else:
        raise ValueError(f"unknown arch '{arch}'; choose llama or qwen2")
    torch.manual_seed(seed)
    if num_labels is not None:
        config.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(getattr(torch, dtype))
    if getattr(model, "generation_config", None) is not None:  # sequence classifiers generate nothing
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    return out


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """Save the tokenizer so that AutoTokenizer reloads it as written.

    transformers 5 otherwise picks the tokenizer class from the model type (e.g. Qwen2Tokenizer)
    and swaps in that family's byte-level pre-tokenizer, which would drop our characters.
    """
    import json

    tokenizer.save_pretrained(out_dir)
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
