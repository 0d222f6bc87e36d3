"""The matmul of every k_model projection on a CPU: float32 products in oneDNN or in torch's default BLAS (MKL),
whichever this machine runs faster, and one-token decode steps that read oneDNN's packed copies of the weights
where those are faster.

    mm_t(a, b)             a @ b.T; float32 on x86 in the library CHOICE["train"] names
    Linear                 nn.Linear without bias whose products go through mm_t (gradients too)
    packed_weights(model)  a context in which decode-sized products read packed weight copies

Which library is faster depends on the CPU: oneDNN's float32 GEMM was 2.2x MKL's on an AMD EPYC Zen 5 and
0.82x on a Zen 3 (MKL takes a generic path on some non-Intel CPUs, not on others). So the choice is measured
on the machine, per shape class (many-row training products, few-row decode products), once: cached on disk
(cpu_features.measured_once). K_MODEL_CPU_MATMUL=torch or =onednn overrides it.

The two oneDNN calls are registered as opaque ops (namespace k_model), so a torch.compile'd graph calls them
as they are: inductor has no lowering of its own for them. Elsewhere (bf16 / fp16 training matmuls, CUDA,
builds without MKL) every product is torch's own. The same products up to float rounding.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from support.model.cpu_features import measured_once, onednn_packs_bf16


# Whether oneDNN's float32 product is there to choose (x86 builds, where torch's own float32 GEMM is MKL's).
ONEDNN = torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


def _onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    # float32 only: bf16 / fp16 matmuls already go to oneDNN; under autocast F.linear must do its casting
    float32 = a.dtype == b.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    # oneDNN refuses empty operands (an SFT micro-batch without one supervised token)
    return CHOICE["train"] == "onednn" and a.device.type == "cpu" and float32 and a.numel() > 0 and b.numel() > 0


def _onednn_mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [None], "")


_OPS = torch.library.Library("k_model", "DEF")


def _opaque_mm_t(name: str, fn):
    """fn(a, b) -> a @ b.T as an op torch.compile keeps opaque: a compiled graph calls it as it is. Registered
    with torch.library.Library rather than custom_op, whose Python wrapper costs a few microseconds more per
    call: a one-token step makes a call per weight matrix."""
    _OPS.define(f"{name}(Tensor a, Tensor b) -> Tensor")
    _OPS.impl(name, fn, "CPU")
    torch.library.register_fake(f"k_model::{name}", lambda a, b: a.new_empty(*a.shape[:-1], b.shape[0]))
    return getattr(torch.ops.k_model, name).default


# The same call for torch.compile: inductor has no lowering of its own for it.
onednn_mm_t = _opaque_mm_t("onednn_mm_t", _onednn_mm_t)


def mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T (a: (..., k), b: (n, k)), every matmul of the model. On a CPU in float32 it runs in oneDNN
    where that measured faster than torch's default BLAS (CHOICE["train"]). The same product up to float
    rounding."""
    return _onednn_product(a, b) if _onednn(a, b) else a @ b.t()


def _onednn_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return onednn_mm_t(a, b) if torch.compiler.is_compiling() else _onednn_mm_t(a, b)


# Decoding multiplies a few rows by every weight matrix, so a step is bound by reading the weights. In
# oneDNN's blocked ("packed") layout the product can read them faster: the bench model's projections, one
# decode step's worth, on a Zen 5 EPYC: 1.1x in float32 at batch 1, 1.6x at batch 8, 1.7x in bf16 (0.67x
# in float32 at batch 1 on a Zen 3, hence the measured CHOICE["decode"]). packed_weights() makes the packed
# copies; decode-sized products read them while they exist.
DECODE_ROWS = 16  # products with at most this many rows (tokens in one step) are decode-sized


def _packable(weight: torch.Tensor) -> bool:
    """On a CPU, no autocast (which would cast the weight for every product), float32 where the packed
    product measured faster, bf16 where oneDNN computes it natively (elsewhere torch refuses to pack it)."""
    if not ONEDNN or weight.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    if weight.dtype == torch.float32:
        return CHOICE["decode"] == "packed"
    return weight.dtype == torch.bfloat16 and BF16_PACKED


