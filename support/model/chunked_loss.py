"""The training loss of k_model: cross-entropy of h @ weight.T without ever holding all the logits."""

from __future__ import annotations

import torch

from support.model.cpu_matmul import mm_t


CE_CHUNK_LOGITS = 2**22  # logits per chunk of linear_cross_entropy: 16 MB in float32


class LinearCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of the logits h @ weight.T, computed in chunks of rows so that the (N, V)
    logits never exist at once (in training they would be kept, in float32, from forward to backward: the
    largest activation of a small-vocabulary model's step). Forward keeps each row's log-sum-exp; backward
    recomputes a chunk's logits and turns them into its gradient, softmax - one_hot, which costs one more
    h @ weight.T (a third of the output layer's FLOPs) and saves the B*T*V logits' memory traffic.
    Under autocast the matmuls run in autocast's dtype, and softmax always in float32, as F.cross_entropy
    on autocast logits would; backward uses the same dtype (autocast is off by then)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        hc, wc = h.to(dtype), weight.to(dtype)
        lse, picked = [], []
        for rows, tgt in zip(hc.split(chunk), targets.clamp(min=0).split(chunk)):
            logits = mm_t(rows, wc).float()
            lse.append(logits.logsumexp(-1))
            picked.append(logits.gather(1, tgt[:, None]).squeeze(1))
        lse = torch.cat(lse)
        ctx.save_for_backward(hc, wc, targets, lse)
        ctx.chunk, ctx.dtypes = chunk, (h.dtype, weight.dtype)
        return torch.where(targets == -100, 0.0, lse - torch.cat(picked))

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        hc, wc, targets, lse = ctx.saved_tensors
        g = torch.where(targets == -100, 0.0, grad_losses.float())  # ignored rows get no gradient
        grad_h, grad_w = [], torch.zeros(wc.shape, dtype=torch.float32, device=wc.device)
        chunks = (t.split(ctx.chunk) for t in (hc, targets.clamp(min=0), lse, g))
        for rows, tgt, row_lse, row_g in zip(*chunks):
            # d loss / d logits = g * (softmax - one_hot(target))
            d = (mm_t(rows, wc).float() - row_lse[:, None]).exp_().mul_(row_g[:, None])
            d = d.scatter_add_(1, tgt[:, None], -row_g[:, None]).to(wc.dtype)
            grad_h.append(mm_t(d, wc.t()))
            if ctx.needs_input_grad[1]:
                grad_w += mm_t(d.t(), rows.t()).float()
        h_dtype, w_dtype = ctx.dtypes
        return torch.cat(grad_h).to(h_dtype), grad_w.to(w_dtype), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, reduction="none") in float32, 0 where the target is -100, with
    the same value and gradients but without ever holding all the logits. h (N, dim), targets (N,)."""
    return LinearCrossEntropy.apply(h, weight, targets, max(1, CE_CHUNK_LOGITS // weight.shape[0]))
