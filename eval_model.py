"""Evaluate a model on lm-evaluation-harness tasks: the repo's offline tasks and the field's benchmarks.

    python data_process.py eval_tasks                     # once: the offline tasks' data -> out/data/eval/
    python eval_model.py --model out/pretrain --tasks news_cloze,news_ppl,sentiment_mc
    python eval_model.py --model out/sft --tasks kmodel_offline --apply_chat_template --output_path out/eval
    python eval_model.py --model out/sft/hf --tasks arc_easy,hellaswag --limit 200    # downloads the data once
    python eval_model.py --report out/                    # out/report.md: every stage x the offline tasks

The flags are lm-eval's own (`lm_eval --model hf ...`), and so are the numbers: the requests go through
lm-eval's HF adapter (its tokenization, truncation, batching and post-processing), which here calls our
model's forward for log-likelihoods and its KV-cache generation (batched, left-padded) for generative tasks.
The offline tasks live in eval_tasks/ (always included); --include_path adds more task folders.
A model is any artifact the other scripts open: a ckpt.pt, a run directory, an HF export, a LoRA adapter dir.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from support import loading
from support.checkpoint import CKPT_NAME
from support.hf_llama import _hf_config
from k_model import Transformer
from support.loading import ADAPTER_CONFIG, DTYPES, resolve_device, resolve_dtype

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
OFFLINE_TASKS = ["sentiment_mc", "sentiment_gen", "news_cloze", "news_ppl"]
STAGES = ["pretrain", "sft", "dpo", "grpo"]  # the report card's row order; other run dirs follow by name
NO_CHAT_STAGES = {"pretrain"}  # the report card prompts every other stage through the chat template


class EvalError(ValueError):
    """Bad input to the evaluation (task, task folder, data file, flag): one line for the user."""


def open_model(path: str, tokenizer_path: str | None = None, device: str = "auto",
               dtype: str = "auto") -> tuple[Transformer, Any, dict[str, Any]]:
    """(model in eval mode on device/dtype, its tokenizer, provenance) for any model source. The one place
    that opens a model here."""
    model, tokenizer, info = loading.open_model(path, tokenizer_path)
    dev = resolve_device(device)
    return model.to(device=dev, dtype=resolve_dtype(dtype, dev)).eval(), tokenizer, info


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


# -- evaluation ----------------------------------------------------------------------------------------------


def evaluate(lm: Any, manager: Any, tasks: list[str], num_fewshot: int | None = None, limit: float | None = None,
             apply_chat_template: bool = False) -> dict[str, Any]:
    """lm_eval.simple_evaluate on our LM: its results dict (results.<task>."acc,none", configs, n-shot, ...)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           apply_chat_template=apply_chat_template, log_samples=False)


