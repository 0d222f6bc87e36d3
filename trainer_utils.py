"""What trainer.py needs around the loop: the process group, rank 0's logs, and Ctrl-C handling.

Launch: `python ddp_pretrain.py ...` is one process; `torchrun --nproc_per_node=N ddp_pretrain.py ...` is DDP
(NCCL on CUDA, gloo on CPU). Only rank 0 prints, logs and saves.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from loading import resolve_device


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


def json_safe(value: Any) -> Any:
    """nan/inf become null: json.dumps would write a bare NaN, which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Rank 0's output: console lines (through tqdm, so the bar stays intact), out_dir/train.log,
    out_dir/metrics.jsonl (one JSON record per log/eval line) and optionally swanlab."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.swanlab = None
        self.metrics_path = out_dir / "metrics.jsonl"
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.log_file = open(out_dir / "train.log", "a", encoding="utf-8")

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
