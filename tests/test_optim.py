"""--optimizer muon and --lr_schedule wsd (optim.py): which weights Muon trains, its update against the formula
torch documents, bit-equal to torch.optim.Muon in bfloat16 (state dicts interchangeable), the dtype --muon_dtype
auto picks, exact kill-and-resume with both optimizer states mid-decay, DDP equal to one process, and the
schedule's shape."""
from __future__ import annotations

import argparse
import functools
import math
import signal

import pytest
import torch

import ddp_pretrain
from support.loading import lora
from support.training import optim
from k_model import ModelConfig, Transformer
from test_train_ddp import STEPS
from test_train_resume import last_logged_step, saved_step, start, wait_for
from train_helpers import QUIET, TINY_MODEL, make_pretrain_data, read_metrics, run_script

BLOCK_MATRICES = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


def tiny_model(**config) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=16,
                                   **config))


def hyper(optimizer: str = "muon", **kw) -> argparse.Namespace:
    return argparse.Namespace(**{"optimizer": optimizer, "learning_rate": 1e-3, "muon_learning_rate": 0.02,
                                 "weight_decay": 0.1, "muon_dtype": "float32", **kw})


def trained_by(model: torch.nn.Module, optimizer: optim.Optimizers) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {part: {names[id(p)] for g in opt.param_groups for p in g["params"]}
            for part, (opt, _) in optimizer.parts.items()}


@pytest.mark.parametrize("tied", [True, False])
def test_muon_trains_the_block_matrices_and_adamw_the_rest(tied):
    model = tiny_model(tie_word_embeddings=tied)
    groups = trained_by(model, optim.make_optimizer(model, list(model.parameters()), hyper(), torch.device("cpu")))
    assert groups["muon"] == {f"layers.{i}.{m}.weight" for i in range(2) for m in BLOCK_MATRICES}
    head = set() if tied else {"output.weight"}
    assert groups["adamw"] == {"tok_embeddings.weight", "norm.weight", *head} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in ("attention_norm", "ffn_norm")}
    # --optimizer adamw: AdamW trains everything, saved as before (a plain AdamW state dict)
    adamw = optim.make_optimizer(model, list(model.parameters()), hyper("adamw"), torch.device("cpu"))
    assert trained_by(model, adamw) == {"adamw": {n for n, _ in model.named_parameters()}}
    assert set(adamw.state_dict()) == {"state", "param_groups"}


