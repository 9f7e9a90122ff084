"""The tool environment: loading tool functions and their schemas, parsing calls in the Hermes, Llama 3, Mistral and
fallback formats (the format picked from the chat template's text), running them with timeouts, and the error
observations a bad call gets instead of a crash."""

from __future__ import annotations

import json
import textwrap
import time

import pytest

from rlhf_ray.agentic.tools import (BadCall, ToolCall, ToolEnv, call_format, load_tools, parse_fallback, parse_hermes,
                                    parse_llama3, parse_mistral, run_calls)

TOOLS = '''
    import time


    def lookup(key: str, row: dict) -> str:
        """Look a key up in this task's table.

        Args:
            key: the key
            row: the data row
        """
        return row["table"][key]


    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: one
            b: the other
        """
        return a + b


    def clock() -> dict:
        """The time."""
        return {"h": 12}


    def slow(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "woke"


    def _helper():
        return 1
'''


@pytest.fixture
def tools(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(textwrap.dedent(TOOLS))
    return {t.name: t for t in load_tools([str(path)])}


def test_a_file_offers_its_public_functions_with_schemas_that_hide_the_row(tools, tmp_path):
    assert list(tools) == ["add", "clock", "lookup", "slow"]  # _helper and the imported module are not tools
    lookup = tools["lookup"]
    fn = lookup.schema["function"]
    assert fn["name"] == "lookup" and fn["description"] == "Look a key up in this task's table."
    assert fn["parameters"] == {"type": "object", "properties": {"key": {"type": "string", "description": "the key"}},
                                "required": ["key"]}
    assert lookup.takes_row and lookup.params == ("key",) and not tools["add"].takes_row
    one = load_tools([f"{tmp_path / 'my_tools.py'}:clock"])
    assert [t.name for t in one] == ["clock"]


@pytest.mark.parametrize("body, spec_tail, expected", [
    ("def f(x):\n    '''Doc.'''\n    return x\n", "", "tool 'f' from {path} cannot be described to the model"),
    ("def f(x: int):\n    return x\n", "", "a type hint on every parameter and a docstring"),
    ("def f() -> int:\n    '''Doc.'''\n    return 1\n", ":g", "tool file {path} has no function 'g'; functions "
                                                             "defined there: f"),
    ("X = 1\n", "", "defines no public function"),
])
def test_bad_tool_files_are_named(tmp_path, body, spec_tail, expected):
    path = tmp_path / "bad_tools.py"
    path.write_text(body)
    with pytest.raises(ValueError) as err:
        load_tools([str(path) + spec_tail])
    assert expected.format(path=path) in str(err.value)


def test_two_tools_of_one_name_are_refused(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "t.py").write_text("def f() -> int:\n    '''Doc.'''\n    return 1\n")
    with pytest.raises(ValueError, match="two tools are named 'f'"):
        load_tools([str(tmp_path / "a" / "t.py"), str(tmp_path / "b" / "t.py:f")])


def test_hermes_calls_are_parsed_in_order_and_bad_ones_say_why(tools):
    text = ('Let me check. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
            '<tool_call>{"name": "lookup", "arguments": "{\\"key\\": \\"x\\"}"}</tool_call>'
            '<tool_call>{"name": "clock"}</tool_call><tool_call>{"name": "nope", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call><tool_call>["add"]</tool_call>'
            '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call><tool_call>{"name": "clock"')
    calls = parse_hermes(text, tools)
    assert calls[:3] == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("lookup", {"key": "x"}), ToolCall("clock", {})]
    problems = [c.problem for c in calls[3:]]
    assert all(isinstance(c, BadCall) for c in calls[3:]) and len(problems) == 5
    assert problems[0] == "there is no tool 'nope'; the tools are add, clock, lookup, slow"
    assert problems[1].startswith("the tool call is not valid JSON (Expecting property name enclosed in double quotes at")
    assert problems[2].startswith('a tool call is a JSON object {"name": <tool>, "arguments": {...}}')
    assert problems[3] == "the arguments of add must be a JSON object, got [1, 2]"
    assert problems[4] == "a <tool_call> was not closed with </tool_call>"
    assert parse_hermes("The answer is 4.", tools) == []


