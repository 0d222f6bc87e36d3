"""Time to quality: wall-clock and steps to reach a validation loss, pretraining the demo model (--preset demo)
on the embedded corpus that `bash demo.sh` builds (out/data/pretrain.bin, pretrain_val.bin).

    python bench/bench_speedrun.py           # ~15 min on an idle 2-core CPU: 300 steps x 4 variants x 3 seeds
    python bench/bench_speedrun.py --full    # the demo's 600 steps, evaluated every 25 steps on 256 samples

Variants, all from the same initial weights and batches for a given seed, under the same autocast dtype:
  hf        transformers' LlamaForCausalLM (our weights, converted), torch AdamW and transformers'
            get_cosine_schedule_with_warmup: what a user of HF would write
  adamw     ours: k_model.Transformer, trainer.train_step, AdamW (fused), cosine (--optimizer adamw)
  muon      ours with --optimizer muon (Muon for the block matrices, AdamW for the rest), cosine
  muon_wsd  ours with --optimizer muon --lr_schedule wsd
Every run lives in this one process, and the runs take turns (A B C D A B C D ...) one evaluation interval at
a time, so drifting machine load (a shared machine) hits every variant alike. Only training is timed;
evaluations are not. Time and steps to the target are interpolated linearly between evaluations. The
target defaults to the val loss every seed of the baseline (hf) reaches by its last step; "val @ T" is each variant's
val loss after T seconds of training, T = the shortest run's training time.
Prints the machine and a table of medians (min-max over seeds); draws val loss against wall time (--plot).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from support.training import optim  # noqa: E402
from support.training import train_task  # noqa: E402
import trainer  # noqa: E402
from common import machine_line  # noqa: E402
from dataset import PretrainDataset  # noqa: E402
from support.model.hf_llama import to_hf_llama  # noqa: E402
from k_model import ModelConfig, Transformer  # noqa: E402
from support.loading.sources import resolve_dtype  # noqa: E402
from support.training.train_flags import PRESETS  # noqa: E402

VARIANTS = ("hf", "adamw", "muon", "muon_wsd")
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Run:
    """One (variant, seed): step(i, batch) trains step i; val_loss(x, y) is the mean loss of a batch."""
    variant: str
    seed: int
    model: torch.nn.Module
    step: Callable[[int, Batch], None]
    val_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    seconds: float = 0.0
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, training seconds, val loss)


def our_run(variant: str, seed: int, cfg: ModelConfig, a: argparse.Namespace, autocast) -> Run:
    torch.manual_seed(seed)
    model = Transformer(cfg).train()
    hp = argparse.Namespace(optimizer="adamw" if variant == "adamw" else "muon", learning_rate=a.lr,
                            muon_learning_rate=a.muon_lr, muon_dtype="auto", weight_decay=0.1)
    optimizer = optim.make_optimizer(model, list(model.parameters()), hp, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    schedule = "wsd" if variant.endswith("_wsd") else "cosine"

    def step(i: int, batch: Batch) -> None:
        optimizer.set_lr(partial(optim.lr_at, i, warmup=a.warmup, total=a.steps, schedule=schedule,
                                 decay_fraction=a.decay_fraction))
        trainer.train_step(model, optimizer, scaler, [batch], device=torch.device("cpu"), autocast=autocast,
                           grad_clip=1.0)

    return Run(variant, seed, model, step, lambda x, y: model(x, y).last_loss.mean())


def hf_run(seed: int, cfg: ModelConfig, a: argparse.Namespace, autocast) -> Run:
    torch.manual_seed(seed)
    model = to_hf_llama(Transformer(cfg)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, a.warmup, a.steps)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten())

    def step(i: int, batch: Batch) -> None:
        x, y, _ = batch
        with autocast():
            value = loss(x, y)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    return Run("hf", seed, model, step, loss)


@torch.no_grad()
def evaluate(run: Run, val: list[Batch], autocast) -> float:
    run.model.eval()
    with autocast():
        losses = [float(run.val_loss(x, y)) for x, y, _ in val]
    run.model.train()
    return statistics.fmean(losses)


def batches(dataset: PretrainDataset, batch_size: int, count: int, seed: int) -> list[Batch]:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    order = (order * (1 + count * batch_size // len(order)))[: count * batch_size]
    return [train_task.collate_trimmed([dataset[j] for j in order[i : i + batch_size]])
            for i in range(0, len(order), batch_size)]


def interpolate(curve: list[tuple[int, float, float]], at: float, key: int, want: int, falling: bool) -> float | None:
    """Column `want` of the curve where column `key` reaches `at`, linearly between points (None: never).
    falling: `key` decreases along the curve (val loss) rather than increasing (steps, seconds)."""
    for before, after in zip(curve, curve[1:]):
        lo, hi = (after[key], before[key]) if falling else (before[key], after[key])
        if lo <= at <= hi and hi > lo:
            t = (before[key] - at) / (before[key] - after[key])
            return before[want] + t * (after[want] - before[want])
    return None


def spread(values: list[float | None], fmt: str) -> str:
    if any(v is None for v in values):
        return f"not reached ({sum(v is None for v in values)}/{len(values)})"
    median = statistics.median(values)
    return f"{median:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(runs: list[Run], target: float, seeds: list[int], variants: list[str]) -> None:
    by = {v: [r for r in runs if r.variant == v] for v in variants}
    equal_time = min(r.seconds for r in runs)
    base = [interpolate(r.curve, target, 2, 1, falling=True) for r in by[variants[0]]]
    print(f"\ntarget val loss {target:.4f}; equal wall time T = {equal_time:.1f} s of training; "
          f"medians (min-max) over seeds {seeds}")
    print(f"{'variant':<10} {'ms/step':>8} {'s to target':>22} {'steps to target':>20} "
          f"{'speedup vs ' + variants[0]:>14} {'val @ T':>24} {'final val':>24}")
    for v, rs in by.items():
        times = [interpolate(r.curve, target, 2, 1, falling=True) for r in rs]
        steps = [interpolate(r.curve, target, 2, 0, falling=True) for r in rs]
        at_t = [interpolate(r.curve, equal_time, 1, 2, falling=False) for r in rs]
        ms = statistics.median(1000 * r.seconds / r.curve[-1][0] for r in rs)
        ratios = [b / t if b is not None and t is not None else None for b, t in zip(base, times)]
        finals = [r.curve[-1][2] for r in rs]
        print(f"{v:<10} {ms:>8.0f} {spread(times, '.1f'):>22} {spread(steps, '.0f'):>20} "
              f"{spread(ratios, '.2f'):>14} {spread(at_t, '.3f'):>24} {spread(finals, '.3f'):>24}")


def plot(runs: list[Run], variants: list[str], target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, v in zip(("tab:gray", "tab:blue", "tab:orange", "tab:green"), variants):
        for i, r in enumerate(r for r in runs if r.variant == v):
            ax.plot([s for _, s, _ in r.curve], [loss for *_, loss in r.curve], color=colour, alpha=0.8,
                    label=v if i == 0 else None)
    ax.axhline(target, color="black", linestyle=":", linewidth=1, label=f"target {target:.3f}")
    ax.set(xlabel="training wall time (s)", ylabel="val loss", title="demo preset on the embedded corpus")
    ax.set_ylim(top=min(8.5, max(loss for r in runs for *_, loss in r.curve[1:]) + 0.2))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the demo's 600 steps, eval every 25 on 256 samples")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--eval_samples", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="the first is the baseline")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW's peak lr (demo.sh's pretraining lr)")
    p.add_argument("--muon_lr", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=0, help="warmup steps; 0 = a twelfth of --steps (demo: 50 of 600)")
    p.add_argument("--decay_fraction", type=float, default=0.2)
    p.add_argument("--target", type=float, help="val loss to reach; default: the highest final val loss of the "
                   "baseline's seeds (every seed of it reaches the target)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    p.add_argument("--data_path", default=os.path.join(ROOT, "out/data/pretrain.bin"))
    p.add_argument("--val_data_path", default=os.path.join(ROOT, "out/data/pretrain_val.bin"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs/speedrun.png"))
    a = p.parse_args()
    if a.full:
        a.steps, a.eval_samples = 600, 256
    a.warmup = a.warmup or a.steps // 12
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    dtype = resolve_dtype("auto", device)
    autocast = trainer.autocast_factory(device, dtype)
    preset = PRESETS["demo"]
    try:
        train_set = PretrainDataset(a.data_path, max_length=preset["max_seq_len"])
        val_set = PretrainDataset(a.val_data_path, max_length=preset["max_seq_len"])
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e} (build the demo data first: the data, tokenizer and pretokenize stages of demo.sh)")
    cfg = ModelConfig(dim=preset["dim"], n_layers=preset["n_layers"], n_heads=preset["n_heads"],
                      n_kv_heads=preset["n_kv_heads"], vocab_size=train_set.meta["vocab_size"],
                      max_seq_len=preset["max_seq_len"], dropout=0.0)
    val = [train_task.collate_trimmed([val_set[j] for j in range(i, min(i + 16, a.eval_samples, len(val_set)))])
           for i in range(0, min(a.eval_samples, len(val_set)), 16)]
    print("machine: " + machine_line("cpu") + f" | autocast {str(dtype).removeprefix('torch.')} | load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    print(f"demo preset: {Transformer(cfg).num_params() / 1e6:.2f}M params; {a.steps} steps x "
          f"{preset['batch_size']} x {cfg.max_seq_len} tokens; lr {a.lr} (AdamW), {a.muon_lr} (Muon), warmup "
          f"{a.warmup}, wsd decay {a.decay_fraction}; val: {sum(len(b[0]) for b in val)} samples every "
          f"{a.eval_every} steps")

    runs, data = [], {}
    for seed in a.seeds:
        data[seed] = batches(train_set, preset["batch_size"], a.steps, seed)
        for v in a.variants:
            runs.append(hf_run(seed, cfg, a, autocast) if v == "hf" else our_run(v, seed, cfg, a, autocast))
    for r in runs:
        r.curve.append((0, 0.0, evaluate(r, val, autocast)))
    started = time.perf_counter()
    for first in range(0, a.steps, a.eval_every):
        for r in runs:
            t0 = time.perf_counter()
            for i in range(first, min(first + a.eval_every, a.steps)):
                r.step(i, data[r.seed][i])
            r.seconds += time.perf_counter() - t0
            r.curve.append((i + 1, r.seconds, evaluate(r, val, autocast)))
        print(f"step {i + 1} (variant/seed val loss @ training s): "
              + ", ".join(f"{r.variant}/{r.seed} {r.curve[-1][2]:.3f} @ {r.seconds:.0f}" for r in runs), flush=True)
    print(f"all runs: {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")
    finals = [r.curve[-1][2] for r in runs if r.variant == a.variants[0]]
    target = a.target if a.target is not None else max(finals)
    report(runs, target, a.seeds, a.variants)
    if a.plot:
        plot(runs, a.variants, target, a.plot)


if __name__ == "__main__":
    main()
