"""Training behaviour : it learns, resumes exactly, runs under DDP, and fails clearly and safely."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import model
import train
import checkpoint
import runtime
from checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint

REPO = Path(__file__).parent
# A model and data small enough for a CPU test: 32 px, 4 x 4 grid, D 32; a 512-image shapes set.
TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--res", "32", "--shapes-size", "512",
        "--batch-size", "16", "--workers", "0", "--log-every", "1"]
FOLDER_TINY = [*TINY[:TINY.index("--shapes-size")], *TINY[TINY.index("--shapes-size") + 2:]]   # no shapes flags
# Randomness everywhere it can hide: dropout, drop-path, MixUp/CutMix, EMA, accumulation, a loader worker.
NOISY = ["--dropout", "0.1", "--drop-path", "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--ema", "0.9",
         "--accum", "2", "--workers", "1"]


def records(out_dir):
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def step_losses(out_dir):
    return [(r["step"], r["loss"], r["lr"]) for r in records(out_dir) if "loss" in r]


def files_of(folder):
    """{name: bytes (None for a subfolder)} of a folder's entries: what a refused start must leave as it was."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in Path(folder).iterdir()}


def interrupt_at_forward(monkeypatch, call):
    """Send this process a real SIGTERM from inside the `call`-th training forward on real images (the FLOP
    count's forward on the meta device and validation's do not count)."""
    calls = {"n": 0}
    forward = model.CAT.forward

    def counting_forward(self, images):
        counted = images.device.type != "meta" and self.training
        calls["n"] += counted
        if counted and calls["n"] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, images)

    monkeypatch.setattr(model.CAT, "forward", counting_forward)


def run_script(args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def torchrun(args, **kwargs):
    return run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args],
                      **kwargs)


# ---------------------------------------------------------------------------------------------- learning

@pytest.mark.slow
def test_tiny_run_learns(tmp_path):
    assert train.main([*TINY, "--shapes-size", "2048", "--batch-size", "32", "--max-steps", "300", "--epochs", "10",
                       "--lr", "3e-3", "--out-dir", str(tmp_path), "--eval-every", "1000", "--save-every", "1000"]) == 0
    losses = [loss for _, loss, _ in step_losses(tmp_path)]
    assert len(losses) == 300
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < first - 0.3, (first, last)
    final = records(tmp_path)[-1]
    assert final["val_top1"] > 40          # chance is 12.5%; this run reaches ~57%
    state = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert state["step"] == 300 and state["metrics"]["val_top1"] == final["val_top1"]


def test_metrics_log_has_speed_lr_and_mfu(tmp_path):
    train.main([*TINY, "--max-steps", "3", "--peak-tflops", "1", "--out-dir", str(tmp_path)])
    start, *steps, final = records(tmp_path)
    assert start["event"] == "start" and start["params"] > 0 and start["flops_per_image"] > 0
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["lr"] >= 0 and r["skipped_images"] == 0
    assert 0 < steps[0]["train_seconds"] < steps[1]["train_seconds"] < steps[2]["train_seconds"]
    assert final["train_seconds"] == steps[2]["train_seconds"]
    assert {"val_top1", "val_top5", "val_loss"} <= set(final)


def test_amp_asked_for_on_a_cpu_without_bf16_units_warns(tmp_path, monkeypatch, capsys):
    """An AVX2-only CPU emulates bf16 (65 s a vit-tiny step, against 2.5 with AVX512-BF16): --amp still does what
    it says, and says what it costs."""
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: None)
    assert train.main([*TINY, "--max-steps", "1", "--amp", "--out-dir", str(tmp_path)]) == 0
    assert records(tmp_path)[0]["amp"] is True
    assert "bf16 autocast runs emulated here" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- resume

