"""What this CPU computes natively, asked once. The fast paths and the dtype defaults read it from here.

Most laptops and many servers (AVX2 only) have no bf16 arithmetic: there torch emulates a bf16 matmul, many
times slower than float32. `K_MODEL_NATIVE_BF16=0` (or 1) overrides the answer, so a machine with native bf16
can run the code path of one without it (the tests do, with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2).
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

OVERRIDE = "K_MODEL_NATIVE_BF16"
# measurements of this machine (matmul peaks, which library multiplies faster), kept across runs
CACHE_PATH = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "k_model" / "cpu_measurements.json"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags line of /proc/cpuinfo (empty off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _override() -> bool | None:
    value = os.environ.get(OVERRIDE, "").strip()
    return None if value == "" else value not in ("0", "false", "no")


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX: bf16 matmuls in hardware. Elsewhere they are emulated (~90x slower than float32 on
    an AVX2 CPU). K_MODEL_NATIVE_BF16 overrides the answer."""
    override = _override()
    if override is not None:
        return override
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def onednn_packs_bf16() -> bool:
    """Whether oneDNN's packed bf16 weights run here: torch refuses them without AVX512BW/VL/DQ or
    AVX_NE_CONVERT ("bf16 path needs the cpu support ..."). Off too where bf16 is not native (or is said not
    to be), where they would only speed up an emulated product."""
    return (cpu_has_native_bf16() and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_name() -> str:
    """The model name /proc/cpuinfo gives ("AMD EPYC 7B13"), or "unknown cpu"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


def measured_once(what: str, measure: Callable[[], Any], cache_path: Path | None = None) -> Any:
    """measure()'s JSON-able result, kept in a file per CPU model, torch version, the instruction set torch
    uses (ATEN_CPU_CAPABILITY can narrow it) and thread count, so only the first run on a machine pays for it.
    A cache that cannot be read or written is ignored (then every call measures)."""
    cache_path = cache_path or CACHE_PATH
    key = (f"{cpu_name()} | torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()} | "
           f"{torch.get_num_threads()} threads | {what}")
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    value = measure()
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**cache, key: value}, indent=1))
        os.replace(tmp, cache_path)
    except OSError:
        pass
    return value
