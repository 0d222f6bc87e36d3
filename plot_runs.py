"""Training curves as pictures, drawn from a run's out_dir/metrics.jsonl.

    python plot_runs.py out/pretrain                    # redraw out/pretrain/curves.png
    python plot_runs.py out/pretrain out/sft            # overlay runs -> ./curves_compare.png
    python plot_runs.py out/pretrain out/sft --out runs.png

The trainer calls draw_curves(out_dir) at evaluations at least 30 s apart and at the end, so curves.png
follows the run (and a resumed run, since metrics.jsonl is rewritten to read like an uninterrupted one). Panels: train and
val loss, learning rate, tokens/s, then one panel per other numeric metric in the file, so a new objective's
metrics (SFT, DPO rewards, ...) are drawn without code changes; a "val_X" metric shares X's panel, and so do
"X/<number>..." ones (an MoE model's expert_load/<layer>/<expert>: one panel, a line per layer and expert).
matplotlib is imported only when something is drawn, so training does not pay for it otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

# the first panels, always in this order when the run has them: (title, metrics drawn in it)
FIXED_PANELS = [("loss", ["loss", "val_loss"]), ("learning rate", ["lr"]), ("tokens/s", ["tok_per_s"])]
# numeric keys that get no panel: the x axis, a data position rather than a measurement,
# and val_ppl, which is exp(val_loss) and would repeat the loss panel
NOT_PLOTTED = {"step", "epoch", "val_ppl"}
# metrics that span decades while training (loss falls from ~ln(vocab) to ~1): drawn on a log axis
LOG_SCALE = {"loss", "val_loss"}
Series = dict[str, tuple[list[float], list[float]]]  # metric -> (steps, values)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a malformed line raises ValueError naming path:line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file (a training run writes it in its out_dir)")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a numeric \"step\": {line[:80]!r}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records yet")
    return records


def _is_number(value: object) -> bool:
    # bool is an int in Python, but a flag is not a curve; strings ("sample" text) and null are skipped
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_series(records: list[dict]) -> Series:
    """Every numeric metric as (steps, values), in the order metrics first appear."""
    series: Series = {}
    for record in records:
        for key, value in record.items():
            if key not in NOT_PLOTTED and _is_number(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    return series


def panel_layout(metrics: list[str]) -> list[tuple[str, list[str]]]:
    """(title, metrics) per panel: the fixed panels the runs have data for, then one panel per other metric."""
    panels = [(title, [k for k in keys if k in metrics]) for title, keys in FIXED_PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    placed = {k for _, keys in panels for k in keys}
    extra: dict[str, list[str]] = {}
    for key in metrics:
        if key not in placed:
            extra.setdefault(re.sub(r"(/\d+)+$", "", key.removeprefix("val_")), []).append(key)
    return panels + list(extra.items())


def plot_runs(out_dirs: list[Path], png: Path) -> Path:
    """Draw the runs' curves into one PNG (one colour per run) and return its path. The file is
    written whole under a temporary name and renamed, so a reader never sees a half-written image."""
    runs = {str(d): metric_series(read_metrics(d / "metrics.jsonl")) for d in out_dirs}
    metrics = list(dict.fromkeys(k for series in runs.values() for k in series))
    panels = panel_layout(metrics)
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = _new_figure(width=5.5 * cols, height=1 + 3 * rows)
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw_panel(ax, title, keys, runs)
    fig.suptitle(" vs ".join(runs), fontsize=12, y=1 - 0.2 / fig.get_figheight())  # 0.2 in from the top
    tmp = png.with_name(png.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
    return png


def _new_figure(width: float, height: float):
    try:
        # the object-oriented API without pyplot: no GUI backend, no global figure list to leak into
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("drawing curves.png needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height))
    # fixed margins in inches (tick and axis labels, titles, the suptitle), not layout="constrained", which
    # lays the figure out by drawing it an extra time: 0.45 s a drawing instead of 0.8 s, paid by every run
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.5 / height, top=1 - 0.9 / height,
                        wspace=1.8 / width, hspace=1 / 3)
    return fig


def _draw_panel(ax, title: str, keys: list[str], runs: dict[str, Series]) -> None:
    # colour tells runs apart; within a run, evaluations are dashed with markers (they are few and sparse)
    for colour, (run, series) in enumerate(runs.items()):
        for key in keys:
            if key not in series:
                continue
            label = ", ".join(part for part, shown in ((run, len(runs) > 1), (key, len(keys) > 1)) if shown)
            val = key.startswith("val_")
            ax.plot(*series[key], color=f"C{colour}", label=label or None, linestyle="--" if val else "-",
                    marker="o" if val else None, markersize=4, linewidth=1.2)
    values = [v for series in runs.values() for key in keys if key in series for v in series[key][1]]
    if set(keys) <= LOG_SCALE and min(values) > 0:
        ax.set_yscale("log")
        _plain_log_labels(ax)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)


def _plain_log_labels(ax) -> None:
    # "4" and "0.8" instead of matplotlib's default "4x10^0": losses rarely span more than a decade or two,
    # so the minor ticks carry most labels
    from matplotlib.ticker import LogFormatter

    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def draw_curves(out_dir: str | Path) -> Path:
    """Write out_dir/curves.png from out_dir/metrics.jsonl and return its path."""
    out_dir = Path(out_dir)
    return plot_runs([out_dir], out_dir / "curves.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw training curves from runs' metrics.jsonl: one run -> "
                                     "its out_dir/curves.png, several -> one overlaid comparison.")
    parser.add_argument("runs", nargs="+", type=Path, help="training out_dirs (each holds a metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output PNG (default: RUN/curves.png for one run, ./curves_compare.png for several)")
    args = parser.parse_args(argv)
    try:
        if args.out is None and len(args.runs) == 1:
            png = draw_curves(args.runs[0])
        else:
            png = plot_runs(args.runs, args.out or Path("curves_compare.png"))
    except (OSError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
