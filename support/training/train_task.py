"""What a training objective supplies to the loop (trainer.py): a script (ddp_pretrain.py, ddp_sft_full.py,
ddp_dpo.py) subclasses `Task` to name its defaults and say which model a fresh run starts from, what its
dataset is, the loss on a batch and which parameters train.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from dataset import document_start_ids
from support.model.hf_llama import copy_token_ids, export_hf
from support.loading.sources import DEFAULT_TOKENIZER, SourcedModel, load_tokenizer
from support.training.trainer_utils import DistInfo

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # X, Y (B, T) int64; loss mask (B, T) float32


def collate_trimmed(items: list[Batch]) -> Batch:
    """Stack samples, then drop the trailing columns where no sample has loss mask. The model is causal, so
    those positions cannot change the loss; right-padded SFT batches shrink to their longest answer."""
    x, y, mask = (torch.stack(t) for t in zip(*items))
    used = mask.any(dim=0).nonzero()
    keep = int(used[-1]) + 1 if len(used) else 1
    return x[:, :keep].contiguous(), y[:, :keep].contiguous(), mask[:, :keep].contiguous()


def lm_loss_sums(model: torch.nn.Module, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """"loss": sum(per-token loss * mask) of one host-side batch. A partial mask (SFT: answers only) goes to
    the model, which then projects only those positions onto the vocabulary; checking it on the host, before
    the copy, keeps the all-ones pretraining mask free of a device sync. An MoE model in training adds its
    router losses and expert load (router_sums)."""
    x, y, mask = batch
    partial_mask = not bool(mask.all())
    x, y, mask = (t.to(device, non_blocking=True) for t in batch)
    out = model(x, y, loss_mask=mask) if partial_mask else model(x, y)
    sums = {"loss": (out.last_loss * mask.reshape(-1)).sum()}
    if out.router_loss is not None:
        sums.update(router_sums(out.router_loss, out.router_stats, mask.sum()))
    return sums


def router_sums(router_loss: torch.Tensor, stats: dict[str, torch.Tensor], units: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """An MoE batch's router figures as sums over its loss units, like the LM loss, so that train_step and the
    progress lines weigh micro-batches alike: "router_loss" (what train_step adds to the loss it
    backpropagates; computed per micro-batch, as Mixtral does, so 1 process equals N processes that read the
    same micro-batches), aux_loss, z_loss, and per layer l the share of each expert e (expert_load/l/e), its
    largest share (expert_load_max/l) and the entropy of the shares in nats (expert_entropy/l; ln(experts)
    when balanced)."""
    load = stats["expert_load"]
    entropy = -(load * load.clamp(min=1e-12).log()).sum(-1)
    figures = {"router_loss": router_loss, "aux_loss": stats["aux_loss"], "z_loss": stats["z_loss"]}
    for layer, shares in enumerate(load):
        figures[f"expert_load_max/{layer}"] = shares.max()
        figures[f"expert_entropy/{layer}"] = entropy[layer]
        figures.update({f"expert_load/{layer}/{e}": share for e, share in enumerate(shares)})
    return {k: v * units for k, v in figures.items()}


def router_metric_names(config: Any) -> tuple[str, ...]:
    """The progress metrics router_sums adds for a model with this config (none for a dense model)."""
    if not config.num_local_experts:
        return ()
    per_layer = [(f"expert_load_max/{i}", f"expert_entropy/{i}", *(f"expert_load/{i}/{e}"
                  for e in range(config.num_local_experts))) for i in range(config.n_layers)]
    return ("aux_loss", "z_loss", *(name for names in per_layer for name in names))


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
    router_losses = True  # loss_sums is lm_loss_sums: an MoE model trains with its router losses, logs its load
    eval_at_start = False  # True: a fresh run also evaluates the model it starts from, as step 0
    total_steps, steps_per_epoch = 0, 1  # the run's length, which the loop sets once the data is read

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
        return lm_loss_sums(model, batch, device)

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

    def model_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The weights a checkpoint stores (under "model"): every one. A task that trains a small part of a model
        it can rebuild (LoRA adapters on a base named in the checkpoint) stores only that part, and in
        rebuild_state what rebuilding needs; loading.model_from_state rebuilds the model from both on --resume."""
        return model.state_dict()

    def rebuild_state(self, model: torch.nn.Module) -> dict[str, Any]:
        """What a checkpoint needs besides its weights to rebuild the model: nothing for one built from its
        config. Kept apart from the weights, which a --parallel fsdp run writes as shards instead."""
        return {}

    def export(self, model: torch.nn.Module, out_dir: Path, tokenizer: Any) -> Path:
        """The final weights as a Llama model + tokenizer that AutoModelForCausalLM / AutoTokenizer open."""
        hf_dir = out_dir / "hf"
        copy_token_ids(model.config, tokenizer)
        export_hf(model, hf_dir)
        tokenizer.save_pretrained(hf_dir)
        return hf_dir


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, batch_size: int, num_samples: int, d: DistInfo,
             autocast: Callable[[], AbstractContextManager], task: Task | None = None) -> dict[str, float]:
    """Mean of each loss_sums entry per loss unit over the first num_samples samples, shared out between the
    ranks; the values do not depend on the batch size or the number of processes."""
    task = task or Task()
    model.eval()
    n = min(len(dataset), num_samples)
    mine = list(range(d.rank, n, d.world_size))
    # every rank runs as many forward passes as the busiest one (an FSDP forward is a collective); a rank out
    # of samples reruns sample 0 and counts nothing
    busiest = -(-n // d.world_size)  # ceil: the samples of rank 0
    passes = -(-busiest // batch_size)
    stats = torch.zeros(1 + len(task.metrics), device=d.device)  # loss units, then each metric's sum
    for i in range(0, passes * batch_size, batch_size):
        part = mine[i : i + batch_size]
        batch = task.collate([dataset[j] for j in part or [0]])
        with autocast():
            sums = task.loss_sums(model, batch, d.device)
        if part:
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


def check_targets(dataset: Dataset, task: Task, path: str, limit: int, max_seq_len: int, log: Any) -> None:
    """Warn about samples that teach nothing (their answer is cut off); refuse data where none is left."""
    empty, checked = count_without_targets(dataset, task, limit)
    what = f"of the first {checked:,} samples" if checked < len(dataset) else f"of its {checked:,} samples"
    if empty == checked:
        raise ValueError(f"{path}: none {what} has a target token within --max_seq_len {max_seq_len} "
                         f"(every answer is cut off): raise --max_seq_len or shorten the prompts")
    if empty:
        log.info(f"warning: {path}: {empty:,} {what} ({empty / checked:.1%}) have no target token within "
                 f"--max_seq_len {max_seq_len} (their answers are cut off) and teach nothing")
