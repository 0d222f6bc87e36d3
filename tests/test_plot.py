"""plot_runs.py: curves.png from metrics.jsonl, the multi-run overlay, and its errors on bad input."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# matplotlib's first two default colours (C0 blue, C1 orange): one per run in an overlay
C0, C1 = (0.122, 0.467, 0.706), (1.0, 0.498, 0.055)


def write_run(out_dir: Path, steps: int = 40, loss_scale: float = 1.0, extra: dict | None = None) -> Path:
    """A metrics.jsonl as RunLogger writes it: progress lines, eval lines with a text sample, a null mfu."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(5, steps + 1, 5):
        loss = loss_scale * (6.0 / (1 + step / 20) + 1)
        lines.append({"step": step, "loss": loss, "lr": 1e-3 * min(1, step / 10), "tok_per_s": 5000 + step,
                      "mfu": None, "epoch": 0, **(extra or {})})
        if step % 20 == 0:
            lines.append({"step": step, "val_loss": loss + 0.2, "val_ppl": 2.0, "sample": "once upon a time"})
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return out_dir


def read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return matplotlib.image.imread(path)  # decodes the whole image: a truncated file raises


def has_colour(image: np.ndarray, rgb: tuple[float, float, float]) -> bool:
    return bool((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.03).any())


def test_curves_png_is_a_valid_image_that_follows_the_metrics(tmp_path):
    run = write_run(tmp_path / "run")
    png = plot_runs.draw_curves(run)
    assert png == run / "curves.png"
    first = read_png(png)
    assert first.ndim == 3 and first.shape[0] > 200 and first.shape[1] > 200
    assert first[..., :3].std() > 0.05  # curves and text, not a blank canvas

    write_run(run, steps=80, loss_scale=2.0)  # the run went on and its numbers changed
    second = read_png(plot_runs.draw_curves(run))
    assert first.shape != second.shape or not np.array_equal(first, second)
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temp file left


def test_overlay_draws_each_run_in_its_own_colour(tmp_path, monkeypatch, capsys):
    a = write_run(tmp_path / "pretrain")
    b = write_run(tmp_path / "sft", steps=60, loss_scale=0.5)
    monkeypatch.chdir(tmp_path)
    plot_runs.main([str(a), str(b)])
    assert "curves_compare.png" in capsys.readouterr().out
    both = read_png(tmp_path / "curves_compare.png")
    assert has_colour(both, C0) and has_colour(both, C1)

    one = read_png(plot_runs.draw_curves(a))  # a single run uses one colour only
    assert has_colour(one, C0) and not has_colour(one, C1)

    plot_runs.main([str(a), str(b), "--out", str(tmp_path / "runs.png")])
    assert read_png(tmp_path / "runs.png").shape == both.shape


def test_unknown_metrics_get_their_own_panel(tmp_path):
    dpo = {"reward_margin": 0.5, "reward_accuracy": 0.75, "val_reward_accuracy": 0.7, "flag": True}
    records = [{"step": 1, "loss": 0.7, "lr": 1e-4, "tok_per_s": 10.0, "mfu": 0.1, "epoch": 0, **dpo},
               {"step": 1, "val_loss": 0.6, "val_ppl": 1.8, "sample": "text"}]
    layout = plot_runs.panel_layout(list(plot_runs.metric_series(records)))
    assert layout == [("loss", ["loss", "val_loss"]), ("learning rate", ["lr"]), ("tokens/s", ["tok_per_s"]),
                      ("mfu", ["mfu"]), ("reward_margin", ["reward_margin"]),
                      ("reward_accuracy", ["reward_accuracy", "val_reward_accuracy"])]

    # drawn: the two new panels add a row of plots to the picture
    plain = read_png(plot_runs.draw_curves(write_run(tmp_path / "plain", extra={"mfu": 0.3})))
    with_dpo = read_png(plot_runs.draw_curves(write_run(tmp_path / "dpo", extra={"mfu": 0.3, **dpo})))
    assert with_dpo.shape[0] > plain.shape[0]


def test_per_layer_metrics_share_a_panel_and_named_ones_keep_theirs():
    """An MoE run's expert_load/<layer>/<expert> and expert_entropy/<layer> are one panel each (a line per
    layer and expert); a name with a word after the "/" (eval/<task>/<metric>) keeps its own panel."""
    record = {"step": 1, "loss": 5.0, "expert_load/0/0": 0.3, "expert_load/0/1": 0.7, "expert_load/1/0": 0.5,
              "expert_entropy/0": 0.6, "expert_entropy/1": 0.7, "eval/sentiment/acc": 0.8, "eval/cloze/acc": 0.4}
    assert plot_runs.panel_layout(list(plot_runs.metric_series([record]))) == [
        ("loss", ["loss"]), ("expert_load", ["expert_load/0/0", "expert_load/0/1", "expert_load/1/0"]),
        ("expert_entropy", ["expert_entropy/0", "expert_entropy/1"]), ("eval/sentiment/acc", ["eval/sentiment/acc"]),
        ("eval/cloze/acc", ["eval/cloze/acc"])]


def test_malformed_line_is_reported_with_file_and_line(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    for bad in ['{"step": 3, "loss": 1.', '["not", "an", "object"]', '{"loss": 1.0}']:
        metrics.write_text("\n".join([lines[0], bad, *lines[1:]]) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{metrics}:2: ")):
            plot_runs.draw_curves(run)
    with pytest.raises(SystemExit) as exit_info:
        plot_runs.main([str(run)])
    assert exit_info.value.code == f"error: {metrics}:2: expected a JSON object with a numeric \"step\": " \
                                   "'{\"loss\": 1.0}'"


def test_missing_or_empty_metrics_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere' / 'metrics.jsonl'}: no such")):
        plot_runs.draw_curves(tmp_path / "nowhere")
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(SystemExit, match=re.escape(f"error: {tmp_path / 'metrics.jsonl'}: no records yet")):
        plot_runs.main([str(tmp_path)])


def test_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what `import` sees when it is not installed
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_runs.draw_curves(run)
    assert not (run / "curves.png").exists()
