"""RoPE scaling (linear, dynamic NTK, yarn, llama3): HF Llama checkpoints that transformers itself builds load with
its logits at lengths below and above their original context, and export back to the same config; the trainer's
--rope_scaling flags stretch a model's context for a fine-tune, save the scaling in the checkpoint and the HF
export, and keep it when the run resumes; bad flag combinations are one line naming the flag."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import ddp_pretrain
import ddp_sft_full
from dataset import PretrainDataset
from k_model import ModelConfig
from support.model.hf_llama import export_hf, to_hf_llama
from support.loading.sources import open_model
from test_bench import run_bench
from test_hf_init import VOCAB, save_llama
from train_helpers import QUIET, TINY_MODEL, make_pretrain_data, make_sft_data

THETA = {"rope_theta": 500.0}  # a small base: more of the frequencies fall where each scaling changes them
# name -> (LlamaConfig overrides, sequence lengths to compare: below, then above, the original context)
CASES = {
    "linear": (dict(max_position_embeddings=64, rope_parameters={"rope_type": "linear", "factor": 2.0, **THETA}),
               [20, 64]),
    # dynamic reads its original context from max_position_embeddings and grows past it: our window is 2 x 32
    "dynamic": (dict(max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "factor": 2.0, **THETA}),
                [20, 50, 64]),
    "yarn": (dict(max_position_embeddings=256, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, **THETA}), [40, 200]),
    "yarn_mscale_betas_untruncated": (dict(max_position_embeddings=256, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2,
        "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False, **THETA}), [40, 200]),
    # Llama-3.2-shaped at tiny width: llama3 rope with its factors, tied embeddings, head_dim 64 (2 x 64 != 64 wide)
    "llama3_llama32_shape": (dict(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=256, rope_parameters={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}), [48, 160]),
}


def as_written_before_v5(path, rope_scaling: dict | None = None) -> None:
    """config.json as checkpoints for transformers 4 store it (Llama 3.x among them): rope_scaling (default: the
    rope_parameters less rope_theta) and a top-level rope_theta, which transformers 5 maps to rope_parameters."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope_scaling or rope
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name", CASES)
def test_logits_equal_transformers_below_and_above_the_original_context_and_the_export_round_trips(tmp_path, name):
    overrides, lengths = CASES[name]
    save_llama(tmp_path / "llama", **overrides)
    if name.startswith("llama3"):
        as_written_before_v5(tmp_path / "llama")
    ours, _, _ = open_model(tmp_path / "llama", own_tokenizer=False)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    export_hf(ours, tmp_path / "export")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert again.config.rope_parameters == theirs.config.rope_parameters
    assert again.config.max_position_embeddings == theirs.config.max_position_embeddings
    torch.manual_seed(0)
    with torch.no_grad():
        for T in lengths:  # increasing, so that transformers' dynamic scaling only grows, as in generation
            tokens = torch.randint(0, VOCAB, (2, T))
            logits = ours(tokens).logits
            torch.testing.assert_close(logits, theirs(tokens).logits, atol=1e-4, rtol=0, msg=f"length {T}")
            torch.testing.assert_close(again(tokens).logits, logits, atol=1e-4, rtol=0, msg=f"export, length {T}")


@pytest.mark.parametrize("rope_scaling, lengths", [
    # the spelling before transformers 4.45 (LongChat, Vicuna-16k): transformers copies type to rope_type
    ({"type": "linear", "factor": 2.0}, [20, 32]),
    # dynamic takes its original context from max_position_embeddings (32), whatever else the config says
    ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}, [20, 50]),
])
def test_rope_scaling_spellings_transformers_accepts_load_with_its_logits(tmp_path, rope_scaling, lengths):
    save_llama(tmp_path, max_position_embeddings=32, rope_parameters={"rope_type": "default", **THETA})
    as_written_before_v5(tmp_path, rope_scaling)
    ours, _, _ = open_model(tmp_path, own_tokenizer=False)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for T in lengths:
            tokens = torch.randint(0, VOCAB, (2, T))
            torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, atol=1e-4, rtol=0, msg=f"length {T}")


