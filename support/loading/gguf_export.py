"""Write a model and its tokenizer as one GGUF file, the format llama.cpp, Ollama and LM Studio load.

    write_gguf(model, tokenizer, "model.gguf", "q8_0")          # architecture `llama`, tensor by tensor
    modelfile("model.gguf", tokenizer, 512, 0.7, 0.9)           # an Ollama Modelfile for it

The file is written with the `gguf` package, llama.cpp's own Python writer, so its keys and tensor layouts are
those llama.cpp reads. Three things differ from our checkpoint and are translated here:
  * rotary layout: llama.cpp's `llama` architecture rotates adjacent channel pairs (2i, 2i + 1), ours (and HF
    Llama's) rotate channel i with i + head_dim/2; each head's q and k rows are interleaved to match (`_interleave`,
    the permutation llama.cpp's HF converter applies);
  * RoPE scaling: linear and yarn as llama.cpp's rope.scaling keys; llama3 as a `rope_freqs` tensor (each
    frequency's divisor), which is how llama.cpp expresses it; dynamic NTK has no GGUF form and is refused;
  * the tokenizer: our byte-level BPE (GPT-2's split regex, no prefix space) is llama.cpp's `gpt2` model with
    the `gpt-2` pre-tokenizer. llama.cpp applies no normalizer, so a tokenizer with NFKC tokenizes text that NFKC
    changes (full-width punctuation, compatibility characters) differently there: `tokenizer_problems` says so.
Tensors are converted one at a time and written straight to the file, so memory holds the model plus one
converted tensor; the file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from k_model import Transformer
from support.data.tokenizer_spec import CHAT_TEMPLATE
from support.model.rope import ORIGINAL, rope_frequencies

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "llama"  # llama.cpp's name for a bias-free SwiGLU decoder with RMSNorm and RoPE: k_model's shape
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split regex, which ByteLevel(use_regex=True) applies


class ExportError(ValueError):
    """A model or request the export cannot write; the message is one line naming what."""


def _file_type(outtype: str) -> Any:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


# ----------------------------------------------------------------------------------------------------------
# Hyperparameters and RoPE


def _rope_keys(writer: Any, model: Transformer) -> torch.Tensor | None:
    """Writes the RoPE scaling keys; returns llama3's rope_freqs tensor (None for the other types)."""
    import gguf

    cfg = model.config
    scaling = cfg.rope_scaling_params or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "default":
        return None
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        return None
    if kind == "yarn":
        _check_yarn(scaling)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(scaling[ORIGINAL])
        writer.add_rope_scaling_yarn_beta_fast(float(scaling.get("beta_fast") or 32))
        writer.add_rope_scaling_yarn_beta_slow(float(scaling.get("beta_slow") or 1))
        return None
    if kind == "llama3":
        # llama.cpp divides each plain frequency by rope_freqs[i]: the ratio of plain to llama3's frequencies
        plain, _ = rope_frequencies(cfg.head_dim, cfg.rope_theta, None, cfg.max_seq_len)
        scaled, _ = rope_frequencies(cfg.head_dim, cfg.rope_theta, scaling, cfg.max_seq_len)
        return plain / scaled
    raise ExportError(f"rope_type {kind!r} has no GGUF form: llama.cpp computes dynamic NTK scaling from its own "
                      "context size, not from the model file; export a model with linear, yarn, llama3 or no scaling")


def _check_yarn(scaling: dict) -> None:
    """llama.cpp's yarn: floor/ceil'd ramp ends and the attention factor 0.1 ln(factor) + 1 it derives itself."""
    if scaling.get("truncate", True) is False:
        raise ExportError("yarn rope scaling with truncate=False: llama.cpp always rounds the ramp ends")
    extra = [k for k in ("attention_factor", "mscale", "mscale_all_dim") if scaling.get(k) is not None]
    if extra:
        raise ExportError(f"yarn rope scaling with {', '.join(extra)}: llama.cpp's llama architecture derives "
                          "the attention factor from factor alone")


