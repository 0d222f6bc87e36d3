"""A LLaMA2-style decoder-only Transformer, weight-compatible with transformers' LlamaForCausalLM.

Read top to bottom: config -> building blocks (RMSNorm, rotary embeddings, the KV cache, attention, SwiGLU
MLP, and its mixture-of-experts form, Mixtral's) -> Decoding (KV-cache generation, the inference half of the
model) -> Transformer (weights, forward).
RoPE's frequencies (default and scaled) come from rope.py. The fast paths sit in files of their own, which
this one imports: cpu_matmul.py (every projection's matmul: oneDNN on x86 CPUs, packed weights for decoding),
compiled_step.py (the torch.compile'd one-token decode step), chunked_loss.py (cross-entropy without the
(B, T, vocab) logits, and the deterministic indexed add that also sums the experts' outputs), sampling.py
(temperature / top-k / top-p) and grouped_mm.py (the experts' matmul).
hf_llama.py converts to and from Hugging Face Llama and Mixtral.

Where the speed comes from, measured against LlamaForCausalLM in bench/bench_model.py:
  * training: the loss never materialises the (B, T, vocab) logits; torch.compile(model) works unchanged;
  * decoding: a KV cache allocated once and written in place, so one compiled graph serves every token
    (Transformer.compile_decode); prefill and the context shift past the window stay eager;
  * on x86 CPUs, float32 matmuls run in oneDNN instead of MKL (cpu_matmul.mm_t).

Two layout choices differ from LlamaForCausalLM, both for speed, and both undone by hf_llama.to_hf_llama:
  * q, k and v come from one fused projection `wqkv` (rows: q heads, then k heads, then v heads);
  * the SwiGLU gate and up projections are one fused `w13` (rows: gate, then up).
Rotary embeddings use the rotate-half layout that HF Llama uses, so weights map 1:1 with no permutation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from support.model.chunked_loss import add_rows, linear_cross_entropy
from support.model.compiled_step import compile_step
from support.model.context_shift import resolve_shift, right_aligned_mask, shift_caches
from support.model.cpu_matmul import Linear, packed_weights
from support.model.grouped_mm import grouped_mm
from support.model.rope import ORIGINAL, check_rope_scaling, dynamic_frequencies, rope_frequencies
from support.model.sampling import check_sampling, sample, stop_list, stop_tensor


# ----------------------------------------------------------------------------------------------------------
# Config


class ModelConfig(PretrainedConfig):
    """Model shape. `hidden_dim=None` applies the LLaMA rule: 2/3 of 4*dim, rounded up to `multiple_of`, and
    `head_dim=None` is dim / n_heads (the resolved numbers are stored, so a saved config never depends on the
    rules). An explicit head_dim (some HF Llama checkpoints) makes attention n_heads * head_dim wide, not dim.
    `tie_word_embeddings=False` gives the output layer its own matrix (most HF Llama checkpoints).
    `rope_scaling_params` stretches the rotary positions to a longer context (support/model/rope.py: linear, dynamic,
    yarn, llama3; HF's rope_parameters less rope_theta); None is plain RoPE."""

    model_type = "k_model"

    dim: int = 768
    n_layers: int = 12
    n_heads: int = 16
    n_kv_heads: int = 8
    vocab_size: int = 6144
    hidden_dim: int | None = None
    multiple_of: int = 64
    norm_eps: float = 1e-5
    max_seq_len: int = 512
    dropout: float = 0.0
    rope_theta: float = 10000.0
    rope_scaling_params: dict | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = True
    flash_attn: bool = True  # False: explicit softmax(QK^T)V attention instead of F.scaled_dot_product_attention
    # Mixture of experts (MixtralConfig's names): num_local_experts > 0 makes every layer's feed-forward a
    # MoEFeedForward of that many SwiGLU experts of hidden_dim each, a token routed to num_experts_per_tok of
    # them; 0 is the dense model. The coefficients weigh the router losses a training forward returns.
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01  # the load-balancing loss (Switch Transformer's alpha)
    router_z_loss_coef: float = 0.001  # the router z-loss (ST-MoE)

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
            self.head_dim, what = self.dim // self.n_heads, f"head dim = dim / n_heads = {self.dim} / {self.n_heads}"
        elif not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"ModelConfig.head_dim must be a positive integer or None, got {self.head_dim!r}")
        else:
            what = "head_dim"
        if self.head_dim % 2:
            raise ValueError(f"{what} = {self.head_dim} is odd; rotary embeddings rotate pairs of channels, so it "
                             "must be even")
        if self.rope_scaling_params is not None and self.rope_scaling_params.get("rope_type") == "default":
            self.rope_scaling_params = None  # one spelling of plain RoPE, so that saved configs compare equal
        try:
            check_rope_scaling(self.rope_scaling_params)
        except ValueError as e:
            raise ValueError(f"ModelConfig.rope_scaling_params: {e}") from None
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_experts(self)
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        elif not isinstance(self.hidden_dim, int) or self.hidden_dim <= 0:
            raise ValueError(f"ModelConfig.hidden_dim must be a positive integer or None, got {self.hidden_dim!r}")


