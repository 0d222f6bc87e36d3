"""Knowledge distillation: a student learns a frozen teacher's token distribution (Hinton et al. 2015), mixed
with the cross-entropy on the data, on pretraining data (a packed .bin) or SFT data (a .jsonl: assistant tokens
only, SFT's masks).

    python ddp_distill.py --teacher out/teacher                   # a new demo-sized student on out/data/pretrain.bin
    python ddp_distill.py --teacher out/sft --init_from out/pretrain --data_path out/data/sft_train.jsonl \\
        --val_data_path out/data/sft_val.jsonl                    # SFT data: assistant tokens only
    python ddp_distill.py --teacher out/teacher --teacher_topk 32  # offline: the teacher's top-32 written once
    torchrun --nproc_per_node=8 ddp_distill.py --teacher out/teacher

Per target token, with p = softmax(teacher logits / T) and q = softmax(student logits / T):
    forward: T^2 KL(p || q)  (mode covering, the classic KD loss)   reverse: T^2 KL(q || p)  (mode seeking)
    loss = kd_alpha * kd + (1 - kd_alpha) * cross-entropy(student logits at T = 1, data token)
T^2 keeps the gradient's size independent of T (Hinton et al.). The teacher is any model open_model opens, in
--teacher_dtype, with no gradients, on every rank; it must have the student's tokenizer (fingerprint).

--teacher_topk K (offline): the teacher's K most likely tokens and their log-probs at T, plus the log of the
mass left over (the tail), are written once per data file to memmaps beside it (DATA.teacher_topK_TEMP.*.npy),
and training reads them with no teacher in memory. The KD loss is then the KL between the teacher's and the
student's distributions over K + 1 outcomes: the K tokens and "any other token" (the student's tail mass is
exact, from its full logits). That is a true KL of a coarser view of both distributions, so it is never above
the full KL, equals it when the teacher's tail is empty, and unlike renormalising over the K it still pushes
the student's mass off the tokens the teacher rules out. Validation reports the student's cross-entropy on the
validation data (val_loss), the figure that compares distilled and undistilled runs.

--on_policy_fraction F (GKD, Agarwal et al. 2024): on a seeded share F of the steps the student continues each
sample's prompt (SFT: the conversation up to the reply; pretraining: the window's first half) with the KV-cache
sampler GRPO uses, and learns the teacher's per-token KL on its own tokens (the KD term alone: a sampled token
is no target). With --kd_loss reverse this is the on-policy reverse KL of on-policy distillation.
"""

import argparse
import json
import random
import time
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

import trainer
from dataset import SFTDataset
from support.inference.rollouts import sample_completions
from ddp_pretrain import Pretrain
from support.loading.sources import (SourcedModel, check_model_tokenizer, initial_model, resolve_dtype,
                                     with_chat_template)
from support.training.fsdp import whole_model
from support.training.train_steps import step_seed
from support.training.train_task import evaluate
from support.training.trainer_utils import DistInfo

METRICS = ("loss", "kd", "ce", "agree", "teacher_s")
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KDBatch(NamedTuple):
    x: torch.Tensor  # (B, T) int64
    y: torch.Tensor  # (B, T) int64
    mask: torch.Tensor  # (B, T) float32: 1 on the tokens that train
    teacher_logp: torch.Tensor | None  # (B, T, V) full log-probs at T, or (B, T, K + 1): top K then the tail
    teacher_idx: torch.Tensor | None  # (B, T, K) int64 token ids of the top K; None with full log-probs
    on_policy: bool = False  # rows the student generated: the loss is the KD term alone


def kd_token_losses(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_idx: torch.Tensor | None,
                    temperature: float, reverse: bool) -> torch.Tensor:
    """T^2 KL(p || q) (forward) or T^2 KL(q || p) (reverse) per row (N,). student_logits (N, V); teacher_logp
    (N, V) log p at T, or with teacher_idx (N, K) the top-K log-probs followed by the tail's (N, K + 1): both
    distributions are then compared over the K tokens and the rest (module docstring)."""
    q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher_idx is not None:
        rest = q.scatter(-1, teacher_idx, float("-inf")).logsumexp(-1, keepdim=True)
        q = torch.cat([q.gather(-1, teacher_idx), rest], dim=-1)
    p = teacher_logp.float()
    a, b = (q, p) if reverse else (p, q)
    # 0 log 0 = 0: an outcome with no mass under the first distribution adds nothing (an empty tail)
    terms = torch.where(a == float("-inf"), 0.0, a.exp() * (a - b))
    return terms.sum(-1) * temperature**2


