"""Reliability beyond one machine (issue 17): `--resume auto`, a SIGKILLed worker under torchrun --max-restarts,
two torchrun "nodes" on localhost, resuming on another number of processes, --keep-last, best.pt, and the fallback
from a corrupt latest checkpoint. The torchrun runs share one uninterrupted 2-process reference run."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import data
import train
from checkpoint import fit_batch_to_world, load_checkpoint
from test_train import TINY, interrupt_at_forward, records, step_losses

REPO = Path(__file__).parent
# 256 images / (16 x 2 processes) = 8 steps an epoch, 16 in all; a checkpoint every 4 steps, all of them kept.
IMAGES, STEPS = 256, 16
RUN = [*TINY, "--shapes-size", str(IMAGES), "--epochs", "2", "--eval-every", "1000", "--save-every", "4",
       "--keep-last", "10", "--dropout", "0.1"]

# train.py, plus what a test needs to watch it and to break it from the inside: each process appends the
# (epoch, index) of every training image it loads to INDEX_LOG/rankR-PID.txt, and rank KILL_RANK SIGKILLs itself
# in its KILL_AT-th training forward, on torchrun's first attempt only.
DRIVER = """
import os, signal, sys
import data, model, train

rank, attempt = int(os.environ.get("RANK", 0)), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
kill_at, kill_rank = int(os.environ.get("KILL_AT", 0)), int(os.environ.get("KILL_RANK", 1))
log = None
if "INDEX_LOG" in os.environ:
    log = open(os.path.join(os.environ["INDEX_LOG"], f"rank{rank}-{os.getpid()}.txt"), "a")
getitem, forward, calls = data.SeededDataset.__getitem__, model.CAT.forward, [0]

def logged_getitem(self, item):
    if log is not None and getattr(self, "split_stream", 0) == 0:
        log.write(f"{self.epoch} {item}\\n")
        log.flush()
    return getitem(self, item)

def faulty_forward(self, images):
    if self.training and images.device.type != "meta":
        calls[0] += 1
        if calls[0] == kill_at and rank == kill_rank and attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    return forward(self, images)

