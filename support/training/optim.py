"""The training layer's optimizers and learning-rate schedules.

Optimizers (--optimizer). `adamw`: AdamW trains every parameter. `muon`: Muon trains the hidden matrices, the
attention and MLP projections of each block (wqkv, wo, w13, w2), and AdamW the rest: the embedding (tied to the
output head; an untied head too), the norm gains and anything else 1-D. Muon orthogonalizes each matrix's
momentum (5 Newton-Schulz iterations), so every direction of the update gets the same step size; that treats a
weight as a linear map, which an embedding row or a gain is not. Each side has its peak learning rate
(--learning_rate for AdamW, --muon_learning_rate for Muon) and both follow one schedule. Muon uses torch's
default lr adjustment ("original": lr * sqrt(max(1, rows / cols)), so w13's update is scaled by sqrt(3)) and,
like AdamW, decays weights by lr * --weight_decay per step.
LoRA adapters stay with AdamW: each of A (r x in) and B (out x r) is a factor of the layer's update B A, and
orthogonalizing the factors one by one is not Muon's update of the layer (and B starts at zero).

Muon here is torch.optim.Muon's update with one choice added (--muon_dtype): the dtype of the Newton-Schulz
iteration. torch runs it in bfloat16, which is fast only where bf16 is native: on a CPU without AVX512_BF16/AMX
(or a GPU before Ampere) each bf16 matmul is emulated. On a 2-core AVX2 EPYC the demo preset's optimizer step
took 1,021 ms with it against AdamW's 2 ms, and 51-62 ms in float32 (one thread, bench/bench_optim.py): a training
step 2.7x AdamW's instead of 1.0-1.2x. `auto` picks bfloat16 where the device computes it natively, float32
elsewhere. In bfloat16 the update equals torch.optim.Muon's bit for bit. In float32 it is closer to the exact
orthogonalization, and 2 DDP processes agree with 1 as with AdamW: after 20 demo-preset steps the weights
differ by at most 6.7e-8 (AdamW 1.2e-7); in bfloat16 by 3.7e-4, as their ~1e-7 gradient difference flips
roundings of the update by a bf16 ulp (2^-8 of an element, times the lr) and the runs drift apart.
Hyperparameters, param_groups and state (a momentum buffer per matrix) are torch.optim.Muon's, so
checkpoints of either load into the other.

Under --parallel fsdp each matrix is a DTensor of row shards, and its momentum stays sharded (it is
elementwise); only the Newton-Schulz input is gathered whole, each matrix on one rank (matrix i on rank
i mod N, so the ranks share the work), orthogonalized there and its rows scattered back (sharded_orthogonalized).

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
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from support.model.cpu_features import cpu_has_native_bf16
from support.model.hf_llama import LAYER_WEIGHTS

OPTIMIZERS = ("adamw", "muon")
MUON_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # --muon_dtype, besides auto
SCHEDULES = ("cosine", "wsd")
# Matrices of one shape are orthogonalized together up to this many elements a stack (64 MB in float32)
NS_STACK_ELEMENTS = 2**24
# a block's projection (with any prefix a wrapper such as peft adds); LoRA's lora_A / lora_B do not match
HIDDEN_MATRIX = re.compile(r"(^|\.)layers\.\d+\.(" + "|".join(map(re.escape, LAYER_WEIGHTS)) + r")\.weight$")


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether Muon trains this parameter under --optimizer muon: an attention or MLP projection matrix."""
    return param.dim() == 2 and bool(HIDDEN_MATRIX.search(name))


