"""LoRA SFT (lora.py through ddp_sft_full.py): only the adapters train and the checkpoint holds only them; the
exports reproduce the logits training computes, through transformers and peft themselves (the merged
LlamaForCausalLM, and PeftModel on the base); DDP with 2 processes = 1 process; FSDP (the base sharded too)
= 1 process, its checkpoint resumed on another process count; Ctrl-C + --resume = uninterrupted; a changed
base and bad flags are refused."""
from __future__ import annotations

import importlib.util
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import ddp_pretrain
import ddp_sft_full
import trainer
from support.loading.checkpoint import DCP_NAME, read_dcp_weights
from support.loading.sources import model_from_state, open_model
from support.inference.text_generator import TextGenerator
from support.training.trainer_utils import DistInfo, StopRequest
from train_helpers import (QUIET, TINY_MODEL, make_pretrain_data, make_sft_data, read_metrics, run_script,
                           start_script)

LORA = ["--lora_r", "4", "--lora_alpha", "8"]
STEPS = ["--max_steps", "6", "--learning_rate", "1e-2", "--warmup_iters", "2", "--log_interval", "1",
         "--eval_interval", "3", "--save_interval", "3"]
DIM, LAYERS, HIDDEN = 32, 2, 128  # TINY_MODEL; HIDDEN: the LLaMA rule for dim 32 (multiple of 64)
# runs that must agree: no dropout, and no decay, so that a step's learning rate does not depend on --max_steps
# (a run stopped at step 3 and resumed to 6 takes the steps of one run to 6)
AGREEING = LORA + STEPS + ["--lora_dropout", "0", "--lr_schedule", "wsd", "--decay_fraction", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_tokenizer_dir):
    """A briefly pretrained tiny model (the base) and chat data."""
    root = tmp_path_factory.mktemp("lora")
    train_bin, _ = make_pretrain_data(root, tiny_tokenizer_dir, n_train=100, n_val=10)
    ddp_pretrain.main(["--data_path", train_bin, "--val_data_path", "", "--tokenizer_path", tiny_tokenizer_dir,
                       "--out_dir", str(root / "base"), *TINY_MODEL, *QUIET, "--batch_size", "8", "--max_steps", "3",
                       "--learning_rate", "1e-2", "--log_interval", "1"])
    sft_train, sft_val = make_sft_data(root)
    args = ["--data_path", sft_train, "--val_data_path", sft_val, "--init_from", str(root / "base"), *QUIET,
            "--max_seq_len", "32", "--batch_size", "8"]
    return SimpleNamespace(root=root, base=root / "base", args=args)


@pytest.fixture(scope="module")
def lora_run(data):
    out = data.root / "lora"
    ddp_sft_full.main(data.args + LORA + STEPS + ["--lora_dropout", "0.1", "--out_dir", str(out)])
    return out


def test_only_adapters_train_and_the_checkpoint_holds_only_them(data, lora_run):
    state = torch.load(lora_run / "ckpt.pt", weights_only=True)
    # one A and one B per projection (wqkv, wo, w13, w2) per layer; their sizes r x in and out x r
    assert sorted(state["model"]) == sorted(f"layers.{i}.{m}.lora_{ab}.weight" for i in range(LAYERS)
                                            for m in ("attention.wqkv", "attention.wo", "feed_forward.w13",
                                                      "feed_forward.w2") for ab in "AB")
    shapes = {"wqkv": (DIM, (4 + 2 * 2) * 8), "wo": (DIM, DIM), "w13": (DIM, 2 * HIDDEN), "w2": (HIDDEN, DIM)}
    trainable = LAYERS * sum(4 * (n_in + n_out) for n_in, n_out in shapes.values())
    assert sum(t.numel() for t in state["model"].values()) == trainable
    assert len(state["optimizer"]["state"]) == len(state["model"])  # AdamW moments for the adapters only
    log = (lora_run / "train.log").read_text(encoding="utf-8")
    assert f"({trainable:,} trainable: " in log and "peak memory: " in log

    base, _, _ = open_model(data.base, own_tokenizer=False)
    adapted = model_from_state(state, lora_run / "ckpt.pt")
    frozen = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    assert frozen.keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())  # the base did not move
    assert all(state["model"][f"layers.{i}.feed_forward.w2.lora_B.weight"].abs().sum() > 0 for i in range(LAYERS))


