"""The mixture-of-experts model (k_model.MoEFeedForward) against transformers' MixtralForCausalLM, both ways;
its router losses against transformers' load_balancing_loss_func; and its training: exact kill + resume, 2
processes = 1, one-line errors."""
from __future__ import annotations

import re
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import ddp_pretrain
from k_model import ModelConfig, Transformer
from support.loading.checkpoint import load_checkpoint
from support.loading.sources import open_model
from support.model.grouped_mm import grouped_mm
from support.model.hf_llama import export_hf
from test_train_resume import last_logged_step, saved_step, start, wait_for
from train_helpers import QUIET, TINY_MODEL, make_pretrain_data, read_metrics, run_script

VOCAB = 97
EXPERTS = ["--num_experts", "4", "--num_experts_per_tok", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")

def redrawn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights re-drawn larger than the training init, so routing and greedy tokens are not decided by float
    noise; non-trivial norm gains."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.08)
    return model.eval()


def tiny_moe(**overrides) -> Transformer:
    kw = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64, num_local_experts=4,
              num_experts_per_tok=2, tie_word_embeddings=False)
    return redrawn(Transformer(ModelConfig(**{**kw, **overrides})))


def test_a_mixtral_checkpoint_opens_with_its_logits_and_greedy_tokens(tmp_path):
    """save_pretrained of a MixtralForCausalLM opens through open_model with the same logits, and the KV-cache
    decode gives transformers' greedy tokens."""
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    torch.manual_seed(0)
    redrawn(MixtralForCausalLM(config)).save_pretrained(tmp_path / "mixtral")
    theirs = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    ours = open_model(tmp_path / "mixtral", own_tokenizer=False).model
    assert (ours.config.num_local_experts, ours.config.num_experts_per_tok, ours.config.hidden_dim) == (4, 2, 48)
    tokens = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, atol=1e-4, rtol=0)
    prompt = tokens[:, :8]
    gen = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)[:, 8:]
    assert torch.equal(ours.generate(prompt, 24, temperature=0), expected)


def test_our_moe_exports_as_mixtral(tmp_path):
    """export_hf of our MoE model is a MixtralForCausalLM for AutoModelForCausalLM, with the same logits, and
    the router loss weights ride along in its config."""
    ours = tiny_moe(router_aux_loss_coef=0.02, router_z_loss_coef=0.003)
    export_hf(ours, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs) is MixtralForCausalLM
    assert (theirs.config.router_aux_loss_coef, theirs.config.router_z_loss_coef) == (0.02, 0.003)
    tokens = torch.randint(0, VOCAB, (3, 30))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, atol=1e-4, rtol=0)
    again = open_model(tmp_path, own_tokenizer=False).model
    assert again.config.router_z_loss_coef == 0.003


@pytest.mark.parametrize("hidden", [48, 42])  # 42 float32s: rows not 16-byte aligned, one matmul per expert
def test_grouped_mm_multiplies_each_row_by_its_experts_matrix(hidden):
    torch.manual_seed(0)
    w = torch.randn(4, hidden, 32)
    expert = torch.tensor([0, 0, 2, 2, 2, 3])  # expert 1 gets no rows
    x = torch.randn(len(expert), 32)
    expected = torch.stack([w[e] @ row for e, row in zip(expert, x)])
    torch.testing.assert_close(grouped_mm(x, w, torch.tensor([2, 2, 5, 6])), expected)


def test_router_losses_equal_transformers_and_their_formulas():
    """aux_loss is transformers' load_balancing_loss_func of each layer's router logits (padding left out by
    the attention mask), averaged over the layers; z_loss the mean squared logsumexp; expert_load the share of
    the top-k picks; router_loss their weighted sum, which reaches the router through backward."""
    model = tiny_moe().train()
    tokens = torch.randint(0, VOCAB, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    out = model(tokens, tokens, attention_mask=mask)
    logits = [layer.feed_forward.router_logits for layer in model.layers]
    aux = [load_balancing_loss_func((g,), 4, 2, attention_mask=mask) for g in logits]
    torch.testing.assert_close(out.router_stats["aux_loss"], torch.stack(aux).mean(), atol=1e-6, rtol=0)
    kept = [g[mask.reshape(-1).bool()] for g in logits]
    z = torch.stack([g.logsumexp(-1).pow(2).mean() for g in kept]).mean()
    torch.testing.assert_close(out.router_stats["z_loss"], z.detach())
    for g, load in zip(kept, out.router_stats["expert_load"]):
        picks = torch.bincount(g.topk(2, dim=-1).indices.flatten(), minlength=4)
        torch.testing.assert_close(load, picks / picks.sum())
    torch.testing.assert_close(out.router_loss, 0.01 * torch.stack(aux).mean() + 0.001 * z)
    out.router_loss.backward()
    assert all(layer.feed_forward.gate.weight.grad.abs().sum() > 0 for layer in model.layers)


@pytest.mark.parametrize("kw, message", [
    (dict(num_local_experts=1), "num_local_experts must be 0 (a dense model) or >= 2"),
    (dict(num_local_experts=2, num_experts_per_tok=3), "num_experts_per_tok must be between 1 and"),
    (dict(num_local_experts=4, router_aux_loss_coef=-0.1), "router_aux_loss_coef must be >= 0"),
])
def test_bad_expert_config_is_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, **kw)


