"""Thin Ray actors around the engines: learners (policy, critic, reference, reward model) and rollout engines."""
