"""The training loop shared by ddp_pretrain.py and ddp_sft_full.py, with its CLI flags, distributed setup,
progress logging and checkpointing. The two scripts only choose the dataset, defaults and initial model.

Launch: `python ddp_pretrain.py ...` is one process; `torchrun --nproc_per_node=N ddp_pretrain.py ...` is
DDP (NCCL on CUDA, gloo on CPU). Only rank 0 prints, logs and saves.

Data order. Epoch e visits the samples in a permutation seeded by (seed, e). Each optimizer step consumes
the next S = batch_size * world_size * accumulation_steps samples of it: micro-step m is the slice
[m*W*B, (m+1)*W*B) of those, of which rank r takes the r-th B-sized part. The checkpoint stores the data
position as (epoch, next sample), so a resumed run reads exactly what the interrupted run would have read.

Loss normalization. One optimizer step minimizes the mean per-token loss over every loss-masked token
that the step reads on all ranks: sum(loss * mask) / mask.sum() over the whole global batch. Each rank
learns that token count up front (one all_reduce of a scalar) and backpropagates
sum(loss * mask) * world_size / count for each micro-batch; DDP averages gradients over ranks (divides by
world_size) and accumulation adds micro-steps up, so the gradient is exactly that of the global mean.
Hence one process with batch B and N processes with batch B/N, or any other split of S between batch
size, processes and accumulation, take the same step; and SFT micro-batches holding few answer tokens are
not over-weighted, as averaging per-micro-batch means would do.

Randomness. After initialization the only randomness is dropout. The RNG is reseeded from
(seed, rank, step) before every step, so a resumed run draws the same dropout masks as an uninterrupted
one without carrying RNG states in the checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from inspect import signature
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from checkpoint import CKPT_NAME, config_to_dict, load_checkpoint, model_from_state, save_checkpoint
from dataset import tokenizer_fingerprint
from k_model import Transformer, export_hf

# Pretraining presets: model shape and per-process batch. Explicit flags override a preset's values.
PRESETS: dict[str, dict[str, Any]] = {
    # a few seconds on a laptop CPU: smoke tests, debugging
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, batch_size=16, accumulation_steps=1),
    # demo.sh's model: 1.3M parameters with its 4096-token vocabulary, about 6k tokens/s on a 2-core CPU
    "demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128, batch_size=16, accumulation_steps=1),
    # the original project's 215M model; per GPU: 32 x 512 tokens, x4 accumulation
    "215M": dict(dim=1024, n_layers=18, n_heads=16, n_kv_heads=8, max_seq_len=512, batch_size=32, accumulation_steps=4),
}
# flags that shape the network: a resumed run must use the values its checkpoint was trained with
ARCH_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "dropout")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dense 16-bit tensor-core peak TFLOP/s from vendor datasheets, matched against the CUDA device name in order
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0),
                   ("L4", 121.0), ("A10", 125.0), ("V100", 125.0), ("T4", 65.0))
NO_STEP = 2**62  # "no non-finite loss seen yet"


class TrainingError(RuntimeError):
    """The run cannot go on (the loss diverged); the last good checkpoint is left in place."""


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser(description: str, defaults: dict[str, Any], model_flags: bool) -> argparse.ArgumentParser:
    """Flags common to both trainers. `defaults` holds the script's own defaults (paths, lr, ...).
    model_flags: pretraining chooses the model shape (and --preset); SFT takes it from --init_from."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and paths")
    g.add_argument("--data_path", help="training data")
    g.add_argument("--val_data_path", help="held-out data for evaluation; evaluation is skipped if it is absent")
    g.add_argument("--tokenizer_path", default="out/tokenizer", help="tokenizer directory (sets the vocab size)")
    g.add_argument("--out_dir", help="checkpoint ckpt.pt, train.log, metrics.jsonl and the final hf/ export")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=1, help="passes over the data (when --max_steps is 0)")
    g.add_argument("--max_steps", type=int, default=0, help="optimizer steps to train; 0 = --epochs passes")
    g.add_argument("--batch_size", type=int, help="samples per micro-batch per process")
    g.add_argument("--accumulation_steps", type=int, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, help="peak learning rate (cosine decay to a tenth of it)")
    g.add_argument("--warmup_iters", type=int, help="linear warmup steps")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decay (only weights with >= 2 dims)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    g.add_argument("--seed", type=int, default=1337, help="initialization, data order and dropout")

    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="autocast dtype; auto = bfloat16 on CUDA (float16 without bf16 support) and on CPUs with "
                        "native bf16 (AVX512_BF16/AMX), else float32")
    g.add_argument("--num_threads", type=int, default=0, help="torch CPU threads per process; 0 = torch default")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log_interval", type=int, default=10, help="steps between progress lines")
    g.add_argument("--eval_interval", type=int, default=200, help="steps between evaluations; 0 = only at the end")
    g.add_argument("--eval_samples", type=int, default=512,
                   help="validation samples per evaluation (the first ones; all if fewer)")
    g.add_argument("--save_interval", type=int, default=200, help="steps between checkpoints (also saved at the end "
                                                                  "and on SIGINT/SIGTERM)")
    g.add_argument("--resume", action="store_true", help="continue exactly from out_dir/ckpt.pt")
    g.add_argument("--overwrite", action="store_true",
                   help="start a fresh run even though out_dir/ckpt.pt exists (it is replaced at the first save)")
    g.add_argument("--peak_tflops", type=float, default=0.0,
                   help="per-device peak for MFU; 0 = GPU datasheet table, or a measured matmul peak on CPU")
    g.add_argument("--use_swanlab", action="store_true", help="also log to swanlab (pip install swanlab)")
    g.add_argument("--swanlab_project", default="k-model", help="swanlab project name")
    g.add_argument("--swanlab_mode", default="offline", choices=["offline", "local", "online", "disabled"],
                   help="offline: no account or network, logs under out_dir/swanlog (`swanlab sync` uploads "
                        "them later); local: the same plus `swanlab watch` (needs pip install 'swanlab[dashboard]')")

    g = p.add_argument_group("model")
    if model_flags:
        shapes = "; ".join(f"{name}: dim {v['dim']}, {v['n_layers']} layers, seq {v['max_seq_len']}"
                           for name, v in PRESETS.items())
        g.add_argument("--preset", default="demo", choices=list(PRESETS), help=f"model shape and batch size ({shapes})")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads"):
            g.add_argument(f"--{name}", type=int, help="default from --preset")
        g.add_argument("--max_seq_len", type=int, help="tokens per sample; default from --preset")
        g.add_argument("--dropout", type=float, default=0.0)
        p.set_defaults(**PRESETS["demo"])  # so that --help shows the default preset's values
    else:
        g.add_argument("--max_seq_len", type=int, help="tokens per sample; default: the model's max_seq_len")
        g.add_argument("--dropout", type=float, help="default: the initial model's dropout")
    p.set_defaults(**defaults)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse twice: once to learn --preset, then with the preset's values as defaults."""
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    for name in ("batch_size", "accumulation_steps", "log_interval", "save_interval", "eval_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


# ----------------------------------------------------------------------------------------------------------
# Devices, precision, distributed setup


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
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
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


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX. Elsewhere bf16 matmul is emulated: ~90x slower than fp32 on an AVX2 CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpus_busy_elsewhere(seconds: float = 0.3) -> float | None:
    """How many CPUs other processes keep busy, from /proc/stat while this process sleeps (None off Linux).
    Not the load average: it lags by a minute, so right after a busy pipeline stage it still reads high."""
    def idle_and_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    try:
        idle0, total0 = idle_and_total()
        time.sleep(seconds)
        idle1, total1 = idle_and_total()
    except (OSError, ValueError, IndexError):
        return None
    return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def autocast_factory(device: torch.device, dtype: torch.dtype) -> Callable[[], AbstractContextManager]:
    """Mixed precision: weights and optimizer stay float32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def measure_matmul_flops(dtype: torch.dtype, n: int = 512, bursts: int = 10, seconds: float = 0.03) -> float:
    """Dense matmul FLOP/s of one CPU thread: the best of a few short bursts, so that other load on the
    machine during the measurement does not lower the peak (and inflate the MFU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        best = 0.0
        for _ in range(bursts):
            iters, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds or iters == 0:
                a @ b
                iters += 1
            best = max(best, 2 * n**3 * iters / elapsed)
        return best
    finally:
        torch.set_num_threads(threads)


def peak_flops(device: torch.device, dtype: torch.dtype, peak_tflops: float = 0.0) -> tuple[float | None, str]:
    """Per-device peak FLOP/s for MFU and where it comes from; (None, why) when unknown."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, "--peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"{name} datasheet 16-bit peak"
        return None, f"{name} is not in the peak table (pass --peak_tflops)"
    if device.type == "cpu":
        # the best one thread does in any dtype we might train in (on AVX2: float32), times the threads
        threads = torch.get_num_threads()
        peak = threads * max(measure_matmul_flops(d) for d in {torch.float32, dtype})
        return peak, f"measured 1-thread CPU matmul peak x {threads} threads"
    return None, f"no peak known for {device.type} (pass --peak_tflops)"


# ----------------------------------------------------------------------------------------------------------
# Data order


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class StepSampler(Sampler[list[int]]):
    """This rank's micro-batches for one epoch, from sample `start` of the epoch's permutation
    (layout in the module docstring). An incomplete last optimizer step is dropped."""

    def __init__(self, n: int, batch_size: int, accumulation_steps: int, rank: int, world_size: int,
                 seed: int, epoch: int, start: int):
        self.n, self.batch_size, self.accumulation_steps = n, batch_size, accumulation_steps
        self.rank, self.world_size, self.seed, self.epoch, self.start = rank, world_size, seed, epoch, start
        self.step_samples = batch_size * world_size * accumulation_steps
        self.num_steps = max(0, (n - start) // self.step_samples)

    def __len__(self) -> int:
        return self.num_steps * self.accumulation_steps

    def __iter__(self) -> Iterator[list[int]]:
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        B, W = self.batch_size, self.world_size
        for k in range(self.num_steps):
            base = self.start + k * self.step_samples
            for m in range(self.accumulation_steps):
                lo = base + (m * W + self.rank) * B
                yield perm[lo : lo + B].tolist()


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # X, Y (B, T) int64; loss mask (B, T) float32


def collate_trimmed(items: list[Batch]) -> Batch:
    """Stack samples, then drop the trailing columns where no sample has loss mask. The model is causal, so
    those positions cannot change the loss; right-padded SFT batches shrink to their longest answer."""
    x, y, mask = (torch.stack(t) for t in zip(*items))
    used = mask.any(dim=0).nonzero()
    keep = int(used[-1]) + 1 if len(used) else 1
    return x[:, :keep].contiguous(), y[:, :keep].contiguous(), mask[:, :keep].contiguous()


class Step(NamedTuple):
    batches: list[Batch]  # this rank's accumulation_steps micro-batches
    position: dict[str, int]  # data position after this step: {"epoch", "sample"}


def iterate_steps(dataset: Dataset, args: argparse.Namespace, d: DistInfo, position: dict[str, int]) -> Iterator[Step]:
    """Endless stream of optimizer steps from `position` on, epoch after epoch."""
    epoch, start = position["epoch"], position["sample"]
    while True:
        sampler = StepSampler(len(dataset), args.batch_size, args.accumulation_steps, d.rank, d.world_size,
                              args.seed, epoch, start)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_trimmed,
                            num_workers=args.num_workers, pin_memory=d.device.type == "cuda")
        micro = iter(loader)
        for k in range(sampler.num_steps):
            batches = [next(micro) for _ in range(args.accumulation_steps)]
            yield Step(batches, {"epoch": epoch, "sample": start + (k + 1) * sampler.step_samples})
        epoch, start = epoch + 1, 0


# ----------------------------------------------------------------------------------------------------------
# Optimization


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (embeddings, projections), not on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95),
                             fused=True if device.type == "cuda" else None)


def lr_at(step: int, peak_lr: float, warmup: int, total: int) -> float:
    """Linear warmup to peak_lr, then cosine decay to peak_lr / 10 at `total` steps."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    min_lr = peak_lr / 10
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


def step_seed(seed: int, rank: int, step: int) -> int:
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63


def masked_loss_sum(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """sum(per-token loss * mask) of one host-side batch. A partial mask (SFT: answers only) goes to the
    model, which then projects only those positions onto the vocabulary; checking it on the host, before
    the copy, keeps the all-ones pretraining mask free of a device sync."""
    x, y, mask = batch
    partial = not bool(mask.all())
    x, y, mask = (t.to(device, non_blocking=True) for t in batch)
    out = model(x, y, loss_mask=mask) if partial else model(x, y)
    return (out.last_loss * mask.reshape(-1)).sum()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches: list[Batch], *, device: torch.device, autocast: Callable[[], AbstractContextManager],
               grad_clip: float, world_size: int = 1,
               no_sync: Callable[[], AbstractContextManager] | None = None) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches (normalization in the module docstring).
    Returns this rank's share of the step's mean loss, detached, without a host sync."""
    count = torch.stack([mask.sum() for _, _, mask in batches]).sum().to(device, non_blocking=True)
    if world_size > 1:
        dist.all_reduce(count)
    scale = world_size / count.clamp(min=1)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        # gradients are all-reduced on the last micro-step only
        sync = no_sync() if no_sync is not None and i < len(batches) - 1 else nullcontext()
        with sync:
            with autocast():
                loss = masked_loss_sum(model, batch, device) * scale
            scaler.scale(loss).backward()
        total += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


@torch.no_grad()
def evaluate(model: Transformer, dataset: Dataset, batch_size: int, num_samples: int, d: DistInfo,
             autocast: Callable[[], AbstractContextManager]) -> float:
    """Token-weighted mean loss over the first num_samples samples, shared out between the ranks; the
    value does not depend on the batch size or the number of processes."""
    model.eval()
    n = min(len(dataset), num_samples)
    mine = list(range(d.rank, n, d.world_size))
    sums = torch.zeros(2, device=d.device)
    for i in range(0, len(mine), batch_size):
        batch = collate_trimmed([dataset[j] for j in mine[i : i + batch_size]])
        with autocast():
            loss = masked_loss_sum(model, batch, d.device)
        sums += torch.stack([loss, batch[2].sum().to(d.device)])
    if d.world_size > 1:
        dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[1]).item()


# ----------------------------------------------------------------------------------------------------------
# Logging and signals


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

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.swanlab is not None:
            self.swanlab.log({k: v for k, v in values.items() if v is not None}, step=step)

    def start_swanlab(self, args: argparse.Namespace, out_dir: Path) -> None:
        if not self.enabled:
            return
        try:
            import swanlab
        except ImportError as e:
            raise ImportError("--use_swanlab needs the swanlab package: pip install swanlab "
                              "(or drop --use_swanlab)") from e
        swanlab.init(project=args.swanlab_project, mode=args.swanlab_mode, log_dir=str(out_dir / "swanlog"),
                     config=vars(args))
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

    def __init__(self, announce: bool):
        self.announce = announce
        self.signum = 0

    def __enter__(self) -> StopRequest:
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.signum and self.announce:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                  "(SIGKILL aborts without saving)", file=sys.stderr, flush=True)
        self.signum = self.signum or signum

    def agreed(self, d: DistInfo) -> int:
        """The signal number if any rank was signalled, else 0; every rank gets the same answer."""
        if d.world_size == 1:
            return self.signum
        flag = torch.tensor([self.signum])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.control_group)
        return int(flag)


# ----------------------------------------------------------------------------------------------------------
# The run


class InitModel(NamedTuple):
    model: Transformer
    source: str  # for messages: "a new model", a checkpoint path, ...
    tokenizer_fingerprint: str | None  # of the tokenizer the weights were trained with; None = unknown


@dataclass(frozen=True)
class Task:
    """What pretraining and SFT do differently."""
    name: str
    dataset_cls: Callable[..., Dataset]  # (data_path, tokenizer, max_length=...) -> (X, Y, loss_mask) items
    init_model: Callable[[argparse.Namespace, Any], InitModel]  # the model a fresh (not resumed) run starts from


def load_tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer not found: {Path(path) / 'tokenizer.json'} "
                                "(run train_tokenizer.py or pass --tokenizer_path)")
    return AutoTokenizer.from_pretrained(path)


def check_tokenizer_match(init: InitModel, tokenizer: Any, fingerprint: str, tokenizer_path: str) -> None:
    """The model's vocabulary must be the tokenizer's: same size and, where known, the same tokens."""
    vocab = init.model.config.vocab_size
    if vocab != len(tokenizer):
        raise ValueError(f"{init.source}: model vocab_size={vocab} but the tokenizer at {tokenizer_path} has "
                         f"{len(tokenizer)} tokens; pass the tokenizer the model was trained with (--tokenizer_path)")
    if init.tokenizer_fingerprint not in (None, fingerprint):
        raise ValueError(f"{init.source}: tokenizer_fingerprint {init.tokenizer_fingerprint} differs from "
                         f"{fingerprint} of the tokenizer at {tokenizer_path}: same size, different tokens")


class Trainer:
    """One run: builds model, optimizer and data from the flags (or from out_dir/ckpt.pt with --resume),
    then `fit` trains to the last step, logging, evaluating and saving on the way."""

    def __init__(self, args: argparse.Namespace, task: Task, d: DistInfo, stop: StopRequest):
        self.args, self.task, self.d, self.stop = args, task, d, stop
        self.out_dir = Path(args.out_dir)
        self.ckpt_path = self.out_dir / CKPT_NAME
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.seed)
        self.log = RunLogger(self.out_dir, d.is_main)
        self.tokenizer = load_tokenizer(args.tokenizer_path)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)

        if args.resume and args.overwrite:
            raise ValueError("--resume continues out_dir/ckpt.pt, --overwrite replaces it: pass one of them")
        if not args.resume and not args.overwrite and self.ckpt_path.exists():
            # a fresh run would replace hours of training at its first save: make the user say so
            raise FileExistsError(f"{self.ckpt_path} already exists: --resume continues that run, --overwrite "
                                  f"starts over and replaces it, or choose another --out_dir")
        state = self._load_resume_state() if args.resume else None
        if state is None:
            init = task.init_model(args, self.tokenizer)
        else:
            model = model_from_state(state, self.ckpt_path)
            init = InitModel(model, str(self.ckpt_path), state["tokenizer_fingerprint"])
        check_tokenizer_match(init, self.tokenizer, self.fingerprint, args.tokenizer_path)
        self.model_source = init.source
        model = init.model
        for name in ("max_seq_len", "dropout"):  # SFT leaves these to the model unless given
            if getattr(args, name) is None:
                setattr(args, name, getattr(model.config, name))
        if args.max_seq_len > model.config.max_seq_len:
            raise ValueError(f"--max_seq_len {args.max_seq_len} exceeds the model's max_seq_len "
                             f"{model.config.max_seq_len} ({init.source})")

        self.dtype = resolve_dtype(args.dtype, d.device)
        self.autocast = autocast_factory(d.device, self.dtype)
        self.model = model.to(d.device).train()
        self.optimizer = make_optimizer(self.model, args, d.device)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.dtype == torch.float16)
        self.step, self.position = 0, {"epoch": 0, "sample": 0}
        self.last_saved_step: int | None = None
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.step, self.position = state["step"], dict(state["data_position"])
            self.last_saved_step = self.step
        del state

        self.train_set = task.dataset_cls(args.data_path, self.tokenizer, max_length=args.max_seq_len)
        self.val_set = None
        if args.val_data_path and Path(args.val_data_path).exists():
            self.val_set = task.dataset_cls(args.val_data_path, self.tokenizer, max_length=args.max_seq_len)
        self.step_samples = args.batch_size * d.world_size * args.accumulation_steps
        self.steps_per_epoch = len(self.train_set) // self.step_samples
        if self.steps_per_epoch == 0:
            raise ValueError(f"{args.data_path}: {len(self.train_set)} samples are fewer than one optimizer step "
                             f"reads (batch_size x processes x accumulation_steps = {self.step_samples})")
        self.total_steps = args.max_steps or args.epochs * self.steps_per_epoch

        self.ddp = None
        if d.world_size > 1:
            # the rotary tables are the only buffers and identical on every rank: no need to sync them
            # before each forward (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
            ddp_flags = signature(DistributedDataParallel).parameters
            sync_flag = "forward_sync_buffers" if "forward_sync_buffers" in ddp_flags else "broadcast_buffers"
            device_ids = [d.device.index] if d.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids, **{sync_flag: False})
        self.forward_model = self.ddp or self.model
        if args.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.flops_per_token = self.model.flops_per_token(args.max_seq_len)
        self.peak, self.peak_source = peak_flops(d.device, self.dtype, args.peak_tflops) if d.is_main else (None, "")
        self.log.start_metrics(self.step if args.resume else None)
        if args.use_swanlab:
            self.log.start_swanlab(args, self.out_dir)
        self.bad_step = torch.full((), NO_STEP, device=d.device)
        self._log_header(args.resume)

    def _load_resume_state(self) -> dict[str, Any]:
        state = load_checkpoint(self.ckpt_path)
        missing = [k for k in ("optimizer", "data_position", "args") if k not in state]
        if missing:
            raise ValueError(f"{self.ckpt_path}: cannot resume, checkpoint is missing key(s) {missing}")
        saved = state["args"]
        for name in ARCH_FLAGS:
            asked = getattr(self.args, name, None)
            if asked is not None and name in saved and saved[name] != asked:
                raise ValueError(f"{self.ckpt_path}: checkpoint was trained with --{name} {saved[name]}, "
                                 f"this run asks for --{name} {asked}; resume with the same value")
        return state

    def _log_header(self, resumed: bool) -> None:
        a, d, cfg = self.args, self.d, self.model.config
        tokens_per_step = self.step_samples * a.max_seq_len
        self.log.info(f"=== {self.task.name}: {d.world_size} process(es) on {d.device.type}, dtype "
                      f"{str(self.dtype).removeprefix('torch.')}, {torch.get_num_threads()} torch threads/process")
        self.log.info(f"model: {self.model.num_params() / 1e6:.2f}M params from {self.model_source}; vocab "
                      f"{cfg.vocab_size}, dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads "
                      f"({cfg.n_kv_heads} kv), dropout {cfg.dropout}")
        self.log.info(f"data: {a.data_path}: {len(self.train_set):,} samples x {a.max_seq_len} tokens; "
                      f"{self.step_samples} samples (<= {tokens_per_step:,} tokens) per step; "
                      f"{self.steps_per_epoch:,} steps/epoch; training to step {self.total_steps:,}")
        if self.val_set is None:
            self.log.info(f"no validation data at {a.val_data_path}: evaluation skipped")
        if resumed:
            self.log.info(f"resumed from {self.ckpt_path} at step {self.step} (epoch {self.position['epoch']}, "
                          f"sample {self.position['sample']})")
        elif self.ckpt_path.exists():
            self.log.info(f"note: --overwrite: starting fresh; the first save replaces {self.ckpt_path}")
        threads = torch.get_num_threads()
        if d.is_main and d.device.type == "cpu" and threads > 1:  # only rank 0 logs: only it measures
            busy = cpus_busy_elsewhere()
            if busy is not None and busy + threads > (os.cpu_count() or 1) + 0.5:
                self.log.info(f"note: other processes keep {busy:.1f} of {os.cpu_count()} CPUs busy: "
                              f"{threads} threads per process can be several times slower than --num_threads 1")
        if self.peak is not None:
            self.log.info(f"MFU against {self.peak / 1e12:.3g} TFLOP/s per device ({self.peak_source})")
        elif d.is_main:
            self.log.info(f"MFU not shown: {self.peak_source}")

    # -- loop ----------------------------------------------------------------------------------------------

    def fit(self) -> None:
        a, d = self.args, self.d
        steps = iterate_steps(self.train_set, a, d, self.position)
        no_sync = self.ddp.no_sync if self.ddp is not None else None
        # disable=None: no bar when stderr is not a terminal (CI, nohup); log lines still print
        bar = tqdm(total=self.total_steps, initial=self.step, disable=None if d.is_main else True, unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        self._reset_window()
        try:
            while self.step < self.total_steps:
                batch = next(steps)
                lr = lr_at(self.step, a.learning_rate, a.warmup_iters, self.total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                torch.manual_seed(step_seed(a.seed, d.rank, self.step))
                loss = train_step(self.forward_model, self.optimizer, self.scaler, batch.batches, device=d.device,
                                  autocast=self.autocast, grad_clip=a.grad_clip, world_size=d.world_size,
                                  no_sync=no_sync)
                self.step += 1
                self.position = batch.position
                self.bad_step = torch.minimum(self.bad_step, torch.where(torch.isfinite(loss), NO_STEP, self.step))
                self.win_loss += loss
                self.win_tokens += sum(x.numel() for x, _, _ in batch.batches)
                self.win_steps += 1
                bar.update()

                stop = self.stop.agreed(d)
                end = self.step == self.total_steps
                if self.step % a.log_interval == 0 or end or stop:
                    self._log_progress(lr, bar)
                if (a.eval_interval and self.step % a.eval_interval == 0 or end) and not stop:
                    self._evaluate()
                if self.step % a.save_interval == 0 or end or stop:
                    self._save()
                if stop:
                    self.log.info(f"stopped by {signal.Signals(stop).name} at step {self.step}; "
                                  f"resume with --resume")
                    raise SystemExit(128 + stop)
            if d.is_main:
                self._export_hf()
        finally:
            bar.close()
            self.log.close()

    def _reset_window(self) -> None:
        self.win_loss = torch.zeros((), device=self.d.device)
        self.win_tokens, self.win_steps = 0, 0
        self.win_start = time.perf_counter()

    def _check_finite(self, weights: bool = False) -> None:
        """Raise if a step's loss was nan/inf (one host sync, at log and save points only). weights=True
        also checks the parameters, which the latest update changed after the last loss was computed:
        a checkpoint is only written when its weights are finite."""
        bad = self.bad_step.clone()
        if weights:
            finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
            bad = torch.where(finite, bad, torch.clamp(bad, max=self.step))
        if self.d.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        if int(bad) != NO_STEP:
            kept = (f"kept the last good checkpoint {self.ckpt_path} (step {self.last_saved_step})"
                    if self.last_saved_step is not None else "no checkpoint was saved")
            remedies = ["a lower --learning_rate"] + (["--grad_clip 1.0"] if not self.args.grad_clip else []) \
                + (["--dtype float32"] if self.dtype != torch.float32 else [])
            msg = f"loss or weights became nan/inf at step {int(bad)}: stopping, {kept}. Try {' or '.join(remedies)}"
            self.log.info(msg, console=False)  # main() prints it as the exit message
            raise TrainingError(msg)

    def _log_progress(self, lr: float, bar: tqdm) -> None:
        self._check_finite()
        d = self.d
        stats = torch.stack([self.win_loss, torch.tensor(float(self.win_tokens), device=d.device)])
        if d.world_size > 1:
            dist.all_reduce(stats)
        loss_sum, tokens = stats.tolist()
        loss = loss_sum / d.world_size / self.win_steps  # each rank holds its share (see train_step)
        seconds = time.perf_counter() - self.win_start
        tok_s = tokens / seconds
        mfu = tok_s * self.flops_per_token / (self.peak * d.world_size) if self.peak else None
        mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
        bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s mfu {mfu_text}", refresh=False)
        self.log.info(f"step {self.step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                      f"mfu {mfu_text} | {1000 * seconds / self.win_steps:.0f} ms/step")
        self.log.metrics(self.step, {"loss": loss, "lr": lr, "tok_per_s": tok_s, "mfu": mfu,
                                     "epoch": self.position["epoch"]})
        self._reset_window()

    def _evaluate(self) -> None:
        if self.val_set is None:
            return
        start = time.perf_counter()
        loss = evaluate(self.model, self.val_set, self.args.batch_size, self.args.eval_samples, self.d, self.autocast)
        ppl = math.exp(min(loss, 50.0))
        self.log.info(f"eval step {self.step} | val loss {loss:.4f} | val ppl {ppl:.2f}")
        self.log.metrics(self.step, {"val_loss": loss, "val_ppl": ppl})
        self.win_start += time.perf_counter() - start  # keep evaluation out of tokens/s

    def _save(self) -> None:
        self._check_finite(weights=True)
        if self.d.is_main:
            save_checkpoint(self.ckpt_path, {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "step": self.step,
                "data_position": self.position,
                "args": vars(self.args),
                "model_config": config_to_dict(self.model.config),
                "vocab_size": self.model.config.vocab_size,
                "tokenizer_fingerprint": self.fingerprint,
                "world_size": self.d.world_size,
            })
            self.log.info(f"saved {self.ckpt_path} (step {self.step})")
        self.last_saved_step = self.step

    def _export_hf(self) -> None:
        """Final weights as a Llama model + tokenizer that AutoModelForCausalLM / AutoTokenizer open."""
        hf_dir = self.out_dir / "hf"
        cfg, tok = self.model.config, self.tokenizer
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        export_hf(self.model, hf_dir)
        tok.save_pretrained(hf_dir)
        self.log.info(f"exported {hf_dir} (AutoModelForCausalLM / AutoTokenizer)")


def train(args: argparse.Namespace, task: Task) -> None:
    """Run one training job (single process or one torchrun rank) to the end, or until stopped."""
    d = setup_distributed(args.device)
    try:
        with StopRequest(announce=d.is_main) as stop:
            Trainer(args, task, d, stop).fit()
    except BaseException as e:
        if d.world_size > 1:
            traceback.clear_frames(e.__traceback__)  # the frames' locals hold the DDP model: see below
        raise
    finally:
        if dist.is_initialized():
            # Free the DDP model before its process group. Otherwise the group dies last, from DDP's C++
            # reducer, which joins gloo's worker threads while holding the GIL: a deadlock whenever a worker
            # still needs the GIL to release a tensor (seen as a hung rank at exit; pytorch issue 56297).
            gc.collect()
            dist.destroy_process_group()


def main(task: Task, parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """Script entry point: bad input (missing, corrupt or mismatched files, an occupied out_dir) and a diverged
    run end with their one-line message, which names the file or step, and exit status 1."""
    args = parse_args(parser, argv)
    try:
        train(args, task)
    except (TrainingError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