@pytest.mark.parametrize("flags, message", [
    (["--num_experts", "4", "--num_experts_per_tok", "5"],
     "--num_experts_per_tok must be between 1 and --num_experts 4"),
    (["--num_experts", "1"], "--num_experts must be 0 (dense) or >= 2, got 1"),
    (["--num_experts", "4", "--router_aux_loss_coef", "-1"], "--router_aux_loss_coef must be >= 0"),
    (["--router_z_loss_coef", "0.1"], "--router_z_loss_coef weighs an MoE model's router loss, and a new model is a "
                                      "dense model"),
])
def test_bad_expert_flags_end_with_one_line(tmp_path, tiny_tokenizer_dir, flags, message):
    with pytest.raises(SystemExit) as e:
        ddp_pretrain.main(["--data_path", str(tmp_path / "none.bin"), "--tokenizer_path", tiny_tokenizer_dir,
                           "--out_dir", str(tmp_path / "run"), *TINY_MODEL, *QUIET, *flags])
    assert str(e.value).startswith(f"error: {message}") and "\n" not in str(e.value)


def test_moe_training_resumes_exactly_after_a_kill(tmp_path, tiny_tokenizer_dir):
    """An MoE run killed (SIGKILL) after a checkpoint and resumed has the uninterrupted run's losses, router
    losses, expert loads and final weights; resuming it as a dense model is refused in one line."""
    train_bin, val_bin = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=150, n_val=10)
    args = ["--data_path", train_bin, "--val_data_path", val_bin, "--tokenizer_path", tiny_tokenizer_dir,
            *TINY_MODEL, *QUIET, *EXPERTS, "--dropout", "0.1", "--batch_size", "4", "--max_steps", "12",
            "--learning_rate", "3e-3", "--warmup_iters", "2", "--log_interval", "1", "--eval_interval", "6",
            "--save_interval", "3", "--sample_tokens", "0"]
    ref, run = tmp_path / "reference", tmp_path / "killed"
    ddp_pretrain.main(args + ["--out_dir", str(ref)])
    proc = start(args + ["--out_dir", str(run)], tmp_path / "run.log")
    wait_for(lambda: saved_step(run) >= 3 and last_logged_step(run) > saved_step(run), proc, tmp_path / "run.log")
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL and saved_step(run) < 12
    with pytest.raises(SystemExit, match="checkpoint was trained with --num_experts 4, this run asks for "
                                         "--num_experts 0"):
        ddp_pretrain.main(args + ["--out_dir", str(run), "--resume", "--num_experts", "0"])
    ddp_pretrain.main(args + ["--out_dir", str(run), "--resume"])
    for metric in ("loss", "aux_loss", "z_loss", "expert_load/1/3", "expert_entropy/0", "val_loss"):
        assert read_metrics(run, metric) == read_metrics(ref, metric), metric
    a, b = torch.load(ref / "ckpt.pt", weights_only=True), torch.load(run / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 12 and a["model_config"]["num_local_experts"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_moe_two_processes_match_one_reading_the_same_micro_batches(tmp_path, tiny_tokenizer_dir, parallel):
    """2 gloo processes (DDP, or FSDP with the stacked experts sharded along the expert dimension) x 2 samples
    x 2 accumulation steps train like 1 process x 2 samples x 4 accumulation steps: the same micro-batches,
    each with its own router loss (as Mixtral computes it), so the same weights within 1e-5 and the same
    logged losses and expert loads."""
    train_bin, val_bin = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=120, n_val=10)
    common = ["--data_path", train_bin, "--val_data_path", val_bin, "--tokenizer_path", tiny_tokenizer_dir,
              *TINY_MODEL, *QUIET, *EXPERTS, "--max_steps", "4", "--learning_rate", "3e-3", "--warmup_iters", "1",
              "--log_interval", "1", "--eval_interval", "4", "--batch_size", "2", "--sample_tokens", "0"]
    two = run_script("ddp_pretrain.py", common + ["--out_dir", str(tmp_path / "ddp"), "--accumulation_steps", "2",
                                                  "--parallel", parallel], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    ddp_pretrain.main(common + ["--out_dir", str(tmp_path / "one"), "--accumulation_steps", "4"])
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "ddp")
    assert b["world_size"] == 2 and a["data_position"] == b["data_position"]
    for key, weight in a["model"].items():
        torch.testing.assert_close(b["model"][key], weight, atol=1e-5, rtol=0, msg=key)
    for metric in ("loss", "aux_loss", "expert_load/0/0", "val_loss"):
        ref, got = read_metrics(tmp_path / "one", metric), read_metrics(tmp_path / "ddp", metric)
        assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=1e-5), metric


