"""Per-process engines: the DeepSpeed learner (model, ZeRO config, optimizer step, checkpoints) and the vLLM rollout engine."""
