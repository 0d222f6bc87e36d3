"""lm-evaluation-harness on our model: the LM adapter, the task index (eval_tasks/ first, lm-eval's own tasks
when a name is not there), checking tasks and their data, and one evaluation. eval_model.py (the command line and
the report card) and the trainer's --eval_tasks both run it, so it sits below both.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from k_model import Transformer
from support.model.hf_llama import _hf_config

TASKS_DIR = Path(__file__).resolve().parents[2] / "eval_tasks"
OFFLINE_TASKS = ["sentiment_mc", "sentiment_gen", "news_cloze", "news_ppl"]


class EvalError(ValueError):
    """Bad input to the evaluation (task, task folder, data file, flag): one line for the user."""


def kmodel_lm(model: Transformer, tokenizer: Any, batch_size: int | str = 32, max_batch_size: int = 64) -> Any:
    """Our model as an lm-eval LM (see KModelLM); lm-eval is imported only when something is evaluated.
    batch_size is a count or lm-eval's "auto" / "auto:N" (the largest batch that fits, found again N times as
    the requests get shorter), at most max_batch_size."""
    from lm_eval.models.huggingface import HFLM

    class KModelLM(HFLM):
        """lm-eval's HF adapter around our model, so that tokenization, context truncation, request order,
        batching and the decoding of answers are exactly what `lm_eval --model hf` does on our HF export;
        only the two model calls (and, off CUDA, the batch size search) are ours."""

        def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
            with torch.no_grad():
                return self.model(inps).logits.float()  # log-softmax in float32 whatever the weights' dtype

        def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                            **generation_kwargs: Any) -> torch.Tensor:
            """Greedy, batched, from the KV cache. A row is cut at EOS; lm-eval cuts the decoded text at the
            task's other stop strings, so running past them changes nothing but time."""
            if generation_kwargs.get("do_sample") or generation_kwargs.get("temperature", 0.0) > 0:
                raise EvalError("only greedy generation is supported (do_sample: false)")
            new = self.model.generate(context, max_length - context.shape[1], temperature=0.0,
                                      stop_id=self.eot_token_id, attention_mask=generation_kwargs.get("attention_mask"))
            return torch.cat([context, new], dim=1)

        def _detect_batch_size(self, requests: Any = None, pos: int = 0) -> int:
            if self.device.type == "cuda":
                return super()._detect_batch_size(requests, pos)
            # lm-eval runs ever smaller batches until one does not raise out-of-memory, which suits a GPU; on the
            # CPU an oversized batch swaps or gets the process killed instead of raising. So here the largest
            # batch is the one whose logits over the whole window (at most three float32 copies: the model's,
            # ours, lm-eval's log-softmax) fit in half the memory now available, activations and the rest of
            # the process getting the other half; the window is the longest request, so auto:N finds it again.
            import psutil

            row_bytes = 3 * 4 * self.max_length * self.model.config.vocab_size
            return max(1, min(self.max_batch_size, psutil.virtual_memory().available // 2 // row_bytes))

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings about a passed-in model are expected
    return KModelLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=max_batch_size,
                    max_length=context_window(model, tokenizer))


def context_window(model: Transformer, tokenizer: Any) -> int:
    """The context lm-eval's HF adapter gives our HF export: its own rule (resolve_max_length: the config's
    n_positions, max_position_embeddings or n_ctx, else the tokenizer's model_max_length, else 2048) on the
    config the export writes. Under dynamic NTK scaling that is the original context, not max_seq_len."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import resolve_max_length

    return resolve_max_length(_hf_config(model.config), tokenizer, default=HFLM._DEFAULT_MAX_LENGTH)


# -- tasks ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)  # a training run asks at every evaluation
def task_manager(tasks: tuple[str, ...], include_path: tuple[str, ...] = ()) -> Any:
    """lm-eval's task index with eval_tasks/ and the --include_path folders, and lm-eval's own tasks only
    when a name is not found there (indexing its thousands of YAML files takes seconds). A folder that is
    missing or holds a YAML file that does not parse is refused, naming the file."""
    from lm_eval.tasks import TaskManager

    folders = [TASKS_DIR, *map(Path, include_path)]
    for folder in folders:
        if not folder.is_dir():
            raise EvalError(f"--include_path {folder}: no such directory")
        for path in sorted(folder.rglob("*.yaml")):
            try:
                yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
            except yaml.YAMLError as e:
                raise EvalError(f"{path}: malformed YAML ({str(e).splitlines()[0]})") from None
    local = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    return TaskManager(include_path=[str(f) for f in folders])


class _TaskYamlLoader(yaml.SafeLoader):
    """Parses lm-eval task YAML for checking only: its `!function module.name` tags are left unresolved."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def check_tasks(manager: Any, names: list[str]) -> None:
    """Every name is a task, group or tag lm-eval knows; the local JSONL data of each task parses."""
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown task {unknown[0]!r} (offline tasks: {', '.join(OFFLINE_TASKS)}; "
                        "`lm-eval ls tasks` lists lm-eval's)")
    for name in names:
        for entry in _entries(manager, name):
            for path in _local_data_files(entry.cfg or {}):
                _check_jsonl(name, path)


def _entries(manager: Any, name: str) -> list[Any]:
    """lm-eval's index entry of a task or group, or the entries of a tag's tasks."""
    from lm_eval.tasks._index import Kind

    entry = manager.task_index[name]
    if entry.kind == Kind.TAG:
        return [e for e in manager.task_index.values() if e.kind == Kind.TASK and name in e.tags]
    return [entry]


def _local_data_files(config: dict[str, Any]) -> list[str]:
    if config.get("dataset_path") != "json":
        return []
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    return list(files.values()) if isinstance(files, dict) else [files] if isinstance(files, str) else list(files)


def _check_jsonl(task: str, path: str) -> None:
    if not os.path.isfile(path):
        raise EvalError(f"task {task}: data file {path} not found (run `python data_process.py eval_tasks` "
                        "in this directory)")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                if line.strip() and not isinstance(json.loads(line), dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise EvalError(f"{path}:{lineno}: task {task}: malformed JSONL line ({e})") from None


# -- evaluation ------------------------------------------------------------------------------------------------------


def evaluate(lm: Any, manager: Any, tasks: list[str], num_fewshot: int | None = None, limit: float | None = None,
             apply_chat_template: bool = False) -> dict[str, Any]:
    """lm_eval.simple_evaluate on our LM: its results dict (results.<task>."acc,none", configs, n-shot, ...)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           apply_chat_template=apply_chat_template, log_samples=False)


def flat_metrics(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """{"eval/<task>/<metric>": value}: lm-eval's "acc,none" keys without the filter name "none" (another
    filter's name stays: "exact_match_strict"), stderr left out."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt and "_stderr" not in metric and isinstance(value, (int, float)):
                name = metric if filt == "none" else f"{metric}_{filt}"
                flat[f"{prefix}/{task}/{name}"] = float(value)
    return flat


def task_names(tasks: str, include_path: list[str] | None = None) -> list[str]:
    """The names in a comma-separated --tasks / --eval_tasks value, each checked (check_tasks); a tag
    (kmodel_offline) stands for its tasks."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise EvalError(f"no task names in {tasks!r}")
    manager = task_manager(tuple(names), tuple(include_path or ()))
    check_tasks(manager, names)
    expanded = [e.name for n in names for e in _entries(manager, n)]
    return list(dict.fromkeys(expanded))


def in_training(model: torch.nn.Module, tokenizer: Any, tasks: str, limit: int | None, chat: bool,
                autocast: Callable[[], Any], log: Callable[[str], None]) -> dict[str, float]:
    """The trainer's --eval_tasks at an evaluation (rank 0, --eval_tasks_limit documents per task, prompts
    through the chat template for chat-trained models): eval/<task>/<metric> values for metrics.jsonl."""
    names = task_names(tasks)
    manager = task_manager(tuple(names))
    was_training = model.training
    start = time.perf_counter()
    try:
        with autocast():
            results = evaluate(kmodel_lm(model, tokenizer), manager, names, limit=limit, apply_chat_template=chat)
    finally:
        model.train(was_training)
    values = flat_metrics(results)
    log(f"eval tasks ({time.perf_counter() - start:.1f} s) | "
        + " | ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in values.items()))
    return values
