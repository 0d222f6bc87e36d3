"""Train the byte-level BPE tokenizer and save it so AutoTokenizer.from_pretrained(save_dir) loads it.

    python train_tokenizer.py    # out/data/pretrain.jsonl + sft_train.jsonl + tools_sft_train.jsonl -> out/tokenizer
    python train_tokenizer.py --data_path a.jsonl b.jsonl --save_dir out/tokenizer --vocab_size 6144

The corpus is streamed line by line into the trainer, so RAM does not grow with the corpus size.
Each JSONL line is either {"text": ...} (pretraining) or an SFT conversation in any shape dataset.py reads
(ShareGPT, BelleGroup, Alpaca, OpenAI messages with tool calls, xLAM, bare lists); both are read, so the
chat words of the SFT data (reasoning, tool calls and tool results too) get merges. Held-out files (sft_val /
sft_test / pretrain_val) are not in the defaults on purpose: a tokenizer fitted on them would leak into
evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from dataset import JsonlRecords, conversation_texts
from support.data.tokenizer_spec import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, UNK

# the tool-use conversations too, so the JSON of tool definitions and calls gets merges: a tool conversation of
# the arithmetic task is ~175 tokens with them and ~365 without (a small model's context is 128-256)
DEFAULT_DATA = ["out/data/pretrain.jsonl", "out/data/sft_train.jsonl", "out/data/tools_sft_train.jsonl"]


def iter_jsonl_texts(paths: list[str], skip_bad: bool = False) -> Iterator[str]:
    """Yield the text of {"text"} records and the free text of SFT records (contents, reasoning, tool-call
    arguments and tool definitions: dataset.conversation_texts), one line at a time, with a byte-based
    progress bar."""
    total = sum(os.path.getsize(p) for p in paths)
    # disable=None: a bar on a terminal only, never carriage returns in a log file
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizer corpus", disable=None) as bar:
        done = 0  # bytes of the files already read
        for path in paths:
            for offset, length, record in JsonlRecords(path, None, skip_bad):
                bar.update(done + offset + length - bar.n)
                if "text" in record:
                    yield record["text"]
                else:
                    yield from conversation_texts(record)
            done += os.path.getsize(path)
            bar.update(done - bar.n)  # skipped and blank lines at the end


def build_tokenizer(texts: Iterable[str], vocab_size: int = 6144) -> Tokenizer:
    """Train a byte-level BPE (ByteLevel pre-tokenizer and decoder) on `texts`. No normalizer: text is tokenized
    as written, as llama.cpp tokenizes it (it applies none), so an exported model splits text there as here."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} < 256 byte tokens + {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no <unk> in practice
        # the merge phase after our input bar reaches 100% takes as long again; its bars, like ours, only on a terminal
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} got id {tok.token_to_id(name)}, expected {i}"
    return tok


def save_tokenizer(tok: Tokenizer, save_dir: str) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into save_dir."""
    os.makedirs(save_dir, exist_ok=True)
    tok.save(os.path.join(save_dir, "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    added = {
        str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # keep decode(encode(s)) == s for whitespace runs
        "model_max_length": 1_000_000_000,
        "chat_template": CHAT_TEMPLATE,
        **special,
    }
    with open(os.path.join(save_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    with open(os.path.join(save_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, ensure_ascii=False, indent=2)


def train_tokenizer(data_paths: list[str], save_dir: str, vocab_size: int = 6144,
                    skip_bad: bool = False) -> Tokenizer:
    """Stream the JSONL files into the BPE trainer and save the result to save_dir."""
    missing = [p for p in data_paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"missing corpus file(s): {missing} (build them with: python data_process.py; "
                                "python data_process.py tools)")
    tok = build_tokenizer(iter_jsonl_texts(data_paths, skip_bad), vocab_size)
    save_tokenizer(tok, save_dir)
    return tok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", nargs="+", default=DEFAULT_DATA, help="one or more JSONL files")
    p.add_argument("--save_dir", default="out/tokenizer")
    p.add_argument("--vocab_size", type=int, default=6144)
    p.add_argument("--skip_bad", action="store_true", help="skip malformed lines (counted) instead of failing")
    args = p.parse_args(argv)
    try:
        tok = train_tokenizer(args.data_path, args.save_dir, args.vocab_size, args.skip_bad)
    except (FileNotFoundError, ValueError) as e:  # bad input: the message names the file and line
        sys.exit(f"error: {e}")
    size = tqdm.format_sizeof(sum(os.path.getsize(p) for p in args.data_path), "B")
    print(f"saved {tok.get_vocab_size()}-token tokenizer to {args.save_dir} "
          f"(trained on {size} of JSONL in {len(args.data_path)} file(s))")


if __name__ == "__main__":
    main()
