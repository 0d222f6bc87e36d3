"""What this CPU computes natively, asked once. The fast paths and the dtype defaults read it from here.

Most laptops and many servers (AVX2 only) have no bf16 arithmetic: there torch emulates a bf16 matmul, many
times slower than float32. `K_MODEL_NATIVE_BF16=0` (or 1) overrides the answer, so a machine with native bf16
can run the code path of one without it (the tests do, with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

OVERRIDE = "K_MODEL_NATIVE_BF16"


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
    return cpu_has_native_bf16() and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
