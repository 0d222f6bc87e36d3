"""What trainer.py needs around the loop: the process group, the parallel strategy, the data order, rank 0's
logs, Ctrl-C handling.

Launch: `python ddp_pretrain.py ...` is one process; `torchrun --nproc_per_node=N ddp_pretrain.py ...` is DDP
(NCCL on CUDA, gloo on CPU), or with --parallel fsdp FSDP2 (support/training/fsdp.py). Only rank 0 prints and logs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from inspect import signature
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from support.loading.checkpoint import CKPT_NAME, remove_dcp_checkpoint, save_checkpoint
from support.loading.sources import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    control_group: Any  # CPU (gloo) group for small host-side decisions, e.g. agreeing to stop

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistInfo:
    """One process, or DDP when launched by torchrun (which sets RANK/LOCAL_RANK/WORLD_SIZE)."""
    dev = resolve_device(device)
    if "RANK" not in os.environ:
        return DistInfo(0, 0, 1, dev, None)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
        control = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
        control = None  # the default group already is gloo
    return DistInfo(rank, local_rank, dist.get_world_size(), dev, control)


# ----------------------------------------------------------------------------------------------------------
# The parallel strategy: how the model is wrapped, its gradients synchronized, its checkpoint saved and restored


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: its shard of an FSDP parameter (a DTensor), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class DataParallel:
    """--parallel ddp: every rank holds the whole model, gradients are all-reduced (DDP, with 2+ processes) and
    rank 0 saves everything in out_dir/ckpt.pt. support/training/fsdp.py's FullyShardedParallel answers the same calls."""

    name = "ddp"

    def __init__(self, d: DistInfo):
        self.d = d
        self.ddp: DistributedDataParallel | None = None

    def share_model(self, load: Callable[[], Any]) -> Any:
        """The initial model (a loading.SourcedModel): each rank loads its own copy."""
        return load()

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.d.device)

    def wrap(self, model: torch.nn.Module, compiled: bool) -> torch.nn.Module:
        """The module a step calls: DDP's (2+ processes) or the model, torch.compile'd if `compiled`."""
        if self.d.world_size > 1:
            # the rotary tables are the only buffers and identical on every rank: no need to sync them
            # before each forward (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
            ddp_flags = signature(DistributedDataParallel).parameters
            sync_flag = "forward_sync_buffers" if "forward_sync_buffers" in ddp_flags else "broadcast_buffers"
            device_ids = [self.d.device.index] if self.d.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=device_ids, **{sync_flag: False})
        forward_model = self.ddp or model
        return torch.compile(forward_model) if compiled else forward_model

    @property
    def no_sync(self) -> Callable[[], AbstractContextManager] | None:
        """The context of a micro-step whose gradients are only accumulated, not yet synchronized."""
        return self.ddp.no_sync if self.ddp is not None else None

    def restore(self, state: dict[str, Any], ckpt_path: Path, model: torch.nn.Module, optimizer: Any) -> None:
        """Load the optimizer state (the model came with its weights from model_from_state)."""
        if "optimizer" not in state:
            raise ValueError(f"{ckpt_path}: a --parallel fsdp checkpoint: resume it with --parallel fsdp")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # another optimizer's state, or another set of trainable parameters
            raise ValueError(f"{ckpt_path}: cannot resume: {e}") from None

    def save(self, out_dir: Path, meta: dict[str, Any], weights: Callable[[], dict[str, torch.Tensor]],
             optimizer: Any) -> Path:
        """Rank 0 writes out_dir/ckpt.pt (checkpoint.save_checkpoint: the task's weights(), the optimizer state
        and meta) and removes a --parallel fsdp checkpoint this run replaces (--overwrite); returns its path."""
        path = out_dir / CKPT_NAME
        if self.d.is_main:
            save_checkpoint(path, {"model": weights(), "optimizer": optimizer.state_dict(), **meta})
            remove_dcp_checkpoint(out_dir)
        return path

    def full_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module | None:
        """On rank 0, the whole model for what rank 0 does alone (samples, lm-eval tasks, the HF export); DDP's
        own model, wherever it is."""
        return model

    def memory(self, model: torch.nn.Module, optimizer: Any) -> str:
        """The training state this rank holds: its weights, their gradients (one per trainable weight, as after
        a backward pass) and the optimizer state; under FSDP its shards."""
        states = [t for opt in optimizer.torch_optimizers for state in opt.state.values()
                  for t in state.values() if torch.is_tensor(t)]
        sizes = {"params": sum(local_part(p).nbytes for p in model.parameters()),
                 "grads": sum(local_part(p).nbytes for p in model.parameters() if p.requires_grad),
                 "optimizer": sum(local_part(t).nbytes for t in states)}
        return f"training state on rank {self.d.rank} (MiB): " + ", ".join(f"{k} {v / 2**20:,.1f}"
                                                                             for k, v in sizes.items())


