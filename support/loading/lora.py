"""LoRA fine-tuning through peft: low-rank adapters train on a frozen model; checkpoints and exports.

    python ddp_sft_full.py --lora_r 8                      # adapters on out/pretrain -> out/sft/adapter + out/sft/hf
    python ddp_sft_full.py --init_from llama_dir --lora_r 16 --load_in_4bit       # QLoRA (bitsandbytes)

Each targeted projection W (frozen) computes W x + (alpha / r) B A x, where A (r x in) and B (out x r) are the
only weights that train. B starts at zero, so training starts exactly from the base model.

Fused layers. Our model fuses q/k/v into one `wqkv` and the SwiGLU gate/up into one `w13` (k_model.py), and
the adapters train on those fused matrices: peft attaches to any nn.Linear. A fused adapter is exactly a set
of adapters on transformers' separate modules: B A on wqkv is, block of rows by block of rows, B_q A on
q_proj, B_k A on k_proj and B_v A on v_proj, with one A shared. The peft-format export writes it that way (A
copied to each module), so `PeftModel.from_pretrained(LlamaForCausalLM, adapter_dir)` computes exactly what
training computed. Training itself differs from three separate rank-r adapters in two ways: q, k and v share
A (fewer weights: r directions of the input for the three together), and lora_dropout draws one mask for them.

Checkpoints hold the adapter weights and the optimizer state only, plus where the base model comes from and a
digest of its weights: `restore` puts the adapters back on that base and refuses one that has changed.

Export (`export`): out_dir/adapter/ in peft's format (adapter_config.json, adapter_model.safetensors and the
tokenizer), whose base_model_name_or_path is the HF directory it applies to: --init_from itself when that is
an HF model directory training did not change, else out_dir/base/, written then; and out_dir/hf/, the merged
LlamaForCausalLM.

Dtypes. The adapters and their AdamW moments are float32 whatever the base stores. A base stored in bf16 or
fp16 stays so, frozen, when training computes in 16 bits (--dtype bfloat16 / float16, or auto where that is
what it picks): float32 copies would double its memory. Float32 compute upcasts it (trainer.Trainer).

--load_in_4bit (QLoRA): the targeted projections' frozen weights are kept in 4-bit NF4 by bitsandbytes and
dequantized on the fly; the other frozen weights as above. The merged export adds the adapters to the
dequantized weights (what training saw, up to the rounding of bitsandbytes' kernels). The adapter applies to
the base it names: a written base/ holds the dequantized weights too, while an --init_from HF directory holds
the original ones, on which (as with any QLoRA adapter) logits differ from training's by the quantization error.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from support.loading.checkpoint import CKPT_NAME, rebuilt
from support.model.hf_llama import LAYER_WEIGHTS, copy_token_ids, from_hf_llama, save_quietly, to_hf_llama
from k_model import Transformer

# peft is imported by the functions that use it: its import takes seconds, which every fine-tuning script would
# pay at start-up (they take the LoRA flags) in runs without adapters
if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

ADAPTER = "default"  # peft's name for a model's one adapter
TARGETS = ("wqkv", "wo", "w13", "w2")  # every projection of a block; HF names in hf_llama.LAYER_WEIGHTS
DEFAULTS = dict(lora_r=0, lora_alpha=16.0, lora_dropout=0.05, lora_targets=",".join(TARGETS), load_in_4bit=False)


# ----------------------------------------------------------------------------------------------------------
# Flags


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA (peft): train low-rank adapters, the model stays frozen")
    d = DEFAULTS
    g.add_argument("--lora_r", type=int, help=f"adapter rank; 0 = train every weight (default: {d['lora_r']})")
    g.add_argument("--lora_alpha", type=float, help=f"adapter scale alpha / r (default: {d['lora_alpha']})")
    g.add_argument("--lora_dropout", type=float, help=f"dropout on the adapters' input (default: {d['lora_dropout']})")
    g.add_argument("--lora_targets", help="comma-separated projections to adapt: wqkv (HF q_proj, k_proj, v_proj), "
                   f"wo (o_proj), w13 (gate_proj, up_proj), w2 (down_proj) (default: {d['lora_targets']})")
    g.add_argument("--load_in_4bit", action="store_true", default=None,
                   help="QLoRA: keep the adapted projections' frozen weights in 4-bit NF4 (needs bitsandbytes)")


def spec_from_args(args: argparse.Namespace, base: str) -> dict[str, Any]:
    """The adapters' shape from the flags (ValueError naming a bad one); `base` is where the model comes from."""
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if not targets or unknown:
        raise ValueError(f"--lora_targets {args.lora_targets!r}: expected a comma-separated subset of "
                         f"{', '.join(TARGETS)}")
    if args.lora_r < 1:
        raise ValueError(f"--lora_r must be >= 1 for LoRA (0 trains every weight), got {args.lora_r}")
    if not args.lora_alpha > 0:
        raise ValueError(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    return dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets,
                load_in_4bit=bool(args.load_in_4bit), base=os.path.abspath(base))