def test_fallback_calls_are_the_first_lines_tool_name_and_its_arguments(tools):
    assert parse_fallback("clock", tools) == [ToolCall("clock", {})]
    assert parse_fallback("  lookup b c\nmore text", tools) == [ToolCall("lookup", {"key": "b c"})]
    assert parse_fallback('add {"a": 1, "b": 2}', tools) == [ToolCall("add", {"a": 1, "b": 2})]
    assert parse_fallback("slow 0.5", tools) == [ToolCall("slow", {"seconds": 0.5})]  # a number, from JSON
    assert parse_fallback("The answer: add them", tools) == []  # the first word is not a tool: an answer
    assert parse_fallback("7", tools) == [] and parse_fallback("", tools) == []
    (bad,) = parse_fallback("add 1 2", tools)
    assert bad.problem == 'tool add takes 2 parameters (a, b); give them as a JSON object: add {"a": ...}'
    (bad,) = parse_fallback("slow soon", tools)
    assert bad.problem == "'soon' is not a number (the seconds of slow)"
    (bad,) = parse_fallback("add {1}", tools)
    assert bad.problem.startswith("the arguments of add are not a valid JSON object")


def test_llama3_calls_are_the_turns_json_objects(tools):
    # One call, the whole turn; "arguments" is taken for "parameters" too; the tag (when the text shows it) may
    # follow the model's own words.
    assert parse_llama3('{"name": "add", "parameters": {"a": 1, "b": 2}}', tools) == [ToolCall("add", {"a": 1, "b": 2})]
    assert parse_llama3('<|python_tag|>{"name": "lookup", "arguments": {"key": "x"}}', tools) == [
        ToolCall("lookup", {"key": "x"})]
    assert parse_llama3('Let me look. <|python_tag|> {"name": "clock", "parameters": {}}', tools) == [
        ToolCall("clock", {})]
    # Several, separated by ";" (Llama 3.2); a parameters string holding JSON is decoded.
    assert parse_llama3('{"name": "clock", "parameters": {}}; {"name": "add", "parameters": "{\\"a\\": 1, '
                        '\\"b\\": 2}"}', tools) == [ToolCall("clock", {}), ToolCall("add", {"a": 1, "b": 2})]
    # An answer: the turn does not begin with "{" and shows no tag.
    assert parse_llama3("The answer is 4.", tools) == [] and parse_llama3("", tools) == []
    assert parse_llama3('I would call {"name": "clock"}', tools) == []
    (bad,) = parse_llama3('{"name": "add", "parameters": {"a": 1,', tools)  # 38 characters, cut after the ","
    assert bad.problem.startswith("the tool call is not valid JSON (Expecting property name enclosed in double "
                                  'quotes at character 38): {"name": "add"')
    (bad,) = parse_llama3('{"name": "nope", "parameters": {}}', tools)
    assert bad.problem == "there is no tool 'nope'; the tools are add, clock, lookup, slow"
    (bad,) = parse_llama3('{"name": "add", "parameters": [1, 2]}', tools)
    assert bad.problem == "the arguments of add must be a JSON object, got [1, 2]"
    (bad,) = parse_llama3('{"function": "add"}', tools)
    assert bad.problem == 'a tool call is a JSON object {"name": <tool>, "parameters": {...}}; got {"function": "add"}'
    (bad,) = parse_llama3("<|python_tag|>print(1)", tools)
    assert bad.problem.startswith('after <|python_tag|> a tool call is a JSON object {"name": <tool>, "parameters"')
    # The calls before text that is not one still run; the text is named.
    good, bad = parse_llama3('{"name": "clock", "parameters": {}} Done.', tools)
    assert good == ToolCall("clock", {}) and bad.problem.startswith("the tool call is not valid JSON (Expecting "
                                                                    "value at character 0): Done.")


