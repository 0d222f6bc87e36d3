"""Datasets for pretraining (packed token windows), SFT (chat conversations with assistant loss masks) and
preference tuning (pairs of replies), plus the JSONL validation and token-file helpers that data_process.py
shares.

Every item is (X, Y, loss_mask): X = ids[:-1], Y = ids[1:] (int64, length max_length) and loss_mask
(float32) aligned with Y, so the trainer computes sum(loss * mask) / sum(mask) for either dataset. A
preference item stacks two such rows, (2, max_length) each: the prompt with the chosen and with the rejected
reply.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from support.data.tokenizer_spec import SPECIAL_TOKENS, tokenizer_fingerprint


# ---------------------------------------------------------------------------------------------------------
# SFT records: every common shape, read into one list of OpenAI-style messages: {"role", "content"}, an
# assistant's optionally with "reasoning_content" and "tool_calls", a tool's result as role "tool".

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speakers ("human" / "gpt") and BelleGroup's ("human" / "assistant") as roles; tool-calling ShareGPT
# data adds "function_call" (an assistant turn whose value is the call's JSON) and "observation" (a tool's result)
SPEAKERS = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "function_call": "assistant", "observation": "tool"}
# the key that tells each object shape apart -> the keys that shape consumes (any others are kept as metadata)
SFT_SHAPES = {
    "messages": ("messages", "system", "tools"),
    "conversations": ("conversations", "system", "tools"),
    "instruction": ("instruction", "input", "output", "system", "tools"),
    "answers": ("query", "answers", "tools"),  # xLAM: a query answered by tool calls
}
ACCEPTED_SFT = ('[{"role", "content"}, ...] | {"messages": [{"role", "content"}, ...]} | '
                '{"conversations": [{"role", "content"}, ...]} | '
                '{"conversations": [{"from": "system"|"human"|"gpt"|"assistant"|"function_call"|"observation", '
                '"value"}, ...]} (ShareGPT, BelleGroup) | {"instruction", "input", "output"} (Alpaca) | '
                '{"query", "answers": [{"name", "arguments"}, ...], "tools"} (xLAM); an object may add a "system" '
                'prompt and "tools" (function schemas); an assistant message may have "reasoning_content" and '
                '"tool_calls", a "tool" message answers a call')


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: not JSON ({e.msg} at column {e.colno})") from None


def _plain(text: str, what: str) -> None:
    """Refuse a chat token in text the template writes outside the messages' free text (a tool definition, a
    call): encode_chat would read it as that control token, not as text."""
    token = next((t for t in SPECIAL_TOKENS if t in text), None)
    if token is not None:
        raise ValueError(f"{what} contains the chat token {token}: written outside the messages' text, it would "
                         "become that control token")


def _tools(value) -> list[dict] | None:
    """A record's "tools" (a list or its JSON string; empty = none) in OpenAI's shape, {"type": "function",
    "function": {"name", ...}}: a bare function object (xLAM's and ShareGPT's) is wrapped, an OpenAI one kept
    as it is, so the template writes it as the user's own would render."""
    if isinstance(value, str):
        value = _json(value, '"tools"') if value.strip() else None
    if not value:
        return None
    if not isinstance(value, list):
        raise ValueError('"tools" must be a list of function schemas (or its JSON string)')
    tools = []
    for j, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f'"tools" item {j} must be a function schema with a "name"')
        _plain(json.dumps(tool, ensure_ascii=False), f'"tools" item {j}')
        tools.append(tool if "function" in tool else {"type": "function", "function": tool})
    return tools


