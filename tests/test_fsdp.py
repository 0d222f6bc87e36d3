"""--parallel fsdp (support/training/fsdp.py): 2 gloo processes with FSDP2 train exactly like 1 plain process reading the
same global batch (weights within 1e-5, the same losses and the same hf/ export); a run resumed from its
distributed checkpoint with another number of processes (1 -> 2 -> 2 -> 1) ends where the uninterrupted run
does, with AdamW and with Muon; every tool opens the DCP checkpoint through open_model; what FSDP cannot train
is one clear line."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ddp_dpo
import ddp_pretrain
import ddp_sft_full
from support.loading.checkpoint import DCP_NAME, DCP_SLOTS, load_checkpoint
from support.loading.sources import open_model
from test_dpo import run_files, train_args  # noqa: F401 (run_files is a fixture: the DPO init model and pairs)
from train_helpers import QUIET, TINY_MODEL, make_pretrain_data, make_sft_data, read_metrics, run_script

# wsd with no decay: the learning rate of a step does not depend on --max_steps, so a run stopped by a smaller
# --max_steps and resumed with a larger one takes the steps of one run to the larger
STEPS = ["--learning_rate", "1e-3", "--warmup_iters", "2", "--lr_schedule", "wsd", "--decay_fraction", "0",
         "--log_interval", "1", "--eval_interval", "2", "--save_interval", "100"]
FSDP = ["--parallel", "fsdp"]


def assert_same_weights(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(reference)
    for key, weight in reference.items():
        torch.testing.assert_close(got[key], weight, atol=1e-5, rtol=0, msg=key)


def assert_same_losses(reference, run, metrics=("loss", "val_loss")) -> None:
    for metric in metrics:
        ref, got = read_metrics(reference, metric), read_metrics(run, metric)
        assert [s for s, _ in got] == [s for s, _ in ref]
        assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=1e-5)


@pytest.fixture(scope="module")
def pretrain_args(tmp_path_factory, tiny_tokenizer_dir) -> list[str]:
    root = tmp_path_factory.mktemp("fsdp_data")
    train_bin, val_bin = make_pretrain_data(root, tiny_tokenizer_dir, n_train=200, n_val=20)
    return ["--data_path", train_bin, "--val_data_path", val_bin, "--tokenizer_path", tiny_tokenizer_dir,
            *TINY_MODEL, *QUIET, *STEPS]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pretrain_args):
    """One plain process, global batch 8, 6 steps: what every FSDP run below must reproduce."""
    out = tmp_path_factory.mktemp("fsdp_ref") / "one"
    ddp_pretrain.main(pretrain_args + ["--out_dir", str(out), "--batch_size", "8", "--max_steps", "6"])
    return out


def test_two_fsdp_processes_train_like_one(tmp_path, pretrain_args, reference):
    # global batch 8: 2 processes x 2 samples x 2 accumulation steps
    run = tmp_path / "fsdp"
    fsdp = run_script("ddp_pretrain.py", pretrain_args + FSDP + [
        "--out_dir", str(run), "--batch_size", "2", "--accumulation_steps", "2", "--max_steps", "6",
        "--sample_prompt", "hello", "--sample_tokens", "4"], nproc=2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "=== pretrain: 2 process(es) on cpu" in fsdp.stdout and "--parallel fsdp" in fsdp.stdout
    # each rank wrote its own shard; no ckpt.pt
    assert sorted(p.name for p in (run / DCP_NAME).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (run / "ckpt.pt").exists()
    ref_state = load_checkpoint(reference)
    state = load_checkpoint(run)  # the DCP checkpoint read by one process, as every tool reads it
    assert state["step"] == 6 and state["world_size"] == 2 and state["data_position"] == ref_state["data_position"]
    assert_same_weights(ref_state["model"], state["model"])
    assert_same_losses(reference, run)
    # the HF export gathers the shards once: the same hf/ as a one-process run's
    assert_same_weights(load_file(reference / "hf" / "model.safetensors"), load_file(run / "hf" / "model.safetensors"))
    # the sample greedy-decoded on rank 0 from the gathered model is logged
    assert [s for s, _ in read_metrics(run, "samples")] == [2, 4, 6]


def train_in_turns(args: list[str], run: Path, turns: list[tuple[int, int]]) -> None:
    """--parallel fsdp runs into `run`, each (processes, last step) resuming the one before; the per-process
    batch follows the process count so that the global batch stays 8."""
    for i, (nproc, steps) in enumerate(turns):
        turn = args + FSDP + ["--resume"] * bool(i) + [
            "--out_dir", str(run), "--batch_size", str(8 // nproc), "--max_steps", str(steps)]
        if nproc == 1:  # in this process: a process group of one, created and destroyed by the run
            ddp_pretrain.main(turn)
            continue
        proc = run_script("ddp_pretrain.py", turn, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"resumed from {run / DCP_NAME} at step {turns[i - 1][1]}" in proc.stdout


def test_resume_with_other_process_counts(tmp_path, pretrain_args, reference):
    """1 process to step 2, 2 processes to step 4 (1 -> 2), 2 to step 5 (2 -> 2), 1 to step 6 (2 -> 1)."""
    run = tmp_path / "chain"
    train_in_turns(pretrain_args, run, [(1, 2), (2, 4), (2, 5), (1, 6)])
    state = load_checkpoint(run)
    assert state["step"] == 6 and state["world_size"] == 1
    assert_same_weights(load_checkpoint(reference)["model"], state["model"])
    assert_same_losses(reference, run, ["loss"])  # each run also evaluates at its last step

    # a save killed midway leaves its slot half written; the symlink still names the last good checkpoint
    other = next(slot for slot in DCP_SLOTS if slot != (run / DCP_NAME).resolve().name)
    (run / other).mkdir(exist_ok=True)
    (run / other / "__0_0.distcp").write_bytes(b"killed mid-write")

    # the tools open a DCP run directory like a ckpt.pt one (model_sample.py, serve.py: loading.open_model)
    opened = open_model(run)
    assert opened.origin["step"] == 6 and opened.origin["source"] == str(run / DCP_NAME)
    assert_same_weights(load_checkpoint(reference)["model"], opened.model.state_dict())

    # bad input: one line, and the checkpoint is left as it was
    with pytest.raises(SystemExit, match=r"^error: .*ckpt_dcp: checkpoint was trained with --parallel fsdp, this "
                                         r"run asks for --parallel ddp"):
        ddp_pretrain.main(pretrain_args + ["--out_dir", str(run), "--resume", "--parallel", "ddp"])
    with pytest.raises(SystemExit, match=r"^error: .*ckpt_dcp already exists: --resume continues"):
        ddp_pretrain.main(pretrain_args + FSDP + ["--out_dir", str(run), "--max_steps", "1"])
    assert load_checkpoint(run)["step"] == 6
    # a damaged shard: one line from the tools and from --resume
    shard = next((run / DCP_NAME).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"ckpt_dcp: not a readable distributed checkpoint"):
        open_model(run)
    with pytest.raises(SystemExit, match=r"^error: .*ckpt_dcp: cannot resume: [^\n]*$"):
        ddp_pretrain.main(pretrain_args + ["--out_dir", str(run), "--resume", "--batch_size", "8", "--max_steps", "7"])
    # --overwrite with --parallel ddp: its first save replaces the DCP checkpoint, both slots
    ddp_pretrain.main(pretrain_args + ["--out_dir", str(run), "--overwrite", "--batch_size", "8", "--max_steps", "1"])
    assert load_checkpoint(run / "ckpt.pt")["step"] == 1
    assert not any((run / name).exists() or (run / name).is_symlink() for name in (DCP_NAME, *DCP_SLOTS))


def test_ddp_checkpoint_is_not_resumed_as_fsdp(tmp_path, pretrain_args, reference):
    with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt: checkpoint was trained with --parallel ddp, this run "
                                         r"asks for --parallel fsdp; resume with the same value$"):
        ddp_pretrain.main(pretrain_args + FSDP + ["--out_dir", str(reference), "--resume", "--max_steps", "7"])
    assert load_checkpoint(reference)["step"] == 6


def test_float16_is_refused(tmp_path, pretrain_args):
    with pytest.raises(SystemExit, match="^error: --parallel fsdp: --dtype float16 needs GradScaler"):
        ddp_pretrain.main(pretrain_args + FSDP + ["--dtype", "float16", "--out_dir", str(tmp_path / "run"),
                                                  "--max_steps", "1"])
    assert not (tmp_path / "run" / DCP_NAME).exists()


def test_muon_under_fsdp_trains_like_one_plain_process(tmp_path, pretrain_args):
    """Muon (Newton-Schulz in float32) with its momentum sharded and each matrix gathered whole on one rank:
    1 FSDP process to step 2, 2 processes to step 4, 1 to step 6, each resuming the distributed checkpoint
    (the Muon and AdamW states resharded 1 -> 2 -> 1), end where one plain process's uninterrupted run does."""
    muon = pretrain_args + ["--optimizer", "muon", "--muon_learning_rate", "1e-2", "--muon_dtype", "float32"]
    ddp_pretrain.main(muon + ["--out_dir", str(tmp_path / "plain"), "--batch_size", "8", "--max_steps", "6"])
    train_in_turns(muon, tmp_path / "fsdp", [(1, 2), (2, 4), (1, 6)])
    plain, fsdp = load_checkpoint(tmp_path / "plain"), load_checkpoint(tmp_path / "fsdp")
    assert fsdp["step"] == 6 and "Newton-Schulz in float32" in (tmp_path / "fsdp" / "train.log").read_text()
    assert_same_weights(plain["model"], fsdp["model"])
    assert_same_losses(tmp_path / "plain", tmp_path / "fsdp", ["loss"])


