"""Pretrain a LLaMA2-style model from scratch, or continue pretraining one (--init_from), on a pretokenized
corpus (data_process.py pretokenize).

    python ddp_pretrain.py                                  # one process, the demo preset, out/ layout
    torchrun --nproc_per_node=8 ddp_pretrain.py --preset 215M   # DDP on 8 GPUs
    python ddp_pretrain.py --resume                         # continue out/pretrain/ckpt.pt exactly
    python ddp_pretrain.py --init_from llama_dir --data_path corpus.bin   # continue any LlamaForCausalLM
    python ddp_pretrain.py --num_experts 4 --num_experts_per_tok 1   # a mixture of experts (docs/moe.md)

With --init_from the model (its shape, weights and tokenizer) is that checkpoint's; --preset and the shape
flags then only set the batch size, and the corpus must be pretokenized with its tokenizer
(data_process.py pretokenize --tokenizer llama_dir). The loop and checkpoint format live in
trainer.py, the flags in train_flags.py; this script picks the data and the initial model.
"""

import argparse
from typing import Any

import trainer
from dataset import PretrainDataset
from k_model import ModelConfig, Transformer
from support.loading.sources import SourcedModel, initial_model, load_tokenizer, tokenizer_dir_for
from support.training.train_task import Task

SHAPE_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads")


class Pretrain(Task):
    name = "pretrain"
    description = __doc__
    builds_model = True
    defaults = dict(
        preset="demo",
        data_path="out/data/pretrain.bin",
        val_data_path="out/data/pretrain_val.bin",
        out_dir="out/pretrain",
        dropout=0.0,
        learning_rate=1e-3,
        warmup_iters=100,
        save_interval=500,
        eval_interval=500,
        sample_prompt=["本报北京1月1日讯"],  # how a People's Daily article opens
    )

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--init_from", help="continue pretraining this model instead of a new one: a ckpt.pt, "
                            "its run dir or an HF model directory (ours or any LlamaForCausalLM or "
                            "MixtralForCausalLM)")

    def tokenizer(self, args: argparse.Namespace) -> tuple[Any, str]:
        """--tokenizer_path; by default the --init_from model's own tokenizer, or out/tokenizer for a new model."""
        if args.init_from is None:
            return super().tokenizer(args)
        path = tokenizer_dir_for(args.init_from, args.tokenizer_path)
        return load_tokenizer(path), path

    def initial_model(self, args: argparse.Namespace, tokenizer: Any) -> SourcedModel:
        """A randomly initialized model whose vocabulary is the tokenizer's, or the --init_from model."""
        if args.init_from is not None:
            start = initial_model(args.init_from, tokenizer, args.dropout)
            config = start.model.config
            unused = [f"{k} {getattr(args, k)}" for k in SHAPE_FLAGS if getattr(args, k) != getattr(config, k)]
            note = f" (its own shape: {', '.join(unused)} from the flags or --preset do not apply)" if unused else ""
            return start._replace(source=start.source + note)
        config = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                             vocab_size=len(tokenizer), max_seq_len=args.max_seq_len, dropout=args.dropout,
                             num_local_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok)
        return SourcedModel(Transformer(config), "a new model", None)

    def dataset(self, path: str, tokenizer: Any, args: argparse.Namespace) -> PretrainDataset:
        return PretrainDataset(path, tokenizer, max_length=args.max_seq_len)


def main(argv: list[str] | None = None) -> None:
    trainer.main(Pretrain(), argv)


if __name__ == "__main__":
    main()
