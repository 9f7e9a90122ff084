"""Multi-turn agentic RL: tools a policy can call during a rollout, starting with the Python sandbox."""
