"""Preference tuning (DPO, Rafailov et al. 2023) of an SFT model on pairs of a chosen and a rejected reply.

    python ddp_dpo.py                                  # from out/sft, data out/data/dpo_train.jsonl -> out/dpo
    python ddp_dpo.py --loss ipo --beta 0.5            # IPO instead of DPO's sigmoid loss
    python ddp_dpo.py --precompute_ref_logps           # score the data with the reference once, up front
    torchrun --nproc_per_node=8 ddp_dpo.py --batch_size 16

The policy starts from --init_from; the reference is a frozen copy of the same model, loaded again from
--init_from (also on --resume). A reply's log-probability is the sum over its own tokens (content and
closing EOS: PreferenceDataset's mask), and each pair's reward is beta * (log pi(reply) - log ref(reply)).
The chosen and rejected rows of a micro-batch go through the policy in one forward, as DDP needs one forward
per backward. The loop and checkpoint format live in trainer.py, the flags in train_flags.py.
"""

import argparse
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

import trainer
from dataset import PreferenceDataset
from ddp_sft_full import SFT
from k_model import Transformer
from support.loading.sources import check_model_tokenizer, resolve_dtype
from support.training.train_steps import autocast_factory
from support.training.train_task import collate_trimmed

METRICS = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")


class PairBatch(NamedTuple):
    """B pairs as 2B rows: the B chosen rows, then the B rejected rows in the same order."""
    x: torch.Tensor  # (2B, T) int64
    y: torch.Tensor  # (2B, T) int64
    mask: torch.Tensor  # (2B, T) float32: 1 on reply tokens
    valid: torch.Tensor  # (B,) float32: 1 for a pair with reply tokens on both sides within --max_seq_len
    reference: torch.Tensor | None  # (2B,) reference log-probs if precomputed, else None


def collate_pairs(items: list[tuple]) -> PairBatch:
    """PreferenceDataset items, each optionally followed by its two precomputed reference log-probs."""
    rows = [(x[k], y[k], mask[k]) for k in (0, 1) for x, y, mask, *_ in items]
    x, y, mask = collate_trimmed(rows)
    valid = mask.any(dim=1).view(2, -1).all(dim=0).float()
    reference = torch.stack([item[3] for item in items]).T.reshape(-1) if len(items[0]) > 3 else None
    return PairBatch(x, y, mask, valid, reference)


