"""A tokenizer made before the chat format of tokenizer_spec (a base model's, without a chat template, or ours
from before tools and thinking) gains its tokens: the ones it lacks become special tokens at the end of its
vocabulary, where a model trained with it grows new embedding rows (sources.initial_model), and it gets our
chat template. A tokenizer with a chat template of its own (another family's) is left as it is.
"""
from __future__ import annotations

import copy
from typing import Any

from support.data.tokenizer_spec import BOS, CHAT_MARKERS, CHAT_TEMPLATE, EOS

# Ours before tools and thinking: plain ChatML (tokenizers saved then have ids 0-4 special only).
PLAIN_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def with_chat_template(tokenizer: Any) -> Any:
    """The tokenizer itself when it has our chat template and tokens, or a chat template of its own. Otherwise
    a copy with ours: tokenizer_spec's template and whichever of <|im_start|>, <|im_end|> and the CHAT_MARKERS it
    lacks as special tokens (new ids at the end of the vocabulary, in that order). A tokenizer that had no
    template (a base model's) also gets <|im_end|> as EOS, since it closes a reply; its BOS stays its own, and
    a missing pad token becomes unk (or EOS)."""
    if tokenizer.chat_template not in (None, "", PLAIN_CHATML, CHAT_TEMPLATE):
        return tokenizer
    added = tokenizer.get_added_vocab()
    missing = [t for t in (BOS, EOS, *CHAT_MARKERS) if t not in added]
    if not missing and tokenizer.chat_template == CHAT_TEMPLATE:
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if not tokenizer.chat_template:
        tok.eos_token = EOS
    tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or EOS
    return tok
