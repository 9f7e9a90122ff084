"""Multi-turn episodes without a cluster: ``EpisodeRunner`` against scripted engines and the tiny model's
tokenizer. Token in, token out (sampled ids kept, observations in the chat template's markup with mask 0), rewards,
turn limits, failures named by environment / sample / turn, the chat-template rules, and the config checks."""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
import pytest
import torch

from rlhf_ray.agentic.env import EnvError, EnvSpec, load_env
from rlhf_ray.agentic.episodes import EpisodeRunner, EpisodeSettings
from rlhf_ray.agentic.tools import load_tools, tool_env_spec
from rlhf_ray.agentic.turns import ChatTurns, TemplateError
from rlhf_ray.config import ConfigError, load_config, resolve
from rlhf_ray.controller.roles import batch_of
from rlhf_ray.data.prompts import PromptExample
from rlhf_ray.engines.rollout_engine import Generations, SamplingSpec
from rlhf_ray.models.tiny import build_tokenizer

TOK = build_tokenizer()
EOS = TOK.eos_token_id
UNUSED = len(TOK) + 5
"""An id of the model's padded vocabulary that no text encodes to (decodes to ''): kept as sampled all the same."""


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


class Pending:
    def __init__(self, gens):
        self.gens = gens

    def result(self):
        return None, self.gens


class ScriptedEngines:
    """A rollout role whose engine answers each context with ``policy(context text)`` (a text, or a list of ids),
    log-prob -0.5 per token; finish "stop" when the turn ends with EOS, else "length"."""

    def __init__(self, policy):
        self.policy, self.calls = policy, []

    def generate_async(self, prompt_ids, spec, pad_id):
        assert spec.n == 1  # every turn continues one trajectory
        self.calls.append([list(p) for p in prompt_ids])
        outs = []
        for p in prompt_ids:
            out = self.policy(TOK.decode(list(p), skip_special_tokens=False))
            outs.append(ids(out) if isinstance(out, str) else list(out))
        gens = Generations(np.arange(len(outs)), [np.asarray(o, dtype=np.int64) for o in outs],
                           [np.full(len(o), -0.5, dtype=np.float32) for o in outs], ["" for _ in outs],
                           ["stop" if o and o[-1] == EOS else "length" for o in outs], 0.01)
        return Pending(gens)


def prompts(n: int = 2) -> list[PromptExample]:
    out = []
    for i in range(n):
        text = f"Use k, then say the number. ({i})"
        rendered = TOK.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        out.append(PromptExample(ids(rendered), rendered, text, {"secret": str(3 + i), "answer": str(3 + i)},
                                 f"rows.jsonl:{i + 1}"))
    return out


def runner(env: EnvSpec, tok=TOK, **overrides) -> EpisodeRunner:
    settings = dict(max_turns=3, max_model_len=512, on_env_error="raise", env_timeout_s=2.0, system_prompt=None,
                    prompt_field="prompt", messages_field="messages")
    settings.update(overrides)
    return EpisodeRunner(env, tok, EpisodeSettings(**settings))


def lookup_env_file(tmp_path):
    """A tool file with ``k``, which returns the row's secret."""
    path = tmp_path / "lookup.py"
    path.write_text(textwrap.dedent('''
        def k(row: dict) -> str:
            """Read the secret.

            Args:
                row: the data row
            """
            return row["secret"]
    '''))
    return path


def lookup_env(tmp_path, timeout_s: float = 1.0) -> EnvSpec:
    return tool_env_spec(load_tools([str(lookup_env_file(tmp_path))]), "fallback", timeout_s)


def copy_after_tool(context: str) -> list[int]:
    """Call k first; once a tool turn is there, answer with its content and stop."""
    if "<|im_start|>tool\n" not in context:
        return ids("k")  # cut at max_new_tokens: no EOS
    return ids(context.rsplit("<|im_start|>tool\n", 1)[1][0]) + [EOS]


