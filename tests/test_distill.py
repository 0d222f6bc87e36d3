"""Distillation (ddp_distill.py): the KD losses against their definitions written out in float64; the top-K file's
round trip; 2 processes = 1; resume = uninterrupted (live teacher and top-K file); the student exports to HF;
bad teachers and flags refused with one line."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

import ddp_distill
from support.loading.checkpoint import load_checkpoint
from dataset import PretrainDataset
from support.training import train_flags
from k_model import ModelConfig, Transformer
from support.loading.sources import load_tokenizer, open_model
from support.model.hf_llama import export_hf
from train_helpers import QUIET, make_pretrain_data, make_sft_data, read_metrics, run_script


def tiny_model(vocab_size: int, dim: int, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                   max_seq_len=64))


def save_model(model: Transformer, out_dir, tokenizer_dir: str) -> str:
    from transformers import AutoTokenizer

    export_hf(model, out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer, tiny_tokenizer_dir) -> dict[str, str]:
    """A teacher twice the student's width, pretraining and SFT data."""
    root = tmp_path_factory.mktemp("distill")
    train, val = make_pretrain_data(root, tiny_tokenizer_dir, n_train=120, n_val=20)
    sft_train, sft_val = make_sft_data(root, n_train=32, n_val=8)
    teacher = save_model(tiny_model(len(tiny_tokenizer), 64, seed=1), root / "teacher", tiny_tokenizer_dir)
    return dict(train=train, val=val, sft_train=sft_train, sft_val=sft_val, teacher=teacher, root=str(root))


def args_for(files: dict[str, str], tokenizer_dir: str, out_dir, *extra: str) -> list[str]:
    return ["--teacher", files["teacher"], "--tokenizer_path", tokenizer_dir, "--data_path", files["train"],
            "--val_data_path", files["val"], "--out_dir", str(out_dir), "--preset", "tiny", "--dim", "32",
            "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "32", *QUIET,
            "--learning_rate", "3e-3", "--log_interval", "1", "--save_interval", "100", "--sample_tokens", "0",
            "--eval_samples", "8", *extra]


# ----------------------------------------------------------------------------------------------------------
# The losses


