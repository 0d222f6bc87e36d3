"""The training layer's optimizers and learning-rate schedules.

Optimizers (--optimizer). `adamw`: AdamW trains every parameter. `muon`: torch.optim.Muon trains the hidden
matrices, the attention and MLP projections of each block (wqkv, wo, w13, w2), and AdamW the rest: the
embedding (tied to the output head; an untied head too), the norm gains and anything else 1-D. Muon
orthogonalizes each matrix's momentum (5 Newton-Schulz iterations in bfloat16), so every direction of the
update gets the same step size; that treats a weight as a linear map, which an embedding row or a gain is not.
Each side has its peak learning rate (--learning_rate for AdamW, --muon_learning_rate for Muon) and both
follow one schedule. Muon uses torch's default lr adjustment ("original": lr * sqrt(max(1, rows / cols)), so
w13's update is scaled by sqrt(3)) and, like AdamW, decays weights by lr * --weight_decay per step.
LoRA adapters stay with AdamW: each of A (r x in) and B (out x r) is a factor of the layer's update B A, and
orthogonalizing the factors one by one is not Muon's update of the layer (and B starts at zero).

Schedules (--lr_schedule). Both warm up linearly over --warmup_iters. `cosine` then decays to a tenth of the
peak at the last step. `wsd` (warmup-stable-decay) holds the peak, then decays linearly to zero over the last
--decay_fraction of the steps: a run can be stopped with a short decay wherever it stands, and the stable part
of a longer run is the same as a shorter one's.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import Any

import torch

from support.hf_llama import LAYER_WEIGHTS

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
# a block's projection (with any prefix a wrapper such as peft adds); LoRA's lora_A / lora_B do not match
HIDDEN_MATRIX = re.compile(r"(^|\.)layers\.\d+\.(" + "|".join(map(re.escape, LAYER_WEIGHTS)) + r")\.weight$")


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether Muon trains this parameter under --optimizer muon: an attention or MLP projection matrix."""
    return param.dim() == 2 and bool(HIDDEN_MATRIX.search(name))


class Optimizers:
    """Torch optimizers over disjoint parameters, stepped as one: GradScaler, gradient clipping and the
    schedule see all their param_groups. Each part keeps its own peak learning rate, read from the flags at
    every launch (not from the checkpoint), so a resumed run can be given another one, as with one optimizer."""

    def __init__(self, parts: dict[str, tuple[torch.optim.Optimizer, float]]):
        self.parts = parts

    @property
    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return [optimizer for optimizer, _ in self.parts.values()]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.torch_optimizers for group in optimizer.param_groups]

    def set_lr(self, lr_of_peak: Callable[[float], float]) -> dict[str, float]:
        """Each part's learning rate := lr_of_peak(its peak); returns them by part name."""
        lrs = {}
        for name, (optimizer, peak) in self.parts.items():
            lrs[name] = lr_of_peak(peak)
            for group in optimizer.param_groups:
                group["lr"] = lrs[name]
        return lrs

    def describe(self) -> str:
        """What trains with which optimizer, for the log: "muon: 16 matrices (786,432 weights), adamw: ..."."""
        parts = []
        for name, (optimizer, peak) in self.parts.items():
            params = [p for group in optimizer.param_groups for p in group["params"]]
            weights = sum(p.numel() for p in params)
            parts.append(f"{name}: {len(params)} tensors ({weights:,} weights), peak lr {peak:g}")
        return ", ".join(parts)

    def step(self) -> None:
        for optimizer in self.torch_optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.torch_optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """AdamW's own state dict when AdamW trains everything (the checkpoint format of runs before Muon);
        otherwise {part name: its state dict}."""
        if list(self.parts) == ["adamw"]:
            return self.parts["adamw"][0].state_dict()
        return {name: optimizer.state_dict() for name, (optimizer, _) in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """ValueError when the state is another set of optimizers'."""
        states = {"adamw": state} if "state" in state else state
        if set(states) != set(self.parts):
            raise ValueError(f"the optimizer state is {' + '.join(sorted(states))}'s, this run trains with "
                             f"{' + '.join(sorted(self.parts))}")
        for name, (optimizer, _) in self.parts.items():
            optimizer.load_state_dict(states[name])


def make_optimizer(model: torch.nn.Module, params: list[torch.nn.Parameter], args: argparse.Namespace,
                   device: torch.device) -> Optimizers:
    """The --optimizer for the parameters that train (`params`, all of `model`'s or some). AdamW decays only
    matrices (embeddings, projections), not norm gains. Its fused kernel updates each tensor in one pass (on
    the bench model's CPU step: 12 ms instead of 43 ms)."""
    names = {id(p): name for name, p in model.named_parameters()}
    to_muon = [p for p in params if args.optimizer == "muon" and is_hidden_matrix(names[id(p)], p)]
    muon_ids = {id(p) for p in to_muon}
    rest = [p for p in params if id(p) not in muon_ids]
    parts: dict[str, tuple[torch.optim.Optimizer, float]] = {}
    if to_muon:
        muon = torch.optim.Muon(to_muon, lr=args.muon_learning_rate, weight_decay=args.weight_decay)
        parts["muon"] = (muon, args.muon_learning_rate)
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), fused=device.type in ("cpu", "cuda"))
    parts["adamw"] = (adamw, args.learning_rate)
    return Optimizers(parts)


def lr_at(step: int, peak_lr: float, warmup: int, total: int, schedule: str = "cosine",
          decay_fraction: float = 0.2) -> float:
    """The learning rate of step `step` (0-based) of `total` (module docstring): linear warmup to peak_lr,
    then cosine to peak_lr / 10 at `total`, or (wsd) peak_lr until the last decay_fraction * total steps and
    linearly down to 0 at `total`."""
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total))
        return peak_lr * min((step + 1) / max(1, warmup), 1.0, (total - step) / decay_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    min_lr = peak_lr / 10
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))
