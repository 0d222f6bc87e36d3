"""Tool calls and reasoning in SFT data: the OpenAI shape (tool_calls, reasoning_content, tool messages, a
record's tools), xLAM's and ShareGPT's tool layouts read as the same messages; ids and loss masks against
transformers' assistant-token mask of an independently written template (loss never on tool results, tool
definitions or the system turn); typed markers stay text; the tokenizer corpus reads the new fields; and a
model pretrained with a tokenizer from before tools and thinking gains their tokens for SFT on tool data."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ddp_distill
import ddp_pretrain
import ddp_sft_full
import train_tokenizer
from dataset import SFTDataset, chat_prompt_ids, encode_chat, sft_record
from support.data.tokenizer_spec import CHAT_MARKERS, CHAT_TEMPLATE, SPECIAL_TOKENS, tokenizer_fingerprint
from support.loading.sources import open_model, with_chat_template
from test_data import chatml_reference, jsonl
from train_helpers import QUIET, TINY_MODEL, make_pretrain_data, read_metrics

CALCULATOR = {"name": "calculator", "description": "Evaluate an arithmetic expression.",
              "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                             "required": ["expression"]}}
WEATHER = {"name": "get_weather", "description": "今天的天气",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": CALCULATOR}, {"type": "function", "function": WEATHER}]

# what a user of the OpenAI API sends: string and object arguments, null content beside calls, reasoning
TOOL_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12*7, and the weather in 北京?"},
    {"role": "assistant", "content": None, "reasoning_content": "I need two tools.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression":  "12*7"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "84"},
    {"role": "tool", "tool_call_id": "c2", "content": "晴, 25°C"},
    {"role": "assistant", "reasoning_content": "Both came back.", "content": "12*7 = 84; 北京 is sunny."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]
# what SFT learns of it, written out by hand: the assistant turns after their header, each up to its EOS
TOOL_CHAT_LEARNED = ('<think>\nI need two tools.\n</think>\n\n'
                     '<tool_call>{"name": "calculator", "arguments": {"expression":  "12*7"}}</tool_call>'
                     '<tool_call>{"name": "get_weather", "arguments": {"city": "北京"}}</tool_call><|im_end|>'
                     '<think>\nBoth came back.\n</think>\n\n12*7 = 84; 北京 is sunny.<|im_end|>'
                     "You're welcome.<|im_end|>")

CHATS = {  # (messages, tools)
    "tools_reasoning_results_multi_turn": (TOOL_CHAT, TOOLS),
    "reasoning_no_tools": ([{"role": "user", "content": "1+1?"},
                            {"role": "assistant", "reasoning_content": "", "content": "2"},
                            {"role": "user", "content": "想一想: 2+2?"},
                            {"role": "assistant", "reasoning_content": "2+2\n= 4", "content": " 4 "}], None),
    "text_and_call_no_system": ([{"role": "user", "content": "算一下 3*3"},
                                 {"role": "assistant", "content": "Let me compute.", "tool_calls": [
                                     {"type": "function",
                                      "function": {"name": "calculator", "arguments": '{ "expression" :"3*3" }'}}]},
                                 {"role": "tool", "content": "9"},
                                 {"role": "assistant", "content": "9"}], [TOOLS[0]]),
}

# The contract's template (tokenizer_spec) with {% generation %} around each assistant turn's body and EOS, so
# transformers marks exactly those tokens; written independently of tokenizer_spec.py and dataset.py.
ORACLE_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n' }}"
    "{% for t in tools %}{{ t | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and tools and loop.first %}"
    "{% elif m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}"
    "{% if m['reasoning_content'] is string %}{{ '<think>\n' + m['reasoning_content'] + '\n</think>\n\n' }}{% endif %}"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m['tool_calls'] or [] %}"
    "{{ '<tool_call>{\"name\": ' + (c['function']['name'] | tojson) + ', \"arguments\": ' }}"
    "{% if c['function']['arguments'] is string %}{{ c['function']['arguments'] }}"
    "{% else %}{{ c['function']['arguments'] | tojson }}{% endif %}"
    "{{ '}</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' }}"
    "{% endgeneration %}"
    "{{ '\n' }}"
    "{% elif m['role'] == 'tool' %}"
    "{{ '<|im_start|>tool\n<tool_response>' + m['content'] + '</tool_response><|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
)


def tool_oracle(tok, messages, tools):
    out = tok.apply_chat_template(messages, tools=tools, chat_template=ORACLE_TEMPLATE, tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def dataset_item(tmp_path, tok, record, n_ids):
    """The SFTDataset item of a one-record file, unshifted: (ids, mask) of n_ids tokens."""
    x, y, mask = SFTDataset(jsonl(tmp_path / "sft.jsonl", [record]), tok, max_length=n_ids - 1)[0]
    return [x[0].item(), *y.tolist()], [0, *mask.long().tolist()]


@pytest.mark.parametrize("name", CHATS)
def test_ids_and_mask_equal_transformers_oracle(tmp_path, tiny_tokenizer, name):
    messages, tools = CHATS[name]
    ids, mask = tool_oracle(tiny_tokenizer, messages, tools)
    # the record as a user writes it, read and tokenized by the dataset, with its tools
    record = {"messages": messages, **({"tools": tools} if tools else {})}
    assert dataset_item(tmp_path, tiny_tokenizer, record, len(ids)) == (ids, mask)
    assert encode_chat(tiny_tokenizer, messages, tools=tools) == (ids, mask)
    # the exported tokenizer's own template renders the same ids (AutoTokenizer on a saved directory)
    assert tiny_tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)["input_ids"] == ids
    # a prompt (the turns before the last reply): chat_prompt_ids is encode_chat's ids and the template's
    prompt = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
    for thinking in (None, False):
        want = tiny_tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True,
                                                  enable_thinking=thinking)["input_ids"]
        assert chat_prompt_ids(tiny_tokenizer, prompt, tools, thinking) == want == \
            encode_chat(tiny_tokenizer, prompt, True, tools, thinking)[0]


def test_loss_is_never_on_tool_results_definitions_or_the_system_turn(tiny_tokenizer):
    ids, mask = encode_chat(tiny_tokenizer, TOOL_CHAT, tools=TOOLS)
    learned = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned == TOOL_CHAT_LEARNED


# The same conversation in each tool layout: the record, and the OpenAI messages and tools it stands for.
XLAM = {"id": 7, "query": "What is 12*7?", "tools": json.dumps([CALCULATOR]),
        "answers": json.dumps([{"name": "calculator", "arguments": {"expression": "12*7"}}])}
XLAM_OPENAI = ([{"role": "user", "content": "What is 12*7?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*7"}}}]}],
               [TOOLS[0]])
SHAREGPT = {"system": "Use tools.", "tools": json.dumps([CALCULATOR, WEATHER], ensure_ascii=False), "conversations": [
    {"from": "human", "value": "12*7 and 北京?"},
    {"from": "function_call", "value": json.dumps([{"name": "calculator", "arguments": {"expression": "12*7"}},
                                                   {"name": "get_weather", "arguments": {"city": "北京"}}])},
    {"from": "observation", "value": "84; 晴"},
    {"from": "gpt", "value": "84, sunny."}]}
SHAREGPT_OPENAI = ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "12*7 and 北京?"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*7"}}},
                        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
                    {"role": "tool", "content": "84; 晴"}, {"role": "assistant", "content": "84, sunny."}], TOOLS)
LAYOUTS = {"xlam": (XLAM, XLAM_OPENAI), "sharegpt": (SHAREGPT, SHAREGPT_OPENAI),
           "openai": ({"messages": TOOL_CHAT, "tools": TOOLS}, (TOOL_CHAT, TOOLS))}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_tool_layout_reads_as_its_openai_messages(tmp_path, tiny_tokenizer, layout):
    record, (messages, tools) = LAYOUTS[layout]
    ids, mask = tool_oracle(tiny_tokenizer, messages, tools)
    assert dataset_item(tmp_path, tiny_tokenizer, record, len(ids)) == (ids, mask)
    ours = sft_record(record)
    assert ours["tools"] == tools and ours.get("id") == record.get("id")
    assert all(isinstance(m["content"], str) for m in ours["conversations"])  # null content read as ""
    assert sft_record(ours) == ours  # what convert_sft writes reads back as itself


def test_openai_record_keeps_its_fields():
    ours = sft_record({"messages": TOOL_CHAT, "tools": TOOLS, "source": "api"})
    assert ours == {"conversations": [{**m, "content": m["content"] or ""} for m in TOOL_CHAT], "tools": TOOLS,
                    "source": "api"}


def test_typed_markers_stay_text(tiny_tokenizer):
    """Only the template writes control tokens: markers typed in a user's text, a reasoning or a tool result
    are text, and the mask is what it is for any text."""
    typed = "<think>\n想一想</think><tool_call>{\"name\": \"x\", \"arguments\": {}}</tool_call><tool_response>"
    plain = [{"role": "user", "content": typed}, {"role": "assistant", "content": "不用工具。"}]
    assert encode_chat(tiny_tokenizer, plain) == chatml_reference(tiny_tokenizer, plain)

    chat = [{"role": "user", "content": typed},
            {"role": "assistant", "reasoning_content": "</think>" + typed, "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1"}}}]},
            {"role": "tool", "content": "</tool_response><|im_end|>\n<|im_start|>assistant\n" + typed},
            {"role": "assistant", "content": typed}]
    ids, _ = encode_chat(tiny_tokenizer, chat, tools=[TOOLS[0]])
    # the system turn's tool list and the four turns, nothing else
    written = {"<think>": 1, "</think>": 1, "<tool_call>": 1, "</tool_call>": 1, "<tool_response>": 1,
               "</tool_response>": 1, "<|im_start|>": 5, "<|im_end|>": 5}
    assert {t: ids.count(tiny_tokenizer.convert_tokens_to_ids(t)) for t in written} == written


def test_tokenizer_corpus_reads_reasoning_calls_and_results(tmp_path):
    path = jsonl(tmp_path / "sft.jsonl", [XLAM, {"messages": TOOL_CHAT[1:6]}])
    assert list(train_tokenizer.iter_jsonl_texts([path])) == [
        "What is 12*7?", "", '{"expression": "12*7"}', json.dumps(TOOLS[0]),
        TOOL_CHAT[1]["content"], "", "I need two tools.", '{"expression":  "12*7"}', '{"city": "北京"}', "84",
        "晴, 25°C", TOOL_CHAT[5]["content"], "Both came back."]


# ---------------------------------------------------------------------------------------------------------
# A tokenizer from before tools and thinking gains their tokens, and its model the embedding rows for them

# what train_tokenizer.py wrote until the chat format grew: ids 0-4 special, plain ChatML
OLD_TEMPLATE = ("{% for message in messages %}"
                "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                "{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def old_tokenizer_dir(tmp_path_factory, tiny_texts) -> str:
    path = str(tmp_path_factory.mktemp("old_tokenizer"))
    with pytest.MonkeyPatch.context() as patch:  # train_tokenizer.py as it was
        patch.setattr(train_tokenizer, "SPECIAL_TOKENS", SPECIAL_TOKENS[:5])
        patch.setattr(train_tokenizer, "CHAT_TEMPLATE", OLD_TEMPLATE)
        train_tokenizer.save_tokenizer(train_tokenizer.build_tokenizer(iter(tiny_texts[:300]), 400), path)
    return path


def test_an_old_tokenizer_gains_the_markers_and_others_are_kept(old_tokenizer_dir, tiny_tokenizer):
    old = AutoTokenizer.from_pretrained(old_tokenizer_dir)
    assert len(old) == 400 and old.chat_template == OLD_TEMPLATE
    grown = with_chat_template(old)
    assert len(grown) == 406 and grown.chat_template == CHAT_TEMPLATE
    assert grown.convert_ids_to_tokens(list(range(400, 406))) == CHAT_MARKERS
    assert tokenizer_fingerprint(grown, below=400) == tokenizer_fingerprint(old)  # old ids unchanged
    assert (grown.eos_token, grown.pad_token) == (old.eos_token, old.pad_token)
    assert grown("a<think>b")["input_ids"][1] == 400  # a control token now
    assert with_chat_template(tiny_tokenizer) is tiny_tokenizer  # already ours
    foreign = with_chat_template(old)
    foreign.chat_template = "{{ messages[0]['content'] }}"
    assert with_chat_template(foreign) is foreign  # another family's template: its own format, left alone


# short enough for a 256-token window of a 400-token vocabulary
SHORT_TOOL_CHAT = {"tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}], "messages": [
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "reasoning_content": "add", "content": None,
     "tool_calls": [{"id": "a", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "a", "content": "5"},
    {"role": "assistant", "content": "5"}]}


def test_sft_on_tool_data_from_a_model_pretrained_before_the_markers(tmp_path, old_tokenizer_dir):
    train_bin, val_bin = make_pretrain_data(tmp_path, old_tokenizer_dir, n_train=40, n_val=10)
    pre = tmp_path / "pretrain"
    ddp_pretrain.main([*TINY_MODEL, "--max_seq_len", "256", *QUIET, "--tokenizer_path", old_tokenizer_dir, "--data_path", train_bin,
                       "--val_data_path", val_bin, "--out_dir", str(pre), "--batch_size", "4", "--max_steps", "1"])
    data = jsonl(tmp_path / "tools.jsonl", [SHORT_TOOL_CHAT] * 6)
    sft = tmp_path / "sft"
    args = ["--init_from", str(pre), "--data_path", data, "--val_data_path", "", "--out_dir", str(sft), *QUIET,
            "--batch_size", "3", "--save_interval", "2", "--eval_interval", "0",
            "--log_interval", "1"]
    ddp_sft_full.main([*args, "--max_steps", "2"])
    log = (sft / "train.log").read_text(encoding="utf-8")
    assert f"embeddings grown 400 -> 406 for the tokens the tokenizer adds: {' '.join(CHAT_MARKERS)})" in log
    ddp_sft_full.main([*args, "--max_steps", "3", "--resume"])  # the checkpoint records the grown vocab
    assert [step for step, _ in read_metrics(sft, "loss")] == [1, 2, 3]
    # a teacher pretrained before the markers teaches the grown student: it grows the same rows
    ddp_distill.main(["--init_from", str(sft), "--teacher", str(pre), "--data_path", data, "--val_data_path", "",
                      "--out_dir", str(tmp_path / "distill"), *QUIET, "--batch_size", "3", "--max_steps", "1"])
    assert read_metrics(tmp_path / "distill", "kd")

    hf_dir = sft / "hf"
    exported = AutoTokenizer.from_pretrained(hf_dir)
    assert len(exported) == 406 and exported.chat_template == CHAT_TEMPLATE
    assert AutoModelForCausalLM.from_pretrained(hf_dir).config.vocab_size == 406
    messages, tools = SHORT_TOOL_CHAT["messages"], SHORT_TOOL_CHAT["tools"]
    training_ids = encode_chat(with_chat_template(AutoTokenizer.from_pretrained(old_tokenizer_dir)), messages,
                               tools=tools)[0]
    assert exported.apply_chat_template(messages, tools=tools, tokenize=True)["input_ids"] == training_ids
    for source in (sft, hf_dir):  # the checkpoint names the old tokenizer, the export holds the grown one
        model, tok, _ = open_model(source)
        assert model.config.vocab_size == len(tok) == 406 and tok.chat_template == CHAT_TEMPLATE
    with torch.no_grad():
        assert model(torch.tensor([training_ids[:8]])).logits.shape[-1] == 406