def test_a_tool_episode_is_one_token_sequence_with_observations_masked(tmp_path):
    engines = ScriptedEngines(copy_after_tool)
    batch, gens = runner(lookup_env(tmp_path)).run(engines, prompts(2), SamplingSpec(n=2, max_tokens=4), 0)
    assert batch.size == 4 and batch.group_index.tolist() == [0, 0, 1, 1]
    # Sample 0: prompt, "k" (sampled), the rest of the assistant turn's closing + the tool turn + the generation
    # prompt (the template's, mask 0), then "3<|im_end|>" (sampled).
    conversation = [{"role": "user", "content": "Use k, then say the number. (0)"},
                    {"role": "assistant", "content": "k"}, {"role": "tool", "name": "k", "content": "3"}]
    observed = TOK.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    want = ids(observed) + ids("3") + [EOS]
    n = int(batch.attention_mask[0].sum())
    assert batch.input_ids[0, :n].tolist() == want
    P = len(prompts(1)[0].prompt_ids)
    sampled_at = [P, n - 2, n - 1]  # "k", "3", EOS: positions in input_ids
    assert batch.action_mask[0, :n - 1].nonzero().flatten().tolist() == [t - 1 for t in sampled_at]
    assert torch.equal(batch.rollout_logprobs[0, :n - 1] != 0, batch.action_mask[0, :n - 1].bool())
    assert float(batch.rollout_logprobs[0, P - 1]) == -0.5
    assert batch.responses == ["3", "3", "4", "4"] and gens.finish_reasons == ["stop"] * 4
    assert batch.row_fields["trajectory"][0] == [{"role": "assistant", "content": "k"},
                                                 {"role": "tool", "name": "k", "content": "3"},
                                                 {"role": "assistant", "content": "3"}]
    assert batch.env_rewards.tolist() == [0.0] * 4 and not batch.env_failed.any()
    m = gens.trajectories.metrics()
    assert (m["env/turns_mean"], m["env/tool_calls_mean"], m["env/tool_errors"], m["env/failed"]) == (2, 1, 0, 0)
    assert gens.num_tokens == 4 * 3  # sampled tokens only
    # Turn 2 continued each trajectory from its token ids: the context is everything up to the answer.
    assert len(engines.calls) == 4 and engines.calls[2][0] == want[:-2]  # waves: [0, 1] then [2, 3], turn by turn


def test_sampled_ids_are_kept_even_where_text_would_not_give_them_back(tmp_path):
    """An id no text encodes to (decodes to '') stays in the trajectory: nothing is decoded and encoded again."""
    engines = ScriptedEngines(lambda ctx: ids("k") + [UNUSED] if "tool\n" not in ctx else ids("3") + [EOS])
    batch, gens = runner(lookup_env(tmp_path)).run(engines, prompts(1), SamplingSpec(n=1, max_tokens=4), 0)
    P = len(prompts(1)[0].prompt_ids)
    assert batch.input_ids[0, P:P + 2].tolist() == ids("k") + [UNUSED]
    # The fallback parser read "k" (the text of the turn), the tool answered, the model answered.
    assert gens.trajectories.counts["tool_calls"].tolist() == [1.0] and batch.responses == ["3"]


ECHO_ENV = '''
    import asyncio


    class Guess:
        """Rewards 1 per turn that says the row's secret; done when it is said or after "stop"."""

        def reset(self, row):
            self.secret, self.turn = row["secret"], 0
            return [{"role": "system", "content": "Guess."}, {"role": "user", "content": row["prompt"]}]

        {async_}def step(self, response):
            self.turn += 1
            if response == "boom":
                raise RuntimeError("exploded")
            if response == "hang":
                {sleep}
            if response == "bad":
                return "x", float("nan"), False
            hit = response == self.secret
            return ("higher" if not hit else None), float(hit), hit
'''