def transformers_greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    """The n tokens LlamaForCausalLM.generate gives greedily after prompt (T,). A fresh copy each call: its
    dynamic frequencies carry over from one call to the next."""
    hf = to_hf_llama(model).eval()
    out = hf.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], max_new_tokens=n, do_sample=False,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_dynamic_rope_generates_transformers_greedy_tokens_alone_batched_and_served():
    """transformers' generate keeps the original frequencies up to the original context (16 here) and grows
    them past it one step at a time: the prompt takes those of its length, each new token those of the sequence
    it ends, and cached keys keep the ones they were rotated with. Prompts inside the original context, crossing
    it while generating and longer than it get its greedy tokens from generate alone, from a left-padded batch
    (each row its own frequencies, as alone; transformers' batched generate would give every row the longest
    row's) and through serve.py's engine (rows prefilled alone, then decoded side by side)."""
    from test_context_shift import engine_logits
    from test_model import left_pad, tiny

    dynamic = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16}
    model = tiny(max_seq_len=64, rope_scaling_params=dynamic, **THETA)
    torch.manual_seed(1)
    prompts = [torch.randint(1, model.config.vocab_size, (n,)) for n in (12, 3, 20, 15)]
    expected = [transformers_greedy(model, p, 24) for p in prompts]
    for p, tokens in zip(prompts, expected):
        assert model.generate(p[None], 24, temperature=0)[0].tolist() == tokens, f"prompt of {len(p)}"
    idx, mask = left_pad(prompts)
    assert model.generate(idx, 24, temperature=0, attention_mask=mask).tolist() == expected
    with torch.no_grad():
        steps = engine_logits(model, [p.tolist() for p in prompts], torch.tensor(expected)[:, :-1], 8, 0)
    assert torch.stack([logits.argmax(-1) for logits in steps], 1).tolist() == expected


