"""GRPO (ddp_grpo.py, rewards.py): the loss and its gradient equal TRL's published formulas written out here;
reward functions load by FILE.py:FUNCTION and a bad one stops the run with one line naming it and the row;
the built-in rewards verify answers; a run of 2 gloo processes (DDP; FSDP, with LoRA too) equals 1 process; an
interrupted run resumes to exactly the uninterrupted one (the rollouts' sampling included); over-long prompts
are counted and skipped."""
from __future__ import annotations

import argparse
import json
import re
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ddp_grpo
import ddp_pretrain
import rewards
from support.inference.tool_loop import Trajectory
from support.loading.checkpoint import load_checkpoint
from support.loading.sources import model_from_state, open_model
from support.training.optim import make_optimizer
from support.training.train_flags import build_parser, resolve_args
from train_helpers import QUIET, TINY_MODEL, make_pretrain_data, read_metrics, run_script, start_script, write_jsonl

# ----------------------------------------------------------------------------------------------------------
# The loss against TRL's formulas (GRPOTrainer._compute_loss), written out independently


def trl_loss(logps, old, ref, rewards_, mask, G, loss_type, scale, eps_low, eps_high, beta, max_len):
    """TRL's GRPO loss on one whole batch, term by term as its documentation states them."""
    grouped = rewards_.view(-1, G)
    mean = grouped.mean(1).repeat_interleave(G)
    adv = rewards_ - mean
    if scale == "group":
        adv = adv / (grouped.std(1).repeat_interleave(G) + 1e-4)
    coef_1 = torch.exp(logps - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    if beta:
        per_token = per_token + beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_len)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)  # dapo: tokens of the whole (global) batch


@pytest.mark.parametrize("loss_type", ddp_grpo.LOSS_TYPES)
@pytest.mark.parametrize("scale,beta,eps_high", [("group", 0.0, 0.2), ("none", 0.04, 0.28)])
def test_loss_and_gradient_equal_trl_formulas(loss_type, scale, beta, eps_high):
    g = torch.Generator().manual_seed(0)
    N, T, G, max_len = 8, 6, 4, 10
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    logps = (old + 0.4 * torch.randn(N, T, generator=g, dtype=torch.float64)).requires_grad_()  # some ratios clip
    ref = old + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    rewards_ = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1, 5, 6, 2, 4, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).double()

    expected = trl_loss(logps, old, ref, rewards_, mask, G, loss_type, scale, 0.2, eps_high, beta, max_len)
    (want_grad,) = torch.autograd.grad(expected, logps)
    # ours, as the loop computes it: two micro-batches of two groups, each a sum divided by the step's units
    total, units = 0.0, sum(ddp_grpo.loss_units(mask[k : k + 4], loss_type, max_len) for k in (0, 4))
    for k in (0, 4):
        rows = slice(k, k + 4)
        adv = ddp_grpo.group_advantages(rewards_[rows], G, scale)
        terms = ddp_grpo.token_terms(logps[rows], old[rows], adv, 0.2, eps_high, beta, ref[rows] if beta else None)
        total = total + ddp_grpo.loss_sum(terms.loss, mask[rows], loss_type) / units
    (got_grad,) = torch.autograd.grad(total, logps)
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-15)
    assert 0 < float((ddp_grpo.token_terms(logps, old, torch.ones(N), 0.2, eps_high, 0, None).clipped * mask).sum())


