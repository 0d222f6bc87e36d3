"""The tool loop: a chat model calls the Python functions of a tools file (--tools FILE.py), reads their results
and goes on, in model_sample.py's chat and batch generation and in GRPO's multi-turn rollouts (ddp_grpo.py).

    generate -> parse the reply's tool calls (tool_calls.parse_reply) -> run them -> append their results as
    tool turns (the chat template's tokens) -> generate again, until a reply calls nothing, --max_tool_rounds
    rounds of calls have run, or the token budget is spent.

The model's own tokens are kept as generated (never decoded and re-encoded), and every token the loop inserts
is marked, so RL trains on what the model wrote and nothing else. A tool that raises, a call of a tool that
does not exist, or arguments a function does not take give the model the error as the tool's result: the
loop never stops on the model's mistakes.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dataset import encode_chat
from support.cli import import_user_file
from support.inference.tool_calls import ToolCall, parse_reply, reply_text

# (rows, prompts, max_new_tokens, round) -> each prompt's new ids, ending with EOS where the reply ended: rows
# are the indices of the prompts in the loop's batch and round counts the generations before (seeding)
Generate = Callable[[list[int], list[list[int]], int, int], list[list[int]]]


@dataclass
class Tools:
    path: str  # the file, for messages
    functions: dict[str, Callable[..., Any]]
    schemas: list[dict[str, Any]]  # OpenAI function schemas, what the chat template lists in the system turn


def load_tools(path: str) -> Tools:
    """Every public function defined in the Python file `path`, with its JSON schema made from its type hints
    and docstring (transformers.utils.get_json_schema); a file or function that cannot be used is one
    ValueError / FileNotFoundError naming it."""
    from transformers.utils import get_json_schema

    module = import_user_file(path, "--tools")
    functions = {name: fn for name, fn in vars(module).items()
                 if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_")}
    if not functions:
        raise ValueError(f"--tools {path}: defines no public function (a tool is a function with type hints and "
                         f"a docstring)")
    schemas = []
    for name, fn in functions.items():
        try:
            schemas.append(get_json_schema(fn))
        except Exception as e:  # transformers' DocstringParsingException / TypeHintParsingException
            raise ValueError(f"--tools {path}: {name}: {e}") from None
    return Tools(path, functions, schemas)


def run_tool(tools: Tools, call: ToolCall) -> str:
    """The call's result as text (a result that is not a string is shown as JSON). An unknown tool, arguments the
    function does not take, or an exception in it give the error text instead: the model reads it and may
    try again."""
    fn = tools.functions.get(call.name)
    if fn is None:
        return f"error: there is no tool {call.name!r} (the tools: {', '.join(tools.functions)})"
    try:
        result = fn(**call.arguments)
    except Exception as e:  # the tool's or the model's mistake, never the loop's end
        return f"error: {type(e).__name__}: {e}"
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


def tool_turn_ids(tokenizer: Any, results: list[dict[str, str]], enable_thinking: bool | None = None) -> list[int]:
    """The tokens the chat template puts between a reply's closing EOS and the next reply: the tool turns with
    their results, then the assistant's generation prompt. Read off the template (encode_chat of a reply and its
    results: what follows the reply's EOS, the last token of its loss mask), so no layout is hard-coded."""
    ids, mask = encode_chat(tokenizer, [{"role": "assistant", "content": ""}, *results], add_generation_prompt=True,
                            enable_thinking=enable_thinking)
    return ids[max(i for i, m in enumerate(mask) if m) + 1:]


@dataclass
class Trajectory:
    """One prompt's completion: the model's replies and the tool turns between them."""
    ids: list[int] = field(default_factory=list)  # everything after the prompt
    generated: list[int] = field(default_factory=list)  # 1 on the model's tokens, 0 on those the loop inserted
    messages: list[dict[str, Any]] = field(default_factory=list)  # the same as OpenAI messages (assistant, tool)
    num_calls: int = 0  # tool calls run

    @property
    def answer(self) -> str:
        """The text of the last reply (its calls and reasoning not included); "" when the budget ran out first."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")


def run_tool_loop(generate: Generate, prompts: list[list[int]], tokenizer: Any, tools: Tools | None,
                  max_new_tokens: int, max_rounds: int = 3, enable_thinking: bool | None = None) -> list[Trajectory]:
    """Each prompt's trajectory (prompts: chat ids ending with the generation prompt), all rows generated
    together each round. A trajectory holds at most max_new_tokens tokens, inserted ones included (a tool turn
    that does not fit is cut and ends it); at most max_rounds rounds of calls run (a reply's calls past them
    are kept in its message but not run, and the trajectory ends). tools None: one plain generation per row,
    its text decoded without special tokens."""
    if max_rounds < 0:
        raise ValueError(f"--max_tool_rounds {max_rounds}: must be >= 0")
    eos = tokenizer.eos_token_id
    out = [Trajectory() for _ in prompts]
    active = list(range(len(prompts)))
    for round_ in range(max_rounds + 1):
        if not active:
            break
        budgets = [max_new_tokens - len(out[i].ids) for i in active]
        replies = generate(active, [prompts[i] + out[i].ids for i in active], max(budgets), round_)
        still = []
        for i, ids, budget in zip(active, replies, budgets):
            t, ids = out[i], ids[:budget]  # rows share one budget per round: each keeps its own
            t.ids += ids
            t.generated += [1] * len(ids)
            if tools is None:
                t.messages.append({"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)})
                continue
            ended = bool(ids) and ids[-1] == eos
            reply = parse_reply(reply_text(tokenizer, ids))  # any name parses: an unknown tool is told so
            message: dict[str, Any] = {"role": "assistant", "content": reply.content}
            if reply.reasoning is not None:
                message["reasoning_content"] = reply.reasoning
            calls = [(c, f"call_{round_}_{j}") for j, c in enumerate(reply.tool_calls)] if ended else []
            if calls:
                message["tool_calls"] = [c.openai(call_id) for c, call_id in calls]
            t.messages.append(message)
            if not calls or round_ == max_rounds:
                continue
            results = [{"role": "tool", "tool_call_id": call_id, "content": run_tool(tools, c)} for c, call_id in calls]
            t.messages += results
            t.num_calls += len(calls)
            turn = tool_turn_ids(tokenizer, results, enable_thinking)[: max_new_tokens - len(t.ids)]
            t.ids += turn
            t.generated += [0] * len(turn)
            if len(t.ids) < max_new_tokens:
                still.append(i)
        active = still
    return out
