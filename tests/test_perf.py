"""perf.py: the GPU peak table is matched by exact model name, the CPU peak is measured once and cached, and\nother processes' CPU use is measured over real work."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from support.training import perf


@pytest.mark.parametrize("device_name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0),  # not the L4's 121
    ("NVIDIA L4", 121.0),
    ("Tesla T4", 65.0),
    ("Tesla V100-SXM2-16GB", 125.0),
    ("NVIDIA A10G", None),  # not the A10's 125: unknown, so MFU asks for --peak_tflops
    ("NVIDIA GeForce RTX 4090", None),
])
def test_gpu_peak_table_matches_whole_model_names(device_name, tflops):
    assert perf.GPU_PEAK_TFLOPS.get(perf.gpu_model(device_name)) == tflops


def test_cpu_peak_is_measured_once_then_read_from_the_cache(tmp_path):
    cache = tmp_path / "peak.json"
    measured = perf.cpu_thread_peak(torch.float32, cache)
    assert measured > 1e8  # any CPU does more than 0.1 GFLOP/s
    (key,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: 123.0}))
    assert perf.cpu_thread_peak(torch.float32, cache) == 123.0  # read back, not measured again
    cache.write_text("not json")
    assert perf.cpu_thread_peak(torch.float32, cache) > 1e8  # a broken cache is measured over and rewritten
    assert json.loads(cache.read_text())[key] > 1e8


def test_cpu_share_counts_other_processes_over_real_work():
    share = perf.CpuShare()
    spin = "import time\nend = time.time() + 1.2\nwhile time.time() < end: pass"
    burner = subprocess.Popen([sys.executable, "-c", spin])
    burner.wait(timeout=30)
    # the other process kept one CPU busy for the whole window (other load on the machine can only add)
    assert share.busy_elsewhere() >= 0.8
