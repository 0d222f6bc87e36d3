"""The training loss of k_model: cross-entropy of h @ weight.T without ever holding all the logits."""

from __future__ import annotations

import torch

from support.model.cpu_matmul import mm_t


CE_CHUNK_LOGITS = 2**22  # logits per chunk of linear_cross_entropy: 16 MB in float32
# but no fewer rows a chunk: smaller products run slower (1024 x 512 rows against a 32,000-token vocabulary,
# forward + backward on a 2-core Zen 3: 131-row chunks 1.37x the time of 524-row ones)
CE_MIN_CHUNK_ROWS = 512
# Up to this many logits (64 MB in float32) a batch's exponentiated logits are kept from forward to backward, as
# F.cross_entropy keeps its log-probabilities: backward then needs no second h @ weight.T (7% of the bench
# model's train step on a 2-core Zen 3). Beyond it (large vocabularies, long batches) they are recomputed.
CE_KEEP_LOGITS = 2**24


class LinearCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of the logits h @ weight.T. Where the batch's logits are few (CE_KEEP_LOGITS),
    forward keeps e = exp(logits - row max) for backward. Otherwise it works in chunks of rows so that the
    (N, V) logits never exist at once (in training they would be kept, in float32, from forward to backward:
    the largest activation of a small-vocabulary model's step): forward keeps each row's log-sum-exp, and
    backward recomputes a chunk's e = exp(logits - lse), which costs one more h @ weight.T (a third of the
    output layer's FLOPs). Under autocast the matmuls run in autocast's dtype, and softmax always in float32,
    as F.cross_entropy on autocast logits would; backward uses the same dtype (autocast is off by then).

    Backward does not build d loss / d logits = g * (softmax - one_hot), an (N, V) tensor; it splits it into
    its two terms, the softmax's folded into the products (e's rows scaled by g * exp(shift - lse) after or before
    the matmul) and the one-hot's a gather / an indexed add of N rows. On a CPU every pass over the logits
    is a large share of a small model's step (the demo's loss, forward + backward on a 2-core Zen 3: 153 -> 100
    ms, 187 -> 127 in another run; the bench model's 217 -> 202 ms)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        hc, wc = h.to(dtype), weight.to(dtype)
        keep = h.shape[0] * weight.shape[0] <= CE_KEEP_LOGITS
        chunk = max(chunk, h.shape[0]) if keep else chunk  # kept: one chunk, the whole batch
        shift, lse, picked, e = [], [], [], None
        for rows, tgt in zip(hc.split(chunk), targets.clamp(min=0).split(chunk)):
            logits = mm_t(rows, wc).float()
            picked.append(logits.gather(1, tgt[:, None]).squeeze(1))
            row_max = logits.amax(-1, keepdim=True)
            e = logits.sub_(row_max).exp_()  # in place: the logits are not needed again
            shift.append(row_max.squeeze(1))
            lse.append(shift[-1] + e.sum(-1).log())
        lse = torch.cat(lse)
        # kept: softmax = e * exp(row max - lse); recomputed in backward as exp(logits - lse), shift = lse
        shift, e = (torch.cat(shift), e) if keep else (lse, None)
        ctx.save_for_backward(hc, wc, targets, lse, shift, e)
        ctx.chunk, ctx.dtypes = chunk, (h.dtype, weight.dtype)
        return torch.where(targets == -100, 0.0, lse - torch.cat(picked))

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        hc, wc, targets, lse, shift, e = ctx.saved_tensors
        g = torch.where(targets == -100, 0.0, grad_losses.float())  # ignored rows get no gradient
        scale = g * (shift - lse).exp()  # g * softmax = scale * e, row by row
        grad_h, grad_w = [], None
        chunks = (t.split(ctx.chunk) for t in (hc, targets.clamp(min=0), lse, g, scale))
        for rows, tgt, row_lse, row_g, row_scale in zip(*chunks):
            row_e = (e if e is not None else (mm_t(rows, wc).float() - row_lse[:, None]).exp_()).to(wc.dtype)
            one_hot_h = row_g[:, None] * wc[tgt].float()  # one_hot(target) @ weight, scaled by g
            grad_h.append(mm_t(row_e, wc.t()).float().mul_(row_scale[:, None]).sub_(one_hot_h))
            if ctx.needs_input_grad[1]:
                rows_f = rows.float()
                row_grad_w = mm_t(row_e.t(), (rows_f * row_scale[:, None]).to(wc.dtype).t()).float()
                add_rows(row_grad_w, tgt, rows_f * -row_g[:, None])
                grad_w = row_grad_w if grad_w is None else grad_w.add_(row_grad_w)
        h_dtype, w_dtype = ctx.dtypes
        grad_w = None if grad_w is None else grad_w.to(w_dtype)
        return torch.cat(grad_h).to(h_dtype), grad_w, None, None


def add_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """out[index[i]] += rows[i] for every i, in place, deterministically (bit-exact resume): index_add_ is
    on a CPU, not on CUDA (atomic adds in any order), where the accumulating index_put_ sorts instead."""
    if out.is_cuda:
        out.index_put_((index,), rows, accumulate=True)
    else:
        out.index_add_(0, index, rows)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, reduction="none") in float32, 0 where the target is -100, with
    the same value and gradients but without ever holding all the logits. h (N, dim), targets (N,)."""
    return LinearCrossEntropy.apply(h, weight, targets, max(CE_MIN_CHUNK_ROWS, CE_CHUNK_LOGITS // weight.shape[0]))
