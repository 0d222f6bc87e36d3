"""The training scripts' command-line flags, and where each value comes from.

A value comes from the first of: the command line; with --resume, the flags the checkpoint was trained with
(all but PER_LAUNCH ones); the --preset (scripts that build a new model); the script's own Task.defaults;
COMMON_DEFAULTS. What none of them sets (SFT's --max_seq_len and --dropout) the trainer takes from the initial
model. Every flag is parsed with default None, so "not given" stays visible, and the parsed command line is
never rewritten: resolve_args returns a new Namespace, with the source of each value for train.log.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from k_model import rope_tables
from support.loading.sources import DEFAULT_TOKENIZER, DTYPES, SourcedModel
from support.training.optim import MUON_DTYPES, OPTIMIZERS, SCHEDULES
from support.model.rope import ORIGINAL

# Model shape and per-process batch (and a schedule, where the preset has one) for scripts that build a new model.
# Explicit flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    # a few seconds on a laptop CPU: smoke tests, debugging
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, batch_size=16, accumulation_steps=1),
    # demo.sh's model: 1.3M parameters with its 4096-token vocabulary, about 6k tokens/s on a 2-core CPU; Muon
    # (README "Optimizers and schedules"): at 600 steps val ppl 355 instead of AdamW's 432, and the demo's SFT
    # on top 85.6% sentiment accuracy instead of 84.7%
    "demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128, batch_size=16, accumulation_steps=1,
                 optimizer="muon"),
    # the TinyStories paper's ~28M size class (hidden 512, 8 layers), whose models write fluent stories: 25.7M
    # parameters with a 4096-token vocabulary; 20k steps of 64 x 512 tokens read 655M tokens
    "tinystories": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512, batch_size=64,
                        accumulation_steps=1, learning_rate=5e-4, warmup_iters=1000, max_steps=20000),
    # the original project's 215M model; per GPU: 32 x 512 tokens, x4 accumulation
    "215M": dict(dim=1024, n_layers=18, n_heads=16, n_kv_heads=8, max_seq_len=512, batch_size=32, accumulation_steps=4),
}
COMMON_DEFAULTS: dict[str, Any] = dict(
    epochs=1, max_steps=0, accumulation_steps=1, weight_decay=0.1, grad_clip=1.0,
    optimizer="adamw", muon_learning_rate=0.02, muon_dtype="auto", lr_schedule="cosine", decay_fraction=0.2,
    seed=1337, group_by_length=0, device="auto", dtype="auto", parallel="ddp", cpu_offload=False, num_threads=0,
    num_workers=0, compile=False, log_interval=10,
    eval_interval=200, eval_samples=512, save_interval=200, sample_tokens=32, resume=False, overwrite=False,
    peak_tflops=0.0, eval_tasks_limit=0, use_swanlab=False, swanlab_project="k-model", swanlab_mode="offline",
    num_experts=0, num_experts_per_tok=2,
)
# flags that set the router losses' weights on an MoE model's config (k_model.ModelConfig); not given: the model's
ROUTER_COEFS = ("router_aux_loss_coef", "router_z_loss_coef")
# --rope_scaling's parameters: flag -> (the rope_parameters key it sets, the rope types that read it)
ROPE_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rope_factor": ("factor", ("linear", "dynamic", "yarn", "llama3")),
    "rope_beta_fast": ("beta_fast", ("yarn",)),
    "rope_beta_slow": ("beta_slow", ("yarn",)),
    "rope_low_freq_factor": ("low_freq_factor", ("llama3",)),
    "rope_high_freq_factor": ("high_freq_factor", ("llama3",)),
}
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama 3.1's
# flags that shape the network, the data order or the optimizer state: a resumed run must keep the values it was
# trained with
FIXED_AT_RESUME = ("preset", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "dropout", "seed",
                   "group_by_length", "init_from",
                   "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "load_in_4bit", "optimizer",
                   "rope_scaling", *ROPE_FLAGS, "parallel", "num_experts", "num_experts_per_tok")
# flags about this launch only, never taken from a checkpoint
PER_LAUNCH = ("resume", "overwrite", "device", "cpu_offload", "num_threads", "num_workers", "compile",
              "peak_tflops", "use_swanlab", "swanlab_project", "swanlab_mode")
AT_LEAST_ONE = ("epochs", "batch_size", "accumulation_steps", "log_interval", "save_interval", "eval_samples",
                "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")
AT_LEAST_ZERO = ("group_by_length", "eval_tasks_limit", "max_steps", "warmup_iters", "eval_interval", "num_threads",
                 "num_workers", "weight_decay", "grad_clip", "peak_tflops", "sample_tokens")


def build_parser(task: Any) -> argparse.ArgumentParser:
    """Every flag defaults to None here; resolve_args fills in the value and --help shows it."""
    shown = {**COMMON_DEFAULTS, **task.defaults, **(PRESETS[task.defaults["preset"]] if task.builds_model else {})}
    p = argparse.ArgumentParser(description=task.description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(group: argparse._ArgumentGroup, name: str, help: str, **kw: Any) -> None:
        if shown.get(name) is not None and kw.get("action") != "store_true":
            help += f" (default: {shown[name]})"
        group.add_argument(f"--{name}", help=help, **kw)

    g = p.add_argument_group("data and paths")
    add(g, "data_path", "training data")
    add(g, "val_data_path", "held-out data for evaluation; evaluation is skipped if it is absent")
    add(g, "tokenizer_path", "tokenizer directory (sets the vocab size); a run from --init_from reads that model's "
                             f"own unless this is given (default: {DEFAULT_TOKENIZER})")
    add(g, "out_dir", "checkpoint ckpt.pt, train.log, metrics.jsonl and the final hf/ export")
    add(g, "group_by_length", "N > 0: sort each N consecutive samples of an epoch's shuffled order by length (their "
                              "JSONL line's bytes), so that a step's samples are alike in length and its batch holds "
                              "less padding (SFT, DPO); 0 = off", type=int)

    g = p.add_argument_group("optimization")
    add(g, "epochs", "passes over the data (when --max_steps is 0)", type=int)
    add(g, "max_steps", "optimizer steps to train; 0 = --epochs passes", type=int)
    add(g, "batch_size", "samples per micro-batch per process", type=int)
    add(g, "accumulation_steps", "micro-batches per optimizer step", type=int)
    add(g, "optimizer", "adamw: AdamW for every weight; muon: Muon for the attention and MLP matrices, AdamW for "
                        "the rest (optim.py)", choices=OPTIMIZERS)
    add(g, "learning_rate", "AdamW's peak learning rate", type=float)
    add(g, "muon_learning_rate", "Muon's peak learning rate (--optimizer muon)", type=float)
    add(g, "muon_dtype", "dtype of Muon's Newton-Schulz iteration; auto = bfloat16 where the device computes it "
                         "natively (CUDA from Ampere on, CPUs with AVX512_BF16/AMX), else float32 (optim.py)",
        choices=["auto", *MUON_DTYPES])
    add(g, "lr_schedule", "after the warmup: cosine to a tenth of the peak, or wsd: the peak, then linear to 0 over "
                          "the last --decay_fraction of the steps", choices=SCHEDULES)
    add(g, "decay_fraction", "wsd: the share of the steps that decays", type=float)
    add(g, "warmup_iters", "linear warmup steps", type=int)
    add(g, "weight_decay", "decoupled decay of weights with >= 2 dims, times the learning rate", type=float)
    add(g, "grad_clip", "max gradient norm; 0 disables clipping", type=float)
    add(g, "seed", "initialization, data order and dropout", type=int)

    g = p.add_argument_group("runtime")
    add(g, "device", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    add(g, "dtype", "autocast dtype; auto = bfloat16 on CUDA (float16 without bf16 support) and on CPUs with "
                    "native bf16 (AVX512_BF16/AMX), else float32", choices=["auto", *DTYPES])
    add(g, "parallel", "ddp: every process holds the whole model (DDP); fsdp: weights, gradients and optimizer "
                       "state sharded over the processes (FSDP2, support/training/fsdp.py), saved as a distributed "
                       "checkpoint out_dir/ckpt_dcp", choices=["ddp", "fsdp"])
    add(g, "cpu_offload", "--parallel fsdp: keep the shards and the optimizer step on the CPU (a base too large for "
                          "the GPU; several times slower)", action="store_true", default=None)
    add(g, "num_threads", "torch CPU threads per process; 0 = torch default", type=int)
    add(g, "num_workers", "DataLoader worker processes", type=int)
    add(g, "compile", "torch.compile the model", action="store_true", default=None)

    g = p.add_argument_group("logging and checkpoints")
    add(g, "log_interval", "steps between progress lines", type=int)
    add(g, "eval_interval", "steps between evaluations; 0 = only at the end", type=int)
    add(g, "eval_samples", "validation samples per evaluation (the first ones; all if fewer)", type=int)
    add(g, "save_interval", "steps between checkpoints (also saved at the end and on SIGINT/SIGTERM)", type=int)
    add(g, "sample_prompt", "prompt the model continues greedily at each evaluation, printed and logged "
                            "(repeatable)", action="append")
    add(g, "sample_tokens", "tokens of each evaluation sample; 0 = no samples", type=int)
    add(g, "eval_tasks", "lm-eval tasks run at each evaluation on rank 0 (eval_model.py; e.g. news_cloze,sentiment_gen), "
                         "logged as eval/<task>/<metric>")
    add(g, "eval_tasks_limit", "documents per --eval_tasks task (the first ones); 0 = all", type=int)
    add(g, "resume", "continue exactly from out_dir/ckpt.pt, with its flags unless given again",
        action="store_true", default=None)
    add(g, "overwrite", "start a fresh run even though out_dir/ckpt.pt exists (it is replaced at the first save)",
        action="store_true", default=None)
    add(g, "peak_tflops", "per-device peak for MFU; 0 = GPU datasheet table, or a measured matmul peak on CPU",
        type=float)
    add(g, "use_swanlab", "also log to swanlab (pip install swanlab)", action="store_true", default=None)
    add(g, "swanlab_project", "swanlab project name")
    add(g, "swanlab_mode", "offline: no account or network, logs under out_dir/swanlog (`swanlab sync` uploads them "
                           "later); local: the same plus `swanlab watch` (needs pip install 'swanlab[dashboard]')",
        choices=["offline", "local", "online", "disabled"])

    g = p.add_argument_group("model")
    if task.builds_model:
        shapes = "; ".join(f"{name}: dim {v['dim']}, {v['n_layers']} layers, seq {v['max_seq_len']}"
                           for name, v in PRESETS.items())
        add(g, "preset", f"model shape and batch size ({shapes})", choices=list(PRESETS))
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads"):
            add(g, name, "from --preset", type=int)
        add(g, "max_seq_len", "tokens per sample; from --preset", type=int)
        add(g, "dropout", "dropout probability", type=float)
        add(g, "num_experts", "> 0: every feed-forward is a mixture of this many SwiGLU experts (Mixtral; "
                              "docs/moe.md); 0: dense", type=int)
        add(g, "num_experts_per_tok", "--num_experts: the experts each token is routed to (top-k)", type=int)
    else:
        add(g, "max_seq_len", "tokens per sample; default: the initial model's max_seq_len", type=int)
        add(g, "dropout", "default: the initial model's dropout", type=float)
    add(g, "rope_scaling", "stretch the initial model's rotary positions to --rope_factor x its context and train "
                           "at that length (a long-context fine-tune); saved in the checkpoint and the HF export",
        choices=ROPE_FLAGS["rope_factor"][1])
    add(g, "rope_factor", "--rope_scaling: the new context / the model's own", type=float)
    add(g, "rope_beta_fast", "--rope_scaling yarn: frequencies turning more often than this within the original "
                             "context are kept (default 32)", type=float)
    add(g, "rope_beta_slow", "--rope_scaling yarn: those turning less often are divided by the factor (default 1)",
        type=float)
    add(g, "rope_low_freq_factor", "--rope_scaling llama3: waves longer than context / this are divided by the "
                                   f"factor (default {LLAMA3_DEFAULTS['low_freq_factor']})", type=float)
    add(g, "rope_high_freq_factor", "--rope_scaling llama3: waves shorter than context / this are kept "
                                    f"(default {LLAMA3_DEFAULTS['high_freq_factor']})", type=float)
    add(g, "router_aux_loss_coef", "an MoE model's load-balancing loss weight (default: the model's, 0.01 for a new "
                                   "one)", type=float)
    add(g, "router_z_loss_coef", "an MoE model's router z-loss weight (default: the model's, 0.001 for a new one)",
        type=float)
    task.add_flags(p)
    return p


def resolve_args(given: argparse.Namespace, task: Any, saved: dict[str, Any] | None = None,
                 ) -> tuple[argparse.Namespace, dict[str, str]]:
    """Each flag's value and where it came from (precedence in the module docstring). `given` is the parsed
    command line (None = not given); `saved` the flags a checkpoint was trained with."""
    explicit = {k: v for k, v in vars(given).items() if v is not None}
    inherited = {k: v for k, v in (saved or {}).items() if k in vars(given) and k not in PER_LAUNCH}
    preset = explicit.get("preset") or inherited.get("preset") or task.defaults.get("preset")
    layers = [("command line", explicit), ("checkpoint", inherited), (f"preset {preset}", PRESETS.get(preset, {})),
              ("script default", task.defaults), ("default", COMMON_DEFAULTS)]
    values, sources = {}, {}
    for name in vars(given):
        values[name], sources[name] = None, "the initial model"
        for source, layer in layers:
            if layer.get(name) is not None:
                values[name], sources[name] = layer[name], source
                break
    return argparse.Namespace(**values), sources


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that would train nothing or nonsense (ValueError naming the flag)."""
    for names, low in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):
        for name in names:
            value = getattr(args, name, None)
            if value is not None and value < low:
                raise ValueError(f"--{name} must be >= {low}, got {value}")
    for name in ("learning_rate", "muon_learning_rate"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.decay_fraction <= 1:
        raise ValueError(f"--decay_fraction must be in [0, 1], got {args.decay_fraction}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    check_expert_flags(args)
    check_rope_flags(args)


def check_expert_flags(args: argparse.Namespace) -> None:
    n, k = getattr(args, "num_experts", 0), getattr(args, "num_experts_per_tok", 1)
    if n < 0 or n == 1:
        raise ValueError(f"--num_experts must be 0 (dense) or >= 2, got {n}")
    if n and not 1 <= k <= n:
        raise ValueError(f"--num_experts_per_tok must be between 1 and --num_experts {n}, got {k}")
    for name in ROUTER_COEFS:
        if getattr(args, name) is not None and not getattr(args, name) >= 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")


def check_rope_flags(args: argparse.Namespace) -> None:
    kind = args.rope_scaling
    for flag, (_, types) in ROPE_FLAGS.items():
        if getattr(args, flag) is not None and kind not in types:
            raise ValueError(f"--{flag} applies to --rope_scaling {' / '.join(types)}, "
                             + (f"not {kind}" if kind else "which is not given"))
    if kind and args.rope_factor is None:
        raise ValueError(f"--rope_scaling {kind} needs --rope_factor (the new context / the model's own)")
    if kind and not args.rope_factor >= 1:
        raise ValueError(f"--rope_factor must be >= 1 (a longer context), got {args.rope_factor}")


def check_resume_flags(given: argparse.Namespace, saved: dict[str, Any], ckpt_path: Path) -> None:
    for name in FIXED_AT_RESUME:
        asked = getattr(given, name, None)
        if asked is not None and name in saved and saved[name] != asked:
            raise ValueError(f"{ckpt_path}: checkpoint was trained with --{name} {saved[name]}, "
                             f"this run asks for --{name} {asked}; resume with the same value")


def check_resume_experts(given: argparse.Namespace, model_config: dict[str, Any], ckpt_path: Path) -> None:
    """An MoE checkpoint resumed as dense, or a dense one as MoE (checkpoints of any age: the model config says)."""
    experts = model_config.get("num_local_experts", 0)
    asked = getattr(given, "num_experts", None)
    if asked is not None and asked != experts:
        kind = f"an MoE model with {experts} experts" if experts else "a dense model"
        raise ValueError(f"{ckpt_path}: checkpoint is {kind}, this run asks for --num_experts {asked}; resume with "
                         f"--num_experts {experts} or without the flag")


def with_router_coefs(start: SourcedModel, args: argparse.Namespace) -> SourcedModel:
    """The initial (or resumed) model with --router_aux_loss_coef / --router_z_loss_coef set on its config, in
    place (the training forward reads them there; the checkpoint and the HF export save them)."""
    given = [name for name in ROUTER_COEFS if getattr(args, name) is not None]
    if given and not start.model.config.num_local_experts:
        raise ValueError(f"--{given[0]} weighs an MoE model's router loss, and {start.source} is a dense model")
    for name in given:
        setattr(start.model.config, name, getattr(args, name))
    return start


def with_model_values(args: argparse.Namespace, sources: dict[str, str], start: SourcedModel,
                      tokenizer_path: str) -> tuple[argparse.Namespace, dict[str, str]]:
    """The final flags: the tokenizer directory Task.tokenizer chose (the checkpoint records it, so a resumed
    run reads the same one), and for flags no layer set (SFT's max_seq_len, dropout; an MoE model's router loss
    weights) the model's values."""
    config = start.model.config
    values = {**vars(args), "tokenizer_path": tokenizer_path}
    sources = {**sources, "tokenizer_path": sources["tokenizer_path"] if args.tokenizer_path else "the task"}
    for name in ("max_seq_len", "dropout", *(ROUTER_COEFS if config.num_local_experts else ())):
        if values[name] is None:
            values[name] = getattr(config, name)
    if args.rope_scaling and sources["max_seq_len"] != "command line":
        values["max_seq_len"], sources["max_seq_len"] = config.max_seq_len, f"--rope_scaling {args.rope_scaling}"
    if values["max_seq_len"] > config.max_seq_len:
        raise ValueError(f"--max_seq_len {values['max_seq_len']} exceeds the model's max_seq_len "
                         f"{config.max_seq_len} ({start.source})")
    return argparse.Namespace(**values), sources


def with_rope_scaling(start: SourcedModel, args: argparse.Namespace) -> SourcedModel:
    """The fresh run's initial model with --rope_scaling applied: its context grows --rope_factor times, and its
    config (which the checkpoint and the HF export save) carries the scaling. In place, so that a model with
    LoRA adapters attached is scaled as well; the weights are unchanged. The flags are checked (check_rope_flags)."""
    if not args.rope_scaling:
        return start
    model, config = start.model, start.model.config
    if config.rope_scaling_params:
        raise ValueError(f"{start.source} already has rope scaling {config.rope_scaling_params}: --rope_scaling "
                         "stretches a model trained with plain RoPE")
    scaling = {"rope_type": args.rope_scaling}
    scaling.update({key: getattr(args, flag) for flag, (key, _) in ROPE_FLAGS.items()
                    if getattr(args, flag) is not None})
    if args.rope_scaling != "linear":
        scaling[ORIGINAL] = config.max_seq_len
    if args.rope_scaling == "llama3":
        scaling = {**LLAMA3_DEFAULTS, **scaling}
    original, context = config.max_seq_len, int(args.rope_factor * config.max_seq_len)
    config.rope_scaling_params, config.max_seq_len = scaling, context
    model.rope_cos, model.rope_sin = rope_tables(config)
    note = f" (rope scaling {args.rope_scaling} x{args.rope_factor:g}: context {original} -> {context})"
    return start._replace(source=start.source + note)
