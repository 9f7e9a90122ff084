"""Pure math of post-training: token log-probs, advantages, KL estimators, policy / value / preference losses.

Every function here is side-effect free, imports only torch, and states its formula and tensor shapes
in its docstring. Variants sit in registries (``ADVANTAGES``, ``POLICY_LOSSES``, ``KL_ESTIMATORS``,
``PREFERENCE_LOSSES``) that the config names and the jobs look up. Import the submodules directly.
"""
