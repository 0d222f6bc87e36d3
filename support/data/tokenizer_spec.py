"""The tokenizer contract every stage relies on: the special tokens with their fixed ids, the ChatML chat
template, and the fingerprint that tells two vocabularies apart. train_tokenizer.py builds tokenizers to
it; the data and loading code read it (the lowest layer that needs it, so nothing imports upwards for it).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

# Fixed ids 0..4 (contract): the trainer assigns ids to special tokens in this order.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BOS, EOS, PAD, UNK = "<|im_start|>", "<|im_end|>", "<unk>", "<unk>"

# ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then the assistant header on request.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_fingerprint(tokenizer: Any, below: int | None = None) -> str:
    """First 16 hex chars of sha256 over the sorted vocab: detects data or checkpoints made by another tokenizer.
    below=n: of the tokens with ids < n only, i.e. of the tokenizer before tokens n, n+1, ... were added."""
    items = sorted((t, i) for t, i in tokenizer.get_vocab().items() if below is None or i < below)
    vocab = json.dumps(items, ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]