def test_cpu_offload_needs_fsdp(tmp_path, pretrain_args):
    with pytest.raises(SystemExit, match="^error: --cpu_offload offloads FSDP's shards: add --parallel fsdp$"):
        ddp_pretrain.main(pretrain_args + ["--cpu_offload", "--out_dir", str(tmp_path / "run")])


def test_sft_and_dpo_under_fsdp_train_like_one_process(tmp_path, tiny_tokenizer_dir, reference, run_files):  # noqa: F811 (the imported fixture)
    """SFT (answers-only loss: micro-batches hold different numbers of target tokens) and DPO with its frozen
    reference held whole on every rank: 2 FSDP processes equal 1 plain process."""
    sft_train, sft_val = make_sft_data(tmp_path)
    sft = ["--data_path", sft_train, "--val_data_path", sft_val, "--tokenizer_path", tiny_tokenizer_dir,
           "--init_from", str(reference), *QUIET, *STEPS, "--max_seq_len", "32", "--max_steps", "4"]
    dpo = train_args(run_files, tiny_tokenizer_dir, tmp_path / "unused", "--max_steps", "4", "--warmup_iters", "2",
                     "--eval_interval", "2")
    for script, main, common in (("ddp_sft_full.py", ddp_sft_full.main, sft), ("ddp_dpo.py", ddp_dpo.main, dpo)):
        fsdp = run_script(script, common + FSDP + ["--out_dir", str(tmp_path / script / "fsdp"), "--batch_size", "2",
                                                   "--accumulation_steps", "2"], nproc=2)
        assert fsdp.returncode == 0, fsdp.stderr[-3000:]
        main(common + ["--out_dir", str(tmp_path / script / "one"), "--batch_size", "8", "--accumulation_steps", "1"])
        one, two = (load_checkpoint(tmp_path / script / run) for run in ("one", "fsdp"))
        assert one["step"] == two["step"] == 4 and two["world_size"] == 2
        assert_same_weights(one["model"], two["model"])
        assert_same_losses(tmp_path / script / "one", tmp_path / script / "fsdp")


