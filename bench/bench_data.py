"""Pretraining data loading: the seed's way vs. PretrainDataset over the pretokenized memmap.

    python data_process.py && python train_tokenizer.py && python data_process.py pretokenize
    python bench/bench_data.py [--rounds 5] [--max_length 512]

seed : readlines() the JSONL into RAM; __getitem__ parses one line, tokenizes "<bos>"+text and pads it
       to max_length (as the seed's PretrainDataset does); useful tokens = non-padding targets.
ours : PretrainDataset(.bin): a packed window sliced from the memory map; every target is useful.
Rounds interleave the two (seed, ours, seed, ours, ...) over the same fixed random indices; the table
shows medians. Peak RSS is measured in a fresh subprocess per (variant, corpus size 1x/4x/16x).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset import PretrainDataset, read_sidecar, sidecar_path  # noqa: E402


class SeedStyleDataset(torch.utils.data.Dataset):
    """The seed's approach, re-implemented for measurement: whole file in RAM, tokenize + pad per item."""

    def __init__(self, data_path: str, tokenizer, max_length: int = 512):
        with open(data_path, encoding="utf-8") as f:
            self.lines = f.readlines()
        self.tokenizer, self.max_length = tokenizer, max_length

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int):
        text = self.tokenizer.bos_token + json.loads(self.lines[i])["text"]
        ids = self.tokenizer(text, max_length=self.max_length, padding="max_length", truncation=True,
                             add_special_tokens=False)["input_ids"]
        ids = torch.tensor(ids, dtype=torch.int64)
        mask = (ids != self.tokenizer.pad_token_id).to(torch.float32)
        return ids[:-1], ids[1:], mask[1:]


def make_dataset(variant: str, path: str, tokenizer_dir: str, max_length: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if variant == "seed":
        return SeedStyleDataset(path, tok, max_length)
    return PretrainDataset(path, tok, max_length)


def reader(ds, indices: np.ndarray):
    """A callable that reads ds[i] for each index (the timed unit of work); samples are dropped at once,
    as a training loop would, instead of piling up for the garbage collector."""
    positions = [int(i) for i in indices]

    def read() -> None:
        for i in positions:
            ds[i]

    return read


def useful_tokens(ds, indices: np.ndarray) -> float:
    """Targets that are trained on (loss_mask 1) over the given samples."""
    return sum(float(ds[int(i)][2].sum()) for i in indices)


def scaled_copies(jsonl: str, bin_path: str, factor: int, tmp: str) -> tuple[str, str]:
    """The corpus repeated `factor` times, as JSONL and as .bin + sidecar."""
    if factor == 1:
        return jsonl, bin_path
    big_jsonl, big_bin = os.path.join(tmp, f"x{factor}.jsonl"), os.path.join(tmp, f"x{factor}.bin")
    with open(jsonl, "rb") as f:
        data = f.read()
    with open(big_jsonl, "wb") as f:
        for _ in range(factor):
            f.write(data)
    meta = read_sidecar(bin_path)
    tokens = np.fromfile(bin_path, dtype=meta["dtype"])
    np.tile(tokens, factor).tofile(big_bin)
    with open(sidecar_path(big_bin), "w") as f:
        json.dump({**meta, "num_tokens": len(tokens) * factor, "num_documents": meta["num_documents"] * factor}, f)
    return big_jsonl, big_bin


def memory_mb(variant: str, path: str, tokenizer_dir: str, max_length: int) -> tuple[float, float]:
    """(peak RSS, anonymous RSS at the end) in MB of a fresh process that builds the dataset and reads
    2000 random samples (Linux). Peak RSS also counts page-cache pages of the memory map, which the kernel
    can drop; anonymous memory is what the process really holds."""
    out = subprocess.run([sys.executable, __file__, "--_rss", variant, path, "--tokenizer", tokenizer_dir,
                          "--max_length", str(max_length)], capture_output=True, text=True, check=True)
    peak, anon = out.stdout.split()[-2:]
    return float(peak), float(anon)


def _rss_child(variant: str, path: str, tokenizer_dir: str, max_length: int) -> None:
    ds = make_dataset(variant, path, tokenizer_dir, max_length)
    for i in np.random.default_rng(0).integers(0, len(ds), 2000):
        ds[int(i)]
    # /proc/self/status, not getrusage: ru_maxrss survives exec, so it would report the parent's size.
    status = {}
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            status = dict(ln.split(":", 1) for ln in f)
    peak, anon = (int(status[k].split()[0]) / 1024 if k in status else float("nan") for k in ("VmHWM", "RssAnon"))
    print(peak, anon)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="out/data/pretrain.jsonl")
    p.add_argument("--bin", default="out/data/pretrain.bin")
    p.add_argument("--tokenizer", default="out/tokenizer")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed_samples", type=int, default=1000, help="samples per round, seed's way")
    p.add_argument("--ours_samples", type=int, default=20000, help="samples per round, ours")
    p.add_argument("--corpus_sizes", default="1,4,16", help="memory rows: the corpus repeated this many times")
    p.add_argument("--_rss", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._rss:
        return _rss_child(*args._rss, args.tokenizer, args.max_length)
    # Imported here, not at the top, so the RSS subprocesses do not carry the model code in their baseline.
    from common import interleaved, machine_line

    for path in (args.data, args.bin, args.tokenizer):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing; build it first:\n  python data_process.py && python train_tokenizer.py"
                     " && python data_process.py pretokenize")

    torch.set_num_threads(1)
    print("machine:", machine_line("cpu"))
    seed = make_dataset("seed", args.data, args.tokenizer, args.max_length)
    ours = make_dataset("ours", args.bin, args.tokenizer, args.max_length)
    rng = np.random.default_rng(1234)
    indices = {"seed": rng.integers(0, len(seed), args.seed_samples),
               "ours": rng.integers(0, len(ours), args.ours_samples)}
    datasets = {"seed": seed, "ours": ours}
    times = interleaved({name: reader(datasets[name], idx) for name, idx in indices.items()},
                        args.rounds, warmup=1, device="cpu")
    med = {}  # name -> (samples/s, useful tokens/s) from the median round time
    for name, idx in indices.items():
        t = statistics.median(times[name])
        med[name] = (len(idx) / t, useful_tokens(datasets[name], idx) / t)
    print(f"\nmax_length {args.max_length}, {args.rounds} interleaved rounds, medians; "
          f"seed corpus {len(seed):,} lines, ours {len(ours):,} windows")
    print(f"{'variant':<8}{'samples/s':>12}{'useful tok/s':>15}{'useful/sample':>15}")
    for name, (sps, tps) in med.items():
        print(f"{name:<8}{sps:>12,.0f}{tps:>15,.0f}{tps / sps:>15,.1f}")
    print(f"{'ratio':<8}{med['ours'][0] / med['seed'][0]:>11,.1f}x{med['ours'][1] / med['seed'][1]:>14,.1f}x")

    print("\nmemory (MB) of a process that builds the dataset and reads 2000 random samples")
    print(f"{'corpus':<8}{'seed peak':>11}{'seed anon':>11}{'ours peak':>11}{'ours anon':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (int(f) for f in args.corpus_sizes.split(",")):
            jsonl, bin_path = scaled_copies(args.data, args.bin, factor, tmp)
            mem = memory_mb("seed", jsonl, args.tokenizer, args.max_length) + \
                memory_mb("ours", bin_path, args.tokenizer, args.max_length)
            print(f"{factor:>2}x{'':<5}" + "".join(f"{m:>11,.0f}" for m in mem))


if __name__ == "__main__":
    main()
