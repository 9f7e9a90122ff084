"""The built-in tool environment (``rollout.tools``): Python functions the model calls during its turns.

Tools are plain (or ``async``) Python functions named like reward functions, ``path.py:fn`` (``path.py`` alone: every
public function defined there), or built in: ``builtin:python_sandbox`` runs the model's Python program in the
sandbox (``rlhf_ray.agentic.sandbox``; refused at load where the sandbox cannot be made). Each needs type hints and a Google-style docstring: its JSON schema
(``transformers.utils.get_json_schema``) is passed to the chat template as ``tools=``, which shows the model what it
may call. A parameter named ``row`` is filled with the sample's data row (every field) and left out of the schema,
so a tool can read what the model must not see (a hidden answer, a database id).

A model turn's tool calls are parsed in the format of the model's chat template (``rollout.tool_call_format``; auto
picks it from markers in the template's text, ``AUTO_MARKERS``: ``<tool_call>`` hermes, ``[TOOL_CALLS]`` mistral,
``<|python_tag|>`` or the ``ipython`` role llama3, else fallback)::

    hermes     <tool_call>{"name": "lookup", "arguments": {"key": "b"}}</tool_call>     (any number per turn;
               Qwen2.5 / Qwen3, Hermes)
    llama3     {"name": "lookup", "parameters": {"key": "b"}}                            (the whole turn, optionally
               after <|python_tag|>; several separated by ";"; Llama 3.1 / 3.2 JSON tool calling)
    mistral    [TOOL_CALLS][{"name": "lookup", "arguments": {"key": "b"}}, ...]          (a list; Mistral 7B v0.3,
               Nemo, Small; text before [TOOL_CALLS] is the model's own)
    fallback   the turn's first line is a tool's name, alone or followed by its arguments: a JSON object, or for a
               tool with one parameter its value as plain text:
                   lookup {"key": "b"}        lookup b        clock

``<|python_tag|>`` and ``[TOOL_CALLS]`` are special tokens in their tokenizers, and a turn's text is decoded without
special tokens, so it usually lacks them: a llama3 turn that begins with ``{`` and a mistral turn that begins with a
JSON list of objects (``[{``) are calls without their marker too; any other turn is the answer. (Mistral's newer
``[TOOL_CALLS]name[ARGS]{...}`` form of v11+ tokenizers is not parsed.)

Every call runs (the calls of a turn together), each within ``rollout.tool_timeout_s``; its result comes back as a
``{"role": "tool", "name": ..., "content": ...}`` message (a str as is, anything else as JSON), which the chat
template renders in its own markup (Llama 3's ``ipython`` turn, Mistral's ``[TOOL_RESULTS]``). Mistral's template
pairs each result with its call by a 9-character id and renders a call turn from the message's ``tool_calls``: in
that format the results carry ``tool_call_id`` and the call turn's message gets ``tool_calls``
(``ToolEnv.assistant_message``).

A malformed call (bad JSON, an unknown tool, arguments that are not an object or do not fit, a ``<tool_call>`` never
closed, text after a llama3 / mistral call), a tool that raises and one that times out each give the model an
``Error: ...`` tool message instead, and are counted (``env/tool_errors``); the run goes on. A turn with no tool call
is the answer: the episode ends there, and ``reward.functions`` score it (this environment gives no reward of its
own).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from rlhf_ray.agentic.env import EnvSpec, Message

BUILTIN_PREFIX = "builtin:"
BUILTIN_TOOLS: dict[str, tuple[str, str, Optional[str]]] = {
    "python_sandbox": ("rlhf_ray.agentic.sandbox", "python_sandbox", "default_interpreter"),
}
"""Tools a config names ``builtin:<name>``: (module, function, a function of that module that raises when the tool
cannot run on this machine, checked at load). ``python_sandbox`` runs the model's Python program in the sandbox of
``rlhf_ray.agentic.sandbox`` and returns what it printed."""
ROW_PARAMETER = "row"
"""A tool parameter of this name gets the data row and is hidden from the model."""
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
LLAMA3_TAG = "<|python_tag|>"
MISTRAL_TAG = "[TOOL_CALLS]"
MISTRAL_LIST = re.compile(r"\s*\[\s*\{")


@dataclass(frozen=True)
class Tool:
    """One function the model may call."""

    name: str
    fn: Callable[..., Any]
    schema: dict
    """``{"type": "function", "function": {"name", "description", "parameters"}}`` without ``row``."""
    params: tuple[str, ...]
    """The parameters the model gives (``row`` left out)."""
    takes_row: bool
    source: str
    """``tool 'name' from /abs/path.py`` for error messages."""


def load_tools(specs: list[str]) -> list[Tool]:
    """The tools ``rollout.tools`` names; ValueError naming the file and function when one is missing, not a
    function, cannot be described to the model (type hints, docstring), or two share a name."""
    from rlhf_ray.rewards.python_file import import_user_file, parse_spec

    tools: dict[str, Tool] = {}
    for spec in specs:
        if spec.strip().startswith(BUILTIN_PREFIX):
            tool = _builtin(spec.strip()[len(BUILTIN_PREFIX):])
            if tool.name in tools:
                raise ValueError(f"rollout.tools: two tools are named {tool.name!r}")
            tools[tool.name] = tool
            continue
        path, name = parse_spec(spec.strip(), "")
        module = import_user_file(path, "tool file")
        abspath = os.path.abspath(path)
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
                         and v.__module__ == module.__name__)
        if name and not callable(getattr(module, name, None)):
            raise ValueError(f"tool file {abspath} has no function {name!r}; functions defined there: "
                             f"{', '.join(defined) or 'none'}")
        if not name and not defined:
            raise ValueError(f"tool file {abspath} defines no public function to offer as a tool")
        for fn_name in [name] if name else defined:
            tool = _tool(getattr(module, fn_name), fn_name, f"tool {fn_name!r} from {abspath}")
            if fn_name in tools:
                raise ValueError(f"rollout.tools: two tools are named {fn_name!r} ({tools[fn_name].source} and "
                                 f"{tool.source}); the model calls tools by name")
            tools[fn_name] = tool
    return list(tools.values())


def _builtin(name: str) -> Tool:
    """The built-in tool ``name`` (``BUILTIN_TOOLS``), checked to run here."""
    import importlib

    if name not in BUILTIN_TOOLS:
        raise ValueError(f"unknown built-in tool {BUILTIN_PREFIX}{name}; built-ins: "
                         f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_TOOLS)}")
    module_name, fn_name, check = BUILTIN_TOOLS[name]
    module = importlib.import_module(module_name)
    if check is not None:
        try:
            getattr(module, check)()
        except Exception as exc:  # noqa: BLE001 - the tool's own reason it cannot run (e.g. SandboxUnavailable)
            raise ValueError(f"built-in tool {BUILTIN_PREFIX}{name} cannot run on this machine: "
                             f"{type(exc).__name__}: {exc}") from exc
    return _tool(getattr(module, fn_name), fn_name, f"built-in tool {BUILTIN_PREFIX}{name}")


def _tool(fn: Callable[..., Any], name: str, source: str) -> Tool:
    from transformers.utils import get_json_schema

    try:
        schema = get_json_schema(fn)
    except Exception as exc:  # noqa: BLE001 - transformers' own parsing exceptions
        raise ValueError(f"{source} cannot be described to the model ({type(exc).__name__}: {exc}); a tool needs a "
                         "type hint on every parameter and a docstring with an Args: section describing them") from exc
    params = schema["function"].get("parameters", {"type": "object", "properties": {}})
    takes_row = ROW_PARAMETER in params.get("properties", {})
    params["properties"] = {k: v for k, v in params.get("properties", {}).items() if k != ROW_PARAMETER}
    if "required" in params:
        params["required"] = [k for k in params["required"] if k != ROW_PARAMETER]
    schema["function"]["parameters"] = params
    schema["function"].pop("return", None)
    return Tool(name, fn, schema, tuple(params["properties"]), takes_row, source)


# ---- parsing a turn's calls ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class BadCall:
    """A call that cannot be run; ``problem`` is what the model is told."""

    problem: str


Parsed = Union[ToolCall, BadCall]


def parse_hermes(text: str, tools: dict[str, Tool]) -> list[Parsed]:
    """Every ``<tool_call>{json}</tool_call>`` of ``text``, in order (JSON: ``name`` and ``arguments``, an object or
    a JSON string of one; ``parameters`` is taken for ``arguments`` too); a ``<tool_call>`` never closed is a bad
    call."""
    calls: list[Parsed] = []
    for body in HERMES_CALL.findall(text):
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            calls.append(BadCall(f"the tool call is not valid JSON ({exc.msg} at character {exc.pos}): {body[:200]}"))
            continue
        calls.append(_call_object(data, body, "arguments", tools))
    if text.count("<tool_call>") > len(HERMES_CALL.findall(text)):
        calls.append(BadCall("a <tool_call> was not closed with </tool_call>"))
    return calls


def parse_llama3(text: str, tools: dict[str, Tool]) -> list[Parsed]:
    """Llama 3.1 / 3.2 JSON tool calls: the turn (after ``<|python_tag|>`` when it shows one; text before the tag is
    the model's own) is a JSON object ``{"name": ..., "parameters": {...}}`` (``arguments`` taken too), or several
    separated by ``;``. A turn that does not begin with ``{`` calls nothing (it is the answer), unless it shows the
    tag; what follows the calls and is not one is a bad call (the calls before it run)."""
    tagged = LLAMA3_TAG in text
    body = text.split(LLAMA3_TAG, 1)[1].strip() if tagged else text.strip()
    if not body.startswith("{"):
        return [BadCall(f'after {LLAMA3_TAG} a tool call is a JSON object {{"name": <tool>, "parameters": {{...}}}}; '
                        f"got {body[:200]}")] if tagged else []
    calls: list[Parsed] = []
    decoder, at = json.JSONDecoder(), 0
    while True:
        while at < len(body) and (body[at].isspace() or body[at] == ";"):  # the separators between calls
            at += 1
        if at == len(body):
            return calls
        try:
            data, end = decoder.raw_decode(body, at)
        except json.JSONDecodeError as exc:
            calls.append(BadCall(f"the tool call is not valid JSON ({exc.msg} at character {exc.pos - at}): "
                                 f"{body[at:at + 200]}"))
            return calls
        calls.append(_call_object(data, body[at:end], "parameters", tools))
        at = end


def parse_mistral(text: str, tools: dict[str, Tool]) -> list[Parsed]:
    """Mistral tool calls: ``[TOOL_CALLS]`` then a JSON list of ``{"name": ..., "arguments": {...}}`` (a single object
    taken as a list of one; text before the marker is the model's own). A turn without the marker that begins with
    a list of objects (``[{``) is a call list too; any other calls nothing. Text after the list is a bad call (the
    calls before it run)."""
    if MISTRAL_TAG in text:
        body = text.split(MISTRAL_TAG, 1)[1].strip()
    elif MISTRAL_LIST.match(text):
        body = text.strip()
    else:
        return []
    try:
        data, end = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError as exc:
        return [BadCall(f"the tool calls are not valid JSON ({exc.msg} at character {exc.pos}): {body[:200]}")]
    items = data if isinstance(data, list) else [data]
    calls = [_call_object(item, json.dumps(item, ensure_ascii=False), "arguments", tools) for item in items]
    if not items:
        calls.append(BadCall(f'{MISTRAL_TAG} is followed by an empty list; give [{{"name": <tool>, "arguments": '
                             '{...}}, ...]'))
    if body[end:].strip():
        calls.append(BadCall(f"text after the list of tool calls: {body[end:].strip()[:200]}"))
    return calls


def parse_fallback(text: str, tools: dict[str, Tool]) -> list[Parsed]:
    """The call on the first line of ``text`` when its first word is a tool's name (else no call): ``name``,
    ``name {json object}``, or for a one-parameter tool ``name <value>`` (a string parameter takes the text as is,
    another type its JSON value)."""
    line = text.strip().split("\n", 1)[0].strip()
    name, _, rest = line.partition(" ")
    if name not in tools:
        return []
    tool, rest = tools[name], rest.strip()
    if not rest:
        return [_named(name, {}, tools)]
    if rest.startswith("{"):
        try:
            return [_named(name, json.loads(rest), tools)]
        except json.JSONDecodeError as exc:
            return [BadCall(f"the arguments of {name} are not a valid JSON object ({exc.msg}): {rest[:200]}")]
    if len(tool.params) != 1:
        return [BadCall(f"tool {name} takes {len(tool.params)} parameters ({', '.join(tool.params) or 'none'}); give "
                        f'them as a JSON object: {name} {{"{tool.params[0] if tool.params else "x"}": ...}}')]
    param = tool.params[0]
    kind = tool.schema["function"]["parameters"]["properties"][param].get("type")
    if kind == "string":
        return [ToolCall(name, {param: rest})]
    try:
        return [ToolCall(name, {param: json.loads(rest)})]
    except json.JSONDecodeError:
        return [BadCall(f"{rest[:50]!r} is not a {kind} (the {param} of {name})")]


def _call_object(data: Any, body: str, key: str, tools: dict[str, Tool]) -> Parsed:
    """One call's decoded JSON: ``{"name": <tool>, key: {...}}`` (``arguments`` / ``parameters`` either way, an
    object or a JSON string of one; none: no arguments); ``body`` is the call's text, quoted when it is bad."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return BadCall(f'a tool call is a JSON object {{"name": <tool>, "{key}": {{...}}}}; got {body[:200]}')
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # a string that is not JSON: named as arguments that are not an object
    return _named(data["name"], args, tools)


def _named(name: str, args: Any, tools: dict[str, Tool]) -> Parsed:
    if name not in tools:
        return BadCall(f"there is no tool {name!r}; the tools are {', '.join(tools)}")
    if not isinstance(args, dict):
        return BadCall(f"the arguments of {name} must be a JSON object, got {json.dumps(args)[:200]}")
    return ToolCall(name, args)


CALL_PARSERS: dict[str, Callable[[str, dict[str, Tool]], list[Parsed]]] = {
    "hermes": parse_hermes, "llama3": parse_llama3, "mistral": parse_mistral, "fallback": parse_fallback}
"""The formats of ``rollout.tool_call_format`` (besides auto)."""
AUTO_MARKERS: tuple[tuple[str, str], ...] = (
    ("<tool_call>", "hermes"), (MISTRAL_TAG, "mistral"), (LLAMA3_TAG, "llama3"), ("ipython", "llama3"))
"""auto: the first format whose marker the chat template's text holds. Hermes first: a Hermes template for a Llama
base model may mention ``ipython`` too; Llama 3.2's template has the ``ipython`` role but no ``<|python_tag|>``."""
CALL_IDS = ("mistral",)
"""The formats whose chat template pairs each tool result with its call by id (``ToolEnv.assistant_message``)."""


def call_format(setting: str, tokenizer: Any) -> str:
    """``rollout.tool_call_format`` resolved: auto is the format of the first of ``AUTO_MARKERS`` in the chat template
    (a tokenizer with several named templates: any of them), else fallback. ValueError naming the key for an
    unknown format."""
    if setting != "auto":
        if setting not in CALL_PARSERS:
            raise ValueError(f"rollout.tool_call_format: unknown format {setting!r}; formats: auto, "
                             f"{', '.join(CALL_PARSERS)}")
        return setting
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates (e.g. "default" and "tool_use")
        template = "\n".join(str(t) for t in template.values())
    return next((fmt for marker, fmt in AUTO_MARKERS if marker in template), "fallback")


# ---- running calls ------------------------------------------------------------------------------------------

def run_calls(calls: list[Parsed], tools: dict[str, Tool], row: dict, timeout_s: float) -> list[tuple[Message, bool]]:
    """Each call's tool message and whether it is an error; the calls run together in daemon threads, each given
    ``timeout_s`` (one that takes longer is abandoned: a Python thread cannot be killed)."""
    boxes: list[dict] = []
    threads = []
    for call in calls:
        box: dict[str, Any] = {}
        boxes.append(box)
        if isinstance(call, BadCall):
            box["message"] = call.problem
            continue
        tool = tools[call.name]
        if ROW_PARAMETER in call.arguments:
            box["message"] = f"{ROW_PARAMETER} is not a parameter of {call.name}"
            continue
        kwargs = dict(call.arguments, **({ROW_PARAMETER: row} if tool.takes_row else {}))
        try:
            inspect.signature(tool.fn).bind(**kwargs)
        except TypeError as exc:
            box["message"] = f"bad arguments for {call.name}: {exc}"
            continue

        def target(box: dict = box, tool: Tool = tool, kwargs: dict = kwargs) -> None:
            try:
                value = tool.fn(**kwargs)
                box["value"] = asyncio.run(value) if inspect.iscoroutine(value) else value
            except BaseException as exc:  # SystemExit from a tool too: the model is told, the run goes on
                box["raised"] = exc

        t = threading.Thread(target=target, name=f"tool-{call.name}", daemon=True)
        t.start()
        threads.append((t, box, call))
    deadline = time.monotonic() + timeout_s
    for t, box, call in threads:
        t.join(max(deadline - time.monotonic(), 0.0))
        if t.is_alive():
            box["message"] = f"{call.name} did not return within {timeout_s:g} s"
        elif "raised" in box:
            exc = box["raised"]
            box["message"] = f"{call.name} raised {type(exc).__name__}: {exc}"
    out = []
    for call, box in zip(calls, boxes):
        name = {"name": call.name} if isinstance(call, ToolCall) else {}
        if "message" in box:
            out.append(({"role": "tool", **name, "content": f"Error: {box['message']}"}, True))
        else:
            out.append(({"role": "tool", **name, "content": _as_text(box.get("value"))}, False))
    return out


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


class ToolEnv:
    """The environment of ``rollout.tools``: the row's prompt with the tools' schemas, then each turn's calls run
    and answered with tool messages, until a turn calls none. Reward 0 throughout (``reward.functions`` score the
    episode); counts ``tool_calls`` and ``tool_errors``."""

    def __init__(self, tools: list[Tool], call_format: str, timeout_s: float):
        self.by_name = {t.name: t for t in tools}
        self.tools = [t.schema for t in tools]
        self.parse = CALL_PARSERS[call_format]
        self.with_ids = call_format in CALL_IDS
        self.timeout_s = timeout_s
        self.row: dict = {}
        self.tool_calls = self.tool_errors = self.turns = 0
        self.last_calls: list[dict] = []
        """The last turn's calls as a chat message's ``tool_calls`` (formats of ``CALL_IDS`` only)."""

    def reset(self, row: dict) -> Optional[list[Message]]:
        self.row = row
        return None  # the row's prompt (rendered with the tools)

    def step(self, response: str) -> tuple[Optional[list[Message]], float, bool]:
        self.turns += 1
        self.last_calls = []
        calls = self.parse(response, self.by_name)
        if not calls:
            return None, 0.0, True
        results = run_calls(calls, self.by_name, self.row, self.timeout_s)
        self.tool_calls += len(results)
        self.tool_errors += sum(bad for _, bad in results)
        messages = [message for message, _ in results]
        if self.with_ids:
            for i, (call, message) in enumerate(zip(calls, messages)):
                call_id = f"t{self.turns:04d}c{i:03d}"  # Mistral's ids: 9 letters or digits
                message["tool_call_id"] = call_id
                name, args = (call.name, call.arguments) if isinstance(call, ToolCall) else ("", {})
                self.last_calls.append({"id": call_id, "type": "function",
                                        "function": {"name": name, "arguments": args}})
        return messages, 0.0, False

    def assistant_message(self, text: str) -> Message:
        """The message the last turn becomes in the conversation (see ``env``): its text, with its calls as
        ``tool_calls`` (the ids its results carry) in a format of ``CALL_IDS``, whose template renders a call turn
        from them and refuses a result whose call it cannot find."""
        return {"role": "assistant", "content": text, **({"tool_calls": self.last_calls} if self.last_calls else {})}


def tool_env_spec(tools: list[Tool], call_format_name: str, timeout_s: float) -> EnvSpec:
    """The tool environment as an ``EnvSpec`` (one ``ToolEnv`` per sample)."""
    names = ", ".join(t.name for t in tools)
    return EnvSpec(f"tool environment ({names}; {call_format_name} calls)",
                   lambda: ToolEnv(tools, call_format_name, timeout_s))
