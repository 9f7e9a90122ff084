"""Per-process engines: the DeepSpeed learner, objectives, weight export / sync, the vLLM rollout engine."""