def teacher_targets(teacher: torch.nn.Module, x: torch.Tensor, temperature: float, k: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's log-probs at T for every position: full (B, T, V), or top K + tail (B, T, K + 1) and ids."""
    with torch.no_grad():
        logp = F.log_softmax(teacher(x).logits.float() / temperature, dim=-1)
    if k is None:
        return logp, None
    top, idx = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, tail], dim=-1), idx


class TopKTargets(Dataset):
    """A dataset whose items carry the teacher's top-K log-probs and ids, read from the memmaps."""

    def __init__(self, data: Dataset, logp: np.ndarray, idx: np.ndarray):
        self.data, self.logp, self.idx = data, logp, idx

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        logp, idx = torch.from_numpy(np.array(self.logp[i])), torch.from_numpy(self.idx[i].astype(np.int64))
        return (*self.data[i], logp, idx)


def topk_paths(data_path: str, k: int, temperature: float) -> tuple[Path, Path, Path]:
    stem = f"{data_path}.teacher_top{k}_T{temperature:g}"
    return Path(f"{stem}.logp.npy"), Path(f"{stem}.idx.npy"), Path(f"{stem}.json")


def write_topk(teacher: torch.nn.Module, data: Dataset, data_path: str, k: int, temperature: float,
               batch_size: int, device: torch.device, about: dict[str, Any]) -> None:
    """Score every sample with the teacher into the two memmaps; under torchrun rank r writes rows r, r + W, ...
    The sidecar, written last by rank 0, marks the files complete and says what they hold."""
    logp_path, idx_path, meta_path = topk_paths(data_path, k, temperature)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    T = data[0][0].shape[0]
    if rank == 0:
        np.lib.format.open_memmap(logp_path, "w+", np.float32, (len(data), T, k + 1))
        np.lib.format.open_memmap(idx_path, "w+", np.int32, (len(data), T, k))
    if world > 1:
        dist.barrier()
    logp, idx = np.load(logp_path, mmap_mode="r+"), np.load(idx_path, mmap_mode="r+")
    mine = list(range(rank, len(data), world))
    for start in range(0, len(mine), batch_size):
        rows = mine[start : start + batch_size]
        x = torch.stack([data[i][0] for i in rows]).to(device)
        top, ids = teacher_targets(teacher, x, temperature, k)
        logp[rows], idx[rows] = top.cpu().numpy(), ids.cpu().numpy().astype(np.int32)
    logp.flush(), idx.flush()
    if world > 1:
        dist.barrier()
    if rank == 0:
        meta_path.write_text(json.dumps(about, ensure_ascii=False, indent=1) + "\n")


