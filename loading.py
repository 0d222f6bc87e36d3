"""What training and inference both start from: the device and dtype to run in, the tokenizer with its
fingerprint, and the check that a model and a tokenizer belong together.

Shared by the trainers, model_sample.py and serve.py; it imports no training code.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from k_model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """"auto" is the GPU when there is one, else the CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX. Elsewhere bf16 matmul is emulated: ~90x slower than fp32 on an AVX2 CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA (float16 on GPUs without bf16) and on CPUs that compute bf16 natively,
    else float32; any other name is looked up in DTYPES."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def tokenizer_fingerprint(tokenizer: Any, below: int | None = None) -> str:
    """First 16 hex chars of sha256 over the sorted vocab: detects data or checkpoints made by another tokenizer.
    below=n: of the tokens with ids < n only, i.e. of the tokenizer before tokens n, n+1, ... were added."""
    items = sorted((t, i) for t, i in tokenizer.get_vocab().items() if below is None or i < below)
    vocab = json.dumps(items, ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved in `path` (train_tokenizer.py's output or an HF export); FileNotFoundError if absent."""
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer not found: {Path(path) / 'tokenizer.json'} "
                                "(run train_tokenizer.py or pass --tokenizer_path)")
    return AutoTokenizer.from_pretrained(path)


def with_chat_template(tokenizer: Any) -> Any:
    """The tokenizer itself when it has a chat template. Otherwise (a base model's tokenizer) a copy with ours
    added: train_tokenizer.py's ChatML template, its <|im_start|> / <|im_end|> as special tokens (new ids at
    the end of the vocabulary, where the model's embeddings must grow) and <|im_end|> as EOS, since it closes
    a reply; BOS stays the tokenizer's own, and a missing pad token becomes unk (or EOS)."""
    if tokenizer.chat_template:
        return tokenizer
    # imported here: train_tokenizer imports dataset, which imports this module
    from train_tokenizer import BOS, CHAT_TEMPLATE, EOS

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": [BOS, EOS]})
    tok.eos_token = EOS
    tok.chat_template = CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or EOS
    return tok


class SourcedModel(NamedTuple):
    """A model and what is known of where it came from, for messages and tokenizer checks."""
    model: Transformer
    source: str  # "a new model", a checkpoint path, an HF export directory, ...
    tokenizer_fingerprint: str | None  # of the tokenizer the weights were trained with; None = unknown


def check_model_tokenizer(model: SourcedModel, tokenizer: Any, tokenizer_path: str | os.PathLike) -> None:
    """The model's vocabulary must be the tokenizer's: the same size and, where known, the same tokens."""
    vocab = model.model.config.vocab_size
    if vocab != len(tokenizer):
        raise ValueError(f"{model.source}: model vocab_size={vocab} but the tokenizer at {tokenizer_path} has "
                         f"{len(tokenizer)} tokens; pass the tokenizer the model was trained with (--tokenizer_path)")
    fingerprint = tokenizer_fingerprint(tokenizer)
    if model.tokenizer_fingerprint not in (None, fingerprint):
        raise ValueError(f"{model.source}: tokenizer_fingerprint {model.tokenizer_fingerprint} differs from "
                         f"{fingerprint} of the tokenizer at {tokenizer_path}: same size, different tokens")