def muon_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """--muon_dtype: the dtype Muon's Newton-Schulz iteration runs in on `device`, and why. auto: bfloat16 where
    the device computes it natively (CUDA GPUs from Ampere on, CPUs with AVX512_BF16/AMX), else float32."""
    if name != "auto":
        return MUON_DTYPES[name], f"--muon_dtype {name}"
    if device.type == "cuda":
        native, where = torch.cuda.is_bf16_supported(including_emulation=False), "this GPU"
    else:
        native, where = device.type == "cpu" and cpu_has_native_bf16(), f"this {device.type.upper()}"
    return (torch.bfloat16, f"auto: {where} computes bf16 natively") if native else (
        torch.float32, f"auto: {where} has no native bf16")


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's orthogonalization of g, op for op, in `dtype` (in bfloat16: bit-identical to torch's):
    X = G / ||G||_F, transposed to have no more rows than columns, then `steps` times X <- a X + (b A + c A^2) X
    with A = X X^T. g: one matrix, or a stack of them (n, rows, cols), each orthogonalized on its own (the
    batched products give the same bits as one matrix at a time on a CPU). Returns the result in `dtype`."""
    a, b, c = coefficients
    tall = g.size(-2) > g.size(-1)
    x = g.to(dtype).mT if tall else g.to(dtype)
    # not in place: g may be the momentum buffer itself (nesterov=False)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    add_product = torch.addmm if x.ndim == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        x = add_product(x, add_product(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def orthogonalized_by_shape(inputs: list[torch.Tensor], ns: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """ns of each matrix, the matrices of one shape stacked into one batched call: a block's four shapes repeat
    in every layer, and a product over a stack of small matrices spreads over the CPU's threads (or a GPU)
    better than one small product at a time, with a call per shape instead of one per matrix. The demo
    preset's Muon step in float32 on a 2-core Zen 3, A/B in one process: 1.20-1.41x faster on 2 threads,
    0.88-0.92x on one. A stack holds at most NS_STACK_ELEMENTS (large matrices go one by one, as before), so
    the step's peak memory does not grow with the number of layers."""
    by_shape: dict[torch.Size, list[int]] = {}
    for i, g in enumerate(inputs):
        by_shape.setdefault(g.shape, []).append(i)
    updates: list[torch.Tensor] = [None] * len(inputs)
    for shape, same in by_shape.items():
        per_stack = max(1, NS_STACK_ELEMENTS // shape.numel())
        for start in range(0, len(same), per_stack):
            stack = same[start : start + per_stack]
            for i, update in zip(stack, ns(torch.stack([inputs[i] for i in stack]))):
                updates[i] = update
    return updates


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (sharing its memory), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz iteration in `ns_dtype`, on whole matrices under FSDP2 (module
    docstring). Same constructor defaults, param_groups and state as torch's; the dtype is a choice of the
    launch (of its device), not saved."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float, ns_dtype: torch.dtype):
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"Muon: adjust_lr_fn {group['adjust_lr_fn']!r}: only torch's default, "
                                 f"'original', is implemented")
            params = [p for p in group["params"] if p.grad is not None]
            inputs = [self._momentum_step(p, group["momentum"], group["nesterov"]) for p in params]
            ns = partial(newton_schulz, coefficients=group["ns_coefficients"], steps=group["ns_steps"],
                         eps=group["eps"], dtype=self.ns_dtype)
            if any(isinstance(p, DTensor) for p in params):  # --parallel fsdp
                updates = sharded_orthogonalized(params, [g.to(self.ns_dtype) for g in inputs], ns)
            else:
                updates = orthogonalized_by_shape(inputs, ns)
            lr, decay = group["lr"], group["weight_decay"]
            for p, update in zip(params, updates):
                rows, cols = p.shape  # the whole matrix's, also for a DTensor shard
                local(p).mul_(1 - lr * decay)
                local(p).add_(update, alpha=-lr * math.sqrt(max(1, rows / cols)))

    def _momentum_step(self, p: torch.nn.Parameter, momentum: float, nesterov: bool) -> torch.Tensor:
        """Updates p's momentum buffer (torch's: an average, B <- mu B + (1 - mu) g) and returns what is
        orthogonalized (nesterov: (1 - mu) g + mu B). Elementwise: on a DTensor, this rank's rows only."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        buf, grad = local(state["momentum_buffer"]), local(p.grad)
        buf.lerp_(grad, 1 - momentum)
        return grad.lerp(buf, momentum) if nesterov else buf


def sharded_orthogonalized(params: list[DTensor], shards: list[torch.Tensor],
                           ns: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """ns of each whole matrix, for matrices held as row shards over the ranks of one mesh (FSDP2's Shard(0)):
    `shards` holds this rank's rows of each ns input, in the dtype ns returns (in bf16 that halves the bytes
    moved, and is exact: ns casts first anyway); returns this rank's rows of each result. In rounds of N
    matrices (N ranks), rank j gathers the round's j-th matrix, orthogonalizes it and scatters its rows back,
    while the other ranks do the same with theirs: a rank holds one whole matrix at a time. Shards are padded
    to equal rows for the collectives (FSDP2 splits as torch.chunk: the last ranks may hold fewer, or none)."""
    mesh = params[0].device_mesh
    if mesh.ndim != 1 or any(p.device_mesh != mesh or tuple(p.placements) != (Shard(0),) for p in params):
        raise ValueError("Muon under FSDP needs every matrix sharded by rows over one 1-D mesh")
    group, me, n = mesh.get_group(), mesh.get_local_rank(), mesh.size()
    device = torch.device(mesh.device_type)  # the collectives' (--cpu_offload keeps the shards on the CPU)
    results = []
    for start in range(0, len(params), n):
        batch = range(start, min(start + n, len(params)))
        mine = start + me  # the matrix this rank orthogonalizes, if the round has one for it
        rows = {i: -(-params[i].shape[0] // n) for i in batch}  # per rank, rounded up
        whole = [torch.empty(rows[mine], params[mine].shape[1], dtype=shards[mine].dtype, device=device)
                 for _ in range(n)] if mine in batch else None
        pending = [dist.gather(pad_rows(shards[i].to(device), rows[i]), whole if i == mine else None, group=group,
                               group_dst=i - start, async_op=True) for i in batch]
        for work in pending:
            work.wait()
        pieces = None
        if mine in batch:
            result = ns(torch.cat(whole)[: params[mine].shape[0]])
            pieces = list(pad_rows(result, n * rows[mine]).split(rows[mine]))
        received = {i: torch.empty(rows[i], params[i].shape[1], dtype=shards[i].dtype, device=device) for i in batch}
        pending = [dist.scatter(received[i], pieces if i == mine else None, group=group, group_src=i - start,
                                async_op=True) for i in batch]
        for work in pending:
            work.wait()
        results += [received[i][: len(shards[i])].to(shards[i].device) for i in batch]
    return results


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with zero rows appended up to `rows`, contiguous (as collectives need)."""
    return torch.nn.functional.pad(x, (0, 0, 0, rows - len(x))).contiguous()