def _tool_calls(calls, where: str, tools: list[dict] | None) -> list[dict]:
    """Tool calls in OpenAI's shape, {"id"?, "type": "function", "function": {"name", "arguments"}}, from it or
    from bare {"name", "arguments"} ones (xLAM's answers, ShareGPT's function_call). Arguments are a JSON object
    or its string, which is kept as written (the template writes it as it is); the name must be one of `tools`."""
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"{where} must be a non-empty list of tool calls")
    names = None if tools is None else [t["function"]["name"] for t in tools]
    out = []
    for j, call in enumerate(calls):
        at = f"{where} call {j}"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or "arguments" not in function:
            raise ValueError(f'{at} must be an object with "name" and "arguments" (or "function": {{"name", '
                             '"arguments"})')
        name, arguments = function["name"], function["arguments"]
        if names is not None and name not in names:
            raise ValueError(f'{at} calls {name!r}, which is not in the record\'s "tools" ({", ".join(names)})')
        parsed = _json(arguments, f"{at} arguments") if isinstance(arguments, str) else arguments
        if not isinstance(parsed, dict):
            raise ValueError(f"{at} arguments must be a JSON object")
        for text in (name, arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)):
            _plain(text, at)
        if not isinstance(call.get("id", ""), str):
            raise ValueError(f'{at} "id" must be a string')
        call_id = {"id": call["id"]} if "id" in call else {}
        out.append({**call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return out


def _openai_message(t: dict, i: int, tools: list[dict] | None) -> dict:
    """A {"role", "content"} message: an assistant's may add "reasoning_content" and "tool_calls" (its content
    then may be null or absent, read as ""), a tool's keeps its "tool_call_id"."""
    role, content = t["role"], t.get("content")
    calls = t.get("tool_calls") if role == "assistant" else None  # [] is no calls, as in OpenAI's API
    if calls:
        calls = _tool_calls(calls, f'message {i} "tool_calls"', tools)
    if not isinstance(content, str) and not (content is None and calls):
        raise ValueError(f'message {i} "content" must be a string' + (" (or null with tool_calls)" if role ==
                                                                      "assistant" else ""))
    message = {"role": role, "content": content or ""}
    if role == "assistant" and t.get("reasoning_content") is not None:
        if not isinstance(t["reasoning_content"], str):
            raise ValueError(f'message {i} "reasoning_content" must be a string')
        message["reasoning_content"] = t["reasoning_content"]
    if calls:
        message["tool_calls"] = calls
    if role == "tool" and "tool_call_id" in t:
        if not isinstance(t["tool_call_id"], str):
            raise ValueError(f'message {i} "tool_call_id" must be a string')
        message["tool_call_id"] = t["tool_call_id"]
    return message


def _sharegpt_message(t: dict, i: int, tools: list[dict] | None) -> dict:
    """A {"from", "value"} turn; a "function_call" turn's value is the call's JSON (a list for parallel calls)."""
    value = t["value"]
    if t["from"] == "function_call":
        calls = _json(value, f"message {i} value") if isinstance(value, str) else value
        calls = calls if isinstance(calls, list) else [calls]
        return {"role": "assistant", "content": "", "tool_calls": _tool_calls(calls, f"message {i}", tools)}
    if not isinstance(value, str):
        raise ValueError(f'message {i} "value" must be a string')
    return {"role": SPEAKERS[t["from"]], "content": value}


def _turns_to_messages(turns, where: str, tools: list[dict] | None = None) -> list[dict]:
    """{"role", "content"} turns, or ShareGPT {"from", "value"} ones (told apart by the first turn), as messages.
    Tool calls must call one of `tools` (when given), and a tool's result must follow a call (the one its
    "tool_call_id" names, when it has one)."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where} must be a non-empty list")
    sharegpt = isinstance(turns[0], dict) and "from" in turns[0]
    who, what, noun, names = ("from", "value", "speaker", SPEAKERS) if sharegpt else ("role", "content", "role", ROLES)
    messages, call_ids = [], None  # the ids of the calls so far; None before the first call
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or who not in t or (what not in t and not t.get("tool_calls")):
            raise ValueError(f'message {i} must be an object with "{who}" and "{what}"')
        if t[who] == "":
            raise ValueError(f"message {i} has an empty {noun}")
        if not isinstance(t[who], str) or t[who] not in names:
            raise ValueError(f"message {i} has unknown {noun} {t[who]!r} (expected one of {', '.join(names)})")
        message = (_sharegpt_message if sharegpt else _openai_message)(t, i, tools)
        if "tool_calls" in message:
            call_ids = (call_ids or set()) | {c["id"] for c in message["tool_calls"] if "id" in c}
        if message["role"] == "tool" and call_ids is None:
            raise ValueError(f"message {i} is a tool result, but no tool call comes before it")
        if "tool_call_id" in message and message["tool_call_id"] not in call_ids:
            raise ValueError(f'message {i} "tool_call_id" {message["tool_call_id"]!r} matches no earlier tool call')
        messages.append(message)
    return messages


def _string(record: dict, key: str, required: bool = True) -> str:
    """record[key], which must be a string; "" for a missing optional key."""
    if key not in record:
        if required:
            raise ValueError(f'missing key "{key}"')
        return ""
    if not isinstance(record[key], str):
        raise ValueError(f'"{key}" must be a string')
    return record[key]


def _sft_shape(record) -> str:
    """Which SFT_SHAPES key an object record has: exactly one, else the error lists the accepted shapes."""
    keys = [k for k in SFT_SHAPES if k in record] if isinstance(record, dict) else []
    if len(keys) == 1:
        return keys[0]
    what = f'ambiguous SFT record (has both "{keys[0]}" and "{keys[1]}")' if keys else "not an SFT record"
    raise ValueError(f"{what}; accepted: {ACCEPTED_SFT}")


def sft_record(record) -> dict:
    """A decoded SFT record of any accepted shape (ACCEPTED_SFT) in ours: {"conversations": messages, "tools":
    [OpenAI function schemas] (only when it has some), **its other keys} (metadata such as a test split's
    "label"). The messages render in the chat template as the same messages given to
    apply_chat_template(messages, tools=tools) would: a known role and string content ("" for an assistant's
    null content beside tool calls), an assistant's "reasoning_content" and "tool_calls" ({"type": "function",
    "function": {"name", "arguments"}}, arguments as given), a tool's "tool_call_id". One message is an
    assistant reply (there is nothing to learn otherwise); anything else raises ValueError(reason)."""
    tools = None
    if isinstance(record, list):
        messages, metadata = _turns_to_messages(record, "the conversation"), {}
    else:
        shape = _sft_shape(record)
        tools = _tools(record.get("tools"))
        if shape == "instruction":  # Alpaca: the input, when there is one, follows the instruction
            prompt = "\n".join(filter(None, (_string(record, "instruction"), _string(record, "input", required=False))))
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": _string(record, "output")}]
        elif shape == "answers":  # xLAM: the query's answer is the tool calls alone
            answers = record["answers"]
            answers = _json(answers, '"answers"') if isinstance(answers, str) else answers
            messages = [{"role": "user", "content": _string(record, "query")},
                        {"role": "assistant", "content": "", "tool_calls": _tool_calls(answers, '"answers"', tools)}]
        else:
            messages = _turns_to_messages(record[shape], f'"{shape}"', tools)
        system = _string(record, "system", required=False)
        messages = ([{"role": "system", "content": system}] if system else []) + messages
        metadata = {k: v for k, v in record.items() if k not in SFT_SHAPES[shape]}
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant message")
    return {"conversations": messages, **({"tools": tools} if tools else {}), **metadata}


def conversation_texts(record: dict) -> Iterator[str]:
    """The free text of an SFT record (sft_record's shape), as its chat rendering holds it: each message's
    content and reasoning, each call's arguments and the tool definitions (as the template writes them)."""
    for m in record["conversations"]:
        yield m["content"]
        if "reasoning_content" in m:
            yield m["reasoning_content"]
        for call in m.get("tool_calls", ()):
            arguments = call["function"]["arguments"]
            yield arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    for tool in record.get("tools", ()):
        yield json.dumps(tool, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------
# JSONL records: validated once, up front, so a bad line fails at start-up with its file and line.

def decode_json(raw: bytes):
    """One JSONL line's value; ValueError saying where a line is not UTF-8 or not JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        at = "" if e.msg.endswith(" at") else " at"  # some of json's messages already end in "at"
        raise ValueError(f"malformed JSON: {e.msg}{at} column {e.colno}") from None


def parse_record(raw: bytes, key: str | None) -> dict:
    """Decode and validate one JSONL line. key "text": a {"text"} pretraining record; "conversations": an SFT
    record of any accepted shape, returned in ours (sft_record); "pair": a preference pair (preference_pair);
    None: "text" when the record has that key, else "conversations"."""
    record = decode_json(raw)
    if key is None:
        key = "text" if isinstance(record, dict) and "text" in record else "conversations"
    if key == "conversations":
        return sft_record(record)
    if key == "pair":
        return preference_pair(record)
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    _string(record, "text")
    return record


class JsonlRecords:
    """Iterate a JSONL file as (byte_offset, byte_length, record), validating every line (parse_record).

    A bad line raises ValueError("path:line: reason"); with skip_bad it is skipped, counted in
    `.skipped`, and the count is reported on stderr. A file without any valid record is an error.
    Blank lines are ignored. Lines are read one at a time, never the whole file."""

    def __init__(self, path: str, key: str | None, skip_bad: bool = False):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
        self.path, self.key, self.skip_bad = path, key, skip_bad
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[int, int, dict]]:
        self.skipped, first_error, n, offset = 0, None, 0, 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                try:
                    record = parse_record(raw, self.key)
                except ValueError as e:
                    where = f"{self.path}:{lineno}: {e}"
                    if not self.skip_bad:
                        raise ValueError(f"{where} (skip such lines with skip_bad / --skip_bad)") from None
                    self.skipped += 1
                    first_error = first_error or where
                    continue
                n += 1
                yield start, len(raw), record
        if self.skipped:
            tqdm.write(f"warning: {self.path}: skipped {self.skipped} bad line(s); first: {first_error}",
                       file=sys.stderr)
        if n == 0:
            raise ValueError(f"{self.path}: empty file (no valid records)")


def read_bytes_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# ---------------------------------------------------------------------------------------------------------
# Token files: <stem>.bin (flat ids) + <stem>.json sidecar, written by `data_process.py pretokenize`.

def token_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """uint16 while every id fits, else uint32; refuse a requested dtype the vocab does not fit."""
    limits = {"uint16": 2**16, "uint32": 2**32}
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= limits["uint16"] else "uint32"
    if dtype not in limits:
        raise ValueError(f"unknown token dtype {dtype!r} (expected auto, uint16 or uint32)")
    if vocab_size > limits[dtype]:
        raise ValueError(f"vocab_size {vocab_size} does not fit {dtype} (at most {limits[dtype]} ids)")
    return np.dtype(dtype)


def bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer begins every text with BOS (a Llama tokenizer's add_bos_token: its model saw
    <s> before each document), else []; ours adds none. Read off an encoding: the tokenizer's post-processor
    decides, and its add_bos_token attribute does not always say."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def encode_documents(tokenizer, texts: list[str]) -> np.ndarray:
    """bos_prefix + ids(text) + [eos] for each text, concatenated (EOS separates packed documents). A document
    is data: a literal "<|im_end|>" in it is encoded as plain text, never as the control token."""
    bos, eos = bos_prefix(tokenizer), tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return np.fromiter((t for doc in ids for t in (*bos, *doc, eos)), dtype=np.int64)


def document_start_ids(tokenizer, text: str) -> list[int]:
    """The ids a pretrained model continues `text` from: packed documents follow the previous one's EOS, so
    EOS is where a new text begins; the text itself is data, begun and encoded as encode_documents does."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [tokenizer.eos_token_id, *bos_prefix(tokenizer), *ids]


def sidecar_path(bin_path: str) -> str:
    return os.path.splitext(bin_path)[0] + ".json"


def read_sidecar(bin_path: str) -> dict:
    """Load and check the sidecar of a .bin token file against the file itself."""
    meta_path = sidecar_path(bin_path)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: sidecar of {bin_path} is missing (rerun data_process.py pretokenize)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    for key in ("num_tokens", "dtype", "vocab_size", "eos_token_id", "tokenizer_fingerprint"):
        if key not in meta:
            raise ValueError(f'{meta_path}: missing key "{key}"')
    expected = meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
    if os.path.getsize(bin_path) != expected:
        raise ValueError(f"{bin_path}: {os.path.getsize(bin_path)} bytes, but {meta_path} num_tokens/dtype "
                         f"say {expected} (truncated or stale file)")
    return meta


def check_sidecar_tokenizer(tokenizer, meta: dict, meta_path: str) -> None:
    """The tokens of a .bin file must come from this tokenizer (its sidecar's fingerprint), or from the one it
    extends (tokens added at the end, as the chat markers are to an older tokenizer: every id in the file still
    means the same token)."""
    fp = tokenizer_fingerprint(tokenizer)
    if meta["tokenizer_fingerprint"] not in (fp, tokenizer_fingerprint(tokenizer, below=meta["vocab_size"])):
        raise ValueError(f'{meta_path}: "tokenizer_fingerprint" {meta["tokenizer_fingerprint"]} does not match the '
                         f"given tokenizer ({fp}): the tokens were made by another tokenizer; rerun pretokenize")


# ---------------------------------------------------------------------------------------------------------
# Datasets

class PretrainDataset(Dataset):
    """Packed windows over a token stream: item i = tokens[i*L : i*L+L+1] -> (X, Y, loss_mask of ones).

    data_path .bin: memory-mapped, so random access is O(1) and RAM stays flat as the corpus grows.
    data_path .jsonl ({"text"} lines, the seed's input): tokenized once at start-up into the same packed
    stream, so training on the .jsonl or its pretokenized .bin gives identical samples; this costs one
    tokenization pass and ~2 bytes per token of RAM, fine for small corpora (pretokenize large ones)."""

    def __init__(self, data_path: str, tokenizer=None, max_length: int = 512, skip_bad: bool = False):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.data_path, self.max_length = data_path, max_length
        self._tokens: np.ndarray | None = None
        if data_path.endswith(".bin"):
            self.meta = read_sidecar(data_path)
            if tokenizer is not None:
                check_sidecar_tokenizer(tokenizer, self.meta, sidecar_path(data_path))
            num_tokens = self.meta["num_tokens"]
        elif data_path.endswith(".jsonl"):
            if tokenizer is None:
                raise ValueError(f"{data_path}: a tokenizer is needed to read .jsonl (or pretokenize it to .bin)")
            texts = [r["text"] for _, _, r in JsonlRecords(data_path, "text", skip_bad)]
            self._tokens = encode_documents(tokenizer, texts).astype(token_dtype(len(tokenizer)))
            num_tokens = len(self._tokens)
        else:
            raise ValueError(f"{data_path}: expected a .bin (pretokenized) or .jsonl file")
        self._len = (num_tokens - 1) // max_length
        if self._len < 1:
            raise ValueError(f"{data_path}: {num_tokens} tokens, too few for one window of {max_length}")

    @property
    def tokens(self) -> np.ndarray:
        # Mapped lazily and dropped on pickling, so DataLoader workers map the file instead of copying it.
        # A plain ndarray view of the map slices ~1.4x faster than the np.memmap subclass.
        if self._tokens is None:
            self._tokens = np.asarray(np.memmap(self.data_path, dtype=self.meta["dtype"], mode="r"))
        return self._tokens

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.data_path.endswith(".bin"):
            state["_tokens"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} windows")
        start = (i % self._len) * self.max_length
        w = self.tokens[start : start + self.max_length + 1].astype(np.int64)
        # shifting in numpy, then two zero-copy views, is ~1.4x faster than slicing a tensor
        return torch.from_numpy(w[:-1]), torch.from_numpy(w[1:]), torch.ones(self.max_length, dtype=torch.float32)


# Stands in for a message's text while the template renders: private-use characters, which no template or
# tokenizer gives a meaning, around a number.
_PLACEHOLDER = "\ue000{}\ue001"
# The message fields that hold free text (the writer's, the model's or a tool's): always encoded as text.
TEXT_FIELDS = ("content", "reasoning_content")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
            enable_thinking: bool | None) -> str:
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **extra)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None,
                enable_thinking: bool | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's rendering of `messages` (and `tools`) and the character spans of their free text
    (TEXT_FIELDS), in order of appearance.

    The spans are found by rendering placeholders in place of the texts, so no template layout is assumed;
    a template that does not render every text verbatim, once, is refused."""
    texts, marked_messages = [], []
    for m in messages:
        marked = dict(m)
        for key in TEXT_FIELDS:
            if isinstance(m.get(key), str):
                marked[key] = _PLACEHOLDER.format(len(texts))
                texts.append(m[key])
        marked_messages.append(marked)
    marked = _render(tokenizer, marked_messages, add_generation_prompt, tools, enable_thinking)
    found = sorted((marked.find(_PLACEHOLDER.format(k)), k) for k in range(len(texts)))
    text, spans, pos = "", [], 0
    for at, k in found:
        if at < pos or marked.count(_PLACEHOLDER.format(k)) != 1:
            break
        text += marked[pos:at]
        spans.append((len(text), len(text) + len(texts[k])))
        text += texts[k]
        pos = at + len(_PLACEHOLDER.format(k))
    text += marked[pos:]
    if len(spans) < len(texts) or text != _render(tokenizer, messages, add_generation_prompt, tools, enable_thinking):
        raise ValueError("the chat template does not render each message's text verbatim, once: "
                         "cannot tell message text from the template's control tokens")
    return text, spans


def _assistant_spans(tokenizer, messages: list[dict], text: str, tools: list[dict] | None) -> list[tuple[int, int]]:
    """The character span of each assistant turn's body and closing EOS in `text` (the rendered messages)."""
    return [_assistant_span(tokenizer, messages, k, text, tools) for k, m in enumerate(messages)
            if m["role"] == "assistant"]


