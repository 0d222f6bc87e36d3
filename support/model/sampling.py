"""Picking the next token from logits (temperature, top-k, top-p) and reading stop ids: what Transformer.generate
and serve.py's batched engine share; the penalties and log-probabilities serve.py's requests may ask for."""

from __future__ import annotations

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def stop_list(stop_id: int | list[int] | None) -> list[int]:
    """An id, a list of ids, or a tensor of them -> list of ints."""
    return [] if stop_id is None else [int(s) for s in torch.as_tensor(stop_id).flatten().tolist()]


def stop_tensor(stop_id, device) -> torch.Tensor | None:
    stops = stop_list(stop_id)
    return torch.tensor(stops, dtype=torch.long, device=device) if stops else None


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits (B, V) -> next token (B,). temperature 0 = argmax; top_k keeps the k most likely tokens; top_p
    keeps the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the more likely ones already reach top_p; the most likely is always kept
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


def penalize(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: logit_j - counts_j * frequency - (counts_j > 0) * presence,
    counts_j the times token j was generated so far (the prompt does not count); float32."""
    return logits.float() - counts * frequency - (counts > 0).float() * presence


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """logits (N, V), tokens (N,) -> each token's log-probability (N,) and the `top` largest log-probabilities
    (N, top) with their token ids: log-softmax in float32."""
    logprobs = logits.float().log_softmax(-1)
    best = logprobs.topk(top, dim=-1)
    return logprobs.gather(-1, tokens[:, None])[:, 0], best.values, best.indices