class Distill(Pretrain):
    name = "distill"
    description = __doc__
    metrics = METRICS
    router_losses = False  # its own loss_sums: an MoE student's router losses are not added
    defaults = dict(
        Pretrain.defaults,
        out_dir="out/distill",
        teacher="out/teacher",
        teacher_dtype="float32",
        kd_loss="forward",
        kd_temperature=1.0,
        kd_alpha=0.5,
        teacher_topk=None,
        on_policy_fraction=0.0,
        max_completion_length=64,
        on_policy_temperature=1.0,
    )

    def __init__(self) -> None:
        self.teacher: torch.nn.Module | None = None

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        super().add_flags(parser)
        d = self.defaults
        g = parser.add_argument_group("distillation")
        g.add_argument("--teacher", help="the frozen teacher: a ckpt.pt, a run dir, an HF model directory (ours, any "
                       f"LlamaForCausalLM or MixtralForCausalLM) (default: {d['teacher']})")
        g.add_argument("--teacher_dtype", choices=list(TEACHER_DTYPES), help="the teacher's weights and forward "
                       f"(default: {d['teacher_dtype']})")
        g.add_argument("--kd_loss", choices=["forward", "reverse"], help="forward: T^2 KL(teacher || student); "
                       f"reverse: T^2 KL(student || teacher) (default: {d['kd_loss']})")
        g.add_argument("--kd_temperature", type=float, help="softens both distributions in the KD term "
                       f"(default: {d['kd_temperature']})")
        g.add_argument("--kd_alpha", type=float, help="loss = alpha x KD + (1 - alpha) x cross-entropy on the data "
                       f"(default: {d['kd_alpha']})")
        g.add_argument("--teacher_topk", type=int, help="offline: write the teacher's top-K log-probs beside the "
                       "data once and train from them without the teacher in memory (default: full logits, live)")
        g.add_argument("--on_policy_fraction", type=float, help="on this share of the steps (GKD) the student "
                       "continues the batch's prompts and learns the teacher's KL on its own tokens "
                       f"(default: {d['on_policy_fraction']})")
        g.add_argument("--max_completion_length", type=int, help="on-policy: tokens the student generates at most "
                       f"(default: {d['max_completion_length']})")
        g.add_argument("--on_policy_temperature", type=float, help="on-policy: the student's sampling temperature "
                       f"(default: {d['on_policy_temperature']})")

    def tokenizer(self, args: argparse.Namespace) -> tuple[Any, str]:
        """Pretrain's; on SFT data (.jsonl) with a chat template (ours where it has none)."""
        tokenizer, path = super().tokenizer(args)
        return (with_chat_template(tokenizer) if args.data_path.endswith(".jsonl") else tokenizer), path

    def dataset(self, path: str, tokenizer: Any, args: argparse.Namespace) -> Dataset:
        data = (SFTDataset(path, tokenizer, max_length=args.max_seq_len) if path.endswith(".jsonl")
                else super().dataset(path, tokenizer, args))
        if args.teacher_topk is None or path != args.data_path:
            return data
        return self._topk_dataset(data, path, tokenizer, args)

    def prepare(self, model: torch.nn.Module, args: argparse.Namespace, tokenizer: Any, device: torch.device) -> None:
        """Check the KD flags and, unless the run reads top-K files, load the frozen teacher."""
        if not 0 <= args.kd_alpha <= 1:
            raise ValueError(f"--kd_alpha must be in [0, 1], got {args.kd_alpha}")
        if not args.kd_temperature > 0:
            raise ValueError(f"--kd_temperature must be > 0, got {args.kd_temperature}")
        if args.teacher_topk is not None and args.teacher_topk < 1:
            raise ValueError(f"--teacher_topk must be >= 1, got {args.teacher_topk}")
        if not 0 <= args.on_policy_fraction <= 1:
            raise ValueError(f"--on_policy_fraction must be in [0, 1], got {args.on_policy_fraction}")
        if args.on_policy_fraction and args.teacher_topk:
            raise ValueError("--on_policy_fraction needs the live teacher to score the student's tokens: "
                             "drop --teacher_topk")
        self.tokenizer, self.dtype = tokenizer, resolve_dtype(args.dtype, device)
        self.args, self.device, self.student_params = args, device, sum(p.numel() for p in model.parameters())
        self.teacher = None if args.teacher_topk else self._load_teacher(args, tokenizer)

    def _load_teacher(self, args: argparse.Namespace, tokenizer: Any) -> torch.nn.Module:
        """--teacher opened, checked against the student's tokenizer, frozen in --teacher_dtype. A teacher
        trained before its tokenizer gained the chat markers grows the same rows the student did (initial_model)."""
        try:
            teacher, source, fingerprint = initial_model(args.teacher, tokenizer, grow_unknown=False)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--teacher {args.teacher}: {e}") from None
        check_model_tokenizer(SourcedModel(teacher, f"--teacher {source}", fingerprint), tokenizer, args.tokenizer_path)
        params = sum(p.numel() for p in teacher.parameters())
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"teacher: {source}", flush=True)
            if params < self.student_params:
                print(f"warning: the teacher {source} has {params:,} parameters, fewer than the student's "
                      f"{self.student_params:,}", flush=True)
        return teacher.to(self.device, TEACHER_DTYPES[args.teacher_dtype]).eval().requires_grad_(False)

    def _topk_dataset(self, data: Dataset, path: str, tokenizer: Any, args: argparse.Namespace) -> Dataset:
        """The data with its top-K targets, written first unless a complete file for this teacher, K and T is
        there (a resumed run reads the same one)."""
        k, temperature = args.teacher_topk, args.kd_temperature
        logp_path, idx_path, meta_path = topk_paths(path, k, temperature)
        about = dict(teacher=str(args.teacher), k=k, temperature=temperature, samples=len(data),
                     data_bytes=Path(path).stat().st_size, max_seq_len=args.max_seq_len)
        if not meta_path.is_file() or json.loads(meta_path.read_text()) != about:
            teacher = self._load_teacher(args, tokenizer)
            write_topk(teacher, data, path, k, temperature, args.batch_size, self.device, about)
            del teacher
        return TopKTargets(data, np.load(logp_path, mmap_mode="r"), np.load(idx_path, mmap_mode="r"))

    def collate(self, items: list[tuple]) -> KDBatch:
        """Stacked samples without the trailing columns where no sample trains (collate_trimmed's reason)."""
        columns = [torch.stack(t) for t in zip(*items)]
        used = columns[2].any(dim=0).nonzero()
        keep = int(used[-1]) + 1 if len(used) else 1
        columns = [c[:, :keep].contiguous() for c in columns]
        return KDBatch(*columns) if len(columns) == 5 else KDBatch(*columns, None, None)

    def is_on_policy(self, step: int) -> bool:
        """Whether `step` trains on the student's own completions: the same draw on every rank and on resume."""
        return random.Random(step_seed(self.args.seed, 0, step)).random() < self.args.on_policy_fraction

    def on_policy_batch(self, model: torch.nn.Module, batch: KDBatch, step: int) -> KDBatch:
        """The batch's prompts (SFT: up to the first answer token; pretraining: the first half of the window)
        continued by the student, sampled at --on_policy_temperature with one seeded generator per row; the
        completion tokens are the ones that train. A row's seed is the step's and its prompt's, so resuming or
        splitting the batch over processes draws the same tokens."""
        a = self.args
        first = batch.mask.float().argmax(dim=1).tolist()  # first trained target of each row
        prompts = [row[: f + 1 if f else len(row) // 2] for row, f in zip(batch.x.tolist(), first)]
        budget = min(a.max_completion_length, a.max_seq_len + 1 - max(map(len, prompts)))
        seed = step_seed(a.seed, 0, step)
        generators = [torch.Generator().manual_seed(seed ^ zlib.crc32(np.array(p, dtype=np.int64).tobytes()))
                      for p in prompts]
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id or 0
        model.eval()
        with whole_model(model, self.dtype) as student:
            completions = sample_completions(student, prompts, budget, eos, pad, a.on_policy_temperature, generators)
        model.train()
        rows = [p + c for p, c in zip(prompts, completions)]
        width = max(map(len, rows)) - 1
        x = torch.full((len(rows), width), pad, dtype=torch.int64)
        y, mask = x.clone(), torch.zeros(len(rows), width)
        for i, (p, row) in enumerate(zip(prompts, rows)):
            x[i, : len(row) - 1], y[i, : len(row) - 1] = torch.tensor(row[:-1]), torch.tensor(row[1:])
            mask[i, len(p) - 1 : len(row) - 1] = 1
        return KDBatch(x, y, mask, None, None, on_policy=True)

    def prepare_step(self, model: torch.nn.Module, batches: list[KDBatch], step: int
                     ) -> tuple[list[KDBatch], dict[str, torch.Tensor]]:
        """The student's own completions on an on-policy step, then the teacher's log-probs of each micro-batch
        (live runs), the teacher timed apart from the student's step."""
        if self.args.on_policy_fraction and self.is_on_policy(step):
            batches = [self.on_policy_batch(model, b, step) for b in batches]
        began = time.perf_counter()
        if self.teacher is not None:
            batches = [b._replace(teacher_logp=teacher_targets(self.teacher, b.x.to(self.device),
                                                               self.args.kd_temperature, None)[0]) for b in batches]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return batches, {"teacher_s": torch.tensor(time.perf_counter() - began, device=self.device)}

    def loss_sums(self, model: torch.nn.Module, batch: KDBatch, device: torch.device) -> dict[str, torch.Tensor]:
        """Sums over the trained tokens of the mixed loss, its KD and CE parts and top-1 agreement."""
        x, y, mask = (t.to(device, non_blocking=True) for t in batch[:3])
        keep = mask.reshape(-1) != 0
        logits = model(x).logits
        logits = logits.reshape(-1, logits.shape[-1])[keep]
        teacher_logp = batch.teacher_logp.to(device).reshape(keep.numel(), -1)[keep]
        teacher_idx = None if batch.teacher_idx is None else batch.teacher_idx.to(device).reshape(keep.numel(), -1)[keep]
        a = self.args
        kd = kd_token_losses(logits, teacher_logp, teacher_idx, a.kd_temperature, a.kd_loss == "reverse")
        ce = F.cross_entropy(logits.float(), y.reshape(-1)[keep], reduction="none")
        teacher_top1 = teacher_logp.argmax(-1) if teacher_idx is None else teacher_idx[:, 0]
        agree = (logits.argmax(-1) == teacher_top1).float()
        alpha = 1.0 if batch.on_policy else a.kd_alpha  # a sampled token is no target to imitate
        return {"loss": (alpha * kd + (1 - alpha) * ce).sum(), "kd": kd.detach().sum(),
                "ce": ce.detach().sum(), "agree": agree.sum()}

    def validate(self, model: torch.nn.Module, dataset: Dataset, args: argparse.Namespace, d: DistInfo,
                 autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
        """The student's cross-entropy on the validation data: comparable with any run that trains without KD."""
        return self.val_metrics(evaluate(model, dataset, args.batch_size, args.eval_samples, d, autocast))


def main(argv: list[str] | None = None) -> None:
    trainer.main(Distill(), argv)


if __name__ == "__main__":
    main()
