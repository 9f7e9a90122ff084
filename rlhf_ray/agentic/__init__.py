"""Multi-turn agentic RL: environments, tools a policy can call during a rollout (the Python sandbox among them), and
the episodes the rollout loop samples through them.

    env.py           the environment protocol (``reset(row)``, ``step(response)``), loading ``rollout.env`` from a
                     file, checking what an environment returns, and calling many of them at once with a timeout
    tools.py         the built-in tool environment (``rollout.tools``): functions, their JSON schemas, tool calls
                     parsed in the tokenizer's format (Hermes ``<tool_call>``) or the fallback format, run with
                     timeouts, results (or errors) as tool messages
    sandbox.py       sandboxed Python execution (``run_python``) and the model-facing ``python_sandbox`` tool
    turns.py         token ids of observations in the chat template's turn markup (prefix-stable templates only)
    trajectories.py  what a multi-turn sample adds to ``Generations``: its first prompt, the mask of sampled
                     tokens, the conversation, per-sample counts; and the ``env/`` metrics of a step
    episodes.py      ``EpisodeRunner``: the multi-turn driver the rollout loop calls instead of one ``generate``

Import-light: nothing here imports ray, vllm or deepspeed; the runner talks to the engines through the rollout
role it is given.
"""