def _assistant_span(tokenizer, messages: list[dict], k: int, text: str, tools: list[dict] | None) -> tuple[int, int]:
    """The span of assistant turn k: what follows the generation prompt rendered after the messages before it
    (reasoning, text and tool calls alike), up to its EOS. The template must render a conversation's beginning
    as the beginning of its rendering (ChatML-family templates do)."""
    eos = tokenizer.eos_token
    upto = _render(tokenizer, messages[: k + 1], False, tools, None)
    if k > 0:
        before = _render(tokenizer, messages[:k], True, tools, None)
    else:  # nothing to render before a conversation's first message: its header is the generation prompt
        header = _render(tokenizer, messages[:1], True, tools, None)[len(upto):]
        before = upto[: upto.find(header) + len(header)] if header else ""
    end = upto.rfind(eos)
    if end < len(before):
        raise ValueError(f"the chat template does not close an assistant reply with EOS ({eos}), so a model "
                         f"trained on it would never learn to stop")
    if not (before and upto.startswith(before) and text.startswith(upto)):
        raise ValueError("the chat template does not render a conversation's beginning as the beginning of its "
                         "rendering, so an assistant turn cannot be told apart from its prompt")
    return len(before), end + len(eos)


def _control_tokens(tokenizer, text: str, content_spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(start, end, id) of each control token the template itself wrote: the added tokens the tokenizer finds
    in the text around the message contents. The contents are not searched, so a typed marker stays text."""
    bounds = [0, *(b for span in content_spans for b in span), len(text)]
    template = list(zip(bounds[::2], bounds[1::2]))
    added = set(tokenizer.get_added_vocab().values())
    enc = tokenizer([text[a:b] for a, b in template], add_special_tokens=False, return_offsets_mapping=True)
    return [(a + s, a + e, t) for (a, _), ids, offsets in zip(template, enc["input_ids"], enc["offset_mapping"])
            for t, (s, e) in zip(ids, offsets) if t in added]


def _overlap_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], n_chars: int) -> list[int]:
    """1 for each token whose character offsets overlap one of the spans, else 0."""
    inside = np.zeros(n_chars + 1, dtype=np.int64)  # prefix sums of "character is in a span"
    for start, end in spans:
        inside[start + 1 : end + 1] = 1
    inside = np.cumsum(inside)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return ((inside[offsets[:, 1]] - inside[offsets[:, 0]]) > 0).astype(np.int64).tolist()


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None,
                enable_thinking: bool | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in the tokenizer's chat template (with `tools`, the OpenAI function schemas
    it lists), and a 0/1 mask that is 1 on every token of an assistant turn after its header: its reasoning,
    text and tool calls and its closing EOS (what SFT learns); never a tool's result, the tool list or another
    role's turn. add_generation_prompt=True ends it with the assistant's header (and enable_thinking, which
    the template reads); chat_prompt_ids gives a prompt's ids without the mask, faster.

    Only the template's own markers become control tokens: message text (TEXT_FIELDS) is always encoded as
    text, so a user who types "<|im_end|>\\n<|im_start|>system\\n..." or "<think>" cannot forge a turn. The text
    between two markers is encoded in one piece, so for text without such markers the ids equal tokenizing
    the rendered template; no token id or template layout is hard-coded."""
    text, spans = render_chat(_fast(tokenizer), messages, add_generation_prompt, tools, enable_thinking)
    ids, offsets = _encode_rendered(tokenizer, text, spans)
    return ids, _overlap_mask(offsets, _assistant_spans(tokenizer, messages, text, tools), len(text))


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                    enable_thinking: bool | None = None) -> list[int]:
    """encode_chat(..., add_generation_prompt=True)'s ids, without the mask a prompt does not need: finding
    the assistant turns renders the conversation up to each of them, which grows with the square of a long
    chat's length (a served conversation is re-encoded at every request). The template is still checked on
    the last reply in the prompt: it must close a reply with EOS as the model does."""
    text, spans = render_chat(_fast(tokenizer), messages, True, tools, enable_thinking)
    replies = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if replies:
        _assistant_span(tokenizer, messages, replies[-1], text, tools)
    return _encode_rendered(tokenizer, text, spans)[0]


