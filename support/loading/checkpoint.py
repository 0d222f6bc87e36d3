"""The checkpoint file: one `ckpt.pt` dict (see `save_checkpoint`) written atomically, so a kill in the middle
of a save leaves the previous file intact. It is read back with `torch.load(weights_only=True)`: tensors,
dicts, lists and primitives only, never arbitrary pickled objects.

A --parallel fsdp run saves a Distributed Checkpoint instead (support/training/fsdp.py writes it): `ckpt_dcp`, a symlink
to a directory holding each rank's shards of "model" and "optimizer" (torch.distributed.checkpoint files) and
DCP_META, the rest of the ckpt.pt dict. `load_checkpoint` reads either kind as the same dict: from a DCP
directory it gathers the full weights in this one process, so every tool that opens ckpt.pt opens it too.

`build_model` makes the model a plain checkpoint describes and `rebuilt` copies a model with some config
fields changed. Opening a checkpoint as a model source (a LoRA run's too) is loading.open_model's job.
"""

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from k_model import ModelConfig, Transformer

CKPT_NAME = "ckpt.pt"
DCP_NAME = "ckpt_dcp"  # a --parallel fsdp run's checkpoint directory (a symlink, swapped atomically)
DCP_META = "meta.pt"  # in it: the checkpoint dict without "model" and "optimizer"
DCP_SLOTS = (f".{DCP_NAME}.a", f".{DCP_NAME}.b")  # the directories DCP_NAME points to, written in turn
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
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in directory `path` durable (POSIX only; directories cannot be opened on Windows)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_dcp_checkpoint(out_dir: Path) -> None:
    """Delete a run directory's DCP checkpoint (a --parallel ddp run that replaces it with --overwrite)."""
    (out_dir / DCP_NAME).unlink(missing_ok=True)
    for slot in DCP_SLOTS:
        shutil.rmtree(out_dir / slot, ignore_errors=True)


def is_dcp_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / DCP_META).is_file()


def run_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a run directory holds: its ckpt.pt or its ckpt_dcp (None if neither). A run that changed
    --parallel under --overwrite removes the other kind at its first save, so both exist only after a crash
    in between: then neither is taken silently."""
    ckpt, dcp_dir = Path(out_dir) / CKPT_NAME, Path(out_dir) / DCP_NAME
    if ckpt.is_file() and dcp_dir.exists():
        raise ValueError(f"{out_dir} holds two checkpoints, {CKPT_NAME} (--parallel ddp) and {DCP_NAME} "
                         f"(--parallel fsdp): delete the one you do not want to continue")
    return ckpt if ckpt.is_file() else dcp_dir if dcp_dir.exists() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file or DCP directory, or a run directory's; FileNotFoundError naming what was looked for."""
    path = Path(path)
    if path.is_dir() and not is_dcp_checkpoint(path):
        path = run_checkpoint(path) or path / CKPT_NAME
    if not (path.is_file() or is_dcp_checkpoint(path)):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    dcp_weights: bool = True) -> dict[str, Any]:
    """Load and validate a trainer checkpoint (file, DCP directory or run dir). ValueError names the file and
    the key. dcp_weights=False reads a DCP checkpoint's dict without its weights: ranks that load their own
    shards (fsdp.py) need not hold the whole model."""
    path = resolve_checkpoint(path)
    file = path / DCP_META if path.is_dir() else path
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/garbage/unsafe files
        raise ValueError(f"{file}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a checkpoint dict, found {type(state).__name__}")
    weights_elsewhere = path.is_dir() and not dcp_weights  # in the shards, which the ranks load themselves
    if path.is_dir() and dcp_weights:
        state["model"] = read_dcp_weights(path, "model")
    missing = [k for k in REQUIRED_KEYS if k not in state and not (k == "model" and weights_elsewhere)]
    if missing:
        raise ValueError(f"{path}: checkpoint is missing key(s) {missing}")
    if state["model_config"].get("vocab_size") != state["vocab_size"]:
        raise ValueError(
            f"{path}: model_config.vocab_size={state['model_config'].get('vocab_size')} "
            f"does not match vocab_size={state['vocab_size']}"
        )
    return state


def read_dcp_weights(path: Path, key: str) -> dict[str, torch.Tensor]:
    """The full tensors saved under `key` in a DCP directory, gathered from every rank's shards in this one
    process (no process group), as a plain state dict."""
    import torch.distributed.checkpoint as dcp  # distributed checkpoints are read only where one is opened

    try:
        reader = dcp.FileSystemReader(path)
        stored = reader.read_metadata().state_dict_metadata
        prefix = key + "."
        weights = {name.removeprefix(prefix): torch.empty(meta.size, dtype=meta.properties.dtype)
                   for name, meta in stored.items() if name.startswith(prefix) and hasattr(meta, "size")}
        with warnings.catch_warnings():  # that no process group is used is the point here, not news
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({key: weights}, storage_reader=reader, no_dist=True)
    except (Exception, dcp.api.CheckpointException) as e:  # missing or truncated shards, a damaged .metadata
        raise ValueError(f"{path}: not a readable distributed checkpoint ({dcp_failure(e)})") from None
    return weights


def dcp_failure(e: BaseException) -> str:
    """One line for a DCP error: a CheckpointException (a BaseException) carries each failed rank's exception
    and traceback; the first rank's exception says what went wrong."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


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
    if "model" not in state:  # a DCP checkpoint's dict read without weights: the ranks load their shards
        return model
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