data.SeededDataset.__getitem__, model.CAT.forward = logged_getitem, faulty_forward
sys.exit(train.main(sys.argv[1:]))
"""


def launch(command, env=None):
    """Its own process group, so that a hung run can be killed with all its workers."""
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout=120):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, output[-3000:]
    return output


def torchrun(script, args, nproc=2, launcher=("--standalone",), env=None):
    return launch([sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
                   str(script), *args], env)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def indices(log_dir, epoch, files="rank*"):
    """Every training index that the processes logged in log_dir (the files matching `files`) loaded in
    `epoch`, in one list."""
    found = []
    for path in sorted(Path(log_dir).glob(f"{files}.txt")):
        found += [int(i) for e, i in (line.split() for line in path.read_text().splitlines()) if int(e) == epoch]
    return found


def weights(out_dir, name="ckpt.pt"):
    return load_checkpoint(str(Path(out_dir) / name))["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, driver):
    """The uninterrupted run: 2 processes, one node, every training index logged."""
    out = tmp_path_factory.mktemp("reference")
    (out / "indices").mkdir()
    finish(torchrun(driver, [*RUN, "--out-dir", str(out)], env={"INDEX_LOG": str(out / "indices")}))
    return out


# ---------------------------------------------------------------------------------------------- crashes

@pytest.mark.slow
def test_sigkilled_worker_restarts_and_ends_with_the_uninterrupted_weights(tmp_path, driver, reference):
    """torchrun --max-restarts=1 and --resume auto: rank 1 is SIGKILLed in step 7, the group restarts from the
    checkpoint of step 4, redoes steps 5-6 and ends bit-identical to the uninterrupted run. (Without a store
    of its own, the second attempt's gloo read the first's addresses and failed to connect: pytorch#135712.)"""
    proc = torchrun(driver, [*RUN, "--resume", "auto", "--out-dir", str(tmp_path)],
                    launcher=("--standalone", "--max-restarts=1"),
                    env={"KILL_AT": "7", "KILL_RANK": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    output = finish(proc)
    # torchrun logs the failure it saw first: rank 1's SIGKILL (-9), or rank 0's exit (1) when gloo's broken
    # connection ended it before the agent's next poll (once in 17 runs here, 2026-12-03)
    first_failure = re.search(r"failed \(exitcode: (-9\) local_rank: 1|1\) local_rank: 0) ", output)
    assert "pytorch#135712" not in output and first_failure, output[-3000:]
    starts = [r for r in records(tmp_path) if r.get("event") == "start"]
    assert [(r["step"], r["resumed_from"]) for r in starts] == [(0, None), (4, str(tmp_path / "ckpt.pt"))], output
    redone = {step: (loss, lr) for step, loss, lr in step_losses(tmp_path)}   # steps 5, 6 twice: the last counts
    assert redone == {step: (loss, lr) for step, loss, lr in step_losses(reference)}
    assert same_weights(weights(tmp_path), weights(reference))


# ---------------------------------------------------------------------------------------------- multi-node

@pytest.mark.slow
def test_two_nodes_on_localhost_match_one_node(tmp_path, reference):
    """Two torchrun launches, one process each, meeting through c10d rendezvous on 127.0.0.1, as two machines
    would: the same losses as one node with 2 processes."""
    nodes = ("--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=test")
    procs = [torchrun("train.py", [*RUN, "--resume", "auto", "--out-dir", str(tmp_path / "run")], nproc=1,
                      launcher=nodes, env={"OMP_NUM_THREADS": "1"}) for _ in range(2)]   # as torchrun sets for 2
    for proc in procs:
        finish(proc)
    assert [r["world_size"] for r in records(tmp_path / "run") if r.get("event") == "start"] == [2]
    assert step_losses(tmp_path / "run") == step_losses(reference)


# ---------------------------------------------------------------------------------------------- world size

def test_sampler_deals_the_rest_of_an_epoch_over_another_world_size():
    """Whatever the world sizes before and after, the positions of the epoch's order are consumed in turn:
    a step of B images on W processes takes the next B x W of them, once each."""
    for length, repeats in ((64, 1), (50, 2)):
        order = data.ShardedSampler(length, repeats=repeats, seed=3, drop_last=True)
        order.set_epoch(5)
        order = order.epoch_order().tolist()
        for before, after in ((2, 1), (1, 2), (2, 3), (3, 2)):
            consumed = 4 * before * 2                        # 2 steps of batch 4 on `before` processes
            shards = []
            for rank in range(after):
                sampler = data.ShardedSampler(length, after, rank, seed=3, repeats=repeats, drop_last=True)
                sampler.set_epoch(5, consumed=consumed)
                shards.append(list(sampler))
            assert len({len(shard) for shard in shards}) == 1
            taken = [shard[i] for i in range(len(shards[0])) for shard in shards]   # in order of the steps
            as_rows = [list(item) if repeats > 1 else item for item in taken]
            assert as_rows == order[consumed:consumed + len(taken)]
            assert len(taken) == (length - consumed) // after * after


def test_effective_batch_is_kept_or_the_change_is_said():
    saved = {"batch_size": 16, "accum": 1}
    args = Namespace(batch_size=16, accum=1)
    assert "--accum 1 -> 2" in fit_batch_to_world(saved, 2, args, 1) and args.accum == 2
    args = Namespace(batch_size=16, accum=2)
    assert "the same 32 images" in fit_batch_to_world({"batch_size": 16, "accum": 2}, 1, args, 2)
    assert args.accum == 1
    args = Namespace(batch_size=16, accum=1)
    note = fit_batch_to_world(saved, 2, args, 3)
    assert note.startswith("48 images a step instead of 32") and args.accum == 1


@pytest.mark.slow
def test_two_to_one_to_two_processes_skips_and_repeats_no_sample(tmp_path, monkeypatch, capsys, driver, reference):
    """The reference run's checkpoint of step 4 (epoch 0, 2 processes) is resumed on 1 process, which stops in
    step 6; 2 processes finish. Each of epoch 0's images is seen once, and the schedule goes on."""
    shutil.copy(reference / "ckpt-4.pt", tmp_path / "ckpt.pt")
    one = log_training_indices(monkeypatch)
    interrupt_at_forward(monkeypatch, call=3)                  # --accum 2 now: step 6's first micro-batch
    assert train.main([*RUN, "--resume", "--out-dir", str(tmp_path)]) == 0
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert "1 process(es) continue a run of 2" in out and "--accum 1 -> 2" in out
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 6
    (tmp_path / "two").mkdir()
    two = finish(torchrun(driver, [*RUN, "--resume", "--out-dir", str(tmp_path)],
                          env={"INDEX_LOG": str(tmp_path / "two")}))
    assert "2 process(es) continue a run of 1" in two

    before = [i for rank in range(2) for i in indices(reference / "indices", 0, f"rank{rank}-*")[:4 * 16]]
    epoch0 = before + [i for epoch, i in one if epoch == 0] + indices(tmp_path / "two", 0)
    assert sorted(epoch0) == list(range(IMAGES))                     # none skipped, none repeated
    assert sorted(indices(tmp_path / "two", 1)) == sorted(indices(reference / "indices", 1))
    lrs = {step: lr for step, _, lr in step_losses(tmp_path)}
    assert lrs == {step: lr for step, _, lr in step_losses(reference) if step > 4}   # steps 5-16, same schedule
    final = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert (final["step"], final["world_size"], final["args"]["accum"]) == (STEPS, 2, 1)


def log_training_indices(monkeypatch):
    """A list that gets the (epoch, index) of every training image this process loads from now on."""
    loaded, getitem = [], data.SeededDataset.__getitem__

    def logged_getitem(self, item):
        if self.split_stream == 0:
            loaded.append((self.epoch, item))
        return getitem(self, item)

    monkeypatch.setattr(data.SeededDataset, "__getitem__", logged_getitem)
    return loaded


# ---------------------------------------------------------------------------------------------- resume auto

def test_resume_auto_starts_fresh_then_continues(tmp_path, monkeypatch, capsys):
    common = [*TINY, "--max-steps", "6", "--eval-every", "1000", "--out-dir", str(tmp_path), "--resume", "auto"]
    with pytest.raises(SystemExit) as exit_info:                # plain --resume still insists on a checkpoint
        train.main(common[:-1])
    assert exit_info.value.code == 2 and "no such checkpoint file" in capsys.readouterr().err
    interrupt_at_forward(monkeypatch, call=3)
    assert train.main(common) == 0                              # none yet: a fresh start, stopped at step 3
    monkeypatch.undo()
    assert train.main(common) == 0                              # the same command line continues it
    starts = [(r["step"], r["resumed_from"]) for r in records(tmp_path) if r.get("event") == "start"]
    assert starts == [(0, None), (3, str(tmp_path / "ckpt.pt"))]
    assert [step for step, _, _ in step_losses(tmp_path)] == list(range(1, 7))


# ---------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.slow
def test_keep_last_best_and_fallback_from_a_corrupt_latest_checkpoint(tmp_path, capsys):
    common = [*TINY, "--max-steps", "6", "--save-every", "2", "--eval-every", "3", "--keep-last", "3",
              "--out-dir", str(tmp_path)]
    assert train.main(common) == 0
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best.pt", "ckpt-2.pt", "ckpt-4.pt", "ckpt.pt"]
    assert [load_checkpoint(str(tmp_path / f"ckpt-{s}.pt"))["step"] for s in (2, 4)] == [2, 4]
    top1 = [r["val_top1"] for r in records(tmp_path) if "val_top1" in r]
    assert load_checkpoint(str(tmp_path / "best.pt"))["metrics"]["val_top1"] == max(top1)
    finished = weights(tmp_path)

    latest = tmp_path / "ckpt.pt"                      # truncated as by a full disk (a new file: best.pt may
    cut = latest.read_bytes()[:len(latest.read_bytes()) // 2]   # share ckpt.pt's inode)
    latest.unlink()
    latest.write_bytes(cut)
    capsys.readouterr()
    assert train.main([*common, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"{latest}: unreadable or truncated" in err and f"previous checkpoint, {tmp_path / 'ckpt-4.pt'}" in err
    assert load_checkpoint(str(latest))["step"] == 6
    assert same_weights(weights(tmp_path), finished)   # steps 5 and 6 redone exactly
