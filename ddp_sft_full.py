"""Supervised fine-tuning of a pretrained model on chat conversations, of every weight or (--lora_r) of LoRA
adapters; the loss covers assistant replies only (SFTDataset's loss mask).

    python ddp_sft_full.py                                  # from out/pretrain, data out/data/sft_train.jsonl
    python ddp_sft_full.py --init_from out/pretrain/hf      # or any LlamaForCausalLM directory, with its tokenizer
    python ddp_sft_full.py --lora_r 8 --learning_rate 2e-3  # LoRA: adapters only (lora.py)
    torchrun --nproc_per_node=8 ddp_sft_full.py --batch_size 32

The tokenizer is the --init_from model's own unless --tokenizer_path says otherwise; when it lacks our chat
format (a base model's without a chat template, or ours from before tools and thinking), our template is
added with the special tokens it lacks and the embeddings grow to hold them, said in the log's model line
(chat_tokens.with_chat_template, sources.initial_model). The loop and checkpoint format live in
trainer.py, the flags in train_flags.py; this script picks the data, the tokenizer and the initial model.
"""

import argparse
from pathlib import Path
from typing import Any

from support.loading import lora
import trainer
from dataset import SFTDataset, chat_prompt_ids
from support.loading.sources import SourcedModel, initial_model, load_tokenizer, tokenizer_dir_for, with_chat_template
from support.training.train_task import Task


class SFT(Task):
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
        muon_learning_rate=4e-3,  # --optimizer muon: a fifth of pretraining's 0.02, as for AdamW
        warmup_iters=20,
        save_interval=200,
        eval_interval=200,
        sample_prompt=["你好,请介绍一下你自己。"],
        **lora.DEFAULTS,
    )

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--init_from", help="pretraining ckpt.pt, its run dir, an HF model directory (ours or any "
                            f"LlamaForCausalLM or MixtralForCausalLM) (default: {self.defaults['init_from']})")
        lora.add_flags(parser)

    def tokenizer(self, args: argparse.Namespace) -> tuple[Any, str]:
        """The --init_from model's tokenizer (or --tokenizer_path), with a chat template: ours, with its tokens,
        if it has none or ours from before tools and thinking."""
        path = tokenizer_dir_for(args.init_from, args.tokenizer_path)
        return with_chat_template(load_tokenizer(path)), path

    def initial_model(self, args: argparse.Namespace, tokenizer: Any) -> SourcedModel:
        """The --init_from model with --dropout applied if given, and with LoRA adapters if --lora_r is."""
        start = initial_model(args.init_from, tokenizer, args.dropout)
        if not args.lora_r:
            if args.load_in_4bit:
                raise ValueError("--load_in_4bit quantizes the frozen weights of LoRA training: add --lora_r")
            return start
        return start._replace(model=lora.attach(start.model, lora.spec_from_args(args, args.init_from)))

    def model_weights(self, model: Any) -> dict[str, Any]:
        return lora.adapter_weights(model) if lora.has_adapters(model) else super().model_weights(model)

    def rebuild_state(self, model: Any) -> dict[str, Any]:
        return {"lora": model.lora_spec} if lora.has_adapters(model) else super().rebuild_state(model)

    def export(self, model: Any, out_dir: Path, tokenizer: Any) -> Path:
        return lora.export(model, out_dir, tokenizer) if lora.has_adapters(model) else super().export(
            model, out_dir, tokenizer)

    def prompt_ids(self, tokenizer: Any, prompt: str) -> list[int]:
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])

    def dataset(self, path: str, tokenizer: Any, args: argparse.Namespace) -> SFTDataset:
        return SFTDataset(path, tokenizer, max_length=args.max_seq_len)


def main(argv: list[str] | None = None) -> None:
    trainer.main(SFT(), argv)


if __name__ == "__main__":
    main()
