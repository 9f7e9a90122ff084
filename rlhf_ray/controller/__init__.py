"""The controller: the loops jobs run (``loop``, ``rl_loop``, ``rollout_loop``, ``online_dpo``, ``offline_loop``)
and the distributed plumbing they call (Ray start-up, placement plans, launching roles, worker groups, roles as
the loops see them). The algorithm's math is in ``rlhf_ray.algos``, the learner-side specs in
``rlhf_ray.objectives``."""