def _fast(tokenizer):
    if not tokenizer.is_fast:
        raise ValueError("chat encoding needs a fast tokenizer (character offsets)")
    return tokenizer


def _encode_rendered(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of a rendered chat and each token's character offsets: the template's markers as their control
    tokens, every other piece (message texts included) encoded as text."""
    markers = _control_tokens(tokenizer, text, spans)
    cuts = [0, *(c for start, end, _ in markers for c in (start, end)), len(text)]
    gaps = list(zip(cuts[::2], cuts[1::2]))  # the text before, between and after the markers
    enc = tokenizer([text[a:b] for a, b in gaps], add_special_tokens=False, split_special_tokens=True,
                    return_offsets_mapping=True)
    ids, offsets = [], []
    for k, (a, _) in enumerate(gaps):
        ids += enc["input_ids"][k]
        offsets += [(a + s, a + e) for s, e in enc["offset_mapping"][k]]
        if k < len(markers):
            ids.append(markers[k][2])
            offsets.append(markers[k][:2])
    return ids, offsets


class IndexedJsonlDataset(Dataset):
    """A JSONL file validated and indexed by byte offset at start-up (a bad line fails here with file:line,
    or is skipped and counted with skip_bad); records are read back on access, so RAM holds 16 bytes per
    record, not the file. Subclasses tokenize a record into ids and a loss mask."""

    key = ""  # what parse_record reads each line as

    def __init__(self, data_path: str, tokenizer, max_length: int = 512, skip_bad: bool = False):
        if tokenizer.pad_token_id is None or tokenizer.eos_token is None:
            raise ValueError("the tokenizer needs pad and eos tokens")
        self.data_path, self.tokenizer, self.max_length = data_path, tokenizer, max_length
        index = [(off, n) for off, n, _ in JsonlRecords(data_path, self.key, skip_bad)]
        self._index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._index)

    def sizes(self) -> np.ndarray:
        """Each record's size in bytes, a stand-in for its length in tokens (--group_by_length)."""
        return self._index[:, 1]

    def record(self, i: int) -> dict:
        offset, length = self._index[i]
        return parse_record(read_bytes_at(self.data_path, int(offset), int(length)), self.key)

    def padded(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        """ids and mask truncated to max_length + 1 tokens together (so they stay aligned) and right-padded
        with pad_token_id, where the mask is 0."""
        n = self.max_length + 1
        pad = n - min(len(ids), n)
        return ids[:n] + [self.tokenizer.pad_token_id] * pad, mask[:n] + [0] * pad


class SFTDataset(IndexedJsonlDataset):
    """Chat conversations (any shape sft_record accepts) -> (X, Y, loss_mask), loss only on assistant replies
    (their reasoning, text and tool calls) and their closing EOS; tokenized by encode_chat, with the record's
    tools, on access."""

    key = "conversations"

    def __getitem__(self, i: int):
        record = self.record(i)
        ids, mask = self.padded(*encode_chat(self.tokenizer, record["conversations"], tools=record.get("tools")))
        ids, mask = torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.float32)
        return ids[:-1], ids[1:], mask[1:]


# ---------------------------------------------------------------------------------------------------------
# Preference pairs (DPO): one prompt, a chosen and a rejected assistant reply.

ACCEPTED_PAIRS = ('{"prompt": "..." | [messages], "chosen": "..." | [one assistant message], "rejected": the same} '
                  '(TRL) | {"chosen": [messages], "rejected": [messages]} (MiniMind: two conversations that differ '
                  'only in their last message, an assistant reply); messages are {"role", "content"} or ShareGPT '
                  '{"from", "value"}')


def _reply_message(record: dict, side: str) -> dict:
    """record[side] of a {"prompt", "chosen", "rejected"} pair as one assistant message."""
    value = record[side]
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    messages = _turns_to_messages(value, f'"{side}"')
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f'"{side}" must be a string or a list of one assistant message')
    return messages[0]