def _hyperparameters(writer: Any, model: Transformer, outtype: str) -> None:
    cfg = model.config
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.num_local_experts:  # Mixtral in llama.cpp: the llama architecture with expert tensors and these keys
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_file_type(_file_type(outtype))


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_problems(tokenizer: Any) -> tuple[str | None, str | None]:
    """(why llama.cpp cannot tokenize as `tokenizer` does, a warning) for a fast HF tokenizer; None = fine."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre, norm = state["model"], state.get("pre_tokenizer") or {}, state.get("normalizer")
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space"):
        return (f"tokenizer {model.get('type')} with pre-tokenizer {pre.get('type')}: the export writes byte-level "
                "BPE with GPT-2's split (ByteLevel, use_regex, no prefix space), as train_tokenizer.py builds", None)
    if norm is None:
        return None, None
    if norm.get("type") == "NFKC":
        return None, ("the tokenizer applies NFKC, llama.cpp does not: text NFKC changes (full-width punctuation "
                      "such as ，！？, ligatures) tokenizes differently there; retrain it (train_tokenizer.py no "
                      "longer adds NFKC) for identical tokens")
    return f"tokenizer normalizer {norm.get('type')}: llama.cpp applies none", None


def _tokenizer_keys(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    import gguf

    problem, _ = tokenizer_problems(tokenizer)
    if problem:
        raise ExportError(problem)
    if len(tokenizer) != vocab_size:
        raise ExportError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {vocab_size}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = {a.content for a in tokenizer.added_tokens_decoder.values() if a.special}
    added = {a.content for a in tokenizer.added_tokens_decoder.values()}
    tokens = [by_id[i] for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.USER_DEFINED if t in added
             else gguf.TokenType.NORMAL for t in tokens]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        if getattr(tokenizer, key) is not None:
            add(getattr(tokenizer, key))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ----------------------------------------------------------------------------------------------------------
# Tensors


def _interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k from rotate-half order (pair i, i + d/2) to llama.cpp's adjacent pairs (2i, 2i + 1)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _tensors(model: Transformer, rope_freqs: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(GGUF name, our tensor or a view of it, heads whose rows are interleaved on writing: 0 = none) for every
    tensor, in file order. Views only: nothing is copied until the tensor is written."""
    cfg = model.config
    sd = model.state_dict()
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    yield "token_embd.weight", sd["tok_embeddings.weight"], 0
    if rope_freqs is not None:
        yield "rope_freqs.weight", rope_freqs, 0
    for i in range(cfg.n_layers):
        layer = {k.removeprefix(f"layers.{i}."): v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        wq, wk, wv = layer["attention.wqkv.weight"].split([q, kv, kv])
        yield f"blk.{i}.attn_norm.weight", layer["attention_norm.weight"], 0
        yield f"blk.{i}.attn_q.weight", wq, cfg.n_heads
        yield f"blk.{i}.attn_k.weight", wk, cfg.n_kv_heads
        yield f"blk.{i}.attn_v.weight", wv, 0
        yield f"blk.{i}.attn_output.weight", layer["attention.wo.weight"], 0
        yield f"blk.{i}.ffn_norm.weight", layer["ffn_norm.weight"], 0
        if cfg.num_local_experts:  # stacked experts: (experts, rows, cols), as llama.cpp's *_exps tensors are
            gate, up = layer["feed_forward.w13"].split([cfg.hidden_dim, cfg.hidden_dim], dim=1)
            yield f"blk.{i}.ffn_gate_inp.weight", layer["feed_forward.gate.weight"], 0
            yield f"blk.{i}.ffn_gate_exps.weight", gate, 0
            yield f"blk.{i}.ffn_up_exps.weight", up, 0
            yield f"blk.{i}.ffn_down_exps.weight", layer["feed_forward.w2"], 0
        else:
            gate, up = layer["feed_forward.w13.weight"].split([cfg.hidden_dim, cfg.hidden_dim])
            yield f"blk.{i}.ffn_gate.weight", gate, 0
            yield f"blk.{i}.ffn_up.weight", up, 0
            yield f"blk.{i}.ffn_down.weight", layer["feed_forward.w2.weight"], 0
    yield "output_norm.weight", sd["norm.weight"], 0
    if not cfg.tie_word_embeddings:  # tied: llama.cpp reads the output layer from token_embd
        yield "output.weight", sd["output.weight"], 0


def _ggml_type(name: str, shape: tuple[int, ...], outtype: str) -> Any:
    """llama.cpp's convention: norms, rope_freqs and an MoE router stay float32 (a router's rounding would move
    tokens to other experts); matrices take the outtype, and q8_0 falls back to f16 for a matrix whose rows are
    not a whole number of 32-value blocks."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32" or ".ffn_gate_inp." in name:
        return T.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
        return T.F16
    return {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[outtype]


def _encode(tensor: torch.Tensor, qtype: Any) -> np.ndarray:
    """The tensor's bytes in qtype; gguf's quantize rounds (f16, bf16 to nearest even, q8_0) as llama.cpp does."""
    import gguf

    data = gguf.quants.quantize(tensor.detach().to(torch.float32).cpu().numpy(), qtype)
    return data.view(np.uint8).reshape(gguf.quant_shape_to_byte_shape(tuple(tensor.shape), qtype))


# ----------------------------------------------------------------------------------------------------------
# The file


def write_gguf(model: Transformer, tokenizer: Any, outfile: str | os.PathLike, outtype: str = "f16",
               name: str | None = None) -> None:
    """Writes `model` with `tokenizer` (its chat template included) to outfile; ExportError in one line for
    what llama.cpp cannot express or where the file cannot be written. No partial file is left on failure."""
    import gguf

    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r} is not supported (choose from {', '.join(OUTTYPES)})")
    outfile = Path(outfile)
    tmp = outfile.with_name(outfile.name + ".part")
    writer = gguf.GGUFWriter(tmp, ARCH)
    writer.add_name(name or outfile.stem)
    _hyperparameters(writer, model, outtype)
    rope_freqs = _rope_keys(writer, model)
    _tokenizer_keys(writer, tokenizer, model.config.vocab_size)
    tensors = list(_tensors(model, rope_freqs))
    for tname, t, _ in tensors:  # shapes and types first: the header precedes the data
        qtype = _ggml_type(tname, tuple(t.shape), outtype)
        byte_shape = gguf.quant_shape_to_byte_shape(tuple(t.shape), qtype)
        writer.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    try:
        writer.write_header_to_file(path=tmp)
    except OSError as e:
        raise ExportError(f"cannot write {outfile}: {e.strerror}") from None
    try:
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tname, t, heads in tensors:
            qtype = _ggml_type(tname, tuple(t.shape), outtype)
            writer.write_tensor_data(_encode(_interleave(t, heads) if heads else t, qtype))
        writer.close()
        os.replace(tmp, outfile)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------
# Ollama

# Our ChatML template (tokenizer_spec.CHAT_TEMPLATE) in Ollama's Go template language: the same text per message
OLLAMA_CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                 '<|im_start|>assistant\n')


def modelfile(gguf_name: str, tokenizer: Any, context_len: int, temperature: float, top_p: float) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` (beside it): the chat template, the stop token and
    the default sampling. A chat template other than ours has no Go translation here: Ollama then reads the
    one in the GGUF file."""
    lines = [f"FROM ./{gguf_name}"]
    if tokenizer.chat_template == CHAT_TEMPLATE:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
    if tokenizer.eos_token:
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    lines += [f"PARAMETER temperature {temperature}", f"PARAMETER top_p {top_p}", f"PARAMETER num_ctx {context_len}"]
    return "\n".join(lines) + "\n"
