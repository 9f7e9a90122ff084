"""Evaluation of a model on a prompt set (job ``eval``, ``rlhf-ray eval``).

``metrics``: the pure math (pass@k, maj@k), importable alone. ``summary``: one run's samples -> the numbers,
the ``eval.json`` document and the printed table. The job itself (sampling and scoring on the vLLM engines and
the reward sources) is ``rlhf_ray.jobs.eval``.
"""
