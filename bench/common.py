"""What every benchmark shares: the machine line printed with each table, interleaved timing rounds, and
two measurements of the machine itself (memory read bandwidth, peak memory of a call)."""
from __future__ import annotations

import argparse
import ctypes
import os
import time
from collections.abc import Callable

import torch
import transformers


def machine_line(device: str) -> str:
    from support.model.cpu_features import cpu_has_native_bf16, cpu_name  # the repo root is on sys.path in every bench

    bf16 = ", native bf16" if cpu_has_native_bf16() else ""
    cpu = f"cpu ({torch.backends.cpu.get_cpu_capability()}{bf16})"
    where = torch.cuda.get_device_name() if device == "cuda" else cpu
    return (
        f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads | torch {torch.__version__} | "
        f"transformers {transformers.__version__} | device: {where}"
    )


def add_clock_flags(p: argparse.ArgumentParser) -> None:
    """--threads and --clock: how a benchmark runs and measures on a machine shared with other jobs."""
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (the number that matters); cpu: this process's CPU time, for a CPU "
                        "shared with other jobs - with --threads 1 it approximates the time on an idle machine")


def clock_of(args: argparse.Namespace) -> Callable[[], float]:
    """Applies --threads; returns the clock --clock names."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return time.perf_counter if args.clock == "wall" else time.process_time


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


def read_bandwidth(device: str, nbytes: int = 2**29) -> float:
    """Bytes per second this device reads from memory with torch's current threads: the best of 5 sums over
    a float32 buffer of nbytes, far larger than CPU caches. Decoding one token reads every weight once, so
    weight bytes / this is the least time a decode step can take."""
    x = torch.ones(nbytes // 4, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def peak_memory(fn: Callable[[], None], device: str) -> int | None:
    """Bytes fn allocates at its peak on top of what was allocated before it. CUDA: the caching allocator's
    statistics. CPU (Linux): the rise of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs), with glibc told to map every block of 64 KiB or more directly and to hand its
    free memory back first, so that no allocation is served unseen from memory freed earlier. That setting
    stays for the rest of the process and slows allocation: measure after timing. None where neither is
    available."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixed, no longer adapts upwards)
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)  # free heap pages leave the resident set: reusing them counts again
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak resident set := current resident set
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) * 1024
    except (OSError, AttributeError):  # not Linux / not glibc
        return None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")
