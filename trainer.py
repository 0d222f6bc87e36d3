"""The training loop shared by every training script, and its command-line flags.

A script (ddp_pretrain.py, ddp_sft_full.py) subclasses `Task`: it names its defaults and says which model a
fresh run starts from, what its dataset is, the loss on a batch and which parameters train. Everything else
is here: flags, data order, optimization, evaluation, checkpoints, logs. Around it, trainer_utils.py holds the
process group, logging and Ctrl-C handling; checkpoint.py the checkpoint file; loading.py tokenizer and dtype.

Data order. Epoch e visits the samples in a permutation seeded by (seed, e). Each optimizer step consumes
the next S = batch_size * world_size * accumulation_steps samples of it: micro-step m is the slice
[m*W*B, (m+1)*W*B) of those, of which rank r takes the r-th B-sized part. The checkpoint stores the data
position as (epoch, next sample), so a resumed run reads exactly what the interrupted run would have read,
even with another batch size or process count (then only the step boundaries move).

Loss normalization. One optimizer step minimizes the mean loss over every loss unit (a target token; a
preference pair) that the step reads on all ranks: sum(loss * mask) / mask.sum() over the whole global batch.
Each rank learns that count up front (one all_reduce of a scalar) and backpropagates
sum(loss * mask) * world_size / count for each micro-batch; DDP averages gradients over ranks (divides by
world_size) and accumulation adds micro-steps up, so the gradient is exactly that of the global mean.
Hence one process with batch B and N processes with batch B/N, or any other split of S between batch
size, processes and accumulation, take the same step; and SFT micro-batches holding few answer tokens are
not over-weighted, as averaging per-micro-batch means would do.

Randomness. After initialization the only randomness is dropout. The RNG is reseeded from
(seed, rank, step) before every step, so a resumed run draws the same dropout masks as an uninterrupted
one without carrying RNG states in the checkpoint.

Flags. train_flags.py defines them and resolves each value: the command line; on --resume, the flags saved in
the checkpoint (except per-launch ones); the --preset; the script's Task.defaults; the shared defaults. Flags
left unset by all of them (SFT's --max_seq_len, --dropout) are the initial model's. train.log lists each
value with where it came from.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from inspect import signature
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from checkpoint import (CKPT_NAME, DEFAULT_TOKENIZER, config_to_dict, load_checkpoint, model_from_state,
                        save_checkpoint)
from dataset import document_start_ids
from k_model import copy_token_ids, export_hf
from loading import SourcedModel, check_model_tokenizer, load_tokenizer, resolve_dtype, tokenizer_fingerprint
from optim import lr_at, make_optimizer
from perf import CpuShare, peak_flops
from plot_runs import draw_curves
from train_flags import build_parser, check_args, check_resume_flags, resolve_args
from trainer_utils import DistInfo, RunLogger, StopRequest, iterate_steps, setup_distributed, steps_left

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # X, Y (B, T) int64; loss mask (B, T) float32


class TrainingError(RuntimeError):
    """The run cannot go on (the loss diverged); the last good checkpoint is left in place."""


# ----------------------------------------------------------------------------------------------------------
# What a training objective supplies


def collate_trimmed(items: list[Batch]) -> Batch:
    """Stack samples, then drop the trailing columns where no sample has loss mask. The model is causal, so
    those positions cannot change the loss; right-padded SFT batches shrink to their longest answer."""
    x, y, mask = (torch.stack(t) for t in zip(*items))
    used = mask.any(dim=0).nonzero()
    keep = int(used[-1]) + 1 if len(used) else 1
    return x[:, :keep].contiguous(), y[:, :keep].contiguous(), mask[:, :keep].contiguous()


def masked_loss_sum(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """sum(per-token loss * mask) of one host-side batch. A partial mask (SFT: answers only) goes to the
    model, which then projects only those positions onto the vocabulary; checking it on the host, before
    the copy, keeps the all-ones pretraining mask free of a device sync."""
    x, y, mask = batch
    partial_mask = not bool(mask.all())
    x, y, mask = (t.to(device, non_blocking=True) for t in batch)
    out = model(x, y, loss_mask=mask) if partial_mask else model(x, y)
    return (out.last_loss * mask.reshape(-1)).sum()


class Task:
    """A training objective. The base class is next-token prediction on (X, Y, loss_mask) items; a script
    overrides what differs. Methods get the resolved flags `args`."""

    name = "train"
    description = ""  # the script's --help text
    defaults: dict[str, Any] = {}  # the script's flag defaults (paths, learning rate, ...)
    builds_model = False  # True: the run makes a new model, so --preset and the shape flags exist
    # True when a sample can lack targets (an SFT answer cut off by --max_seq_len): checked at start-up
    may_lack_targets = False
    metrics = ("loss",)  # the keys of loss_sums and prepare_step's extra metrics
    eval_at_start = False  # True: a fresh run also evaluates the model it starts from, as step 0

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        """Flags of this script only."""

    def tokenizer(self, args: argparse.Namespace) -> tuple[Any, str]:
        """The run's tokenizer and the directory it comes from, which the checkpoint records as
        --tokenizer_path (a resumed run reads the same one). A script that starts from a trained model makes
        that model's own tokenizer the default; a chat objective may add a chat template to it."""
        path = args.tokenizer_path or DEFAULT_TOKENIZER
        return load_tokenizer(path), path

    def initial_model(self, args: argparse.Namespace, tokenizer: Any) -> SourcedModel:
        """The model a fresh (not resumed) run starts from."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, args: argparse.Namespace, tokenizer: Any, device: torch.device) -> None:
        """Called once the model to train is on its device, fresh or resumed: set up what the loss needs
        besides it (DPO: the frozen reference model)."""

    def dataset(self, path: str, tokenizer: Any, args: argparse.Namespace) -> Dataset:
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Any:
        return collate_trimmed(items)

    def prepare_step(self, model: torch.nn.Module, batches: list[Any], step: int
                     ) -> tuple[list[Any], dict[str, torch.Tensor]]:
        """This rank's micro-batches as the step trains on them, made with the model as it is before the step
        (GRPO samples and scores completions here), and metrics of the step that loss_sums does not give
        (the progress line shows their mean over ranks). Default: the batches as read, no metrics."""
        return batches, {}

    def loss_units(self, batch: Any) -> torch.Tensor:
        """How many loss units a host-side batch holds (the normalization count), without a device sync."""
        return batch[2].sum()

    def batch_tokens(self, batch: Any) -> int:
        """Tokens the model reads for a batch (for tokens/s and MFU)."""
        return batch[0].numel()

    def loss_sums(self, model: torch.nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """Sums over the batch's loss units: "loss" (backpropagated) and any other metric to report as a mean."""
        return {"loss": masked_loss_sum(model, batch, device)}

    def prompt_ids(self, tokenizer: Any, prompt: str) -> list[int]:
        """The ids a --sample_prompt continues at each evaluation: a document start (pretraining documents
        follow the previous one's EOS); chat objectives put the prompt in the chat template instead."""
        return document_start_ids(tokenizer, prompt)

    def val_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """What an evaluation reports, from the mean of each loss_sums entry over the validation samples."""
        return {"val_loss": means["loss"], "val_ppl": math.exp(min(means["loss"], 50.0))}

    def validate(self, model: torch.nn.Module, dataset: Dataset, args: argparse.Namespace, d: DistInfo,
                 autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
        """An evaluation's metrics on the validation set (every rank calls it): by default val_metrics of the
        loss_sums means over its first --eval_samples samples."""
        return self.val_metrics(evaluate(model, dataset, args.batch_size, args.eval_samples, d, autocast, self))

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def model_state(self, model: torch.nn.Module) -> dict[str, Any]:
        """What a checkpoint stores of the model: every weight, under "model". A task that trains a small part
        of a model it can rebuild (LoRA adapters on a base named in the checkpoint) stores only that part and
        what rebuilding needs; checkpoint.model_from_state rebuilds the model from it on --resume."""
        return {"model": model.state_dict()}

    def export(self, model: torch.nn.Module, out_dir: Path, tokenizer: Any) -> Path:
        """The final weights as a Llama model + tokenizer that AutoModelForCausalLM / AutoTokenizer open."""
        hf_dir = out_dir / "hf"
        copy_token_ids(model.config, tokenizer)
        export_hf(model, hf_dir)
        tokenizer.save_pretrained(hf_dir)
        return hf_dir


# ----------------------------------------------------------------------------------------------------------
# Optimization (optim.py: the optimizer and the learning-rate schedule)


def peak_memory(device: torch.device) -> str:
    """The most memory this process has held: what tensors allocated on a GPU; on a CPU the peak resident set
    (tensors, Python and the libraries alike: compare runs, not the model's size)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB allocated on {device}"
    import resource  # Unix only: imported where it is needed

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB resident (CPU peak RSS)"


def step_seed(seed: int, rank: int, step: int) -> int:
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63


def dtype_names(dtypes: set[torch.dtype]) -> str:
    return ", ".join(sorted(str(t).removeprefix("torch.") for t in dtypes))


def autocast_factory(device: torch.device, dtype: torch.dtype) -> Callable[[], AbstractContextManager]:
    """Mixed precision: trained weights and optimizer state stay float32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches: list[Any], *, device: torch.device, autocast: Callable[[], AbstractContextManager],
               grad_clip: float, world_size: int = 1, no_sync: Callable[[], AbstractContextManager] | None = None,
               task: Task | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step over this rank's micro-batches (normalization in the module docstring). Returns
    this rank's share of the step's mean of each loss_sums entry, detached, without a host sync."""
    task = task or Task()
    count = torch.stack([task.loss_units(b) for b in batches]).sum().to(device, non_blocking=True)
    if world_size > 1:
        dist.all_reduce(count)
    scale = world_size / count.clamp(min=1)
    totals: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        # gradients are all-reduced on the last micro-step only
        sync = no_sync() if no_sync is not None and i < len(batches) - 1 else nullcontext()
        with sync:
            with autocast():
                sums = {k: v * scale for k, v in task.loss_sums(model, batch, device).items()}
            scaler.scale(sums["loss"]).backward()
        for k, v in sums.items():
            totals[k] = totals.get(k, 0) + v.detach().float()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return totals


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, batch_size: int, num_samples: int, d: DistInfo,
             autocast: Callable[[], AbstractContextManager], task: Task | None = None) -> dict[str, float]:
    """Mean of each loss_sums entry per loss unit over the first num_samples samples, shared out between the
    ranks; the values do not depend on the batch size or the number of processes."""
    task = task or Task()
    model.eval()
    n = min(len(dataset), num_samples)
    mine = list(range(d.rank, n, d.world_size))
    stats = torch.zeros(1 + len(task.metrics), device=d.device)  # loss units, then each metric's sum
    for i in range(0, len(mine), batch_size):
        batch = task.collate([dataset[j] for j in mine[i : i + batch_size]])
        with autocast():
            sums = task.loss_sums(model, batch, d.device)
        stats += torch.stack([task.loss_units(batch).to(d.device), *(sums[k].float() for k in task.metrics)])
    if d.world_size > 1:
        dist.all_reduce(stats)
    model.train()
    units, *values = stats.tolist()
    return {k: v / units if units else math.nan for k, v in zip(task.metrics, values)}


def count_without_targets(dataset: Dataset, task: Task, limit: int) -> tuple[int, int]:
    """(samples without a single loss unit, samples checked) among the first `limit` of `dataset`."""
    checked = min(len(dataset), limit)
    empty = sum(1 for i in range(checked) if not task.loss_units(task.collate([dataset[i]])))
    return empty, checked


# ----------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Window:
    """The steps since the last progress line: their loss means stay on the device until it is printed."""
    means: list[dict[str, torch.Tensor]] = field(default_factory=list)
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)


class Trainer:
    """One run: resolves the flags, builds model, optimizer and data (or restores them from out_dir/ckpt.pt
    with --resume), then `fit` trains to the last step, logging, evaluating and saving on the way."""

    def __init__(self, given: argparse.Namespace, task: Task, d: DistInfo, stop: StopRequest):
        self.task, self.d, self.stop = task, d, stop
        args, sources = resolve_args(given, task)
        self.out_dir = Path(args.out_dir)
        self.ckpt_path = self.out_dir / CKPT_NAME
        state = self._resume_state(given, args)
        if state is not None:
            args, sources = resolve_args(given, task, state["args"])
        check_args(args)
        if args.eval_tasks:  # an unknown task or bad task data stops the run now, not at its first evaluation
            import eval_model  # lm-eval is imported only by runs that ask for its tasks

            eval_model.task_names(args.eval_tasks)
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.seed)
        self.log = RunLogger(self.out_dir, d.is_main)
        self.tokenizer, tokenizer_path = task.tokenizer(args)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)

        self.dtype = resolve_dtype(args.dtype, d.device)
        start = self._initial_model(args, state)
        check_model_tokenizer(start, self.tokenizer, tokenizer_path)
        self.args, self.sources = self._with_loaded_values(args, sources, start, tokenizer_path)
        self.model_source = start.source
        self.model = start.model.to(d.device).train()
        task.prepare(self.model, self.args, self.tokenizer, d.device)
        self.autocast = autocast_factory(d.device, self.dtype)
        self.optimizer_params = task.trainable_parameters(self.model)
        self.optimizer = make_optimizer(self.model, self.optimizer_params, self.args, d.device)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.dtype == torch.float16)
        self.step, self.position, self.last_saved_step = 0, {"epoch": 0, "sample": 0}, None
        if state is not None:
            self._restore(state)
        del state

        self.train_set, self.val_set = self._datasets()
        self.step_samples = self.args.batch_size * d.world_size * self.args.accumulation_steps
        self.steps_per_epoch = len(self.train_set) // self.step_samples
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.args.data_path}: {len(self.train_set)} samples are fewer than one optimizer "
                             f"step reads (batch_size x processes x accumulation_steps = {self.step_samples})")
        # under --epochs the end is a data position, so a resumed run with another batch size or process
        # count still reads exactly the rest of the data
        self.total_steps = self.args.max_steps or self.step + steps_left(
            len(self.train_set), self.step_samples, self.position, self.args.epochs)
        self.ddp, self.forward_model = self._wrap_model()
        self.flops_per_token = self.model.flops_per_token(self.args.max_seq_len)
        self.peak, self.peak_source = (peak_flops(d.device, self.dtype, self.args.peak_tflops) if d.is_main
                                       else (None, ""))
        self.log.start_metrics(self.step if self.args.resume else None)
        if self.args.use_swanlab:
            self.log.start_swanlab(self.args.swanlab_project, self.args.swanlab_mode, self.out_dir, vars(self.args))
        self.curves_note_given = False
        watch_cpu = d.is_main and d.device.type == "cpu" and not self.args.num_workers
        self.cpu_share = CpuShare() if watch_cpu else None
        self.window = Window()
        self._log_header()

    # -- set-up --------------------------------------------------------------------------------------------

    def _resume_state(self, given: argparse.Namespace, args: argparse.Namespace) -> dict[str, Any] | None:
        """The checkpoint to resume from (None for a fresh run), after the rules that keep work from being lost."""
        if args.resume and args.overwrite:
            raise ValueError("--resume continues out_dir/ckpt.pt, --overwrite replaces it: pass one of them")
        if not args.resume:
            if not args.overwrite and self.ckpt_path.exists():
                # a fresh run would replace hours of training at its first save: make the user say so
                raise FileExistsError(f"{self.ckpt_path} already exists: --resume continues that run, --overwrite "
                                      f"starts over and replaces it, or choose another --out_dir")
            return None
        state = load_checkpoint(self.ckpt_path)
        missing = [k for k in ("optimizer", "data_position", "args") if k not in state]
        if missing:
            raise ValueError(f"{self.ckpt_path}: cannot resume, checkpoint is missing key(s) {missing}")
        check_resume_flags(given, state["args"], self.ckpt_path)
        return state

    def _initial_model(self, args: argparse.Namespace, state: dict[str, Any] | None) -> SourcedModel:
        if state is None:
            start = self.task.initial_model(args, self.tokenizer)
        else:
            start = SourcedModel(model_from_state(state, self.ckpt_path), str(self.ckpt_path),
                                 state["tokenizer_fingerprint"])
        stored = {p.dtype for p in start.model.parameters() if p.is_floating_point()} - {torch.float32}
        if stored:
            # master weights and AdamW state in float32 whatever the source stored; autocast does the rest.
            # Frozen weights (a LoRA base) keep their dtype when autocast computes in 16 bits anyway: float32
            # copies would double a large base's memory. Float32 compute needs float32 weights.
            keep_frozen = self.dtype != torch.float32
            for p in start.model.parameters():
                if p.is_floating_point() and (p.requires_grad or not keep_frozen):
                    p.data = p.data.float()
            kept = {p.dtype for p in start.model.parameters() if p.is_floating_point()} - {torch.float32}
            self.log.info(f"note: {start.source} stores {dtype_names(stored)} weights: training float32 master "
                          "weights" + (f", frozen weights kept in {dtype_names(kept)}" if kept else ""))
        return start

    @staticmethod
    def _with_loaded_values(args: argparse.Namespace, sources: dict[str, str], start: SourcedModel,
                            tokenizer_path: str) -> tuple[argparse.Namespace, dict[str, str]]:
        """The final flags: the tokenizer directory Task.tokenizer chose (the checkpoint records it, so a resumed
        run reads the same one), and for flags no layer set (SFT's max_seq_len, dropout) the model's values."""
        config = start.model.config
        values = {**vars(args), "tokenizer_path": tokenizer_path}
        sources = {**sources, "tokenizer_path": sources["tokenizer_path"] if args.tokenizer_path else "the task"}
        for name in ("max_seq_len", "dropout"):
            if values[name] is None:
                values[name] = getattr(config, name)
        if values["max_seq_len"] > config.max_seq_len:
            raise ValueError(f"--max_seq_len {values['max_seq_len']} exceeds the model's max_seq_len "
                             f"{config.max_seq_len} ({start.source})")
        return argparse.Namespace(**values), sources

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # another optimizer's state, or another set of trainable parameters
            raise ValueError(f"{self.ckpt_path}: cannot resume: {e}") from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.position = state["step"], dict(state["data_position"])
        self.last_saved_step = self.step

    def _datasets(self) -> tuple[Dataset, Dataset | None]:
        a = self.args
        train_set = self.task.dataset(a.data_path, self.tokenizer, a)
        val_set = None
        if a.val_data_path and Path(a.val_data_path).exists():
            val_set = self.task.dataset(a.val_data_path, self.tokenizer, a)
        if self.task.may_lack_targets:
            self._check_targets(train_set, a.data_path, limit=10_000)
            if val_set is not None:
                self._check_targets(val_set, a.val_data_path, limit=a.eval_samples)
        return train_set, val_set

    def _check_targets(self, dataset: Dataset, path: str, limit: int) -> None:
        """Warn about samples that teach nothing (their answer is cut off); refuse data where none is left."""
        empty, checked = count_without_targets(dataset, self.task, limit)
        what = f"of the first {checked:,} samples" if checked < len(dataset) else f"of its {checked:,} samples"
        if empty == checked:
            raise ValueError(f"{path}: none {what} has a target token within --max_seq_len {self.args.max_seq_len} "
                             f"(every answer is cut off): raise --max_seq_len or shorten the prompts")
        if empty:
            self.log.info(f"warning: {path}: {empty:,} {what} ({empty / checked:.1%}) have no target token within "
                          f"--max_seq_len {self.args.max_seq_len} (their answers are cut off) and teach nothing")

    def _wrap_model(self) -> tuple[DistributedDataParallel | None, torch.nn.Module]:
        ddp = None
        if self.d.world_size > 1:
            # the rotary tables are the only buffers and identical on every rank: no need to sync them
            # before each forward (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
            ddp_flags = signature(DistributedDataParallel).parameters
            sync_flag = "forward_sync_buffers" if "forward_sync_buffers" in ddp_flags else "broadcast_buffers"
            device_ids = [self.d.device.index] if self.d.device.type == "cuda" else None
            ddp = DistributedDataParallel(self.model, device_ids=device_ids, **{sync_flag: False})
        forward_model = ddp or self.model
        if self.args.compile:
            forward_model = torch.compile(forward_model)
        return ddp, forward_model

    def _log_header(self) -> None:
        a, d, cfg = self.args, self.d, self.model.config
        tokens_per_step = self.step_samples * a.max_seq_len
        self.log.info(f"=== {self.task.name}: {d.world_size} process(es) on {d.device.type}, dtype "
                      f"{str(self.dtype).removeprefix('torch.')}, {torch.get_num_threads()} torch threads/process")
        params, trainable = self.model.num_params(), sum(p.numel() for p in self.optimizer_params)
        frozen = f" ({trainable:,} trainable: {trainable / params:.2%})" if trainable != params else ""
        self.log.info(f"model: {params / 1e6:.2f}M params{frozen} from {self.model_source}; vocab "
                      f"{cfg.vocab_size}, dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads "
                      f"({cfg.n_kv_heads} kv), dropout {cfg.dropout}")
        decay = f", decay over the last {a.decay_fraction:.0%} of the steps" if a.lr_schedule == "wsd" else ""
        self.log.info(f"optimizer: {self.optimizer.describe()}; {a.lr_schedule} schedule, "
                      f"warmup {a.warmup_iters}{decay}")
        self.log.info(f"data: {a.data_path}: {len(self.train_set):,} samples x {a.max_seq_len} tokens; "
                      f"{self.step_samples} samples (<= {tokens_per_step:,} tokens) per step; "
                      f"{self.steps_per_epoch:,} steps/epoch; training to step {self.total_steps:,}")
        self.log.info("flags: " + ", ".join(f"{k}={v!r} ({self.sources[k]})" for k, v in sorted(vars(a).items())),
                      console=False)
        if self.val_set is None:
            self.log.info(f"no validation data at {a.val_data_path}: evaluation skipped")
        if a.resume:
            from_ckpt = sorted(k for k, s in self.sources.items() if s == "checkpoint")
            self.log.info(f"resumed from {self.ckpt_path} at step {self.step} (epoch {self.position['epoch']}, "
                          f"sample {self.position['sample']}); {len(from_ckpt)} flags from the checkpoint")
        elif self.ckpt_path.exists():
            self.log.info(f"note: --overwrite: starting fresh; the first save replaces {self.ckpt_path}")
        if self.peak is not None:
            self.log.info(f"MFU against {self.peak / 1e12:.3g} TFLOP/s per device ({self.peak_source})")
        elif d.is_main:
            self.log.info(f"MFU not shown: {self.peak_source}")

    # -- loop ----------------------------------------------------------------------------------------------

    def fit(self) -> None:
        a, d = self.args, self.d
        steps = iterate_steps(self.train_set, self.task.collate, a, d, self.position)
        no_sync = self.ddp.no_sync if self.ddp is not None else None
        # disable=None: no bar when stderr is not a terminal (CI, nohup); log lines still print
        bar = tqdm(total=self.total_steps, initial=self.step, disable=None if d.is_main else True, unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        try:
            if self.step == 0 and self.task.eval_at_start and self.val_set is not None:
                self._evaluate()
            while self.step < self.total_steps:
                batch = next(steps)
                lrs = self.optimizer.set_lr(partial(lr_at, self.step, warmup=a.warmup_iters, total=self.total_steps,
                                                    schedule=a.lr_schedule, decay_fraction=a.decay_fraction))
                torch.manual_seed(step_seed(a.seed, d.rank, self.step))
                batches, extra = self.task.prepare_step(self.model, batch.batches, self.step)
                means = train_step(self.forward_model, self.optimizer, self.scaler, batches, device=d.device,
                                   autocast=self.autocast, grad_clip=a.grad_clip, world_size=d.world_size,
                                   no_sync=no_sync, task=self.task)
                self.step += 1
                self.position = batch.position
                self.window.means.append({**means, **extra})
                self.window.tokens += sum(self.task.batch_tokens(b) for b in batches)
                bar.update()

                stop = self.stop.agreed(d)
                end = self.step == self.total_steps
                if self.step % a.log_interval == 0 or end or stop:
                    self._log_progress(lrs, bar)
                if (a.eval_interval and self.step % a.eval_interval == 0 or end) and not stop:  # after progress
                    self._evaluate()
                if self.step % a.save_interval == 0 or end or stop:
                    self._save()
                if stop:
                    self.log.info(f"stopped by {signal.Signals(stop).name} at step {self.step}; "
                                  f"resume with --resume")
                    raise SystemExit(128 + stop)
            self.log.info(f"peak memory: {peak_memory(d.device)}")
            if d.is_main:
                self._export_hf()
        finally:
            bar.close()
            self.log.close()

    def _check_finite(self, weights: bool = False) -> None:
        """Raise if a step's loss was nan/inf (one host sync, at log and save points only; every step is in
        a window that is checked before it is logged). weights=True also checks the parameters, which the
        latest update changed after the last loss was computed: a checkpoint is only written when its weights
        are finite."""
        steps = self.window.means
        losses = torch.stack([m["loss"] for m in steps]) if steps else torch.zeros(0)
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        first_bad = self.step - len(steps) + 1 + bad[0] if bad else self.total_steps + 1
        if weights and not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            first_bad = min(first_bad, self.step)
        if self.d.world_size > 1:  # every rank must agree to stop
            flag = torch.tensor([first_bad])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.d.control_group)
            first_bad = int(flag)
        if first_bad <= self.total_steps:
            kept = (f"kept the last good checkpoint {self.ckpt_path} (step {self.last_saved_step})"
                    if self.last_saved_step is not None else "no checkpoint was saved")
            remedies = ["a lower --learning_rate"] + (["--grad_clip 1.0"] if not self.args.grad_clip else []) \
                + (["--dtype float32"] if self.dtype != torch.float32 else [])
            msg = f"loss or weights became nan/inf at step {first_bad}: stopping, {kept}. Try {' or '.join(remedies)}"
            self.log.info(msg, console=False)  # main() prints it as the exit message
            raise TrainingError(msg)

    def _note_cpu_contention(self) -> None:
        """Once, at the first progress line: multi-threaded CPU steps slow down several times when other
        processes (other ranks included; DataLoader workers would count too, so not with them) want the cores."""
        threads = torch.get_num_threads()
        busy = self.cpu_share.busy_elsewhere()
        self.cpu_share = None
        if busy is not None and threads > 1 and busy + threads > (os.cpu_count() or 1) + 0.5:
            self.log.info(f"note: other processes keep {busy:.1f} of {os.cpu_count()} CPUs busy: "
                          f"{threads} threads per process can be several times slower than --num_threads 1")

    def _log_progress(self, lrs: dict[str, float], bar: tqdm) -> None:
        """lrs: each optimizer's learning rate (optim.Optimizers.set_lr); AdamW's is shown as lr, Muon's as muon lr."""
        self._check_finite()
        if self.cpu_share is not None:
            self._note_cpu_contention()
        d, names = self.d, self.task.metrics
        steps = self.window.means
        sums = [torch.stack([m[k] for m in steps]).sum() for k in names]
        stats = torch.stack([*sums, torch.tensor(float(self.window.tokens), device=d.device)])
        if d.world_size > 1:
            dist.all_reduce(stats)
        *values, tokens = stats.tolist()
        # each rank holds its share of the step means (see train_step)
        means = {k: v / d.world_size / len(steps) for k, v in zip(names, values)}
        seconds = time.perf_counter() - self.window.start
        tok_s = tokens / seconds
        mfu = tok_s * self.flops_per_token / (self.peak * d.world_size) if self.peak else None
        mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
        shown = " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in means.items())
        lr_values = {"lr": lrs["adamw"], **({"muon_lr": lrs["muon"]} if "muon" in lrs else {})}
        lr_text = " | ".join(f"{k.replace('_', ' ')} {v:.2e}" for k, v in lr_values.items())
        bar.set_postfix_str(f"{shown} {lr_text.replace(' |', '')} {tok_s:,.0f} tok/s mfu {mfu_text}", refresh=False)
        self.log.info(f"step {self.step}/{self.total_steps} | {shown} | {lr_text} | {tok_s:,.0f} tok/s | "
                      f"mfu {mfu_text} | {1000 * seconds / len(steps):.0f} ms/step")
        self.log.metrics(self.step, {**means, **lr_values, "tok_per_s": tok_s, "mfu": mfu,
                                     "epoch": self.position["epoch"]})
        self.window = Window()

    def _evaluate(self) -> None:
        """Validation metrics, the --sample_prompt continuations and curves.png; kept out of tokens/s."""
        start = time.perf_counter()
        values: dict[str, Any] = {}
        if self.val_set is not None:
            values = self.task.validate(self.model, self.val_set, self.args, self.d, self.autocast)
            self.log.info(f"eval step {self.step} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}"
                                                                   for k, v in values.items()))
        if self.d.is_main and self.args.eval_tasks:
            import eval_model

            values.update(eval_model.in_training(self.model, self.tokenizer, self.args.eval_tasks,
                                                 self.args.eval_tasks_limit or None, self.task.name != "pretrain",
                                                 self.autocast, self.log.info))
        if self.d.is_main and self.args.sample_tokens and self.args.sample_prompt:
            values["samples"] = self._samples()
        if values:
            self.log.metrics(self.step, values)
        if self.d.is_main:
            self._draw_curves()
        self.window.start += time.perf_counter() - start  # keep evaluation out of tokens/s

    @torch.no_grad()
    def _samples(self) -> dict[str, str]:
        """Greedy continuations of the --sample_prompt texts (greedy and dropout off: a resumed run prints
        the same text)."""
        samples = {}
        self.model.eval()
        for prompt in self.args.sample_prompt:
            ids = self.task.prompt_ids(self.tokenizer, prompt)
            with self.autocast():
                new = self.model.generate(torch.tensor([ids], device=self.d.device), self.args.sample_tokens,
                                          temperature=0.0, stop_id=self.tokenizer.eos_token_id)
            samples[prompt] = self.tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
            self.log.info(f"sample step {self.step} | {prompt!r} -> {samples[prompt]!r}")
        self.model.train()
        return samples

    def _draw_curves(self) -> None:
        """out_dir/curves.png from metrics.jsonl (plot_runs.py); without matplotlib, one note and no more tries."""
        if self.curves_note_given:
            return
        try:
            draw_curves(self.out_dir)
        except ImportError as e:
            self.log.info(f"note: no curves.png ({e})")
            self.curves_note_given = True

    def _save(self) -> None:
        self._check_finite(weights=True)
        if self.d.is_main:
            save_checkpoint(self.ckpt_path, {
                **self.task.model_state(self.model),
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
        hf_dir = self.task.export(self.model, self.out_dir, self.tokenizer)
        self.log.info(f"exported {hf_dir} (AutoModelForCausalLM / AutoTokenizer)")


def train(given: argparse.Namespace, task: Task) -> None:
    """Run one training job (single process or one torchrun rank) to the end, or until stopped."""
    d = setup_distributed(resolve_args(given, task)[0].device)
    try:
        with StopRequest(announce=d.is_main) as stop:
            Trainer(given, task, d, stop).fit()
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


def main(task: Task, argv: list[str] | None = None) -> None:
    """Script entry point: bad input (missing, corrupt or mismatched files, an occupied out_dir, a bad flag
    value) and a diverged run end with their one-line message, which names the file, flag or step, and exit
    status 1."""
    given = build_parser(task).parse_args(argv)
    try:
        train(given, task)
    except (TrainingError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