def test_exports_give_the_logits_training_computes(lora_run):
    state = torch.load(lora_run / "ckpt.pt", weights_only=True)
    adapted = model_from_state(state, lora_run / "ckpt.pt").eval()
    x = torch.randint(0, adapted.config.vocab_size, (2, 24))
    adapter_dir = lora_run / "adapter"
    base_dir = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_dir) == (lora_run / "base").resolve()  # the base was a ckpt.pt: its HF form is written
    with torch.no_grad():
        ours = adapted(x).logits
        merged = AutoModelForCausalLM.from_pretrained(lora_run / "hf")(x).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
        on_base = peft_model(x).logits
        base_only = AutoModelForCausalLM.from_pretrained(base_dir)(x).logits
        sampled = TextGenerator(adapter_dir, device="cpu", dtype="float32").model(x).logits
    for theirs in (merged, on_base, sampled):
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (base_only - ours).abs().max() > 1e-3  # the adapters change the function

    # the peft adapter on q_proj is the fused wqkv adapter's first rows, with the shared A: W + alpha / r * B A
    lora_a, lora_b = (state["model"][f"layers.0.attention.wqkv.lora_{ab}.weight"] for ab in "AB")
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q_proj.get_delta_weight("default"), (8 / 4) * lora_b[:DIM] @ lora_a)


@pytest.fixture(scope="module")
def one_process(data):
    """6 steps of 8 samples in one process: what the DDP and FSDP runs must reproduce."""
    out = data.root / "one"
    ddp_sft_full.main(data.args + AGREEING + ["--out_dir", str(out), "--batch_size", "4", "--accumulation_steps", "2"])
    return out


def assert_same_losses(reference: Path, run: Path) -> None:
    for metric in ("loss", "val_loss"):
        assert [v for _, v in read_metrics(run, metric)] == pytest.approx(
            [v for _, v in read_metrics(reference, metric)], abs=1e-5), metric


def test_ddp_two_processes_match_one(data, one_process, tmp_path):
    ddp = run_script("ddp_sft_full.py", data.args + AGREEING + ["--out_dir", str(tmp_path / "ddp"), "--batch_size",
                                                                "2", "--accumulation_steps", "2"], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = (torch.load(d / "ckpt.pt", weights_only=True) for d in (one_process, tmp_path / "ddp"))
    assert two["world_size"] == 2 and one["step"] == two["step"] == 6
    for key, weight in one["model"].items():
        torch.testing.assert_close(two["model"][key], weight, atol=1e-5, rtol=0, msg=key)
    assert_same_losses(one_process, tmp_path / "ddp")


def test_fsdp_shards_the_base_and_resumes_on_another_process_count(data, one_process, tmp_path):
    """--parallel fsdp: 2 processes to step 3, their DCP checkpoint resumed by 1 process to step 6, end where
    one plain process does; the checkpoint holds the adapters only; the exports are the same."""
    run = tmp_path / "fsdp"
    fsdp = ["--parallel", "fsdp", "--out_dir", str(run)]
    two = run_script("ddp_sft_full.py", data.args + AGREEING + fsdp + ["--batch_size", "2", "--accumulation_steps",
                                                                       "2", "--max_steps", "3"], nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    saved = read_dcp_weights(run / DCP_NAME, "model")
    assert len(saved) == 2 * 4 * LAYERS and all(".lora_" in k for k in saved)  # no frozen weight
    ddp_sft_full.main(data.args + AGREEING + fsdp + ["--resume", "--batch_size", "8", "--accumulation_steps", "1"])
    assert f"resumed from {run / DCP_NAME} at step 3" in (run / "train.log").read_text(encoding="utf-8")
    reference, resumed = (open_model(d, own_tokenizer=False) for d in (one_process, run))  # adapters merged
    assert resumed.origin["step"] == 6
    for key, weight in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], weight, atol=1e-5, rtol=0, msg=key)
    assert_same_losses(one_process, run)
    for exported in ("hf/model.safetensors", "adapter/adapter_model.safetensors"):
        ours, theirs = load_file(run / exported), load_file(one_process / exported)
        assert ours.keys() == theirs.keys()
        for key, weight in theirs.items():
            torch.testing.assert_close(ours[key], weight, atol=1e-5, rtol=0, msg=key)


