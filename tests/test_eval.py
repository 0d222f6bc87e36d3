"""eval_model.py: lm-evaluation-harness on our models. The offline tasks give lm-eval's own CLI numbers on our HF
export, the generative sentiment task gives model_sample.py --eval's accuracy, every model kind gives the same
numbers, --eval_tasks logs them while training, the report card has a row per stage, and bad input is one line."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

import data_process
from support.data import task_data
import ddp_pretrain
import ddp_sft_full
import eval_model
from support.inference import evaluation
from model_sample import sentiment_accuracy
from support.inference.text_generator import TextGenerator
from train_helpers import QUIET, run_python, write_jsonl

SEQ = ["--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "128"]
ALL_TASKS = "sentiment_mc,sentiment_gen,news_cloze,news_ppl"
FLOAT32 = ["--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A working directory laid out like the demo's: out/data/eval/ (the offline tasks' data, from 40 held-out
    reviews and 8 held-out articles), out/pretrain (1 step) and out/sft (trained on 480 other reviews until it
    answers with a label and EOS)."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "out" / "data"
    data.mkdir(parents=True)
    reviews = data_process.read_reviews(max_chars=40)
    pos = [r for r in reviews if r[1] == "pos"]
    neg = [r for r in reviews if r[1] == "neg"]
    train, test = pos[:240] + neg[:240], pos[240:260] + neg[240:260]
    conv = data_process.sentiment_conversation
    write_jsonl(data / "sft_train.jsonl", [conv(t, lab, 40) for t, lab in train])
    write_jsonl(data / "sft_val.jsonl", [conv(t, lab, 40) for t, lab in train[:16]])
    write_jsonl(data / "sft_test.jsonl", [{**conv(t, lab, 40), "label": task_data.LABELS[lab]} for t, lab in test])
    articles = data_process.group_news_documents(data_process.read_news_paragraphs())
    write_jsonl(data / "pretrain_val.jsonl", [{"text": a} for a in articles[100:108]])
    write_jsonl(data / "pretrain.jsonl", [{"text": a} for a in articles[:40]])
    task_data.build_eval_tasks(str(data), str(data / "eval"))
    data_process.pretokenize(str(data / "pretrain.jsonl"), tiny_tokenizer_dir, num_workers=1)
    out = root / "out"
    ddp_pretrain.main(["--data_path", str(data / "pretrain.bin"), "--val_data_path", "none", "--tokenizer_path",
                       tiny_tokenizer_dir, "--out_dir", str(out / "pretrain"), *SEQ, "--batch_size", "4",
                       "--max_steps", "1", "--eval_interval", "0", *QUIET])
    ddp_sft_full.main(["--init_from", str(out / "pretrain"), "--data_path", str(data / "sft_train.jsonl"),
                       "--val_data_path", str(data / "sft_val.jsonl"), "--out_dir", str(out / "sft"),
                       "--batch_size", "16", "--max_steps", "150", "--learning_rate", "3e-3", "--warmup_iters", "10",
                       "--eval_interval", "0", "--eval_samples", "16", "--sample_tokens", "0", *QUIET])
    return root


@pytest.fixture(autouse=True)
def in_work(work, monkeypatch):
    monkeypatch.chdir(work)  # the task YAML files read out/data/eval/ relative to the working directory


@pytest.fixture(scope="module")
def sft_results(work) -> dict:
    """eval_model.py on the SFT checkpoint: every offline task, through the chat template."""
    out = work / "ours.json"
    cwd = os.getcwd()
    os.chdir(work)
    try:
        eval_model.main(["--model", str(work / "out/sft/ckpt.pt"), "--tasks", ALL_TASKS, "--apply_chat_template",
                         "--batch_size", "8", "--output_path", str(out), *FLOAT32])
    finally:
        os.chdir(cwd)
    return json.loads(next(work.glob("ours_*.json")).read_text(encoding="utf-8"))["results"]


def _undated(folder: Path, pattern: str) -> list[str]:
    """The paths under folder that match, relative to it, digits (the date) zeroed."""
    return sorted(re.sub(r"\d", "0", str(p.relative_to(folder))) for p in folder.glob(pattern))


def test_offline_tasks_give_lm_eval_clis_numbers_on_the_hf_export(work, sft_results, tmp_path):
    from lm_eval.loggers import EvaluationTracker

    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cli = run_python(["-m", "lm_eval", "--model", "hf", "--model_args",
                      f"pretrained={work / 'out/sft/hf'},dtype=float32", "--tasks", ALL_TASKS, "--include_path",
                      str(evaluation.TASKS_DIR), "--apply_chat_template", "--device", "cpu", "--batch_size", "8",
                      "--output_path", str(work / "cli")], cwd=work, env=env, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    theirs = json.loads(next((work / "cli").rglob("results_*.json")).read_text(encoding="utf-8"))["results"]
    for task, metric in [("sentiment_mc", "acc"), ("sentiment_mc", "acc_norm"), ("news_cloze", "acc"),
                         ("news_cloze", "acc_norm"), ("sentiment_gen", "exact_match")]:
        assert sft_results[task][f"{metric},none"] == theirs[task][f"{metric},none"], (task, metric)
    # a sum of log-probabilities over whole articles: our kernels and transformers' round differently
    assert sft_results["news_ppl"]["bits_per_byte,none"] == pytest.approx(theirs["news_ppl"]["bits_per_byte,none"],
                                                                          rel=1e-6)
    assert sft_results["news_cloze"]["acc,none"] > 0 and sft_results["news_ppl"]["bits_per_byte,none"] > 0
    # --output_path ours.json wrote ours_<date>.json, as lm_eval's results tracker does for that path
    EvaluationTracker(output_path=str(tmp_path / "ours.json")).save_results_aggregated(results={})
    assert _undated(work, "ours*.json") == _undated(tmp_path, "ours*.json") == ["ours_0000-00-00T00-00-00.000000.json"]


def test_generative_sentiment_is_model_sample_evals_accuracy(work, sft_results):
    gen = TextGenerator(work / "out/sft", device="cpu", dtype="float32")
    acc = sentiment_accuracy(gen, str(work / "out/data/sft_test.jsonl"), batch_size=8)
    assert 0 < acc["correct"] and acc["invalid"] < acc["total"]  # the model answers with labels, some right
    assert sft_results["sentiment_gen"]["exact_match,none"] == acc["accuracy"]


def test_every_model_kind_gives_the_same_numbers(work, sft_results):
    for path in ("out/sft", "out/sft/hf"):
        model, tokenizer, _ = eval_model.open_model(str(work / path), device="cpu", dtype="float32")
        manager = evaluation.task_manager(("sentiment_mc", "news_ppl"))
        got = evaluation.evaluate(evaluation.kmodel_lm(model, tokenizer, 8), manager, ["sentiment_mc", "news_ppl"],
                                  apply_chat_template=True)["results"]
        assert got["sentiment_mc"]["acc,none"] == sft_results["sentiment_mc"]["acc,none"], path
        assert got["news_ppl"]["bits_per_byte,none"] == pytest.approx(
            sft_results["news_ppl"]["bits_per_byte,none"], rel=1e-6), path


def test_dynamic_ntk_export_auto_batch_size_and_output_dir_as_lm_evals_api(work, tmp_path, capsys):
    """A dynamic-NTK export (original context 64, factor 2: our window is 128) gives lm-eval's numbers: lm-eval
    reads max_position_embeddings (64) as its rolling window. --batch_size auto:2 picks lm-eval's batch sizes,
    and --output_path DIR (existing) gets lm_eval's DIR/<model>/results_<date>.json."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    export = tmp_path / "dynamic"
    shutil.copytree(work / "out/sft/hf", export)
    config = json.loads((export / "config.json").read_text(encoding="utf-8"))
    config["max_position_embeddings"] = 64
    config["rope_parameters"].update(rope_type="dynamic", factor=2.0)
    (export / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tasks = ["news_ppl", "sentiment_mc"]
    (tmp_path / "ours").mkdir()
    eval_model.main(["--model", str(export), "--tasks", ",".join(tasks), "--batch_size", "auto:2",
                     "--max_batch_size", "16", "--limit", "12",
                     "--output_path", str(tmp_path / "ours"), *FLOAT32])
    header = next(line for line in capsys.readouterr().out.splitlines() if "num_fewshot" in line)
    assert f"{export} (dtype=float32, device=cpu)" in header  # the dtype that ran, where lm_eval prints its own
    tracker = EvaluationTracker(output_path=str(tmp_path / "theirs"))
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={export},dtype=float32", tasks=tasks, device="cpu",
                             batch_size="auto:2", max_batch_size=16, limit=12, evaluation_tracker=tracker,
                             task_manager=evaluation.task_manager(tuple(tasks)))
    tracker.save_results_aggregated(results=theirs)
    assert _undated(tmp_path / "ours", "**/*") == _undated(tmp_path / "theirs", "**/*")
    ours = json.loads(next((tmp_path / "ours").rglob("results_*.json")).read_text(encoding="utf-8"))
    assert ours["config"]["batch_sizes"] == theirs["config"]["batch_sizes"] != []
    assert ours["results"]["sentiment_mc"]["acc,none"] == theirs["results"]["sentiment_mc"]["acc,none"]
    assert ours["results"]["news_ppl"]["bits_per_byte,none"] == pytest.approx(
        theirs["results"]["news_ppl"]["bits_per_byte,none"], rel=1e-6)