def _decode_sized(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A few rows and no gradient: a product where a packed weight pays."""
    rows = x.numel() // max(x.shape[-1], 1)
    return _packable(weight) and x.dtype == weight.dtype and 0 < rows <= DECODE_ROWS and not torch.is_grad_enabled()


def _decode_mm_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through the weight's packed copy where packed_weights() made one, else the weight."""
    return torch.ops.mkldnn._linear_pointwise(x, getattr(weight, "_onednn_packed", weight), None, "none", [], "")


# Opaque to torch.compile too (it cannot take a packed tensor as an input): the compiled decode step passes
# the weight itself, and the packed copy is looked up at run time.
decode_mm_t = _opaque_mm_t("decode_mm_t", _decode_mm_t)


class OneDNNLinear(torch.autograd.Function):
    """x @ weight.T with its gradients, every product in oneDNN (which has no autograd of its own)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn_product(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _onednn_product(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _onednn_product(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1]).t())
        return grad_x, grad_w


def _one_row_compiled(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A single row (batch-1 decoding) in float32 on a CPU, no gradient, while torch.compile traces."""
    return (torch.compiler.is_compiling() and weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and x.numel() == x.shape[-1] and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def one_row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for one row, written as a dot product per output. Inside a compiled graph inductor makes
    it one loop that streams the weight once over the threads, with no library call around it: the bench
    model's whole batch-1 step ran 1.25-1.34x faster this way than through the packed oneDNN products (Zen 3,
    AVX2, float32). With more rows this form reads the weight once per row: the packed product wins there."""
    return (x[..., None, :] * weight).sum(-1)


class Linear(nn.Linear):
    """nn.Linear, bias-free, its matmuls through mm_t, decode steps through the packed weight where there is
    one (or, in a compiled batch-1 step, one_row_product). Same parameters and state_dict as nn.Linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _one_row_compiled(x, self.weight):
            return one_row_product(x, self.weight)
        if _decode_sized(x, self.weight):
            return decode_mm_t(x, self.weight) if torch.compiler.is_compiling() else _decode_mm_t(x, self.weight)
        return OneDNNLinear.apply(x, self.weight) if _onednn(x, self.weight) else F.linear(x, self.weight)


@contextlib.contextmanager
def packed_weights(model: nn.Module) -> Iterator[None]:
    """Within it, decode steps on a CPU (float32 or bf16 weights, no autocast) read copies of the model's
    Linear weights in oneDNN's packed layout: made on entry, dropped on exit, reused by a nested call. The
    weights must not change within: nothing would tell the copies (a fused optimizer step does not even count
    as a change of the tensor)."""
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, Linear)}.values()
    fresh = [w for w in weights if _packable(w) and not hasattr(w, "_onednn_packed")]
    with torch.no_grad():
        for w in fresh:
            w._onednn_packed = torch.ops.mkldnn._reorder_linear_weight(w, DECODE_ROWS)
    try:
        yield
    finally:
        for w in fresh:
            del w._onednn_packed


def _best_seconds(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Each fn's best time: one warm-up call each, then rounds taking turns (A B A B ...), the best round
    counting (the one least disturbed by other load on the machine)."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def time_libraries(dim: int = 512, hidden: int = 1024, rows: int = 256) -> dict[str, dict[str, float]]:
    """Seconds of each float32 path on this machine: for training, one projection's forward and backward
    (three products of `rows` tokens) through oneDNN or torch; for decoding, products of 1 and 8 rows through
    the weight's packed copy or torch. Well under a second on 2 cores; fixed seed."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=gen)
    w = torch.randn(hidden, dim, generator=gen).requires_grad_()
    train = {name: (lambda product=product: product(x, w).sum().backward())
             for name, product in (("onednn", OneDNNLinear.apply), ("torch", F.linear))}
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, DECODE_ROWS)
        inputs = [torch.randn(n, dim, generator=gen) for n in (1, 8)]
        decode = _best_seconds({"packed": lambda: [_decode_mm_t(a, packed) for a in inputs],
                                "torch": lambda: [F.linear(a, w) for a in inputs]}, rounds=5)
    return {"train": _best_seconds(train, rounds=5), "decode": decode}


def measure_choice(margin: float = 0.9) -> dict[str, str]:
    """Each shape class's library (time_libraries): oneDNN's only where it took under `margin` of torch's
    time, so that a close call, or one a busy machine blurred, keeps torch's default."""
    choice = {}
    for shapes, seconds in time_libraries().items():
        other = next(name for name in seconds if name != "torch")
        choice[shapes] = other if seconds[other] < margin * seconds["torch"] else "torch"
    return choice


def _choose() -> dict[str, str]:
    forced = os.environ.get("K_MODEL_CPU_MATMUL", "")
    if not ONEDNN or forced == "torch":
        return {"train": "torch", "decode": "torch"}
    if forced == "onednn":
        return {"train": "onednn", "decode": "packed"}
    return measured_once("float32 matmul: onednn or torch", measure_choice)


def describe_choice() -> str:
    """One line for the logs: which library multiplies float32 here and why."""
    if not ONEDNN:
        return "float32 matmuls: torch's (no oneDNN in this build)"
    how = "K_MODEL_CPU_MATMUL" if os.environ.get("K_MODEL_CPU_MATMUL") else "measured, cached"
    decode = "oneDNN packed weights" if CHOICE["decode"] == "packed" else "torch"
    train = "oneDNN" if CHOICE["train"] == "onednn" else "torch"
    return f"CPU float32 matmuls: training {train}, decoding {decode} ({how})"


# decided once per process, at import: a compiled graph reads these as constants
CHOICE: dict[str, str] = _choose()
BF16_PACKED = ONEDNN and onednn_packs_bf16()