def kl64(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p) || softmax(q)), written out in float64 with math."""
    p = [math.exp(v) for v in p_logits]
    q = [math.exp(v) for v in q_logits]
    zp, zq = sum(p), sum(q)
    return sum(pi / zp * math.log((pi / zp) / (qi / zq)) for pi, qi in zip(p, q))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_losses_equal_the_written_out_kl(reverse, temperature):
    torch.manual_seed(0)
    s, t = torch.randn(5, 11, dtype=torch.float64) * 3, torch.randn(5, 11, dtype=torch.float64) * 3
    teacher_logp = torch.log_softmax(t / temperature, -1)
    got = ddp_distill.kd_token_losses(s, teacher_logp.double(), None, temperature, reverse)
    for row, value in enumerate(got.tolist()):
        a, b = (s[row] / temperature).tolist(), (t[row] / temperature).tolist()
        expected = temperature**2 * (kl64(a, b) if reverse else kl64(b, a))
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_top_k_loss_is_the_kl_over_the_k_tokens_and_the_tail():
    torch.manual_seed(1)
    s, t = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    tlog = torch.log_softmax(t, -1)
    top, idx = tlog.topk(3, -1)
    tail = torch.log1p(-top.exp().sum(-1, keepdim=True))
    got = ddp_distill.kd_token_losses(s, torch.cat([top, tail], -1), idx, 1.0, reverse=False)
    slog = torch.log_softmax(s, -1).tolist()
    for row in range(4):
        tp = [math.exp(tlog[row, i]) for i in idx[row]]
        sp = [math.exp(slog[row][i]) for i in idx[row]]
        tp.append(1 - sum(tp)), sp.append(1 - sum(sp))
        expected = sum(a * math.log(a / b) for a, b in zip(tp, sp))
        assert got[row].item() == pytest.approx(expected, rel=1e-6)
        assert got[row].item() <= ddp_distill.kd_token_losses(s[row:row + 1], tlog[row:row + 1], None, 1.0,
                                                              False).item() + 1e-12  # coarser: never above full KL
    # K = V: the tail is empty and the top-K loss is the full KL
    top, idx = tlog.topk(9, -1)
    full = ddp_distill.kd_token_losses(s, tlog, None, 1.0, reverse=False)
    empty_tail = torch.full((4, 1), float("-inf"), dtype=torch.float64)
    torch.testing.assert_close(ddp_distill.kd_token_losses(s, torch.cat([top, empty_tail], -1), idx, 1.0, False),
                               full)


@pytest.mark.parametrize("sft", [False, True])
def test_loss_sums_mix_kd_and_ce_on_the_masked_tokens(files, tiny_tokenizer_dir, tmp_path, sft):
    """The loss of a step's batch: alpha * KL + (1 - alpha) * CE summed over the trained tokens only (SFT:
    assistant tokens), each term recomputed here in float64 from the two models' logits."""
    extra = ["--data_path", files["sft_train"], "--val_data_path", files["sft_val"], "--max_seq_len", "64"] if sft else []
    task = ddp_distill.Distill()
    given = train_flags.build_parser(task).parse_args(args_for(files, tiny_tokenizer_dir, tmp_path, "--kd_alpha",
                                                                 "0.3", "--kd_temperature", "2", *extra))
    args, _ = train_flags.resolve_args(given, task)
    tokenizer, _ = task.tokenizer(args)
    student = tiny_model(len(tokenizer), 32, seed=3)
    task.prepare(student, args, tokenizer, torch.device("cpu"))
    data = task.dataset(args.data_path, tokenizer, args)
    batch = task.collate([data[i] for i in range(4)])
    assert sft == bool((batch.mask == 0).any())
    [batch], _ = task.prepare_step(student, [batch], 0)
    sums = task.loss_sums(student, batch, torch.device("cpu"))
    with torch.no_grad():
        s = student(batch.x).logits.double() / 2
        t = task.teacher(batch.x).logits.double() / 2
    sp, tp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    kl = (tp.exp() * (tp - sp)).sum(-1) * 4
    ce = torch.nn.functional.cross_entropy((s * 2).transpose(1, 2), batch.y, reduction="none")
    m = batch.mask.double()
    # float32 log-probs are each off by a few ulps of their size, and a token's KL (times T^2 = 4) sums their
    # differences weighted by probabilities that add to 1: that bounds it, whatever the vocabulary's ties
    rounding = float(m.sum()) * 4 * 4 * torch.finfo(torch.float32).eps * float(sp.abs().max() + tp.abs().max())
    assert sums["loss"].item() == pytest.approx(((0.3 * kl + 0.7 * ce) * m).sum().item(), rel=1e-5, abs=rounding)
    assert sums["kd"].item() == pytest.approx((kl * m).sum().item(), rel=1e-5, abs=rounding)
    assert sums["ce"].item() == pytest.approx((ce * m).sum().item(), rel=1e-5)
    agree = ((s.argmax(-1) == t.argmax(-1)).double() * m).sum().item()
    assert sums["agree"].item() == agree


# ----------------------------------------------------------------------------------------------------------
# Training runs


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    for key, weight in a["model"].items():
        torch.testing.assert_close(b["model"][key], weight, atol=atol, rtol=0, msg=key)