class Optimizers:
    """Torch optimizers over disjoint parameters, stepped as one: GradScaler, gradient clipping and the
    schedule see all their param_groups. Each part keeps its own peak learning rate, read from the flags at
    every launch (not from the checkpoint), so a resumed run can be given another one, as with one optimizer."""

    def __init__(self, parts: dict[str, tuple[torch.optim.Optimizer, float]], notes: dict[str, str] | None = None):
        self.parts = parts
        self.notes = notes or {}  # by part name, for describe

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
        """What trains with which optimizer, for the log: "muon: 16 tensors (786,432 weights), peak lr 0.02,
        Newton-Schulz in float32 (auto: this CPU has no native bf16), adamw: ..."."""
        parts = []
        for name, (optimizer, peak) in self.parts.items():
            params = [p for group in optimizer.param_groups for p in group["params"]]
            weights = sum(p.numel() for p in params)
            note = f", {self.notes[name]}" if name in self.notes else ""
            parts.append(f"{name}: {len(params)} tensors ({weights:,} weights), peak lr {peak:g}{note}")
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
    notes = {}
    if to_muon:
        dtype, why = muon_dtype(args.muon_dtype, device)
        parts["muon"] = (Muon(to_muon, args.muon_learning_rate, args.weight_decay, dtype), args.muon_learning_rate)
        notes["muon"] = f"Newton-Schulz in {str(dtype).removeprefix('torch.')} ({why})"
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), fused=device.type in ("cpu", "cuda"))
    parts["adamw"] = (adamw, args.learning_rate)
    return Optimizers(parts, notes)


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
