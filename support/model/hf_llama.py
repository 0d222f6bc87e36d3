"""Conversion between k_model.Transformer and transformers' LlamaForCausalLM (a mixture-of-experts model:
MixtralForCausalLM), both ways, and HF model directories.

    to_hf_llama(model) / from_hf_llama(hf)   the same network in the other class (fused weights split / stacked)
    export_hf(model, dir) / load_hf(dir)     config.json + model.safetensors that AutoModelForCausalLM opens

Our model fuses q, k and v into one `wqkv` (rows: q heads, then k heads, then v heads) and the SwiGLU gate and
up projections into one `w13` (rows: gate, then up); LAYER_WEIGHTS names the HF weights each one stacks.
Rotary embeddings use the rotate-half layout in both, so every weight maps 1:1 with no permutation. An MoE
model's feed-forward (k_model.MoEFeedForward) is Mixtral's as transformers (>= 5) holds it in memory, router
and stacked experts, 1:1 (MOE_WEIGHTS); save_pretrained writes Mixtral's per-expert w1 / w2 / w3 files from it.
"""

from __future__ import annotations

import os

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, PretrainedConfig,
                          PreTrainedModel)

from k_model import ModelConfig, Transformer
from support.model.rope import ORIGINAL, check_rope_scaling


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def copy_token_ids(config: PretrainedConfig, tokenizer) -> None:
    """Puts the tokenizer's bos / eos / pad ids on a model config, so that its HF export carries them."""
    for key in TOKEN_ID_KEYS:
        setattr(config, key, getattr(tokenizer, key))


# Our config field -> the LlamaConfig field that holds the same number (both directions of the conversion);
# max_seq_len and the rotary settings go through to_rope_parameters / from_rope_parameters.
CONFIG_NAMES = {"vocab_size": "vocab_size", "dim": "hidden_size", "hidden_dim": "intermediate_size",
                "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                "norm_eps": "rms_norm_eps", "dropout": "attention_dropout",
                "tie_word_embeddings": "tie_word_embeddings"}
# and those of an MoE model, whose HF class is MixtralForCausalLM (router_z_loss_coef is ours, saved alongside)
MOE_CONFIG_NAMES = {name: name for name in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                                            "router_z_loss_coef")}
HF_CLASSES = {"llama": LlamaForCausalLM, "mixtral": MixtralForCausalLM}


def to_rope_parameters(cfg: ModelConfig) -> tuple[dict, int]:
    """(HF rope_parameters, max_position_embeddings) of our config. Dynamic NTK scaling reads its original
    context from max_position_embeddings (and grows past it at run time), the other types from their own key."""
    scaling = dict(cfg.rope_scaling_params or {"rope_type": "default"})
    max_positions = cfg.max_seq_len
    if scaling["rope_type"] == "dynamic":
        max_positions = scaling.pop(ORIGINAL)
    return {**scaling, "rope_theta": cfg.rope_theta}, max_positions


def from_rope_parameters(c: LlamaConfig) -> dict:
    """Our rope_theta, rope_scaling_params and max_seq_len from an HF Llama config (the inverse of
    to_rope_parameters). A dynamic model's window is factor x its original context, the length its scaling
    is meant for."""
    scaling = _rope_scaling(c)
    max_seq_len = c.max_position_embeddings
    if scaling["rope_type"] == "dynamic":
        max_seq_len = int(scaling["factor"] * max_seq_len)
    return dict(rope_theta=float(c.rope_parameters.get("rope_theta", 10000.0)), rope_scaling_params=scaling,
                max_seq_len=max_seq_len)


def _rope_scaling(c: LlamaConfig) -> dict:
    """An HF config's rope_parameters in the shape of our rope_scaling_params, read as transformers reads them:
    `type` is the spelling of rope_type before transformers 4.45 (LongChat, Vicuna-16k), which transformers
    copies to rope_type and keeps; dynamic scaling takes its original context from max_position_embeddings
    and ignores an original_max_position_embeddings key."""
    scaling = {k: v for k, v in (c.rope_parameters or {}).items() if k not in ("rope_theta", "type")}
    scaling.setdefault("rope_type", (c.rope_parameters or {}).get("type", "default"))
    if scaling["rope_type"] == "dynamic":
        scaling[ORIGINAL] = c.max_position_embeddings
    return scaling


