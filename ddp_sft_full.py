"""Supervised fine-tuning (all weights) of a pretrained model on chat conversations; the loss covers
assistant replies only (SFTDataset's loss mask).

    python ddp_sft_full.py                                  # from out/pretrain, data out/data/sft_train.jsonl
    python ddp_sft_full.py --init_from out/pretrain/hf      # or any HF export of this architecture
    torchrun --nproc_per_node=8 ddp_sft_full.py --batch_size 32

The loop, flags and checkpoint format live in trainer.py; this script picks the data and the initial model.
"""

import argparse
from typing import Any

import trainer
from checkpoint import config_to_dict, load_model
from dataset import SFTDataset, encode_chat
from k_model import ModelConfig, Transformer
from loading import SourcedModel


class SFT(trainer.Task):
    name = "sft"
    description = __doc__
    may_lack_targets = True  # a prompt longer than --max_seq_len leaves no answer token
    defaults = dict(
        init_from="out/pretrain",
        data_path="out/data/sft_train.jsonl",
        val_data_path="out/data/sft_val.jsonl",
        out_dir="out/sft",
        batch_size=16,
        learning_rate=2e-4,  # well below pretraining's: adapt the pretrained weights, do not overwrite them
        warmup_iters=20,
        save_interval=200,
        eval_interval=200,
        sample_prompt=["你好,请介绍一下你自己。"],
    )

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--init_from", help="pretraining ckpt.pt, its run dir, or an HF export dir (config.json "
                            f"+ model.safetensors) (default: {self.defaults['init_from']})")

    def initial_model(self, args: argparse.Namespace, tokenizer: Any) -> SourcedModel:
        """The --init_from model (checkpoint, run dir or HF export), with --dropout applied if given."""
        model, info = load_model(args.init_from)
        if args.dropout is not None and args.dropout != model.config.dropout:
            # dropout probabilities are fixed when modules are built: rebuild, then copy the weights
            config = ModelConfig(**{**config_to_dict(model.config), "dropout": args.dropout})
            rebuilt = Transformer(config)
            rebuilt.load_state_dict(model.state_dict())
            model = rebuilt
        return SourcedModel(model.train(), info["source"], info["tokenizer_fingerprint"])

    def prompt_ids(self, tokenizer: Any, prompt: str) -> list[int]:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)[0]

    def dataset(self, path: str, tokenizer: Any, args: argparse.Namespace) -> SFTDataset:
        return SFTDataset(path, tokenizer, max_length=args.max_seq_len)


def main(argv: list[str] | None = None) -> None:
    trainer.main(SFT(), argv)


if __name__ == "__main__":
    main()