def _split_conversation(record: dict, side: str) -> tuple[list[dict], dict]:
    """record[side] of a MiniMind pair as (prompt messages, final assistant message)."""
    messages = _turns_to_messages(record[side], f'"{side}"')
    if messages[-1]["role"] != "assistant":
        raise ValueError(f'"{side}" must end with an assistant message (the reply being judged)')
    return messages[:-1], messages[-1]


def preference_pair(record) -> dict:
    """A decoded preference record of either accepted shape (ACCEPTED_PAIRS) in ours: {"prompt": [messages],
    "chosen": message, "rejected": message, **its other keys}. Refused with ValueError(reason): a missing
    side, prompts that differ, a prompt that does not end with a user message, identical replies."""
    if not isinstance(record, dict) or not ("chosen" in record or "rejected" in record):
        raise ValueError(f"not a preference pair; accepted: {ACCEPTED_PAIRS}")
    for side in ("chosen", "rejected"):
        if side not in record:
            raise ValueError(f'missing key "{side}": a pair needs a chosen and a rejected reply')
    if "prompt" in record:
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
            _turns_to_messages(prompt, '"prompt"')
        chosen, rejected = _reply_message(record, "chosen"), _reply_message(record, "rejected")
    else:
        (prompt, chosen), (other_prompt, rejected) = (_split_conversation(record, s) for s in ("chosen", "rejected"))
        if other_prompt != prompt:
            k = next(k for k, (a, b) in enumerate(zip(prompt + [None], other_prompt + [None])) if a != b)
            raise ValueError(f'"chosen" and "rejected" have different prompts (message {k} differs): a pair '
                             "compares two replies to the same conversation")
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user message, which the replies answer")
    if chosen["content"] == rejected["content"]:
        raise ValueError('"chosen" and "rejected" are the same reply: there is nothing to prefer')
    metadata = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **metadata}


