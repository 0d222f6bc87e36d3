"""The training loss of k_model: cross-entropy of h @ weight.T without ever holding all the logits."""

from __future__ import annotations

import torch

from support.model.cpu_matmul import mm_t


CE_CHUNK_LOGITS = 2**22  # logits per chunk of linear_cross_entropy: 16 MB in float32
# Up to this many logits (64 MB in float32) a batch's probabilities are kept from forward to backward, as
# F.cross_entropy keeps its log-probabilities: backward then needs no second h @ weight.T (7% of the bench
# model's train step on a 2-core Zen 3). Beyond it (large vocabularies, long batches) they are recomputed.
CE_KEEP_LOGITS = 2**24


class LinearCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of the logits h @ weight.T. Where the batch's logits are few (CE_KEEP_LOGITS),
    forward keeps their softmax for backward, which is softmax - one_hot. Otherwise it works in chunks of
    rows so that the (N, V) logits never exist at once (in training they would be kept, in float32, from
    forward to backward: the largest activation of a small-vocabulary model's step): forward keeps each row's
    log-sum-exp, and backward recomputes a chunk's logits, which costs one more h @ weight.T (a third of the
    output layer's FLOPs). Under autocast the matmuls run in autocast's dtype, and softmax always in float32,
    as F.cross_entropy on autocast logits would; backward uses the same dtype (autocast is off by then)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        hc, wc = h.to(dtype), weight.to(dtype)
        keep = h.shape[0] * weight.shape[0] <= CE_KEEP_LOGITS
        chunk = max(chunk, h.shape[0]) if keep else chunk  # kept: one chunk, the whole batch
        lse, picked, probs = [], [], None
        for rows, tgt in zip(hc.split(chunk), targets.clamp(min=0).split(chunk)):
            logits = mm_t(rows, wc).float()
            lse.append(logits.logsumexp(-1))
            picked.append(logits.gather(1, tgt[:, None]).squeeze(1))
            if keep:
                probs = logits.sub_(lse[-1][:, None]).exp_()  # in place: the logits are not needed again
        lse = torch.cat(lse)
        ctx.save_for_backward(hc, wc, targets, lse, probs)
        ctx.chunk, ctx.dtypes = chunk, (h.dtype, weight.dtype)
        return torch.where(targets == -100, 0.0, lse - torch.cat(picked))

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        hc, wc, targets, lse, probs = ctx.saved_tensors
        g = torch.where(targets == -100, 0.0, grad_losses.float())  # ignored rows get no gradient
        grad_h, grad_w = [], None
        chunks = (t.split(ctx.chunk) for t in (hc, targets.clamp(min=0), lse, g))
        for rows, tgt, row_lse, row_g in zip(*chunks):
            # d loss / d logits = g * (softmax - one_hot(target))
            if probs is None:
                d = (mm_t(rows, wc).float() - row_lse[:, None]).exp_().mul_(row_g[:, None])
            else:  # one chunk; not in place, so that a second backward (retain_graph) finds them intact
                d = probs * row_g[:, None]
            d = d.scatter_add_(1, tgt[:, None], -row_g[:, None]).to(wc.dtype)
            grad_h.append(mm_t(d, wc.t()))
            if ctx.needs_input_grad[1]:
                row_grad_w = mm_t(d.t(), rows.t()).float()
                grad_w = row_grad_w if grad_w is None else grad_w.add_(row_grad_w)
        h_dtype, w_dtype = ctx.dtypes
        grad_w = None if grad_w is None else grad_w.to(w_dtype)
        return torch.cat(grad_h).to(h_dtype), grad_w, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, reduction="none") in float32, 0 where the target is -100, with
    the same value and gradients but without ever holding all the logits. h (N, dim), targets (N,)."""
    return LinearCrossEntropy.apply(h, weight, targets, max(1, CE_CHUNK_LOGITS // weight.shape[0]))