def check_experts(cfg: ModelConfig) -> None:
    """The mixture-of-experts fields make sense: ValueError naming the field."""
    n, k = cfg.num_local_experts, cfg.num_experts_per_tok
    if not isinstance(n, int) or n < 0 or n == 1:
        raise ValueError(f"num_local_experts must be 0 (a dense model) or >= 2 experts, got {n!r}")
    if n and not (isinstance(k, int) and 1 <= k <= n):
        raise ValueError(f"num_experts_per_tok must be between 1 and num_local_experts = {n}, got {k!r}")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")


# ----------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as HF Llama does) so bf16 activations keep their precision here.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_tables(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (n, head_dim) float32 for positions 0 .. n - 1, in the rotate-half layout: channel i and
    i + head_dim/2 form one rotating pair, so both halves of a row repeat the same frequencies. Both are
    multiplied by the rope scaling's attention factor (1 except for yarn).
    seq_len given: the tables of a forward of n = seq_len tokens. None: the model's own tables, n = max_seq_len,
    each position rotated as decoding one token at a time rotates it. The two differ only under dynamic (NTK)
    scaling, whose frequencies depend on the sequence length: there token p is fed as the last of p + 1 tokens
    and takes their frequencies (as in transformers' generate, which grows them step by step)."""
    scaling = cfg.rope_scaling_params
    if seq_len is None and (scaling or {}).get("rope_type") == "dynamic":
        n, attention_factor = cfg.max_seq_len, 1.0
        inv_freq = dynamic_frequencies(cfg.head_dim, cfg.rope_theta, scaling, torch.arange(1, n + 1))
    else:
        n = seq_len or cfg.max_seq_len
        inv_freq, attention_factor = rope_frequencies(cfg.head_dim, cfg.rope_theta, scaling, n)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rope_at(cfg: ModelConfig, cos: torch.Tensor, sin: torch.Tensor, T: int,
            mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables of a forward (or prefill) of T tokens, cut from the model's cos, sin: (T, 1, head_dim),
    or with a padding mask (B, T; 0 = left padding) (B, T, 1, head_dim) at each row's own positions. Under
    dynamic scaling a sequence longer than the original context has frequencies of its own (rope_tables(cfg,
    length)), so such a row gets the ones of its own length: a padded row computes what it computes alone
    (transformers' batched generate gives every row those of the longest)."""
    scaling = cfg.rope_scaling_params or {}
    original = scaling[ORIGINAL] if scaling.get("rope_type") == "dynamic" else None
    if mask is None:
        if original is not None and T > original:
            cos, sin = (t.to(cos.device) for t in rope_tables(cfg, T))
        return cos[:T, None], sin[:T, None]
    pos = positions_from_mask(mask)
    row_cos, row_sin = cos[pos], sin[pos]
    if original is not None:
        lengths = mask.sum(1)
        for n in lengths[lengths > original].unique().tolist():
            own_cos, own_sin = (t.to(cos.device) for t in rope_tables(cfg, n))
            rows = lengths == n
            row_cos[rows], row_sin[rows] = own_cos[pos[rows]], own_sin[pos[rows]]
    return row_cos[:, :, None], row_sin[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, head_dim); cos, sin broadcastable to it. Rotates each pair (x1, x2) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def one_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one query per head, q (B, H, 1, D), against keys and values (B, KV, S, D)
    shared by groups of H / KV query heads, as plain products and sums. For the compiled decode step on a
    CPU: inductor fuses it into a few loops over the cache, where SDPA is a kernel call per layer with its
    own set-up (the bench model's batch-8 step: 1.03-1.07x faster, Zen 3). Eager, this form would
    materialise every product: eager decoding keeps SDPA."""
    B, H, _, D = q.shape
    KV = k.shape[1]
    q = q.reshape(B, KV, H // KV, 1, D)
    scores = (q * k[:, :, None]).sum(-1, dtype=torch.float32) * D**-0.5  # (B, KV, H / KV, S)
    if mask is not None:  # (B, 1, 1, S): True = may attend
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1).to(v.dtype)
    return (weights[..., None] * v[:, :, None]).sum(-2, dtype=torch.float32).to(v.dtype).reshape(B, H, 1, D)


class KVCache:
    """Keys and values of one layer, allocated once for the whole window: (B, n_kv_heads, max_len, head_dim).
    Writes go to explicit slots and the tensors never change shape, so a compiled decode step runs the same
    graph token after token. Zero-filled, not empty: where attention reads unfilled slots (masked out, in a
    CUDA-graph step), garbage that happened to be NaN would still leak through as 0 * NaN."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, n_kv_heads, T, head_dim) into slots (T,); returns the whole cache."""
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v

    def move(self, source: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """The context shift (context_shift.shift_caches): slot j of row b takes the entry of slot source[b, j],
        its key rotated by the angles cos, sin (B, slots, head_dim), in float32. In place: the tensors keep their
        addresses, so a compiled (CUDA-graph) step goes on without a recompile."""
        index = source[:, None, :, None].expand(-1, self.k.shape[1], -1, self.k.shape[3])
        k = apply_rope(self.k.gather(2, index).float(), cos[:, None], sin[:, None])
        v = self.v.gather(2, index)
        self.k[:, :, : source.shape[1]] = k.to(self.k.dtype)
        self.v[:, :, : source.shape[1]] = v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.flash = cfg.flash_attn
        self.wqkv = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.wo.is_residual_proj = True  # read by Transformer._init_weights

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mask: boolean (B, 1, T, S), True = may attend; when None, `causal` says whether to apply the
        causal mask. With a cache, this call's keys and values go into `slots` and attention reads the
        first S slots, S = the mask's width (no mask: a causal prefill, which reads the T it wrote)."""
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(B, T, H + 2 * KV, self.head_dim)
        # q and k heads rotated in one go; tables cast to the activations' dtype (bf16 under autocast)
        qk = apply_rope(qkv[:, :, : H + KV], cos.to(qkv.dtype), sin.to(qkv.dtype))
        q = qk[:, :, :H].transpose(1, 2)
        k = qk[:, :, H:].transpose(1, 2)
        v = qkv[:, :, H + KV :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(slots, k, v)
            S = T if mask is None else mask.shape[-1]
            k, v = k[:, :, :S], v[:, :, :S]
        dropout = self.dropout if self.training else 0.0
        if T == 1 and cache is not None and not dropout and x.device.type == "cpu" and torch.compiler.is_compiling():
            y = one_token_attention(q, k, v, mask)
        elif self.flash and T == 1 and H != KV:
            # Decoding one token: view the query heads sharing a kv head as a length-(H/KV) query sequence
            # of that kv head. Same result, but SDPA on CPU is ~50x faster than with enable_gqa on the
            # strided cache views. The (B, 1, 1, S) mask broadcasts over the group.
            q = q.reshape(B, KV, H // KV, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            y = y.reshape(B, H, 1, self.head_dim)
        elif self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None, enable_gqa=H != KV
            )
        else:
            y = self._math_attention(q, k, v, mask, causal, dropout)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * self.head_dim))

    def _math_attention(self, q, k, v, mask, causal, dropout):
        """The same attention written out: softmax(q k^T / sqrt(d)) v, k/v heads shared by groups of q heads."""
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if mask is None and causal:
            T, S = q.shape[2], k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.dropout(scores.float().softmax(-1).type_as(q), dropout)
        return weights @ v


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x W1) * (x W3)), with W1 (gate) and W3 (up) fused into one matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = Linear(cfg.dim, 2 * cfg.hidden_dim)
        self.w2 = Linear(cfg.hidden_dim, cfg.dim)
        self.w2.is_residual_proj = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.dropout(self.w2(F.silu(gate) * up))


class MoEFeedForward(nn.Module):
    """Mixtral's sparse feed-forward. A linear router (`gate`) scores the experts for each token; the token goes
    to the k best (softmax over all experts, top k, those k probabilities renormalised to sum to 1) and its
    output is the so-weighted sum of those k SwiGLU experts. The experts' weights are stacked, (experts, out,
    in), as transformers' MixtralExperts stores them; the (token, expert) pairs are sorted by expert so that
    each expert multiplies all its tokens at once (grouped_mm), never a loop over tokens. In training mode
    the router logits stay on the module for the router losses (Transformer.router_losses)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.num_local_experts, cfg.num_experts_per_tok
        self.gate = Linear(cfg.dim, self.n_experts)
        self.w13 = nn.Parameter(torch.empty(self.n_experts, 2 * cfg.hidden_dim, cfg.dim))  # gate, then up rows
        self.w2 = nn.Parameter(torch.empty(self.n_experts, cfg.dim, cfg.hidden_dim))
        self.dropout = nn.Dropout(cfg.dropout)
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)  # (tokens, experts)
        if self.training:
            self.router_logits = logits
        weights, experts = logits.float().softmax(-1).topk(self.top_k, dim=-1)  # (tokens, k) each
        weights = weights / weights.sum(-1, keepdim=True)
        order = experts.flatten().argsort(stable=True)  # the k * tokens pairs, grouped by expert
        ends = torch.searchsorted(experts.flatten()[order], torch.arange(self.n_experts, device=x.device),
                                  right=True)  # where each expert's rows end
        token = order // self.top_k
        gate, up = grouped_mm(x[token], self.w13, ends).chunk(2, dim=-1)
        y = grouped_mm(F.silu(gate) * up, self.w2, ends) * weights.flatten()[order, None].to(gate.dtype)
        out = torch.zeros(x.shape, dtype=y.dtype, device=x.device)
        add_rows(out, token, y)  # each token's k expert outputs summed, in the same order on every run
        return self.dropout(out.reshape(shape))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoEFeedForward(cfg) if cfg.num_local_experts else FeedForward(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, causal, cache=None, slots=None):
        x = x + self.resid_dropout(self.attention(self.attention_norm(x), cos, sin, mask, causal, cache, slots))
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------------------------------------
# The model


@dataclass
class TransformerOutput(ModelOutput):
    """Without targets: logits (B, T, vocab) for every position. With targets: last_loss (B*T,), float32
    per-token cross-entropy, 0 where the target is -100 or outside the loss_mask, unreduced so the caller
    applies its own mask; logits None (the loss does not return them, see linear_cross_entropy)."""

    logits: torch.Tensor | None = None
    last_loss: torch.Tensor | None = None
    # an MoE model in training mode, with targets: router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss,
    # the term training adds to the mean LM loss, and the detached figures behind it (Transformer.router_losses)
    router_loss: torch.Tensor | None = None
    router_stats: dict[str, torch.Tensor] | None = None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1 = token, 0 = left padding -> position of each token within its own row (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) padding mask -> (B, 1, T, T) boolean attention mask: causal, never attending to padding.
    A pad query still attends to itself, so no softmax row is empty (an empty row gives NaN, and a NaN
    in a pad's value vector would leak into real tokens as 0 * NaN)."""
    T = attention_mask.shape[1]
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    return (attention_mask.bool()[:, None, None, :] | eye) & causal


class Decoding:
    """The inference half of Transformer (below): generate and stream_generate, and the step-wise API they
    and serve.py's engine use, new_caches / prefill / decode_step over a KV cache that shifts past the
    context window. It reads the model's layers, rotary tables and output head; the training forward does
    not need any of it."""

    @torch.inference_mode()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_id: int | list[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        shift: int | None = None,
        keep: int = 0,
    ) -> torch.Tensor:
        """Continues every row of idx (B, T); returns only the new tokens, (B, n_new) with n_new <=
        max_new_tokens. A row that samples a stop id keeps that token and is then filled with it while the
        other rows go on; generation ends early once every row has stopped. Rows of different lengths are
        left-padded and described by attention_mask (1 = token, 0 = pad); each row then gets exactly the
        tokens it would get alone (greedy) while it fits the window; past it, the context shifts (_decode).
        temperature 0 = greedy (argmax). Runs the model as it is: call model.eval() first if it was built
        with dropout. After compile_decode(), steps run compiled."""
        stops = stop_tensor(stop_id, idx.device)
        B = idx.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        fill = torch.zeros(B, dtype=torch.long, device=idx.device)
        new = []
        for tok in self._decode(idx, attention_mask, temperature, top_k, top_p, max_new_tokens, shift, keep):
            if stops is not None:
                tok = torch.where(done, fill, tok)
                hit = ~done & torch.isin(tok, stops)
                fill = torch.where(hit, tok, fill)
                done |= hit
            new.append(tok)
            if stops is not None and bool(done.all()):
                break
        if not new:
            return idx.new_empty(B, 0)
        return torch.stack(new, dim=1)

    def stream_generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_id: int | list[int] | None = None,
        shift: int | None = None,
        keep: int = 0,
    ) -> Iterator[int]:
        """Like generate for a single row idx (1, T), but yields each new token as it is produced; the stop
        token ends the stream and is not yielded."""
        if idx.dim() != 2 or idx.shape[0] != 1:
            raise ValueError(f"stream_generate takes one row, idx of shape (1, T); got {tuple(idx.shape)}")
        stops = set(stop_list(stop_id))
        for tok in self._decode(idx, None, temperature, top_k, top_p, max_new_tokens, shift, keep):
            tok = int(tok)
            if tok in stops:
                return
            yield tok

    def compile_decode(self) -> None:
        """From now on, generate and stream_generate feed their tokens through a torch.compile'd one-token
        step (compiled_step.py). Compiling takes tens of seconds on a CPU: it pays off in a chat session or a
        server, not for one short generation. Where it fails (no C++ compiler, a platform torch.compile does
        not support) one line says why and decoding stays eager; greedy tokens are the same either way. Call
        it once the model is on its device."""
        self._compiled_step = compile_step(self) or self._compiled_step

    def packed_weights(self) -> contextlib.AbstractContextManager:
        """Within it, CPU decode steps read packed copies of the weights (cpu_matmul.packed_weights; 35 ms to
        make for the bench model). generate packs for each call; serve.py, which calls decode_step, packs once."""
        return packed_weights(self)

    @torch.inference_mode()
    def _decode(self, idx, attention_mask, temperature, top_k, top_p, max_new_tokens, shift, keep) -> Iterator:
        """Yields the next token of every row, (B,), max_new_tokens times: prefill the KV cache with the
        prompt (a prompt longer than max_seq_len keeps its last tokens), then feed one token per step. Once
        the window is full, the context shift (context_shift.py) drops each row's oldest tokens but its first
        `keep`, freeing `shift` slots (None: half of max_seq_len - keep), and decoding goes on with the cache
        (a batch shifts when its longest row fills the window; each row drops just enough to free the slots)."""
        check_sampling(temperature, top_k, top_p)
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be (B, T) with at least one prompt token, got shape {tuple(idx.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        if attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != idx shape {tuple(idx.shape)}")
        window = self.context_len
        shift = resolve_shift(window, shift, keep)
        start = max(0, idx.shape[1] - window)
        # eager decoding sizes the cache to what this call needs; a compiled step keeps one shape
        needed = window if self._compiled_step is not None else min(window, idx.shape[1] - start + max_new_tokens)
        with self.packed_weights():  # the weights cannot change while this generator runs
            caches = self.new_caches(idx.shape[0], idx.device, needed)
            logits, pos, key_mask = self.prefill(idx[:, start:], attention_mask[:, start:].bool(), caches)
            # cache slots in use (each row's tokens right-aligned before this slot, padding first); `slot`
            # holds the same number as a tensor (the compiled step); pos: each row's next position = its tokens
            filled = idx.shape[1] - start
            slot = torch.tensor([filled], device=idx.device)
            for t in range(max_new_tokens):
                tok = sample(logits, temperature, top_k, top_p)
                yield tok
                if t + 1 == max_new_tokens:
                    return  # no logits needed after the last token
                if filled == window:
                    pos = shift_caches(caches, pos, filled, shift, keep, self.rope_cos, self.rope_sin)
                    filled, slot = filled - shift, slot - shift
                    key_mask = right_aligned_mask(pos, filled, key_mask.shape[1])
                key_mask[:, filled] = True
                logits = self.decode_step(tok, pos, slot, key_mask[:, : filled + 1], caches)
                pos, slot, filled = pos + 1, slot + 1, filled + 1

    @property
    def context_len(self) -> int:
        """The inference window: generation shifts the context when this many tokens are cached. max_seq_len,
        or less when context_limit is set: a Llama 3.x base has 131,072 positions, and a KV cache that size is
        gigabytes per row."""
        return min(self.context_limit or self.config.max_seq_len, self.config.max_seq_len)

    def new_caches(self, batch: int, device: torch.device, slots: int | None = None) -> list[KVCache]:
        """Empty KV caches for `batch` rows of `slots` tokens (default: context_len), one per layer (the
        step-wise decoding API: new_caches, prefill, decode_step; generate is built on it, and serve.py
        batches requests with it)."""
        # keys and values come out of the projections in autocast's dtype when it is on (bf16 on CPU)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.dtype
        cfg = self.config
        # one slot more than the window, never used: attention reads a view of the first S slots, and were
        # that view ever the whole cache, a compiled step would see a new (contiguous) layout and recompile
        slots = slots or self.context_len
        caches = [KVCache(batch, cfg.n_kv_heads, slots + 1, cfg.head_dim, dtype, device) for _ in self.layers]
        if self._compiled_step is not None:
            self._compiled_step.pin(caches)
        return caches

    def prefill(self, tokens, mask, caches):
        """Runs the (left-padded) prompt, n <= max_seq_len tokens, into cache slots 0..n-1. Returns the last
        position's logits, each row's next position, and key_mask (B, cache slots): which cache slots hold a
        real token (not padding, not yet written)."""
        n = tokens.shape[1]
        slots = torch.arange(n, device=tokens.device)
        padded = None if bool(mask.all()) else mask
        cos, sin = rope_at(self.config, self.rope_cos, self.rope_sin, n, padded)
        attend = None if padded is None else padded_causal_mask(padded)
        h = self._hidden(tokens, cos, sin, attend, padded is None, caches, slots)
        key_mask = F.pad(mask, (0, caches[0].k.shape[2] - n), value=False)
        return self.output(h[:, -1]), mask.sum(1), key_mask

    def decode_step(self, tok, pos, slot, attend, caches) -> torch.Tensor:
        """Feeds one token per row, tok (B,) at positions pos (B,), into cache slot `slot` (1,); returns the
        next logits (B, V). attend (B, S): which of the first S cache slots each row attends to. After
        compile_decode(), through the compiled graph."""
        if self._compiled_step is not None:
            return self._compiled_step(tok, pos, slot, attend, caches)
        return self._eager_step(tok, pos, slot, attend, caches)

    def _eager_step(self, tok, pos, slot, attend, caches) -> torch.Tensor:
        cos, sin = self.rope_cos[pos][:, None, None], self.rope_sin[pos][:, None, None]
        h = self._hidden(tok[:, None], cos, sin, attend[:, None, None], False, caches, slot)
        return self.output(h[:, -1])


class Transformer(Decoding, PreTrainedModel):
    config_class = ModelConfig
    base_model_prefix = "k_model"
    main_input_name = "tokens"
    _tied_weights_keys = {"output.weight": "tok_embeddings.weight"}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size)
        if config.tie_word_embeddings:  # one matrix embeds and un-embeds (transformers reads _tied_weights_keys)
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._compiled_step = None  # set by compile_decode()
        self.context_limit: int | None = None  # see context_len
        self.post_init()  # HF: runs _init_weights on every module

    def _init_weights(self, module: nn.Module) -> None:
        # Residual projections (attention wo, MLP w2) start smaller, 0.02 / sqrt(2 * n_layers), so the
        # residual stream's variance does not grow with depth (GPT-2 / nanoGPT scheme).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if getattr(module, "is_residual_proj", False):
                std /= math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoEFeedForward):  # stacked expert weights: as FeedForward's w13 and w2
            nn.init.normal_(module.w13, mean=0.0, std=0.02)
            nn.init.normal_(module.w2, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layers))
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif module is self:
            # from_pretrained builds the model on the meta device and loads only persistent tensors: the
            # rotary tables are recomputed here, like HF Llama does for its inv_freq buffer
            cos, sin = rope_tables(self.config)
            with torch.no_grad():
                self.rope_cos.copy_(cos)
                self.rope_sin.copy_(sin)

    def _apply(self, fn, recurse=True):
        """Every move and cast (.to, .float, .bfloat16, ...) goes through here. The rotary tables stay float32,
        as HF keeps its inv_freq: rounded to bf16 (error ~2e-3) they would stay rounded when training upcasts
        to float32 master weights. Where attention uses them it casts them to the activations' dtype."""
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            cos, sin = rope_tables(self.config)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    # transformers' and peft's way to find the embedding and output matrices (resizing, tying, LoRA)
    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    # -- forward -------------------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> TransformerOutput:
        """tokens, targets: (B, T) int64. attention_mask: optional (B, T), 1 = token, 0 = left padding;
        positions then count real tokens only, so a padded row computes what it computes alone.
        loss_mask: optional (B, T) with targets; only positions where it is nonzero are projected onto the
        vocabulary (logits is then None). In SFT most positions are prompt, and the vocabulary projection
        with its cross-entropy is a large share of a small model's step."""
        T = tokens.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        if loss_mask is not None and loss_mask.shape != targets.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != targets shape {tuple(targets.shape)}")
        cos, sin = rope_at(self.config, self.rope_cos, self.rope_sin, T, attention_mask)
        mask = None if attention_mask is None else padded_causal_mask(attention_mask)
        h = self._hidden(tokens, cos, sin, mask, causal=True)
        if targets is None:
            return TransformerOutput(logits=self.output(h))
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        if loss_mask is None:
            out = TransformerOutput(last_loss=linear_cross_entropy(h, self.output.weight, targets))
        else:
            keep = loss_mask.reshape(-1) != 0
            kept_losses = linear_cross_entropy(h[keep], self.output.weight, targets[keep])
            out = TransformerOutput(last_loss=kept_losses.new_zeros(keep.shape).masked_scatter(keep, kept_losses))
        if self.config.num_local_experts and self.training:
            out.router_loss, out.router_stats = self.router_losses(attention_mask)
        return out

    def router_losses(self, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The router losses of the last training forward, each the mean over the MoE layers of the layer's own
        (padding excluded): aux_loss, the load balancing of Switch Transformer (eq. 4) as Mixtral computes it
        with top-k, E * sum_e f_e P_e (f_e: the share of the k * tokens assignments that went to expert e, P_e:
        the mean router probability of e; k when balanced), and z_loss, ST-MoE's mean squared logsumexp of the
        router logits, which keeps them small. Returns the weighted sum training adds to the LM loss and the
        detached aux_loss, z_loss and expert_load (layers, experts): each layer's f_e / k, summing to 1."""
        cfg = self.config
        keep = None if attention_mask is None else attention_mask.reshape(-1).bool()
        aux, z, load = [], [], []
        for layer in self.layers:
            logits = layer.feed_forward.router_logits.float()
            if keep is not None:
                logits = logits[keep]
            probs = logits.softmax(-1)
            chosen = F.one_hot(probs.topk(cfg.num_experts_per_tok, dim=-1).indices, cfg.num_local_experts)
            f = chosen.sum((0, 1)).float() / logits.shape[0]
            aux.append(cfg.num_local_experts * (f * probs.mean(0)).sum())
            z.append(logits.logsumexp(-1).square().mean())
            load.append(f / cfg.num_experts_per_tok)
        aux_loss, z_loss = torch.stack(aux).mean(), torch.stack(z).mean()
        stats = {"aux_loss": aux_loss.detach(), "z_loss": z_loss.detach(), "expert_load": torch.stack(load)}
        return cfg.router_aux_loss_coef * aux_loss + cfg.router_z_loss_coef * z_loss, stats

    def _hidden(self, tokens, cos, sin, mask, causal, caches=None, slots=None) -> torch.Tensor:
        h = self.dropout(self.tok_embeddings(tokens))
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, causal, None if caches is None else caches[i], slots)
        return self.norm(h)

    def num_params(self) -> int:
        """Number of parameters, the tied embedding / output matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def active_params(self) -> int:
        """Parameters one token computes with: num_params less the experts it is not routed to (MoE)."""
        cfg = self.config
        idle_experts = cfg.num_local_experts - cfg.num_experts_per_tok if cfg.num_local_experts else 0
        return self.num_params() - cfg.n_layers * idle_experts * 3 * cfg.dim * cfg.hidden_dim

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), nanoGPT / PaLM style: 6 per active parameter (the tied
        matrix counts once, for the output matmul) plus the attention scores and weighted sum, 12 * n_layers *
        dim * seq_len (causal masking not discounted). MFU = tokens/s * this / peak FLOP/s."""
        cfg = self.config
        return 6 * self.active_params() + 12 * cfg.n_layers * cfg.dim * seq_len