def test_interrupted_run_resumes_exactly(data, tmp_path):
    """Ctrl-C mid-run saves adapters + optimizer; --resume rebuilds the base from --init_from and ends exactly
    where the run left alone ends (LoRA dropout on: its masks are reproduced too)."""
    args = data.args + LORA + ["--lora_dropout", "0.1", "--max_steps", "40", "--learning_rate", "1e-2",
                               "--log_interval", "1", "--eval_interval", "20", "--save_interval", "100"]
    ddp_sft_full.main(args + ["--out_dir", str(tmp_path / "ref")])
    run = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = start_script("ddp_sft_full.py", args + ["--out_dir", str(run)], log)
    try:
        while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 3:
            assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 128 + signal.SIGINT, log.read_text()[-3000:]
    finally:
        proc.kill()
    stopped = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= stopped < 40
    ddp_sft_full.main(args + ["--out_dir", str(run), "--resume"])
    assert read_metrics(run) == read_metrics(tmp_path / "ref")
    assert read_metrics(run, "val_loss") == read_metrics(tmp_path / "ref", "val_loss")
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (tmp_path / "ref", run))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    adam_a, adam_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(x, y) for i in adam_a for x, y in zip(adam_a[i].values(), adam_b[i].values()))


@pytest.fixture(scope="module")
def bf16_base(data):
    """The base as an HF directory stored in bfloat16, as foreign bases usually are, with its tokenizer."""
    path = data.root / "base_bf16"
    AutoModelForCausalLM.from_pretrained(data.base / "hf").to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(data.base / "hf").save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_on_a_bf16_base_is_exact(data, bf16_base, tmp_path, dtype):
    """On a bf16 base the adapters and their AdamW moments stay float32 across --resume (peft creates adapters
    in the base's dtype: the saved float32 adapters were rounded to bf16 when a run resumed), so 2 steps and a
    resume to 4 end exactly where 4 steps straight end, with float32 compute or bf16 autocast."""
    args = data.args + LORA + ["--init_from", str(bf16_base), "--dtype", dtype, "--lora_dropout", "0.1",
                               "--learning_rate", "1e-2", "--warmup_iters", "100",  # lr independent of max_steps
                               "--log_interval", "1", "--eval_interval", "100", "--save_interval", "100"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ddp_sft_full.main(args + ["--max_steps", "4", "--out_dir", str(straight)])
    ddp_sft_full.main(args + ["--max_steps", "2", "--out_dir", str(resumed)])
    ddp_sft_full.main(args + ["--max_steps", "4", "--out_dir", str(resumed), "--resume"])
    assert read_metrics(resumed) == read_metrics(straight)
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, resumed))
    assert a["step"] == b["step"] == 4
    for k, weight in a["model"].items():
        assert weight.dtype == torch.float32 and torch.equal(weight, b["model"][k]), k
    adam_a, adam_b = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in adam_a:
        for name, x in adam_a[i].items():
            assert torch.equal(x, adam_b[i][name]) and (name == "step" or x.dtype == torch.float32), (i, name)


