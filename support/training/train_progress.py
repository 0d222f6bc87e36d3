"""The training loop's progress lines: the loss means of the steps since the last line, tokens/s and MFU, a
note when other processes compete for the CPU, and curves.png after each evaluation (trainer.py)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from support.training.perf import CpuShare
from plot_runs import draw_curves
from support.training.trainer_utils import DistInfo, RunLogger


CURVES_EVERY_S = 30.0  # the least time between two drawings of curves.png before the run's end


@dataclass
class Window:
    """The steps since the last progress line: their loss means stay on the device until it is printed."""
    means: list[dict[str, torch.Tensor]] = field(default_factory=list)
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)


class Progress:
    """Collects each step's loss means and tokens, and prints them as one line per --log_interval."""

    def __init__(self, log: RunLogger, d: DistInfo, metrics: tuple[str, ...], flops_per_token: int,
                 peak: float | None, watch_cpu: bool):
        self.log, self.d, self.metrics = log, d, metrics
        self.flops_per_token, self.peak = flops_per_token, peak
        self.cpu_share = CpuShare() if watch_cpu else None
        self.curves_note_given = False
        self.curves_drawn_at = time.monotonic()  # a run's first drawing waits as long as a redrawing
        self.window = Window()

    def add_step(self, means: dict[str, torch.Tensor], tokens: int) -> None:
        self.window.means.append(means)
        self.window.tokens += tokens

    def leave_out(self, seconds: float) -> None:
        """Time spent on something else (evaluation) does not count towards tokens/s."""
        self.window.start += seconds

    def report(self, step: int, total_steps: int, lrs: dict[str, float], epoch: int, bar: tqdm) -> None:
        """lrs: each optimizer's learning rate (optim.Optimizers.set_lr); AdamW's is shown as lr, Muon's as muon lr."""
        if self.cpu_share is not None:
            self._note_cpu_contention()
        d, names = self.d, self.metrics
        steps = self.window.means
        sums = [torch.stack([m[k] for m in steps]).sum() for k in names]
        stats = torch.stack([*sums, torch.tensor(float(self.window.tokens), device=d.device)])
        if d.world_size > 1:
            dist.all_reduce(stats)
        *values, tokens = stats.tolist()
        # each rank holds its share of the step means (see train_steps.train_step)
        means = {k: v / d.world_size / len(steps) for k, v in zip(names, values)}
        seconds = time.perf_counter() - self.window.start
        tok_s = tokens / seconds
        mfu = tok_s * self.flops_per_token / (self.peak * d.world_size) if self.peak else None
        mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
        # per-layer metrics (named with a "/": an MoE model's expert load) go to metrics.jsonl only
        shown = " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in means.items() if "/" not in k)
        lr_values = {"lr": lrs["adamw"], **({"muon_lr": lrs["muon"]} if "muon" in lrs else {})}
        lr_text = " | ".join(f"{k.replace('_', ' ')} {v:.2e}" for k, v in lr_values.items())
        bar.set_postfix_str(f"{shown} {lr_text.replace(' |', '')} {tok_s:,.0f} tok/s mfu {mfu_text}", refresh=False)
        self.log.info(f"step {step}/{total_steps} | {shown} | {lr_text} | {tok_s:,.0f} tok/s | "
                      f"mfu {mfu_text} | {1000 * seconds / len(steps):.0f} ms/step")
        self.log.metrics(step, {**means, **lr_values, "tok_per_s": tok_s, "mfu": mfu, "epoch": epoch})
        self.window = Window()

    def _note_cpu_contention(self) -> None:
        """Once, at the first progress line: multi-threaded CPU steps slow down several times when other
        processes (other ranks included; DataLoader workers would count too, so not with them) want the cores."""
        threads = torch.get_num_threads()
        busy = self.cpu_share.busy_elsewhere()
        self.cpu_share = None
        if busy is not None and threads > 1 and busy + threads > (os.cpu_count() or 1) + 0.5:
            self.log.info(f"note: other processes keep {busy:.1f} of {os.cpu_count()} CPUs busy: "
                          f"{threads} threads per process can be several times slower than --num_threads 1")

    def draw_curves(self, out_dir: Path, final: bool) -> None:
        """out_dir/curves.png from metrics.jsonl (plot_runs.py) at the run's end, and before it where the last
        drawing is CURVES_EVERY_S old: a drawing takes about a second of CPU, which frequent evaluations of a
        short run would pay again and again. Without matplotlib, one note and no more tries."""
        if self.curves_note_given or not final and time.monotonic() - self.curves_drawn_at < CURVES_EVERY_S:
            return
        self.curves_drawn_at = time.monotonic()
        try:
            draw_curves(out_dir)
        except ImportError as e:
            self.log.info(f"note: no curves.png ({e})")
            self.curves_note_given = True
