"""Muon's step against AdamW's on the demo preset, with Muon's Newton-Schulz iteration in bfloat16 (torch.optim.Muon's
choice) and in float32: on a CPU without native bf16 (AVX512_BF16 / AMX) a bf16 matmul is emulated.

    python bench/bench_optim.py                           # the demo preset; ~1 min on 2 AVX2 cores
    python bench/bench_optim.py --threads 1 --clock cpu   # on a machine shared with other jobs

(a) the optimizer step alone, on fixed gradients: AdamW for every weight, or Muon for the 16 block matrices and
    AdamW for the rest (optim.make_optimizer, as --optimizer muon --muon_dtype bfloat16 / float32).
(b) a whole training step (trainer.train_step: forward, backward, clipping, optimizer) with each, in the
    autocast dtype the demo gets here (--dtype auto).
The machine line says whether the CPU has native bf16, and the dtype --muon_dtype auto picks on it. Rounds
alternate the variants (A B C A B C ...) in one process; medians, and ratios against AdamW.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from support.training import optim  # noqa: E402
from support.loading.sources import resolve_dtype  # noqa: E402
from support.training.train_flags import PRESETS  # noqa: E402
from bench_train import packed_batch, step_fn  # noqa: E402
from common import add_clock_flags, clock_of, interleaved, machine_line  # noqa: E402
from k_model import ModelConfig, Transformer  # noqa: E402

CPU = torch.device("cpu")
VARIANTS = {"adamw": ("adamw", "float32"), "muon, NS bfloat16 (torch's)": ("muon", "bfloat16"),
            "muon, NS float32": ("muon", "float32")}


def hyper(optimizer: str, muon_dtype: str) -> argparse.Namespace:
    """The flags optim.make_optimizer reads, at the demo's values."""
    return argparse.Namespace(optimizer=optimizer, learning_rate=1e-3, muon_learning_rate=0.02, weight_decay=0.1,
                              muon_dtype=muon_dtype)


def optimizer_step_fn(cfg: ModelConfig, hp: argparse.Namespace, seed: int):
    """A closure running optimizer.step() alone on a fresh model whose gradients are fixed random tensors."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    optimizer = optim.make_optimizer(model, list(model.parameters()), hp, CPU)
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return optimizer.step


def table(title: str, times: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print("| variant | ms (median) | vs adamw |")
    print("|---|---:|---:|")
    base = statistics.median(times["adamw"])
    for name, ts in times.items():
        print(f"| {name} | {1000 * statistics.median(ts):,.1f} | {statistics.median(ts) / base:.2f}x |")


def main() -> None:
    demo = PRESETS["demo"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=demo["dim"])
    p.add_argument("--n-layers", type=int, default=demo["n_layers"])
    p.add_argument("--n-heads", type=int, default=demo["n_heads"])
    p.add_argument("--n-kv-heads", type=int, default=demo["n_kv_heads"])
    p.add_argument("--vocab-size", type=int, default=4096, help="demo.sh's tokenizer")
    p.add_argument("--seq", type=int, default=demo["max_seq_len"])
    p.add_argument("--batch-size", type=int, default=demo["batch_size"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    add_clock_flags(p)
    args = p.parse_args()
    clock = clock_of(args)
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=args.vocab_size, max_seq_len=args.seq)
    dtype = resolve_dtype("auto", CPU)
    picked, why = (str(t).removeprefix("torch.") for t in optim.muon_dtype("auto", CPU))
    print(f"machine: {machine_line('cpu')}")
    print(f"model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), vocab "
          f"{cfg.vocab_size}, seq {cfg.max_seq_len}, batch {args.batch_size}; autocast {str(dtype).removeprefix('torch.')}; --muon_dtype auto "
          f"picks {picked} ({why}); {args.rounds} rounds, {args.clock} clock, medians")

    steps = {name: optimizer_step_fn(cfg, hyper(*v), args.seed) for name, v in VARIANTS.items()}
    table("(a) optimizer step", interleaved(steps, args.rounds, warmup=1, device="cpu", clock=clock))
    batches = packed_batch(cfg, args.batch_size, args.seed)
    steps = {name: step_fn(cfg, CPU, dtype, batches, args.seed, hyper(*v))[0] for name, v in VARIANTS.items()}
    table("(b) training step", interleaved(steps, args.rounds, warmup=1, device="cpu", clock=clock))


if __name__ == "__main__":
    main()
