"""The matmul of every k_model projection on a CPU: float32 products in oneDNN instead of MKL, and one-token
decode steps that read oneDNN's packed copies of the weights.

    mm_t(a, b)             a @ b.T; oneDNN for float32 on x86 (2.2x faster than MKL on the AMD EPYC measured)
    Linear                 nn.Linear without bias whose products go through mm_t (gradients too)
    packed_weights(model)  a context in which decode-sized products read packed weight copies

The two oneDNN calls are registered as opaque ops (namespace k_model), so a torch.compile'd graph calls them
as they are: inductor has no lowering of its own for them. Elsewhere (bf16 / fp16 matmuls, CUDA, builds
without MKL) every product is torch's own. The same products up to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


# Route float32 matmuls to oneDNN where torch's own float32 GEMM is MKL's (x86 builds); see mm_t.
ONEDNN = torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


def _onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    # float32 only: bf16 / fp16 matmuls already go to oneDNN; under autocast F.linear must do its casting
    float32 = a.dtype == b.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    # oneDNN refuses empty operands (an SFT micro-batch without one supervised token)
    return ONEDNN and a.device.type == "cpu" and float32 and a.numel() > 0 and b.numel() > 0


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
    rather than torch's default BLAS (MKL), whose float32 GEMM takes a generic path on non-Intel CPUs:
    2.2x slower on the AMD EPYC (Zen 5) this was measured on, for training shapes and one-token decoding
    alike. The same product up to float rounding."""
    if not _onednn(a, b):
        return a @ b.t()
    return onednn_mm_t(a, b) if torch.compiler.is_compiling() else _onednn_mm_t(a, b)


# Decoding multiplies a few rows by every weight matrix, so a step is bound by reading the weights. In
# oneDNN's blocked ("packed") layout the product reads them faster: the bench model's projections, one
# decode step's worth, on the AMD EPYC above: 1.1x in float32 at batch 1, 1.6x at batch 8, 1.7x in bf16.
# packed_weights() makes the packed copies; decode-sized products read them while they exist.
DECODE_ROWS = 16  # products with at most this many rows (tokens in one step) are decode-sized


def _packable(weight: torch.Tensor) -> bool:
    """On a CPU, float32 or bf16, no autocast (which would cast the weight for every product)."""
    return (ONEDNN and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_autocast_enabled("cpu"))


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
    """x @ weight.T with its gradients, every product through mm_t (oneDNN has no autograd of its own)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return mm_t(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = mm_t(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = mm_t(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1]).t())
        return grad_x, grad_w


class Linear(nn.Linear):
    """nn.Linear, bias-free, its matmuls through mm_t, decode steps through the packed weight where there is
    one. Same parameters and state_dict as nn.Linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
