"""Validation loss of a model at its trained context L and at a longer one, with and without RoPE scaling.

  python bench/bench_long_context.py --base out/base64 --tuned out/yarn256 --control out/plain64

Every row reads the same validation tokens, cut into windows of the tuned model's context (4L in README),
each token predicted from those before it in its piece of the window:
  base, pieces of L        the base model at the context it was trained at (the reference);
  base, plain RoPE         the base reads the whole window: positions beyond L it never saw in training;
  base + <scaling>         the same weights with the tuned run's rope scaling, before any training;
  tuned                    the --rope_scaling fine-tune;
  control, pieces of L     the same fine-tune (as many steps and tokens) at context L without scaling:
                           what the extra training alone gives.
Columns: mean loss over all positions, and over positions >= L only (the tokens that have more than L before
them, where a longer context can help and unseen positions can hurt).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import machine_line  # noqa: E402
from dataset import PretrainDataset  # noqa: E402
from support.loading.checkpoint import rebuilt  # noqa: E402
from support.loading.sources import open_model  # noqa: E402


def position_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, piece: int) -> torch.Tensor:
    """(N, W) loss of each token of windows x -> y, the model reading each window in pieces of `piece` tokens."""
    losses = []
    for xs, ys in zip(x.split(piece, dim=1), y.split(piece, dim=1)):
        logits = model(xs).logits
        losses.append(F.cross_entropy(logits.transpose(1, 2), ys, reduction="none"))
    return torch.cat(losses, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the model trained at context L (run dir, ckpt.pt or HF dir)")
    p.add_argument("--tuned", required=True, help="its --rope_scaling fine-tune at the longer context")
    p.add_argument("--control", help="the base fine-tuned as --tuned was, at its own context (optional)")
    p.add_argument("--val", default="out/data/pretrain_val.bin", help="validation tokens")
    p.add_argument("--batch_size", type=int, default=16)
    args = p.parse_args()
    torch.set_grad_enabled(False)

    base, tokenizer, _ = open_model(args.base)
    tuned = open_model(args.tuned, own_tokenizer=False)[0]
    L, W, scaling = base.config.max_seq_len, tuned.config.max_seq_len, tuned.config.rope_scaling_params
    val = PretrainDataset(args.val, tokenizer, max_length=W)
    x, y = (torch.stack([val[i][k] for i in range(len(val))]) for k in (0, 1))
    kind = f"{scaling['rope_type']} x{scaling['factor']:g}"
    rows = [(f"base, pieces of {L}", base, L), (f"base, plain RoPE at {W}", rebuilt(base, max_seq_len=W), W),
            (f"base + {kind}, untrained", rebuilt(base, max_seq_len=W, rope_scaling_params=scaling), W),
            (f"{kind} fine-tune at {W}", tuned, W)]
    if args.control:
        rows.append((f"control: fine-tune at {L}, pieces", open_model(args.control, own_tokenizer=False)[0], L))

    print(machine_line("cpu"))
    print(f"{len(val)} validation windows of {W} tokens ({args.val}); base context L = {L}")
    print(f"| {'model':<32} | loss, all positions | loss, positions >= {L} |")
    print(f"|{'-' * 34}|---------------------|{'-' * (24 + len(str(L)))}|")
    for name, model, piece in rows:
        model.float().eval()
        losses = torch.cat([position_losses(model, xb, yb, piece)
                            for xb, yb in zip(x.split(args.batch_size), y.split(args.batch_size))])
        print(f"| {name:<32} | {losses.mean():19.3f} | {losses[:, L:].mean():{22 + len(str(L))}.3f} |")


if __name__ == "__main__":
    main()
