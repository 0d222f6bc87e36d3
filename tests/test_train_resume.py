"""Exact resume: a run stopped by Ctrl-C (SIGINT), resumed, killed by SIGKILL after its next checkpoint,
and resumed again to the end has, on CPU float32, exactly the loss sequence, validation losses and final
weights of the same run left alone. Dropout is on, so the dropout masks must be reproduced as well."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

import ddp_pretrain
from support.training.optim import is_hidden_matrix
from train_helpers import QUIET, TINY_MODEL, Started, make_pretrain_data, read_metrics, start_script

TOTAL = 40


def last_logged_step(out_dir: Path) -> int:
    try:
        lines = (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return max((json.loads(line)["step"] for line in lines), default=0)
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-rewrite
        return 0


def saved_step(out_dir: Path) -> int:
    try:
        return torch.load(out_dir / "ckpt.pt", weights_only=True)["step"]
    except FileNotFoundError:
        return 0


def start(args: list[str], log: Path) -> Started:
    return start_script("ddp_pretrain.py", args, log)


def wait_for(condition, proc: Started, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"trainer exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for the trainer:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)


def test_interrupted_runs_resume_exactly(tmp_path, tiny_tokenizer_dir):
    train_bin, val_bin = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=300, n_val=20)
    args = ["--data_path", train_bin, "--val_data_path", val_bin, "--tokenizer_path", tiny_tokenizer_dir,
            *TINY_MODEL, *QUIET, "--dropout", "0.1", "--batch_size", "8", "--accumulation_steps", "2",
            "--max_steps", str(TOTAL), "--learning_rate", "3e-3", "--warmup_iters", "5",
            "--log_interval", "1", "--eval_interval", "10", "--save_interval", "5", "--sample_tokens", "12"]
    ref, run = tmp_path / "reference", tmp_path / "interrupted"
    ddp_pretrain.main(args + ["--out_dir", str(ref)])

    # Ctrl-C mid-run: a checkpoint of the current step, exit status 128 + SIGINT
    proc = start(args + ["--out_dir", str(run)], tmp_path / "run1.log")
    wait_for(lambda: last_logged_step(run) >= 7, proc, tmp_path / "run1.log")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    stopped = saved_step(run)
    assert 7 <= stopped < TOTAL

    # resumed, then SIGKILL (no chance to save) once it saved again and trained past that checkpoint
    proc = start(args + ["--out_dir", str(run), "--resume"], tmp_path / "run2.log")
    wait_for(lambda: saved_step(run) > stopped and last_logged_step(run) > saved_step(run), proc, tmp_path / "run2.log")
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert stopped < saved_step(run) < TOTAL and not (run / "hf").exists()

    # resumed to the end
    ddp_pretrain.main(args + ["--out_dir", str(run), "--resume"])
    for metric in ("loss", "val_loss", "samples"):  # the greedy sample at each evaluation too
        assert read_metrics(run, metric) == read_metrics(ref, metric)
    assert len(read_metrics(ref, "samples")) == TOTAL // 10
    a, b = torch.load(ref / "ckpt.pt", weights_only=True), torch.load(run / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == TOTAL
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    adam_a, adam_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(x, y) for i in adam_a for x, y in zip(adam_a[i].values(), adam_b[i].values()))


def test_ctrl_c_with_dataloader_workers_saves_once(tmp_path, tiny_tokenizer_dir):
    """A terminal's Ctrl-C reaches the whole process group, DataLoader workers included: only the trainer
    announces and writes the checkpoint."""
    train_bin, _ = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=300, n_val=20)
    run = tmp_path / "run"
    args = ["--data_path", train_bin, "--val_data_path", "", "--tokenizer_path", tiny_tokenizer_dir, *TINY_MODEL,
            *QUIET, "--batch_size", "8", "--max_steps", "100000", "--log_interval", "1", "--save_interval", "100000",
            "--num_workers", "2", "--out_dir", str(run)]
    log = tmp_path / "run.log"
    proc = start_script("ddp_pretrain.py", args, log, new_session=True)
    wait_for(lambda: last_logged_step(run) >= 3, proc, log)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    output = log.read_text()
    assert output.count("SIGINT: saving a checkpoint after this step") == 1, output[-3000:]
    assert output.count("saved ") == 1 and saved_step(run) >= 3


def test_resume_takes_the_optimizer_settings_of_this_launch(tmp_path, tiny_tokenizer_dir):
    """--weight_decay given at --resume applies, as --learning_rate does; settings the code fixes (AdamW's betas,
    Muon's momentum) are the code's, whatever the checkpoint stored. Two runs resumed from one checkpoint, one
    with --weight_decay 0.5 instead of the saved 0.1, then take the same step but for the decoupled decay:
    w <- w (1 - lr wd) - lr u in AdamW and in Muon, so the decayed weights differ by exactly lr (0.5 - 0.1) w."""
    train_bin, _ = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=100, n_val=10)
    lrs = {"adamw": 0.01, "muon": 0.02}
    args = ["--data_path", train_bin, "--val_data_path", "", "--tokenizer_path", tiny_tokenizer_dir, *TINY_MODEL,
            *QUIET, "--optimizer", "muon", "--batch_size", "4", "--learning_rate", str(lrs["adamw"]),
            "--muon_learning_rate", str(lrs["muon"]), "--lr_schedule", "wsd", "--warmup_iters", "0",
            "--decay_fraction", "0", "--weight_decay", "0.1", "--sample_tokens", "0"]  # constant lr
    saved, other = tmp_path / "saved", tmp_path / "other"
    ddp_pretrain.main(args + ["--out_dir", str(saved), "--max_steps", "2"])
    other.mkdir()
    state = torch.load(saved / "ckpt.pt", weights_only=True)
    # as a checkpoint written by code with other settings would hold them
    state["optimizer"]["adamw"]["param_groups"][0]["betas"] = (0.5, 0.5)
    state["optimizer"]["muon"]["param_groups"][0]["momentum"] = 0.5
    torch.save(state, other / "ckpt.pt")
    resume = [*args[: args.index("--weight_decay")], "--resume", "--max_steps", "3"]
    ddp_pretrain.main(resume + ["--out_dir", str(saved)])
    ddp_pretrain.main(resume + ["--out_dir", str(other), "--weight_decay", "0.5"])

    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (saved, other))
    assert b["optimizer"]["adamw"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert b["optimizer"]["muon"]["param_groups"][0]["momentum"] == 0.95
    log = (other / "train.log").read_text(encoding="utf-8")
    assert "weight_decay=0.5 (command line)" in log and "AdamW weight_decay 0.1 -> 0.5" in log
    for name, w in state["model"].items():
        lr = lrs["muon" if is_hidden_matrix(name, w) else "adamw"]
        expected = -lr * (0.5 - 0.1) * w if w.dim() >= 2 else torch.zeros_like(w)  # gains are not decayed
        ulps = 4 * torch.finfo(torch.float32).eps * float(a["model"][name].abs().max())
        torch.testing.assert_close(b["model"][name] - a["model"][name], expected, rtol=0, atol=ulps, msg=name)