# ----------------------------------------------------------------------------------------------------------
# Optimizer settings at --resume

# how torch computes a step, not what it computes; the restored state (AdamW's step counts) was placed for the
# saved values, so these stay as restored
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def optimizer_settings(optimizer: Any) -> dict[tuple[str, int, str], Any]:
    """Every hyperparameter of every param group of an optim.Optimizers, by (optimizer, group, key): weight
    decay, betas, eps, Muon's momentum... Not the learning rate, which the schedule sets at every step."""
    return {(type(opt).__name__, i, key): value for opt in optimizer.torch_optimizers
            for i, group in enumerate(opt.param_groups) for key, value in group.items()
            if key not in ("params", "lr", *IMPLEMENTATION_KEYS)}


def apply_settings(optimizer: Any, settings: dict[tuple[str, int, str], Any]) -> list[str]:
    """Set each (optimizer, group, key) value `settings` holds; returns "Optimizer key old -> new" for each change.
    A resumed run restores the checkpoint's param groups whole; this puts back the values this launch's flags
    and code give (--weight_decay at --resume applies, as --learning_rate does)."""
    groups = {type(opt).__name__: opt.param_groups for opt in optimizer.torch_optimizers}
    changes = []
    for (name, i, key), value in settings.items():
        old = groups[name][i].get(key)
        if old != value:
            groups[name][i][key] = value
            changes.append(f"{name} {key} {old} -> {value}")
    return list(dict.fromkeys(changes))  # a change to several groups is said once


# ----------------------------------------------------------------------------------------------------------
# Data order (the layout is in trainer.py's docstring)


GROUP_RUNS = 8  # --group_by_length: each sorted block is read as this many runs, in a shuffled order


def epoch_order(n: int, seed: int, epoch: int, sizes: np.ndarray | None = None, group: int = 0) -> torch.Tensor:
    """The order in which epoch `epoch` visits the n samples: a permutation seeded by (seed, epoch). With
    `group` (--group_by_length) and the samples' sizes, each `group` consecutive samples of it are sorted by
    size and cut into GROUP_RUNS runs, read in a shuffled order (not always short to long): a step then holds
    samples of similar length, which collate_trimmed cuts to less padding. Every sample is still read once an
    epoch, and the order depends on no batch size or process count, so a resumed run with others reads
    exactly the rest."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator)
    if not group:
        return order
    sizes = torch.as_tensor(sizes)
    runs = []
    for block in order.split(group):
        block_runs = block[sizes[block].argsort(stable=True)].tensor_split(GROUP_RUNS)
        runs += [block_runs[i] for i in torch.randperm(GROUP_RUNS, generator=generator)]
    return torch.cat(runs)


class StepSampler(Sampler[list[int]]):
    """This rank's micro-batches for one epoch, from sample `start` of the epoch's order (epoch_order; layout
    in the module docstring). An incomplete last optimizer step is dropped."""

    def __init__(self, n: int, batch_size: int, accumulation_steps: int, rank: int, world_size: int,
                 seed: int, epoch: int, start: int, sizes: np.ndarray | None = None, group: int = 0):
        self.n, self.batch_size, self.accumulation_steps = n, batch_size, accumulation_steps
        self.rank, self.world_size, self.seed, self.epoch, self.start = rank, world_size, seed, epoch, start
        self.sizes, self.group = sizes, group
        self.step_samples = batch_size * world_size * accumulation_steps
        self.num_steps = max(0, (n - start) // self.step_samples)

    def __len__(self) -> int:
        return self.num_steps * self.accumulation_steps

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, self.seed, self.epoch, self.sizes, self.group)
        B, W = self.batch_size, self.world_size
        for k in range(self.num_steps):
            base = self.start + k * self.step_samples
            for m in range(self.accumulation_steps):
                lo = base + (m * W + self.rank) * B
                yield order[lo : lo + B].tolist()


def steps_left(n: int, step_samples: int, position: dict[str, int], epochs: int) -> int:
    """Optimizer steps from `position` to the end of epoch `epochs - 1`, at `step_samples` samples a step."""
    if position["epoch"] >= epochs:
        return 0
    this_epoch = max(0, (n - position["sample"]) // step_samples)
    return this_epoch + (epochs - position["epoch"] - 1) * (n // step_samples)


class Step(NamedTuple):
    batches: list[Any]  # this rank's accumulation_steps micro-batches
    position: dict[str, int]  # data position after this step: {"epoch", "sample"}


def iterate_steps(dataset: Dataset, collate: Callable[[list[Any]], Any], args: argparse.Namespace, d: DistInfo,
                  position: dict[str, int]) -> Iterator[Step]:
    """Endless stream of optimizer steps from `position` on, epoch after epoch (args: batch_size,
    accumulation_steps, seed, group_by_length, num_workers; the dataset's sizes() where grouped by length)."""
    epoch, start = position["epoch"], position["sample"]
    sizes = dataset.sizes() if args.group_by_length else None
    while True:
        sampler = StepSampler(len(dataset), args.batch_size, args.accumulation_steps, d.rank, d.world_size,
                              args.seed, epoch, start, sizes, args.group_by_length)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.num_workers,
                            pin_memory=d.device.type == "cuda", worker_init_fn=StopRequest.ignore_in_worker)
        micro = iter(loader)
        for k in range(sampler.num_steps):
            batches = [next(micro) for _ in range(args.accumulation_steps)]
            yield Step(batches, {"epoch": epoch, "sample": start + (k + 1) * sampler.step_samples})
        epoch, start = epoch + 1, 0