def _hf_config(cfg: ModelConfig) -> LlamaConfig | MixtralConfig:
    rope_parameters, max_positions = to_rope_parameters(cfg)
    names = {**CONFIG_NAMES, **MOE_CONFIG_NAMES} if cfg.num_local_experts else CONFIG_NAMES
    return (MixtralConfig if cfg.num_local_experts else LlamaConfig)(
        **{theirs: getattr(cfg, ours) for ours, theirs in names.items()},
        max_position_embeddings=max_positions,
        hidden_act="silu",
        rope_parameters=rope_parameters,
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
# An MoE layer's feed-forward weights (full names) and the MixtralForCausalLM tensor each one is, 1:1.
MOE_WEIGHTS = {"feed_forward.gate.weight": "mlp.gate.weight", "feed_forward.w13": "mlp.experts.gate_up_proj",
               "feed_forward.w2": "mlp.experts.down_proj"}


def _stacked_weights(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """LAYER_WEIGHTS this model has: an MoE model's feed-forward is MOE_WEIGHTS' instead."""
    moe = cfg.num_local_experts > 0
    return {k: v for k, v in LAYER_WEIGHTS.items() if not (moe and k.startswith("feed_forward."))}


def to_hf_llama(model: Transformer) -> LlamaForCausalLM | MixtralForCausalLM:
    """The same network as a transformers LlamaForCausalLM (an MoE model: MixtralForCausalLM), sdpa attention,
    fused weights split apart."""
    cfg = model.config
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    rows = {"attention.wqkv": [q, kv, kv], "feed_forward.w13": [cfg.hidden_dim, cfg.hidden_dim]}
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd = {f"{hf}.weight": ours[f"{name}.weight"] for name, hf in TOP_WEIGHTS.items()}
    for i in range(cfg.n_layers):
        for name, hf_names in _stacked_weights(cfg).items():
            w = ours[f"layers.{i}.{name}.weight"]
            for hf_name, part in zip(hf_names, w.split(rows.get(name, [w.shape[0]]))):
                sd[f"model.layers.{i}.{hf_name}.weight"] = part
        for name, hf_name in (MOE_WEIGHTS.items() if cfg.num_local_experts else ()):
            sd[f"model.layers.{i}.{hf_name}"] = ours[f"layers.{i}.{name}"]
    hf_class = MixtralForCausalLM if cfg.num_local_experts else LlamaForCausalLM
    hf = hf_class(_hf_config(cfg)).to(dtype=model.tok_embeddings.weight.dtype)
    hf.load_state_dict(sd, strict=True)
    return hf.to(model.tok_embeddings.weight.device).train(model.training)


def unsupported_config(c: PretrainedConfig) -> str | None:
    """What in an HF config our model cannot express, named by config key; None when it is a Llama we can.
    Any dtype, tied or untied embeddings, head_dim, rope_theta, rms_norm_eps, max_position_embeddings and
    GQA are fine, and so are the rope scalings of support/model/rope.py (linear, dynamic, yarn, llama3); another
    architecture, biases, another activation or another rope scaling (longrope, partial rotary) are not.
    A Mixtral is fine without a sliding window shorter than its context; its router_jitter_noise, a training
    regulariser, is not applied here."""
    if c.model_type not in HF_CLASSES:
        return f"model_type {c.model_type!r} (architectures {c.architectures}): not a Llama or Mixtral model"
    window = getattr(c, "sliding_window", None)
    found = {
        "attention_bias": getattr(c, "attention_bias", False) or None,
        "mlp_bias": getattr(c, "mlp_bias", False) or None,
        "hidden_act": c.hidden_act if c.hidden_act != "silu" else None,
        "sliding_window": window if window is not None and window < c.max_position_embeddings else None,
    }
    bad = [f"{key} {value!r}" for key, value in found.items() if value is not None]
    try:
        check_rope_scaling(_rope_scaling(c))
    except ValueError as e:
        bad.append(f"rope_scaling / rope_parameters: {e}")
    bad = ", ".join(bad)
    return f"{bad} (k_model is a bias-free, silu Llama)" if bad else None


def from_hf_llama(hf: LlamaForCausalLM | MixtralForCausalLM) -> Transformer:
    """Our model from a LlamaForCausalLM or MixtralForCausalLM; refuses variants this architecture cannot
    express."""
    c = hf.config
    problem = unsupported_config(c)
    if problem:
        raise ValueError(f"k_model cannot express this model: {problem}")
    moe = {ours: getattr(c, theirs) for ours, theirs in MOE_CONFIG_NAMES.items() if hasattr(c, theirs)}
    cfg = ModelConfig(
        **{ours: getattr(c, theirs) for ours, theirs in CONFIG_NAMES.items()},
        **(moe if c.model_type == "mixtral" else {}),
        **from_rope_parameters(c),
        **{k: getattr(c, k) for k in TOKEN_ID_KEYS if getattr(c, k, None) is not None},
    )
    cfg.dropout = float(cfg.dropout)
    theirs = hf.state_dict()
    sd = {f"{name}.weight": theirs[f"{hf_name}.weight"] for name, hf_name in TOP_WEIGHTS.items()}
    for i in range(cfg.n_layers):
        for name, hf_names in _stacked_weights(cfg).items():
            sd[f"layers.{i}.{name}.weight"] = torch.cat([theirs[f"model.layers.{i}.{n}.weight"] for n in hf_names])
        for name, hf_name in (MOE_WEIGHTS.items() if cfg.num_local_experts else ()):
            sd[f"layers.{i}.{name}"] = theirs[f"model.layers.{i}.{hf_name}"]
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
    """Writes out_dir/config.json + model.safetensors, which AutoModelForCausalLM opens as LlamaForCausalLM (an
    MoE model as MixtralForCausalLM)."""
    save_quietly(to_hf_llama(model), out_dir)


def load_hf(out_dir: str | os.PathLike) -> Transformer:
    """Our model from a directory written by export_hf or any LlamaForCausalLM or MixtralForCausalLM checkpoint,
    in its stored dtype. ValueError naming config.json and the config key for what the model cannot express."""
    from transformers import AutoConfig

    config_path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: {out_dir} is not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(out_dir)
    problem = unsupported_config(config)  # before reading any weights
    if problem:
        raise ValueError(f"{config_path}: k_model cannot express this model: {problem}")
    return from_hf_llama(HF_CLASSES[config.model_type].from_pretrained(out_dir, dtype="auto"))