def test_policy_gradient_at_ratio_one_is_advantage_times_score():
    """With one update per rollout (pi_old = pi, detached), d loss / d logp = -A / |o| per token (grpo)."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    adv = torch.tensor([1.5, -1.5])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    terms = ddp_grpo.token_terms(logps, logps.detach(), adv, 0.2, 0.2, 0.0, None)
    ddp_grpo.loss_sum(terms.loss, mask, "grpo").backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.75, -0.75], [1.5, 0.0]]))


# ----------------------------------------------------------------------------------------------------------
# Rewards


def test_exact_answer_reads_numbers_in_their_forms():
    completions = ["42+17=59", "答案: \\boxed{1059}", "1,059", "58", "no idea", "#### 72"]
    answers = ["59", "1059", "1059", "59", "59", "The sum is 70 + 2.\n#### 72"]
    assert rewards.exact_answer(completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert rewards.exact_answer(["59"], answer=["not a number"]) == [None]


def test_numeric_closeness_gives_near_misses_partial_credit():
    got = rewards.numeric_closeness(["42+17=59", "=60", "=118", "none", "1,059"],
                                    answer=["59", "59", "59", "59", "1059"])
    assert got == pytest.approx([1.0, 1 - 1 / 59, 0.0, 0.0, 1.0])
    assert rewards.numeric_closeness(["1"], answer=["n/a"]) == [None]


def test_answer_format_wants_an_answer_a_verifier_can_read():
    assert rewards.answer_format(["42+17=59", "\\boxed{3}", "59", "=59 apples", "42+17="]) == [1.0, 1.0, 0.0, 0.0, 0.0]



def test_built_in_rewards_read_conversational_completions():
    as_messages = [[{"role": "assistant", "content": c}] for c in ("42+17=59", "58")]  # a message-list prompt's
    assert rewards.answer_format(as_messages) == [1.0, 0.0]
    assert rewards.exact_answer(as_messages, answer=["59", "59"]) == [1.0, 0.0]
    assert rewards.numeric_closeness(as_messages, answer=["59", "59"]) == pytest.approx([1.0, 1 - 1 / 59])
    with_tool = [{"role": "assistant", "content": "", "tool_calls": [{"id": "call_0_0", "type": "function", "function": {
        "name": "calculator", "arguments": '{"expression": "42+17"}'}}]}, {"role": "tool", "content": "59"},
                 {"role": "assistant", "content": "42+17=59"}]
    assert rewards.exact_answer([with_tool, with_tool[:2]], answer=["59", "59"]) == [1.0, 0.0]  # the last reply's


BAD_REWARDS = '''
import math
import re
def short(completions, **kw):
    return [1.0] * (len(completions) - 1)
def raises(completions, answer, **kw):
    return [1.0 / (len(c) - len(c)) for c in completions]
def nan_on_second(completions, **kw):
    return [math.nan if i == 1 else 0.0 for i, _ in enumerate(completions)]
def needs_label(completions, label):
    return [0.0] * len(completions)
def skip_all(completions, **kw):
    return [None] * len(completions)
'''


@pytest.mark.parametrize("function,message", [
    ("short", "reward {f}:short returned 1 value(s) for 2 completions (scoring rows d.jsonl:1, 2)"),
    ("raises", "reward {f}:raises raised ZeroDivisionError: float division by zero (scoring rows d.jsonl:1, 2)"),
    ("nan_on_second", "reward {f}:nan_on_second returned nan for row d.jsonl:2: rewards must be finite"),
])
def test_bad_reward_values_name_the_function_and_row(tmp_path, function, message):
    file = tmp_path / "mine.py"
    file.write_text(BAD_REWARDS)
    reward = rewards.load_reward(f"{file}:{function}")
    with pytest.raises(ValueError) as err:
        rewards.score([reward], ["1", "2"], ["p", "q"], {"answer": ["1", "2"]}, ["d.jsonl:1", "d.jsonl:2"])
    assert message.format(f=file) in str(err.value)


def test_reward_files_that_are_not_there_are_refused(tmp_path):
    file = tmp_path / "mine.py"
    file.write_text(BAD_REWARDS)
    with pytest.raises(FileNotFoundError, match="--reward nowhere.py:f: nowhere.py: no such file"):
        rewards.load_reward("nowhere.py:f")
    with pytest.raises(ValueError, match=r"defines no function missing \(its functions: nan_on_second, "):
        rewards.load_reward(f"{file}:missing")
    with pytest.raises(ValueError, match="expected FILE.py:FUNCTION"):
        rewards.load_reward(str(file))
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(ValueError, match="importing .*broken.py failed: SyntaxError"):
        rewards.load_reward(f"{tmp_path / 'broken.py'}:f")
    with pytest.raises(ValueError, match=r"needs column\(s\) \['label'\], which the records of d.jsonl lack"):
        rewards.check_columns([rewards.load_reward(f"{file}:needs_label")], {"answer"}, "d.jsonl")


def trl_advantages(per_function: np.ndarray, weights: list[float], G: int, scale: str) -> np.ndarray:
    """TRL's advantages (GRPOTrainer, sum_then_normalize) as its source states them: None is NaN, the weighted
    rewards are a nansum, a row that every function left NaN is NaN (unscorable), group mean and std (Bessel) are
    nan-aware, and a NaN advantage becomes 0."""
    r = np.nansum(per_function * np.array(weights), axis=1)
    r[np.isnan(per_function).all(axis=1)] = np.nan
    grouped = r.reshape(-1, G)
    with warnings.catch_warnings():  # empty or one-value groups: NaN, by design
        warnings.simplefilter("ignore", RuntimeWarning)
        adv = grouped - np.nanmean(grouped, axis=1, keepdims=True)
        if scale == "group":
            adv = adv / (np.nanstd(grouped, axis=1, ddof=1, keepdims=True) + 1e-4)
    return np.nan_to_num(adv.reshape(-1), nan=0.0)


NONE_REWARDS = '''
def half(completions, **kw):  # judges some completions only
    table = {"a": 1.0, "b": 0.5, "c": None, "d": 0.5, "e": None, "f": None, "g": 2.0, "h": None,
             "i": None, "j": None, "k": None, "l": 1.0}
    return [table[c] for c in completions]
def other(completions, **kw):  # judges some of those
    return [1.0 if c in "eg" else None for c in completions]
'''


@pytest.mark.parametrize("scale", ["group", "none"])
def test_a_completion_no_function_judged_is_left_out_of_its_group(tmp_path, scale):
    """Rewards [1.0, 0.5, None, 0.5] give TRL's advantages [1.15, -0.58, 0, -0.58], not [1.22, 0, -1.22, 0]; with
    two weighted functions, a None counts as 0 while another function judges the completion."""
    file = tmp_path / "mine.py"
    file.write_text(NONE_REWARDS)
    funcs = [rewards.load_reward(f"{file}:half", 1.0), rewards.load_reward(f"{file}:other", 0.5)]
    completions = list("abcdefghijkl")  # 3 groups of 4: one with a lone judged completion, one judged twice
    per_function = rewards.score(funcs, completions, ["p"] * 12, {}, ["d.jsonl:1"] * 12)
    got = ddp_grpo.group_advantages(ddp_grpo.weighted(per_function, funcs), 4, scale)
    want = trl_advantages(per_function.double().numpy(), [1.0, 0.5], 4, scale)
    torch.testing.assert_close(got, torch.from_numpy(want).float())
    if scale == "group":
        torch.testing.assert_close(got[:4], torch.tensor([1.1543, -0.5772, 0.0, -0.5772]), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# The script


def arith_prompts(path: Path, n: int, start: int = 0) -> str:
    records = [{"prompt": f"{a}加{a % 7}等于多少?", "answer": str(a + a % 7)}
               for a in range(start + 10, start + 10 + n)]
    return str(write_jsonl(path, records))


REWARD_FILE = '''
def digits(completions, answer, **kw):
    """A graded reward that even a random model's completions spread over: their distinct characters, and
    a bonus for each of the answer's digits they contain."""
    return [len(set(c)) / 8 + sum(ch in c for ch in a) for c, a in zip(completions, answer)]
