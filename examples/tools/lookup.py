"""A tool for multi-turn RL (``rollout.tools: [examples/tools/lookup.py:k]``): the secret bit of the task's row.

Made for the CPU example (``examples/agentic_tiny_cpu.yaml``), which trains a random-init model from reward alone:
its name is one character, so the model can stumble on the call (a first line ``k``, the fallback call format) by
chance, and it repeats the bit, so that a 2-layer model whose attention starts out spread evenly over the context
can pick the one fact up from the tool's turn.
"""

REPEAT = 16


def k(row: dict) -> str:
    """Read the secret bit of this task.

    Args:
        row: the data row (filled in by rlhf_ray, never by the model)
    """
    return str(row["secret"]) * REPEAT
