"""plot_run.py: a PNG of a run's curves from its metrics.jsonl, and one-line errors when there is nothing to plot."""
import json
import sys

import pytest

import plot_run
import train


def write_metrics(folder, lines, tail=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)


def synthetic_run():
    """What train.py writes: a start line, a log line every 10 steps, an evaluation (with the EMA's) per epoch."""
    lines = [{"event": "start", "step": 0, "device_name": "cpu", "world_size": 1}]
    for step in range(10, 101, 10):
        lines.append({"step": step, "epoch": step // 50, "loss": 2.5 - step / 50, "grad_norm": 1.0,
                      "lr": 1e-3 * min(1.0, step / 20), "images_per_s": 200.0, "train_seconds": step * 0.8})
        if step % 50 == 0:
            lines.append({"epoch": step // 50, "val_top1": 20 + step / 5, "val_top5": 60.0, "val_loss": 2.0,
                          "ema_val_top1": 21 + step / 5, "step": step, "train_seconds": step * 0.8})
    return lines


def test_writes_a_png_of_a_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    write_metrics(run, synthetic_run(), tail='{"step": 110, "lo')        # a last line cut off mid-write
    assert plot_run.main([str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "10 log lines, 2 evaluations" in capsys.readouterr().out
    assert plot_run.main([str(run), "--out", str(tmp_path / "elsewhere.png")]) == 0
    assert (tmp_path / "elsewhere.png").stat().st_size > 10_000


def test_the_title_names_the_best_val_top1():
    logs, evals = [r for r in synthetic_run() if "loss" in r], [r for r in synthetic_run() if "val_top1" in r]
    assert plot_run.summary("runs/x", logs, evals) == "runs/x: step 100, best val top-1 41.00% at step 100"


@pytest.mark.parametrize("case, message", [
    ("no folder", "no such run folder"),
    ("no file", "has no metrics.jsonl"),
    ("only a start line", "has no training lines yet"),
    ("a bad line inside", "line 1: not a JSON line"),
])
def test_nothing_to_plot_is_one_line(tmp_path, case, message):
    run = tmp_path / "run"
    if case == "no file":
        run.mkdir()
    elif case == "only a start line":
        write_metrics(run, [{"event": "start", "step": 0}])
    elif case == "a bad line inside":
        write_metrics(run, synthetic_run()[:3])
        (run / "metrics.jsonl").write_text("{oops\n" + (run / "metrics.jsonl").read_text())
    with pytest.raises(SystemExit) as exit_info:
        plot_run.main([str(run)])
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_without_matplotlib_one_line(tmp_path, monkeypatch):
    write_metrics(tmp_path / "run", synthetic_run())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit, match="^error: plot_run.py needs matplotlib: pip install matplotlib$"):
        plot_run.main([str(tmp_path / "run")])


def test_reads_what_train_py_writes(tmp_path):
    """The keys plot_run.py reads are the ones a real (tiny) run logs."""
    run = tmp_path / "run"
    assert train.main(["--dim", "32", "--depth", "2", "--heads", "2", "--res", "32", "--shapes-size", "64",
                       "--batch-size", "32", "--workers", "0", "--max-steps", "2", "--log-every", "1",
                       "--out-dir", str(run)]) == 0
    logs, evals = plot_run.read_metrics(str(run))
    assert [r["step"] for r in logs] == [1, 2] and [r["step"] for r in evals] == [2]
    assert all("lr" in r and "train_seconds" in r for r in logs) and "train_seconds" in evals[0]
