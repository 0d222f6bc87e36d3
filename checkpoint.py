"""Checkpoint I/O shared by the trainers and model_sample.py.

A checkpoint is one `ckpt.pt` dict (see `save_checkpoint`) written atomically, so a kill in the middle of
a save leaves the previous file intact. It is read back with `torch.load(weights_only=True)`: tensors,
dicts, lists and primitives only, never arbitrary pickled objects.

`load_model` opens any trained artifact: a `ckpt.pt` (a LoRA run's holds only adapters, and names its base),
a run directory holding one, an HF export directory (config.json + model.safetensors: `k_model.export_hf`'s
or any LlamaForCausalLM's) or a peft adapter directory (adapter_config.json, on top of its base model);
`tokenizer_dir_for` finds the tokenizer that belongs to it, and `initial_model` is where a training run
starts from (--init_from).
"""

import os
from pathlib import Path
from typing import Any

import torch

from k_model import ModelConfig, Transformer, load_hf
from loading import SourcedModel, load_tokenizer, tokenizer_fingerprint

CKPT_NAME = "ckpt.pt"
ADAPTER_CONFIG = "adapter_config.json"  # what marks a peft adapter directory
DEFAULT_TOKENIZER = "out/tokenizer"
# keys every checkpoint must carry to rebuild its model without guessing
REQUIRED_KEYS = ("model", "model_config", "vocab_size", "tokenizer_fingerprint", "step")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: temp file in the same directory, fsync, rename.

    The checkpoint dict written by the trainer holds: model (state_dict), optimizer (state_dict),
    scaler (GradScaler state_dict or None), step (optimizer steps done), data_position
    ({"epoch", "sample"}: the next sample of that epoch's permutation), args (dict of CLI flags),
    model_config (dict of ModelConfig fields), vocab_size, tokenizer_fingerprint, world_size.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # make the rename itself durable (POSIX only; directories cannot be opened on Windows)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory's ckpt.pt; FileNotFoundError naming what was looked for."""
    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a trainer checkpoint (file or run dir). ValueError names the file and the key."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/garbage/unsafe files
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found {type(state).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint is missing key(s) {missing}")
    if state["model_config"].get("vocab_size") != state["vocab_size"]:
        raise ValueError(
            f"{path}: model_config.vocab_size={state['model_config'].get('vocab_size')} "
            f"does not match vocab_size={state['vocab_size']}"
        )
    return state


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """The fields ModelConfig itself declares (primitives, so weights_only loading accepts them)."""
    return {name: getattr(config, name) for name in ModelConfig.__annotations__}


def model_from_state(state: dict[str, Any], source: str | os.PathLike) -> Transformer:
    """Build a Transformer from a checkpoint dict; ValueError naming `source` and the offending keys. A LoRA
    checkpoint (a "lora" entry: adapters only) gives its base model with the adapters attached (lora.py)."""
    if "lora" in state:
        import lora  # peft is imported for LoRA checkpoints only; lora.py imports this module

        return lora.from_checkpoint(state, source)
    try:
        config = ModelConfig(**state["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: bad model_config {state['model_config']}: {e}") from e
    model = Transformer(config)
    expected = model.state_dict()
    weights = state["model"]
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{source}: weights do not match model_config: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, shape mismatches {wrong_shape[:5]}"
        )
    model.load_state_dict(weights)
    return model


def rebuilt(model: Transformer, **changes: Any) -> Transformer:
    """A copy of `model` with some config fields changed (dropout probabilities are fixed when modules are
    built). A larger vocab_size adds embedding (and untied output) rows initialised to the mean of the
    existing ones: new tokens then start as an average token, neither dominant nor impossible."""
    config = ModelConfig(**{**config_to_dict(model.config), **changes})
    weights = dict(model.state_dict())
    for key in ("tok_embeddings.weight", "output.weight"):
        old = weights[key]
        extra = config.vocab_size - old.shape[0]
        if extra < 0:
            raise ValueError(f"cannot shrink the vocabulary from {old.shape[0]} to {config.vocab_size} tokens")
        weights[key] = torch.cat([old, old.mean(dim=0, keepdim=True).expand(extra, -1)])
    copy = Transformer(config).to(dtype=model.dtype)
    copy.load_state_dict(weights)
    return copy.train(model.training)


def initial_model(path: str | os.PathLike, tokenizer: Any, dropout: float | None = None) -> SourcedModel:
    """A training run's starting model (--init_from): any artifact load_model opens, in train mode, with
    --dropout applied. When the tokenizer extends the model's own (loading.with_chat_template added tokens
    at the end), the embeddings grow to it; the model's tokenizer must then be exactly the extended one's
    first vocab_size tokens. Other vocabulary mismatches are left to loading.check_model_tokenizer."""
    model, info = load_model(path)
    source, fingerprint = info["source"], info["tokenizer_fingerprint"]
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab and fingerprint in (None, tokenizer_fingerprint(tokenizer, below=vocab)):
        model = rebuilt(model, vocab_size=len(tokenizer))
        source += f" (embeddings grown {vocab:,} -> {len(tokenizer):,} for the tokens the tokenizer adds)"
        fingerprint = tokenizer_fingerprint(tokenizer)
    if dropout is not None and dropout != model.config.dropout:
        model = rebuilt(model, dropout=dropout)
    return SourcedModel(model.train(), source, fingerprint)


def _saved_tokenizer_path(ckpt: Path) -> str | None:
    """The --tokenizer_path a checkpoint was trained with; memory-mapped, so its tensors are not read."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged file: load_model names it when it opens the weights
        return None
    return (state.get("args") or {}).get("tokenizer_path") if isinstance(state, dict) else None


def tokenizer_dir_for(model_path: str | os.PathLike, tokenizer_path: str | None = None) -> str:
    """The tokenizer of a model artifact: `tokenizer_path` if given; else for a checkpoint the one it was
    trained with, for an HF export or adapter directory the one saved in it; else out/tokenizer."""
    if tokenizer_path:
        return tokenizer_path
    path = Path(model_path)
    ckpt = path if path.is_file() else path / CKPT_NAME
    if ckpt.is_file():
        return _saved_tokenizer_path(ckpt) or DEFAULT_TOKENIZER
    for folder in (path, path / "hf"):
        if (folder / "tokenizer.json").is_file():
            return str(folder)
    return DEFAULT_TOKENIZER


def _hf_fingerprint(hf_dir: Path) -> str | None:
    """Fingerprint of the tokenizer exported next to the HF weights, if one was saved there."""
    if not (hf_dir / "tokenizer.json").is_file():
        return None
    return tokenizer_fingerprint(load_tokenizer(hf_dir))


def _load_hf_dir(hf_dir: Path) -> tuple[Transformer, dict[str, Any]]:
    weights = hf_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"HF export {hf_dir} has config.json but no {weights.name}")
    try:
        model = load_hf(hf_dir)
    except Exception as e:  # safetensors / transformers raise many types for a damaged export
        raise ValueError(f"{hf_dir}: cannot load HF export ({type(e).__name__}: {e})") from e
    info = {
        "source": str(hf_dir),
        "format": "hf",
        "step": None,
        "args": None,
        "vocab_size": model.config.vocab_size,
        "tokenizer_fingerprint": _hf_fingerprint(hf_dir),
    }
    return model, info


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any]]:
    """Load a trained model in eval mode from a ckpt.pt, a run dir, an HF export dir or a peft adapter dir
    (LoRA adapters come merged into their base: one plain model).

    Returns (model, info); info has source, format ("ckpt"|"hf"|"adapter"), step, args, vocab_size,
    tokenizer_fingerprint (None when unknown). A run dir without ckpt.pt falls back to its hf/ export.
    """
    path = Path(path)
    if path.is_dir() and not (path / CKPT_NAME).is_file():
        if (path / ADAPTER_CONFIG).is_file():
            import lora  # peft is imported for LoRA artifacts only

            model = lora.load_adapter_dir(path)
            info = {"source": str(path), "format": "adapter", "step": None, "args": None,
                    "vocab_size": model.config.vocab_size, "tokenizer_fingerprint": _hf_fingerprint(path)}
            return model.to(device).eval(), info
        for hf_dir in (path, path / "hf"):
            if (hf_dir / "config.json").is_file():
                model, info = _load_hf_dir(hf_dir)
                return model.to(device).eval(), info
        raise FileNotFoundError(f"no {CKPT_NAME}, config.json, hf/config.json or {ADAPTER_CONFIG} in {path}")
    state = load_checkpoint(path)
    source = resolve_checkpoint(path)
    model = model_from_state(state, source)
    if "lora" in state:  # for inference, adapters folded into the weights: a plain model, as fast as any
        import lora

        model = lora.merged(model)
    info = {
        "source": str(source),
        "format": "ckpt",
        "step": state["step"],
        "args": state.get("args"),
        "vocab_size": state["vocab_size"],
        "tokenizer_fingerprint": state["tokenizer_fingerprint"],
    }
    return model.to(device).eval(), info
