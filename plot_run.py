"""A run's training curves as one PNG, from its metrics.jsonl: no code, no browser.

    python plot_run.py runs/cat-tiny-shapes                   # writes runs/cat-tiny-shapes/curves.png
    python plot_run.py runs/imagenette --out imagenette.png

Six panels: the training loss (and the val loss), the learning rate, and val top-1 (and the EMA's, with --ema),
against the optimizer step (top row) and against the training time, train.py's `train_seconds` (bottom row).
Works on a run in progress: it plots the lines written so far. Needs matplotlib (pip install matplotlib), which
training does not.
"""
import argparse
import json
import os
import sys


def read_metrics(run_dir):
    """(log lines, evaluation lines) of RUN_DIR/metrics.jsonl, each a list of dicts in file order. A partly
    written last line (a run killed mid-write) is left out; SystemExit with one line for anything else."""
    if not os.path.isdir(run_dir):
        raise SystemExit(f"error: {run_dir}: no such run folder (train.py's --out-dir, e.g. runs/cat-tiny-shapes)")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {run_dir} has no metrics.jsonl: not a train.py run folder, or the run has not "
                         f"started yet")
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise SystemExit(f"error: {path}, line {number}: not a JSON line")
    logs = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if "val_top1" in r and "step" in r]
    if not logs and not evals:
        raise SystemExit(f"error: {path} has no training lines yet (the first comes after --log-every steps)")
    return logs, evals


def time_unit(seconds):
    """(divisor, label) for a time axis that ends at `seconds`."""
    if seconds >= 2 * 3600:
        return 3600, "training time (h)"
    if seconds >= 2 * 60:
        return 60, "training time (min)"
    return 1, "training time (s)"


def plot(logs, evals, out, title):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("error: plot_run.py needs matplotlib: pip install matplotlib")
    timed = [r for r in logs + evals if "train_seconds" in r]
    divisor, time_label = time_unit(max((r["train_seconds"] for r in timed), default=0))
    axes_x = [("step", 1, "step")] + ([("train_seconds", divisor, time_label)] if timed else [])
    fig = Figure(figsize=(13, 3.6 * len(axes_x)), layout="constrained")
    grid = fig.subplots(len(axes_x), 3, squeeze=False)
    # (panel, records, y key, label, style)
    curves = [(0, logs, "loss", "train loss", "-"), (0, evals, "val_loss", "val loss", "o--"),
              (1, logs, "lr", "learning rate", "-"),
              (2, evals, "val_top1", "val top-1", "o-"), (2, evals, "ema_val_top1", "EMA val top-1", "s--")]
    for row, (x_key, x_divisor, x_label) in zip(grid, axes_x):
        for panel, records, y_key, label, style in curves:
            points = [(r[x_key] / x_divisor, r[y_key]) for r in records if x_key in r and y_key in r]
            if points:
                row[panel].plot(*zip(*points), style, label=label, markersize=3)
        for ax, y_label in zip(row, ("loss", "learning rate", "val top-1 (%)")):
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
            if len(ax.get_legend_handles_labels()[0]) > 1:
                ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(out, dpi=110)


def summary(run_dir, logs, evals):
    """The figure's title: the run folder, its last step and the best val top-1 so far."""
    last = max(r["step"] for r in logs + evals)
    title = f"{run_dir}: step {last}"
    scored = [(r.get("ema_val_top1", r["val_top1"]), r["step"]) for r in evals]
    if scored:
        top1, step = max(scored, key=lambda s: (s[0], -s[1]))
        title += f", best val top-1 {top1:.2f}% at step {step}"
    return title


def count(items, noun):
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="plot_run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a train.py --out-dir, holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="the PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    logs, evals = read_metrics(args.run_dir)
    out = args.out or os.path.join(args.run_dir, "curves.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise SystemExit(f"error: --out {out}: no such folder")
    plot(logs, evals, out, summary(args.run_dir.rstrip("/"), logs, evals))
    print(f"wrote {out} ({count(logs, 'log line')}, {count(evals, 'evaluation')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
