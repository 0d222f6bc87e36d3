"""The training loop in one process: it learns, SFT learns only from answer tokens, the data order shards
cleanly, bad checkpoints and diverging runs fail clearly, and the HF export opens with transformers.
Multi-process behaviour: test_train_ddp.py (DDP) and test_train_resume.py (kill and resume)."""
from __future__ import annotations

import copy
import json
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import ddp_pretrain
import ddp_sft_full
from support.training import optim
import train_tokenizer
from support.training import train_task
import trainer
from support.training import trainer_utils
from support.loading.checkpoint import load_checkpoint
from dataset import SFTDataset
from k_model import ModelConfig, Transformer
from support.loading.sources import open_model, tokenizer_fingerprint
from train_helpers import QUIET, TINY_MODEL, make_pretrain_data, make_sft_data, read_metrics, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("train_data")
    train_bin, val_bin = make_pretrain_data(root, tiny_tokenizer_dir)
    sft_train, sft_val = make_sft_data(root)
    return SimpleNamespace(tok=tiny_tokenizer_dir, train_bin=train_bin, val_bin=val_bin,
                           sft_train=sft_train, sft_val=sft_val)


def pretrain_args(data, out_dir, *extra: str) -> list[str]:
    return ["--data_path", data.train_bin, "--val_data_path", data.val_bin, "--tokenizer_path", data.tok,
            "--out_dir", str(out_dir), *TINY_MODEL, *QUIET, "--batch_size", "8", "--warmup_iters", "2",
            "--log_interval", "1", *extra]


def sft_args(data, out_dir, init_from, *extra: str) -> list[str]:
    return ["--data_path", data.sft_train, "--val_data_path", data.sft_val, "--tokenizer_path", data.tok,
            "--out_dir", str(out_dir), "--init_from", str(init_from), *QUIET, "--batch_size", "4",
            "--max_seq_len", "32", "--log_interval", "1", *extra]


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """A 150-step pretraining run on People's Daily text (~5 s)."""
    out = tmp_path_factory.mktemp("pretrain")
    ddp_pretrain.main(pretrain_args(data, out, "--dim", "64", "--batch_size", "16", "--max_steps", "150",
                                    "--learning_rate", "1e-2", "--warmup_iters", "10", "--log_interval", "10",
                                    "--eval_interval", "75", "--save_interval", "50"))
    return out


def test_pretraining_beats_the_unigram_model(data, pretrained):
    vocab = len(AutoTokenizer.from_pretrained(data.tok))
    train_tokens, val_tokens = (np.fromfile(p, dtype=np.uint16) for p in (data.train_bin, data.val_bin))
    counts = np.bincount(train_tokens, minlength=vocab) + 1  # add-one smoothed unigram of the training data
    unigram_ce = float(-np.log(counts[val_tokens] / counts.sum()).mean())

    losses, val = read_metrics(pretrained), read_metrics(pretrained, "val_loss")
    assert losses[0][1] > math.log(vocab) - 0.5  # starts near uniform
    assert [step for step, _ in val] == [75, 150]
    # a context-free predictor cannot go below unigram_ce on held-out text; the model must use context
    assert val[-1][1] < unigram_ce - 0.1, (val, unigram_ce)
    log = (pretrained / "train.log").read_text(encoding="utf-8")
    assert "val ppl" in log and "tok/s" in log and "saved" in log


