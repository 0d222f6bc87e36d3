"""The training loop shared by every training script.

A script (ddp_pretrain.py, ddp_sft_full.py, ddp_dpo.py) subclasses train_task.Task: it names its defaults and
says which model a fresh run starts from, what its dataset is, the loss on a batch and which parameters train.
The run is here: resume rules, optimization, evaluation, checkpoints. Around it, train_flags.py holds the
flags, train_steps.py one optimizer step and one evaluation pass (with the loss normalization),
train_progress.py the progress lines, trainer_utils.py the process group, data order, logs and Ctrl-C,
checkpoint.py the checkpoint file, loading.py the tokenizer, dtype and the initial model.

Data order. Epoch e visits the samples in a permutation seeded by (seed, e) (with --group_by_length, sorted by
length within blocks of it: trainer_utils.epoch_order). Each optimizer step consumes
the next S = batch_size * world_size * accumulation_steps samples of it: micro-step m is the slice
[m*W*B, (m+1)*W*B) of those, of which rank r takes the r-th B-sized part. The checkpoint stores the data
position as (epoch, next sample), so a resumed run reads exactly what the interrupted run would have read,
even with another batch size or process count (then only the step boundaries move).

Randomness. After initialization the only randomness is dropout. The RNG is reseeded from
(seed, rank, step) before every step, so a resumed run draws the same dropout masks as an uninterrupted
one without carrying RNG states in the checkpoint.

Flags. train_flags.py defines them and resolves each value: the command line; on --resume, the flags saved in
the checkpoint (except per-launch ones); the --preset; the script's Task.defaults; the shared defaults. Flags
left unset by all of them (SFT's --max_seq_len, --dropout) are the initial model's. train.log lists each
value with where it came from. A resumed run takes the optimizer's state (moments, step counts) from the
checkpoint and its settings from this launch, as a fresh run would set them: --learning_rate and --weight_decay
given again apply, and so do betas, eps or Muon's momentum that the code now sets otherwise (train.log notes each
change).
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm import tqdm

from support.data.tokenizer_spec import tokenizer_fingerprint
from support.loading.checkpoint import config_to_dict, load_checkpoint, run_checkpoint
from support.loading.sources import SourcedModel, check_model_tokenizer, model_from_state, resolve_dtype
from support.model.cpu_matmul import describe_choice
from support.training.fsdp import make_parallel
from support.training.optim import lr_at, make_optimizer
from support.training.perf import peak_flops
from support.training.train_flags import (build_parser, check_args, check_resume_experts, check_resume_flags,
                                          resolve_args, with_model_values, with_rope_scaling, with_router_coefs)
from support.training.train_progress import Progress
from support.training.train_steps import (autocast_factory, dtype_names, greedy_samples, peak_memory, step_seed,
                                          train_step)
from support.training.train_task import Task, check_targets, router_metric_names
from support.training.trainer_utils import (DistInfo, RunLogger, StopRequest, apply_settings, iterate_steps,
                                            local_part, optimizer_settings, setup_distributed, steps_left)


class TrainingError(RuntimeError):
    """The run cannot go on (the loss diverged); the last good checkpoint is left in place."""


# ----------------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """One run: resolves the flags, builds model, optimizer and data (or restores them from out_dir's checkpoint
    with --resume), then `fit` trains to the last step, logging, evaluating and saving on the way. --parallel's
    strategy (DataParallel, FullyShardedParallel) wraps the model, saves, restores and gathers it for rank 0."""

    def __init__(self, given: argparse.Namespace, task: Task, d: DistInfo, stop: StopRequest):
        self.task, self.d, self.stop = task, d, stop
        args, sources = resolve_args(given, task)
        self.out_dir = Path(args.out_dir)
        self.ckpt_path = run_checkpoint(self.out_dir)  # ckpt.pt, ckpt_dcp (--parallel fsdp) or None
        state = resume_state(given, args, self.ckpt_path, self.out_dir)
        if state is not None:
            args, sources = resolve_args(given, task, state["args"])
        check_args(args)
        if args.eval_tasks:  # an unknown task or bad task data stops the run now, not at its first evaluation
            from support.inference import evaluation  # lm-eval is imported only by runs that ask for its tasks

            evaluation.task_names(args.eval_tasks)
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.seed)
        self.log = RunLogger(self.out_dir, d.is_main, resumed=args.resume)
        self.tokenizer, tokenizer_path = task.tokenizer(args)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)

        self.dtype = resolve_dtype(args.dtype, d.device)
        self.parallel = make_parallel(args, d, self.dtype)
        start = self.parallel.share_model(partial(self._initial_model, args, state))  # FSDP: rank 0 loads it
        check_model_tokenizer(start, self.tokenizer, tokenizer_path)
        self.args, self.sources = with_model_values(args, sources, start, tokenizer_path)
        self.model_source = start.source
        self.model = self.parallel.place(start.model).train()
        task.prepare(self.model, self.args, self.tokenizer, d.device)
        self.autocast = autocast_factory(d.device, self.dtype)
        self.forward_model = self.parallel.wrap(self.model, self.args.compile)  # before the optimizer: FSDP
        self.optimizer_params = task.trainable_parameters(self.model)  # replaces the parameters
        self.optimizer = make_optimizer(self.model, self.optimizer_params, self.args, d.device)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.dtype == torch.float16)
        self.step, self.position, self.last_saved_step = 0, {"epoch": 0, "sample": 0}, None
        if state is not None:
            self._restore(state)
        del state

        self.train_set, self.val_set = self._datasets()
        self.step_samples = self.args.batch_size * d.world_size * self.args.accumulation_steps
        self.steps_per_epoch = len(self.train_set) // self.step_samples
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.args.data_path}: {len(self.train_set)} samples are fewer than one optimizer "
                             f"step reads (batch_size x processes x accumulation_steps = {self.step_samples})")
        # under --epochs the end is a data position, so a resumed run with another batch size or process
        # count still reads exactly the rest of the data
        self.total_steps = self.args.max_steps or self.step + steps_left(
            len(self.train_set), self.step_samples, self.position, self.args.epochs)
        # the run's length, for a task that tells user code (GRPO's reward functions get it in trainer_state)
        task.total_steps, task.steps_per_epoch = self.total_steps, self.steps_per_epoch
        self.flops_per_token = self.model.flops_per_token(self.args.max_seq_len)
        self.peak, self.peak_source = (peak_flops(d.device, self.dtype, self.args.peak_tflops) if d.is_main
                                       else (None, ""))
        self.log.start_metrics(self.step if self.args.resume else None)
        if self.args.use_swanlab:
            self.log.start_swanlab(self.args.swanlab_project, self.args.swanlab_mode, self.out_dir, vars(self.args))
        watch_cpu = d.is_main and d.device.type == "cpu" and not self.args.num_workers
        metrics = task.metrics + router_metric_names(self.model.config) if task.router_losses else task.metrics
        self.progress = Progress(self.log, d, metrics, self.flops_per_token, self.peak, watch_cpu)
        self._log_header()

    # -- set-up --------------------------------------------------------------------------------------------

    def _initial_model(self, args: argparse.Namespace, state: dict[str, Any] | None) -> SourcedModel:
        if state is None:
            start = with_rope_scaling(self.task.initial_model(args, self.tokenizer), args)  # resumed: already scaled
        else:
            start = SourcedModel(model_from_state(state, self.ckpt_path), str(self.ckpt_path),
                                 state["tokenizer_fingerprint"])
        start = with_router_coefs(start, args)
        stored = {p.dtype for p in start.model.parameters() if p.is_floating_point()} - {torch.float32}
        if stored:
            # master weights and AdamW state in float32 whatever the source stored; autocast does the rest.
            # Frozen weights (a LoRA base) keep their dtype when autocast computes in 16 bits anyway: float32
            # copies would double a large base's memory. Float32 compute needs float32 weights.
            keep_frozen = self.dtype != torch.float32
            for p in start.model.parameters():
                if p.is_floating_point() and (p.requires_grad or not keep_frozen):
                    p.data = p.data.float()
            kept = {p.dtype for p in start.model.parameters() if p.is_floating_point()} - {torch.float32}
            self.log.info(f"note: {start.source} stores {dtype_names(stored)} weights: training float32 master "
                          "weights" + (f", frozen weights kept in {dtype_names(kept)}" if kept else ""))
        return start

    def _restore(self, state: dict[str, Any]) -> None:
        launch = optimizer_settings(self.optimizer)  # from this launch's flags (--weight_decay) and code
        self.parallel.restore(state, self.ckpt_path, self.model, self.optimizer)
        changed = apply_settings(self.optimizer, launch)
        if changed:
            self.log.info(f"note: optimizer settings of this launch, not the checkpoint's: {', '.join(changed)}")
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.position = state["step"], dict(state["data_position"])
        self.last_saved_step = self.step

    def _datasets(self) -> tuple[Dataset, Dataset | None]:
        a = self.args
        train_set = self.task.dataset(a.data_path, self.tokenizer, a)
        if a.group_by_length and not hasattr(train_set, "sizes"):
            raise ValueError(f"--group_by_length: the samples of {a.data_path} ({type(train_set).__name__}) have no "
                             f"lengths to group by; it applies to JSONL datasets (SFT, DPO)")
        val_set = None
        if a.val_data_path and Path(a.val_data_path).exists():
            val_set = self.task.dataset(a.val_data_path, self.tokenizer, a)
        if self.task.may_lack_targets:
            # the first samples tell the share that teaches nothing; each costs a chat encoding at start-up
            check_targets(train_set, self.task, a.data_path, 1_000, a.max_seq_len, self.log)
            if val_set is not None:
                check_targets(val_set, self.task, a.val_data_path, a.eval_samples, a.max_seq_len, self.log)
        return train_set, val_set

    def _log_header(self) -> None:
        a, d, cfg = self.args, self.d, self.model.config
        tokens_per_step = self.step_samples * a.max_seq_len
        self.log.info(f"=== {self.task.name}: {d.world_size} process(es) on {d.device.type}, dtype "
                      f"{str(self.dtype).removeprefix('torch.')}, {torch.get_num_threads()} torch threads/process, "
                      f"--parallel {self.parallel.name}")
        if d.device.type == "cpu":
            self.log.info(describe_choice())
        params, trainable = self.model.num_params(), sum(p.numel() for p in self.optimizer_params)
        frozen = f" ({trainable:,} trainable: {trainable / params:.2%})" if trainable != params else ""
        self.log.info(f"model: {params / 1e6:.2f}M params{frozen} from {self.model_source}; vocab "
                      f"{cfg.vocab_size}, dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads "
                      f"({cfg.n_kv_heads} kv), dropout {cfg.dropout}")
        if cfg.num_local_experts:
            self.log.info(f"mixture of experts: {cfg.num_local_experts} experts per layer, {cfg.num_experts_per_tok} "
                          f"per token: {self.model.active_params() / 1e6:.2f}M active params; router losses "
                          f"{cfg.router_aux_loss_coef} x aux + {cfg.router_z_loss_coef} x z")
        decay = f", decay over the last {a.decay_fraction:.0%} of the steps" if a.lr_schedule == "wsd" else ""
        self.log.info(f"optimizer: {self.optimizer.describe()}; {a.lr_schedule} schedule, "
                      f"warmup {a.warmup_iters}{decay}")
        self.log.info(f"data: {a.data_path}: {len(self.train_set):,} samples x {a.max_seq_len} tokens; "
                      f"{self.step_samples} samples (<= {tokens_per_step:,} tokens) per step; "
                      f"{self.steps_per_epoch:,} steps/epoch; training to step {self.total_steps:,}"
                      + (f"; grouped by length in blocks of {a.group_by_length:,}" if a.group_by_length else ""))
        self.log.info("flags: " + ", ".join(f"{k}={v!r} ({self.sources[k]})" for k, v in sorted(vars(a).items())),
                      console=False)
        if self.val_set is None:
            self.log.info(f"no validation data at {a.val_data_path}: evaluation skipped")
        if a.resume:
            from_ckpt = sorted(k for k, s in self.sources.items() if s == "checkpoint")
            self.log.info(f"resumed from {self.ckpt_path} at step {self.step} (epoch {self.position['epoch']}, "
                          f"sample {self.position['sample']}); {len(from_ckpt)} flags from the checkpoint")
        elif self.ckpt_path is not None:
            self.log.info(f"note: --overwrite: starting fresh; the first save replaces {self.ckpt_path}")
        if self.peak is not None:
            self.log.info(f"MFU against {self.peak / 1e12:.3g} TFLOP/s per device ({self.peak_source})")
        elif d.is_main:
            self.log.info(f"MFU not shown: {self.peak_source}")

    # -- loop ----------------------------------------------------------------------------------------------

    def fit(self) -> None:
        a, d = self.args, self.d
        steps = iterate_steps(self.train_set, self.task.collate, a, d, self.position)
        no_sync = self.parallel.no_sync
        # disable=None: no bar when stderr is not a terminal (CI, nohup); log lines still print
        bar = tqdm(total=self.total_steps, initial=self.step, disable=None if d.is_main else True, unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        try:
            if self.step == 0 and self.task.eval_at_start and self.val_set is not None:
                self._evaluate()
            while self.step < self.total_steps:
                batch = next(steps)
                lrs = self.optimizer.set_lr(partial(lr_at, self.step, warmup=a.warmup_iters, total=self.total_steps,
                                                    schedule=a.lr_schedule, decay_fraction=a.decay_fraction))
                torch.manual_seed(step_seed(a.seed, d.rank, self.step))
                batches, extra = self.task.prepare_step(self.model, batch.batches, self.step)
                means = train_step(self.forward_model, self.optimizer, self.scaler, batches, device=d.device,
                                   autocast=self.autocast, grad_clip=a.grad_clip, world_size=d.world_size,
                                   no_sync=no_sync, task=self.task)
                self.step += 1
                self.position = batch.position
                self.progress.add_step({**means, **extra}, sum(self.task.batch_tokens(b) for b in batches))
                bar.update()

                stop = self.stop.agreed(d)
                end = self.step == self.total_steps
                if self.step % a.log_interval == 0 or end or stop:
                    self._check_finite()
                    self.progress.report(self.step, self.total_steps, lrs, self.position["epoch"], bar)
                if (a.eval_interval and self.step % a.eval_interval == 0 or end) and not stop:  # after progress
                    self._evaluate(final=end)
                if self.step % a.save_interval == 0 or end or stop:
                    self._save()
                if stop:
                    self.log.info(f"stopped by {signal.Signals(stop).name} at step {self.step}; "
                                  f"resume with --resume")
                    raise SystemExit(128 + stop)
            self.log.info(f"peak memory: {peak_memory(d.device)}; {self.parallel.memory(self.model, self.optimizer)}")
            self._export_hf(self.parallel.full_model(self.model, torch.device("cpu")))
        finally:
            bar.close()
            self.log.close()

    def _check_finite(self, weights: bool = False) -> None:
        """Raise if a step's loss was nan/inf (one host sync, at log and save points only; every step is in
        a window that is checked before it is logged). weights=True also checks the parameters, which the
        latest update changed after the last loss was computed: a checkpoint is only written when its weights
        are finite."""
        steps = self.progress.window.means
        losses = torch.stack([m["loss"] for m in steps]) if steps else torch.zeros(0)
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        first_bad = self.step - len(steps) + 1 + bad[0] if bad else self.total_steps + 1
        if weights and not all(bool(torch.isfinite(local_part(p)).all()) for p in self.model.parameters()):
            first_bad = min(first_bad, self.step)
        if self.d.world_size > 1:  # every rank must agree to stop
            flag = torch.tensor([first_bad])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.d.control_group)
            first_bad = int(flag)
        if first_bad <= self.total_steps:
            kept = (f"kept the last good checkpoint {self.ckpt_path} (step {self.last_saved_step})"
                    if self.last_saved_step is not None else "no checkpoint was saved")
            remedies = ["a lower --learning_rate"] + (["--grad_clip 1.0"] if not self.args.grad_clip else []) \
                + (["--dtype float32"] if self.dtype != torch.float32 else [])
            msg = f"loss or weights became nan/inf at step {first_bad}: stopping, {kept}. Try {' or '.join(remedies)}"
            self.log.info(msg, console=False)  # main() prints it as the exit message
            raise TrainingError(msg)

    def _evaluate(self, final: bool = False) -> None:
        """Validation metrics, the --sample_prompt continuations and curves.png (always at the run's end, the
        final evaluation); kept out of tokens/s."""
        start = time.perf_counter()
        values: dict[str, Any] = {}
        if self.val_set is not None:
            values = self.task.validate(self.model, self.val_set, self.args, self.d, self.autocast)
            self.log.info(f"eval step {self.step} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}"
                                                                   for k, v in values.items()))
        sampled = self.args.sample_tokens and self.args.sample_prompt
        whole = self.parallel.full_model(self.model, self.d.device) if self.args.eval_tasks or sampled else None
        if self.d.is_main and self.args.eval_tasks:
            from support.inference import evaluation

            values.update(evaluation.in_training(whole, self.tokenizer, self.args.eval_tasks,
                                                 self.args.eval_tasks_limit or None, self.task.name != "pretrain",
                                                 self.autocast, self.log.info))
        if self.d.is_main and sampled:
            values["samples"] = greedy_samples(whole, self.task, self.tokenizer, self.args.sample_prompt,
                                               self.args.sample_tokens, self.autocast, self.d.device)
            for prompt, text in values["samples"].items():
                self.log.info(f"sample step {self.step} | {prompt!r} -> {text!r}")
        if values:
            self.log.metrics(self.step, values)
        if self.d.is_main:
            self.progress.draw_curves(self.out_dir, final)
        self.progress.leave_out(time.perf_counter() - start)  # keep evaluation out of tokens/s

    def _save(self) -> None:
        self._check_finite(weights=True)
        meta = {
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "step": self.step,
            "data_position": self.position,
            "args": vars(self.args),
            "model_config": config_to_dict(self.model.config),
            "vocab_size": self.model.config.vocab_size,
            "tokenizer_fingerprint": self.fingerprint,
            "world_size": self.d.world_size,
            **self.task.rebuild_state(self.model),
        }
        self.ckpt_path = self.parallel.save(self.out_dir, meta, partial(self.task.model_weights, self.model),
                                            self.optimizer)
        self.log.info(f"saved {self.ckpt_path} (step {self.step})")
        self.last_saved_step = self.step

    def _export_hf(self, model: torch.nn.Module | None) -> None:  # the whole model on rank 0, else None
        if self.d.is_main:
            hf_dir = self.task.export(model, self.out_dir, self.tokenizer)
            self.log.info(f"exported {hf_dir} (AutoModelForCausalLM / AutoTokenizer)")


def resume_state(given: argparse.Namespace, args: argparse.Namespace, ckpt_path: Path | None,
                 out_dir: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from (None for a fresh run), after the rules that keep work from being lost.
    A DCP checkpoint's dict comes without its weights: each rank loads its own shards (fsdp.py)."""
    if args.resume and args.overwrite:
        raise ValueError("--resume continues out_dir's checkpoint, --overwrite replaces it: pass one of them")
    if not args.resume:
        if not args.overwrite and ckpt_path is not None:
            # a fresh run would replace hours of training at its first save: make the user say so
            raise FileExistsError(f"{ckpt_path} already exists: --resume continues that run, --overwrite "
                                  f"starts over and replaces it, or choose another --out_dir")
        return None
    state = load_checkpoint(ckpt_path or out_dir, dcp_weights=False)
    required = ("data_position", "args") + (("optimizer",) if ckpt_path.is_file() else ())  # DCP: in the shards
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{ckpt_path}: cannot resume, checkpoint is missing key(s) {missing}")
    check_resume_flags(given, state["args"], ckpt_path)
    check_resume_experts(given, state["model_config"], ckpt_path)
    return state


def train(given: argparse.Namespace, task: Task) -> None:
    """Run one training job (single process or one torchrun rank) to the end, or until stopped."""
    d = setup_distributed(resolve_args(given, task)[0].device)
    try:
        with StopRequest(announce=d.is_main) as stop:
            Trainer(given, task, d, stop).fit()
    except BaseException as e:
        if d.world_size > 1:
            traceback.clear_frames(e.__traceback__)  # the frames' locals hold the DDP model: see below
        raise
    finally:
        if dist.is_initialized():
            # Free the DDP model before its process group. Otherwise the group dies last, from DDP's C++
            # reducer, which joins gloo's worker threads while holding the GIL: a deadlock whenever a worker
            # still needs the GIL to release a tensor (seen as a hung rank at exit; pytorch issue 56297).
            gc.collect()
            dist.destroy_process_group()


def main(task: Task, argv: list[str] | None = None) -> None:
    """Script entry point: bad input (missing, corrupt or mismatched files, an occupied out_dir, a bad flag
    value) and a diverged run end with their one-line message, which names the file, flag or step, and exit
    status 1."""
    given = build_parser(task).parse_args(argv)
    try:
        train(given, task)
    except (TrainingError, FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