def guess_env(tmp_path, is_async: bool) -> EnvSpec:
    body = ECHO_ENV.replace("{async_}", "async " if is_async else "").replace(
        "{sleep}", "await asyncio.sleep(30)" if is_async else "import time; time.sleep(30)")
    path = tmp_path / "guess.py"
    path.write_text(textwrap.dedent(body))
    return load_env(f"{path}:Guess")


@pytest.mark.parametrize("is_async", [False, True])
def test_environment_rewards_add_up_and_episodes_end_when_done_or_at_max_turns(tmp_path, is_async):
    answers = iter(["1", "3", "0", "4", "9", "9"])  # sample 0: 1, 3 (hit); sample 1: 0, 4 (hit)... in wave order
    engines = ScriptedEngines(lambda ctx: next(answers) + "<|im_end|>")
    batch, gens = runner(guess_env(tmp_path, is_async), max_turns=2).run(
        engines, prompts(2), SamplingSpec(n=1, max_tokens=3), 0)
    # waves: [sample 0], [sample 1]; turn 1: "1" (0), "3" (1, miss); turn 2: "0" (0, miss), "4" (1, hit)
    assert gens.trajectories.counts["env_reward"].tolist() == [0.0, 1.0]
    assert gens.trajectories.counts["turns"].tolist() == [2.0, 2.0]
    assert gens.finish_reasons == ["max_turns", "stop"]
    first = batch.input_ids[0, :len(gens.trajectories.prompt_ids[0])].tolist()
    assert TOK.decode(first, skip_special_tokens=False).startswith("<|im_start|>system\nGuess.<|im_end|>")
    assert batch.row_fields["trajectory"][0][1] == {"role": "user", "content": "higher"}


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize("answer, expected", [
    ("boom", "step raised RuntimeError: exploded (at "),
    ("hang", "step did not return within 0.5 s (rollout.env_timeout_s)"),
    ("bad", "step returned a bad value: step returned reward float nan; expected a finite number"),
])
def test_a_failing_environment_is_named_with_the_sample_and_turn(tmp_path, is_async, answer, expected):
    engines = ScriptedEngines(lambda ctx: (answer if "higher" in ctx else "0") + "<|im_end|>")
    env = guess_env(tmp_path, is_async)
    with pytest.raises(EnvError) as err:
        runner(env, env_timeout_s=0.5).run(engines, prompts(2), SamplingSpec(n=1, max_tokens=5), 0)
    message = str(err.value)
    assert message.startswith(f"{env.name}: {expected}")
    assert "on sample 0 (prompt 0, rows.jsonl:1: 'Use k, then say the number. (0)'), turn 2; " in message
    assert "), turn 2; set rollout.on_env_error=zero_reward" in message


def test_zero_reward_ends_a_failing_trajectory_and_counts_it(tmp_path):
    engines = ScriptedEngines(lambda ctx: ("boom" if "(1)" in ctx and "higher" in ctx else "0") + "<|im_end|>")
    batch, gens = runner(guess_env(tmp_path, False), on_env_error="zero_reward").run(
        engines, prompts(2), SamplingSpec(n=1, max_tokens=5), 0)
    assert gens.trajectories.counts["failed"].tolist() == [0.0, 1.0]
    assert batch.env_failed.tolist() == [False, True]
    assert gens.trajectories.counts["turns"].tolist() == [3.0, 2.0]  # sample 0 ran to max_turns