def test_cpu_offload_trains_like_one_process(tmp_path, pretrain_args, reference):
    """--cpu_offload (CPUOffloadPolicy; on a CPU device the shards stay where they are) takes the same steps."""
    ddp_pretrain.main(pretrain_args + FSDP + ["--cpu_offload", "--out_dir", str(tmp_path / "off"), "--batch_size", "8",
                                              "--max_steps", "6"])
    assert_same_weights(load_checkpoint(reference)["model"], load_checkpoint(tmp_path / "off")["model"])


LORA_SPEC = dict(r=4, alpha=8.0, dropout=0.0, targets=["wqkv", "wo", "w13", "w2"], load_in_4bit=False, base="test")


def two_gloo_ranks(rank: int, init_file: str, out_dir: str) -> None:
    """One of 2 gloo processes (torch.multiprocessing) running each check below; what they find is saved to
    out_dir/<check>_rank<rank>.pt for the tests."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for check in (rank0_only_loading, muon_on_row_shards):
        torch.save(check(rank), f"{out_dir}/{check.__name__}_rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks_found(tmp_path_factory) -> Callable[[str], tuple[Any, Any]]:
    """Starts two_gloo_ranks once; returns check name -> (rank 0's findings, rank 1's). The ranks are forked from
    train_helpers' fork server, which has imported torch and transformers already."""
    out = tmp_path_factory.mktemp("two_ranks")
    torch.multiprocessing.start_processes(two_gloo_ranks, args=(str(out / "init"), str(out)), nprocs=2,
                                          start_method="forkserver")
    return lambda check: tuple(torch.load(out / f"{check}_rank{r}.pt", weights_only=False) for r in (0, 1))