def test_mistral_calls_are_a_list_after_the_marker(tools):
    assert parse_mistral('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', tools) == [
        ToolCall("add", {"a": 1, "b": 2})]
    # Several calls in the list, in order; text before the marker is the model's own.
    assert parse_mistral('Checking. [TOOL_CALLS] [{"name": "lookup", "arguments": {"key": "x"}}, '
                         '{"name": "clock", "arguments": {}}]', tools) == [ToolCall("lookup", {"key": "x"}),
                                                                          ToolCall("clock", {})]
    # The marker is a special token the decoded turn usually lacks: a turn that begins with a list of objects is
    # a call list too; a single object after the marker is a list of one.
    assert parse_mistral(' [{"name": "clock", "arguments": {}}]', tools) == [ToolCall("clock", {})]
    assert parse_mistral('[TOOL_CALLS]{"name": "clock"}', tools) == [ToolCall("clock", {})]
    assert parse_mistral("The answer is 4.", tools) == [] and parse_mistral("[1, 2]", tools) == []
    (bad,) = parse_mistral('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}', tools)  # the list: 38 characters
    assert bad.problem.startswith("the tool calls are not valid JSON (Expecting ',' delimiter at character 38)")
    good, unknown, not_object, not_call = parse_mistral(
        '[TOOL_CALLS][{"name": "clock", "arguments": {}}, {"name": "nope", "arguments": {}}, '
        '{"name": "add", "arguments": "1 and 2"}, "add"]', tools)
    assert good == ToolCall("clock", {})
    assert unknown.problem == "there is no tool 'nope'; the tools are add, clock, lookup, slow"
    assert not_object.problem == 'the arguments of add must be a JSON object, got "1 and 2"'
    assert not_call.problem == 'a tool call is a JSON object {"name": <tool>, "arguments": {...}}; got "add"'
    (empty,) = parse_mistral("[TOOL_CALLS][]", tools)
    assert empty.problem.startswith("[TOOL_CALLS] is followed by an empty list")
    good, trailing = parse_mistral('[TOOL_CALLS][{"name": "clock", "arguments": {}}] and then', tools)
    assert good == ToolCall("clock", {}) and trailing.problem == "text after the list of tool calls: and then"


def test_mistral_results_carry_the_ids_of_their_calls(tools):
    """Mistral's chat template renders a call turn from the message's tool_calls, each with a 9-character id, and a
    result only with the id of its call: the tool environment gives both."""
    env = ToolEnv(list(tools.values()), "mistral", timeout_s=1.0)
    env.reset({"table": {"k": "v"}})
    turn = '[{"name": "lookup", "arguments": {"key": "k"}}, {"name": "nope", "arguments": {}}]'
    obs, _, done = env.step(turn)
    assert obs == [{"role": "tool", "name": "lookup", "content": "v", "tool_call_id": "t0001c000"},
                   {"role": "tool", "content": "Error: there is no tool 'nope'; the tools are add, clock, lookup, "
                                               "slow", "tool_call_id": "t0001c001"}] and not done
    assert all(len(m["tool_call_id"]) == 9 and m["tool_call_id"].isalnum() for m in obs)
    assert env.assistant_message(turn) == {"role": "assistant", "content": turn, "tool_calls": [
        {"id": "t0001c000", "type": "function", "function": {"name": "lookup", "arguments": {"key": "k"}}},
        {"id": "t0001c001", "type": "function", "function": {"name": "", "arguments": {}}}]}
    obs, _, _ = env.step('[{"name": "clock", "arguments": {}}]')
    assert obs[0]["tool_call_id"] == "t0002c000"
    assert env.step("It is v.") == (None, 0.0, True)
    assert env.assistant_message("It is v.") == {"role": "assistant", "content": "It is v."}  # no calls, no ids
    # The other formats leave the messages as they were.
    hermes = ToolEnv(list(tools.values()), "hermes", timeout_s=1.0)
    obs, _, _ = hermes.step('<tool_call>{"name": "clock"}</tool_call>')
    assert obs == [{"role": "tool", "name": "clock", "content": '{"h": 12}'}]
    assert hermes.assistant_message("x") == {"role": "assistant", "content": "x"}


@pytest.mark.parametrize("template, expected", [
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}", "fallback"),
    ("{%- for tool in tools %}{{ tool | tojson }}{% endfor %} ... <tool_call>\n{{ tool_call | tojson }}</tool_call>",
     "hermes"),
    ("{%- if message.tool_calls %}[TOOL_CALLS] [{{ message.tool_calls | tojson }}]{%- endif %}[TOOL_RESULTS]",
     "mistral"),
    ("{%- if builtin_tools is defined %}<|python_tag|>{{ tool_call.name }}.call(){% endif %}", "llama3"),
    ("{%- elif message.role == 'tool' or message.role == 'ipython' %}<|start_header_id|>ipython<|end_header_id|>",
     "llama3"),  # Llama 3.2: the ipython role, no <|python_tag|>
    ({"default": "{{ messages }}", "tool_use": "<tool_call>{{ tool_call }}</tool_call>"}, "hermes"),
    (None, "fallback"),
])
def test_auto_picks_the_format_whose_marker_the_chat_template_holds(template, expected):
    class Tok:
        chat_template = template

    assert call_format("auto", Tok()) == expected


