"""Reward functions for RL with verifiable rewards (ddp_grpo.py), and loading the user's own.

A reward function follows TRL's convention (GRPOTrainer's), so a reward file written for TRL runs unchanged:

    def reward(completions: list, **kwargs) -> list[float | None]

It is called with one value per completion of a batch, by keyword: `completions` (a string, or for a prompt
given as a list of messages, the list [{"role": "assistant", "content": text}]; with ddp_grpo.py --tools, a
string prompt's is the final answer's text and a message prompt's the assistant and tool messages of the whole
trajectory), `prompts` (each record's
"prompt" as given), `completion_ids` (the sampled token ids, the closing EOS included), `num_tool_calls` (the
tool calls run in the completion: ddp_grpo.py --tools; 0 without), every other column of
the prompts' JSONL records (repeated for the completions of one prompt), and `trainer_state` (transformers'
TrainerState: global_step, max_steps, epoch...), `log_extra` and `log_metric` (accepted so that TRL's
reward files run; what they log is not recorded here, which the run notes once per name). The simplest
signature takes what it uses and **kwargs. It returns one float per completion; None means "this function
does not judge this completion" (it is left out of that function's mean, and counts as 0 in the weighted sum),
as when a reward applies to some tasks only. A completion that no function judges is left out of its group's
mean and std and gets advantage 0 (TRL's "unscorable").

`--reward FILE.py:FUNCTION` names one; this file's own are `rewards.py:exact_answer` (the final answer equals
the record's `answer`, checked by math-verify, which reads numbers and LaTeX in their many forms) and
`rewards.py:answer_format` (the answer is stated in a form a verifier reads without guessing) and
`rewards.py:numeric_closeness` (partial credit: how near the final number is to `answer`).
"""
from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from support.cli import import_user_file

RewardFn = Callable[..., Sequence[float | None]]


# what every reward function is called with besides the records' columns, which therefore may not use these names
PASSED = ("completions", "prompts", "completion_ids", "num_tool_calls", "trainer_state", "log_extra", "log_metric")


# ----------------------------------------------------------------------------------------------------------
# Built-in rewards


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """A completion as text: a conversational prompt's completion comes as messages ([{"role": "assistant",
    "content": ...}], with tools the calls' results and later replies too): the last reply's text."""
    if isinstance(completion, str):
        return completion
    return next((m["content"] for m in reversed(completion) if m["role"] == "assistant"), "")


def _gold(answer: Any) -> str:
    """The reference answer as text; GSM8K's answers end with '#### 72' after the worked solution."""
    text = str(answer)
    return text.rsplit("####", 1)[-1].strip() if "####" in text else text


def exact_answer(completions: list[Any], answer: list[Any], **_: Any) -> list[float | None]:
    """1.0 when the completion's final answer equals the record's `answer` (math-verify: '1,059', '1059',
    '$1059$', '\\boxed{1059}' and '3+1056=1059' all answer 1059), else 0.0; None where `answer` itself cannot be
    read as a number or expression."""
    from math_verify import parse, verify  # imported where used: the trainer imports this file's loader too

    scores: list[float | None] = []
    for completion, gold_text in zip(completions, answer):
        gold = parse(_gold(gold_text))
        if not gold:
            scores.append(None)
            continue
        scores.append(float(verify(gold, parse(completion_text(completion)))))
    return scores


def numeric_closeness(completions: list[Any], answer: list[Any], **_: Any) -> list[float | None]:
    """Partial credit for numeric answers: max(0, 1 - |x - gold| / max(|gold|, 1)) for the completion's final
    number x (0.0 without one), so a near miss scores more than a far one; None where `answer` is not a number."""
    scores: list[float | None] = []
    for completion, gold_text in zip(completions, answer):
        gold, found = _number(_gold(gold_text)), _NUMBERS.findall(completion_text(completion))
        if gold is None:
            scores.append(None)
            continue
        x = _number(found[-1]) if found else None
        scores.append(0.0 if x is None else max(0.0, 1.0 - abs(x - gold) / max(abs(gold), 1.0)))
    return scores


_NUMBERS = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


# the answer as the verifier reads it without guessing: in \boxed{...}, or after a final "=" ending the reply
_STATED_ANSWER = re.compile(r"\\boxed\{[^{}]+\}|=\s*-?[\d,]+(\.\d+)?\s*$")


def answer_format(completions: list[Any], **_: Any) -> list[float]:
    """1.0 when the completion states its answer as \\boxed{...} or ends with '= <number>' (as in '42+17=59'),
    else 0.0: a small push towards replies whose answer can be checked."""
    return [1.0 if _STATED_ANSWER.search(completion_text(c).strip()) else 0.0 for c in completions]