def encode_reply(tokenizer, prompt: list[dict], reply: dict) -> tuple[list[int], list[int]]:
    """Token ids of prompt + reply in the chat template and a 0/1 mask on the reply's tokens only: its content
    and closing EOS (encode_chat's mask), without the assistant turns inside the prompt, which both replies
    of a pair share."""
    ids, mask = encode_chat(tokenizer, prompt + [reply])
    if any(m["role"] == "assistant" for m in prompt):  # else the mask covers the reply alone already
        prompt_ids, _ = encode_chat(tokenizer, prompt)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template does not render a conversation as its prompt followed by the reply: "
                             "cannot tell the reply's tokens from the prompt's")
        mask = [0] * len(prompt_ids) + mask[len(prompt_ids):]
    return ids, mask


class PreferenceDataset(IndexedJsonlDataset):
    """Preference pairs (either shape of ACCEPTED_PAIRS) -> (X, Y, loss_mask), each of shape (2, max_length):
    row 0 is the prompt + chosen reply, row 1 the prompt + rejected reply, laid out like an SFTDataset item,
    the mask 1 on the reply's tokens only (encode_reply), so a sum over it is the reply's log-probability."""

    key = "pair"

    def __getitem__(self, i: int):
        pair = self.record(i)
        ids, mask = zip(*(self.padded(*encode_reply(self.tokenizer, pair["prompt"], pair[side]))
                          for side in ("chosen", "rejected")))
        ids, mask = torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.float32)
        return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def record_chars(record: dict) -> int:
    """Characters of a {"text"} record's text, an SFT record's free text (conversation_texts), an RL prompt, a preference
    pair's prompt and replies or an evaluation task document's text fields."""
    if "text" in record:
        return len(record["text"])
    if "conversations" in record:
        return sum(map(len, conversation_texts(record)))
    if "chosen" in record:
        return sum(len(m["content"]) for m in record["prompt"]) + len(record["chosen"]) + len(record["rejected"])
    if isinstance(record.get("prompt"), str):
        return len(record["prompt"])
    # an evaluation task document: its text fields
    fields = [v for v in record.values() if isinstance(v, (str, list))]
    return sum(len(v) if isinstance(v, str) else sum(map(len, v)) for v in fields)


def write_jsonl(path: str, records: Iterable[dict]) -> tuple[int, int]:
    """Stream records to path, one JSON object per line (UTF-8, not escaped), replacing it atomically: if
    reading the records fails, path keeps its old content. Returns (records, characters of text / content)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    n = chars = 0
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for r in records:
                n += 1
                chars += record_chars(r)
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
    finally:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
    return n, chars
