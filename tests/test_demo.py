"""demo.sh at CI scale (--tiny): every stage runs by its own script, in order, from a clean directory; each
leaves the artifacts the next one reads, both trainings lower their loss, and the printed samples and
scores come from the trained models."""
from __future__ import annotations

import json
import math
import subprocess

import pytest

from support.loading.checkpoint import load_checkpoint
from support.inference.text_generator import TextGenerator
from train_helpers import ROOT, read_metrics

STAGES = ["data", "tools_data", "eval_tasks", "tokenizer", "pretokenize", "pretrain", "sft", "samples", "chat", "eval",
          "lm-eval", "curves"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The tiny demo run once in an empty directory (its artifacts go to ./out)."""
    cwd = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(["bash", str(ROOT / "demo.sh"), "--tiny"], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cwd / "out", proc.stdout


def test_every_stage_runs_its_own_script_in_order(demo):
    _, log = demo
    started = [line.split(":")[0].removeprefix(">>> ") for line in log.splitlines()
               if line.startswith(">>> ") and ": python " in line]
    assert started == STAGES
    for script in ("data_process.py embedded", "data_process.py tools", "train_tokenizer.py", "data_process.py pretokenize",
                   "ddp_pretrain.py --overwrite", "ddp_sft_full.py --overwrite", "model_sample.py --mode pretrain",
                   "model_sample.py --eval", "plot_runs.py out/pretrain out/sft"):
        assert f": python {script}" in log
    timings = log[log.index(">>> wall time per stage"):].splitlines()[1:]
    assert [line.split()[0] for line in timings] == STAGES + ["total"]


def test_artifacts_of_every_stage(demo):
    out, _ = demo
    for name in ("data/pretrain.jsonl", "data/pretrain.bin", "data/pretrain.json", "data/pretrain_val.bin",
                 "data/sft_train.jsonl", "data/sft_val.jsonl", "data/sft_test.jsonl", "tokenizer/tokenizer.json",
                 "data/tools_sft_train.jsonl", "data/tools_test.jsonl", "eval.json", "curves.png",
                 "data/eval/sentiment.jsonl", "report.md"):
        assert (out / name).is_file(), name
    for run in ("pretrain", "sft"):
        for name in ("ckpt.pt", "train.log", "metrics.jsonl", "curves.png", "hf/config.json", "hf/model.safetensors",
                     "hf/tokenizer.json"):
            assert (out / run / name).is_file(), f"{run}/{name}"
    # SFT started from the pretrained model, with the tokenizer the data was pretokenized with
    sft = load_checkpoint(out / "sft")
    assert sft["args"]["init_from"] == "out/pretrain"
    sidecar = json.loads((out / "data/pretrain.json").read_text(encoding="utf-8"))
    assert sft["tokenizer_fingerprint"] == load_checkpoint(out / "pretrain")["tokenizer_fingerprint"] \
        == sidecar["tokenizer_fingerprint"]


def test_both_trainings_lowered_the_loss(demo):
    out, _ = demo
    pre, sft = read_metrics(out / "pretrain"), read_metrics(out / "sft")
    assert len(pre) >= 3 and len(sft) >= 3
    vocab = json.loads((out / "data/pretrain.json").read_text(encoding="utf-8"))["vocab_size"]
    # each logged loss is the mean since the previous line; the first already covers the fastest drop
    assert pre[-1][1] < min(pre[0][1], math.log(vocab)) - 0.5, pre
    assert sft[-1][1] < sft[0][1] - 0.5, sft
    assert read_metrics(out / "pretrain", "val_loss") and read_metrics(out / "sft", "val_loss")


def test_printed_samples_and_scores(demo):
    out, log = demo
    scores = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    ppl = scores["val_perplexity"]["perplexity"]
    vocab = json.loads((out / "data/pretrain.json").read_text(encoding="utf-8"))["vocab_size"]
    assert 1 < ppl < vocab / 2  # far better than a uniform guess over the vocabulary
    assert f"val perplexity: {ppl:.2f}" in log
    sentiment = scores["sentiment"]
    assert sentiment["total"] == 200 and 0 <= sentiment["correct"] <= 200
    assert f"sentiment accuracy: {sentiment['accuracy']:.1%}" in log
    assert "--- sample 1: 中国" in log and "--- sample 2: 今天" in log

    # the chat stage's greedy answers are the SFT model's own
    gen = TextGenerator(out / "sft", str(out / "tokenizer"), device="cpu")
    answer = gen.sft_sample("你好", max_new_tokens=24, temperature=0)
    assert f"user> 你好\nassistant> {answer}\n" in log
    assert math.isfinite(ppl)