def rank0_only_loading(rank: int) -> dict[str, Any]:
    """share_model then wrap, as the trainer calls them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from k_model import ModelConfig, Transformer
    from support.loading import lora
    from support.training.fsdp import FullyShardedParallel
    from support.loading.sources import SourcedModel
    from support.training.trainer_utils import DistInfo

    parallel = FullyShardedParallel(DistInfo(rank, rank, 2, torch.device("cpu"), None), torch.bfloat16, False)
    found: dict = {}

    def broken() -> SourcedModel:
        raise ValueError(f"model.pt: not a readable checkpoint (loaded by rank {rank})")

    try:
        parallel.share_model(broken)
    except ValueError as e:  # every rank stops with rank 0's message, none waits for a model
        found["error"] = str(e)

    def load() -> SourcedModel:
        found["loaded"] = True
        torch.manual_seed(rank)  # another random model on each rank: the shards must all come from rank 0's
        model = lora.attach(Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                                                    max_seq_len=16)), LORA_SPEC)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.bfloat16()  # a bf16 base under float32 adapters
        found["original"] = {k: v.clone() for k, v in model.state_dict().items()}
        return SourcedModel(model, "model.pt", None)

    start = parallel.share_model(load)
    found["meta"] = all(p.is_meta for p in start.model.parameters())
    found["outline"] = {n: (p.shape, p.dtype, p.requires_grad) for n, p in start.model.named_parameters()}
    model = parallel.wrap(start.model, compiled=False)
    found["weights"] = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # every rank
    found["rope"] = model.rope_cos.clone()
    return found


def test_only_rank_0_loads_the_initial_model(two_ranks_found):
    """With 2 FSDP processes rank 1 never loads the model: it builds the outline rank 0 sends (shapes, dtypes,
    which weights train, LoRA) on the meta device, and wrap fills its shards from rank 0's weights. A failure
    to load on rank 0 stops rank 1 too, with the same message."""
    zero, one = two_ranks_found("rank0_only_loading")
    message = "model.pt: not a readable checkpoint (loaded by rank 0)"
    assert zero["error"] == one["error"] == message
    assert zero.get("loaded") and not one.get("loaded")
    assert one["meta"] and not zero["meta"]
    assert one["outline"] == zero["outline"]
    assert {dtype for _, dtype, trains in one["outline"].values() if not trains} == {torch.bfloat16}
    for key, weight in zero["original"].items():  # on both ranks, gathered from the shards
        assert torch.equal(zero["weights"][key], weight) and torch.equal(one["weights"][key], weight), key
    assert torch.equal(one["rope"], zero["rope"])


ROW_SHARDED = [(5, 3), (1, 4), (4, 6)]  # on 2 ranks: 3 + 2 rows, 1 + 0, 2 + 2; two rounds, the second of one


def muon_on_row_shards(rank: int) -> list[torch.Tensor]:
    """Two Muon steps on the ROW_SHARDED matrices as DTensors of row shards (FSDP2's layout, torch.chunk's
    uneven split), every rank drawing the same whole gradients; the matrices after them, gathered."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from support.training.optim import Muon

    mesh = init_device_mesh("cpu", (2,))
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=generator), mesh, [Shard(0)]))
              for shape in ROW_SHARDED]
    optimizer = Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    for _ in range(2):
        for p in params:
            p.grad = distribute_tensor(torch.randn(p.shape, generator=generator), mesh, [Shard(0)])
        optimizer.step()
    return [p.full_tensor().detach() for p in params]


def test_muon_on_uneven_row_shards_equals_torch_muon_on_whole_matrices(two_ranks_found):
    """FSDP2 gives the last ranks fewer rows (or none) when a matrix's rows do not divide evenly, and a step's
    matrices are not always a multiple of the ranks: Muon (in bfloat16) on such shards takes exactly the steps
    of torch.optim.Muon on the whole matrices, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ROW_SHARDED]
    reference = torch.optim.Muon(params, lr=0.02, weight_decay=0.1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        reference.step()
    for got in two_ranks_found("muon_on_row_shards"):
        assert all(torch.equal(g, p.detach()) for g, p in zip(got, params))
