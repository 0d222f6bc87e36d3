"""Supervised fine-tuning (all weights) of a pretrained model on ChatML conversations; the loss covers
assistant replies only (SFTDataset's loss mask).

    python ddp_sft_full.py                                  # from out/pretrain, data out/data/sft_train.jsonl
    python ddp_sft_full.py --init_from out/pretrain/hf      # or any HF export of this architecture
    torchrun --nproc_per_node=8 ddp_sft_full.py --batch_size 32

The loop, flags and checkpoint format live in trainer.py; this script picks the data and the initial model.
"""

import argparse

import trainer
from checkpoint import config_to_dict, load_model
from dataset import SFTDataset
from k_model import ModelConfig, Transformer

DEFAULTS = dict(
    data_path="out/data/sft_train.jsonl",
    val_data_path="out/data/sft_val.jsonl",
    out_dir="out/sft",
    batch_size=16,
    accumulation_steps=1,
    learning_rate=2e-4,  # well below pretraining's: adapt the pretrained weights, do not overwrite them
    warmup_iters=20,
    save_interval=200,
    eval_interval=200,
)


def pretrained_model(args: argparse.Namespace, tokenizer) -> trainer.InitModel:
    """The --init_from model (checkpoint, run dir or HF export), with --dropout applied if given."""
    model, info = load_model(args.init_from)
    if args.dropout is not None and args.dropout != model.config.dropout:
        # dropout probabilities are fixed when modules are built: rebuild, then copy the weights
        config = ModelConfig(**{**config_to_dict(model.config), "dropout": args.dropout})
        rebuilt = Transformer(config)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    return trainer.InitModel(model.train(), info["source"], info["tokenizer_fingerprint"])


TASK = trainer.Task(name="sft", dataset_cls=SFTDataset, init_model=pretrained_model)


def main(argv: list[str] | None = None) -> None:
    parser = trainer.build_parser(__doc__, DEFAULTS, model_flags=False)
    parser.add_argument("--init_from", default="out/pretrain",
                        help="pretraining ckpt.pt, its run dir, or an HF export dir (config.json + model.safetensors)")
    trainer.main(TASK, parser, argv)


if __name__ == "__main__":
    main()