'''


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny pretrained model, prompts and a reward file."""
    root = tmp_path_factory.mktemp("grpo")
    train_bin, _ = make_pretrain_data(root, tiny_tokenizer_dir, n_train=60, n_val=10)
    ddp_pretrain.main(["--data_path", train_bin, "--val_data_path", "", "--tokenizer_path", tiny_tokenizer_dir,
                       "--out_dir", str(root / "init"), *TINY_MODEL, "--max_seq_len", "64", *QUIET, "--batch_size", "8",
                       "--max_steps", "2", "--log_interval", "1"])
    (root / "my_rewards.py").write_text(REWARD_FILE)
    return dict(root=root, init=str(root / "init"), train=arith_prompts(root / "train.jsonl", 48),
                val=arith_prompts(root / "val.jsonl", 12, start=500), reward=f"{root / 'my_rewards.py'}:digits")


LORA = ["--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"]


def grpo_args(s: dict, *extra: str) -> list[str]:
    return ["--init_from", s["init"], "--data_path", s["train"], "--val_data_path", s["val"],
            "--reward", s["reward"], "--reward", "rewards.py:answer_format", "--reward_weights", "1", "0.5",
            *QUIET, "--max_seq_len", "64", "--max_completion_length", "8", "--num_generations", "4",
            "--learning_rate", "3e-3", "--log_interval", "1", "--eval_interval", "3", "--eval_samples", "8",
            "--save_interval", "100", "--sample_tokens", "0", *extra]


def rounding_through_adamw(run: Path, state: dict, model: torch.nn.Module) -> dict[str, float]:
    """How far apart each trained weight of `run` (a ckpt.pt: `state`, rebuilt as `model`) and of a run that sums
    the same float32 gradient terms in another order (other micro-batches, two ranks and an all-reduce) may be.
    The gradients differ by about one rounding of the tensor's largest entries, u G (u = 2^-24). AdamW's step
    lr m/(sqrt(v) + eps) has slope up to lr / eps at a zero gradient, and GRPO's gradient entries are differences
    (a group's advantages sum to 0), some within a few eps of 0: such an entry moves up to lr u G / eps further in
    one run, so by the end sum_s lr_s u G / eps. G bounds the tensor's entries at every step s of t, from AdamW's
    second moments: v >= (1 - beta2) beta2^(t-s) g_s^2. (This file's runs stay within 0.26 of it.)"""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(model, list(params.values()), argparse.Namespace(**state["args"]), torch.device("cpu"))
    optimizer.load_state_dict(state["optimizer"])
    adamw = optimizer.torch_optimizers[0]
    (_, beta2), eps = adamw.param_groups[0]["betas"], adamw.param_groups[0]["eps"]
    lrs, t, u = sum(v for _, v in read_metrics(run, "lr")), state["step"], torch.finfo(torch.float32).eps / 2
    bound = {name: adamw.state[p]["exp_avg_sq"].div((1 - beta2) * beta2 ** (t - 1)).sqrt().max() for name, p in
             params.items()}
    return {name: lrs * u * float(g) / eps for name, g in bound.items()}


def assert_same_run(a: Path, b: Path, steps: int,
                    metrics: tuple[str, ...] = ("loss", "reward", "reward_digits", "completion_len", "clipped",
                                                "val_reward")) -> None:
    """The same trained weights (a LoRA run's adapters; `b` of either checkpoint kind) within what float32 rounding
    makes of them through AdamW (rounding_through_adamw), frozen ones equal, the same metrics at every step."""
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    ma, mb = model_from_state(sa, a), model_from_state(sb, b)
    assert sa["step"] == sb["step"] == steps
    tolerance, weights = rounding_through_adamw(a, sa, ma), dict(mb.named_parameters())
    for name, weight in ma.named_parameters():
        torch.testing.assert_close(weights[name], weight, atol=tolerance.get(name, 0.0), rtol=0, msg=name)
    for metric in metrics:
        ref, got = read_metrics(a, metric), read_metrics(b, metric)
        assert [s for s, _ in got] == [s for s, _ in ref] and ref, metric
        assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=1e-5), metric


def test_log_probs_are_of_the_sampling_temperature(grpo_setup, tmp_path):
    """Completions are sampled from softmax(logits / T); TRL divides the logits by T for the policy's and the
    reference's log-probs too, so with --temperature 0.5 the loss and its gradient are TRL's formulas on
    log_softmax(logits / 0.5), computed here from the whole logits of the policy and of the --init_from model."""
    task = ddp_grpo.GRPO()
    given = build_parser(task).parse_args(grpo_args(grpo_setup, "--temperature", "0.5", "--beta", "0.1"))
    args = resolve_args(given, task)[0]
    tokenizer, _ = task.tokenizer(args)
    policy = task.initial_model(args, tokenizer).model
    with torch.no_grad():  # the policy a few steps on: no longer the reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    task.prepare(policy, args, tokenizer, torch.device("cpu"))
    prompts = [task.dataset(args.data_path, tokenizer, args)[i] for i in (0, 1) for _ in range(4)]
    completions = [[5 + 7 * i + t for t in range(1 + i % 4)] + [tokenizer.eos_token_id] for i in range(8)]
    rewards_ = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.0, 1.0, 1.0, 0.3])
    trajectories = [Trajectory(ids=c, generated=[1] * len(c)) for c in completions]
    batch = task._rollouts(prompts, trajectories, torch.stack([rewards_, torch.zeros(8)], 1), 1.0)  # 2nd: weight 0.5
    ours = task.loss_sums(policy, batch, torch.device("cpu"))["loss"] / task.loss_units(batch)
    grads = torch.autograd.grad(ours, list(policy.parameters()))

    reference = open_model(grpo_setup["init"], own_tokenizer=False).model

    def logps(model):  # TRL: log_softmax(logits / temperature) of the sampled tokens
        return (model(batch.x).logits / 0.5).log_softmax(-1).gather(-1, batch.y[..., None]).squeeze(-1)

    lp = logps(policy)
    with torch.no_grad():
        ref = logps(reference)
    expected = trl_loss(lp, lp.detach(), ref, rewards_, batch.mask, 4, "dapo", "group", 0.2, 0.2, 0.1, 8)
    torch.testing.assert_close(ours, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, list(policy.parameters()))):
        torch.testing.assert_close(got, want)


def test_grpo_trains_and_logs_its_metrics(grpo_setup, tmp_path):
    out = tmp_path / "run"
    ddp_grpo.main(grpo_args(grpo_setup, "--out_dir", str(out), "--max_steps", "3", "--batch_size", "4"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("reward", "reward_std", "reward_digits", "reward_digits_std", "reward_answer_format",
                "completion_len", "truncated", "zero_std_groups", "clipped", "kl", "rollout_s"):
        assert all(r[key] is not None for r in steps), key
    assert all(1 <= r["completion_len"] <= 8 and r["rollout_s"] > 0 for r in steps)
    assert len({r["reward"] for r in steps}) > 1  # the completions change as the model does
    evals = [r for r in records if "val_reward" in r]
    assert [r["step"] for r in evals] == [0, 3]  # the start model first: the baseline to beat
    assert (out / "hf" / "config.json").exists()


@pytest.fixture(scope="module")
def one_process(grpo_setup, tmp_path_factory):
    """3 steps of 8 prompts x 4 completions in one process, of every weight and of LoRA adapters: what the
    runs with 2 processes must reproduce."""
    root = tmp_path_factory.mktemp("grpo_one")
    runs = {}
    for name, flags in (("full", []), ("lora", LORA)):
        runs[name] = root / name
        ddp_grpo.main(grpo_args(grpo_setup, "--max_steps", "3", *flags, "--out_dir", str(runs[name]), "--batch_size",
                                "8"))
    return runs


@pytest.mark.parametrize("parallel, lora", [("fsdp", False), ("fsdp", True)])
def test_two_processes_train_like_one(grpo_setup, one_process, tmp_path, parallel, lora):
    """FSDP (its rollouts decode with a copy of the policy gathered on each process; with LoRA the base is
    sharded too): 2 processes x 2 prompts x 2 accumulation steps = 1 process x 8 prompts. (DDP: the tool
    rollouts' test below, 2 processes x 1 prompt = 1 x 2.)"""
    flags = ["--max_steps", "3", "--parallel", parallel] + LORA * lora
    two = run_script("ddp_grpo.py", grpo_args(grpo_setup, *flags, "--out_dir", str(tmp_path / "two"), "--batch_size",
                                              "2", "--accumulation_steps", "2"), nproc=2, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"--parallel {parallel}" in two.stdout
    assert_same_run(one_process["lora" if lora else "full"], tmp_path / "two", 3)


def test_resumed_run_samples_and_trains_like_an_uninterrupted_one(grpo_setup, tmp_path):
    """Stopped by SIGINT mid-run (it saves after the step it is in), then resumed: the rollouts after the
    resume must be the ones the uninterrupted run sampled, so the weights and metrics match."""
    common = grpo_args(grpo_setup, "--batch_size", "4", "--dropout", "0.1", "--max_steps", "8")
    ddp_grpo.main(common + ["--out_dir", str(tmp_path / "whole")])
    interrupt_then_resume(common, tmp_path / "cut", after_logged=3, steps=8)
    assert_same_run(tmp_path / "whole", tmp_path / "cut", 8)


def interrupt_then_resume(common: list[str], cut: Path, after_logged: int, steps: int) -> None:
    """Runs ddp_grpo.py with `common` into `cut`, sends SIGINT once `after_logged` metrics lines are written
    (it saves after the step it is in and exits 128 + SIGINT), then resumes it in this process to `steps`."""
    log = cut.parent / f"{cut.name}.log"
    proc = start_script("ddp_grpo.py", common + ["--out_dir", str(cut)], log)
    deadline = time.monotonic() + 120
    while not (cut / "metrics.jsonl").exists() or len(read_metrics(cut)) < after_logged:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 128 + signal.SIGINT, log.read_text()[-3000:]
    assert after_logged <= torch.load(cut / "ckpt.pt", weights_only=True)["step"] < steps
    ddp_grpo.main(common + ["--out_dir", str(cut), "--resume"])


TRL_REWARD_FILE = '''
import json


