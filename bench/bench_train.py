"""Training-loop throughput: trainer.train_step (forward, backward, clipping, AdamW) on one model.

    python bench/bench_train.py                  # CPU (and CUDA when present); ~1 min on 2 AVX2 cores
    python bench/bench_train.py --dim 256 --n-layers 4 --seq 256 --batch-size 8 --rounds 7

(a) float32 vs bfloat16 autocast, same model, weights and tokens, on CPU and on CUDA when present;
    tokens/s and MFU (model FLOPs per token x tokens/s over the peak that trainer.py uses for MFU, perf.py:
    the GPU datasheet, or on CPU the best measured one-thread matmul rate x threads).
(b) SFT-shaped batches (right-padded, answers end at random lengths in [seq/8, seq/2]): trainer's
    collate_trimmed (drop the columns past the last answer token) vs training on the full padding.
(c) with more than one torch thread: float32 with all threads vs one thread.
Rounds alternate the variants (A B A B ...) in one process so drifting machine load hits all alike;
the table shows medians and ratios against the first row.
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
from support.training import perf  # noqa: E402
from support.training import train_task  # noqa: E402
import trainer  # noqa: E402
from common import interleaved, machine_line  # noqa: E402
from k_model import ModelConfig, Transformer  # noqa: E402


ADAMW = argparse.Namespace(optimizer="adamw", learning_rate=1e-3, weight_decay=0.1)


def step_fn(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, batches: list, seed: int,
            hp: argparse.Namespace = ADAMW):
    """A closure running one train_step on its own model and optimizer (`hp`: optim.make_optimizer's flags);
    the same initial weights for every variant."""
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device)
    optimizer = optim.make_optimizer(model, list(model.parameters()), hp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = trainer.autocast_factory(device, dtype)

    def run() -> None:
        trainer.train_step(model, optimizer, scaler, batches, device=device, autocast=autocast, grad_clip=1.0)

    return run, model.flops_per_token(cfg.max_seq_len)


def with_threads(fn, n: int):
    """fn run with n torch threads (restoring the previous count), so variants can differ in threads."""
    def run() -> None:
        previous = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            fn()
        finally:
            torch.set_num_threads(previous)

    return run


def packed_batch(cfg: ModelConfig, batch_size: int, seed: int) -> list[train_task.Batch]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, cfg.vocab_size, (batch_size, cfg.max_seq_len + 1), generator=g)
    return [(w[:, :-1], w[:, 1:], torch.ones(batch_size, cfg.max_seq_len))]


def sft_items(cfg: ModelConfig, batch_size: int, seed: int) -> list[train_task.Batch]:
    """Right-padded samples: prompt, then an answer (mask 1) ending at a random length, then padding."""
    g = torch.Generator().manual_seed(seed)
    L, items = cfg.max_seq_len, []
    for _ in range(batch_size):
        end = int(torch.randint(L // 8, L // 2 + 1, (1,), generator=g))
        ids = torch.randint(5, cfg.vocab_size, (L + 1,), generator=g)
        ids[end + 1 :] = 0  # pad id
        mask = torch.zeros(L)
        mask[end // 2 : end] = 1
        items.append((ids[:-1], ids[1:], mask))
    return items


def table(title: str, times: dict[str, list[float]], tokens: dict[str, int], flops: dict[str, float],
          peak: float | None) -> None:
    print(f"\n{title}")
    print("| variant | ms/step (median) | tokens/s | MFU | speed vs first row |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, ts in times.items():
        med = statistics.median(ts)
        base = base or med
        tok_s = tokens[name] / med
        mfu = f"{tok_s * flops[name] / peak:.1%}" if peak else "n/a"
        print(f"| {name} | {1000 * med:,.1f} | {tok_s:,.0f} | {mfu} | {base / med:.2f}x |")


def bench_dtypes(cfg: ModelConfig, batch_size: int, rounds: int, seed: int) -> None:
    """(a) float32 vs bfloat16 autocast on each device."""
    packed = packed_batch(cfg, batch_size, seed)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        fns, flops = {}, {}
        for label, dtype in (("float32", torch.float32), ("bfloat16 autocast", torch.bfloat16)):
            name = f"{device.type} {label}"
            fns[name], flops[name] = step_fn(cfg, device, dtype, packed, seed)
        peak, source = perf.peak_flops(device, torch.bfloat16)
        times = interleaved(fns, rounds, warmup=1, device=device.type)
        print(f"\nmachine: {machine_line(device.type)}")
        print(f"MFU peak: {peak / 1e12:.3g} TFLOP/s ({source})" if peak else f"MFU: {source}")
        table(f"(a) dtype, {device.type}", times, {n: batch_size * cfg.max_seq_len for n in fns}, flops, peak)


def bench_sft_trim(cfg: ModelConfig, batch_size: int, rounds: int, seed: int) -> None:
    """(b) a right-padded SFT batch trained as is vs trimmed by collate_trimmed."""
    items = sft_items(cfg, batch_size, seed)
    full = [tuple(torch.stack(t) for t in zip(*items))]
    trimmed = [train_task.collate_trimmed(items)]
    fns, flops = {}, {}
    for name, batches in (("full padding", full), ("collate_trimmed", trimmed)):
        fns[name], flops[name] = step_fn(cfg, torch.device("cpu"), torch.float32, batches, seed)
    times = interleaved(fns, rounds, warmup=1, device="cpu")
    answer_tokens = int(full[0][2].sum())
    table(f"(b) SFT batch, cpu float32: {batch_size} x {cfg.max_seq_len} right-padded, trimmed to "
          f"{trimmed[0][0].shape[1]} columns; tokens/s counts the {answer_tokens} answer tokens",
          times, {n: answer_tokens for n in fns}, flops, None)


def bench_threads(cfg: ModelConfig, batch_size: int, rounds: int, seed: int) -> None:
    """(c) float32 with all torch threads vs one thread."""
    packed = packed_batch(cfg, batch_size, seed)
    threads = torch.get_num_threads()
    fns, flops = {}, {}
    for n in (threads, 1):
        name = f"cpu float32, {n} thread(s)"
        step, flops[name] = step_fn(cfg, torch.device("cpu"), torch.float32, packed, seed)
        fns[name] = with_threads(step, n)
    times = interleaved(fns, rounds, warmup=1, device="cpu")
    peak, _ = perf.peak_flops(torch.device("cpu"), torch.float32)
    table(f"(c) threads, cpu float32; MFU against the {threads}-thread peak (other busy processes slow "
          f"multi-threaded steps most)", times, {n: batch_size * cfg.max_seq_len for n in fns}, flops, peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=6144)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch default")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=args.vocab_size, max_seq_len=args.seq)
    print(f"model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), vocab "
          f"{cfg.vocab_size}, seq {cfg.max_seq_len}, batch {args.batch_size}; {args.rounds} rounds, medians")

    bench_dtypes(cfg, args.batch_size, args.rounds, args.seed)
    bench_sft_trim(cfg, args.batch_size, args.rounds, args.seed)
    if torch.get_num_threads() > 1:
        bench_threads(cfg, args.batch_size, args.rounds, args.seed)


if __name__ == "__main__":
    main()