# ----------------------------------------------------------------------------------------------------------
# Adapters on our model


def attach(model: Transformer, spec: dict[str, Any]) -> Transformer:
    """Adds adapters (B = 0, so the function is unchanged) to the spec's target projections, in place, and
    freezes every other weight; with load_in_4bit those projections are quantized first. The adapters are
    float32 whatever the base stores (peft creates them in the base's dtype: on a bf16 base the float32
    adapters of a checkpoint were rounded when a run resumed). The model keeps the spec, with the digest of
    its base weights, as `lora_spec` (what a checkpoint stores)."""
    model.lora_spec = {**spec, "base_digest": digest(model.state_dict())}
    if spec["load_in_4bit"]:
        quantize_4bit(model, spec["targets"])
    return add_adapters(model, spec)


def add_adapters(model: Transformer, spec: dict[str, Any]) -> Transformer:
    """attach's adapters alone (no digest, no quantization): also on a model built on the meta device."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                        target_modules=list(spec["targets"]))
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    cast_adapter_dtype(model, ADAPTER)  # bf16 / fp16 adapters -> float32, as get_peft_model does by default
    return model


def has_adapters(model: torch.nn.Module) -> bool:
    return hasattr(model, "lora_spec")


def adapted_layers(model: torch.nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) of each projection that carries an adapter, e.g. ("layers.0.attention.wqkv", ...)."""
    from peft.tuners.lora import LoraLayer

    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer))


def base_weights(model: torch.nn.Module, with_adapters: bool = False) -> dict[str, torch.Tensor]:
    """The plain model's state dict (our names, dense float weights): the frozen base, or with_adapters the
    base with each adapter folded in (W + alpha / r * B A)."""
    weights = {k: v for k, v in model.state_dict().items() if "lora_" not in k and ".base_layer." not in k}
    for name, layer in adapted_layers(model):
        weight = dense_weight(layer.get_base_layer())
        weights[f"{name}.weight"] = weight + layer.get_delta_weight(ADAPTER) if with_adapters else weight
    return weights


def plain_model(model: Transformer, with_adapters: bool) -> Transformer:
    """The adapted model's base as a plain Transformer, or with_adapters the plain Transformer computing what
    the adapted model computes (in eval mode), adapters folded into the weights."""
    plain = Transformer(model.config)
    plain.load_state_dict(base_weights(model, with_adapters))
    return plain.to(model.tok_embeddings.weight.device).train(model.training)


def merged(model: Transformer) -> Transformer:
    return plain_model(model, with_adapters=True)


def digest(weights: dict[str, torch.Tensor]) -> str:
    """A fingerprint of a model's weights: sha256 of every 997th value of each tensor (as float32, so a bf16
    source and its float32 copy agree). Milliseconds even for billions of weights; any retraining of the
    base changes it."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().flatten()[::997].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def adapter_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """The weights a LoRA checkpoint stores (train_task.Task.model_weights): the adapters' (under "lora" it
    stores their spec, model.lora_spec, with the base's digest). Not under --parallel fsdp, whose shards DCP
    writes: peft >= 0.22 gathers sharded adapters here, a collective that rank 0 alone would wait in forever."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)


def restore(base: Transformer, state: dict[str, Any], source: str | os.PathLike) -> Transformer:
    """The adapted model of a LoRA checkpoint on `base`, the model its spec names (loading.model_from_state
    opens it): the saved config (a grown vocabulary gets the same mean rows again, dropout the same value),
    adapters attached and loaded (a DCP checkpoint read without its weights: left for the ranks to load their
    shards). ValueError when the base is not the one the adapters were trained on."""
    from peft import set_peft_model_state_dict

    spec = state["lora"]
    model = attach(rebuilt(base, **state["model_config"]), spec)
    if model.lora_spec["base_digest"] != spec["base_digest"]:
        raise ValueError(f"{source}: its adapters were trained on another {spec['base']}: the base model's "
                         "weights have changed since (retrained or replaced)")
    if "model" not in state:
        return model
    # a DCP checkpoint names the adapters as the module does ("...wqkv.lora_A.default.weight"), peft's
    # state dicts without the adapter's name
    adapters = {k.replace(f".{ADAPTER}.", "."): v for k, v in state["model"].items()}
    loaded = set_peft_model_state_dict(model, adapters, adapter_name=ADAPTER)
    if loaded.unexpected_keys:
        raise ValueError(f"{source}: adapter weights that fit no adapter: {loaded.unexpected_keys[:5]}")
    return model