def test_a_named_format_is_used_as_is_and_an_unknown_one_is_refused():
    class Tok:
        chat_template = "... <tool_call> ..."

    assert call_format("fallback", Tok()) == "fallback" and call_format("llama3", Tok()) == "llama3"
    assert call_format("mistral", Tok()) == "mistral" and call_format("hermes", Tok()) == "hermes"
    with pytest.raises(ValueError, match="rollout.tool_call_format: unknown format 'json'; formats: auto, hermes, "
                                         "llama3, mistral, fallback"):
        call_format("json", Tok())


def test_calls_run_together_and_failures_become_error_messages(tools):
    row = {"table": {"x": "42"}}
    calls = [ToolCall("lookup", {"key": "x"}), ToolCall("add", {"a": 1, "b": 2}), ToolCall("clock", {}),
             ToolCall("lookup", {"key": "missing"}), ToolCall("add", {"a": 1}), ToolCall("lookup", {"row": {}}),
             ToolCall("slow", {"seconds": 5}), ToolCall("slow", {"seconds": 0.2}), BadCall("no such thing")]
    t0 = time.monotonic()
    out = run_calls(calls, tools, row, timeout_s=0.5)
    assert time.monotonic() - t0 < 1.5  # the calls ran together, the hung one abandoned at its timeout
    contents = [m["content"] for m, _ in out]
    assert contents[:3] == ["42", "3", json.dumps({"h": 12})]
    assert contents[3] == "Error: lookup raised KeyError: 'missing'"
    assert contents[4] == "Error: bad arguments for add: missing a required argument: 'b'"
    assert contents[5] == "Error: row is not a parameter of lookup"
    assert contents[6] == "Error: slow did not return within 0.5 s"
    assert contents[7] == "woke"
    assert contents[8] == "Error: no such thing"
    assert [bad for _, bad in out] == [False, False, False, True, True, True, True, False, True]
    assert [m.get("name") for m, _ in out] == ["lookup", "add", "clock", "lookup", "add", "lookup", "slow", "slow",
                                                None]
    assert all(m["role"] == "tool" for m, _ in out)


def test_the_tool_environment_answers_calls_until_a_turn_makes_none(tools):
    env = ToolEnv(list(tools.values()), "fallback", timeout_s=1.0)
    assert env.reset({"table": {"k": "v"}, "prompt": "p"}) is None  # the row's prompt, rendered with the tools
    assert [t["function"]["name"] for t in env.tools] == ["add", "clock", "lookup", "slow"]
    assert env.step("lookup k") == ([{"role": "tool", "name": "lookup", "content": "v"}], 0.0, False)
    obs, reward, done = env.step("add 1")
    assert obs[0]["content"].startswith("Error: tool add takes 2 parameters") and not done
    assert env.step("It is v.") == (None, 0.0, True)
    assert (env.tool_calls, env.tool_errors) == (2, 1)


def test_the_python_sandbox_is_a_built_in_tool():
    """`rollout.tools: [builtin:python_sandbox]`: the sandbox's model-facing tool, checked to run here at load."""
    (tool,) = load_tools(["builtin:python_sandbox"])
    assert tool.name == "python_sandbox" and tool.params == ("code",) and not tool.takes_row
    assert tool.source == "built-in tool builtin:python_sandbox"
    env = ToolEnv([tool], "hermes", timeout_s=20.0)
    env.reset({})
    obs, _, done = env.step('<tool_call>{"name": "python_sandbox", "arguments": {"code": "print(6 * 7)"}}</tool_call>')
    assert obs == [{"role": "tool", "name": "python_sandbox", "content": "42\n"}] and not done
    with pytest.raises(ValueError, match="unknown built-in tool builtin:shell; built-ins: builtin:python_sandbox"):
        load_tools(["builtin:shell"])
