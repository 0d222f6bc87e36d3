"""RoPE scaling: the rotary frequencies of each `rope_type` that HF Llama configs use to stretch a model's context.

A scaling is a dict in the shape of transformers' `rope_parameters`, less rope_theta (ModelConfig keeps that in
its own field): {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, ...}. None (or
rope_type "default") is plain RoPE. Each type changes the inverse frequencies inv_freq (angle = position *
inv_freq); yarn also scales cos and sin by an attention factor, which sharpens attention over a longer context.

    linear   every frequency / factor: positions are squeezed into the original range (position interpolation)
    dynamic  NTK: a larger base, grown from the current sequence length once it exceeds the original context
             (so a forward's frequencies depend on its length; decoding, token p takes those of p + 1 tokens)
    yarn     NTK-by-parts: high frequencies (many turns within the original context) stay, low ones / factor,
             a linear ramp between, chosen by beta_fast / beta_slow turns; plus the attention factor
    llama3   the same idea by wavelength: shorter than original / high_freq_factor stays, longer than
             original / low_freq_factor is / factor, smooth in between (Llama 3.1 / 3.2)

The formulas are those of transformers' modeling_rope_utils.py (the tests compare logits with LlamaForCausalLM),
written out here in the same float32 order of operations (but dynamic's grown base: float64, see
dynamic_frequencies).
"""
from __future__ import annotations

import math
from typing import Any

import torch

ORIGINAL = "original_max_position_embeddings"
# per rope_type: (keys it needs, keys it may have)
ROPE_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor", ORIGINAL}, set()),
    "yarn": ({"factor", ORIGINAL},
             {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "llama3": ({"factor", ORIGINAL, "low_freq_factor", "high_freq_factor"}, set()),
}


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """ValueError naming the key when `scaling` is not a rope scaling this module computes."""
    if scaling is None:
        return
    if not isinstance(scaling, dict) or scaling.get("rope_type") not in ROPE_KEYS:
        kind = scaling.get("rope_type") if isinstance(scaling, dict) else scaling
        raise ValueError(f"rope_type {kind!r} is not supported (supported: {', '.join(ROPE_KEYS)})")
    rope_type = scaling["rope_type"]
    needed, optional = ROPE_KEYS[rope_type]
    missing = sorted(needed - set(scaling))
    unknown = sorted(set(scaling) - needed - optional - {"rope_type"})
    if missing or unknown:
        raise ValueError(f"rope_type {rope_type!r} needs {sorted(needed)} and may have {sorted(optional)}; "
                         f"missing {missing}, not used {unknown}")
    if "factor" in scaling and not (isinstance(scaling["factor"], (int, float)) and scaling["factor"] >= 1):
        raise ValueError(f"rope scaling factor must be a number >= 1, got {scaling['factor']!r}")
    if ORIGINAL in scaling and not (isinstance(scaling[ORIGINAL], int) and scaling[ORIGINAL] > 0):
        raise ValueError(f"rope scaling {ORIGINAL} must be a positive integer, got {scaling[ORIGINAL]!r}")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                         f"{scaling['high_freq_factor']} and {scaling['low_freq_factor']}")


def rope_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                     seq_len: int) -> tuple[torch.Tensor, float]:
    """(inv_freq of shape (head_dim / 2,), attention factor) of a scaling; seq_len is the length of the
    sequence the frequencies serve (only `dynamic` depends on it)."""
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "dynamic":
        return dynamic_frequencies(head_dim, theta, scaling, torch.tensor([seq_len]))[0], 1.0
    inv_freq = _plain(head_dim, theta)
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, theta, scaling)
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return inv_freq, 1.0


def _plain(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def dynamic_frequencies(head_dim: int, theta: float, scaling: dict[str, Any], seq_lens: torch.Tensor) -> torch.Tensor:
    """inv_freq (len(seq_lens), head_dim / 2) of dynamic (NTK-aware) scaling for a sequence of each length: plain
    RoPE's up to the original context (bit for bit, as transformers keeps them), past it a larger base, grown
    so that the lowest frequency stretches over factor x (seq_len / original) - (factor - 1) times the original
    context. The grown ones are computed in float64 for all lengths at once (a decode table holds one per
    position); transformers' float32 steps land within 3e-7 of them (relative), about as far as the same float32
    steps land from each other when vectorised."""
    factor, original = scaling["factor"], scaling[ORIGINAL]
    ratio = factor * seq_lens.to(torch.float64).clamp(min=original) / original - (factor - 1)
    base = theta * ratio ** (head_dim / (head_dim - 2))
    grown = 1.0 / base[:, None] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return torch.where((seq_lens > original)[:, None], grown.float(), _plain(head_dim, theta))


def _yarn(head_dim: int, theta: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor, original = s["factor"], s[ORIGINAL]
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(torch.float32) / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def dim_of_turns(turns: float) -> float:
        """The (fractional) frequency index whose wave turns `turns` times within the original context."""
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of_turns(s.get("beta_fast") or 32), dim_of_turns(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the frequency extrapolates unchanged, 0: it is divided by factor
    return interpolated * (1 - keep) + extrapolated * keep, _yarn_attention_factor(s)


def _yarn_attention_factor(s: dict[str, Any]) -> float:
    """Given, or 0.1 ln(factor) + 1 (the YaRN paper), or DeepSeek's ratio of two such terms (mscale keys)."""
    if s.get("attention_factor") is not None:
        return s["attention_factor"]

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(s["factor"], s["mscale"]) / mscale(s["factor"], s["mscale_all_dim"])
    return mscale(s["factor"])


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high, original = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s[ORIGINAL]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)  # long waves / factor
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(medium, smoothed, scaled)
