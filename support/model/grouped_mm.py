"""The experts' matmul of k_model.MoEFeedForward: rows grouped by expert, each group times its expert's matrix.

    grouped_mm(x, w, ends)   rows ends[e-1]:ends[e] of x (N, in) times w[e].T, w (experts, out, in) -> (N, out)

torch._grouped_mm does every group in one call, with no host sync (the group sizes stay on the device); it needs
torch >= 2.8, and on CUDA bf16 (H100-class GPUs). Where it is missing or refuses (rows not 16-byte aligned), one
matmul per expert over its slice, which reads the group sizes on the host. Under autocast both run in
autocast's dtype, as nn.Linear would. In a torch.compile'd graph without gradients (the compiled decode step)
the call is an opaque op, k_model::grouped_mm: torch's own shape rules for _grouped_mm accept bf16 only, though
the CPU kernel runs float32; a compiled training graph takes the per-expert loop (a graph break).
"""

from __future__ import annotations

import torch

GROUPED_MM = hasattr(torch, "_grouped_mm")


def _fits_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], w.shape[-2]))
    return GROUPED_MM and aligned and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


@torch.library.custom_op("k_model::grouped_mm", mutates_args=())
def _opaque_grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=ends.to(torch.int32))


@_opaque_grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (N, in) with expert e's rows at ends[e-1]:ends[e] (ends: (experts,) int, ascending, ends[-1] = N);
    w (experts, out, in) -> (N, out)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if _fits_grouped_mm(x, w):
        if not torch.compiler.is_compiling():
            return torch._grouped_mm(x, w.transpose(-2, -1), offs=ends.to(torch.int32))
        if not torch.is_grad_enabled():
            return _opaque_grouped_mm(x, w, ends)
    bounds = [0, *ends.tolist()]
    return torch.cat([x[a:b] @ w[e].t() for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