def test_every_stage_trains_an_moe_model_and_exports_mixtral(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    """Pretraining, SFT (full and LoRA), DPO and GRPO each train an MoE model (the weights they train move,
    LoRA's base and experts stay) and leave an hf/ export that transformers opens as MixtralForCausalLM with
    the logits of the run's own checkpoint."""
    from test_dpo import dialogue_pairs, write_pairs
    from test_grpo import REWARD_FILE, arith_prompts
    from train_helpers import make_sft_data

    import ddp_dpo
    import ddp_grpo
    import ddp_sft_full

    train_bin, _ = make_pretrain_data(tmp_path, tiny_tokenizer_dir, n_train=40, n_val=4)
    sft_train, _ = make_sft_data(tmp_path, n_train=16, n_val=2)
    common = ["--tokenizer_path", tiny_tokenizer_dir, *QUIET, "--val_data_path", "", "--max_steps", "2",
              "--batch_size", "4", "--learning_rate", "3e-3", "--log_interval", "1", "--sample_tokens", "0",
              "--max_seq_len", "32"]
    stages = {
        "pretrain": (ddp_pretrain.main, ["--data_path", train_bin, *TINY_MODEL, *EXPERTS]),
        "sft": (ddp_sft_full.main, ["--init_from", "pretrain", "--data_path", sft_train]),
        "lora": (ddp_sft_full.main, ["--init_from", "pretrain", "--data_path", sft_train, "--lora_r", "4"]),
        "dpo": (ddp_dpo.main, ["--init_from", "sft", "--data_path",
                               write_pairs(tmp_path / "pairs.jsonl", dialogue_pairs(8))]),
        "grpo": (ddp_grpo.main, ["--init_from", "sft", "--data_path", arith_prompts(tmp_path / "p.jsonl", 8),
                                 "--reward", f"{tmp_path / 'spread.py'}:digits", "--num_generations", "4",
                                 "--max_completion_length", "4"]),
    }
    (tmp_path / "spread.py").write_text(REWARD_FILE)  # a reward random completions spread over: advantages != 0
    ids = torch.tensor([tiny_tokenizer.encode("你好, hello")])
    for name, (main, flags) in stages.items():
        flags = [str(tmp_path / f) if i and flags[i - 1] == "--init_from" else f for i, f in enumerate(flags)]
        main(common + flags + ["--out_dir", str(tmp_path / name)])
        model = open_model(tmp_path / name / "ckpt.pt", own_tokenizer=False).model.eval()
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / name / "hf", dtype=torch.float32)
        assert isinstance(hf, MixtralForCausalLM), name
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0, msg=name)
    state = {n: load_checkpoint(tmp_path / n)["model"] for n in ("pretrain", "sft", "dpo", "grpo")}
    for before, after in (("pretrain", "sft"), ("sft", "dpo"), ("sft", "grpo")):
        for key in ("layers.0.feed_forward.w13", "layers.0.feed_forward.gate.weight", "layers.0.attention.wo.weight"):
            assert not torch.equal(state[before][key], state[after][key]), (after, key)
    lora = open_model(tmp_path / "lora" / "ckpt.pt", own_tokenizer=False).model
    merged = {k.replace("base_layer.", ""): v for k, v in lora.state_dict().items()}
    assert torch.equal(merged["layers.0.feed_forward.w13"], state["pretrain"]["layers.0.feed_forward.w13"])
