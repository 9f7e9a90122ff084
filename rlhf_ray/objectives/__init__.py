"""What the controller asks of a learner, as typed objects: losses (``Objective``) and no-grad forwards (``Forward``).

Each spec is a small frozen dataclass built once from the resolved config (``from_resolved``), pickled to
the learner actors with the micro-batches, and called there on the model: ``spec(model, micro_batch,
totals) -> (scaled loss, metric sums)`` or ``forward(model, micro_batch) -> tensor``. ``fields`` says which
``RolloutBatch`` fields it reads. The math is in ``rlhf_ray.algos``; this package is the glue between a
model's forward pass and those pure functions.

- ``common``: ``BatchTotals`` (the global counts a micro-batch's loss is normalised by), SFT's loss,
  token log-probs and sequence scores;
- ``rl``: the policy loss (PPO / REINFORCE family) and the critic's value loss, token values;
- ``preference``: the reward model's Bradley-Terry loss, the DPO family, KTO, and their forwards.
"""
