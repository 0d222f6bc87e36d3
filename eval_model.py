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
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from support.inference.evaluation import (OFFLINE_TASKS, EvalError, evaluate, kmodel_lm, task_manager,
                                          task_names)
from support.loading import sources as loading
from support.loading.checkpoint import CKPT_NAME
from k_model import Transformer
from support.loading.sources import ADAPTER_CONFIG, DTYPES, resolve_device, resolve_dtype

STAGES = ["pretrain", "sft", "dpo", "grpo"]  # the report card's row order; other run dirs follow by name
NO_CHAT_STAGES = {"pretrain"}  # the report card prompts every other stage through the chat template


def open_model(path: str, tokenizer_path: str | None = None, device: str = "auto",
               dtype: str = "auto") -> tuple[Transformer, Any, dict[str, Any]]:
    """(model in eval mode on device/dtype, its tokenizer, provenance) for any model source. The one place
    that opens a model here."""
    model, tokenizer, info = loading.open_model(path, tokenizer_path)
    dev = resolve_device(device)
    return model.to(device=dev, dtype=resolve_dtype(dtype, dev)).eval(), tokenizer, info


# -- evaluation ----------------------------------------------------------------------------------------------


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