def test_lora_adapters_train_with_adamw_under_muon():
    spec = {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["wqkv", "w2"], "load_in_4bit": False}
    model = lora.attach(tiny_model(), spec)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = trained_by(model, optim.make_optimizer(model, params, hyper(), torch.device("cpu")))
    assert set(groups) == {"adamw"} and len(groups["adamw"]) == 8
    assert all(".lora_A." in n or ".lora_B." in n for n in groups["adamw"])


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """torch.optim.Muon's documented orthogonalization, in float64: X = G / ||G||_F (transposed so that it has
    no more rows than columns), then X <- a X + (b A + c A^2) X with A = X X^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double() / g.double().norm().clamp(min=1e-7)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).float()


def test_a_muon_step_is_the_documented_update():
    """Two steps (so momentum counts) of the trainer's Muon (--muon_dtype float32) on w13 (rows > cols: the lr
    is scaled by sqrt(rows / cols)) and wo, against the algorithm in torch.optim.Muon's documentation: B = mu B
    + g; nesterov: O = NS(g + mu B); W <- W (1 - lr wd) - lr sqrt(max(1, rows / cols)) O."""
    model = tiny_model()
    lr, wd, mu = 0.02, 0.5, 0.95  # a large decay: leaving it out would show
    optimizer = optim.make_optimizer(model, list(model.parameters()), hyper(weight_decay=wd), torch.device("cpu"))
    optimizer.set_lr(lambda peak: peak)
    names = ("layers.0.feed_forward.w13.weight", "layers.1.attention.wo.weight")
    weights = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights of norm ~ the updates', so that the decay counts
        for n in names:
            weights[n].copy_(torch.randn(weights[n].shape, generator=generator) * 0.1)
    initial = {n: weights[n].detach().clone() for n in names}
    expected = dict(initial)
    momentum = {n: torch.zeros_like(weights[n]) for n in names}
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        for n in names:
            g = weights[n].grad
            momentum[n] = mu * momentum[n] + g
            rows, cols = g.shape
            step = lr * math.sqrt(max(1.0, rows / cols)) * newton_schulz(g + mu * momentum[n])
            expected[n] = expected[n] * (1 - lr * wd) - step
        optimizer.step()
    for n in names:
        error = (weights[n].detach() - expected[n]).norm() / (expected[n] - initial[n]).norm()
        # float32 against float64: ~1e-7 of the change (torch's bfloat16 is ~1%); a missing lr scale or decay
        # would be 20% or more
        assert error < 1e-5, (n, float(error))


def test_muon_in_bfloat16_is_torch_muon_bit_for_bit():
    """--muon_dtype bfloat16 takes torch.optim.Muon's steps exactly (wide, square and tall matrices), and the
    state dicts load into each other: a checkpoint of a run before our Muon resumes, and the other way."""
    model = tiny_model()
    ours = optim.make_optimizer(model, list(model.parameters()), hyper(muon_dtype="bfloat16"), torch.device("cpu"))
    muon = ours.parts["muon"][0]
    params = [p for g in muon.param_groups for p in g["params"]]
    assert {tuple(p.shape) for p in params} == {(64, 32), (32, 32), (256, 32), (32, 128)}
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = torch.optim.Muon(twins, lr=0.02, weight_decay=0.1)
    generator = torch.Generator().manual_seed(2)

    def step(ours_: torch.optim.Optimizer, theirs: torch.optim.Optimizer) -> None:
        for p, twin in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=generator)
            twin.grad = p.grad.clone()
        ours_.step()
        theirs.step()

    for _ in range(2):
        step(muon, reference)
    resumed = optim.Muon(params, 0.02, 0.1, torch.bfloat16)
    resumed.load_state_dict(reference.state_dict())  # torch's checkpoint into ours
    again = torch.optim.Muon(twins, lr=0.02, weight_decay=0.1)
    again.load_state_dict(muon.state_dict())  # ours into torch's
    step(resumed, again)
    for p, twin in zip(params, twins):
        assert torch.equal(p, twin)
        assert torch.equal(resumed.state[p]["momentum_buffer"], again.state[twin]["momentum_buffer"])
    assert muon.state_dict()["param_groups"] == reference.state_dict()["param_groups"]


@pytest.mark.cpu_kind
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matrices_of_one_shape_are_orthogonalized_together_as_each_alone(monkeypatch, dtype):
    """Muon stacks the matrices of one shape into one batched Newton-Schulz: bit for bit what each gives alone
    (in bfloat16 that is what keeps it torch.optim.Muon's), for wide, square and tall shapes in any order, and
    with stacks capped at NS_STACK_ELEMENTS."""
    generator = torch.Generator().manual_seed(3)
    shapes = [(24, 40), (32, 32), (24, 40), (72, 16), (32, 32), (72, 16), (24, 40), (8, 8)]
    inputs = [torch.randn(shape, generator=generator) for shape in shapes]
    ns = functools.partial(optim.newton_schulz, coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7,
                           dtype=dtype)
    together = optim.orthogonalized_by_shape(inputs, ns)
    assert [tuple(u.shape) for u in together] == shapes
    for g, update in zip(inputs, together):
        assert torch.equal(update, ns(g))
    assert not torch.equal(together[0], together[2])  # each its own matrix's, not its shape's first
    monkeypatch.setattr(optim, "NS_STACK_ELEMENTS", 2 * 24 * 40)  # stacks of two (24, 40) matrices, then one
    assert all(torch.equal(a, b) for a, b in zip(optim.orthogonalized_by_shape(inputs, ns), together))


@pytest.mark.parametrize("native, picked", [("0", "float32 (auto: this CPU has no native bf16)"),
                                            ("1", "bfloat16 (auto: this CPU computes bf16 natively)")])
def test_muon_dtype_auto_follows_native_bf16(monkeypatch, native, picked):
    """--muon_dtype auto: bfloat16 where bf16 is native, float32 where a bf16 matmul is emulated (K_MODEL_NATIVE_BF16
    says which this CPU is); the optimizer line of the log names it."""
    monkeypatch.setenv("K_MODEL_NATIVE_BF16", native)
    model = tiny_model()
    optimizer = optim.make_optimizer(model, list(model.parameters()), hyper(muon_dtype="auto"), torch.device("cpu"))
    assert f"Newton-Schulz in {picked}" in optimizer.describe()


def test_wsd_schedule_warms_up_holds_then_decays_to_zero():
    peak, warmup, total, fraction = 1e-3, 10, 100, 0.3
    lrs = [optim.lr_at(s, peak, warmup, total, schedule="wsd", decay_fraction=fraction) for s in range(total + 1)]
    decay_start = total - 30
    for s, lr in enumerate(lrs):
        if s < warmup:
            assert lr == pytest.approx(peak * (s + 1) / warmup), s
        elif s < decay_start:
            assert lr == pytest.approx(peak), s
        else:
            assert lr == pytest.approx(peak * (total - s) / 30), s
    assert lrs[-1] == 0 and lrs[total - 1] == pytest.approx(peak / 30)
    # a decay that reaches back into the warmup: the lower of the two
    short = [optim.lr_at(s, peak, 10, 20, schedule="wsd", decay_fraction=0.75) for s in range(20)]
    assert short == pytest.approx([peak * min((s + 1) / 10, (20 - s) / 15) for s in range(20)])


def test_bad_schedule_and_optimizer_flags_are_refused(tmp_path, tiny_tokenizer_dir):
    train_bin, _ = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=100, n_val=10)
    args = ["--data_path", train_bin, "--val_data_path", "", "--tokenizer_path", tiny_tokenizer_dir,
            "--out_dir", str(tmp_path / "run"), *TINY_MODEL, *QUIET, "--batch_size", "8", "--max_steps", "2"]
    for bad, message in ((["--decay_fraction", "1.5"], "--decay_fraction must be in [0, 1], got 1.5"),
                         (["--muon_learning_rate", "0"], "--muon_learning_rate must be > 0, got 0.0")):
        with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
            ddp_pretrain.main(args + ["--optimizer", "muon", *bad])
    ddp_pretrain.main(args + ["--optimizer", "muon"])
    with pytest.raises(SystemExit, match="checkpoint was trained with --optimizer muon, this run asks for --optimizer "
                                         "adamw"):
        ddp_pretrain.main(args + ["--resume", "--optimizer", "adamw", "--max_steps", "4"])


def test_muon_wsd_run_killed_mid_decay_resumes_exactly(tmp_path, tiny_tokenizer_dir):
    """SIGKILL during the decay, then --resume: the losses, learning rates, weights and both optimizers' states
    equal the uninterrupted run's; its learning rates follow the WSD formula."""
    total, warmup, fraction = 60, 5, 0.75  # the decay starts at step 15; the kill comes after step 20's save
    train_bin, val_bin = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=300, n_val=20)
    args = ["--data_path", train_bin, "--val_data_path", val_bin, "--tokenizer_path", tiny_tokenizer_dir,
            *TINY_MODEL, *QUIET, "--dropout", "0.1", "--batch_size", "8", "--max_steps", str(total),
            "--optimizer", "muon", "--lr_schedule", "wsd", "--decay_fraction", str(fraction),
            "--warmup_iters", str(warmup), "--log_interval", "1", "--eval_interval", "25", "--save_interval", "5",
            "--sample_tokens", "0"]
    ref, run = tmp_path / "reference", tmp_path / "interrupted"
    ddp_pretrain.main(args + ["--out_dir", str(ref)])
    logged = read_metrics(ref, "muon_lr")  # pytest 9's approx compares no (step, value) pairs
    assert [s for s, _ in logged] == list(range(1, total + 1))
    assert [v for _, v in logged] == pytest.approx([optim.lr_at(s, 0.02, warmup, total, "wsd", fraction)
                                                    for s in range(total)])

    proc = start(args + ["--out_dir", str(run)], tmp_path / "run.log")
    wait_for(lambda: saved_step(run) >= 20 and last_logged_step(run) > saved_step(run), proc, tmp_path / "run.log")
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert 20 <= saved_step(run) < total
    ddp_pretrain.main(args + ["--out_dir", str(run), "--resume"])

    for metric in ("loss", "val_loss", "lr", "muon_lr"):
        assert read_metrics(run, metric) == read_metrics(ref, metric), metric
    a, b = torch.load(ref / "ckpt.pt", weights_only=True), torch.load(run / "ckpt.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert set(a["optimizer"]) == {"muon", "adamw"}
    for part in ("muon", "adamw"):
        sa, sb = a["optimizer"][part]["state"], b["optimizer"][part]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_ddp_with_muon_matches_one_process(tmp_path, tiny_tokenizer_dir):
    """2 gloo processes train like 1 with Muon's Newton-Schulz in float32: weights, losses and val losses within
    1e-5, as with AdamW. (In bfloat16 the ~1e-7 difference between 2 ranks' summed gradient and 1 process's
    flips some roundings by a bf16 ulp, and the matrices fail this check: optim.py's docstring.)"""
    train_bin, val_bin = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=200, n_val=20)
    common = ["--data_path", train_bin, "--val_data_path", val_bin, "--tokenizer_path", tiny_tokenizer_dir,
              *TINY_MODEL, *QUIET, *STEPS, "--optimizer", "muon", "--muon_learning_rate", "1e-3",
              "--muon_dtype", "float32"]
    ddp = run_script("ddp_pretrain.py", common + ["--out_dir", str(tmp_path / "ddp"), "--batch_size", "2",
                                                  "--accumulation_steps", "2"], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ddp_pretrain.main(common + ["--out_dir", str(tmp_path / "one"), "--batch_size", "8"])
    one, two = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("one", "ddp"))
    assert one["step"] == two["step"] == 6 and two["world_size"] == 2
    for key, weight in one["model"].items():
        torch.testing.assert_close(two["model"][key], weight, atol=1e-5, rtol=0, msg=key)
    for metric in ("loss", "val_loss"):
        ref, got = read_metrics(tmp_path / "one", metric), read_metrics(tmp_path / "ddp", metric)
        assert [s for s, _ in got] == [s for s, _ in ref] and len(ref) >= 2
        assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=1e-5)
