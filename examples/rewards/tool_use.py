"""Reward of a tool task (``examples/agentic_tiny_cpu.yaml``): 0.5 for looking the row's answer up with a tool (a
tool result that holds it) and then answering (a last turn that is not another call to the tool ``k``), 0.5 more
when that answer is right.

``responses`` are the last model turns; ``trajectory`` (a row field of multi-turn runs) is each episode's
conversation after the prompt: the model's turns (``assistant``) and the observations (``tool`` messages here).
"""


def reward_fn(prompts, responses, trajectory, answer, **_):
    scores = []
    for response, turns, want in zip(responses, trajectory, answer):
        looked_up = any(m["role"] == "tool" and want in m["content"] for m in turns)
        answered = not response.strip().startswith("k")  # an episode still calling at its last turn has no answer
        scores.append(0.5 * (looked_up and answered) + 0.5 * (looked_up and response.strip() == want))
    return scores
