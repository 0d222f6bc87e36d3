"""The tokenizer contract every stage relies on: the special tokens with their fixed ids, the ChatML chat
template, and the fingerprint that tells two vocabularies apart. train_tokenizer.py builds tokenizers to
it; the data and loading code read it (the lowest layer that needs it, so nothing imports upwards for it).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

# Fixed ids 0..10 (contract): the trainer assigns ids to special tokens in this order. The last six mark
# reasoning, tool calls and tool results (the Qwen2.5/Qwen3 ChatML conventions); a tokenizer made before
# them gains them as added tokens (support/loading/chat_tokens.py).
THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
CHAT_MARKERS = [THINK_START, THINK_END, TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *CHAT_MARKERS]
BOS, EOS, PAD, UNK = "<|im_start|>", "<|im_end|>", "<unk>", "<unk>"

# ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then the assistant header on request.
# With `tools` (OpenAI function schemas) a system turn lists them under "# Tools", one JSON object a line,
# after the system message's own text (no instructions: a small model's context is short, and SFT teaches the
# call format). An assistant message renders as "<think>\n{reasoning_content}\n</think>\n\n" when it has
# reasoning, then its content, then each call as <tool_call>{"name": ..., "arguments": {...}}</tool_call>
# (arguments given as a JSON string are written as they are). A `tool` message is its own turn,
# <tool_response>{content}</tool_response>. enable_thinking=False puts an empty think block after the assistant
# header, so a model trained to think answers at once. Messages without these fields render as plain ChatML.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson) + '\n' }}{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if message.get('reasoning_content') is string %}"
    "{{- '<think>\n' + message['reasoning_content'] + '\n</think>\n\n' }}"
    "{%- endif %}"
    "{{- message['content'] or '' }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set f = call['function'] if call['function'] is defined else call %}"
    "{{- '<tool_call>{\"name\": ' + (f['name'] | tojson) + ', \"arguments\": ' }}"
    "{{- f['arguments'] if f['arguments'] is string else (f['arguments'] | tojson) }}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>tool\n<tool_response>' + message['content'] + '</tool_response><|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)


def tokenizer_fingerprint(tokenizer: Any, below: int | None = None) -> str:
    """First 16 hex chars of sha256 over the sorted vocab: detects data or checkpoints made by another tokenizer.
    below=n: of the tokens with ids < n only, i.e. of the tokenizer before tokens n, n+1, ... were added."""
    items = sorted((t, i) for t, i in tokenizer.get_vocab().items() if below is None or i < below)
    vocab = json.dumps(items, ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]
