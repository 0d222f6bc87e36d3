"""Reinforcement learning with verifiable rewards: GRPO (Shao et al. 2024) on an SFT model.

    python ddp_grpo.py --reward rewards.py:exact_answer                        # from out/sft, out/data/grpo_train.jsonl
    python ddp_grpo.py --reward rewards.py:exact_answer --reward rewards.py:answer_format --reward_weights 1 0.2
    python ddp_grpo.py --reward my_rewards.py:length_penalty --loss_type dapo --epsilon_high 0.28
    torchrun --nproc_per_node=8 ddp_grpo.py --reward rewards.py:exact_answer --batch_size 4
    python ddp_grpo.py --tools tools.py --reward rewards.py:exact_answer --data_path out/data/tools_rl_train.jsonl

Data: one JSON object per line with a "prompt" (a string: the user's message; or a list of {"role",
"content"} messages, whose completions the reward functions then get as messages too) and any other columns,
which the reward functions get by name (TRL's convention, rewards.py: a reward file written for TRL runs).
Each step takes batch_size prompts per process and accumulation step, samples --num_generations completions
of each with the model as it is (KV-cache decoding, batched), scores them, and trains on them:

    advantage of completion i of a group: A_i = r_i - mean(r_group), divided by (std(r_group) + 1e-4) with
        --scale_rewards group (std with Bessel's correction, as TRL); r = sum of the weighted rewards, a None
        counting as 0; a completion that no function judged (all None) is left out of its group's mean and std
        and gets A = 0 (TRL's nanmean / nanstd)
    per token: -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta KL, rho = pi / pi_old and
        KL = exp(ref - logp) - (ref - logp) - 1 (k3 estimator) against the frozen --init_from model; pi and ref
        are softmax(logits / --temperature), the distribution the completions are sampled from (as TRL)
    --loss_type grpo: mean over completions of each one's token mean; dr_grpo: token sum / (completions x
        --max_completion_length); dapo: token sum / completion tokens, over the whole step on every process

--tools FILE.py makes a rollout multi-turn (support/inference/tool_loop.py): the prompts list the file's functions,
a completion's tool calls run and their results are appended as the template's tool turns, and generation goes
on, up to --max_tool_rounds rounds of calls and --max_completion_length tokens in all. The loss is on the model's
own tokens only (never a tool result or a token the template put in); the reward functions see the whole
trajectory: a string prompt's completion is the final answer's text, a message-list prompt's the assistant and
tool messages (TRL's conversational form), and every function gets num_tool_calls. Each generation round of a
completion samples from its own seeded generator, so tools keep 2 processes = 1 and resume = uninterrupted.

One optimizer step per batch of rollouts, so pi_old is the policy itself (rho = 1 with its gradient, clipping
inactive, as TRL with num_iterations=1). A group's completions stay on one process, so its statistics are
local; step metrics are summed over processes. Every completion draws its tokens from a generator seeded by
(seed, step, prompt, completion): a resumed run, or one with another process count or batch split, samples
the same completions. The loop (checkpoints, DDP or FSDP, bf16, logs) is trainer.py's; under --parallel fsdp
the rollouts decode with a whole copy of the policy gathered on each process (support/training/fsdp.py whole_model).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import TrainerState

import trainer
from dataset import chat_prompt_ids, decode_json
from ddp_sft_full import SFT
from k_model import Transformer
from support.inference.rollouts import completion_seed, sample_completions
from support.inference.tool_loop import Trajectory, load_tools, run_tool_loop
from support.training.fsdp import whole_model
from support.loading.sources import check_model_tokenizer, resolve_dtype
from rewards import Reward, check_columns, load_rewards, score

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


# ----------------------------------------------------------------------------------------------------------
# The loss (TRL's definitions)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str) -> torch.Tensor:
    """rewards (N,), groups of group_size consecutive completions of one prompt -> advantages (N,). A NaN reward
    (no function judged the completion) is left out of its group's mean and std, and its advantage is 0; so is
    that of a group's only judged completion, whose std is undefined."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.nanmean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (nan_std(grouped) + 1e-4)
    return advantages.nan_to_num(0.0).reshape(-1)