def test_each_evaluation_logs_a_greedy_sample_and_the_run_draws_its_curves(pretrained):
    samples = read_metrics(pretrained, "samples")
    assert [step for step, _ in samples] == [75, 150]
    ours, _, _ = open_model(pretrained, own_tokenizer=False)
    tok = AutoTokenizer.from_pretrained(pretrained / "hf")
    prompt = "本报北京1月1日讯"  # the pretraining script's default --sample_prompt
    ids = torch.tensor([[tok.eos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
    greedy = ours.generate(ids, 32, temperature=0.0, stop_id=tok.eos_token_id)[0].tolist()
    assert samples[-1][1] == {prompt: tok.decode(greedy, skip_special_tokens=True)}  # the final weights' sample
    log = (pretrained / "train.log").read_text(encoding="utf-8")
    assert f"sample step 150 | {prompt!r} -> {samples[-1][1][prompt]!r}" in log
    assert (pretrained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hf_export_opens_with_transformers(pretrained):
    hf_dir = pretrained / "hf"
    hf = AutoModelForCausalLM.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ours, _, info = open_model(pretrained, own_tokenizer=False)
    assert info["step"] == 150 and info["format"] == "ckpt"
    assert tokenizer_fingerprint(tok) == info["tokenizer_fingerprint"]
    assert hf.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("人民日报：今天的新闻。", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)


def test_sft_gradients_come_only_from_masked_positions(data):
    tok = AutoTokenizer.from_pretrained(data.tok)
    ds = SFTDataset(data.sft_train, tok, max_length=48)
    micro = [train_task.collate_trimmed([ds[i] for i in idx]) for idx in ([0, 1, 2], [3, 4, 5])]
    assert all(0 < m.sum() < m.numel() for _, _, m in micro)  # prompts and padding are unmasked
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(tok), max_seq_len=64))

    # reference: transformers-style labels (-100 where the mask is 0), one mean over both micro-batches,
    # one plain SGD step (lr 1: new weight = weight - gradient)
    ref = copy.deepcopy(model)
    total = sum(F.cross_entropy(ref(x).logits.flatten(0, 1), torch.where(m.bool(), y, -100).flatten(),
                                reduction="sum") for x, y, m in micro)
    (total / sum(m.sum() for _, _, m in micro)).backward()
    expected = {name: (p - p.grad).detach() for name, p in ref.named_parameters()}

    # unmasked targets replaced by noise: if they reached the gradient, the step would differ
    noisy = [(x, torch.where(m.bool(), y, torch.randint_like(y, len(tok))), m) for x, y, m in micro]
    trainer.train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), torch.amp.GradScaler("cpu", enabled=False),
                       noisy, device=torch.device("cpu"), autocast=nullcontext, grad_clip=0.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_sft_starts_identically_from_checkpoint_or_hf_export(data, pretrained, tmp_path):
    ddp_sft_full.main(sft_args(data, tmp_path / "a", pretrained, "--max_steps", "3"))
    ddp_sft_full.main(sft_args(data, tmp_path / "b", pretrained / "hf", "--max_steps", "3"))
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [s for s, _ in a] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-6)
    assert read_metrics(tmp_path / "a", "val_loss")  # sft_val.jsonl was evaluated
    state = load_checkpoint(tmp_path / "a")
    assert state["args"]["init_from"] == str(pretrained) and state["args"]["max_seq_len"] == 32
    assert state["model_config"]["dropout"] == 0.0  # inherited from the pretrained model
    assert (tmp_path / "a" / "hf" / "model.safetensors").is_file()
    # --dropout rebuilds the model around the pretrained weights
    ddp_sft_full.main(sft_args(data, tmp_path / "c", pretrained, "--max_steps", "1", "--dropout", "0.2"))
    assert load_checkpoint(tmp_path / "c")["model_config"]["dropout"] == 0.2
    assert read_metrics(tmp_path / "c")[0][1] != a[0][1]  # same weights and data, but dropout is on


