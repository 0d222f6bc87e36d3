"""Peak FLOP/s for MFU (model FLOPs utilization), and whether other processes compete for the CPU.

GPUs: a datasheet table, matched exactly by model name ("L40" is not "L4", "A10G" is not "A10").
CPUs: a measured matmul peak, cached on disk per CPU model, dtype and torch version
(cpu_features.measured_once), so only the first run on a machine pays the ~0.5 s measurement. Used by trainer.py
and bench/.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from support.model.cpu_features import CACHE_PATH, measured_once
from support.model.cpu_matmul import mm_t

# Dense (no sparsity) 16-bit tensor-core TFLOP/s from NVIDIA's datasheets. Keys are the model name as
# gpu_model() reads it from the CUDA device name, with the form factor where it changes the peak.
GPU_PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "A100": 312.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10": 125.0, "V100": 125.0, "T4": 65.0,
}


def gpu_model(device_name: str) -> str:
    """The table key for a CUDA device name: "NVIDIA H100 PCIe" -> "H100 PCIe", "NVIDIA A100-SXM4-80GB" ->
    "A100", "Tesla T4" -> "T4", "NVIDIA L40" -> "L40"."""
    words = [w for w in re.split(r"[\s\-_]+", device_name) if w not in ("NVIDIA", "Tesla", "")]
    if not words:
        return device_name
    for form in ("PCIe", "NVL"):
        if form in words[1:] and f"{words[0]} {form}" in GPU_PEAK_TFLOPS:
            return f"{words[0]} {form}"
    return words[0]


def measure_matmul_flops(dtype: torch.dtype, n: int = 512, bursts: int = 10, seconds: float = 0.03) -> float:
    """Dense matmul FLOP/s of one CPU thread: the best of a few short bursts, so that other load on the
    machine during the measurement does not lower the peak (and inflate the MFU), and the best of torch's
    own matmul and the model's (cpu_matmul.mm_t: oneDNN for float32 on x86, up to 2x faster than MKL there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        best = 0.0
        for matmul in (torch.matmul, mm_t):
            matmul(a, b)  # warm-up
            for _ in range(bursts):
                iters, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < seconds or iters == 0:
                    matmul(a, b)
                    iters += 1
                best = max(best, 2 * n**3 * iters / elapsed)
        return best
    finally:
        torch.set_num_threads(threads)


def cpu_thread_peak(dtype: torch.dtype, cache_path: Path | None = None) -> float:
    """One thread's matmul FLOP/s in `dtype`, measured once per machine (cpu_features.measured_once)."""
    what = f"1-thread matmul peak, {str(dtype).removeprefix('torch.')} (matmul, mm_t)"
    return float(measured_once(what, lambda: measure_matmul_flops(dtype), cache_path))


def peak_flops(device: torch.device, dtype: torch.dtype, peak_tflops: float = 0.0) -> tuple[float | None, str]:
    """Per-device peak FLOP/s for MFU and where it comes from; (None, why) when unknown."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, "--peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = GPU_PEAK_TFLOPS.get(gpu_model(name))
        if tflops is None:
            return None, f"{name} is not in the peak table (pass --peak_tflops)"
        return tflops * 1e12, f"{name} datasheet 16-bit peak"
    if device.type == "cpu":
        # the best one thread does in any dtype we might train in (on AVX2: float32), times the threads
        threads = torch.get_num_threads()
        peak = threads * max(cpu_thread_peak(d) for d in {torch.float32, dtype})
        return peak, f"measured 1-thread CPU matmul peak x {threads} threads; cached in {CACHE_PATH}"
    return None, f"no peak known for {device.type} (pass --peak_tflops)"


class CpuShare:
    """How many CPUs other processes kept busy since this object was made: the machine's busy time (/proc/stat)
    minus this process's own CPU time, over the wall time. Measured over real work instead of a sleep, so it
    costs nothing at start-up; None off Linux. Not the load average, which lags by a minute."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(machine busy CPU seconds, this process's CPU seconds, wall seconds)."""
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def busy_elsewhere(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[2] - self.start[2] < 0.5:
            return None
        (busy0, own0, wall0), (busy1, own1, wall1) = self.start, end
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