# ----------------------------------------------------------------------------------------------------------
# Rank 0's logs, Ctrl-C


def json_safe(value: Any) -> Any:
    """nan/inf become null: json.dumps would write a bare NaN, which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Rank 0's output: console lines (through tqdm, so the bar stays intact), out_dir/train.log,
    out_dir/metrics.jsonl (one JSON record per log/eval line) and optionally swanlab."""

    def __init__(self, out_dir: Path, enabled: bool, resumed: bool):
        self.enabled = enabled
        self.swanlab = None
        self.metrics_path = out_dir / "metrics.jsonl"
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            log = out_dir / "train.log"
            if not resumed and log.exists():  # a fresh run (--overwrite) starts its own log; the old one is kept
                log.replace(out_dir / "train.log.prev")
            self.log_file = open(log, "a", encoding="utf-8")

    def info(self, msg: str, console: bool = True) -> None:
        if self.enabled:
            if console:
                tqdm.write(msg)
            self.log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
            self.log_file.flush()

    def start_metrics(self, resume_step: int | None) -> None:
        """A fresh run starts an empty metrics.jsonl; a resumed one drops the records after its checkpoint's
        step, which it is about to recompute, so the file reads like an uninterrupted run's."""
        if not self.enabled:
            return
        keep = []
        if resume_step is not None and self.metrics_path.exists():
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
            keep = [line for line in lines if line and json.loads(line)["step"] <= resume_step]
        self.metrics_path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: json_safe(v) for k, v in values.items()}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}, ensure_ascii=False, allow_nan=False) + "\n")
        if self.swanlab is not None:
            self.swanlab.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def start_swanlab(self, project: str, mode: str, out_dir: Path, config: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            import swanlab
        except ImportError as e:
            raise ImportError("--use_swanlab needs the swanlab package: pip install swanlab "
                              "(or drop --use_swanlab)") from e
        swanlab.init(project=project, mode=mode, log_dir=str(out_dir / "swanlog"), config=config)
        self.swanlab = swanlab

    def close(self) -> None:
        if self.enabled:
            self.log_file.close()
            if self.swanlab is not None:
                self.swanlab.finish()


class StopRequest:
    """SIGINT (Ctrl-C) / SIGTERM ask the loop to save a checkpoint after the current step and exit.
    Repeats are ignored, because torchrun forwards the terminal's Ctrl-C to workers that already got it;
    SIGKILL still stops at once, and the atomic save keeps the last checkpoint intact."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool):
        self.announce = announce
        self.signum = 0

    def __enter__(self) -> StopRequest:
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.signum and self.announce:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                  "(SIGKILL aborts without saving)", file=sys.stderr, flush=True)
        self.signum = self.signum or signum

    @classmethod
    def ignore_in_worker(cls, worker_id: int) -> None:
        """DataLoader worker_init_fn. A worker is forked with this handler installed and gets the terminal's
        Ctrl-C too; it must not announce a save of its own: the main process stops it after the save."""
        for s in cls.SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def agreed(self, d: DistInfo) -> int:
        """The signal number if any rank was signalled, else 0; every rank gets the same answer."""
        if d.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.control_group)
        return int(flag)
