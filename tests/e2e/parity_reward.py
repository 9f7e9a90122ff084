"""A reward for tests that must see the policy change every step: 1 when the response's first character has an
odd code point, else 0. A random-init model draws either about half the time, so nearly every group of samples
has both, and every GRPO step makes a real update (its advantages are not all zero)."""


def reward_fn(prompts: list[str], responses: list[str], **row_fields) -> list[float]:
    return [float(bool(r) and ord(r[0]) % 2 == 1) for r in responses]