@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, monkeypatch):
    """Interrupted by SIGTERM mid-epoch, then resumed: the same losses, learning rates and weights as a run
    that was never interrupted, with every source of randomness switched on."""
    common = [*TINY, *NOISY, "--max-steps", "20", "--epochs", "3", "--eval-every", "8"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert train.main([*common, "--out-dir", str(straight)]) == 0
    # 512 images / (16 x 2) = 16 steps an epoch; validations (a loader with a worker) at step 8, before the stop
    # inside step 11, and at 16 and 20 after it.
    interrupt_at_forward(monkeypatch, call=2 * 10 + 1)
    assert train.main([*common, "--out-dir", str(broken)]) == 0
    assert load_checkpoint(str(broken / "ckpt.pt"))["step"] == 11
    monkeypatch.undo()
    assert train.main([*common, "--out-dir", str(broken), "--resume"]) == 0

    assert step_losses(broken) == step_losses(straight)
    assert len(step_losses(straight)) == 20
    a, b = load_checkpoint(str(straight / "ckpt.pt")), load_checkpoint(str(broken / "ckpt.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])
    assert a["metrics"]["val_top1"] == b["metrics"]["val_top1"]


@pytest.mark.slow
def test_resume_with_other_validation_and_workers_trains_the_same(tmp_path, monkeypatch):
    """--eval-every and --workers may change on resume (RESUME_MAY_CHANGE): neither may change what training draws."""
    common = [*TINY, *NOISY, "--max-steps", "12", "--epochs", "3"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert train.main([*common, "--eval-every", "1000", "--out-dir", str(straight)]) == 0
    interrupt_at_forward(monkeypatch, call=2 * 5 + 1)
    assert train.main([*common, "--eval-every", "1000", "--out-dir", str(broken)]) == 0
    monkeypatch.undo()
    assert train.main(["--out-dir", str(broken), "--resume", "--eval-every", "3", "--workers", "2"]) == 0
    assert step_losses(broken) == step_losses(straight)
    a, b = load_checkpoint(str(straight / "ckpt.pt")), load_checkpoint(str(broken / "ckpt.pt"))
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])


@pytest.mark.slow
def test_resume_without_out_dir_uses_the_default_folder(tmp_path, monkeypatch):
    """The documented torchrun --max-restarts command has no --out-dir: --resume auto, then --resume, find
    runs/MODEL-DATA."""
    monkeypatch.chdir(tmp_path)
    tiny = [*TINY, "--max-steps", "3"]
    assert train.main([*tiny, "--resume", "auto"]) == 0
    assert load_checkpoint("runs/cat-tiny-shapes/ckpt.pt")["step"] == 3
    assert train.main(["--resume"]) == 0
    assert train.main([*tiny, "--resume", "auto"]) == 0
    assert load_checkpoint("runs/cat-tiny-shapes/ckpt.pt")["step"] == 3


def test_resume_survives_a_partly_written_metrics_line(tmp_path, monkeypatch, capsys):
    """A full disk can leave half a line at the end of metrics.jsonl: --resume drops it (and says so) and
    rewrites the file atomically."""
    common = [*TINY, "--max-steps", "6", "--eval-every", "1000", "--out-dir", str(tmp_path)]
    interrupt_at_forward(monkeypatch, call=3)
    assert train.main(common) == 0
    monkeypatch.undo()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "epoch": 0, "lo')
    assert train.main([*common, "--resume"]) == 0
    assert "metrics.jsonl: dropped a partly written last line" in capsys.readouterr().err
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.slow
def test_sigint_saves_and_exits_cleanly(tmp_path, monkeypatch):
    """A real Ctrl-C to a running training process: it saves a resumable checkpoint and exits 0 in seconds."""
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--max-steps", "100000", "--epochs", "1000",
                             "--save-every", "100000", "--eval-every", "100000", "--out-dir", str(tmp_path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and log.read_text().count('"loss"') >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert time.time() - sent < 10
    assert "stopped by signal" in output
    state = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert state["step"] >= 3
    interrupt_at_forward(monkeypatch, call=2)              # resume with the same flags; stop again 2 steps on
    assert train.main([*TINY, "--max-steps", "100000", "--epochs", "1000", "--save-every", "100000",
                       "--eval-every", "100000", "--resume", "--out-dir", str(tmp_path)]) == 0
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == state["step"] + 2


@pytest.mark.slow
def test_sigint_during_validation_saves_and_exits_cleanly(tmp_path):
    """Ctrl-C reaches the whole foreground process group, the validation loader's workers included. They used
    to die of it, and the run crashed instead of saving. (Forked workers inherit the trainer's handler by
    accident; forkserver workers, Python 3.14's default on Linux, and spawn workers, macOS's, do not.)"""
    driver = f"""
import multiprocessing, os, signal, sys
import model, train
multiprocessing.set_start_method("forkserver")
forward = model.CAT.forward
def interrupt_in_validation(self, images):
    if not self.training and images.device.type != "meta" and not os.environ.get("SENT"):
        os.environ["SENT"] = "1"
        os.killpg(0, signal.SIGINT)                             # as Ctrl-C does: every process of the group
    return forward(self, images)
model.CAT.forward = interrupt_in_validation
sys.exit(train.main({[*TINY, "--max-steps", "50", "--epochs", "10", "--eval-every", "2", "--workers", "1",
                     "--out-dir", str(tmp_path)]!r}))
"""
    result = subprocess.run([sys.executable, "-c", driver], cwd=REPO, capture_output=True, text=True, timeout=120,
                            start_new_session=True)                 # its own process group, safe to signal
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stopped by signal at step 2" in result.stdout              # the step of that validation
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 2


@pytest.mark.slow
def test_resume_refuses_flags_that_change_the_schedule_or_data(tmp_path, capsys):
    """More --epochs used to keep the old scheduler length, so the learning rate climbed back to its peak;
    another --batch-size resumed the sampler at the wrong position."""
    common = [*TINY, "--max-steps", "4", "--epochs", "3", "--out-dir", str(tmp_path)]
    assert train.main(common) == 0
    for flags, named in [(["--epochs", "4"], "--epochs 4 (was 3)"),
                         (["--batch-size", "8"], "--batch-size 8 (was 16)"),
                         (["--max-steps", "6", "--lr", "1e-3"], "--max-steps 6 (was 4), --lr 0.001 (was 0.0003)"),
                         (["--seed", "1"], "--seed 1 (was 0)"),
                         (["--mixup", "0.2"], "--mixup 0.2 (was 0.0)")]:
        with pytest.raises(SystemExit) as exit_info:
            train.main([*common, *flags, "--resume"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert named in err and "--init-from" in err, flags
    assert train.main([*common, "--resume", "--workers", "1", "--log-every", "2"]) == 0   # these may change


# ---------------------------------------------------------------------------------------------- DDP

@pytest.mark.slow
def test_ddp_two_processes_resume_exactly(tmp_path):
    """gloo on CPU: 2 processes train; SIGTERM to torchrun stops both at the same step with one checkpoint;
    resuming gives the uninterrupted run's losses. (Resuming on another number of processes: test_reliability.py.)"""
    common = [*TINY, "--max-steps", "40", "--epochs", "10", "--eval-every", "1000", "--dropout", "0.1"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    result = torchrun([*common, "--out-dir", str(straight)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_checkpoint(str(straight / "ckpt.pt"))["world_size"] == 2

    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *common, "--out-dir", str(broken)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = broken / "metrics.jsonl"
    while proc.poll() is None and not (log.exists() and log.read_text().count('"loss"') >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)                  # torchrun passes it on to both workers
    proc.wait(timeout=60)
    stopped_at = load_checkpoint(str(broken / "ckpt.pt"))["step"]
    assert 3 <= stopped_at < 40, "the run ended before the signal: make it longer"
    result = torchrun([*common, "--out-dir", str(broken), "--resume"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert step_losses(broken) == step_losses(straight)
    # the same weights everywhere, but each process its own random stream (dropout, MixUp, ...)
    rng = load_checkpoint(str(straight / "ckpt.pt"))["rng"]
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])


# ---------------------------------------------------------------------------------------------- numerical faults

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    args = [*TINY, "--max-steps", "10", "--save-every", "2", "--eval-every", "1000", "--out-dir", str(tmp_path)]
    forward, calls = model.CAT.forward, {"n": 0}

    def poisoned_forward(self, images):
        calls["n"] += images.device.type != "meta"
        logits = forward(self, images)
        return logits * float("nan") if calls["n"] == 5 else logits   # step 5 (call 0: the FLOP count)

    monkeypatch.setattr(model.CAT, "forward", poisoned_forward)
    assert train.main(args) == 1
    message = capsys.readouterr().err
    assert "loss is nan at step 5" in message and "ckpt.pt" in message
    state = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


# ---------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.slow
def test_checkpoint_write_survives_kill_9(tmp_path):
    """kill -9 in the middle of a checkpoint write leaves the previous checkpoint whole."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "step": 1, "w": torch.ones(10)}, str(path))
    writer = subprocess.Popen([sys.executable, "-c", f"""
import torch
from checkpoint import CHECKPOINT_FORMAT, save_checkpoint
state = {{"format": CHECKPOINT_FORMAT, "step": 2, "w": torch.ones(300_000_000 // 4)}}
while True:
    save_checkpoint(state, {str(path)!r})
"""], cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob("ckpt.pt.tmp-*")):
        time.sleep(0.01)
    assert list(tmp_path.glob("ckpt.pt.tmp-*")), "the writer never started writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    state = load_checkpoint(str(path))           # either the old or a complete new one
    assert state["step"] in (1, 2) and state["w"].numel() in (10, 300_000_000 // 4)


class RunsCode:
    """Unpickling this would create a file: a checkpoint must never get that far."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")     # the hostile file is a plain pickle
def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        load_checkpoint(str(path))
    assert not marker.exists()
    with open(path, "wb") as f:                          # a bare pickle, not even a torch file
        pickle.dump(RunsCode(marker), f)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_truncated_foreign_and_missing_checkpoints_fail_clearly(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "w": torch.randn(1000)}, str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated.pt: unreadable or truncated"):
        load_checkpoint(str(truncated))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(5000))
    with pytest.raises(CheckpointError, match="garbage.pt: (unreadable|refused)"):
        load_checkpoint(str(garbage))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt: not a CAT checkpoint"):
        load_checkpoint(str(foreign))
    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,message", [
    (["--model", "resnet"], "invalid choice: 'resnet'"),
    (["--pos", "sinusoidal"], "invalid choice: 'sinusoidal'"),
    (["--res", "30"], "--res 30 must be divisible by --patch 8"),
    (["--data", "imagefolder", "--data-dir", "/data", "--crop-scale", "2"], "--crop-scale must be in (0, 1], got 2.0"),
    (["--data", "imagefolder", "--data-dir", "/data", "--erase", "1.5"],
     "--erase (a probability) must be in [0, 1], got 1.5"),
    (["--batch-size", "0"], "must be a positive integer"),
    (["--dim", "-64"], "must be a positive integer"),
    (["--dim", "30", "--heads", "4"], "--dim 30 must be divisible by --heads 4"),
    (["--lr", "-1"], "must be >= 0"),
    (["--workers", "-1"], "must be >= 0"),
    (["--eval-every", "-5"], "must be >= 0"),
    (["--shapes-size", "20", "--batch-size", "16", "--accum", "2"], "more than the 20 training images"),
    (["--data", "imagefolder", "--data-dir", "/nonexistent/imagenet"], "/nonexistent/imagenet does not exist"),
    (["--ema", "1"], "--ema must be in [0, 1), got 1.0"),
    (["--warmup", "1.5"], "--warmup (a fraction of the steps) must be in [0, 1], got 1.5"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1], got 1.5"),
    (["--stages", "2", "2"], "--stages is only used by the swin attention, not by cat-tiny's (cross_axis)"),
    (["--window", "4"], "--window is only used by the swin attention"),
    (["--model", "resnet18"], "--dim is only used by the cross_axis, softmax, performer, swin attention, not by "
     "resnet18's (resnet18)"),                                           # torchvision's ResNet-18 has its own widths
    (["--model", "vit-tiny", "--form", "linear"], "--form is only used by the cross_axis attention, not by vit-tiny's"),
    (["--attn", "softmax", "--axis", "row"], "--axis is only used by the cross_axis attention, not by --attn softmax"),
    (["--model", "performer-tiny", "--performer-kernel", "relu", "--performer-features", "32"],
     "--performer-features is only used by the favor kernel, not by --performer-kernel relu"),
    (["--model", "swin-tiny", "--depth", "4"], "--depth is only used by the cross_axis, softmax, performer attention"),
    (["--erase", "0.25"], "--erase is not used by the shapes data"),
    (["--download"], "--download is not used by the shapes data"),
    (["--data", "imagefolder", "--data-dir", "/nonexistent", "--download"],
     "--download is only for the cifar10 and cifar100 data, not --data imagefolder"),
    (["--data", "imagefolder", "--data-dir", "/nonexistent", "--shapes-size", "100"],
     "--shapes-size is only for the shapes data"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, args, message):
    tiny = FOLDER_TINY if "--data" in args else TINY
    with pytest.raises(SystemExit) as exit_info:
        train.main([*tiny, "--max-steps", "1", "--out-dir", str(tmp_path), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "usage:" not in err and len(err.strip().splitlines()) == 2 and "--help" in err   # one line, a pointer
    assert not (tmp_path / "metrics.jsonl").exists()


def image_tree(root, layout):
    """root/split/class/*.png for {split: {class: image count}}."""
    from PIL import Image
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (i * 10, 0, 0)).save(folder / f"{i}.png")


@pytest.mark.parametrize("layout,message", [
    ({"train": {"a": 2, "b": 2}}, "val is missing"),
    ({"train": {"a": 2, "b": 2}, "val": {"a": 2, "c": 2}}, "train and val classes differ"),
    ({"train": {"a": 2, "b": 0}, "val": {"a": 2, "b": 2}}, "has no image files"),
    ({"train": {}, "val": {}}, "no class folders"),
])
def test_bad_image_folders_fail_with_one_line(tmp_path, capsys, layout, message):
    image_tree(tmp_path / "data", layout)
    for split in layout:
        (tmp_path / "data" / split).mkdir(parents=True, exist_ok=True)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*FOLDER_TINY, "--data", "imagefolder", "--data-dir", str(tmp_path / "data"),
                    "--out-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unwritable_out_dir_fails_at_start(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="is not writable"):
        train.main([*TINY, "--max-steps", "1", "--out-dir", str(blocker / "run")])


def test_full_disk_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=1024))
    with pytest.raises(SystemExit, match="MiB free; a checkpoint needs about"):
        train.main([*TINY, "--max-steps", "1", "--out-dir", str(tmp_path)])


def test_strict_images_stops_with_one_line(tmp_path, capsys):
    image_tree(tmp_path / "data", {"train": {"a": 20, "b": 20}, "val": {"a": 20, "b": 20}})
    (tmp_path / "data" / "train" / "a" / "broken.png").write_bytes(b"not a png")
    common = [*FOLDER_TINY, "--data", "imagefolder", "--data-dir", str(tmp_path / "data"), "--max-steps", "20",
              "--epochs", "10", "--out-dir", str(tmp_path / "run")]
    with pytest.warns(UserWarning, match="broken.png"):
        assert train.main(common) == 0                  # skipped and counted
    assert sum(r.get("skipped_images", 0) for r in records(tmp_path / "run")) >= 1
    assert train.main([*common, "--strict-images", "--workers", "1", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- what a user meets

@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_saves(tmp_path):
    """timeout, Slurm and torchrun's shutdown signal the whole process group: the loader's workers must leave the
    signal to the trainer (they used to die of it first, and the trainer failed without saving)."""
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--workers", "1", "--max-steps", "100000",
                             "--epochs", "1000", "--save-every", "100000", "--eval-every", "100000",
                             "--out-dir", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    log = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and log.read_text().count('"loss"') >= 3):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-2000:]
    assert "SIGTERM: stopping after this step" in output and "stopped by signal" in output
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] >= 3


@pytest.mark.slow
def test_a_crash_with_loader_workers_exits_instead_of_hanging(tmp_path):
    """The workers ignore SIGTERM (above), and at exit multiprocessing ends live workers with SIGTERM and waits for
    them: an uncaught error, whose traceback keeps the loader alive until then, used to hang the process for good."""
    driver = f"""
import sys, train
def broken(*args):
    raise RuntimeError("a bug in the training step")
train.gradient_norm = broken
train.main({[*TINY, "--workers", "1", "--max-steps", "5", "--out-dir", str(tmp_path)]!r})
"""
    result = subprocess.run([sys.executable, "-c", driver], cwd=REPO, capture_output=True, text=True, timeout=60,
                            start_new_session=True)
    assert result.returncode == 1 and "RuntimeError: a bug in the training step" in result.stderr


def test_one_process_stops_after_the_step_it_is_in_and_says_so(tmp_path, monkeypatch, capsys):
    """A signal in step 3 stops after step 3, not at the next log step (--log-every 100 here)."""
    common = [*TINY, "--log-every", "100", "--max-steps", "50", "--eval-every", "1000", "--out-dir", str(tmp_path)]
    interrupt_at_forward(monkeypatch, call=3)
    assert train.main(common) == 0
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 3
    err = capsys.readouterr().err
    assert ("SIGTERM: stopping after this step to save a checkpoint (Ctrl-C again, a few seconds later, quits at once "
            "without saving)") in err


@pytest.mark.parametrize("seconds_apart,exit_code", [(0.0, 0), (2.0, 130)])
def test_a_second_signal_quits_at_once_in_one_line(tmp_path, monkeypatch, capsys, seconds_apart, exit_code):
    """Ctrl-C again, seconds later, quits without saving; the same signal twice at once (torchrun forwards the one
    its process group got, Ctrl-C or Slurm's SIGTERM) is one request, and the run saves."""
    forward, calls = model.CAT.forward, {"n": 0}
    clock = {"now": 100.0}
    monkeypatch.setattr(runtime, "monotonic", lambda: clock["now"])

    def twice(self, images):
        calls["n"] += images.device.type != "meta"
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            clock["now"] += seconds_apart
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, images)

    monkeypatch.setattr(model.CAT, "forward", twice)
    assert train.main([*TINY, "--max-steps", "50", "--save-every", "2", "--out-dir", str(tmp_path)]) == exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if exit_code:
        assert "interrupted: not saved" in err
        assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 2      # the last save stands
    else:
        assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 3      # saved at the step of the signal


@pytest.mark.slow
def test_torchrun_stops_and_saves_whatever_log_every(tmp_path):
    """SIGTERM to the process group (a terminal's Ctrl-C, Slurm, timeout), which torchrun forwards to its processes
    again and follows with SIGKILL 30 s later: the processes agreed on a stop only every --log-every steps, and the
    forwarded copy counted as a second signal. Now they stop within two steps and save."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *TINY, "--shapes-size", "1000000", "--epochs", "1", "--log-every", "1000000",
                             "--eval-every", "1000000", "--save-every", "1000000", "--out-dir", str(tmp_path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "run.json").exists():
        time.sleep(0.1)
    time.sleep(2)                                   # training steps
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert "stopped by signal at step" in output, output[-3000:]
    step = int(output.split("stopped by signal at step ")[1].split(";")[0])
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == step > 1


class InfiniteGradient(torch.autograd.Function):
    """Passes its input through and sends an infinite gradient back: an overflow in the backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_finite_loss_with_non_finite_gradients_stops_before_the_update_and_saves_nothing(tmp_path, monkeypatch,
                                                                                             capsys):
    forward, calls = model.CAT.forward, {"n": 0}

    def overflowing_backward(self, images):
        calls["n"] += images.device.type != "meta"
        logits = forward(self, images)
        return InfiniteGradient.apply(logits) if calls["n"] == 4 else logits     # step 4, a save step

    monkeypatch.setattr(model.CAT, "forward", overflowing_backward)
    args = [*TINY, "--log-every", "10", "--max-steps", "10", "--save-every", "2", "--eval-every", "1000",
            "--out-dir", str(tmp_path)]
    assert train.main(args) == 1
    message = capsys.readouterr().err
    assert "the loss is finite but the gradient norm is" in message and "at steps 3-4" in message
    state = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.slow
def test_a_new_run_leaves_another_runs_files_alone(tmp_path, capsys):
    common = [*TINY, "--max-steps", "2", "--out-dir", str(tmp_path)]
    assert train.main(common) == 0
    before = files_of(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*common, "--seed", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--out-dir {tmp_path} holds another run" in err and "--resume" in err and "--overwrite" in err
    assert files_of(tmp_path) == before
    assert train.main([*common, "--seed", "1", "--overwrite"]) == 0      # on purpose: the old files go first
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == [1, 2]
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["args"]["seed"] == 1


@pytest.mark.slow
def test_resume_needs_no_flags_and_names_a_changed_model_flag(tmp_path, monkeypatch, capsys):
    """--resume takes the run's own flags; those typed are compared by their effective values."""
    common = [*TINY, "--max-steps", "6", "--eval-every", "1000", "--lr", "1e-3"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert train.main([*common, "--out-dir", str(straight)]) == 0
    interrupt_at_forward(monkeypatch, call=3)
    assert train.main([*common, "--out-dir", str(broken)]) == 0
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        train.main(["--out-dir", str(broken), "--resume", "--res", "48"])
    assert "--res 48 (was 32)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--out-dir", str(broken), "--resume", "--lr", "0.01"])
    assert "--lr 0.01 (was 0.001)" in capsys.readouterr().err
    assert train.main(["--out-dir", str(broken), "--resume", "--res", "32"]) == 0    # the run's own value, typed
    assert step_losses(broken) == step_losses(straight)
    steps = [r["step"] for r in records(broken) if "loss" in r]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]        # the redone steps are not logged twice


def test_resume_refuses_data_with_other_classes(tmp_path, capsys):
    """Only the class count used to be compared: --resume --data-dir OTHER trained the rest on other classes."""
    first, other, run = tmp_path / "first", tmp_path / "other", tmp_path / "run"
    image_tree(first, {"train": {"cat": 16, "dog": 16}, "val": {"cat": 2, "dog": 2}})
    image_tree(other, {"train": {"car": 16, "dog": 16}, "val": {"car": 2, "dog": 2}})
    assert train.main(["--dim", "32", "--depth", "2", "--heads", "2", "--res", "32", "--batch-size", "16",
                       "--workers", "0", "--data", "imagefolder", "--data-dir", str(first), "--max-steps", "1",
                       "--out-dir", str(run)]) == 0
    with pytest.raises(SystemExit):
        train.main(["--out-dir", str(run), "--resume", "--data-dir", str(other)])
    err = capsys.readouterr().err
    assert "the run was trained on other classes" in err and "car" in err


def test_logged_learning_rate_is_the_one_the_step_used(tmp_path):
    assert train.main([*TINY, "--max-steps", "4", "--warmup", "0", "--out-dir", str(tmp_path)]) == 0
    lrs = [lr for _, _, lr in step_losses(tmp_path)]
    assert lrs[0] == 3e-4 and lrs[-1] > 0                  # the peak first; the last step's rate is not yet 0
    assert lrs == sorted(lrs, reverse=True)


def test_small_data_says_what_the_batch_leaves_out(tmp_path, capsys):
    assert train.main([*TINY, "--shapes-size", "120", "--batch-size", "64", "--max-steps", "1",
                       "--out-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "leave out 56 of the 120 training images every epoch" in err and "--batch-size 60" in err


def test_tensorboard_gets_the_logged_scalars_and_a_summary_ends_the_run(tmp_path, monkeypatch, capsys):
    written = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            written.append(("dir", log_dir))

        def add_scalar(self, name, value, step):
            written.append((name, step))

        def flush(self):
            pass

    module = type(sys)("torch.utils.tensorboard")
    module.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    assert train.main([*TINY, "--max-steps", "3", "--tensorboard", "--out-dir", str(tmp_path)]) == 0
    assert ("dir", str(tmp_path / "tb")) in written
    assert [step for name, step in written if name == "train/loss"] == [1, 2, 3] and ("val/top1", 3) in written
    assert {name.split("/")[0] for name, _ in written if name != "dir"} == {"train", "val"}   # grouped
    assert not {"params", "flops_per_image", "world_size"} & {name.split("/")[-1] for name, _ in written}
    out = capsys.readouterr().out
    assert "best" in out and "at step 3 (best.pt)" in out and "images/s" in out
    assert json.loads((tmp_path / "run.json").read_text())["config"]["dim"] == 32


# ---------------------------------------------------------------------------------------------- what --overwrite clears

def test_overwrite_clears_nothing_until_every_check_has_passed(tmp_path, capsys):
    """A typo in --data-dir used to cost the old run: --overwrite deletes only once the start-up checks pass."""
    common = [*TINY, "--max-steps", "2", "--out-dir", str(tmp_path)]
    assert train.main(common) == 0
    before = files_of(tmp_path)
    with pytest.raises(SystemExit):
        train.main([*FOLDER_TINY, "--max-steps", "2", "--out-dir", str(tmp_path), "--overwrite",
                    "--data", "imagefolder", "--data-dir", str(tmp_path / "typo")])
    assert "typo does not exist" in capsys.readouterr().err
    assert files_of(tmp_path) == before
    with pytest.MonkeyPatch.context() as patch:             # --tensorboard without the package
        patch.setitem(sys.modules, "torch.utils.tensorboard", None)
        with pytest.raises(SystemExit, match="pip install tensorboard"):
            train.main([*TINY, "--max-steps", "2", "--out-dir", str(tmp_path), "--overwrite", "--tensorboard"])
    assert files_of(tmp_path) == before


def test_deterministic_is_the_runs_own_flag_on_resume(tmp_path, monkeypatch):
    """--deterministic must hold for the resume that train.py prints (`--out-dir X --resume`, no flags): it was
    read before the run's own flags were."""
    switched = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", switched.append)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    interrupt_at_forward(monkeypatch, call=2)
    assert train.main([*TINY, "--max-steps", "4", "--deterministic", "--out-dir", str(tmp_path)]) == 0
    assert switched == [True]
    assert train.main(["--out-dir", str(tmp_path), "--resume"]) == 0
    assert switched == [True, True]


@pytest.mark.slow
def test_init_from_a_checkpoint_in_the_folder_being_overwritten_is_refused(tmp_path, capsys):
    """--init-from OUT/ckpt.pt --overwrite used to delete its own source, then fail with a traceback."""
    common = [*TINY, "--max-steps", "2", "--out-dir", str(tmp_path)]
    assert train.main(common) == 0
    before = files_of(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*common, "--overwrite", "--init-from", str(tmp_path / "ckpt.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--init-from" in err and "inside --out-dir" in err and "Traceback" not in err
    assert files_of(tmp_path) == before
    # from another folder it loads once and trains
    assert train.main([*TINY, "--max-steps", "2", "--out-dir", str(tmp_path / "tuned"), "--init-from",
                       str(tmp_path / "ckpt.pt")]) == 0


def test_compute_threads_leave_the_loader_workers_their_cores(monkeypatch):
    """Threads + workers never exceed the cores the process may use (oversubscribed, a CPU step ran 11x slower),
    at least one thread; torchrun's processes share the cores; an explicit OMP_NUM_THREADS wins."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores in range(1, 9):
        for workers in range(0, 4):
            threads = runtime.compute_threads(workers, cores)
            assert threads == max(1, cores - workers)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.compute_threads(1, 8) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert runtime.compute_threads(1, 8) == 5


def test_cuda_bf16_default_needs_real_bf16_units(monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulation unless told not to: a GPU that emulates bf16 gets fp32."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.bf16_is_fast(torch.device("cuda")) is False


def test_the_exit_hook_kills_only_our_loader_workers():
    """Importing runtime must not SIGKILL another library's daemonic children at exit; the workers of our loaders
    (which ignore SIGTERM) it must, also when only their iterator is left (a traceback keeps it)."""
    import multiprocessing
    import time as clock
    theirs = multiprocessing.get_context("fork").Process(target=clock.sleep, args=(30,), daemon=True)
    loader = runtime.SignalSafeLoader(list(range(8)), 1, batch_size=4)
    try:
        theirs.start()
        batches = iter(loader)
        next(batches)
        ours = batches._workers[0]
        loader._iterator = None                     # the iterator outlives its loader
        del loader
        try:
            runtime.end_workers_that_ignore_sigterm()
            ours.join(5)
        except RuntimeError as error:               # DataLoader's SIGCHLD handler reports the killed worker
            assert "killed by signal: Killed" in str(error)
            ours.join(5)
        assert ours.exitcode == -signal.SIGKILL
        assert theirs.is_alive()
    finally:
        theirs.kill()
        theirs.join()


@pytest.mark.slow
def test_torchrun_prints_a_refusal_once(tmp_path):
    result = torchrun([*TINY, "--ema", "2", "--out-dir", str(tmp_path)], timeout=120)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("--ema must be in [0, 1)") == 1
