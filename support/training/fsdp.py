"""--parallel fsdp: PyTorch's FSDP2 (`fully_shard`) with Distributed Checkpoint (torch.distributed.checkpoint),
for models whose weights, gradients and optimizer state (AdamW: 16 bytes per parameter) do not fit one device.

Each rank holds 1/N of every weight, gradient and optimizer state (N = processes): `fully_shard` is applied
to each transformer block and then to the root (embeddings, the final norm, the tied output head). A block's
weights are all-gathered just before its forward and freed after it, and gathered again for its backward;
its gradients are reduce-scattered (averaged, as DDP's all-reduce does, so the loss normalization of
train_steps.py holds unchanged). Micro-steps before the last of an accumulation step keep their gradients
unreduced (set_requires_gradient_sync, FSDP's no_sync). Clipping uses the norm over all shards (the
parameters are DTensors: clip_grad_norm_ reduces over ranks). Mixed precision: weights are gathered in the
--dtype (bf16) for compute, master weights stay float32 and gradients are reduced in float32
(MixedPrecisionPolicy). --cpu_offload keeps the shards and the optimizer step on the CPU (CPUOffloadPolicy):
a base too large for one GPU trains on it, several times slower.

Start-up: only rank 0 loads (or builds) the initial model; the other ranks build its outline on the meta
device (no memory) and receive their shards of rank 0's weights once sharded (share_model), so a machine's
host memory holds the whole model once, not once per process.

Checkpoints: each rank writes its own shards of "model" and "optimizer" (dcp.save; no rank gathers the whole
model), then rank 0 writes the rest of the checkpoint dict (checkpoint.DCP_META) and swaps out_dir/ckpt_dcp,
a symlink, from the previous checkpoint's directory to the new one: a crash mid-save leaves the last good
checkpoint. There are two directories, written in turn (.ckpt_dcp.a, .ckpt_dcp.b). Shards are stored by
global name and offset, so `--resume` loads them into any number of ranks (DCP reshards). The HF export,
--sample_prompt and --eval_tasks gather the whole model once on rank 0.

LoRA: the frozen base is sharded like any weight (FSDP2 shards frozen and trainable weights of one block
together, in their own dtypes); the checkpoint holds the adapters and their optimizer state only (DCP's
ignore_frozen_params), with the adapters' spec and base as a ckpt.pt of LoRA does. GRPO's rollouts decode
token by token outside the model's forward: `whole_model` gathers the policy into a plain copy on every rank
for them (the whole model in the compute dtype, 2 bytes per parameter in bf16, allocated for the rollouts and
freed after; gradients and optimizer state stay sharded). DPO's and GRPO's frozen reference stays a whole
copy on every rank, without gradients or optimizer state (2 or 4 bytes per parameter); DPO's
--precompute_ref_logps holds none.

Muon: its momentum stays sharded like AdamW's moments; each step gathers every matrix's Newton-Schulz input
whole on one rank (the ranks take turns, so the work is shared), and scatters the orthogonalized rows back
(optim.sharded_orthogonalized).

What does not run under fsdp (one-line refusal): float16 (GradScaler with sharded gradients: use bfloat16) and
QLoRA's 4-bit weights (bitsandbytes' packed blocks are not sharded by rows).
"""
from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from k_model import ModelConfig, Transformer
from support.loading.checkpoint import (CKPT_NAME, DCP_META, DCP_NAME, DCP_SLOTS, config_to_dict, dcp_failure,
                                        fsync_dir, save_checkpoint)
from support.loading.sources import SourcedModel
from support.training.trainer_utils import DataParallel, DistInfo


def make_parallel(args: argparse.Namespace, d: DistInfo, dtype: torch.dtype) -> DataParallel:
    """The strategy --parallel names."""
    if args.cpu_offload and args.parallel != "fsdp":
        raise ValueError("--cpu_offload offloads FSDP's shards: add --parallel fsdp")
    if args.parallel != "fsdp":
        return DataParallel(d)
    refusal = None  # checked before any model is loaded
    if dtype == torch.float16:
        refusal = "--dtype float16 needs GradScaler over sharded gradients, not supported: use --dtype bfloat16"
    elif getattr(args, "load_in_4bit", False):
        refusal = ("--load_in_4bit's packed 4-bit weights cannot be sharded: use --parallel ddp, or LoRA on 16-bit "
                   "weights (--dtype bfloat16)")
    if refusal:
        raise ValueError(f"--parallel fsdp: {refusal}")
    return FullyShardedParallel(d, dtype, args.cpu_offload)


