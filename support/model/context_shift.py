"""Generating past the context window without re-encoding it: the context shift (llama.cpp's approach).

When the KV cache's window is full, the oldest tokens of each row are dropped, except its first `keep`
tokens (e.g. a system prompt), so that `shift` slots come free. The remaining entries move down in the
cache and their keys are re-rotated to their new positions (shift_caches), so positions stay
contiguous from 0 and decoding goes on with the cache: one gather per layer every `shift` tokens instead of
one window-sized forward per token.

What the model sees after a shift: the kept tokens, at positions 0.. as if they were the whole text; the
dropped ones are gone. Each kept entry was computed while they were still there, though: in layers above
the first, its keys and values still carry what attention took from the dropped tokens (as in llama.cpp),
so the result is not the same as re-encoding the kept text from scratch.

Both users, Transformer.generate and serve.py's engine, lay the cache out alike: row b's R_b tokens sit
right-aligned in the slots just before `end`, the slots before them are padding. The rotation itself is
k_model.KVCache.move's (this file sits below k_model and does not import it).
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class MovableCache(Protocol):
    """k_model.KVCache, as far as the shift needs it."""

    def move(self, source: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None: ...


class ShiftPlan(NamedTuple):
    """For the first `end - shift` cache slots after the shift: `source` (B, slots) the slot each entry is
    copied from (padding slots copy anything: they stay masked), `position` (B, slots) the position of its
    token afterwards (0 for padding), `moved` (B, slots) how many positions its key moves back (0 for the
    kept first tokens and for rows that drop nothing); `lengths` (B,) the tokens each row holds afterwards,
    right-aligned to end at slot end - shift."""
    source: torch.Tensor
    position: torch.Tensor
    moved: torch.Tensor
    lengths: torch.Tensor


def resolve_shift(window: int, shift: int | None, keep: int) -> int:
    """The shift to use: `shift`, or by default llama.cpp's choice, half of what may be dropped (a shift every
    (window - keep) / 2 tokens). ValueError unless keep >= 0 and shift >= 1 leave room in the window for at
    least one recent token."""
    shift = max(1, (window - keep) // 2) if shift is None else shift
    if keep < 0 or shift < 1 or keep + shift >= window:
        raise ValueError(f"context shift {shift} with {keep} kept tokens does not fit a window of {window}: "
                         f"need shift >= 1, keep >= 0 and keep + shift < {window}")
    return shift


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
    return ShiftPlan(source, rank.clamp(min=0), moved, kept)


def right_aligned_mask(lengths: torch.Tensor, end: int, n_slots: int) -> torch.Tensor:
    """(B, n_slots) bool: the slots that hold row b's lengths[b] tokens, right-aligned to end before `end`."""
    slots = torch.arange(n_slots, device=lengths.device)
    return (slots >= (end - lengths)[:, None]) & (slots < end)


def shift_caches(caches: list[MovableCache], lengths: torch.Tensor, end: int, shift: int, keep: int,
                 rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
    """The context shift: frees `shift` cache slots before `end` (each row's `lengths` (B,) tokens lie
    right-aligned before it) by dropping each row's oldest tokens but its first `keep`; the newer ones move
    down and their keys are re-rotated to their new positions. Returns the tokens each row holds now (also its
    next position), right-aligned before slot end - shift. rope_cos, rope_sin: the model's rotary tables
    (position, head_dim), the angles decoding rotates each position's key by. A key moves from the angle a of
    its old position to the angle b of its new one by the angle b - a: cos b cos a + sin b sin a and
    sin b cos a - cos b sin a, divided by the square of rope_cos[0], the attention factor that some RoPE
    scalings (YaRN) fold into the tables (1 for plain RoPE). For most scalings b - a is the angle of the
    distance moved; under dynamic NTK, whose frequencies grow with the position, it is not, and the key lands
    where decoding its token at the new position would have put it."""
    plan = plan_shift(lengths, end, shift, keep)
    scale = rope_cos[0] ** 2
    new_cos, new_sin = rope_cos[plan.position], rope_sin[plan.position]
    old_cos, old_sin = rope_cos[plan.position + plan.moved], rope_sin[plan.position + plan.moved]
    cos = (new_cos * old_cos + new_sin * old_sin) / scale
    sin = (new_sin * old_cos - new_cos * old_sin) / scale
    for cache in caches:
        cache.move(plan.source, cos, sin)
    return plan.lengths
