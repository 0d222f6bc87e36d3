"""DDP: torchrun with 2 gloo processes on CPU trains exactly like 1 process reading the same global batch
(same weights within 1e-5), for packed pretraining and for SFT, whose micro-batches hold different
numbers of answer tokens (so the loss must be normalized over the global batch, not per micro-batch)."""
from __future__ import annotations

import pytest
import torch

import ddp_pretrain
import ddp_sft_full
from train_helpers import QUIET, TINY_MODEL, make_pretrain_data, make_sft_data, read_metrics, run_script, run_torchrun

STEPS = ["--max_steps", "6", "--learning_rate", "1e-3", "--warmup_iters", "2", "--log_interval", "1",
         "--eval_interval", "3", "--save_interval", "100"]


def assert_same_training(single, multi) -> None:
    a, b = torch.load(single / "ckpt.pt", weights_only=True), torch.load(multi / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and b["world_size"] == 2
    assert a["data_position"] == b["data_position"]
    for key, weight in a["model"].items():
        torch.testing.assert_close(b["model"][key], weight, atol=1e-5, rtol=0, msg=key)
    for metric in ("loss", "val_loss"):
        ref, got = read_metrics(single, metric), read_metrics(multi, metric)
        assert [s for s, _ in got] == [s for s, _ in ref]
        assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=1e-5)


def test_ddp_pretraining_matches_one_process(tmp_path, tiny_tokenizer_dir):
    train_bin, val_bin = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=200, n_val=20)
    common = ["--data_path", train_bin, "--val_data_path", val_bin, "--tokenizer_path", tiny_tokenizer_dir,
              *TINY_MODEL, *QUIET, *STEPS]
    # global batch 8: 2 processes x 2 samples x 2 accumulation steps, or 1 process x 8 samples
    # torchrun itself here (the other multi-process tests give each rank torchrun's environment: run_script)
    ddp = run_torchrun("ddp_pretrain.py", common + ["--out_dir", str(tmp_path / "ddp"), "--batch_size", "2",
                                                    "--accumulation_steps", "2"], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "=== pretrain: 2 process(es) on cpu" in ddp.stdout
    ddp_pretrain.main(common + ["--out_dir", str(tmp_path / "one"), "--batch_size", "8"])
    assert_same_training(tmp_path / "one", tmp_path / "ddp")


def test_ddp_sft_matches_one_process(tmp_path, tiny_tokenizer_dir):
    train_bin, _ = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=100, n_val=10)
    sft_train, sft_val = make_sft_data(tmp_path)
    ddp_pretrain.main(["--data_path", train_bin, "--val_data_path", "", "--tokenizer_path", tiny_tokenizer_dir,
                       "--out_dir", str(tmp_path / "init"), *TINY_MODEL, *QUIET, "--batch_size", "8",
                       "--max_steps", "2", "--log_interval", "1"])
    common = ["--data_path", sft_train, "--val_data_path", sft_val, "--tokenizer_path", tiny_tokenizer_dir,
              "--init_from", str(tmp_path / "init"), *QUIET, *STEPS, "--max_seq_len", "32"]
    ddp = run_script("ddp_sft_full.py", common + ["--out_dir", str(tmp_path / "ddp"), "--batch_size", "2",
                                                  "--accumulation_steps", "2"], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ddp_sft_full.main(common + ["--out_dir", str(tmp_path / "one"), "--batch_size", "8", "--accumulation_steps", "1"])
    assert_same_training(tmp_path / "one", tmp_path / "ddp")