def test_report_card_has_a_row_per_stage_and_a_column_per_task(work, sft_results, capsys):
    eval_model.main(["--report", "out", "--tasks", "sentiment_mc,news_ppl", *FLOAT32])
    report = (work / "out/report.md").read_text(encoding="utf-8")
    header, _, pretrain, sft = report.splitlines()[:4]
    assert "sentiment_mc acc" in header and "news_ppl bits_per_byte" in header
    assert pretrain.startswith("| pretrain |") and "| no |" in pretrain
    cells = sft.split(" | ")
    assert cells[0] == "| sft" and cells[4] == "yes"
    assert cells[5] == f"{sft_results['sentiment_mc']['acc,none']:.4f}"
    assert cells[6] == f"{sft_results['news_ppl']['bits_per_byte,none']:.4f} |"
    assert cells[2] == f"{150 * 16 * 128 / 1e6:.2f}M"  # steps x batch x sequence length
    assert ", float32, 0-shot." in report  # the dtype that ran


def test_eval_tasks_while_training_log_what_eval_model_gives(work, tmp_path):
    out = tmp_path / "lora"
    ddp_sft_full.main(["--init_from", str(work / "out/pretrain"), "--data_path", "out/data/sft_train.jsonl",
                       "--val_data_path", "none", "--out_dir", str(out), "--lora_r", "4", "--lora_alpha", "8",
                       "--batch_size", "8", "--max_steps", "2", "--eval_interval", "1", "--sample_tokens", "0",
                       "--eval_tasks", "sentiment_mc,news_ppl", "--eval_tasks_limit", "6", *QUIET])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    logged = [r for r in records if "eval/sentiment_mc/acc" in r]
    assert [r["step"] for r in logged] == [1, 2]
    eval_model.main(["--model", str(out / "adapter"), "--tasks", "sentiment_mc,news_ppl", "--limit", "6",
                     "--apply_chat_template", "--output_path", str(tmp_path / "after.json"), *FLOAT32])
    after = json.loads(next(tmp_path.glob("after_*.json")).read_text(encoding="utf-8"))["results"]
    assert logged[-1]["eval/sentiment_mc/acc"] == after["sentiment_mc"]["acc,none"]
    assert logged[-1]["eval/news_ppl/bits_per_byte"] == pytest.approx(after["news_ppl"]["bits_per_byte,none"],
                                                                      rel=1e-5)  # LoRA unmerged vs merged


