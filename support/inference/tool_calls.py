"""Reading a generated reply in the chat template's format (support/data/tokenizer_spec.py): the reasoning in
<think>...</think>, the text answer, and each <tool_call>{"name": ..., "arguments": {...}}</tool_call>.

One reader serves every caller (serve.py's API, model_sample.py's tool loop, GRPO's multi-turn rollouts), so
a call the server returns is the call the tool loop runs. A call that does not parse (not JSON, no name,
arguments not an object, a tool nobody offered) is not a call: it stays in the answer as the text the model
wrote, so a user sees it and nothing crashes.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from support.data.tokenizer_spec import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START

_CALL = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def openai(self, call_id: str) -> dict[str, Any]:
        """The call in the OpenAI API's shape (arguments as a JSON string)."""
        return {"id": call_id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class ParsedReply:
    content: str
    reasoning: str | None = None  # None: no think block; "" an empty one
    tool_calls: list[ToolCall] = field(default_factory=list)


def tool_names(tools: list[dict] | None) -> set[str] | None:
    """The names of OpenAI tool definitions ({"type": "function", "function": {"name": ...}} or the bare
    function object); None when no tools were given (then any name parses)."""
    if tools is None:
        return None
    return {t.get("function", t).get("name") for t in tools}


def parse_call(body: str, allowed: set[str] | None = None) -> ToolCall | None:
    """The call in one <tool_call> body, or None where it is not a well-formed call of an allowed tool."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the OpenAI wire form, arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict) or (allowed is not None and call["name"] not in allowed):
        return None
    return ToolCall(call["name"], arguments)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, rest) of a reply that may open with a think block; a block never closed (the reply ran out
    of tokens) is all reasoning. The newlines the template puts around the block are not part of either."""
    if not text.startswith(THINK_START):
        return None, text
    inner, closed, rest = text[len(THINK_START):].partition(THINK_END)
    reasoning = inner.removeprefix("\n").removesuffix("\n")
    return reasoning, rest.removeprefix("\n\n") if closed else ""


def parse_reply(text: str, tools: list[dict] | None = None) -> ParsedReply:
    """Reasoning, answer text and tool calls of a generated reply (decoded with its special tokens, without
    the closing EOS). Calls of tools not in `tools` (when given) stay in the text, as malformed ones do."""
    reasoning, rest = split_reasoning(text)
    allowed = tool_names(tools)
    calls, kept, pos = [], [], 0
    for m in _CALL.finditer(rest):
        call = parse_call(m.group(1), allowed)
        if call is not None:
            calls.append(call)
            kept.append(rest[pos:m.start()])
            pos = m.end()
    kept.append(rest[pos:])
    return ParsedReply("".join(kept), reasoning, calls)
