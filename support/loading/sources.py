"""What training and inference both start from: the device and dtype to run in, the tokenizer, and the model.

`open_model` opens any model source - a ckpt.pt (a LoRA run's holds only adapters and names its base), a
--parallel fsdp run's ckpt_dcp directory (its shards gathered here), a run directory holding either (else its
hf/ export), an HF model directory (`hf_llama.export_hf`'s or any LlamaForCausalLM's or MixtralForCausalLM's)
or a peft adapter directory (adapter_config.json, on top of its base) - and returns the model, its tokenizer
and where it came from. It decides the kind once (`model_kind`); each kind has one loader. `initial_model` is where a training run starts from (--init_from), `model_from_state` what a resumed
run continues. Shared by the trainers, model_sample.py and serve.py; it imports no training code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import torch

from support.loading.checkpoint import (CKPT_NAME, DCP_META, DCP_NAME, build_model, is_dcp_checkpoint, load_checkpoint,
                                        rebuilt, resolve_checkpoint, run_checkpoint)
from support.model.cpu_features import cpu_has_native_bf16
from support.model.hf_llama import load_hf
from k_model import Transformer
from support.data.tokenizer_spec import tokenizer_fingerprint
from support.loading.chat_tokens import with_chat_template

DEFAULT_TOKENIZER = "out/tokenizer"
ADAPTER_CONFIG = "adapter_config.json"  # what marks a peft adapter directory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """"auto" is the GPU when there is one, else the CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA (float16 on GPUs without bf16) and on CPUs that compute bf16 natively,
    else float32; any other name is looked up in DTYPES."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved in `path` (train_tokenizer.py's output or an HF export); FileNotFoundError if absent."""
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer not found: {Path(path) / 'tokenizer.json'} "
                                "(run train_tokenizer.py or pass --tokenizer_path)")
    return AutoTokenizer.from_pretrained(path)


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


def _saved_tokenizer_path(ckpt: Path) -> str | None:
    """The --tokenizer_path a checkpoint was trained with; memory-mapped, so its tensors are not read."""
    try:
        state = torch.load(ckpt / DCP_META if ckpt.is_dir() else ckpt, map_location="cpu", weights_only=True,
                           mmap=True)
    except Exception:  # a damaged file: open_model names it when it opens the weights
        return None
    return (state.get("args") or {}).get("tokenizer_path") if isinstance(state, dict) else None


def tokenizer_dir_for(model_path: str | os.PathLike, tokenizer_path: str | None = None) -> str:
    """The tokenizer of a model artifact: `tokenizer_path` if given; else for a checkpoint the one it was
    trained with, for an HF export or adapter directory the one saved in it; else out/tokenizer."""
    if tokenizer_path:
        return tokenizer_path
    path = Path(model_path)
    ckpt = path if path.is_file() or is_dcp_checkpoint(path) else run_checkpoint(path) if path.is_dir() else None
    if ckpt is not None:
        return _saved_tokenizer_path(ckpt) or DEFAULT_TOKENIZER
    for folder in (path, path / "hf"):
        if (folder / "tokenizer.json").is_file():
            return str(folder)
    return DEFAULT_TOKENIZER


# ----------------------------------------------------------------------------------------------------------
# Opening a model


class ModelOrigin(TypedDict):
    """Where an opened model came from (a dict, so it prints and serialises as one)."""
    source: str  # the checkpoint file or directory read
    format: str  # "ckpt" (a LoRA run's: its base with the adapters merged in), "hf" or "adapter"
    step: int | None  # a checkpoint's optimizer steps
    args: dict[str, Any] | None  # a checkpoint's training flags
    vocab_size: int
    tokenizer_fingerprint: str | None  # of the tokenizer the weights were trained with; None = unknown


class OpenedModel(NamedTuple):
    model: Transformer  # in eval mode, in its stored dtype
    tokenizer: Any  # the model's own, checked against it; None when opened with own_tokenizer=False
    origin: ModelOrigin


def open_model(path: str | os.PathLike, tokenizer_path: str | None = None, device: str | torch.device = "cpu",
               own_tokenizer: bool = True) -> OpenedModel:
    """Any model source (see the module docstring) as a plain model in eval mode: LoRA adapters come merged
    into their base. The tokenizer is `tokenizer_path`, else the one saved with the model (tokenizer_dir_for),
    with our chat template added when the model has the rows for it; a vocabulary that differs from the
    model's raises ValueError naming both. own_tokenizer=False skips it: a caller that brings its own (a
    training run, whose tokenizer may extend the model's: initial_model)."""
    kind, found = model_kind(Path(path))  # first: a path that holds no model is named as such
    model, origin = OPENERS[kind](found)
    tokenizer = _own_tokenizer(model, origin, tokenizer_dir_for(path, tokenizer_path)) if own_tokenizer else None
    return OpenedModel(model.to(device).eval(), tokenizer, origin)