def _bad_task_folder(root: Path, yaml_text: str, jsonl_text: str | None = None) -> str:
    root.mkdir()
    (root / "bad.yaml").write_text(yaml_text, encoding="utf-8")
    if jsonl_text is not None:
        (root / "bad.jsonl").write_text(jsonl_text, encoding="utf-8")
    return str(root)


@pytest.mark.parametrize("case", ["unknown task", "malformed yaml", "malformed jsonl", "limit 0", "not a model",
                                  "batch size", "output path"])
def test_bad_input_is_one_line(work, tmp_path, capsys, case):
    args = ["--model", str(work / "out/sft"), "--tasks", "sentiment_mc", *FLOAT32]
    task = "task: bad\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\noutput_type: " \
           "loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{{{text}}}}'\n"
    expected = {"unknown task": "unknown task 'no_such_task'", "malformed yaml": "bad.yaml: malformed YAML",
                "malformed jsonl": "bad.jsonl:2: task bad: malformed JSONL", "limit 0": "--limit must be > 0",
                "not a model": "no ckpt.pt, config.json",
                "batch size": "--batch_size must be a positive integer, auto or auto:N, got 'auto:0'",
                "output path": f"--output_path {tmp_path / 'file' / 'out'}: cannot create"}[case]
    if case == "unknown task":
        args[3] = "news_ppl,no_such_task"
    elif case == "malformed yaml":
        args += ["--include_path", _bad_task_folder(tmp_path / "t", "task: bad\n  output_type: [unclosed\n")]
    elif case == "malformed jsonl":
        folder = _bad_task_folder(tmp_path / "t", task.format(path=tmp_path / "t" / "bad.jsonl"),
                                  '{"text": "ok"}\n{"text": \n')
        args[3] = "bad"
        args += ["--include_path", folder]
    elif case == "limit 0":
        args += ["--limit", "0"]
    elif case == "batch size":
        args += ["--batch_size", "auto:0"]
    elif case == "output path":  # refused before the evaluation, not after it
        (tmp_path / "file").write_text("", encoding="utf-8")
        args += ["--output_path", str(tmp_path / "file" / "out")]
    else:
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    with pytest.raises(SystemExit) as exit_:
        eval_model.main(args)
    message = str(exit_.value.code)
    assert message.startswith("error: ") and expected in message and "\n" not in message
    assert "sentiment_mc" not in capsys.readouterr().out  # nothing was evaluated