def task_times(lm: Any, manager: Any, tasks: list[str], **kwargs: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """evaluate() one task at a time: the merged results and each task's wall time in seconds."""
    merged: dict[str, Any] = {}
    seconds = {}
    for task in tasks:
        start = time.perf_counter()
        out = evaluate(lm, manager, [task], **kwargs)
        seconds[task] = time.perf_counter() - start
        for key, value in out.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged.setdefault(key, value)
    return merged, seconds


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


# -- report card ---------------------------------------------------------------------------------------------


def stage_dirs(root: Path) -> list[Path]:
    """Run directories under root that hold a model (ckpt.pt, hf/config.json or a LoRA adapter), pretrain,
    sft, dpo, grpo first."""
    found = [p for p in sorted(root.iterdir()) if p.is_dir() and any(
        (p / f).is_file() for f in (CKPT_NAME, "hf/config.json", "config.json", ADAPTER_CONFIG))]
    return sorted(found, key=lambda p: (STAGES.index(p.name) if p.name in STAGES else len(STAGES), p.name))


def training_facts(info: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Tokens trained (steps x samples per step x sequence length: an upper bound, since SFT samples are
    trimmed) and the wall time from train.log's first and last timestamps."""
    args, step = info.get("args") or {}, info.get("step")
    tokens = None
    if step is not None and args.get("batch_size") and args.get("max_seq_len"):
        tokens = step * args["batch_size"] * args.get("accumulation_steps", 1) * args["max_seq_len"]
    return {"step": step, "tokens": tokens, "wall_s": _log_span(run_dir / "train.log")}


def _log_span(log: Path) -> float | None:
    if not log.is_file():
        return None
    stamps = [line[:19] for line in log.read_text(encoding="utf-8").splitlines() if line[:2] == "20"]
    try:
        first, last = (time.mktime(time.strptime(s, "%Y-%m-%d %H:%M:%S")) for s in (stamps[0], stamps[-1]))
    except (IndexError, ValueError):
        return None
    return last - first


def main_metric(results: dict[str, Any], task: str) -> tuple[str, float] | None:
    """The first metric of the task's YAML metric_list and its value (no filter), from simple_evaluate's
    output; None when the task did not report it."""
    metric_list = results["configs"].get(task, {}).get("metric_list") or [{}]
    metric = metric_list[0].get("metric")
    value = results["results"].get(task, {}).get(f"{metric},none")
    return (metric, float(value)) if isinstance(value, (int, float)) else None


def write_report(root: Path, tasks: list[str], manager: Any, args: argparse.Namespace) -> Path:
    """root/report.md: one row per stage found under root, one column per task (its first metric), with
    model size, tokens trained and wall time; each task's lm-eval results and seconds go to root/report.json."""
    stages = stage_dirs(root)
    if not stages:
        raise EvalError(f"--report {root}: no run directory with a model (ckpt.pt, hf/ or adapter) in it")
    rows = {}
    for run_dir in stages:
        model, tokenizer, info = open_model(str(run_dir), args.tokenizer_path, args.device, args.dtype)
        chat = run_dir.name not in NO_CHAT_STAGES
        lm = kmodel_lm(model, tokenizer, args.batch_size, args.max_batch_size)
        results, seconds = task_times(lm, manager, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                      apply_chat_template=chat)
        rows[run_dir.name] = {"source": info["source"], "params": model.num_params(), "dtype": dtype_name(model),
                              "chat_template": chat, **training_facts(info, run_dir), "seconds": seconds,
                              "main": {t: main_metric(results, t) for t in tasks}, "results": results["results"]}
        print(f"{run_dir.name}: " + ", ".join(f"{t} {seconds[t]:.1f} s" for t in tasks), flush=True)
    first = next(iter(rows.values()))["main"]
    metric = {t: first[t][0] if first[t] else "-" for t in tasks}
    lines = ["| stage | params | tokens trained | train time | chat template | "
             + " | ".join(f"{t} {metric[t]}" for t in tasks) + " |", "|---" * (5 + len(tasks)) + "|"]
    for name, row in rows.items():
        cells = [name, f"{row['params'] / 1e6:.2f}M", f"{row['tokens'] / 1e6:.2f}M" if row["tokens"] else "-",
                 f"{row['wall_s']:.0f} s" if row["wall_s"] is not None else "-", "yes" if row["chat_template"] else "no"]
        cells += [f"{row['main'][t][1]:.4f}" if row["main"][t] else "-" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    limit = f", the first {args.limit:g} documents per task" if args.limit else ""
    dtypes = ", ".join(dict.fromkeys(row["dtype"] for row in rows.values()))
    lines += ["", f"lm-eval {_lm_eval_version()}, {dtypes}, {args.num_fewshot or 0}-shot{limit}. Seconds per task: "
              + "; ".join(f"{name} " + ", ".join(f"{t} {sec:.1f}" for t, sec in row["seconds"].items())
                          for name, row in rows.items()) + "."]
    report = root / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "report.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False, default=str) + "\n",
                                      encoding="utf-8")
    return report


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


# -- command line --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/sft", help="ckpt.pt, run dir, HF export or LoRA adapter dir")
    p.add_argument("--tasks", default=",".join(OFFLINE_TASKS),
                   help="comma-separated lm-eval task, group or tag names (kmodel_offline = the offline tasks)")
    p.add_argument("--include_path", action="append", default=None, help="another task folder (repeatable)")
    p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per prompt (task default: 0)")
    p.add_argument("--limit", type=float, default=None,
                   help="the first N documents of each task (a fraction < 1: that share of them)")
    p.add_argument("--batch_size", default="32",
                   help="requests per forward / generation batch, or auto (the largest that fits) / auto:N (found "
                        "again N times as the requests get shorter)")
    p.add_argument("--max_batch_size", type=int, default=64, help="the largest batch auto tries")
    p.add_argument("--apply_chat_template", action="store_true",
                   help="prompt through the tokenizer's chat template (an SFT / DPO model)")
    p.add_argument("--output_path", default=None,
                   help="lm-eval's results JSON, named as lm_eval names it: DIR -> DIR/<model>/results_<date>.json, "
                        "FILE.json -> FILE_<date>.json")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="evaluate every run dir under DIR (pretrain, sft, dpo, ...) on --tasks -> DIR/report.md")
    p.add_argument("--tokenizer_path", default=None, help="default: the one saved with the model")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto = bfloat16 on CUDA and on CPUs with native bf16, else float32")
    p.add_argument("--seed", type=int, default=1234)
    return p


def check_flags(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit <= 0:
        raise EvalError(f"--limit must be > 0, got {args.limit:g}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise EvalError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    args.batch_size = batch_size_arg(args.batch_size)
    if args.max_batch_size < 1:
        raise EvalError(f"--max_batch_size must be >= 1, got {args.max_batch_size}")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)


def batch_size_arg(value: str) -> int | str:
    """--batch_size as lm-eval takes it: a positive count, "auto" or "auto:N" with N > 0."""
    auto, colon, schedule = value.partition(":")
    try:
        if auto == "auto" and (not colon or float(schedule) > 0):
            return value
        if int(value) >= 1:
            return int(value)
    except ValueError:
        pass
    raise EvalError(f"--batch_size must be a positive integer, auto or auto:N, got {value!r}")


def results_path(output_path: str, model: str) -> Path:
    """The file lm_eval's CLI writes for --output_path, stamped now: a .json path becomes <stem>_<date>.json
    beside it, any other path is a directory that gets <model>/results_<date>.json, the model named as given
    with the characters a path cannot hold replaced (lm-eval's sanitize_model_name)."""
    from lm_eval.utils import sanitize_model_name

    path, date = Path(output_path), datetime.now().isoformat().replace(":", "-")
    if path.suffix == ".json":
        return path.with_name(f"{path.stem}_{date}.json")
    return path / sanitize_model_name(model) / f"results_{date}.json"


def make_output_dir(output_path: str, model: str) -> None:
    """Creates the folder results_path writes into and checks it is writable, before the evaluation rather than
    after it."""
    folder = results_path(output_path, model).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"--output_path {output_path}: cannot create {folder} ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise EvalError(f"--output_path {output_path}: {folder} is not writable")


def run(args: argparse.Namespace) -> dict[str, Any] | Path:
    check_flags(args)
    tasks = task_names(args.tasks, args.include_path)
    manager = task_manager(tuple(tasks), tuple(args.include_path or ()))
    if args.report:
        report = write_report(Path(args.report), tasks, manager, args)
        print(report.read_text(encoding="utf-8"), end="")
        print(f"wrote {report}")
        return report
    from lm_eval.utils import handle_non_serializable, make_table

    if args.output_path:
        make_output_dir(args.output_path, args.model)
    model, tokenizer, info = open_model(args.model, args.tokenizer_path, args.device, args.dtype)
    results = evaluate(kmodel_lm(model, tokenizer, args.batch_size, args.max_batch_size), manager, tasks,
                       args.num_fewshot, args.limit, args.apply_chat_template)
    results["config"].update(model=info["source"], batch_size=args.batch_size)  # lm-eval's config has model_dtype
    print(header_line(args, results, model))
    print(make_table(results))
    if args.output_path:
        out = results_path(args.output_path, args.model)
        out.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=handle_non_serializable) + "\n",
                       encoding="utf-8")
        print(f"wrote {out}")
    return results


def header_line(args: argparse.Namespace, results: dict[str, Any], model: Transformer) -> str:
    """lm_eval's line above its table, naming the dtype that ran: --dtype auto is bfloat16 on CUDA and on CPUs
    with native bf16, where `lm_eval --model hf` takes the dtype the export was saved in unless given dtype=."""
    sizes = results["config"]["batch_sizes"]
    return (f"{results['config']['model']} (dtype={dtype_name(model)}, device={model.device}), "
            f"limit: {args.limit}, num_fewshot: {args.num_fewshot}, batch_size: {args.batch_size}"
            + (f" ({','.join(map(str, sizes))})" if sizes else ""))


def dtype_name(model: Transformer) -> str:
    return str(model.dtype).removeprefix("torch.")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval draws a progress bar per request batch
    torch.manual_seed(args.seed)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:  # EvalError is a ValueError
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
