"""The checkpoint file: one `ckpt.pt` dict (see `save_checkpoint`) written atomically, so a kill in the middle
of a save leaves the previous file intact. It is read back with `torch.load(weights_only=True)`: tensors,
dicts, lists and primitives only, never arbitrary pickled objects.

`build_model` makes the model a plain checkpoint describes and `rebuilt` copies a model with some config
fields changed. Opening a checkpoint as a model source (a LoRA run's too) is loading.open_model's job.
"""

import os
from pathlib import Path
from typing import Any

import torch

from k_model import ModelConfig, Transformer

CKPT_NAME = "ckpt.pt"
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


def build_model(state: dict[str, Any], source: str | os.PathLike) -> Transformer:
    """The Transformer a plain checkpoint dict describes (LoRA checkpoints: loading.model_from_state); ValueError
    naming `source` and the offending keys."""
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