def reply_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(reply | prompt) of each row: the log-probabilities of its masked target tokens, summed. (2B,)"""
    token_losses = model(x, y, loss_mask=mask).last_loss.view_as(mask)
    return -(token_losses * mask).sum(dim=1)


def dpo_sums(policy: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor, beta: float, loss: str,
             label_smoothing: float) -> dict[str, torch.Tensor]:
    """Sums over the valid pairs of the loss and the reward statistics (METRICS). policy, reference: (2B,)
    log-probs, chosen rows first. With h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):
    sigmoid: -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h) (ls = label_smoothing, conservative DPO);
    ipo: (h - 1 / (2 beta))^2 (Azar et al. 2023). Reward accuracy counts a tie as half, so the model the
    policy starts from (rewards 0) scores 0.5."""
    chosen_ratio, rejected_ratio = (policy - reference).view(2, -1)
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen, rejected = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    margin = chosen - rejected
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    values = dict(zip(METRICS, (losses, chosen, rejected, margin, accuracy)))
    return {k: (v * valid).sum() for k, v in values.items()}


class ScoredPairs(Dataset):
    """A PreferenceDataset whose items carry their precomputed reference log-probs (chosen, rejected)."""

    def __init__(self, pairs: PreferenceDataset, reference_logps: torch.Tensor):
        self.pairs, self.reference_logps = pairs, reference_logps

    def __len__(self) -> int:
        return len(self.pairs)

    def sizes(self) -> np.ndarray:
        return self.pairs.sizes()

    def __getitem__(self, i: int):
        return (*self.pairs[i], self.reference_logps[i])


@torch.no_grad()
def score_pairs(reference: torch.nn.Module, pairs: Dataset, batch_size: int, device: torch.device,
                autocast: Any) -> torch.Tensor:
    """The reference's (chosen, rejected) log-probs of every pair, (N, 2) float32 on the CPU. Under torchrun
    rank r scores pairs r, r + W, ... and all_gather shares the results."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    mine = range(rank, len(pairs), world)
    per_rank = -(-len(pairs) // world)
    scores = torch.zeros(per_rank, 2, device=device)
    for start in range(0, len(mine), batch_size):
        batch = collate_pairs([pairs[i] for i in mine[start : start + batch_size]])
        x, y, mask = (t.to(device) for t in batch[:3])
        with autocast():
            scores[start : start + len(batch.valid)] = reply_logps(reference, x, y, mask).float().view(2, -1).T
    if world > 1:
        gathered = [torch.empty_like(scores) for _ in range(world)]
        dist.all_gather(gathered, scores)
        scores = torch.stack(gathered, dim=1).reshape(-1, 2)  # row j * world + r is rank r's j-th pair
    return scores[: len(pairs)].cpu()


class DPO(SFT):
    name = "dpo"
    description = __doc__
    metrics = METRICS
    router_losses = False  # its own loss_sums: an MoE model's router losses are not added (docs/moe.md)
    defaults = dict(
        SFT.defaults,  # so the flags SFT adds have their defaults here too
        init_from="out/sft",
        data_path="out/data/dpo_train.jsonl",
        val_data_path="out/data/dpo_val.jsonl",
        out_dir="out/dpo",
        batch_size=8,  # pairs: 16 rows per forward
        learning_rate=1e-4,
        muon_learning_rate=2e-3,
        warmup_iters=10,
        save_interval=200,
        eval_interval=100,
        beta=0.1,
        loss="sigmoid",
        label_smoothing=0.0,
        precompute_ref_logps=False,
        skip_bad=False,
    )

    def __init__(self) -> None:
        self.reference: Transformer | None = None

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        super().add_flags(parser)
        d = self.defaults
        g = parser.add_argument_group("preference tuning")
        g.add_argument("--beta", type=float, help="strength of the pull towards the reference: rewards are beta x "
                       f"log-prob ratios (default: {d['beta']})")
        g.add_argument("--loss", choices=["sigmoid", "ipo"], help=f"sigmoid: DPO; ipo: IPO (default: {d['loss']})")
        g.add_argument("--label_smoothing", type=float, help="with --loss sigmoid: the assumed share of pairs whose "
                       f"labels are flipped (conservative DPO) (default: {d['label_smoothing']})")
        g.add_argument("--precompute_ref_logps", action="store_true", default=None,
                       help="score every pair with the reference once at start-up (one forward pass over the data, "
                            "8 bytes per pair) instead of a reference forward each step, and hold no reference model")
        g.add_argument("--skip_bad", action="store_true", default=None,
                       help="skip malformed or refused pairs (counted) instead of failing")

    def prepare(self, model: torch.nn.Module, args: argparse.Namespace, tokenizer: Any, device: torch.device) -> None:
        """Check the loss flags and, unless its log-probs are precomputed, load the frozen reference."""
        if not args.beta > 0:
            raise ValueError(f"--beta must be > 0, got {args.beta}")
        if not 0 <= args.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
        if args.label_smoothing and args.loss != "sigmoid":
            raise ValueError(f"--label_smoothing applies to --loss sigmoid only, not --loss {args.loss}")
        self.args, self.device = args, device
        self.reference = None if args.precompute_ref_logps else self._load_reference(args, tokenizer)

    def _load_reference(self, args: argparse.Namespace, tokenizer: Any) -> Transformer:
        """The model a fresh run starts from, built again (a resumed run's policy has moved away from it), in
        eval mode and float32 like the policy's master weights, with no gradients."""
        start = self.initial_model(args, tokenizer)
        check_model_tokenizer(start, tokenizer, args.tokenizer_path)
        return start.model.float().to(self.device).eval().requires_grad_(False)

    def dataset(self, path: str, tokenizer: Any, args: argparse.Namespace) -> Dataset:
        pairs = PreferenceDataset(path, tokenizer, max_length=args.max_seq_len, skip_bad=args.skip_bad)
        if not args.precompute_ref_logps:
            return pairs
        autocast = autocast_factory(self.device, resolve_dtype(args.dtype, self.device))
        scores = score_pairs(self._load_reference(args, tokenizer), pairs, args.batch_size, self.device, autocast)
        return ScoredPairs(pairs, scores)

    def collate(self, items: list[tuple]) -> PairBatch:
        return collate_pairs(items)

    def loss_units(self, batch: PairBatch) -> torch.Tensor:
        return batch.valid.sum()

    def batch_tokens(self, batch: PairBatch) -> int:
        return batch.x.numel()

    def loss_sums(self, model: torch.nn.Module, batch: PairBatch, device: torch.device) -> dict[str, torch.Tensor]:
        x, y, mask, valid = (t.to(device, non_blocking=True) for t in batch[:4])
        policy = reply_logps(model, x, y, mask)
        if batch.reference is not None:
            reference = batch.reference.to(device, non_blocking=True)
        else:
            with torch.no_grad():
                reference = reply_logps(self.reference, x, y, mask)
        a = self.args
        return dpo_sums(policy, reference, valid, a.beta, a.loss, a.label_smoothing)

    def val_metrics(self, means: dict[str, float]) -> dict[str, float]:
        return {f"val_{k}": v for k, v in means.items()}


def main(argv: list[str] | None = None) -> None:
    trainer.main(DPO(), argv)


if __name__ == "__main__":
    main()