def nan_std(grouped: torch.Tensor) -> torch.Tensor:
    """(groups, G) -> (groups, 1): each row's std over its non-NaN values, with Bessel's correction (torch has no
    nanstd); NaN where fewer than two values are."""
    count = (~grouped.isnan()).sum(dim=1, keepdim=True)
    squares = ((grouped - grouped.nanmean(dim=1, keepdim=True)) ** 2).nansum(dim=1, keepdim=True)
    return (squares / (count - 1)).sqrt()


class TokenTerms(NamedTuple):
    loss: torch.Tensor  # (N, T) per-token loss
    clipped: torch.Tensor  # (N, T) 1.0 where the clipped term is the one taken
    kl: torch.Tensor  # (N, T) k3 estimate of KL(pi || ref); zeros without a reference


def token_terms(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                epsilon_high: float, beta: float, ref_logps: torch.Tensor | None) -> TokenTerms:
    """Per-token clipped surrogate plus beta x KL; logps (N, T) of the sampled tokens, advantages (N,)."""
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * a
    loss = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return TokenTerms(loss, (clipped < unclipped).float(), kl.detach())


def loss_units(mask: torch.Tensor, loss_type: str, max_completion_length: int) -> torch.Tensor:
    """What the step's loss is divided by, summed over processes and micro-batches: completions (grpo),
    completions x max_completion_length (dr_grpo) or completion tokens (dapo)."""
    if loss_type == "dapo":
        return mask.sum()
    rows = torch.tensor(float(mask.shape[0]))
    return rows * max_completion_length if loss_type == "dr_grpo" else rows


