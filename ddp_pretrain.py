"""Pretrain a LLaMA2-style model from scratch on a pretokenized corpus (data_process.py pretokenize).

    python ddp_pretrain.py                                  # one process, the demo preset, out/ layout
    torchrun --nproc_per_node=8 ddp_pretrain.py --preset 215M   # DDP on 8 GPUs
    python ddp_pretrain.py --resume                         # continue out/pretrain/ckpt.pt exactly

The loop, flags and checkpoint format live in trainer.py; this script picks the data and a new model.
"""

import argparse
from typing import Any

import trainer
from dataset import PretrainDataset
from k_model import ModelConfig, Transformer
from loading import SourcedModel


class Pretrain(trainer.Task):
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

    def initial_model(self, args: argparse.Namespace, tokenizer: Any) -> SourcedModel:
        """A randomly initialized model whose vocabulary is the tokenizer's."""
        config = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                             vocab_size=len(tokenizer), max_seq_len=args.max_seq_len, dropout=args.dropout)
        return SourcedModel(Transformer(config), "a new model", None)

    def dataset(self, path: str, tokenizer: Any, args: argparse.Namespace) -> PretrainDataset:
        return PretrainDataset(path, tokenizer, max_length=args.max_seq_len)


def main(argv: list[str] | None = None) -> None:
    trainer.main(Pretrain(), argv)


if __name__ == "__main__":
    main()
