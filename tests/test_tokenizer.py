"""train_tokenizer.py: special ids, AutoTokenizer loading, lossless round trips, the ChatML template, the CLI
(any SFT shape, no progress bar off a terminal)."""
import json
import os
import re

import pytest
from transformers import AutoTokenizer

import train_tokenizer


def test_loads_with_autotokenizer_and_fixed_special_ids(tiny_tokenizer_dir, tiny_tokenizer):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.exists(os.path.join(tiny_tokenizer_dir, name))
    tok = tiny_tokenizer
    assert len(tok) == 1000
    assert [tok.convert_ids_to_tokens(i) for i in range(len(train_tokenizer.SPECIAL_TOKENS))] == train_tokenizer.SPECIAL_TOKENS
    specials = (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<unk>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (3, 4, 0)


ROUND_TRIP = [
    "人民日报一九九八年元旦献辞。我们要更好地坚持解放思想、实事求是的思想路线。",
    "The quick brown fox jumps over the lazy dog. Don't stop!",
    "0123456789 3.14159 -42 1e-9 2024-01-01",
    "emoji 🙂👍🏽🇨🇳 👨‍👩‍👧 ✨",
    "  leading, double  spaces,\ttabs\t\t, newlines\n\n\n and trailing   ",
    "混合 mixed 文本 123 🙂\n<|im_start|> is text here",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_encode_decode_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text


def test_text_is_tokenized_as_written(tiny_tokenizer):
    # No normalizer (llama.cpp applies none, so an exported model tokenizes alike there): full-width
    # punctuation, digits and letters come back as written, not folded to ASCII as NFKC would.
    text = "你好，世界！１２３ＡＢＣ"
    assert tiny_tokenizer.backend_tokenizer.normalizer is None
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_no_special_tokens_added_on_encode(tiny_tokenizer):
    ids = tiny_tokenizer.encode("hello")
    assert not set(ids) & set(range(5))
    assert tiny_tokenizer("hello")["input_ids"] == ids


def test_special_tokens_in_text_are_single_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 3 and 4 in ids


def chatml(messages, add_generation_prompt=False):
    """The contract's ChatML rendering, written out independently of the Jinja template."""
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


CONVERSATIONS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 🙂?"},
        {"role": "assistant", "content": "  spaced\nreply "},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_renders_exactly(tiny_tokenizer, messages, gen):
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert rendered == chatml(messages, gen)


def test_cli_streams_pretrain_and_sft_jsonl(tmp_path, capfd):
    pre, sft, out = tmp_path / "pre.jsonl", tmp_path / "sft.jsonl", tmp_path / "tok"
    pre.write_text("".join(json.dumps({"text": f"第{i}篇新闻。天气很好。"}, ensure_ascii=False) + "\n"
                           for i in range(200)), encoding="utf-8")
    # the SFT file in the bare-list shape: each line a JSON list of messages
    conv = [{"role": "user", "content": "zqxjv zqxjv"}, {"role": "assistant", "content": "ok"}]
    sft.write_text((json.dumps(conv) + "\n") * 200, encoding="utf-8")
    train_tokenizer.main(["--data_path", str(pre), str(sft), "--save_dir", str(out), "--vocab_size", "400"])
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 400
    assert len(tok.encode(" zqxjv")) == 1  # a word only the SFT file contains was learned as one token
    assert tok.apply_chat_template(conv, tokenize=False) == chatml(conv)

    # stdout and stderr are files here, as in a log: no progress bar, but the summary line
    printed, errors = capfd.readouterr()
    assert "\r" not in printed + errors and not errors.strip()
    kb = (pre.stat().st_size + sft.stat().st_size) / 1000
    assert printed == f"saved 400-token tokenizer to {out} (trained on {kb:.1f}kB of JSONL in 2 file(s))\n"


def test_cli_bad_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text key"}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(bad))}:2:"):
        train_tokenizer.main(["--data_path", str(bad), "--save_dir", str(tmp_path / "tok")])


def test_defaults_never_read_held_out_data():
    assert not any("val" in p or "test" in p for p in train_tokenizer.DEFAULT_DATA)


def test_vocab_smaller_than_bytes_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer.build_tokenizer(iter(["abc"]), vocab_size=100)