def loss_sum(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The numerator that loss_units divides: each completion's token mean summed (grpo), or the token sum."""
    token_sums = (per_token * mask).sum(dim=1)
    if loss_type == "grpo":
        return (token_sums / mask.sum(dim=1).clamp(min=1)).sum()
    return token_sums.sum()


# ----------------------------------------------------------------------------------------------------------
# Prompts


class Prompt(NamedTuple):
    index: int  # record number in the file: with the step, it seeds the completions' sampling
    ids: list[int]  # the prompt in the chat template, ending with the assistant's generation prompt
    row: str  # "path:line", for messages about this record
    prompt: Any  # the "prompt" value as given (passed to reward functions as `prompts`)
    columns: dict[str, Any]  # every other key of the record


def prompt_messages(value: Any) -> list[dict[str, str]]:
    """A string is the user's message; a list must be {"role", "content"} messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError('"prompt" must be a string or a list of {"role", "content"} messages')


class PromptDataset(Dataset):
    """The prompts of a JSONL file, tokenized up front (prompt sets are small), with the `tools` schemas listed
    when given (and enable_thinking=False: an empty think block after the generation prompt). A prompt that
    leaves fewer than max_completion_length tokens of context is skipped, and the count is said on stderr."""

    def __init__(self, path: str, tokenizer: Any, max_prompt_len: int, tools: list[dict] | None = None,
                 enable_thinking: bool | None = None):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        self.items: list[Prompt] = []
        self.columns: set[str] | None = None
        too_long = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                row = f"{path}:{lineno}"
                try:
                    record = decode_json(raw)
                    if not isinstance(record, dict) or "prompt" not in record:
                        raise ValueError('expected a JSON object with a "prompt"')
                    ids = chat_prompt_ids(tokenizer, prompt_messages(record["prompt"]), tools, enable_thinking)
                except ValueError as e:
                    raise ValueError(f"{row}: {e}") from None
                columns = {k: v for k, v in record.items() if k != "prompt"}
                keys = set(columns)
                self.columns = keys if self.columns is None else self.columns & keys
                if len(ids) > max_prompt_len:
                    too_long += 1
                    continue
                self.items.append(Prompt(lineno - 1, ids, row, record["prompt"], columns))
        if too_long:
            tqdm.write(f"warning: {path}: skipped {too_long:,} prompt(s) longer than {max_prompt_len} tokens "
                       f"(--max_seq_len minus --max_completion_length)", file=sys.stderr)
        if not self.items:
            raise ValueError(f"{path}: no prompt fits in {max_prompt_len} tokens" if too_long
                             else f"{path}: empty file")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Prompt:
        return self.items[i]


# ----------------------------------------------------------------------------------------------------------
# Rollouts


class Rollouts(NamedTuple):
    """One micro-batch of completions as training rows: prompt + completion, right-padded."""
    x: torch.Tensor  # (N, T) int64
    y: torch.Tensor  # (N, T) int64
    mask: torch.Tensor  # (N, T) float32: 1 on completion tokens (the closing EOS included)
    advantages: torch.Tensor  # (N,)
    ref_logps: torch.Tensor | None  # (N, T) the reference's log-probs of y, with beta > 0
    units_per_token: float  # the step's loss units / its completion tokens (all processes): token-mean metrics


def training_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                  generated: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y, mask for prompt + completion rows, right-padded, mask on the completion's targets: on those the
    model generated (generated[i][j] = 1; all of them when not given), never on a tool's result."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, seqs)) - 1
    x = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    y, mask = x.clone(), torch.zeros(len(seqs), width)
    for i, (seq, p) in enumerate(zip(seqs, prompts)):
        n = len(seq) - 1
        x[i, :n], y[i, :n] = torch.tensor(seq[:-1]), torch.tensor(seq[1:])
        mask[i, len(p) - 1 : n] = 1 if generated is None else torch.tensor(generated[i], dtype=mask.dtype)
    return x, y, mask


def token_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | x_<=t) on the masked positions, 0 elsewhere. (N, T) float32"""
    return -model(x, y, loss_mask=mask).last_loss.view_as(mask)


class Tempered:
    """Inside `with tempered:` the models' logits are divided by the temperature: the forward passes that score
    completions (the loss's, the reference's) then give log softmax(logits / T), the distribution the rollouts
    sample from, as TRL computes both. A forward hook divides each model's final norm output, which only the
    vocabulary projection reads, a linear map without bias: so the logits are divided, and the chunked
    cross-entropy, which never holds all the logits, needs no change. The hooks stay registered (a compiled
    model keeps its graphs) and pass the output through outside the block; at T = 1 there are none."""

    def __init__(self, temperature: float, models: list[Transformer]):
        self.temperature, self.active = temperature, False
        for model in models if temperature != 1 else []:
            model.norm.register_forward_hook(self._divide)

    def _divide(self, norm: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return out / self.temperature if self.active else out

    def __enter__(self) -> None:
        self.active = True

    def __exit__(self, *exc: object) -> None:
        self.active = False


# ----------------------------------------------------------------------------------------------------------
# The task


class GRPO(SFT):
    name = "grpo"
    router_losses = False  # its own loss_sums: an MoE model's router losses are not added (docs/moe.md)
    description = __doc__
    may_lack_targets = False  # a prompt with no room for a completion is skipped by PromptDataset
    eval_at_start = True  # RL's baseline is the model it starts from: evaluate it before the first step
    defaults = dict(
        SFT.defaults,
        init_from="out/sft",
        data_path="out/data/grpo_train.jsonl",
        val_data_path="out/data/grpo_val.jsonl",
        out_dir="out/grpo",
        sample_prompt=None,
        batch_size=8,  # prompts: x num_generations completions per micro-batch
        learning_rate=1e-5,
        warmup_iters=0,
        weight_decay=0.0,
        save_interval=50,
        eval_interval=50,
        eval_samples=256,
        num_generations=8,
        max_completion_length=64,
        temperature=1.0,
        scale_rewards="group",
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=None,
        beta=0.0,
        reward=None,
        reward_weights=None,
        tools=None,
        max_tool_rounds=3,
        no_thinking=False,
    )

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        super().add_flags(parser)
        d = self.defaults
        g = parser.add_argument_group("GRPO")
        g.add_argument("--reward", action="append", help="FILE.py:FUNCTION, a reward function (rewards.py's "
                       "docstring; e.g. rewards.py:exact_answer); repeat for several")
        g.add_argument("--reward_weights", type=float, nargs="+", help="one weight per --reward (default: 1 each)")
        g.add_argument("--num_generations", type=int, help="completions per prompt: the group whose mean reward is "
                       f"the baseline (default: {d['num_generations']})")
        g.add_argument("--max_completion_length", type=int, help="tokens per completion at most "
                       f"(default: {d['max_completion_length']})")
        g.add_argument("--temperature", type=float, help="sampling temperature; the loss's log-probs are of "
                       f"softmax(logits / temperature) too (default: {d['temperature']})")
        g.add_argument("--scale_rewards", choices=["group", "none"], help="group: divide advantages by the group's "
                       f"reward std; none: Dr. GRPO's unscaled r - mean (default: {d['scale_rewards']})")
        g.add_argument("--loss_type", choices=LOSS_TYPES, help="token normalisation (module docstring) "
                       f"(default: {d['loss_type']})")
        g.add_argument("--epsilon", type=float, help=f"lower clipping range of the ratio (default: {d['epsilon']})")
        g.add_argument("--epsilon_high", type=float, help="upper clipping range (DAPO: 0.28) (default: --epsilon)")
        g.add_argument("--tools", help="FILE.py whose functions the model may call (tools.py: a calculator): multi-turn "
                       "rollouts (module docstring)")
        g.add_argument("--max_tool_rounds", type=int, help="rounds of tool calls per completion at most "
                       f"(default: {d['max_tool_rounds']})")
        g.add_argument("--no_thinking", action="store_true", default=None, help="the chat template's "
                       "enable_thinking=False: every generation prompt gets an empty think block, so a model trained "
                       "to think answers at once (rollouts and evaluation)")
        g.add_argument("--beta", type=float, help="KL coefficient to the --init_from model; 0 loads no reference "
                       f"(default: {d['beta']})")

    # -- set-up --------------------------------------------------------------------------------------------

    def prepare(self, model: torch.nn.Module, args: argparse.Namespace, tokenizer: Any, device: torch.device) -> None:
        """Check the flags, load the reward functions (a bad file fails here) and, with beta > 0, the reference."""
        if args.num_generations < 2:
            raise ValueError(f"--num_generations must be >= 2 (a group's mean is the baseline), got "
                             f"{args.num_generations}")
        if args.max_completion_length < 1:
            raise ValueError(f"--max_completion_length must be >= 1, got {args.max_completion_length}")
        if args.max_completion_length >= args.max_seq_len:
            raise ValueError(f"--max_completion_length {args.max_completion_length} leaves no room for a prompt in "
                             f"--max_seq_len {args.max_seq_len}")
        if args.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 (a group of greedy completions is one completion), "
                             f"got {args.temperature}")
        if args.beta < 0 or args.epsilon < 0 or (args.epsilon_high or 0) < 0:
            raise ValueError("--beta, --epsilon and --epsilon_high must be >= 0")
        if args.num_workers:
            raise ValueError("--num_workers must be 0: rollouts sample from the model being trained")
        if args.max_tool_rounds < 0:
            raise ValueError(f"--max_tool_rounds must be >= 0, got {args.max_tool_rounds}")
        self.tools = load_tools(args.tools) if args.tools else None
        self.enable_thinking = False if args.no_thinking else None  # None: the template's default, the model decides
        self.args, self.device, self.tokenizer = args, device, tokenizer
        self.rewards: list[Reward] = load_rewards(args.reward, args.reward_weights)
        self.dtype = resolve_dtype(args.dtype, device)
        self.autocast = trainer.autocast_factory(device, self.dtype)
        self.reference = self._load_reference(args, tokenizer) if args.beta > 0 else None
        self.steps_done, self.noted = 0, set()
        self.log_extra, self.log_metric = self._unrecorded("log_extra"), self._unrecorded("log_metric")
        self.tempered = Tempered(args.temperature, [model] + ([self.reference] if self.reference is not None else []))
        names = [f"reward_{r.short_name}" for r in self.rewards]
        self.metrics = ("loss", "reward", "reward_std", *(f"{n}{s}" for n in names for s in ("", "_std")),
                        "completion_len", "truncated", "zero_std_groups", "clipped", "kl", "rollout_s",
                        *(("tool_use",) if self.tools else ()))

    def _load_reference(self, args: argparse.Namespace, tokenizer: Any) -> Transformer:
        start = self.initial_model(args, tokenizer)
        check_model_tokenizer(start, tokenizer, args.tokenizer_path)
        return start.model.float().to(self.device).eval().requires_grad_(False)

    def dataset(self, path: str, tokenizer: Any, args: argparse.Namespace) -> PromptDataset:
        prompts = PromptDataset(path, tokenizer, args.max_seq_len - args.max_completion_length,
                                self.tools.schemas if self.tools else None, self.enable_thinking)
        check_columns(self.rewards, prompts.columns or set(), path)
        return prompts

    def collate(self, items: list[Prompt]) -> list[Prompt]:
        return items

    # -- rollouts ------------------------------------------------------------------------------------------

    def prepare_step(self, model: torch.nn.Module, batches: list[list[Prompt]], step: int
                     ) -> tuple[list[Rollouts], dict[str, torch.Tensor]]:
        """Sample and score num_generations completions of every prompt, with the model as it is now."""
        began = time.perf_counter()
        a, G = self.args, self.args.num_generations
        done = []
        model.eval()
        with whole_model(model, self.dtype) as policy:  # under --parallel fsdp a gathered copy
            for prompts in batches:
                rows = [p for p in prompts for _ in range(G)]
                seeds = [(a.seed, step, p.index, k) for p in prompts for k in range(G)]
                trajectories = self._trajectories(policy, rows, a.temperature, seeds)
                done.append((rows, trajectories, self._score(rows, trajectories, step)))
        model.train()
        stats = self._rollout_stats(done)
        units_per_token = float(stats["units"] / stats["tokens"])
        batches = [self._rollouts(rows, trajectories, rewards, units_per_token) for rows, trajectories, rewards in done]
        extra = self._rollout_metrics(stats)
        extra["rollout_s"] = torch.tensor(time.perf_counter() - began, device=self.device)  # the loop averages ranks
        self.steps_done = step + 1  # what an evaluation after this step tells the reward functions
        return batches, extra

    def _trajectories(self, policy: Transformer, rows: list[Prompt], temperature: float,
                      seeds: list[tuple[int, int, int, int]] | None = None) -> list[Trajectory]:
        """Each row's completion (with --tools, its rounds of calls and results): temperature 0 greedy, else
        row i's round r draws from a generator seeded by completion_seed(*seeds[i], r), whatever batch it is in."""
        a, tok = self.args, self.tokenizer

        def generate(indices: list[int], prompts: list[list[int]], max_new_tokens: int, round_: int) -> list[list[int]]:
            generators = None if seeds is None else [
                torch.Generator().manual_seed(completion_seed(*seeds[i], round_)) for i in indices]
            with self.autocast():
                return sample_completions(policy, prompts, max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                                          temperature, generators)

        return run_tool_loop(generate, [p.ids for p in rows], tok, self.tools, a.max_completion_length,
                             a.max_tool_rounds, self.enable_thinking)

    def _score(self, rows: list[Prompt], trajectories: list[Trajectory], steps_done: int) -> torch.Tensor:
        """Each function's reward of each completion, the function called as TRL's GRPOTrainer calls it: a prompt
        given as messages gets its completion as messages (TRL's conversational format: the assistant's, and
        with tools the tool results), a string prompt the text of the final answer."""
        shown = [t.messages if isinstance(p.prompt, list) else t.answer for p, t in zip(rows, trajectories)]
        columns = {k: [p.columns.get(k) for p in rows] for k in rows[0].columns}
        return score(self.rewards, shown, [p.prompt for p in rows], columns, [p.row for p in rows],
                     completion_ids=[t.ids for t in trajectories], num_tool_calls=[t.num_calls for t in trajectories],
                     trainer_state=self._trainer_state(steps_done), log_extra=self.log_extra,
                     log_metric=self.log_metric)

    def _trainer_state(self, steps_done: int) -> TrainerState:
        """What TRL passes reward functions as trainer_state (a curriculum reads global_step / max_steps)."""
        a, rank = self.args, dist.get_rank() if dist.is_initialized() else 0
        return TrainerState(epoch=steps_done / self.steps_per_epoch, global_step=steps_done, max_steps=self.total_steps,
                            num_train_epochs=math.ceil(self.total_steps / self.steps_per_epoch),
                            train_batch_size=a.batch_size, logging_steps=a.log_interval, eval_steps=a.eval_interval,
                            save_steps=a.save_interval, is_world_process_zero=rank == 0,
                            is_local_process_zero=int(os.environ.get("LOCAL_RANK", 0)) == 0)

    def _unrecorded(self, kind: str) -> Callable[[str, Any], None]:
        """TRL's log_extra(column, values) / log_metric(name, value) for reward functions: accepted, so that TRL's
        reward files run, but not recorded (the progress lines and metrics.jsonl keep the columns a run starts
        with); rank 0 says so once per name."""
        def log(name: str, value: Any) -> None:
            if (kind, name) not in self.noted and (not dist.is_initialized() or dist.get_rank() == 0):
                tqdm.write(f"note: a reward function's {kind}({name!r}, ...) is not recorded by ddp_grpo.py",
                           file=sys.stderr)
            self.noted.add((kind, name))

        return log

    def _rollouts(self, rows: list[Prompt], trajectories: list[Trajectory], per_function: torch.Tensor,
                  units_per_token: float) -> Rollouts:
        a = self.args
        x, y, mask = training_rows([p.ids for p in rows], [t.ids for t in trajectories], self.tokenizer.pad_token_id,
                                   [t.generated for t in trajectories])
        advantages = group_advantages(weighted(per_function, self.rewards), a.num_generations, a.scale_rewards)
        ref = None
        if self.reference is not None:
            with torch.no_grad(), self.autocast(), self.tempered:
                ref = token_logps(self.reference, x.to(self.device), y.to(self.device), mask.to(self.device))
        return Rollouts(x, y, mask, advantages, ref, units_per_token)

    def _rollout_stats(self, done: list[tuple[list[Prompt], list[Trajectory], torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Sums over this step's completions on every process: counts, rewards, lengths (the tokens the model
        generated, which the loss trains on), completions that called a tool, group spreads."""
        a, G = self.args, self.args.num_generations
        per_function = torch.cat([r for _, _, r in done])  # (N, F)
        trajectories = [t for _, ts, _ in done for t in ts]
        lengths = torch.tensor([float(sum(t.generated)) for t in trajectories])
        truncated = torch.tensor([float(t.ids[-1] != self.tokenizer.eos_token_id) for t in trajectories])
        total = weighted(per_function, self.rewards).view(-1, G)  # NaN: judged by no function
        group_stds = nan_std(total)  # NaN: fewer than two judged
        judged = ~per_function.isnan()
        values = per_function.nan_to_num(0.0)
        rows = torch.tensor(float(len(lengths)))
        units = {"grpo": rows, "dr_grpo": rows * a.max_completion_length, "dapo": lengths.sum()}[a.loss_type]
        stats = dict(rows=rows, tokens=lengths.sum(), units=units, truncated=truncated.sum(),
                     tool_use=torch.tensor(float(sum(t.num_calls > 0 for t in trajectories))),
                     reward=total.nansum(), judged_rows=(~total.isnan()).float().sum(),
                     group_std=group_stds.nansum(), std_groups=(~group_stds.isnan()).float().sum(),
                     zero_std=(group_stds == 0).float().sum(), groups=torch.tensor(float(total.shape[0])),
                     judged=judged.float().sum(0), sums=values.sum(0), squares=(values**2).sum(0))
        if dist.is_initialized():
            flat = torch.cat([v.reshape(-1) for v in stats.values()]).to(self.device)
            dist.all_reduce(flat)
            sizes = [v.numel() for v in stats.values()]
            stats = {k: v.view_as(stats[k]).cpu() for k, v in zip(stats, flat.split(sizes))}
        return stats

    def _rollout_metrics(self, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step's rollout metrics (the same on every process: the loop averages the processes' values): reward
        over the completions some function judged, reward_std the mean std of the groups with two of them."""
        means = s["sums"] / s["judged"].clamp(min=1)
        stds = (s["squares"] / s["judged"].clamp(min=1) - means**2).clamp(min=0).sqrt()
        m = {"reward": s["reward"] / s["judged_rows"], "reward_std": s["group_std"] / s["std_groups"]}
        for j, r in enumerate(self.rewards):
            m[f"reward_{r.short_name}"], m[f"reward_{r.short_name}_std"] = means[j], stds[j]
        m.update(completion_len=s["tokens"] / s["rows"], truncated=s["truncated"] / s["rows"],
                 zero_std_groups=s["zero_std"] / s["groups"])
        if self.tools:
            m["tool_use"] = s["tool_use"] / s["rows"]
        return {k: v.to(self.device) for k, v in m.items()}

    # -- the loss ------------------------------------------------------------------------------------------

    def loss_units(self, batch: Rollouts) -> torch.Tensor:
        return loss_units(batch.mask, self.args.loss_type, self.args.max_completion_length)

    def batch_tokens(self, batch: Rollouts) -> int:
        return batch.x.numel()

    def loss_sums(self, model: torch.nn.Module, batch: Rollouts, device: torch.device) -> dict[str, torch.Tensor]:
        a = self.args
        x, y, mask, advantages = (t.to(device, non_blocking=True) for t in batch[:4])
        with self.tempered:
            logps = token_logps(model, x, y, mask)
        terms = token_terms(logps, logps.detach(), advantages, a.epsilon, a.epsilon_high or a.epsilon, a.beta,
                            batch.ref_logps)
        per_token = {k: (v * mask).sum() * batch.units_per_token for k, v in (("clipped", terms.clipped),
                                                                             ("kl", terms.kl))}
        return {"loss": loss_sum(terms.loss, mask, a.loss_type), **per_token}

    # -- evaluation ----------------------------------------------------------------------------------------

    def validate(self, model: torch.nn.Module, dataset: PromptDataset, args: argparse.Namespace,
                 d: trainer.DistInfo, autocast: Any) -> dict[str, float]:
        """Greedy completions of the first --eval_samples held-out prompts, scored: the mean of each reward over
        the completions it judged (an exact-answer reward's is the accuracy), of the weighted sum over those some
        function judged, of the completion length (generated tokens) and with --tools the share of completions
        that called a tool (on prompts that need none: the rate of needless calls)."""
        n = min(len(dataset), args.eval_samples)
        mine = [dataset[i] for i in range(d.rank, n, d.world_size)]
        F = len(self.rewards)
        sums = torch.zeros(2 * F + 4)  # per function: judged count, sum; weighted total, judged rows, length, tool use
        model.eval()
        with whole_model(model, self.dtype) as policy:
            for i in range(0, len(mine), args.batch_size * args.num_generations):
                rows = mine[i : i + args.batch_size * args.num_generations]
                trajectories = self._trajectories(policy, rows, temperature=0.0)
                per_function = self._score(rows, trajectories, self.steps_done)
                total = weighted(per_function, self.rewards)
                sums += torch.cat([(~per_function.isnan()).float().sum(0), per_function.nan_to_num(0.0).sum(0),
                                   torch.stack([total.nansum(), (~total.isnan()).float().sum()]),
                                   torch.tensor([float(sum(sum(t.generated) for t in trajectories)),
                                                 float(sum(t.num_calls > 0 for t in trajectories))])])
        model.train()
        if d.world_size > 1:
            sums = sums.to(d.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        judged, totals, (reward, judged_rows, length, used) = sums[:F], sums[F : 2 * F], sums[2 * F :].tolist()
        out = {"val_reward": reward / judged_rows if judged_rows else float("nan")}
        for r, c, t in zip(self.rewards, judged.tolist(), totals.tolist()):
            out[f"val_reward_{r.short_name}"] = t / c if c else float("nan")
        out["val_completion_len"] = length / n
        if self.tools:
            out["val_tool_use"] = used / n
        return out


def weighted(per_function: torch.Tensor, rewards: list[Reward]) -> torch.Tensor:
    """(N, F) rewards, NaN = not judged -> (N,) weighted sums, a NaN counting as 0 (TRL's nansum); NaN where no
    function judged the completion (TRL: an unscorable one)."""
    weights = torch.tensor([r.weight for r in rewards])
    return (per_function * weights).nansum(dim=1).masked_fill(per_function.isnan().all(dim=1), math.nan)


def main(argv: list[str] | None = None) -> None:
    trainer.main(GRPO(), argv)


if __name__ == "__main__":
    main()
