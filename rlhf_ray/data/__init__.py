"""The data pipeline: rows from files, the hub or built-in demo sets, to token ids and batches.

Modules (imported directly, so that ``import rlhf_ray.data`` stays light):

- ``sources``: ``load_rows`` (demo / .jsonl / .json / .parquet / saved ``datasets`` dir / hub) and
  ``split_eval``; every row keeps its location (``data/train.jsonl:17``) for later error messages.
- ``demo``: built-in generated arithmetic sets (``DEMO_SETS``) for SFT, RL, preferences and KTO.
- ``sft``: ``tokenize_sft`` (chat template, loss only on response tokens, over-length policy).
- ``prompts``: ``tokenize_prompts`` for RL jobs (prompt ids + every row field for reward functions).
- ``preference``: ``tokenize_pairs`` (reward model / DPO) and ``tokenize_unpaired`` (KTO).
- ``batching``: ``pad_batch``, ``pack_examples``, ``packed_attention_mask``, ``iter_epoch_batches``,
  ``shard_for_rank``.
- ``errors``: ``DataError``, raised for bad input with the file, line / row and field in its message.
"""

from rlhf_ray.data.errors import DataError

__all__ = ["DataError"]