def shorter_later(prompts, completions, completion_ids, trainer_state, log_extra=None, log_metric=None, **kwargs):
    """Written for TRL's GRPOTrainer: conversational completions, their token ids, a curriculum on the trainer
    state, and the logging hooks. It also writes down what it was given, for the test."""
    contents = [completion[0]["content"] for completion in completions]
    progress = trainer_state.global_step / trainer_state.max_steps
    if log_extra:
        log_extra("answer", list(kwargs["answer"]))
    if log_metric:
        log_metric("progress", progress)
    with open(kwargs["seen"][0], "a", encoding="utf-8") as f:
        state = [trainer_state.global_step, trainer_state.max_steps, trainer_state.epoch]
        f.write(json.dumps(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                state=state)) + "\\n")
    return [len(c) * (1 - progress) for c in contents]
'''


def test_a_reward_file_written_for_trl_runs_unchanged(grpo_setup, tmp_path, tiny_tokenizer, capsys):
    """Prompts given as messages: TRL passes each completion as [{"role": "assistant", "content": ...}], and
    always completion_ids, trainer_state, log_extra and log_metric; so does ddp_grpo.py."""
    (tmp_path / "trl_rewards.py").write_text(TRL_REWARD_FILE)
    seen = tmp_path / "seen.jsonl"
    records = [{"prompt": [{"role": "system", "content": "简短回答。"},
                           {"role": "user", "content": f"{a}加{a % 7}等于多少?"}],
                "answer": str(a + a % 7), "seen": str(seen)} for a in range(10, 18)]
    ddp_grpo.main(["--init_from", grpo_setup["init"], "--data_path", str(write_jsonl(tmp_path / "chat.jsonl", records)),
                   "--val_data_path", "", "--reward", f"{tmp_path / 'trl_rewards.py'}:shorter_later", *QUIET,
                   "--max_seq_len", "64", "--max_completion_length", "8", "--num_generations", "4", "--batch_size", "2",
                   "--max_steps", "2", "--out_dir", str(tmp_path / "run")])
    calls = [json.loads(line) for line in seen.read_text(encoding="utf-8").splitlines()]
    assert [c["state"] for c in calls] == [[0, 2, 0.0], [1, 2, 0.25]]  # 8 prompts, 2 a step: 4 steps an epoch
    for call in calls:
        assert all(p in [r["prompt"] for r in records] for p in call["prompts"])
        for completion, ids in zip(call["completions"], call["completion_ids"]):
            text = tiny_tokenizer.decode(ids, skip_special_tokens=True)
            assert completion == [{"role": "assistant", "content": text}]
    err = capsys.readouterr().err
    assert err.count("note: a reward function's log_metric('progress', ...) is not recorded") == 1
    with pytest.raises(ValueError, match=r"d.jsonl: column\(s\) \['completion_ids'\] take the name of what every"):
        rewards.check_columns([], {"answer", "completion_ids"}, "d.jsonl")


def test_a_bad_reward_stops_the_first_rollout_with_one_line_and_keeps_the_checkpoint(grpo_setup, tmp_path):
    out = tmp_path / "run"
    args = grpo_args(grpo_setup, "--out_dir", str(out), "--batch_size", "4", "--val_data_path", "")
    ddp_grpo.main(args + ["--max_steps", "1"])
    saved = (out / "ckpt.pt").read_bytes()
    bad = tmp_path / "bad.py"
    bad.write_text(BAD_REWARDS)
    for function, said in (("short", "returned 15 value(s) for 16 completions"), ("raises", "raised ZeroDivisionError"),
                           ("nan_on_second", "returned nan for row")):
        with pytest.raises(SystemExit) as stop:  # main's exit: status 1 with this one line
            ddp_grpo.main(args + ["--overwrite", "--max_steps", "2", "--reward", f"{bad}:{function}",
                                  "--reward_weights", "1", "1", "1"])
        message = str(stop.value.code)
        assert message.startswith(f"error: reward {bad}:{function} ") and "\n" not in message, message
        assert said in message and grpo_setup["train"] in message
        assert (out / "ckpt.pt").read_bytes() == saved  # nothing saved over the last good checkpoint
    with pytest.raises(SystemExit, match=f"^error: --reward {re.escape(str(bad))}:nothing: "):
        ddp_grpo.main(args + ["--overwrite", "--reward", f"{bad}:nothing", "--reward_weights", "1", "1", "1"])


def test_prompts_longer_than_the_context_are_counted_and_skipped(grpo_setup, tmp_path, tiny_tokenizer, capsys):
    long_prompt = {"prompt": "加" * 80, "answer": "1"}
    data = write_jsonl(tmp_path / "data.jsonl", [*[json.loads(line) for line in
                                                   Path(grpo_setup["train"]).read_text().splitlines()[:16]],
                                                 long_prompt, long_prompt])
    prompts = ddp_grpo.PromptDataset(str(data), tiny_tokenizer, 64 - 8)  # --max_seq_len - --max_completion_length
    assert len(prompts) == 16 and all(len(p.ids) <= 56 for p in prompts)
    assert f"{data}: skipped 2 prompt(s) longer than 56 tokens" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Multi-turn rollouts with tools (--tools): a tiny model that has learnt to call the calculator (test_tools.py)

TOOL_REWARDS = '''
def used_tool(completions, num_tool_calls, **kw):
    """A call earns 1, a long answer loses a little (so that a group's completions differ)."""
    return [float(n > 0) - min(len(c), 32) / 64 for c, n in zip(completions, num_tool_calls)]