def test_step_sampler_shards_the_global_batch():
    n, B, W, A = 50, 3, 2, 2
    single = list(trainer_utils.StepSampler(n, B * W, A, rank=0, world_size=1, seed=7, epoch=1, start=0))
    ranks = [list(trainer_utils.StepSampler(n, B, A, rank=r, world_size=W, seed=7, epoch=1, start=0)) for r in range(W)]
    assert single == [r0 + r1 for r0, r1 in zip(*ranks)]  # a micro-batch = the ranks' shares side by side
    flat = [i for batch in single for i in batch]
    assert len(set(flat)) == len(flat) == (n // (B * W * A)) * B * W * A
    resumed = trainer_utils.StepSampler(n, B * W, A, rank=0, world_size=1, seed=7, epoch=1, start=2 * B * W * A)
    assert list(resumed) == single[2 * A :]
    other_epoch = list(trainer_utils.StepSampler(n, B * W, A, rank=0, world_size=1, seed=7, epoch=2, start=0))
    assert other_epoch != single


def test_group_by_length_reads_every_sample_once_in_steps_of_alike_lengths():
    """--group_by_length: each epoch still reads every sample once, in the same order whatever the batch size
    or process count (so a resumed run with others reads exactly the rest), and a step's samples are alike."""
    n, block = 500, 128
    sizes = np.random.default_rng(0).integers(10, 1000, n)
    order = trainer_utils.epoch_order(n, 7, 1, sizes, block).tolist()
    assert sorted(order) == list(range(n))
    assert order != trainer_utils.epoch_order(n, 7, 2, sizes, block).tolist()
    assert trainer_utils.epoch_order(n, 7, 1).tolist() != order  # 0 = off: the plain shuffle

    def steps(batch, world, start=0):  # each step's global batch: the ranks' shares side by side
        shares = [list(trainer_utils.StepSampler(n, batch, 1, r, world, 7, 1, start, sizes, block))
                  for r in range(world)]
        return [sum(parts, []) for parts in zip(*shares)]

    single = steps(8, 1)
    assert single == steps(4, 2)  # two processes read the global batch of one
    assert sum(single, []) == order[: len(single) * 8]
    # resumed at sample 40 with a global batch of 12 instead of 8: the rest of the same order
    assert sum(steps(12, 1, start=40), []) == order[40 : 40 + (n - 40) // 12 * 12]

    def spread(batches):  # the mean spread of sizes within a step
        return np.mean([np.ptp(sizes[b]) for b in batches])

    plain = list(trainer_utils.StepSampler(n, 8, 1, 0, 1, 7, 1, 0))
    assert spread(single) < spread(plain) / 5


def test_group_by_length_batches_hold_less_padding(data, pretrained, tmp_path):
    """SFT batches grouped by length read fewer tokens after trimming, for the same samples; a run with the
    flag says so; pretraining windows have no lengths to group by, which is said."""
    ds = SFTDataset(data.sft_train, AutoTokenizer.from_pretrained(data.tok), max_length=64)

    def tokens_read(group):
        sampler = trainer_utils.StepSampler(len(ds), 4, 1, 0, 1, 7, 0, 0, ds.sizes(), group)
        return sum(train_task.collate_trimmed([ds[i] for i in batch])[0].numel() for batch in sampler)

    assert tokens_read(64) < 0.9 * tokens_read(0)
    ddp_sft_full.main(sft_args(data, tmp_path / "s", pretrained, "--max_steps", "2", "--group_by_length", "64"))
    assert "grouped by length in blocks of 64" in (tmp_path / "s" / "train.log").read_text()
    with pytest.raises(SystemExit, match="--group_by_length: the samples of .*train.bin .PretrainDataset. have no"):
        ddp_pretrain.main(pretrain_args(data, tmp_path / "p", "--max_steps", "1", "--group_by_length", "16"))


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    lrs = [optim.lr_at(s, 1e-3, warmup=10, total=100) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[100] == pytest.approx(1e-4) and lrs[55] == pytest.approx(0.55e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


@dataclass
class NotATensor:
    payload: str


def test_bad_checkpoints_name_the_file_and_key(data, pretrained, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_model(tmp_path / "nowhere", own_tokenizer=False)
    good = (pretrained / "ckpt.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated.pt: not a readable checkpoint"):
        open_model(tmp_path / "truncated.pt", own_tokenizer=False)
    state = torch.load(pretrained / "ckpt.pt", weights_only=True)
    torch.save({**state, "extra": NotATensor("runs code on load")}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="pickle.pt: not a readable checkpoint"):  # weights_only refuses it
        open_model(tmp_path / "pickle.pt", own_tokenizer=False)
    torch.save({k: v for k, v in state.items() if k != "model_config"}, tmp_path / "nocfg.pt")
    with pytest.raises(ValueError, match=r"nocfg.pt: checkpoint is missing key\(s\) \['model_config'\]"):
        open_model(tmp_path / "nocfg.pt", own_tokenizer=False)
    torch.save({**state, "model_config": {**state["model_config"], "n_layers": 3}}, tmp_path / "layers.pt")
    with pytest.raises(ValueError, match=r"layers.pt: weights do not match model_config: missing keys \['layers.2"):
        open_model(tmp_path / "layers.pt", own_tokenizer=False)

    # resuming with another architecture
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(good)
    mismatch = r"^error: .*ckpt.pt: checkpoint was trained with --dim 64, this run asks for --dim 32"
    with pytest.raises(SystemExit, match=mismatch):
        ddp_pretrain.main(pretrain_args(data, tmp_path / "run", "--resume"))
    # fine-tuning with a different tokenizer than the model was trained with
    other_tok = tmp_path / "other_tokenizer"
    train_tokenizer.save_tokenizer(train_tokenizer.build_tokenizer(iter(["另一个分词器 another tokenizer"] * 50),
                                                                   vocab_size=300), str(other_tok))
    mismatch = r"^error: .*ckpt.pt: model vocab_size=1000 but the tokenizer at .*other_tokenizer has"
    with pytest.raises(SystemExit, match=mismatch):
        ddp_sft_full.main(sft_args(data, tmp_path / "sft", pretrained, "--tokenizer_path", str(other_tok)))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    ddp_pretrain.main(pretrain_args(data, out, "--max_steps", "4", "--save_interval", "2"))
    good = torch.load(out / "ckpt.pt", weights_only=True)
    # an absurd learning rate: the weights blow up at step 5 and the loss of step 6 is not finite
    with pytest.raises(SystemExit) as exit_info:
        ddp_pretrain.main(pretrain_args(data, out, "--max_steps", "12", "--save_interval", "2", "--resume",
                                        "--learning_rate", "1e30"))
    message = str(exit_info.value.code)
    assert re.search(r"nan/inf at step 6: stopping, kept the last good checkpoint .*ckpt.pt \(step 4\)", message)
    kept = load_checkpoint(out)
    assert kept["step"] == 4
    assert all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])
    assert "nan/inf at step 6" in (out / "train.log").read_text(encoding="utf-8")


def test_swanlab_logs_offline(data, tmp_path):
    out = tmp_path / "run"
    ddp_pretrain.main(pretrain_args(data, out, "--max_steps", "2", "--use_swanlab"))
    assert list((out / "swanlog").glob("run-*")), "swanlab offline mode wrote no run directory"


def test_fresh_run_refuses_to_replace_an_existing_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    ddp_pretrain.main(pretrain_args(data, out, "--max_steps", "2"))
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt already exists: --resume continues that run, --overwrite"):
        ddp_pretrain.main(pretrain_args(data, out, "--max_steps", "4"))
    assert (out / "ckpt.pt").read_bytes() == before  # the earlier run is untouched
    first_log = (out / "train.log").read_text(encoding="utf-8")
    ddp_pretrain.main(pretrain_args(data, out, "--max_steps", "3", "--overwrite"))
    assert load_checkpoint(out)["step"] == 3
    # the new run has a log of its own (the report card times a run from it); the old one is kept beside it
    log = (out / "train.log").read_text(encoding="utf-8")
    assert log.count("=== pretrain") == 1 and "--overwrite: starting fresh" in log
    assert (out / "train.log.prev").read_text(encoding="utf-8") == first_log


def test_bf16_checkpoint_trains_float32_master_weights(data, pretrained, tmp_path):
    bf16_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(pretrained / "hf").to(torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(pretrained / "hf").save_pretrained(bf16_dir)
    start = AutoModelForCausalLM.from_pretrained(bf16_dir)
    assert start.dtype == torch.bfloat16  # transformers loads the file's dtype
    ddp_sft_full.main(sft_args(data, tmp_path / "sft", bf16_dir, "--max_steps", "2", "--learning_rate", "1e-5",
                               "--warmup_iters", "0"))
    state = load_checkpoint(tmp_path / "sft")
    assert {t.dtype for t in state["model"].values()} == {torch.float32}
    assert {t.dtype for s in state["optimizer"]["state"].values() for t in s.values() if t.dim()} == {torch.float32}
    # in bf16 most of these tiny updates would round away; in float32 every element moves
    before = start.model.layers[0].self_attn.q_proj.weight.float()
    after = state["model"]["layers.0.attention.wqkv.weight"][: before.shape[0]]
    assert (after != before).float().mean() > 0.99
    assert "stores bfloat16 weights: training float32 master weights" in (tmp_path / "sft" / "train.log").read_text()


def test_sft_answers_cut_off_by_max_seq_len_are_counted_or_refused(data, pretrained, tmp_path):
    tok = AutoTokenizer.from_pretrained(data.tok)
    long_prompt = "人民日报报道了今天的经济新闻和国际新闻。" * 8  # far beyond 32 tokens
    convs = [[{"role": "user", "content": long_prompt if i % 3 == 0 else f"问题{i}"},
              {"role": "assistant", "content": f"回答{i}"}] for i in range(48)]

    def has_target(messages: list[dict], max_len: int) -> bool:  # the template's oracle: the answer starts in time
        prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True)["input_ids"]
        return len(prompt) <= max_len

    expected = sum(not has_target(c, 32) for c in convs)
    assert expected == 16
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"conversations": c} for c in convs])
    out = tmp_path / "mixed_run"
    ddp_sft_full.main(sft_args(data, out, pretrained, "--data_path", str(mixed), "--max_steps", "3"))
    assert f"{expected} of its 48 samples (33.3%) have no target token within --max_seq_len 32" in \
        (out / "train.log").read_text(encoding="utf-8")
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert all(json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}")) for line in lines)

    cut = write_jsonl(tmp_path / "cut.jsonl", [{"conversations": c} for c in convs if not has_target(c, 32)])
    with pytest.raises(SystemExit, match=r"cut.jsonl: none of its 16 samples has a target token within "
                                         r"--max_seq_len 32 \(every answer is cut off\)"):
        ddp_sft_full.main(sft_args(data, tmp_path / "cut_run", pretrained, "--data_path", str(cut)))
    assert not (tmp_path / "cut_run" / "hf").exists()
