"""bench/*.py at toy sizes: each script runs to the end and prints its ratio table (timings are not checked,
only that the benchmarks anyone can run still run and report every row)."""
from __future__ import annotations

import json
import re

import data_process
from train_helpers import make_pretrain_data, run_script


def run_bench(script: str, *args: str) -> str:
    proc = run_script(f"bench/{script}", list(args), timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_bench_model_prints_every_variant_and_row():
    out = run_bench("bench_model.py", "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1",
                    "--vocab-size", "64", "--batch-size", "1", "--seq-len", "16", "--rounds", "2",
                    "--new-tokens", "8", "--decode-rounds", "1", "--decode-batches", "1,2", "--dtypes", "fp32,bf16",
                    "--devices", "cpu", "--threads", "1")
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith(("| train", "| decode"))]
    assert [(r[0].split(" (")[0], r[2], r[3]) for r in rows] == [
        ("train tok/s", "fp32", "1x16"), ("train peak MiB", "fp32", "1x16"),
        ("train tok/s", "bf16", "1x16"), ("train peak MiB", "bf16", "1x16"),
        ("decode tok/s", "fp32", "1x(32+8)"), ("decode tok/s", "fp32", "2x(32+8)"),
        ("decode tok/s", "bf16", "1x(32+8)"), ("decode tok/s", "bf16", "2x(32+8)"),
    ]
    for r in rows:
        assert all(re.fullmatch(r"[\d,.]+( \(\d+%\))?", v) for v in r[4:7]), r  # eager, compiled, HF values
        if r[0] == "train tok/s" or r[0].startswith("decode"):
            # ratios with the middle half of the rounds' own, compile s
            assert all(re.fullmatch(r"\d+\.\d+x \(\d+\.\d+-\d+\.\d+\)", v) for v in r[7:9]) and float(r[10]) > 0, r
    assert not any("tokens differ" in r[0] for r in rows if r[2] == "fp32")  # all variants decoded alike
    assert "machine: " in out and re.search(r"read bandwidth [\d.]+ GB/s", out)


def test_bench_train_prints_every_table():
    out = run_bench("bench_train.py", "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1",
                    "--vocab-size", "64", "--seq", "16", "--batch-size", "2", "--rounds", "1", "--threads", "2")
    for name in ("cpu float32", "cpu bfloat16 autocast", "full padding", "collate_trimmed", "1 thread(s)"):
        assert name in out, name
    assert "machine: " in out


def test_bench_data_prints_ratios_and_memory(tmp_path, tiny_texts, tiny_tokenizer_dir):
    jsonl = tmp_path / "pretrain.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in tiny_texts),
                     encoding="utf-8")
    data_process.pretokenize(str(jsonl), tiny_tokenizer_dir, num_workers=1)
    out = run_bench("bench_data.py", "--data", str(jsonl), "--bin", str(tmp_path / "pretrain.bin"), "--tokenizer",
                    tiny_tokenizer_dir, "--max_length", "64", "--rounds", "1", "--seed_samples", "20",
                    "--ours_samples", "20", "--corpus_sizes", "1,4")
    assert re.search(r"^ratio\s+[\d,.]+x\s+[\d,.]+x$", out, re.M), out
    assert [line.split()[0] for line in out.splitlines() if re.match(r"\s*\d+x\s", line)] == ["1x", "4x"]


def test_bench_speedrun_prints_every_variant(tmp_path, tiny_tokenizer_dir):
    train_bin, val_bin = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=100, n_val=20)
    out = run_bench("bench_speedrun.py", "--data_path", train_bin, "--val_data_path", val_bin, "--steps", "4",
                    "--eval_every", "2", "--eval_samples", "16", "--seeds", "0", "1", "--plot", str(tmp_path / "s.png"))
    rows = [line.split()[0] for line in out.splitlines()[-6:-1]]
    assert rows == ["variant", "hf", "adamw", "muon", "muon_wsd"], out
    assert "machine: " in out and (tmp_path / "s.png").stat().st_size > 0


def test_bench_generate_prints_inside_and_past_the_window():
    out = run_bench("bench_generate.py", "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1",
                    "--vocab-size", "64", "--max-seq-len", "48", "--new-tokens", "8", "--rounds", "1", "--threads", "1")
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith(("| eager", "| compiled step"))]
    assert [r[0] for r in rows] == ["eager", "compiled step"]
    for r in rows:
        assert all(re.fullmatch(r"[\d,]+", v) for v in (r[1], r[2], r[4])) and r[3].endswith("x"), r
    assert "machine: " in out
