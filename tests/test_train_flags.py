"""Where a training flag's value comes from, and the values a run refuses: --help keeps its examples, a
resumed run takes its flags from the checkpoint (and refuses conflicting shape flags), a resumed run under
--epochs reads exactly the rest of the data whatever its new batch size, and values that would train nothing
are refused with the flag's name."""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest

import ddp_pretrain
import ddp_sft_full
from support.training import train_flags
from support.loading.checkpoint import load_checkpoint
from dataset import PretrainDataset
from train_helpers import QUIET, ROOT, TINY_MODEL, make_pretrain_data, make_sft_data


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("flags_data")
    train_bin, val_bin = make_pretrain_data(root, tiny_tokenizer_dir, n_train=200, n_val=20)
    sft_train, sft_val = make_sft_data(root, n_train=64, n_val=16)
    return SimpleNamespace(root=root, tok=tiny_tokenizer_dir, train_bin=train_bin, val_bin=val_bin,
                           sft_train=sft_train, sft_val=sft_val)


def pretrain(data, out, *extra: str) -> None:
    ddp_pretrain.main(["--data_path", data.train_bin, "--val_data_path", data.val_bin, "--tokenizer_path", data.tok,
                       "--out_dir", str(out), *TINY_MODEL, *QUIET, "--log_interval", "1", "--eval_interval", "0",
                       *extra])


@pytest.mark.parametrize("script", ["ddp_pretrain.py", "ddp_sft_full.py"])
def test_help_keeps_the_usage_examples_and_shows_defaults(script, capsys):
    with pytest.raises(SystemExit) as done:
        importlib.import_module(script.removesuffix(".py")).main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    example = next(line for line in (ROOT / script).read_text().splitlines() if "--nproc_per_node=8" in line)
    assert example in out.splitlines()  # the docstring's example line, unwrapped
    flat = " ".join(out.split())
    assert "(default: out/tokenizer)" in flat
    if script == "ddp_pretrain.py":
        assert "--dim DIM from --preset (default: 128)" in flat  # the demo preset's


def test_flag_sources_in_order_of_precedence():
    task = ddp_pretrain.Pretrain()
    given = train_flags.build_parser(task).parse_args(["--batch_size", "3", "--preset", "tiny"])
    args, sources = train_flags.resolve_args(given, task, saved={"learning_rate": 0.5, "batch_size": 99, "device": "x"})
    assert (args.batch_size, sources["batch_size"]) == (3, "command line")
    assert (args.learning_rate, sources["learning_rate"]) == (0.5, "checkpoint")
    assert (args.dim, sources["dim"]) == (train_flags.PRESETS["tiny"]["dim"], "preset tiny")
    assert (args.out_dir, sources["out_dir"]) == ("out/pretrain", "script default")
    assert (args.grad_clip, sources["grad_clip"]) == (1.0, "default")
    assert args.device == "auto"  # per-launch flags never come from a checkpoint
    assert vars(given)["batch_size"] == 3 and given.learning_rate is None  # the parsed flags are not rewritten


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "--epochs must be >= 1, got 0"),
    ("--max_steps", "-1", "--max_steps must be >= 0, got -1"),
    ("--batch_size", "0", "--batch_size must be >= 1, got 0"),
    ("--learning_rate", "0", "--learning_rate must be > 0, got 0.0"),
    ("--dropout", "1.5", r"--dropout must be in \[0, 1\), got 1.5"),
])
def test_values_that_would_train_nothing_are_refused(data, tmp_path, flag, value, message):
    with pytest.raises(SystemExit, match=f"^error: {message}$"):
        pretrain(data, tmp_path / "run", "--max_steps", "2", flag, value)
    assert not (tmp_path / "run" / "hf").exists()  # nothing was exported as if trained


def test_resumed_sft_keeps_its_sequence_length(data, tmp_path):
    pretrain(data, tmp_path / "init", "--max_steps", "1")
    sft = ["--data_path", data.sft_train, "--val_data_path", data.sft_val, "--tokenizer_path", data.tok,
           "--init_from", str(tmp_path / "init"), "--out_dir", str(tmp_path / "sft"), *QUIET, "--batch_size", "4",
           "--log_interval", "1", "--eval_interval", "0"]
    ddp_sft_full.main(sft + ["--max_seq_len", "28", "--max_steps", "2"])
    ddp_sft_full.main(sft + ["--resume", "--max_steps", "4"])  # no --max_seq_len: the checkpoint's, not the model's
    state = load_checkpoint(tmp_path / "sft")
    assert state["step"] == 4 and state["args"]["max_seq_len"] == 28
    assert "max_seq_len=28 (checkpoint)" in (tmp_path / "sft" / "train.log").read_text(encoding="utf-8")
    with pytest.raises(SystemExit, match=r"trained with --max_seq_len 28, this run asks for --max_seq_len 32"):
        ddp_sft_full.main(sft + ["--resume", "--max_steps", "6", "--max_seq_len", "32"])


def test_resume_with_another_batch_size_reads_exactly_the_rest_of_the_epoch(data, tmp_path):
    windows = len(PretrainDataset(data.train_bin, max_length=32))
    out = tmp_path / "run"
    pretrain(data, out, "--batch_size", "4", "--max_steps", "5", "--epochs", "1")
    assert load_checkpoint(out)["data_position"] == {"epoch": 0, "sample": 20}
    pretrain(data, out, "--resume", "--max_steps", "0", "--batch_size", "8")  # step size doubles
    state = load_checkpoint(out)
    rest = (windows - 20) // 8
    assert state["step"] == 5 + rest and state["data_position"] == {"epoch": 0, "sample": 20 + 8 * rest}
    assert state["args"]["batch_size"] == 8
