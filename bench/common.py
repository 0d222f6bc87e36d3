"""What every benchmark shares: the machine line printed with each table, and interleaved timing rounds."""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch
import transformers


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: str) -> str:
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    return (
        f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | device: {where}"
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, warmup: int, device: str,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, rounds alternating between them (A B A B ...) after warmup calls, so a
    drift in machine load hits every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    return times
