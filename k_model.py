"""A LLaMA2-style decoder-only Transformer, weight-compatible with transformers' LlamaForCausalLM.

Read top to bottom: config -> building blocks (the matmul, RMSNorm, rotary embeddings, attention, SwiGLU
MLP) -> Transformer (forward, KV-cache generation) -> its compiled decode step -> the loss (chunked linear +
cross-entropy) -> sampling -> conversion to / from Hugging Face Llama.

Where the speed comes from, measured against LlamaForCausalLM in bench/bench_model.py:
  * training: the loss never materialises the (B, T, vocab) logits; torch.compile(model) works unchanged;
  * decoding: a KV cache allocated once and written in place, so one compiled graph serves every token
    (Transformer.compile_decode); prefill and sliding the window stay eager;
  * on x86 CPUs, float32 matmuls run in oneDNN instead of MKL (see mm_t).

Two layout choices differ from LlamaForCausalLM, both for speed, and both undone by `to_hf_llama`:
  * q, k and v come from one fused projection `wqkv` (rows: q heads, then k heads, then v heads);
  * the SwiGLU gate and up projections are one fused `w13` (rows: gate, then up).
Rotary embeddings use the rotate-half layout that HF Llama uses, so weights map 1:1 with no permutation.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


# ----------------------------------------------------------------------------------------------------------
# Config


class ModelConfig(PretrainedConfig):
    """Model shape. `hidden_dim=None` applies the LLaMA rule: 2/3 of 4*dim, rounded up to `multiple_of`, and
    `head_dim=None` is dim / n_heads (the resolved numbers are stored, so a saved config never depends on the
    rules). An explicit head_dim (some HF Llama checkpoints) makes attention n_heads * head_dim wide, not dim.
    `tie_word_embeddings=False` gives the output layer its own matrix (most HF Llama checkpoints)."""

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
    head_dim: int | None = None
    tie_word_embeddings: bool = True
    flash_attn: bool = True  # False: explicit softmax(QK^T)V attention instead of F.scaled_dot_product_attention

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
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        elif not isinstance(self.hidden_dim, int) or self.hidden_dim <= 0:
            raise ValueError(f"ModelConfig.hidden_dim must be a positive integer or None, got {self.hidden_dim!r}")


# ----------------------------------------------------------------------------------------------------------
# Building blocks


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
# Transformer.packed_weights() makes the packed copies; decode-sized products read them while they exist.
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


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_seq_len, head_dim), in the rotate-half layout: channel i and i + head_dim/2
    form one rotating pair, so both halves of a row repeat the same frequencies."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, head_dim); cos, sin broadcastable to it. Rotates each pair (x1, x2) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


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
        if self.flash and T == 1 and H != KV:
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


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
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
    applies its own mask; logits None (the loss never holds all of them, see linear_cross_entropy)."""

    logits: torch.Tensor | None = None
    last_loss: torch.Tensor | None = None


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