def test_a_run_logs_kd_and_exports_a_student_transformers_loads(files, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ddp_distill.main(args_for(files, tiny_tokenizer_dir, tmp_path / "run", "--max_steps", "4", "--batch_size", "8",
                              "--eval_interval", "2"))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "kd", "ce", "agree", "teacher_s"} <= first.keys() and 0 <= first["agree"] <= 1
    assert first["loss"] == pytest.approx(0.5 * first["kd"] + 0.5 * first["ce"], rel=1e-5)
    assert len(read_metrics(tmp_path / "run", "val_loss")) == 2
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf").eval()
    x = PretrainDataset(files["val"], None, max_length=32)[0][0][None]
    ours = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    student = tiny_model(hf.config.vocab_size, 32, seed=0)
    student.load_state_dict(ours["model"])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, student.eval()(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(files, tiny_tokenizer_dir, tmp_path, parallel):
    """Global batch 8: 2 processes (DDP, or FSDP with the student sharded and gathered for its on-policy
    samples; the teacher whole on each) x 2 samples x 2 accumulation steps, or 1 process x 8, live teacher,
    half the steps on-policy (the student's samples seeded by step and prompt, not by process)."""
    common = args_for(files, tiny_tokenizer_dir, tmp_path, "--max_steps", "4", "--warmup_iters", "2",
                      "--eval_interval", "2", "--on_policy_fraction", "0.5", "--max_completion_length", "8")
    ddp = run_script("ddp_distill.py", common + ["--out_dir", str(tmp_path / "ddp"), "--batch_size", "2",
                                                 "--accumulation_steps", "2", "--parallel", parallel], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "=== distill: 2 process(es) on cpu" in ddp.stdout and f"--parallel {parallel}" in ddp.stdout
    ddp_distill.main(common + ["--out_dir", str(tmp_path / "one"), "--batch_size", "8"])
    one, two = (load_checkpoint(tmp_path / d) for d in ("one", "ddp"))
    assert one["step"] == two["step"] == 4 and two["world_size"] == 2
    assert_same_weights(one, two, atol=1e-5)
    steps = [ddp_distill.Distill.is_on_policy(argparse.Namespace(args=argparse.Namespace(
        seed=one["args"]["seed"], on_policy_fraction=0.5)), step) for step in range(4)]
    assert any(steps) and not all(steps)
    for metric in ("loss", "kd", "ce", "agree", "val_loss"):
        ref, got = read_metrics(tmp_path / "one", metric), read_metrics(tmp_path / "ddp", metric)
        assert [s for s, _ in got] == [s for s, _ in ref] and len(ref) in (2, 4)
        assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=1e-5)


def test_resume_matches_uninterrupted(files, tiny_tokenizer_dir, tmp_path):
    """2 steps, then --resume to step 4, equals 4 steps in one go (dropout on), from a --teacher_topk file
    that the first run writes and the resumed run reads."""
    common = args_for(files, tiny_tokenizer_dir, tmp_path, "--dropout", "0.1", "--warmup_iters", "100",
                      "--eval_interval", "2", "--batch_size", "4", "--teacher_topk", "5", "--kd_loss", "reverse",
                      "--kd_temperature", "2")
    ddp_distill.main(common + ["--out_dir", str(tmp_path / "whole"), "--max_steps", "4"])
    ddp_distill.main(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "2"])
    ddp_distill.main(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "4", "--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("whole", "split"))
    assert a["step"] == b["step"] == 4 and a["data_position"] == b["data_position"]
    assert_same_weights(a, b)
    for metric in ("loss", "kd", "ce", "agree", "val_loss"):
        assert read_metrics(tmp_path / "split", metric) == read_metrics(tmp_path / "whole", metric)


def test_on_policy_resume_matches_uninterrupted_and_trains_on_the_students_tokens(files, tiny_tokenizer_dir,
                                                                                  tmp_path):
    """SFT data, every step on-policy: 2 + 2 steps equal 4; the loss is the KD term alone."""
    common = args_for(files, tiny_tokenizer_dir, tmp_path, "--data_path", files["sft_train"], "--val_data_path",
                      files["sft_val"], "--max_seq_len", "64", "--batch_size", "4", "--warmup_iters", "100",
                      "--eval_interval", "2", "--on_policy_fraction", "1", "--max_completion_length", "6")
    ddp_distill.main(common + ["--out_dir", str(tmp_path / "whole"), "--max_steps", "4"])
    ddp_distill.main(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "2"])
    ddp_distill.main(common + ["--out_dir", str(tmp_path / "split"), "--max_steps", "4", "--resume"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("whole", "split"))
    assert_same_weights(a, b)
    for metric in ("loss", "kd", "ce", "val_loss"):
        assert read_metrics(tmp_path / "split", metric) == read_metrics(tmp_path / "whole", metric)
    assert [v for _, v in read_metrics(tmp_path / "whole", "loss")] == [v for _, v in read_metrics(tmp_path / "whole",
                                                                                                  "kd")]


def test_top_k_file_round_trip(files, tiny_tokenizer_dir, tiny_tokenizer, tmp_path):
    """The memmaps hold the teacher's top-K log-probs at T, their ids and the tail of every window, as the
    teacher gives them in float64."""
    import shutil

    data = str(tmp_path / "train.bin")
    shutil.copy(files["train"], data)
    shutil.copy(files["train"].removesuffix(".bin") + ".json", tmp_path / "train.json")
    ddp_distill.main(args_for(files, tiny_tokenizer_dir, tmp_path / "run", "--data_path", data, "--max_steps", "1",
                              "--batch_size", "4", "--teacher_topk", "7", "--kd_temperature", "1.5",
                              "--eval_interval", "0"))
    logp_path, idx_path, meta_path = ddp_distill.topk_paths(data, 7, 1.5)
    logp, idx = np.load(logp_path), np.load(idx_path)
    windows = PretrainDataset(data, None, max_length=32)
    assert logp.shape == (len(windows), 32, 8) and idx.shape == (len(windows), 32, 7)
    assert json.loads(meta_path.read_text())["samples"] == len(windows)

    teacher = open_model(files["teacher"]).model
    x = torch.stack([windows[i][0] for i in (0, len(windows) - 1)])
    with torch.no_grad():
        full = torch.log_softmax(teacher(x).logits.double() / 1.5, -1)
    top, ids = full.topk(7, -1)
    rows = logp[[0, -1]]
    assert torch.equal(torch.from_numpy(idx[[0, -1]]).long(), ids)
    torch.testing.assert_close(torch.from_numpy(rows[..., :7]).double(), top, atol=1e-5, rtol=0)
    tail = torch.log1p(-top.exp().sum(-1))
    torch.testing.assert_close(torch.from_numpy(rows[..., 7]).double(), tail, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Refused runs


def test_bad_teachers_and_flags_get_one_line(files, tiny_tokenizer_dir, tmp_path, capsys):
    def error(*flags: str) -> str:
        with pytest.raises(SystemExit) as err:
            ddp_distill.main(args_for(files, tiny_tokenizer_dir, tmp_path / "x", "--max_steps", "1", *flags))
        return str(err.value)

    assert error("--teacher", str(tmp_path / "nowhere")).startswith(f"error: --teacher {tmp_path / 'nowhere'}: ")
    assert error("--teacher_topk", "0") == "error: --teacher_topk must be >= 1, got 0"
    assert error("--kd_alpha", "1.5") == "error: --kd_alpha must be in [0, 1], got 1.5"
    assert error("--kd_temperature", "0") == "error: --kd_temperature must be > 0, got 0.0"
    assert error("--on_policy_fraction", "0.5", "--teacher_topk", "4").startswith(
        "error: --on_policy_fraction needs the live teacher")
    # a teacher with another vocabulary, and one with as many tokens but other ones
    other = tmp_path / "other"
    export_hf(tiny_model(300, 64, seed=2), other)
    assert "model vocab_size=300 but the tokenizer" in error("--teacher", str(other))
    fake = save_model(tiny_model(len(load_tokenizer(tiny_tokenizer_dir)), 64, seed=2), tmp_path / "fake",
                      tiny_tokenizer_dir)
    config = json.loads((tmp_path / "fake" / "tokenizer.json").read_text())
    vocab = config["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "fake" / "tokenizer.json").write_text(json.dumps(config))
    message = error("--teacher", fake)
    assert "tokenizer_fingerprint" in message and "same size, different tokens" in message and "\n" not in message
    # a teacher smaller than the student: a warning, and the run goes on
    small = save_model(tiny_model(len(load_tokenizer(tiny_tokenizer_dir)), 16, seed=2), tmp_path / "small",
                       tiny_tokenizer_dir)
    ddp_distill.main(args_for(files, tiny_tokenizer_dir, tmp_path / "ok", "--max_steps", "1", "--teacher", small,
                              "--eval_interval", "0", "--batch_size", "4"))
    assert "warning: the teacher" in capsys.readouterr().out
