"""Pretrain a LLaMA2-style model from scratch on a pretokenized corpus (data_process.py pretokenize).

    python ddp_pretrain.py                                  # one process, the demo preset, out/ layout
    torchrun --nproc_per_node=8 ddp_pretrain.py --preset 215M   # DDP on 8 GPUs
    python ddp_pretrain.py --resume                         # continue out/pretrain/ckpt.pt exactly

The loop, flags and checkpoint format live in trainer.py; this script picks the data and a new model.
"""

import argparse

import trainer
from dataset import PretrainDataset
from k_model import ModelConfig, Transformer

DEFAULTS = dict(
    data_path="out/data/pretrain.bin",
    val_data_path="out/data/pretrain_val.bin",
    out_dir="out/pretrain",
    learning_rate=1e-3,
    warmup_iters=100,
    save_interval=500,
    eval_interval=500,
)


def new_model(args: argparse.Namespace, tokenizer) -> trainer.InitModel:
    """A randomly initialized model whose vocabulary is the tokenizer's."""
    config = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                         vocab_size=len(tokenizer), max_seq_len=args.max_seq_len, dropout=args.dropout)
    return trainer.InitModel(Transformer(config), "a new model", None)


TASK = trainer.Task(name="pretrain", dataset_cls=PretrainDataset, init_model=new_model)


def main(argv: list[str] | None = None) -> None:
    parser = trainer.build_parser(__doc__, DEFAULTS, model_flags=True)
    trainer.main(TASK, parser, argv)


if __name__ == "__main__":
    main()