# ----------------------------------------------------------------------------------------------------------
# Loading --reward FILE.py:FUNCTION


class Reward(NamedTuple):
    name: str  # FILE.py:FUNCTION as given: what every message about it says
    fn: RewardFn
    weight: float

    @property
    def short_name(self) -> str:
        """The function's name, for metric keys (reward_exact_answer)."""
        return self.name.rsplit(":", 1)[-1]


def load_reward(spec: str, weight: float = 1.0) -> Reward:
    """The function FILE.py:FUNCTION names; FileNotFoundError / ValueError naming the spec where it is not one."""
    file, sep, name = spec.rpartition(":")
    if not sep or not file or not name.isidentifier():
        raise ValueError(f"--reward {spec}: expected FILE.py:FUNCTION, e.g. rewards.py:exact_answer")
    module = import_user_file(file, f"--reward {spec}")
    fn = getattr(module, name, None)
    if not callable(fn):
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
        raise ValueError(f"--reward {spec}: {file} defines no function {name} (its functions: "
                         f"{', '.join(defined) or 'none'})")
    return Reward(spec, fn, weight)


def load_rewards(specs: list[str], weights: list[float] | None) -> list[Reward]:
    """Every --reward, with its --reward_weights entry (1.0 each when not given)."""
    if not specs:
        raise ValueError("no --reward given: name at least one, e.g. --reward rewards.py:exact_answer")
    if weights is not None and len(weights) != len(specs):
        raise ValueError(f"--reward_weights has {len(weights)} value(s) for {len(specs)} --reward function(s)")
    return [load_reward(spec, w) for spec, w in zip(specs, weights or [1.0] * len(specs))]


def check_columns(rewards: list[Reward], columns: set[str], data_path: str) -> None:
    """Before any rollout: no column may take a name of PASSED, and each function's parameters without a default
    must be columns of the data or in PASSED."""
    clash = sorted(columns & set(PASSED))
    if clash:
        raise ValueError(f"{data_path}: column(s) {clash} take the name of what every reward function is passed "
                         f"({', '.join(PASSED)}): rename them")
    given = columns | set(PASSED)
    for r in rewards:
        params = inspect.signature(r.fn).parameters.values()
        needed = [p.name for p in params if p.default is inspect.Parameter.empty
                  and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        missing = [n for n in needed if n not in given]
        if missing:
            raise ValueError(f"reward {r.name} needs column(s) {missing}, which the records of {data_path} lack "
                             f"(they have: {sorted(columns)})")


# ----------------------------------------------------------------------------------------------------------
# Scoring


def score(rewards: list[Reward], completions: list[Any], prompts: list[Any], columns: dict[str, list[Any]],
          rows: list[str], **passed: Any) -> torch.Tensor:
    """(N, F) float32: each function's reward of each completion, NaN where it returned None; `passed`: the rest
    of PASSED. `rows` says where each completion's prompt comes from ('data.jsonl:12'); a function that raises,
    returns the wrong number of values, or a value that is not a finite number, fails with one line naming it
    and the row."""
    out = torch.empty(len(completions), len(rewards))
    for j, r in enumerate(rewards):
        where = _rows_text(rows)
        try:
            values = r.fn(completions=completions, prompts=prompts, **passed, **columns)
        except Exception as e:  # the user's code: one line naming it, not a traceback through ours
            raise ValueError(f"reward {r.name} raised {type(e).__name__}: {e} (scoring {where})") from None
        try:
            values = list(values)
        except TypeError:
            raise ValueError(f"reward {r.name} returned {type(values).__name__}, not a list of floats "
                             f"(scoring {where})") from None
        if len(values) != len(completions):
            raise ValueError(f"reward {r.name} returned {len(values)} value(s) for {len(completions)} completions "
                             f"(scoring {where})")
        for i, v in enumerate(values):
            out[i, j] = _checked(v, r.name, rows[i])
    return out


def _rows_text(rows: list[str]) -> str:
    """'d.jsonl:3' rows as 'rows d.jsonl:3, 7, 12' (each once, in order)."""
    unique = list(dict.fromkeys(rows))
    path = unique[0].rpartition(":")[0]
    if len(unique) == 1 or any(r.rpartition(":")[0] != path for r in unique):
        return ("row " if len(unique) == 1 else "rows ") + ", ".join(unique)
    return f"rows {path}:" + ", ".join(r.rpartition(":")[2] for r in unique)


def _checked(value: Any, name: str, row: str) -> float:
    if value is None:
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"reward {name} returned {value!r} for row {row}: not a number or None") from None
    if not math.isfinite(number):
        raise ValueError(f"reward {name} returned {number} for row {row}: rewards must be finite (None skips)")
    return number