class Transformer(PreTrainedModel):
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
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._compiled_step = None  # set by compile_decode()
        self.post_init()  # HF: runs _init_weights on every module

    def _init_weights(self, module: nn.Module) -> None:
        # Residual projections (attention wo, MLP w2) start smaller, 0.02 / sqrt(2 * n_layers), so the
        # residual stream's variance does not grow with depth (GPT-2 / nanoGPT scheme).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if getattr(module, "is_residual_proj", False):
                std /= math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif module is self:
            # from_pretrained builds the model on the meta device and loads only persistent tensors: the
            # rotary tables are recomputed here, like HF Llama does for its inv_freq buffer
            cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
            with torch.no_grad():
                self.rope_cos.copy_(cos)
                self.rope_sin.copy_(sin)

    def _apply(self, fn, recurse=True):
        """Every move and cast (.to, .float, .bfloat16, ...) goes through here. The rotary tables stay float32,
        as HF keeps its inv_freq: rounded to bf16 (error ~2e-3) they would stay rounded when training upcasts
        to float32 master weights. Where attention uses them it casts them to the activations' dtype."""
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
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
        if attention_mask is None:
            cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]
            mask = None
        else:
            pos = positions_from_mask(attention_mask)
            cos, sin = self.rope_cos[pos][:, :, None], self.rope_sin[pos][:, :, None]
            mask = padded_causal_mask(attention_mask)
        h = self._hidden(tokens, cos, sin, mask, causal=True)
        if targets is None:
            return TransformerOutput(logits=self.output(h))
        h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        if loss_mask is None:
            return TransformerOutput(last_loss=linear_cross_entropy(h, self.output.weight, targets))
        keep = loss_mask.reshape(-1) != 0
        kept_losses = linear_cross_entropy(h[keep], self.output.weight, targets[keep])
        return TransformerOutput(last_loss=kept_losses.new_zeros(keep.shape).masked_scatter(keep, kept_losses))

    def _hidden(self, tokens, cos, sin, mask, causal, caches=None, slots=None) -> torch.Tensor:
        h = self.dropout(self.tok_embeddings(tokens))
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, causal, None if caches is None else caches[i], slots)
        return self.norm(h)

    # -- generation ----------------------------------------------------------------------------------------

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
    ) -> torch.Tensor:
        """Continues every row of idx (B, T); returns only the new tokens, (B, n_new) with n_new <=
        max_new_tokens. A row that samples a stop id keeps that token and is then filled with it while the
        other rows go on; generation ends early once every row has stopped. Rows of different lengths are
        left-padded and described by attention_mask (1 = token, 0 = pad); each row then gets exactly the
        tokens it would get alone (greedy). temperature 0 = greedy (argmax). Runs the model as it is: call
        model.eval() first if it was built with dropout. After compile_decode(), steps run compiled."""
        stops = _stop_tensor(stop_id, idx.device)
        B = idx.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        fill = torch.zeros(B, dtype=torch.long, device=idx.device)
        new = []
        for tok in self._decode(idx, attention_mask, temperature, top_k, top_p, max_new_tokens):
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
    ) -> Iterator[int]:
        """Like generate for a single row idx (1, T), but yields each new token as it is produced; the stop
        token ends the stream and is not yielded."""
        if idx.dim() != 2 or idx.shape[0] != 1:
            raise ValueError(f"stream_generate takes one row, idx of shape (1, T); got {tuple(idx.shape)}")
        stops = set(_stop_list(stop_id))
        for tok in self._decode(idx, None, temperature, top_k, top_p, max_new_tokens):
            tok = int(tok)
            if tok in stops:
                return
            yield tok

    def compile_decode(self) -> None:
        """From now on, generate and stream_generate feed their tokens through a torch.compile'd one-token
        step (the gpt-fast approach, see CompiledStep). Compiling takes tens of seconds on a CPU, so it pays
        off in a chat session or a server, not for one short generation. Where compiling fails (no C++
        compiler, a platform torch.compile does not support) one line says why and decoding stays eager.
        Greedy tokens are the same either way. Call it once the model is on its device."""
        try:
            self._compiled_step = CompiledStep(self)
        except Exception as err:  # torch.compile itself refuses where dynamo is unsupported (e.g. a new Python)
            _say_compile_failed(err)

    @contextlib.contextmanager
    def packed_weights(self) -> Iterator[None]:
        """Within it, decode steps on a CPU (float32 or bf16 weights, no autocast) read copies of the
        projection weights in oneDNN's packed layout: made on entry (35 ms for the bench model's 27M float32
        weights), dropped on exit, reused by a nested call. generate packs for each call; a caller that decodes
        through decode_step (serve.py) packs once. The weights must not change within: nothing would tell the
        copies (a fused optimizer step does not even count as a change of the tensor)."""
        weights = {id(m.weight): m.weight for m in self.modules() if isinstance(m, Linear)}.values()
        fresh = [w for w in weights if _packable(w) and not hasattr(w, "_onednn_packed")]
        with torch.no_grad():
            for w in fresh:
                w._onednn_packed = torch.ops.mkldnn._reorder_linear_weight(w, DECODE_ROWS)
        try:
            yield
        finally:
            for w in fresh:
                del w._onednn_packed

    @torch.inference_mode()
    def _decode(self, idx, attention_mask, temperature, top_k, top_p, max_new_tokens) -> Iterator[torch.Tensor]:
        """Yields the next token of every row, (B,), max_new_tokens times: prefill the KV cache with the
        prompt, then feed one token per step. The context is the last max_seq_len tokens: a longer prompt
        keeps its last tokens, and once generation fills the window it slides - the cache is rebuilt from
        the last max_seq_len tokens (positions restarting at 0) for every further token, which is exactly
        the model run without a cache on the cropped sequence (slower: one full window forward per token)."""
        _check_sampling(temperature, top_k, top_p)
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be (B, T) with at least one prompt token, got shape {tuple(idx.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        if attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != idx shape {tuple(idx.shape)}")
        with self.packed_weights():  # the weights cannot change while this generator runs
            (B, T), window = idx.shape, self.config.max_seq_len
            # the whole sequence, new tokens written in place: only a sliding window reads it back
            seq = torch.cat([idx, idx.new_zeros(B, max_new_tokens)], dim=1)
            real = F.pad(attention_mask.bool(), (0, max_new_tokens), value=True)
            caches = self.new_caches(B, idx.device)
            start = max(0, T - window)
            logits, pos, key_mask = self.prefill(seq[:, start:T], real[:, start:T], caches)
            filled = T - start  # cache slots in use; `slot` holds the same number as a tensor (compiled step)
            slot = torch.tensor([filled], device=idx.device)
            for t in range(T, T + max_new_tokens):
                tok = sample(logits, temperature, top_k, top_p)
                seq[:, t] = tok
                yield tok
                if t + 1 == T + max_new_tokens:
                    return  # no logits needed after the last token
                if filled < window:
                    key_mask[:, filled] = True
                    logits = self.decode_step(tok, pos, slot, key_mask[:, : filled + 1], caches)
                    pos += 1
                    slot += 1
                    filled += 1
                else:  # the window is full: slide it by one token
                    last = slice(t + 1 - window, t + 1)
                    logits, pos, key_mask = self.prefill(seq[:, last], real[:, last], caches)

    def new_caches(self, batch: int, device: torch.device) -> list[KVCache]:
        """Empty KV caches for `batch` rows, one per layer (the step-wise decoding API: new_caches, prefill,
        decode_step; generate is built on it, and serve.py batches requests with it)."""
        # keys and values come out of the projections in autocast's dtype when it is on (bf16 on CPU)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.dtype
        cfg = self.config
        # one slot more than the window, never used: attention reads a view of the first S slots, and were
        # that view ever the whole cache, a compiled step would see a new (contiguous) layout and recompile
        slots = cfg.max_seq_len + 1
        caches = [KVCache(batch, cfg.n_kv_heads, slots, cfg.head_dim, dtype, device) for _ in self.layers]
        if self._compiled_step is not None and device.type == "cuda":
            for c in caches:  # a CUDA graph writes them in place: it may keep their addresses instead of copying
                torch._dynamo.mark_static_address(c.k)
                torch._dynamo.mark_static_address(c.v)
        return caches

    def prefill(self, tokens, mask, caches):
        """Runs the (left-padded) prompt, n <= max_seq_len tokens, into cache slots 0..n-1. Returns the last
        position's logits, each row's next position, and key_mask (B, cache slots): which cache slots hold a
        real token (not padding, not yet written)."""
        n = tokens.shape[1]
        slots = torch.arange(n, device=tokens.device)
        if bool(mask.all()):
            cos, sin = self.rope_cos[:n, None], self.rope_sin[:n, None]
            h = self._hidden(tokens, cos, sin, None, True, caches, slots)
        else:
            p = positions_from_mask(mask)
            cos, sin = self.rope_cos[p][:, :, None], self.rope_sin[p][:, :, None]
            h = self._hidden(tokens, cos, sin, padded_causal_mask(mask), False, caches, slots)
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

    # -- accounting ----------------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Number of parameters, the tied embedding / output matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), nanoGPT / PaLM style: 6 per parameter (the tied
        matrix counts once, for the output matmul) plus the attention scores and weighted sum, 12 * n_layers *
        dim * seq_len (causal masking not discounted). MFU = tokens/s * this / peak FLOP/s."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layers * cfg.dim * seq_len


class CompiledStep:
    """Transformer.decode_step through torch.compile, called like it. Shapes stay put from token to token (the
    cache is pre-allocated and written in place, positions and the cache slot are tensors), so one graph
    serves every step.
    On CUDA each step is replayed as a CUDA graph (mode "reduce-overhead"), which needs fixed shapes: one
    graph per batch size, attention reading the whole window with the unfilled slots masked (untested: no
    GPU was at hand).
    On a CPU the shapes are symbolic (one graph for batch 1, one for every larger batch) and attention reads
    the filled slots only. Inductor fuses the norms, rotary embeddings and activations around the matmuls,
    which stay the model's own packed oneDNN products (Linear), so the graph reads the weights at run time:
    new weights need no new graph.
    The first step of each graph compiles, and says so on stderr with the seconds it took; if compiling
    fails, one line says why and the model decodes eagerly from then on."""

    def __init__(self, model: Transformer):
        self.model = model
        self.full_window = model.device.type == "cuda"
        # the eager step with a code object of its own: dynamo keeps its graphs per code object and, after a
        # few, stops compiling it; a model's graphs must not use up another model's share
        code = Transformer._eager_step.__code__.replace()
        step = types.MethodType(types.FunctionType(code, Transformer._eager_step.__globals__), model)
        if self.full_window:
            self.fn = torch.compile(step, fullgraph=True, dynamic=False, mode="reduce-overhead")
        else:
            self.fn = torch.compile(step, fullgraph=True, dynamic=True)
        self.compiled: set[tuple] = set()  # graphs built: (batch size or "> 1", device, dtype)
        self.max_batch: int | None = None  # set once warmed up for a server: a larger batch is refused

    def batches_to_trace(self, max_batch: int) -> list[int]:
        """Batch sizes whose steps build every graph that batches of 1..max_batch rows use."""
        return list(range(1, max_batch + 1)) if self.full_window else [1, 2][:max_batch]

    def run(self, *args) -> torch.Tensor:
        # No duck shaping: by default sizes that happen to be equal while tracing share one symbol (a first
        # step's 2 attended slots and 2 kv heads, or batch 4 and 4 slots), and the graph is compiled again
        # as soon as they differ. Read while tracing, so it is set around every call.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return self.fn(*args)

    def __call__(self, tok, pos, slot, attend, caches) -> torch.Tensor:
        if self.fn is None:  # compiling failed: eager from then on
            return self.model._eager_step(tok, pos, slot, attend, caches)
        if self.full_window:  # a CUDA graph's shapes are fixed: attend to the whole window, unfilled slots masked
            attend = F.pad(attend, (0, self.model.config.max_seq_len - attend.shape[1]), value=False)
        B = tok.shape[0]
        if self.max_batch is not None and B > self.max_batch:  # a new graph would compile while clients wait
            raise RuntimeError(f"the compiled step was traced for batches up to {self.max_batch}, got {B} rows")
        # symbolic shapes still specialise a size of 1, so batch 1 gets a graph of its own
        graph = (B if self.full_window or B == 1 else "> 1", tok.device.type, caches[0].k.dtype)
        if graph in self.compiled:
            return self.run(tok, pos, slot, attend, caches)
        began = time.perf_counter()
        try:
            logits = self.run(tok, pos, slot, attend, caches)
        except Exception as err:  # compiling failed before anything ran, so the eager step starts clean
            _say_compile_failed(err)
            self.fn = self.model._compiled_step = None
            return self.model._eager_step(tok, pos, slot, attend, caches)
        self.compiled.add(graph)
        print(f"fast decode: compiled the one-token step for batch {graph[0]} ({graph[1]}, {graph[2]}) in "
              f"{time.perf_counter() - began:.1f} s", file=sys.stderr)
        return logits


def _say_compile_failed(err: Exception) -> None:
    reason = (str(err).strip().splitlines() or [""])[0][:200]
    print(f"fast decode: torch.compile failed ({type(err).__name__}: {reason}); decoding eagerly", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# The loss


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


# ----------------------------------------------------------------------------------------------------------
# Sampling


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def _stop_list(stop_id: int | list[int] | None) -> list[int]:
    """An id, a list of ids, or a tensor of them -> list of ints."""
    return [] if stop_id is None else [int(s) for s in torch.as_tensor(stop_id).flatten().tolist()]


def _stop_tensor(stop_id, device) -> torch.Tensor | None:
    stops = _stop_list(stop_id)
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


# ----------------------------------------------------------------------------------------------------------
# Hugging Face Llama conversion


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def copy_token_ids(config: PretrainedConfig, tokenizer) -> None:
    """Puts the tokenizer's bos / eos / pad ids on a model config, so that its HF export carries them."""
    for key in TOKEN_ID_KEYS:
        setattr(config, key, getattr(tokenizer, key))


def _hf_config(cfg: ModelConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_dropout=cfg.dropout,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="sdpa",
        # token ids are the tokenizer's business; copied when the caller put them on our config
        **{k: getattr(cfg, k, None) for k in TOKEN_ID_KEYS},
    )


# Each of our per-layer weights and the HF Llama weights it holds, stacked by rows in this order.
LAYER_WEIGHTS = {
    "attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.wo": ("self_attn.o_proj",),
    "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
    "feed_forward.w2": ("mlp.down_proj",),
    "attention_norm": ("input_layernorm",),
    "ffn_norm": ("post_attention_layernorm",),
}
TOP_WEIGHTS = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def to_hf_llama(model: Transformer) -> LlamaForCausalLM:
    """The same network as a transformers LlamaForCausalLM (sdpa attention), fused weights split apart."""
    cfg = model.config
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    rows = {"attention.wqkv": [q, kv, kv], "feed_forward.w13": [cfg.hidden_dim, cfg.hidden_dim]}
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd = {f"{hf}.weight": ours[f"{name}.weight"] for name, hf in TOP_WEIGHTS.items()}
    for i in range(cfg.n_layers):
        for name, hf_names in LAYER_WEIGHTS.items():
            w = ours[f"layers.{i}.{name}.weight"]
            for hf_name, part in zip(hf_names, w.split(rows.get(name, [w.shape[0]]))):
                sd[f"model.layers.{i}.{hf_name}.weight"] = part
    hf = LlamaForCausalLM(_hf_config(cfg)).to(dtype=model.tok_embeddings.weight.dtype)
    hf.load_state_dict(sd, strict=True)
    return hf.to(model.tok_embeddings.weight.device).train(model.training)


def unsupported_config(c: PretrainedConfig) -> str | None:
    """What in an HF config our model cannot express, named by config key; None when it is a Llama we can.
    Any dtype, tied or untied embeddings, head_dim, rope_theta, rms_norm_eps, max_position_embeddings and
    GQA are fine; another architecture, biases, another activation or a rope scaling variant are not."""
    if c.model_type != "llama":
        return f"model_type {c.model_type!r} (architectures {c.architectures}): not a Llama model"
    rope_type = (c.rope_parameters or {}).get("rope_type", "default")
    found = {
        "rope_scaling / rope_parameters rope_type": rope_type if rope_type != "default" else None,
        "attention_bias": c.attention_bias or None,
        "mlp_bias": c.mlp_bias or None,
        "hidden_act": c.hidden_act if c.hidden_act != "silu" else None,
    }
    bad = ", ".join(f"{key} {value!r}" for key, value in found.items() if value is not None)
    return f"{bad} (k_model is a bias-free, silu, default-rope Llama)" if bad else None


def from_hf_llama(hf: LlamaForCausalLM) -> Transformer:
    """Our model from a LlamaForCausalLM; refuses Llama variants this architecture cannot express."""
    c = hf.config
    problem = unsupported_config(c)
    if problem:
        raise ValueError(f"k_model cannot express this model: {problem}")
    cfg = ModelConfig(
        dim=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        vocab_size=c.vocab_size,
        hidden_dim=c.intermediate_size,
        norm_eps=c.rms_norm_eps,
        max_seq_len=c.max_position_embeddings,
        dropout=float(c.attention_dropout),
        rope_theta=float(c.rope_parameters.get("rope_theta", 10000.0)),
        head_dim=c.head_dim,
        tie_word_embeddings=c.tie_word_embeddings,
        **{k: getattr(c, k) for k in TOKEN_ID_KEYS if getattr(c, k, None) is not None},
    )
    theirs = hf.state_dict()
    sd = {f"{name}.weight": theirs[f"{hf_name}.weight"] for name, hf_name in TOP_WEIGHTS.items()}
    for i in range(cfg.n_layers):
        for name, hf_names in LAYER_WEIGHTS.items():
            sd[f"layers.{i}.{name}.weight"] = torch.cat([theirs[f"model.layers.{i}.{n}.weight"] for n in hf_names])
    weight = theirs["model.embed_tokens.weight"]
    model = Transformer(cfg).to(dtype=weight.dtype, device=weight.device)
    model.load_state_dict(sd, strict=True)
    return model  # in the checkpoint's dtype; the rotary tables stay float32 (Transformer._apply)


def save_quietly(model: PreTrainedModel, out_dir: str | os.PathLike) -> None:
    """save_pretrained without the progress bar it draws for a single shard: noise in a training log."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def export_hf(model: Transformer, out_dir: str | os.PathLike) -> None:
    """Writes out_dir/config.json + model.safetensors, which AutoModelForCausalLM opens as LlamaForCausalLM."""
    save_quietly(to_hf_llama(model), out_dir)


def load_hf(out_dir: str | os.PathLike) -> Transformer:
    """Our model from a directory written by export_hf or any LlamaForCausalLM checkpoint, in its stored dtype.
    ValueError naming config.json and the config key for what the model cannot express."""
    from transformers import AutoConfig

    config_path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: {out_dir} is not a Hugging Face model directory")
    problem = unsupported_config(AutoConfig.from_pretrained(out_dir))  # before reading any weights
    if problem:
        raise ValueError(f"{config_path}: k_model cannot express this model: {problem}")
    return from_hf_llama(LlamaForCausalLM.from_pretrained(out_dir, dtype="auto"))