'''


@pytest.fixture(scope="module")
def tool_setup(tmp_path_factory, tiny_texts, one_thread):
    from test_tools import tool_calling_model, tool_tokenizer

    root = tmp_path_factory.mktemp("grpo_tools")
    tokenizer = tool_tokenizer(root, tiny_texts)
    (root / "tool_rewards.py").write_text(TOOL_REWARDS)
    prompts = [{"prompt": f"{a}加5等于多少?", "answer": str(a + 5)} for a in (12, 12, 13, 12, 14, 12, 12, 15)]
    return dict(tokenizer=tokenizer, model=tool_calling_model(root, tokenizer),
                train=str(write_jsonl(root / "train.jsonl", prompts)), reward=f"{root / 'tool_rewards.py'}:used_tool")


TOOL_METRICS = ("loss", "reward", "reward_used_tool", "reward_exact_answer", "completion_len", "truncated", "tool_use")


def tool_args(s: dict, *extra: str) -> list[str]:
    return ["--init_from", s["model"], "--data_path", s["train"], "--val_data_path", "", "--tools", "tools.py",
            "--reward", s["reward"], "--reward", "rewards.py:exact_answer", *QUIET, "--max_seq_len", "256",
            "--max_completion_length", "64", "--max_tool_rounds", "2", "--num_generations", "2", "--batch_size", "2",
            "--learning_rate", "3e-4", "--log_interval", "1", "--save_interval", "100", "--sample_tokens", "0", *extra]


def test_tool_rollouts_train_only_on_the_tokens_the_model_wrote(tool_setup):
    """GRPO's rows for a rollout with a call: the same ids as encode_chat of the conversation (the prompt, the
    call, the tool's result, the answer), and the loss mask equal to encode_chat's assistant mask (shifted for
    next-token targets): the tool result and the template's tool turn are never trained on."""
    from dataset import encode_chat
    from support.inference.rollouts import sample_completions
    from support.inference.tool_loop import load_tools, run_tool_loop

    model, tok, _ = open_model(tool_setup["model"])
    tools = load_tools("tools.py")
    messages = [[{"role": "user", "content": f"{a}加5等于多少?"}] for a in (12, 13)]
    prompts = [encode_chat(tok, m, add_generation_prompt=True, tools=tools.schemas)[0] for m in messages]
    generate = lambda rows, ids, n, r: sample_completions(model.eval(), ids, n, tok.eos_token_id, tok.pad_token_id)
    trajectories = run_tool_loop(generate, prompts, tok, tools, max_new_tokens=64, max_rounds=2)
    assert all(t.num_calls >= 1 and t.messages[1]["role"] == "tool" for t in trajectories)
    x, y, mask = ddp_grpo.training_rows(prompts, [t.ids for t in trajectories], tok.pad_token_id,
                                        [t.generated for t in trajectories])
    for i, (conversation, t) in enumerate(zip(messages, trajectories)):
        ids, want = encode_chat(tok, conversation + t.messages, tools=tools.schemas)
        n = len(prompts[i]) + len(t.ids)  # up to the last reply's EOS (the template's newline follows it)
        assert x[i, : n - 1].tolist() == ids[: n - 1] and y[i, : n - 1].tolist() == ids[1:n]
        assert mask[i, : n - 1].tolist() == want[1:n] and not mask[i, n - 1 :].any()
        result = tok(t.messages[1]["content"], add_special_tokens=False)["input_ids"]
        at = next(j for j in range(n) if ids[j : j + len(result)] == result and j >= len(prompts[i]))
        assert not mask[i, at - 1 : at - 1 + len(result)].any()  # the targets that are the tool's result


def test_tool_rollouts_two_processes_train_like_one(tool_setup, tmp_path):
    """Multi-turn rollouts (each round seeded on its own) on 2 processes x 1 prompt = 1 process x 2 prompts."""
    one = tmp_path / "one"
    ddp_grpo.main(tool_args(tool_setup, "--max_steps", "2", "--out_dir", str(one)))
    assert all(share > 0 for _, share in read_metrics(one, "tool_use"))
    two = run_script("ddp_grpo.py", tool_args(tool_setup, "--max_steps", "2", "--out_dir", str(tmp_path / "two"),
                                              "--batch_size", "1"), nproc=2, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_run(one, tmp_path / "two", 2, TOOL_METRICS)


def test_tool_rollouts_resume_like_an_uninterrupted_run(tool_setup, tmp_path):
    common = tool_args(tool_setup, "--max_steps", "5")
    ddp_grpo.main(common + ["--out_dir", str(tmp_path / "whole")])
    interrupt_then_resume(common, tmp_path / "cut", after_logged=2, steps=5)
    assert_same_run(tmp_path / "whole", tmp_path / "cut", 5, TOOL_METRICS)


def test_no_thinking_prompts_are_what_transformers_renders_with_enable_thinking_false(grpo_setup, tiny_tokenizer):
    """--no_thinking: each prompt is apply_chat_template(..., enable_thinking=False), ending in an empty think block;
    with --tools the tool list comes first, as transformers renders it."""
    from support.inference.tool_loop import load_tools

    schemas = load_tools("tools.py").schemas
    for tools in (None, schemas):
        prompts = ddp_grpo.PromptDataset(grpo_setup["train"], tiny_tokenizer, 1000, tools, enable_thinking=False)
        for p in prompts.items[:3]:
            want = tiny_tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], tools=tools,
                                                      add_generation_prompt=True, enable_thinking=False, tokenize=True)
            assert p.ids == want["input_ids"]
            assert tiny_tokenizer.decode(p.ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_arithmetic_task_holds_out_its_test_problems_and_its_answers_verify(tmp_path):
    from support.data import task_data

    files = task_data.build_arith(str(tmp_path), sft_size=300, rl_size=200, test_size=100)
    sft, rl, test = ([json.loads(line) for line in Path(f).read_text(encoding="utf-8").splitlines()] for f in files)
    assert (len(sft), len(rl), len(test)) == (300, 200, 100)

    def problem(prompt: str) -> tuple:
        a, b = (int(n) for n in re.findall(r"\d+", prompt))
        op = "+" if any(w in prompt for w in ("加", "又")) else "-"
        return (op, *sorted((a, b))) if op == "+" else (op, a, b)

    held_out = {problem(r["prompt"]) for r in test}
    seen = {problem(c["conversations"][0]["content"]) for c in sft} | {problem(r["prompt"]) for r in rl}
    assert not held_out & seen and len(held_out) == 100
    for r in test + rl:
        op, a, b = problem(r["prompt"])
        assert int(r["answer"]) == (a + b if op == "+" else a - b) >= 0
        assert 10 <= min(a, b) and max(a, b) <= 999
    replies = [c["conversations"][1]["content"] for c in sft]
    for reply in replies:  # every step of the working is true arithmetic
        assert all(eval(step.split("=")[0]) == int(step.split("=")[1]) for step in reply.split(";")), reply
    answers = [str(eval(reply.rsplit(";", 1)[1].split("=")[0])) for reply in replies]  # the stated problem
    assert rewards.exact_answer(replies, answer=answers) == [1.0] * 300
    # --think: the same problems, the working as reasoning and the stated answer alone after it
    think_file = task_data.build_arith(str(tmp_path), sft_size=300, rl_size=200, test_size=100, think=True)
    think = [json.loads(line)["conversations"] for line in Path(next(iter(think_file))).read_text().splitlines()]
    assert Path(next(iter(think_file))).name == "arith_think_sft_train.jsonl"
    assert [c[1]["reasoning_content"] + ";" + c[1]["content"] for c in think] == replies
    assert [c[0] for c in think] == [c["conversations"][0] for c in sft]


def test_arithmetic_replies_work_the_columns_units_first():
    from support.data import task_data

    assert task_data.arith_columns(37, "+", 48) == "7+8=15;3+4+1=8"
    assert task_data.arith_columns(12, "+", 988) == "2+8=10;1+8+1=10;0+9+1=10"
    assert task_data.arith_columns(82, "-", 65) == "12-5=7;8-6-1=1"
    assert task_data.arith_columns(100, "-", 1) == "10-1=9;10-0-1=9;1-0-1=0"


def test_arithmetic_task_mix_follows_three_digit_share(tmp_path):
    """The mix a user asks for: share 0 gives two-digit problems only (and says when there are too few of them),
    share 1 three-digit operands only."""
    from support.data import task_data

    def prompt_numbers(share: float) -> list[int]:
        files = task_data.build_arith(str(tmp_path / str(share)), sft_size=200, rl_size=50, test_size=50,
                                         three_digit_share=share)
        records = [json.loads(line) for f in files for line in Path(f).read_text(encoding="utf-8").splitlines()]
        prompts = [r["prompt"] if "prompt" in r else r["conversations"][0]["content"] for r in records]
        return [int(n) for p in prompts for n in re.findall(r"\d+", p)]

    assert all(10 <= n <= 99 for n in prompt_numbers(0.0))
    assert all(100 <= n <= 999 for n in prompt_numbers(1.0))
    with pytest.raises(ValueError, match="not that many distinct problems"):
        task_data.build_arith(str(tmp_path / "big"), sft_size=8_000, rl_size=200, test_size=100,
                                 three_digit_share=0.0)


def test_gsm8k_rows_become_prompts_that_exact_answer_scores(tmp_path):
    from support.data import task_data
    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}]
    records = list(task_data.gsm8k_records(rows, "gsm8k test"))
    assert records == [{"prompt": rows[0]["question"], "answer": rows[0]["answer"]}]
    assert rewards.exact_answer(["The answer is 7.", "8"], answer=[records[0]["answer"]] * 2) == [1.0, 0.0]
    with pytest.raises(ValueError, match="gsm8k test: row 0 is not a GSM8K row"):
        list(task_data.gsm8k_records([{"question": "q", "answer": "no final number"}], "gsm8k test"))