class FullyShardedParallel(DataParallel):
    """--parallel fsdp (module docstring). One process is a process group of one: the same code path."""

    name = "fsdp"

    def __init__(self, d: DistInfo, dtype: torch.dtype, cpu_offload: bool):
        super().__init__(d)
        self.dtype, self.cpu_offload = dtype, cpu_offload
        self.model: torch.nn.Module | None = None
        # while rank 0's weights wait to be sent to every rank's shards (share_model): its state dict there,
        # {} on the other ranks; None when every rank loaded the model itself
        self.rank0_weights: dict[str, torch.Tensor] | None = None
        if not dist.is_initialized():  # a single process (no torchrun): fully_shard needs a process group
            backend = "nccl" if d.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    def share_model(self, load: Callable[[], SourcedModel]) -> SourcedModel:
        """With several ranks only rank 0 loads (or builds) the initial model; the others build its outline on
        the meta device, which holds no memory, and `wrap` fills their shards from rank 0's weights. So host
        memory holds the whole model once per machine, not once per process. A failure on rank 0 stops every
        rank with its message. (--cpu_offload: every rank loads, as its shards stay on the host anyway.)"""
        if self.d.world_size == 1 or self.cpu_offload:
            return load()
        outline: list[Any] = [None]
        if self.d.is_main:
            try:
                start = load()
                outline[0] = model_outline(start)
            except Exception as e:
                outline[0] = {"error": str(e)}
                dist.broadcast_object_list(outline, src=0, group=self.d.control_group)
                raise
        dist.broadcast_object_list(outline, src=0, group=self.d.control_group)
        if "error" in outline[0]:  # rank 0's message, which it prints too
            raise ValueError(outline[0]["error"])
        if self.d.is_main:
            self.rank0_weights = dict(start.model.state_dict())  # kept whole until wrap has sent them
            return start
        self.rank0_weights = {}
        return model_on_meta(outline[0])

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model stays where it was built (the CPU): fully_shard moves each block to the device as it
        shards it, so the device never holds the whole model (with --cpu_offload the shards go back)."""
        return model

    def wrap(self, model: torch.nn.Module, compiled: bool) -> torch.nn.Module:
        """fully_shard each block, then the root; `model` itself becomes the FSDP module."""
        mesh = init_device_mesh(self.d.device.type, (self.d.world_size,))
        # pinned host memory needs a GPU; on a CPU device offloading moves nothing (it runs, for the tests)
        offload = CPUOffloadPolicy(pin_memory=self.d.device.type == "cuda") if self.cpu_offload else OffloadPolicy()
        policy = dict(mesh=mesh, offload_policy=offload)
        if self.dtype != torch.float32:
            policy["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, **policy)
        fully_shard(model, **policy)
        if self.rank0_weights is not None:
            self._receive_rank0_weights(model)
        self.model = model
        return torch.compile(model) if compiled else model

    def _receive_rank0_weights(self, model: torch.nn.Module) -> None:
        """The ranks that built the model on the meta device allocate their shards (uninitialized); then rank 0
        sends each rank its part of every weight, and every rank the buffers (the rotary tables)."""
        if not self.d.is_main:
            model.to_empty(device=self.d.device)
        set_model_state_dict(model, self.rank0_weights,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        self.rank0_weights = None

    @property
    def no_sync(self) -> Callable[[], AbstractContextManager]:
        return self._gradients_unreduced

    @contextmanager
    def _gradients_unreduced(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def restore(self, state: dict[str, Any], ckpt_path: Path, model: torch.nn.Module, optimizer: Any) -> None:
        """Load this rank's shards of the weights and the optimizer state, whatever the number of ranks that
        saved them (DCP reads the parts of the saved shards that overlap this rank's)."""
        if "optimizer" in state:
            raise ValueError(f"{ckpt_path}: a --parallel ddp checkpoint ({CKPT_NAME}): resume it with --parallel ddp")
        shards = trained_state(model, optimizer)
        try:  # fails on a key that is not in the checkpoint: what loads below is all there
            dcp.load(shards, checkpoint_id=ckpt_path)
        except (Exception, dcp.api.CheckpointException) as e:  # missing or truncated shards, another shape
            raise ValueError(f"{ckpt_path}: cannot resume: {dcp_failure(e)}") from None
        set_state_dict(model, optimizer.torch_optimizers, model_state_dict=shards["model"],
                       optim_state_dict=shards["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))  # LoRA: the base is not

    def save(self, out_dir: Path, meta: dict[str, Any], weights: Callable[[], dict[str, torch.Tensor]],
             optimizer: Any) -> Path:
        """Every rank writes its shards of the trained weights and the optimizer state into the slot
        out_dir/ckpt_dcp does not point to (so `weights`, the plain parallel's, is not called); then rank 0 adds
        the checkpoint dict (meta, with the task's rebuild_state: a LoRA run's spec) and swaps the symlink.
        Returns the symlink's path."""
        link = out_dir / DCP_NAME
        current = link.resolve().name if link.is_symlink() else None
        target = out_dir / (DCP_SLOTS[1] if current == DCP_SLOTS[0] else DCP_SLOTS[0])
        if self.d.is_main:  # what a crashed save left there
            shutil.rmtree(target, ignore_errors=True)
        dist.barrier()
        dcp.save(trained_state(self.model, optimizer), checkpoint_id=target)
        if self.d.is_main:
            save_checkpoint(target / DCP_META, meta)
            swap_symlink(link, target.name)
            (out_dir / CKPT_NAME).unlink(missing_ok=True)  # a --parallel ddp run's, which this one replaces
        dist.barrier()  # no rank starts the next save before the swap
        return link

    def full_model(self, model: torch.nn.Module, device: torch.device) -> Transformer | None:
        """Gathers every shard (a collective: all ranks call it) into a plain float32 model on rank 0, on
        `device`: the HF export writes it from the CPU, samples and lm-eval tasks run it on the GPU, which must
        then hold the whole model (a base near the GPU's size: --sample_tokens 0 and no --eval_tasks)."""
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.d.is_main:
            return None
        plain = empty_twin(model, torch.device("cpu"))
        plain.load_state_dict(weights)
        return plain.to(device).train(model.training)


def model_outline(start: SourcedModel) -> dict[str, Any]:
    """What another rank needs to build the same model without its weights: the config, each weight's dtype
    and whether it trains, the LoRA spec, and where the model came from (for the tokenizer check and logs)."""
    model = start.model
    return {"config": config_to_dict(model.config), "lora_spec": getattr(model, "lora_spec", None),
            "weights": {name: (p.dtype, p.requires_grad) for name, p in model.named_parameters()},
            "source": start.source, "tokenizer_fingerprint": start.tokenizer_fingerprint}


def meta_model(config: ModelConfig, lora_spec: dict[str, Any] | None) -> Transformer:
    """A Transformer of `config`, with LoRA adapters where lora_spec says, on the meta device: shapes and
    dtypes, no memory."""
    with torch.device("meta"):
        model = Transformer(config)
        if lora_spec is not None:
            from support.loading import lora  # peft is imported for LoRA runs only

            model = lora.add_adapters(model, lora_spec)
            model.lora_spec = lora_spec  # the base's digest: what a checkpoint and the exports record
    return model


def model_on_meta(outline: dict[str, Any]) -> SourcedModel:
    """The model of `outline` on the meta device, each weight in its dtype and trainable or frozen."""
    model = meta_model(ModelConfig(**outline["config"]), outline["lora_spec"])
    params = dict(model.named_parameters())
    for name, (dtype, trains) in outline["weights"].items():
        params[name].data = params[name].data.to(dtype)
        params[name].requires_grad_(trains)
    return SourcedModel(model, outline["source"], outline["tokenizer_fingerprint"])


def empty_twin(model: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> Transformer:
    """A plain Transformer shaped like `model` (LoRA adapters where it has them) on `device`: its weights in
    `dtype`, allocated but not filled; its buffers (the rotary tables) copied from `model`."""
    twin = meta_model(model.config, getattr(model, "lora_spec", None)).to(dtype)
    twin.to_empty(device=device)
    if twin.config.tie_word_embeddings:  # a move between devices gives each module its own new tensor
        twin.output.weight = twin.tok_embeddings.weight
    with torch.no_grad():
        buffers = dict(twin.named_buffers())
        for name, buffer in model.named_buffers():
            buffers[name].copy_(buffer)
    return twin


def trained_state(model: torch.nn.Module, optimizer: Any) -> dict[str, dict[str, Any]]:
    """What a DCP checkpoint holds, this rank's shards of it: the weights that train (all of a model, LoRA's
    adapters without their frozen base) and the optimizer state."""
    weights, moments = get_state_dict(model, optimizer.torch_optimizers,
                                      options=StateDictOptions(ignore_frozen_params=True))
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    # ignore_frozen_params keeps a frozen tied output matrix (torch 2.13): dropped here
    return {"model": {k: v for k, v in weights.items() if k not in frozen}, "optimizer": moments}


@contextmanager
def whole_model(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """`model` itself, or for a --parallel fsdp model a whole copy of it on this rank, for work that runs the model
    outside its forward, one token at a time (GRPO's rollouts: FSDP gathers a block's weights in its forward
    only, and every rank would have to decode in step). Entering gathers each weight (a collective: every rank
    enters together) into the copy in `dtype`; leaving frees the copy's memory. In use, it costs the whole
    model in `dtype`; gradients and optimizer state stay sharded."""
    if not isinstance(model, FSDPModule):
        yield model
        return
    device = next(model.buffers()).device  # the rotary tables: whole on every rank, on the training device
    copy = empty_twin(model, device, dtype)
    with torch.no_grad():
        params = dict(copy.named_parameters())
        for name, p in model.named_parameters():  # the root's stay whole after a forward until the backward
            params[name].copy_(p.full_tensor() if isinstance(p, DTensor) else p)
    yield copy.train(model.training)


def swap_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` in one rename: a crash leaves it at the old target or the new one."""
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)
