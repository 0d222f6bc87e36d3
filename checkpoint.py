"""Checkpoint I/O shared by the trainers and model_sample.py.

A checkpoint is one `ckpt.pt` dict (see `save_checkpoint`) written atomically, so a kill in the middle of
a save leaves the previous file intact. It is read back with `torch.load(weights_only=True)`: tensors,
dicts, lists and primitives only, never arbitrary pickled objects.

`load_model` opens any trained artifact: a `ckpt.pt`, a run directory holding one, or an HF export
directory (config.json + model.safetensors, as written by `k_model.export_hf`).
"""

import os
from pathlib import Path
from typing import Any

import torch

from k_model import ModelConfig, Transformer, load_hf
from loading import load_tokenizer, tokenizer_fingerprint

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


def model_from_state(state: dict[str, Any], source: str | os.PathLike) -> Transformer:
    """Build a Transformer from a checkpoint dict; ValueError naming `source` and the offending keys."""
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
    """Load a trained model in eval mode from a ckpt.pt, a run dir, or an HF export dir.

    Returns (model, info); info has source, format ("ckpt"|"hf"), step, args, vocab_size,
    tokenizer_fingerprint (None when unknown). A run dir without ckpt.pt falls back to its hf/ export.
    """
    path = Path(path)
    if path.is_dir() and not (path / CKPT_NAME).is_file():
        for hf_dir in (path, path / "hf"):
            if (hf_dir / "config.json").is_file():
                model, info = _load_hf_dir(hf_dir)
                return model.to(device).eval(), info
        raise FileNotFoundError(f"no {CKPT_NAME}, config.json or hf/config.json in {path}")
    state = load_checkpoint(path)
    source = resolve_checkpoint(path)
    model = model_from_state(state, source)
    info = {
        "source": str(source),
        "format": "ckpt",
        "step": state["step"],
        "args": state.get("args"),
        "vocab_size": state["vocab_size"],
        "tokenizer_fingerprint": state["tokenizer_fingerprint"],
    }
    return model.to(device).eval(), info
