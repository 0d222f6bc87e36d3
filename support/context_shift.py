"""Generating past the context window without re-encoding it: the context shift (llama.cpp's approach).

When the KV cache's window is full, the oldest tokens of each row are dropped, except its first `keep`
tokens (e.g. a system prompt), so that `shift` slots come free. The remaining entries move down in the
cache and their keys are re-rotated to their new positions (Transformer.shift_caches), so positions stay
contiguous from 0 and decoding goes on with the cache: one gather per layer every `shift` tokens instead of
one window-sized forward per token.

What the model sees after a shift: the kept tokens, at positions 0.. as if they were the whole text; the
dropped ones are gone. Each kept entry was computed while they were still there, though: in layers above
the first, its keys and values still carry what attention took from the dropped tokens (as in llama.cpp),
so the result is not the same as re-encoding the kept text from scratch.

This file holds the bookkeeping only (which slot each kept entry comes from and how far it moves), on the
cache layout that generate and serve.py's engine share: row b's R_b tokens sit right-aligned in the slots
just before `end`, the slots before them are padding.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class ShiftPlan(NamedTuple):
    """For the first `end - shift` cache slots after the shift: `source` (B, slots) the slot each entry is
    copied from (padding slots copy anything: they stay masked), `moved` (B, slots) how many positions its
    key moves back (0 for the kept first tokens and for rows that drop nothing); `lengths` (B,) the tokens
    each row holds afterwards, right-aligned to end at slot end - shift."""
    source: torch.Tensor
    moved: torch.Tensor
    lengths: torch.Tensor


def default_shift(window: int, keep: int) -> int:
    """llama.cpp's choice: half of what may be dropped, so a shift comes every (window - keep) / 2 tokens."""
    return max(1, (window - keep) // 2)


def check_shift(window: int, shift: int, keep: int) -> None:
    """ValueError unless 0 <= keep and 1 <= shift, leaving room for at least one recent token in the window."""
    if keep < 0 or shift < 1 or keep + shift >= window:
        raise ValueError(f"context shift {shift} with {keep} kept tokens does not fit a window of {window}: "
                         f"need shift >= 1, keep >= 0 and keep + shift < {window}")


def plan_shift(lengths: torch.Tensor, end: int, shift: int, keep: int) -> ShiftPlan:
    """The moves that free `shift` slots before `end`. Row b keeps min(R_b, end - shift) tokens: its first
    min(keep, R_b), then its newest ones; what lies between is dropped (a short row, with padding to spare,
    drops nothing and only moves down)."""
    new_end = end - shift
    kept = lengths.clamp(max=new_end)
    head = lengths.clamp(max=keep)
    slots = torch.arange(new_end, device=lengths.device)
    # index of each new slot among the row's kept tokens (negative: padding)
    rank = slots - (new_end - kept)[:, None]
    in_head = rank < head[:, None]
    first_slot = (end - lengths)[:, None]  # where the row's first token sits now
    source = torch.where(in_head, first_slot + rank, slots + shift).clamp(0, end - 1)
    dropped = (lengths - kept)[:, None]
    moved = torch.where(in_head | (rank < 0), 0, dropped).expand_as(source)
    return ShiftPlan(source, moved, kept)


def right_aligned_mask(lengths: torch.Tensor, end: int, n_slots: int) -> torch.Tensor:
    """(B, n_slots) bool: the slots that hold row b's lengths[b] tokens, right-aligned to end before `end`."""
    slots = torch.arange(n_slots, device=lengths.device)
    return (slots >= (end - lengths)[:, None]) & (slots < end)
