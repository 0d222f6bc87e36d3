"""Reading a generated reply in the chat template's format (support/data/tokenizer_spec.py): the reasoning in
<think>...</think>, the text answer, and each <tool_call>{"name": ..., "arguments": {...}}</tool_call>.

One reader serves every caller (serve.py's API, model_sample.py's tool loop, GRPO's multi-turn rollouts), so
a call the server returns is the call the tool loop runs. A call that does not parse (not JSON, no name,
arguments not an object, a tool nobody offered) is not a call: it stays in the answer as the text the model
wrote, so a user sees it and nothing crashes. ReplyStream reads a reply while it is generated (serve.py's
streaming) and hands out exactly what parse_reply reads from the whole text.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from support.data.tokenizer_spec import CHAT_MARKERS, THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START

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

    def answer(self) -> str | None:
        """The content as OpenAI's API gives it: where the reply made calls, without the whitespace after its
        text (the newlines between text and calls), and null when nothing else is left."""
        if not self.tool_calls:
            return self.content
        return self.content.rstrip() or None


def reply_text(tokenizer: Any, ids: Iterable[int]) -> str:
    """Generated ids as text with the chat markers the model wrote (<think>, <tool_call>, ...: what parse_reply
    reads); the other special tokens (EOS, padding) left out."""
    markers = set(tokenizer.convert_tokens_to_ids(CHAT_MARKERS))
    other = set(tokenizer.all_special_ids) - markers
    return tokenizer.decode([i for i in ids if i not in other], skip_special_tokens=False)


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


class ReplyStream:
    """A reply read while it is generated: push() each new piece of text and get what it adds, as a ParsedReply
    of new reasoning text, new content text and newly completed calls; finish() once the reply has ended. What
    later text could still read otherwise waits: the start of a marker, the newlines around a think block, a
    <tool_call> not closed yet, whitespace at the end of the text (dropped after a call, as answer() drops it).
    The deltas joined are parse_reply(whole text, tools) with its answer() as content."""

    def __init__(self, tools: list[dict] | None = None):
        self.tools = tools
        self.calls_possible = tools is None or bool(tools)
        self.text = ""
        self.sent = ParsedReply("", "", [])  # the content, reasoning and calls handed out so far

    def push(self, piece: str) -> ParsedReply:
        self.text += piece
        reply = parse_reply(self.text[: self._settled()], self.tools)
        return self._delta(reply.content.rstrip(), reply)

    def finish(self) -> ParsedReply:
        reply = parse_reply(self.text, self.tools)
        return self._delta(reply.answer() or "", reply)

    def _settled(self) -> int:
        """How much of the text no later text can read differently."""
        text = self.text
        if THINK_START.startswith(text):  # "" or the start of "<think>": no telling yet
            return 0
        start = 0
        if text.startswith(THINK_START):
            end = text.find(THINK_END)
            if end < 0:  # inside the think block: its closing newline and marker may be arriving
                return len(text) - _held(text, "\n" + THINK_END)
            start = end + len(THINK_END)
            if "\n\n".startswith(text[start:]):  # the newlines after the block are not content
                return start
        if not self.calls_possible:
            return len(text)
        last = max((m.end() for m in _CALL.finditer(text, start)), default=start)
        opened = text.find(TOOL_CALL_START, last)
        return opened if opened >= 0 else len(text) - _held(text, TOOL_CALL_START)

    def _delta(self, content: str, reply: ParsedReply) -> ParsedReply:
        sent = self.sent
        reasoning = reply.reasoning or ""
        delta = ParsedReply(content[len(sent.content):], reasoning[len(sent.reasoning):],
                            reply.tool_calls[len(sent.tool_calls):])
        self.sent = ParsedReply(content, reasoning, reply.tool_calls)
        return delta


def _held(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is the start of `marker` (a marker may be arriving)."""
    return max((k for k in range(1, min(len(marker), len(text)) + 1) if text.endswith(marker[:k])), default=0)