@pytest.mark.parametrize("scaling, named", [
    ({"rope_type": "longrope", "factor": 2.0}, "rope_type 'longrope' is not supported"),
    ({"rope_type": "linear", "factor": 0.5}, "factor must be a number >= 1"),
    ({"rope_type": "yarn", "factor": 4.0}, r"missing \['original_max_position_embeddings'\]"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 8}, r"not used \['beta_fast'\]"),
])
def test_a_scaling_the_model_cannot_compute_is_refused_by_name(scaling, named):
    with pytest.raises(ValueError, match=f"^ModelConfig.rope_scaling_params: .*{named}"):
        ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, rope_scaling_params=scaling)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny model pretrained at context 32, then fine-tuned 2 steps with --rope_scaling yarn --rope_factor 4."""
    root = tmp_path_factory.mktemp("rope_runs")
    train_bin, val_bin = make_pretrain_data(root, tiny_tokenizer_dir, n_train=300, n_val=40)
    common = ["--data_path", train_bin, "--val_data_path", val_bin, "--tokenizer_path", tiny_tokenizer_dir, *QUIET,
              "--batch_size", "4", "--warmup_iters", "1", "--log_interval", "1", "--sample_tokens", "0"]
    ddp_pretrain.main(common + [*TINY_MODEL, "--max_steps", "3", "--out_dir", str(root / "base")])
    long = common + ["--init_from", str(root / "base"), "--rope_scaling", "yarn", "--rope_factor", "4",
                     "--out_dir", str(root / "long")]
    ddp_pretrain.main(long + ["--max_steps", "2"])
    return root, common, long


def test_the_long_context_bench_reports_each_row_and_the_tuned_loss_transformers_gives(runs):
    root, common, _ = runs
    val_bin = common[common.index("--val_data_path") + 1]
    out = run_bench("bench_long_context.py", "--base", str(root / "base"), "--tuned", str(root / "long"),
                    "--control", str(root / "base"), "--val", val_bin)
    rows = dict(re.findall(r"^\| (.+?) +\| +([\d.]+) \| +[\d.]+ \|$", out, re.M))
    assert list(rows) == ["base, pieces of 32", "base, plain RoPE at 128", "base + yarn x4, untrained",
                          "yarn x4 fine-tune at 128", "control: fine-tune at 32, pieces"], out
    assert rows["control: fine-tune at 32, pieces"] == rows["base, pieces of 32"]  # the same model, read alike
    hf = AutoModelForCausalLM.from_pretrained(root / "long" / "hf").eval()
    val = PretrainDataset(val_bin, max_length=128)
    x, y = (torch.stack([val[i][k] for i in range(len(val))]) for k in (0, 1))
    with torch.no_grad():
        logits = hf(x).logits
    assert float(rows["yarn x4 fine-tune at 128"]) == pytest.approx(
        F.cross_entropy(logits.transpose(1, 2), y).item(), abs=1e-3)


def test_a_rope_scaled_fine_tune_trains_at_the_longer_context_and_saves_the_scaling(runs):
    root, _, _ = runs
    state = torch.load(root / "long" / "ckpt.pt", weights_only=True)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert state["model_config"]["rope_scaling_params"] == yarn
    assert state["model_config"]["max_seq_len"] == state["args"]["max_seq_len"] == 128
    hf_config = json.loads((root / "long" / "hf" / "config.json").read_text())
    assert hf_config["rope_parameters"] == {**yarn, "rope_theta": 10000.0}
    assert hf_config["max_position_embeddings"] == 128
    # transformers runs the export with the same positions as our checkpoint, past the original context
    ours, _, _ = open_model(root / "long", own_tokenizer=False)
    theirs = AutoModelForCausalLM.from_pretrained(root / "long" / "hf").eval()
    tokens = torch.randint(0, ours.config.vocab_size, (1, 128))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens).logits, theirs(tokens).logits, atol=1e-4, rtol=0)


def test_a_resumed_rope_scaled_run_keeps_its_scaling(runs):
    root, _, long = runs
    ddp_pretrain.main(long + ["--max_steps", "4", "--resume"])
    state = torch.load(root / "long" / "ckpt.pt", weights_only=True)
    assert state["step"] == 4
    assert state["model_config"]["rope_scaling_params"]["factor"] == 4.0
    assert state["model_config"]["max_seq_len"] == state["args"]["max_seq_len"] == 128
    with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt: checkpoint was trained with --rope_factor 4.0"):
        ddp_pretrain.main(long + ["--max_steps", "6", "--resume", "--rope_factor", "2"])


def test_lora_sft_at_a_longer_context_keeps_the_scaling_through_resume_and_export(runs):
    """LoRA adapters attach to the stretched model; a LoRA checkpoint reopens its base from --init_from, and
    must stretch it again."""
    root, _, _ = runs
    sft_train, sft_val = make_sft_data(root, n_train=32, n_val=8)
    args = ["--data_path", sft_train, "--val_data_path", sft_val, "--init_from", str(root / "base"), *QUIET,
            "--batch_size", "4", "--lora_r", "4", "--rope_scaling", "linear", "--rope_factor", "2",
            "--log_interval", "1", "--sample_tokens", "0", "--out_dir", str(root / "lora")]
    ddp_sft_full.main(args + ["--max_steps", "2"])
    ddp_sft_full.main(args + ["--max_steps", "3", "--resume"])
    resumed, _, _ = open_model(root / "lora" / "ckpt.pt", own_tokenizer=False)
    assert resumed.config.rope_scaling_params == {"rope_type": "linear", "factor": 2.0}
    assert resumed.config.max_seq_len == 64
    hf_config = json.loads((root / "lora" / "hf" / "config.json").read_text())
    assert hf_config["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


@pytest.mark.parametrize("flags, named", [
    (["--rope_factor", "4"], "--rope_factor applies to --rope_scaling linear / dynamic / yarn / llama3, which is not"),
    (["--rope_scaling", "yarn"], "--rope_scaling yarn needs --rope_factor"),
    (["--rope_scaling", "yarn", "--rope_factor", "0.5"], "--rope_factor must be >= 1"),
    (["--rope_scaling", "linear", "--rope_factor", "2", "--rope_beta_fast", "16"],
     "--rope_beta_fast applies to --rope_scaling yarn, not linear"),
    (["--rope_scaling", "yarn", "--rope_factor", "2"], "already has rope scaling"),  # --init_from a scaled model
])
def test_bad_rope_flags_are_one_line_naming_the_flag(runs, flags, named):
    root, common, _ = runs
    with pytest.raises(SystemExit, match=f"^error: .*{named}"):
        ddp_pretrain.main(common + ["--init_from", str(root / "long"), "--out_dir", str(root / "bad"), *flags])


def test_an_unknown_rope_type_is_refused_by_the_parser(runs, capsys):
    _, common, _ = runs
    with pytest.raises(SystemExit):
        ddp_pretrain.main(common + ["--rope_scaling", "longrope", "--rope_factor", "2"])
    assert "--rope_scaling: invalid choice: 'longrope'" in capsys.readouterr().err


def test_the_context_shift_re_rotates_yarn_keys_where_transformers_puts_them():
    """Past the window, cached keys are re-rotated with the model's own tables, which under yarn carry the
    attention factor (rope_cos[0] != 1): every step equals LlamaForCausalLM on the whole sequence, each token
    attending to what the cache held when it was fed."""
    from test_context_shift import WINDOW, Kept, assert_steps_follow, batch, cached_logits
    from test_model import tiny

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": WINDOW // 4}
    model = tiny(n_layers=2, max_seq_len=WINDOW, rope_scaling_params=yarn)
    assert model.rope_cos[0, 0] > 1  # the attention factor is in the tables
    hf = to_hf_llama(model).eval()
    prompts, idx, mask = batch([5, 13])
    feed = torch.randint(0, model.config.vocab_size, (2, 24))
    kept = Kept(prompts, WINDOW, shift=5, keep=0)
    with torch.no_grad():
        assert_steps_follow(cached_logits(model, idx, mask, feed, shift=5, keep=0), hf, kept, feed, "masked")
    assert len(kept.seqs[1]) > 2 * WINDOW
