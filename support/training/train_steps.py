"""One optimizer step of the training loop (trainer.py), with the loss normalization that makes any split of a
global batch take the same step.

Loss normalization. One optimizer step minimizes the mean loss over every loss unit (a target token; a
preference pair) that the step reads on all ranks: sum(loss * mask) / mask.sum() over the whole global batch.
Each rank learns that count up front (one all_reduce of a scalar) and backpropagates
sum(loss * mask) * world_size / count for each micro-batch; DDP averages gradients over ranks (divides by
world_size) and accumulation adds micro-steps up, so the gradient is exactly that of the global mean.
Hence one process with batch B and N processes with batch B/N, or any other split of S between batch
size, processes and accumulation, take the same step; and SFT micro-batches holding few answer tokens are
not over-weighted, as averaging per-micro-batch means would do.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from support.training.train_task import Task


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
            # an MoE model's router losses (train_task.router_sums) train with the loss, logged apart from it
            objective = sums["loss"] + sums["router_loss"] if "router_loss" in sums else sums["loss"]
            scaler.scale(objective).backward()
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
def greedy_samples(model: torch.nn.Module, task: Task, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                   autocast: Callable[[], AbstractContextManager], device: torch.device) -> dict[str, str]:
    """Greedy continuations of each prompt (greedy and dropout off: a resumed run prints the same text)."""
    samples = {}
    model.eval()
    for prompt in prompts:
        ids = task.prompt_ids(tokenizer, prompt)
        with autocast():
            new = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=0.0,
                                 stop_id=tokenizer.eos_token_id)
        samples[prompt] = tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
    model.train()
    return samples