# ----------------------------------------------------------------------------------------------------------
# Export and peft-format adapter directories


def export(model: Transformer, out_dir: Path, tokenizer: Any) -> Path:
    """out_dir/adapter (peft format, on the HF base it names) and out_dir/hf (merged); returns the latter."""
    from peft import LoraConfig, get_peft_model

    copy_token_ids(model.config, tokenizer)
    spec = model.lora_spec
    hf = to_hf_llama(plain_model(model, with_adapters=False).eval())
    base_dir = unchanged_hf_base(spec["base"], model.config.vocab_size)
    if base_dir is None:
        base_dir = out_dir / "base"
        save_hf(hf, tokenizer, base_dir)
    targets = [hf_name.rsplit(".", 1)[1] for t in spec["targets"] for hf_name in LAYER_WEIGHTS[our_name(t)]]
    hf.name_or_path = str(base_dir.resolve())  # get_peft_model writes it as the adapter's base_model_name_or_path
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], target_modules=targets)
    peft_model = get_peft_model(hf, config, adapter_name=ADAPTER)
    copy_adapters_to_hf(model, hf)
    save_hf(peft_model, tokenizer, out_dir / "adapter")
    save_hf(peft_model.merge_and_unload(), tokenizer, out_dir / "hf")
    return out_dir / "hf"


def our_name(target: str) -> str:
    """"wqkv" -> "attention.wqkv": the key of hf_llama.LAYER_WEIGHTS."""
    return next(name for name in LAYER_WEIGHTS if name.endswith(f".{target}"))


@torch.no_grad()
def copy_adapters_to_hf(model: Transformer, hf: torch.nn.Module) -> None:
    """Our adapters into the peft layers of an HF Llama: each fused B split by the rows of the HF modules it
    stacks (q, k, v / gate, up), A copied to each of them. Exact: the same B A, block by block."""
    for name, layer in adapted_layers(model):
        _, i, ours = name.split(".", 2)  # "layers", "3", "attention.wqkv"
        parts = [hf.get_submodule(f"model.layers.{i}.{hf_name}") for hf_name in LAYER_WEIGHTS[ours]]
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        for part, b_rows in zip(parts, b.split([p.out_features for p in parts])):
            part.lora_A[ADAPTER].weight.copy_(a)
            part.lora_B[ADAPTER].weight.copy_(b_rows)


def unchanged_hf_base(base: str, vocab_size: int) -> Path | None:
    """The HF model directory training started from, if it did start from one and left its vocabulary as it
    was (so an adapter can name it as its base); None otherwise (a checkpoint, or grown embeddings)."""
    path = Path(base)
    if not (path / "config.json").is_file() or (path / CKPT_NAME).is_file():  # open_model prefers ckpt.pt
        return None
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return path if saved.get("vocab_size") == vocab_size else None


def save_hf(model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> None:
    save_quietly(model, out_dir)
    tokenizer.save_pretrained(out_dir)


def load_adapter_dir(path: str | os.PathLike) -> Transformer:
    """Our model from a peft adapter directory (ours or any LoRA adapter for a Llama model): its base, named by
    base_model_name_or_path, with the adapter merged in by peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config_path = Path(path) / "adapter_config.json"
    base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"{config_path}: base_model_name_or_path {base!r} is not a model directory here")
    hf = AutoModelForCausalLM.from_pretrained(base)
    return from_hf_llama(PeftModel.from_pretrained(hf, path).merge_and_unload())


# ----------------------------------------------------------------------------------------------------------
# 4-bit base weights (QLoRA)


def is_4bit(linear: torch.nn.Module) -> bool:
    return hasattr(linear.weight, "quant_state")  # bitsandbytes' Params4bit


def dense_weight(linear: torch.nn.Module) -> torch.Tensor:
    """A projection's weight as a float tensor, dequantized when it is stored in 4 bits."""
    if not is_4bit(linear):
        return linear.weight.detach()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state).float()


def quantize_4bit(model: Transformer, targets: list[str]) -> None:
    """Replaces each target projection by a bitsandbytes 4-bit NF4 layer holding the same (frozen) weight,
    quantized here, on the CPU; ValueError where bitsandbytes is missing or cannot."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ValueError(f"--load_in_4bit needs bitsandbytes (pip install bitsandbytes): {e}") from e
    for name, linear in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(linear.weight.detach().float().cpu(), requires_grad=False,
                                             quant_type="nf4")
        try:
            quantized = quantized.to("cpu")  # Params4bit quantizes when first moved to a device
        except Exception as e:  # bitsandbytes raises several types where a backend is missing
            raise ValueError(f"--load_in_4bit: bitsandbytes cannot quantize on this machine ({type(e).__name__}: "
                             f"{e}); train without it") from e
        model.set_submodule(name, quantized)