def model_kind(path: Path) -> tuple[str, Path]:
    """("ckpt" | "hf" | "adapter", the file or directory to read): a checkpoint file or DCP directory (or a
    path that is no directory: resolve_checkpoint names it) or a run directory holding one; else a directory
    with adapter_config.json, config.json or hf/config.json."""
    if not path.is_dir() or is_dcp_checkpoint(path) or run_checkpoint(path) is not None:
        return "ckpt", path
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter", path
    for hf_dir in (path, path / "hf"):
        if (hf_dir / "config.json").is_file():
            return "hf", hf_dir
    raise FileNotFoundError(f"no {CKPT_NAME}, config.json, hf/config.json, {ADAPTER_CONFIG} or {DCP_NAME} in {path}")


def _open_checkpoint(path: Path) -> tuple[Transformer, ModelOrigin]:
    ckpt = resolve_checkpoint(path)
    state = load_checkpoint(ckpt)
    model = model_from_state(state, ckpt)
    if "lora" in state:  # for inference, adapters folded into the weights: a plain model, as fast as any
        from support.loading import lora  # peft is imported for LoRA artifacts only

        model = lora.merged(model)
    return model, ModelOrigin(source=str(ckpt), format="ckpt", step=state["step"], args=state.get("args"),
                              vocab_size=state["vocab_size"], tokenizer_fingerprint=state["tokenizer_fingerprint"])


def _open_hf_dir(hf_dir: Path) -> tuple[Transformer, ModelOrigin]:
    weights = hf_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"HF export {hf_dir} has config.json but no {weights.name}")
    try:
        model = load_hf(hf_dir)
    except Exception as e:  # safetensors / transformers raise many types for a damaged export
        raise ValueError(f"{hf_dir}: cannot load HF export ({type(e).__name__}: {e})") from e
    return model, _directory_origin(hf_dir, "hf", model)


def _open_adapter_dir(path: Path) -> tuple[Transformer, ModelOrigin]:
    from support.loading import lora  # peft is imported for LoRA artifacts only

    model = lora.load_adapter_dir(path)
    return model, _directory_origin(path, "adapter", model)


OPENERS = {"ckpt": _open_checkpoint, "hf": _open_hf_dir, "adapter": _open_adapter_dir}


def _directory_origin(path: Path, kind: str, model: Transformer) -> ModelOrigin:
    """An HF or adapter directory: no step or flags; the fingerprint of the tokenizer saved there, if one is."""
    fingerprint = tokenizer_fingerprint(load_tokenizer(path)) if (path / "tokenizer.json").is_file() else None
    return ModelOrigin(source=str(path), format=kind, step=None, args=None, vocab_size=model.config.vocab_size,
                       tokenizer_fingerprint=fingerprint)


def _own_tokenizer(model: Transformer, origin: ModelOrigin, tokenizer_dir: str) -> Any:
    """The model's tokenizer, checked against it: with our chat template and tokens added (with_chat_template)
    when the model has rows for tokens the tokenizer lacks (SFT of a base model, or of ours from before tools
    and thinking, adds them; its checkpoint names the tokenizer it started from)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if model.config.vocab_size > len(tokenizer):
        tokenizer = with_chat_template(tokenizer)
    check_model_tokenizer(SourcedModel(model, origin["source"], origin["tokenizer_fingerprint"]), tokenizer,
                          tokenizer_dir)
    return tokenizer


def model_from_state(state: dict[str, Any], source: str | os.PathLike) -> Transformer:
    """The model a checkpoint dict holds, as it trained: a LoRA checkpoint's (a "lora" entry: adapters only)
    is its base, opened from where the checkpoint says, with the adapters attached (lora.restore)."""
    if "lora" not in state:
        return build_model(state, source)
    from support.loading import lora  # peft is imported for LoRA checkpoints only

    base = state["lora"]["base"]
    if not Path(base).exists():
        raise FileNotFoundError(f"{source}: the base model of these LoRA adapters, {base}, is not there")
    return lora.restore(open_model(base, own_tokenizer=False).model, state, source)


def initial_model(path: str | os.PathLike, tokenizer: Any, dropout: float | None = None,
                  grow_unknown: bool = True) -> SourcedModel:
    """A training run's starting model (--init_from): any source open_model opens, in train mode, with
    --dropout applied. When the tokenizer extends the model's own (with_chat_template added tokens at the
    end), the embeddings grow to it; the model's tokenizer must then be exactly the extended one's first
    vocab_size tokens, or unknown (a base without one) where grow_unknown. Other vocabulary mismatches are
    left to check_model_tokenizer."""
    model, _, origin = open_model(path, own_tokenizer=False)
    source, fingerprint = origin["source"], origin["tokenizer_fingerprint"]
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab and (fingerprint == tokenizer_fingerprint(tokenizer, below=vocab)
                                   or fingerprint is None and grow_unknown):
        model = rebuilt(model, vocab_size=len(tokenizer))
        added = " ".join(tokenizer.convert_ids_to_tokens(list(range(vocab, len(tokenizer)))))
        source += f" (embeddings grown {vocab:,} -> {len(tokenizer):,} for the tokens the tokenizer adds: {added})"
        fingerprint = tokenizer_fingerprint(tokenizer)
    if dropout is not None and dropout != model.config.dropout:
        model = rebuilt(model, dropout=dropout)
    return SourcedModel(model.train(), source, fingerprint)
