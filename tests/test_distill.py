"""Distillation (ddp_distill.py): the KD losses against their definitions written out in float64; the top-K file's
round trip; 2 processes = 1; resume = uninterrupted (live teacher and top-K file); the student exports to HF;
bad teachers and flags refused with one line."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import ddp_distill
from dataset import PretrainDataset
from support.training import train_flags
from k_model import ModelConfig, Transformer
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
    assert sums["loss"].item() == pytest.approx(((0.3 * kl + 0.7 * ce) * m).sum().item(), rel=1e-5)
    assert sums["kd"].item() == pytest.approx((kl * m).sum().item(), rel=1e-5)
    assert sums["ce"].item() == pytest.approx((ce * m).sum().item(), rel=1e-5)
    agree = ((s.argmax(-1) == t.argmax(-1)).double() * m).sum().item()
    assert sums["agree"].item() == agree