def test_a_reset_that_fails_leaves_the_rows_prompt_and_no_response(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("class Env:\n    def reset(self, row):\n        return 5\n    def step(self, r):\n"
                    "        return None, 0.0, True\n")
    env = load_env(str(path))
    with pytest.raises(EnvError, match="reset returned a bad first observation: an observation is text"):
        runner(env).run(ScriptedEngines(lambda ctx: "x"), prompts(1), SamplingSpec(n=1, max_tokens=2), 0)
    batch, gens = runner(env, on_env_error="zero_reward").run(ScriptedEngines(lambda ctx: "x"), prompts(1),
                                                              SamplingSpec(n=2, max_tokens=2), 0)
    assert batch.input_ids[0, :int(batch.attention_mask[0].sum())].tolist() == prompts(1)[0].prompt_ids
    assert float(batch.action_mask.sum()) == 0 and gens.trajectories.counts["failed"].tolist() == [1.0, 1.0]


def test_a_trajectory_without_room_for_another_turn_ends_there(tmp_path):
    P = len(prompts(1)[0].prompt_ids)
    # Room for the first turn and the tool turn, not for a second turn of 4 tokens.
    batch, gens = runner(lookup_env(tmp_path), max_model_len=P + 4 + 20).run(
        ScriptedEngines(copy_after_tool), prompts(1), SamplingSpec(n=1, max_tokens=4), 0)
    assert gens.finish_reasons == ["length"] and gens.trajectories.counts["turns"].tolist() == [1.0]
    assert int(batch.attention_mask[0].sum()) == P + 1  # the observation that would not fit is not appended


def test_generations_of_episodes_select_regroup_and_round_trip(tmp_path):
    """What DAPO's refills (select, of_groups) and a checkpoint of the batch in flight (to_state, a weights-only
    torch.load) do to multi-turn generations: the batch built from them is the same."""
    _, gens = runner(lookup_env(tmp_path)).run(ScriptedEngines(copy_after_tool), prompts(2),
                                               SamplingSpec(n=2, max_tokens=4), 0)
    picked = gens.select([3, 0])
    assert picked.trajectories.messages == [gens.trajectories.messages[3], gens.trajectories.messages[0]]
    regrouped = Generations.of_groups([gens.select([2, 3]), gens.select([0, 1])], 1.0)
    assert regrouped.trajectories.counts["turns"].tolist() == [2.0] * 4
    assert [len(p) for p in regrouped.trajectories.prompt_ids] == [len(p) for p in gens.trajectories.prompt_ids]
    torch.save(gens.to_state(), tmp_path / "gens.pt")
    back = Generations.from_state(torch.load(tmp_path / "gens.pt", weights_only=True))
    pad = TOK.pad_token_id
    a, b = batch_of([p.prompt_ids for p in prompts(2)], gens, pad), batch_of([p.prompt_ids for p in prompts(2)], back, pad)
    for name in ("input_ids", "attention_mask", "action_mask", "rollout_logprobs", "env_rewards"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert back.trajectories.messages == gens.trajectories.messages


# ---- the chat template -----------------------------------------------------------------------------------------

HERMES_LIKE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "Tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n{% elif m.role != 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer_with(template: str):
    tok = build_tokenizer()
    tok.chat_template = template
    return tok


def test_observation_tokens_are_what_the_template_adds_for_them():
    tok = tokenizer_with(HERMES_LIKE)
    turns = ChatTurns(tok)
    assert turns.closing == "<|im_end|>\n"
    tools = [{"type": "function", "function": {"name": "k", "description": "Read.", "parameters": {}}}]
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": '<tool_call>{"name": "k"}</tool_call>'}]
    turn = tok(conv[1]["content"], add_special_tokens=False)["input_ids"] + [EOS]
    obs = [{"role": "tool", "name": "k", "content": "7"}]
    got = turns.prompt_ids(conv[:1], tools) + turn + turns.observation_ids(conv, turn, obs, tools)
    assert tok.decode(got, skip_special_tokens=False) == tok.apply_chat_template(
        conv + obs, tools=tools, tokenize=False, add_generation_prompt=True)
    # A turn cut at max_new_tokens (no EOS sampled) gets the whole closing from the template.
    cut = turn[:-1]
    assert turns.observation_ids(conv, cut, obs, tools)[:2] == [EOS, tok.convert_tokens_to_ids("\n")]
    assert turns.observation_ids(conv, turn, obs, tools)[0] == tok.convert_tokens_to_ids("\n")


MISTRAL_LIKE = (
    # The rules of Mistral's v0.3 template that a tool loop meets: user / assistant alternate, leaving out tool results
    # and call turns (rendered from their tool_calls); every call and result has a 9-character id.
    "{%- set ns = namespace(index=0) %}{%- for m in messages %}"
    "{%- if not (m.role == 'tool' or m.tool_calls is defined) %}"
    "{%- if (m.role == 'user') != (ns.index % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{%- set ns.index = ns.index + 1 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{% if tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST] {{ m.content }}[/INST]"
    "{%- elif m.tool_calls is defined %}[TOOL_CALLS] [{% for c in m.tool_calls %}"
    "{%- if c.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{%- endif %}{{ c.function | tojson }}{% endfor %}]{{ eos_token }}"
    "{%- elif m.role == 'assistant' %} {{ m.content }}{{ eos_token }}"
    "{%- elif m.role == 'tool' %}{%- if m.tool_call_id is not defined or m.tool_call_id | length != 9 %}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    '[TOOL_RESULTS] {"content": {{ m.content }}, "call_id": "{{ m.tool_call_id }}"}[/TOOL_RESULTS]'
    "{%- endif %}{%- endfor %}")


def test_a_mistral_tool_episode_renders_its_calls_and_results_with_ids(tmp_path):
    """In the mistral format the call turn is recorded with its tool_calls and each result with its call's id, as
    Mistral's template requires; without them the template refuses the conversation."""
    tok = tokenizer_with(MISTRAL_LIKE)
    env = tool_env_spec(load_tools([str(lookup_env_file(tmp_path))]), "mistral", 1.0)
    call = '[{"name": "k", "arguments": {}}]'

    def policy(context: str) -> list[int]:  # the call, then the result's digit and EOS
        if "[TOOL_RESULTS]" not in context:
            return ids(call) + [EOS]
        return ids(context.rsplit('[TOOL_RESULTS] {"content": ', 1)[1][0]) + [EOS]

    _, gens = runner(env, tok).run(ScriptedEngines(policy), prompts(1), SamplingSpec(n=1, max_tokens=64), 0)
    calls = [{"id": "t0001c000", "type": "function", "function": {"name": "k", "arguments": {}}}]
    assert gens.trajectories.messages[0] == [
        {"role": "assistant", "content": call, "tool_calls": calls},
        {"role": "tool", "name": "k", "content": "3", "tool_call_id": "t0001c000"},
        {"role": "assistant", "content": "3"}]
    # The observation's tokens are the template's result turn, after the call as sampled; the answer is sampled.
    observation = '[TOOL_RESULTS] {"content": 3, "call_id": "t0001c000"}[/TOOL_RESULTS]'
    assert tok.decode(gens.token_ids[0], skip_special_tokens=False) == call + "<|im_end|>" + observation + "3<|im_end|>"
    assert gens.trajectories.action_masks[0].tolist() == [1] * (len(call) + 1) + [0] * len(observation) + [1, 1]
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": call},
             {"role": "tool", "name": "k", "content": "3"}]
    with pytest.raises(TemplateError, match="Tool call IDs should be alphanumeric strings with length 9"):
        ChatTurns(tok).render(plain, True)


LLAMA3_LIKE = (
    # Llama 3.1's layout: header-delimited turns, tools listed in the first user turn, a tool result rendered as an
    # ipython turn (role tool or ipython).
    "{%- for m in messages %}<|im_start|>{{ 'ipython' if m.role in ('tool', 'ipython') else m.role }}\n"
    "{% if loop.first and tools %}Tools: {{ tools | tojson }}\n{% endif %}{{ m.content }}<|im_end|>{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_llama3_tool_episode_renders_its_results_as_ipython_turns(tmp_path):
    """A llama3 call (the whole turn a JSON object) runs and its result comes back as a tool message, which a Llama 3
    template renders as an ipython turn; the messages carry no ids (the template needs none)."""
    tok = tokenizer_with(LLAMA3_LIKE)
    env = tool_env_spec(load_tools([str(lookup_env_file(tmp_path))]), "llama3", 1.0)
    call = '{"name": "k", "parameters": {}}'

    def policy(context: str) -> list[int]:  # the call, then the result's digit and EOS
        if "<|im_start|>ipython" not in context:
            return ids(call) + [EOS]
        return ids(context.rsplit("<|im_start|>ipython\n", 1)[1][0]) + [EOS]

    _, gens = runner(env, tok).run(ScriptedEngines(policy), prompts(1), SamplingSpec(n=1, max_tokens=64), 0)
    assert gens.trajectories.messages[0] == [{"role": "assistant", "content": call},
                                             {"role": "tool", "name": "k", "content": "3"},
                                             {"role": "assistant", "content": "3"}]
    observation = "<|im_start|>ipython\n3<|im_end|><|im_start|>assistant\n"
    assert tok.decode(gens.token_ids[0], skip_special_tokens=False) == call + "<|im_end|>" + observation + "3<|im_end|>"
    assert gens.trajectories.counts["tool_calls"].tolist() == [1.0]


def test_templates_that_rewrite_earlier_turns_are_refused():
    # Drops the reasoning of assistant turns that are not the last message: rendering one more message changes
    # what came before, so no suffix continues the sampled tokens.
    rewriting = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                 "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
                 "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    turns = ChatTurns(tokenizer_with(rewriting))
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>hm</think>k"}]
    with pytest.raises(TemplateError, match="the chat template is not prefix-stable: with the observation .* after "
                                            "turn 1, it renders the conversation so far differently"):
        turns.observation_ids(conv, [EOS], [{"role": "user", "content": "7"}])
    with pytest.raises(TemplateError, match="has no chat template"):
        ChatTurns(tokenizer_with(""))
    with pytest.raises(TemplateError, match="does not render an assistant message's content as given"):
        ChatTurns(tokenizer_with("{% for m in messages %}{{ m.role }}{% endfor %}"))


# ---- config -----------------------------------------------------------------------------------------------------

EXAMPLE = "examples/agentic_tiny_cpu.yaml"


def _resolve(*overrides):
    from pathlib import Path

    return resolve(load_config(Path(__file__).resolve().parents[2] / EXAMPLE, ["model.path=m", *overrides]))


@pytest.mark.parametrize("overrides, expected", [
    (["rollout.mode=async"], "rollout.tools: multi-turn episodes run with rollout.mode sync or one_step_off for "
                             "now, got rollout.mode async"),
    (["job=eval"], "rollout.tools: job eval does not run multi-turn episodes yet"),
    (["reward.functions=[]"], "reward.functions: the tool environment (rollout.tools) gives no reward of its own"),
    (["data.apply_chat_template=false"], "rollout.tools: observations are appended as chat turns"),
    (["rollout.env=my_env.py"], "rollout.env: set rollout.env or rollout.tools, not both"),
    (["rollout.tool_timeout_s=90"], "rollout.tool_timeout_s: must be > 0 and below rollout.env_timeout_s=60.0"),
    (["rollout.max_turns=0"], "rollout.max_turns: must be >= 1, got 0"),
])
def test_multi_turn_settings_are_checked_at_load(overrides, expected):
    with pytest.raises(ConfigError) as err:
        _resolve(*overrides)
    assert expected in str(err.value)


def test_an_environment_may_be_the_only_reward_and_the_context_has_room_for_every_turn():
    resolved = _resolve("rollout.tools=[]", "rollout.env=my_env.py:Env", "reward.functions=[]")
    # data.max_prompt_length 64 + 2 turns x 1 token + 1 observation x 256 tokens
    assert resolved.role("rollout").max_model_len == 64 + 2 + 256
    assert resolved.config.rollout.response_budget == 2
    cfg = dataclasses.replace(resolved.config.rollout, tools=[], env=None)
    assert not cfg.multi_turn and cfg.response_budget == 1


def test_environment_rewards_join_the_reward_and_a_failed_environment_zeroes_it():
    from rlhf_ray.config.schema import DataConfig, RewardConfig
    from rlhf_ray.controller.reward_scoring import RewardScorer
    from rlhf_ray.types import RolloutBatch

    with pytest.raises(ConfigError, match="name at least one reward"):
        RewardScorer(RewardConfig(functions=[]), DataConfig())
    batch = RolloutBatch.from_generations([[1], [1], [1]], [[2], [2], [2]], [[-1.0]] * 3, [0, 0, 0], 0)
    batch.responses = ["1", "2", "3"]
    batch.env_rewards = torch.tensor([1.0, 0.5, 2.0])
    batch.env_failed = torch.tensor([False, False, True])
    scorer = RewardScorer(RewardConfig(functions=["builtin:math"]), DataConfig(), env_rewards=True)
    total, metrics = scorer.finish(batch, None, ["p"] * 3, {"answer": ["1", "9", "3"]})
    # math: 1, 0, 1 (responses vs answers); + env 1, 0.5, 2; the failed third forced to 0
    assert total.tolist() == [2.0, 0.5, 0.0]
    assert metrics["reward/env_mean"] == pytest.approx(3.5 / 3, abs=1e-6)
    only_env, _ = RewardScorer(RewardConfig(functions=[]), DataConfig(), env_rewards=True).finish(
        batch, None, ["p"] * 3, {})
    assert only_env.tolist() == [1.0, 0.5, 0.0]


# ---- the README's environment and tool files ---------------------------------------------------------------------

def readme_file(first_line: str) -> str:
    """The README's indented code block that opens with ``first_line``, dedented."""
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
    start = lines.index(f"    {first_line}")
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


def test_the_readme_environment_plays_its_game(tmp_path):
    path = tmp_path / "guess_env.py"
    path.write_text(readme_file("# guess_env.py: the model guesses the row's number; the environment answers "
                                "\"higher\" or \"lower\"."))

    def bisect(context: str) -> str:  # reads the environment's answers so far
        lo, hi = 0, 99
        turns = context.split("<|im_start|>assistant\n")[1:]
        for turn in turns[:-1]:
            guess, reply = int(turn.split("<|im_end|>")[0]), turn.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            lo, hi = (guess + 1, hi) if reply == "higher" else (lo, guess - 1)
        return f"{(lo + hi) // 2}<|im_end|>"

    rows = [PromptExample(ids("x"), "x", "x", {"answer": "37"}, "rows.jsonl:1"),
            PromptExample(ids("x"), "x", "x", {"answer": "49"}, "rows.jsonl:2")]
    batch, gens = runner(load_env(f"{path}:GuessEnv"), max_turns=8).run(
        ScriptedEngines(bisect), rows, SamplingSpec(n=1, max_tokens=4), 0)
    # 37: guesses 49, 24, 36, 42, 39, 37 (6 tries); 49: the first guess
    assert gens.trajectories.counts["turns"].tolist() == [6.0, 1.0]
    assert batch.env_rewards.tolist() == pytest.approx([1 / 6, 1.0])
    assert batch.row_fields["trajectory"][0][:2] == [{"role": "assistant", "content": "49"},
                                                     {"role": "user", "content": "lower"}]


def test_the_readme_tools_answer_calls_and_errors(tmp_path):
    path = tmp_path / "tools.py"
    source = readme_file("# tools.py: what the model may call.")
    path.write_text(source)
    tools = load_tools([str(path)])
    assert [t.name for t in tools] == ["calculator", "lookup"]
    from rlhf_ray.agentic.tools import ToolEnv

    env = ToolEnv(tools, "hermes", timeout_s=2.0)
    env.reset({"table": {"b": "beta"}})
    call = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'
    obs, _, done = env.step(call.format("calculator", '{"expression": "(3 + 4) * 2"}')
                            + call.format("lookup", '{"key": "b"}')
                            + call.format("calculator", '{"expression": "__import__(\'os\')"}'))
    assert [m["content"] for m in obs] == ["14", "beta", "Error: calculator raised ValueError: not arithmetic: "
                                                         "__import__('os')"]
    # The 8-GPU example's calculator is this one.
    from pathlib import Path

    example = (Path(__file__).resolve().parents[2] / "examples/tools/calculator.py").read_text()
    assert source[source.index("def calculator"):source.index("def lookup")].strip() in example


def test_ppo_advantages_and_online_dpo_labels_cover_model_tokens_only(tmp_path):
    """GAE walks over the sampled tokens only (the observation between turns is part of the environment's
    transition), and online DPO's labels hold the sampled tokens only."""
    from rlhf_ray.algos.advantages import AdvantageParams, gae
    from rlhf_ray.algos.kl import kl_in_reward
    from rlhf_ray.controller.online_dpo import pair_engine_sums, sequence_example
    from rlhf_ray.data.batching import IGNORE_INDEX

    batch, gens = runner(lookup_env(tmp_path)).run(ScriptedEngines(copy_after_tool), prompts(1),
                                                   SamplingSpec(n=1, max_tokens=4), 0)
    mask = batch.action_mask
    a, b, c = mask[0].nonzero().flatten().tolist()  # "k" | observation | "3", EOS
    assert b > a + 1 and c == b + 1
    values = 0.01 * torch.arange(mask.shape[1], dtype=torch.float32)[None]
    rewards = kl_in_reward(torch.tensor([1.0]), torch.zeros_like(mask), mask, 0.0)
    adv, ret = gae(rewards, mask, batch.group_index, values, AdvantageParams(gamma=1.0, lam=0.5))
    V = values[0]
    A_c = 1.0 - V[c]                            # the last token: reward 1, no next value
    A_b = (V[c] - V[b]) + 0.5 * A_c             # r = 0, next value V_c
    A_a = (V[b] - V[a]) + 0.5 * A_b             # next value V_b: the observation's positions are skipped
    assert adv[0, [a, b, c]].tolist() == pytest.approx([float(A_a), float(A_b), float(A_c)], abs=1e-6)
    assert not adv[mask == 0].any() and not ret[mask == 0].any()
    example = sequence_example(batch, 0)
    labelled = [t for t, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert labelled == [a + 1, b + 1, c + 1]  # input positions of "k", "3", EOS
    # What online DPO checks the learners' sums against, sample 0 as both sides of a pair: 3 sampled tokens each
    # (of a completion of c - a + 1 tokens, the observation's included), each at the engine's log-prob -0.5.
    sums = pair_engine_sums(batch, gens, [(0, 0)])
    assert sums == {"sampled_tokens": 6.0, "completion_tokens": 2.0 * (c - a + 1), "logps": 6 * -0.5}


def test_environments_are_closed_at_the_end_and_when_an_error_stops_the_episodes(tmp_path):
    path = tmp_path / "closing.py"
    path.write_text(textwrap.dedent('''
        class Env:
            closed = []

            def reset(self, row):
                self.row = row
                return "go"

            def step(self, response):
                if response == "x":
                    raise ValueError("no x")
                return None, 1.0, True

            def close(self):
                Env.closed.append(self.row["secret"])
    '''))
    env = load_env(str(path))
    runner(env).run(ScriptedEngines(lambda ctx: "ok"), prompts(2), SamplingSpec(n=2, max_tokens=2), 0)
    assert sorted(env.cls.closed) == ["3", "3", "4", "4"]
    env.cls.closed.clear()
    with pytest.raises(EnvError, match="step raised ValueError: no x"):
        runner(env).run(ScriptedEngines(lambda ctx: "x"), prompts(2), SamplingSpec(n=1, max_tokens=2), 0)
    assert sorted(env.cls.closed) == ["3", "4"]