@pytest.mark.parametrize("dtype, frozen_dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_a_frozen_bf16_base_keeps_its_dtype(data, bf16_base, tmp_path, dtype, frozen_dtype):
    """Under bf16 autocast the frozen base stays in the bf16 it is stored in (float32 copies would double a
    large base's memory); float32 compute needs float32 weights. The adapters, the only weights that train,
    and their AdamW moments are float32 either way."""
    task = ddp_sft_full.SFT()
    given = trainer.build_parser(task).parse_args(data.args + LORA + [
        "--init_from", str(bf16_base), "--dtype", dtype, "--out_dir", str(tmp_path)])
    run = trainer.Trainer(given, task, DistInfo(0, 0, 1, torch.device("cpu"), None), StopRequest(announce=False))
    run.log.close()
    frozen = [p for p in run.model.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == run.model.num_params() - sum(p.numel() for p in run.optimizer_params)
    assert {p.dtype for p in frozen} == {frozen_dtype}
    assert {p.dtype for p in run.optimizer_params} == {torch.float32}


def test_fsdp_shards_a_bf16_base_with_float32_adapters(data, bf16_base, tmp_path):
    """FSDP2 shards a block's frozen bf16 weights together with its float32 adapters (one process: a process
    group of one, the same code path); the checkpoint holds the float32 adapters only."""
    out = tmp_path / "run"
    ddp_sft_full.main(data.args + LORA + ["--init_from", str(bf16_base), "--dtype", "bfloat16", "--parallel", "fsdp",
                                          "--max_steps", "2", "--out_dir", str(out)])
    assert "frozen weights kept in bfloat16" in (out / "train.log").read_text(encoding="utf-8")
    saved = read_dcp_weights(out / DCP_NAME, "model")
    assert len(saved) == 2 * 4 * LAYERS and all(".lora_" in k and v.dtype == torch.float32 for k, v in saved.items())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_changed_base_is_refused(data, lora_run, tmp_path):
    state = torch.load(lora_run / "ckpt.pt", weights_only=True)
    base = torch.load(data.base / "ckpt.pt", weights_only=True)
    base["model"]["norm.weight"] += 1  # the base retrained after the adapters were
    torch.save(base, tmp_path / "ckpt.pt")
    state["lora"]["base"] = str(tmp_path)
    with pytest.raises(ValueError, match=r"trained on another .*: the base model's weights have changed"):
        model_from_state(state, "lora.pt")


@pytest.mark.parametrize("flags, message", [
    (["--lora_r", "4", "--lora_targets", "wqkv,q_proj"], "--lora_targets 'wqkv,q_proj': expected a comma-separated "
                                                         "subset of wqkv, wo, w13, w2"),
    (["--lora_r", "4", "--lora_dropout", "1"], r"--lora_dropout must be in \[0, 1\)"),
    (["--load_in_4bit"], "--load_in_4bit quantizes the frozen weights of LoRA training: add --lora_r"),
    (["--lora_r", "4", "--load_in_4bit", "--parallel", "fsdp"], "--parallel fsdp: --load_in_4bit's packed 4-bit "
                                                                "weights cannot be sharded"),
])
def test_bad_lora_flags_are_refused(data, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        ddp_sft_full.main(data.args + flags + ["--max_steps", "1", "--out_dir", str(tmp_path)])


def test_load_in_4bit(data, tmp_path, tiny_tokenizer_dir):
    """QLoRA where bitsandbytes is installed (0.48 and later compute 4-bit NF4 on a CPU too: the adapted
    projections are stored in 4 bits, the merged export reproduces training's logits); where it is not (it is
    not in requirements.txt), the one-line error that says what to install."""
    if importlib.util.find_spec("bitsandbytes") is None:
        missing = r"^error: --load_in_4bit needs bitsandbytes \(pip install bitsandbytes\)"
        with pytest.raises(SystemExit, match=missing):
            ddp_sft_full.main(data.args + LORA + ["--load_in_4bit", "--max_steps", "1", "--out_dir", str(tmp_path)])
        return
    # bitsandbytes' CPU kernels need input widths that are multiples of its 64-value quantization blocks
    base, out = tmp_path / "base64", tmp_path / "qlora"
    train_bin = str(data.root / "train.bin")
    ddp_pretrain.main(["--data_path", train_bin, "--val_data_path", "", "--tokenizer_path", tiny_tokenizer_dir,
                       "--out_dir", str(base), *TINY_MODEL, "--dim", "64", *QUIET, "--max_steps", "1"])
    ddp_sft_full.main(data.args + LORA + STEPS + ["--init_from", str(base), "--load_in_4bit", "--lora_dropout", "0",
                                                  "--out_dir", str(out)])
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["lora"]["load_in_4bit"]
    adapted = model_from_state(state, out / "ckpt.pt").eval()
    assert adapted.layers[0].attention.wqkv.get_base_layer().weight.dtype == torch.uint8  # packed 4-bit
    x = torch.randint(0, adapted.config.vocab_size, (2, 24))
    with torch.no_grad():
        trained = adapted(x).logits  # through bitsandbytes' 4-bit kernels
        merged = AutoModelForCausalLM.from_pretrained(out / "hf")(x).logits
        before = AutoModelForCausalLM.from_pretrained(base / "hf")(x).logits
    # the merged export (dequantized weights + adapters) is training's function up to the rounding of
    # bitsandbytes' 4-bit kernels (on a CPU they keep the block scales in bf16), far below the adapters' effect
    rounding = (merged - trained).abs().max()
    assert rounding < 1e-2 and (trained - before).abs().max() > 10 * rounding
