"""The suite's device-sensitive checks, on CUDA: train.py's compiled bf16 step and eval.py, exact resume, the
rotations forward and backward, NCCL and compiled DDP with gradient accumulation, CPU against CUDA logits of every
preset. Each is skipped without a GPU (`python gpu_check.py --out DIR` runs them on one, with bench.py and a training
run); the GPU check's own dry run is tested here on any machine."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as evaluate_script
import gpu_check
import rope2d
import runtime
import train
from checkpoint import load_checkpoint
from model import PRESETS, build_model
from test_compile import tiny
from test_reliability import free_port
from test_train import NOISY, REPO, TINY, records, run_script, step_losses

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (python gpu_check.py runs these)")


def relative_error(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def worst_gradient_error(got, want):
    """(name, error) of the parameter whose gradient in `got` is furthest from `want`'s: relative to its norm, or
    to a thousandth of the whole gradient's for a parameter that hardly gets any (where rounding is all there is)."""
    got, want = ({name: g.detach().double().cpu() for name, g in grads.items()} for grads in (got, want))
    whole = torch.cat([g.flatten() for g in want.values()]).norm()
    errors = {name: float((got[name] - g).norm() / max(g.norm(), whole / 1000)) for name, g in want.items()}
    return max(errors.items(), key=lambda item: item[1])


# ---------------------------------------------------------------------------------------------- training and eval

# The tiny model of the CPU tests with train.py's CUDA defaults spelled out: each process that trains it after the
# first finds its compiled graphs in inductor's cache.
CUDA_RUN = [*TINY, "--shapes-size", "2048", "--batch-size", "32", "--compile", "--amp"]


@CUDA
def test_compiled_bf16_training_on_cuda_learns_and_eval_reads_it(tmp_path):
    """train.py's CUDA path (torch.compile, bf16 autocast, fused AdamW, pinned memory) with cat-tiny's `scaled`
    rotary, whose complex arithmetic inductor leaves to eager CUDA kernels: the tiny run learns as it does on the
    CPU (test_tiny_run_learns), and eval.py on its checkpoint gives the run's own final top-1."""
    assert train.main([*CUDA_RUN, "--max-steps", "300", "--epochs", "10", "--lr", "3e-3", "--out-dir", str(tmp_path),
                       "--eval-every", "1000", "--save-every", "1000"]) == 0
    start, *_, final = records(tmp_path)
    assert start["amp"] and start["compile"] and start["device_name"] == torch.cuda.get_device_name()
    losses = [loss for _, loss, _ in step_losses(tmp_path)]
    assert len(losses) == 300
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < first - 0.3, (first, last)
    assert final["val_top1"] > 40
    # eval.py: the uncompiled model in bf16, as the run's validation, at the run's batch (so the same kernels)
    rows = evaluate_script.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--res", "32", "48", "--batch-size", "32",
                                 "--workers", "0"])
    assert [r["res"] for r in rows] == [32, 48] and all(r["images"] == 2000 for r in rows)
    assert rows[0]["top1"] == pytest.approx(final["val_top1"], abs=0.1)       # 0.05: one image of 2000
    assert rows[1]["top1"] > 40


# ---------------------------------------------------------------------------------------------- resume

# train.main with CUDA's deterministic algorithms (docs/reliability.md), stopped by a real SIGTERM inside step
# STOP_AT_STEP when that is set. The signal comes from outside the model, so the compiled graph is train.py's own.
DETERMINISTIC_TRAIN = """
import os, signal, sys
import train
norm, calls = train.gradient_norm, [0]
def gradient_norm(model, clip):
    calls[0] += 1
    if calls[0] == int(os.environ.get("STOP_AT_STEP", 0)):
        os.kill(os.getpid(), signal.SIGTERM)
    return norm(model, clip)
train.gradient_norm = gradient_norm
sys.exit(train.main(sys.argv[1:]))
"""


@CUDA
def test_resume_on_cuda_is_exact_with_deterministic_algorithms(tmp_path):
    """Compiled bf16 on CUDA with every source of randomness on (dropout, drop-path, MixUp/CutMix, EMA,
    accumulation, a loader worker), stopped by SIGTERM inside step 11 and resumed: the same losses, learning rates
    and weights, bit for bit, as the run never stopped, with --deterministic (CUBLAS_WORKSPACE_CONFIG=:4096:8 and
    torch.use_deterministic_algorithms(True)). Without it, atomics in some CUDA kernels and inductor's timing of
    reduction configurations can change the rounding: resumed runs then match to rounding only."""
    common = [*TINY, *NOISY, "--max-steps", "20", "--epochs", "3", "--eval-every", "1000", "--compile", "--amp",
              "--deterministic"]
    env = dict(os.environ)
    straight, broken = tmp_path / "straight", tmp_path / "broken"

    def run(out, *extra, stop_at=0):
        result = subprocess.run([sys.executable, "-c", DETERMINISTIC_TRAIN, *common, "--out-dir", str(out), *extra],
                                cwd=REPO, env={**env, "STOP_AT_STEP": str(stop_at)}, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    run(straight)
    run(broken, stop_at=11)
    assert load_checkpoint(str(broken / "ckpt.pt"))["step"] == 11
    subprocess.run([sys.executable, "-c", DETERMINISTIC_TRAIN, "--out-dir", str(broken), "--resume"], cwd=REPO,
                   env=env, check=True, capture_output=True, timeout=300)        # the run's own --deterministic
    assert len(step_losses(straight)) == 20 and step_losses(broken) == step_losses(straight)
    a, b = load_checkpoint(str(straight / "ckpt.pt")), load_checkpoint(str(broken / "ckpt.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    assert a["metrics"]["val_top1"] == b["metrics"]["val_top1"]


# ---------------------------------------------------------------------------------------------- rotations

@CUDA
def test_rotations_on_cuda_match_fp64_on_the_cpu():
    """Every rotary scheme (`scaled` and `mixed` through rope2d.Rotation's complex arithmetic, `cat` and `axial`
    through the cached tables eager and the real form compiled, `cat_ref`'s modulation), forward and backward,
    eager and compiled (fp32), and eager with bf16 inputs, with the class-token column: on CUDA against fp64 on the
    CPU."""
    torch.manual_seed(0)
    schemes = rope2d.ROTARY
    rotaries = [rope2d.RotaryPosition(s, dim=64, heads=4, grid=6) for s in schemes]
    x = torch.randn(2, 4, 6, 8, 16)                       # (B, heads, H, W + class column, head dim): a 6 x 7 grid
    grad = torch.randn_like(x)

    def outputs_and_gradients(rotaries, x, grad, compiled=False):
        """Per scheme: the output, x's gradient, and the learned frequencies' gradient where there are any."""
        xs = [x.detach().clone().requires_grad_() for _ in rotaries]
        params = [p for r in rotaries for p in r.parameters()]
        apply = lambda *inputs: [r(t, cls_column=True) for r, t in zip(rotaries, inputs)]
        outs = (torch.compile(apply) if compiled else apply)(*xs)
        grads = torch.autograd.grad(outs, [*xs, *params], [grad.to(o.dtype) for o in outs])
        param_grads = iter(grads[len(xs):])
        return [(out, x_grad, *[next(param_grads) for _ in r.parameters()])
                for r, out, x_grad in zip(rotaries, outs, grads[:len(xs)])]

    want = outputs_and_gradients([copy.deepcopy(r).double() for r in rotaries], x.double(), grad.double())
    on_cuda = [copy.deepcopy(r).cuda() for r in rotaries]
    for dtype, compiled, tolerance in [(torch.float32, False, 1e-4), (torch.float32, True, 1e-4),
                                       (torch.bfloat16, False, 1e-2)]:
        got = outputs_and_gradients(on_cuda, x.cuda().to(dtype), grad.cuda(), compiled)
        for scheme, g, w in zip(schemes, got, want):
            assert g[0].dtype == dtype and g[1].dtype == dtype
            for name, a, b in zip(("output", "x gradient", "frequency gradient"), g, w):
                assert relative_error(a, b) < tolerance, (scheme, dtype, compiled, name, relative_error(a, b))


# ---------------------------------------------------------------------------------------------- distributed

@CUDA
def test_torchrun_with_nccl_on_one_gpu(tmp_path):
    """torchrun --nproc_per_node=1 on CUDA: the NCCL process group, its all-reduces at the log steps, compile."""
    result = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", *CUDA_RUN,
                         "--max-steps", "4", "--eval-every", "1000", "--out-dir", str(tmp_path)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 4
    start = records(tmp_path)[0]
    assert start["world_size"] == 1 and start["compile"] and start["device_name"] == torch.cuda.get_device_name()


# One process of an NCCL group of one, set up as under torchrun (runtime.setup_device), runs train.py's
# accumulate_gradients through torch.compile(DistributedDataParallel(model)) as if there were two processes:
# no_sync() on the first micro-batch, the all-reduce on the second. Its gradients must be those of the plain model.
COMPILED_DDP = """
import copy, sys, torch
import runtime, train
from torch.nn.parallel import DistributedDataParallel
from model import build_model
from test_compile import tiny
rank, world, device = runtime.setup_device()
assert device.type == "cuda" and torch.distributed.get_backend() == "nccl", (device, torch.distributed.get_backend())
torch.manual_seed(0)
model = build_model(tiny("cat-tiny")).to(device)
plain = copy.deepcopy(model)
ddp = torch.compile(DistributedDataParallel(model, device_ids=[device.index]))
images, labels = torch.randn(2, 8, 3, 32, 32, device=device), torch.randint(0, 4, (2, 8), device=device)
criterion = torch.nn.CrossEntropyLoss()
for net, processes in ((ddp, 2), (plain, 1)):
    batches = iter(zip(images, labels, torch.zeros(2, 1, dtype=torch.long)))
    train.accumulate_gradients(net, batches, 2, None, criterion, device, False, processes, train.new_window(device))
from test_cuda import worst_gradient_error
name, error = worst_gradient_error({n: p.grad for n, p in model.named_parameters()},
                                   {n: p.grad for n, p in plain.named_parameters()})
assert error < 1e-3, (name, error)
torch.distributed.destroy_process_group()
print("same gradients")
"""


@CUDA
def test_compiled_ddp_accumulates_like_the_plain_model():
    """What train.py does under torchrun with --accum 2, which a single GPU cannot run with two processes."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-c", COMPILED_DDP], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "same gradients" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- CPU against CUDA

@CUDA
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_cuda_logits_and_gradients_match_the_cpu(name):
    """The same weights on the CPU and on CUDA, fp32 (TF32 off: runtime.fp32_means_fp32), evaluation mode with
    gradients: the logits and every parameter's gradient agree to fp32 rounding, for each preset at a tiny size."""
    runtime.fp32_means_fp32()
    torch.manual_seed(0)
    config = tiny(name)
    model = build_model(config).eval()
    images = torch.randn(2, 3, config.img_size, config.img_size)
    weights = torch.randn(2, config.num_classes)

    def logits_and_gradients(model, device):
        model.zero_grad(set_to_none=True)
        logits = model(images.to(device))
        (logits * weights.to(device)).sum().backward()
        return logits, {name: p.grad for name, p in model.named_parameters()}

    cpu_logits, cpu_grads = logits_and_gradients(model, "cpu")
    cuda_logits, cuda_grads = logits_and_gradients(copy.deepcopy(model).cuda(), "cuda")
    assert relative_error(cuda_logits, cpu_logits) < 1e-4
    name, error = worst_gradient_error(cuda_grads, cpu_grads)
    assert error < 1e-3, (name, error)


# ---------------------------------------------------------------------------------------------- gpu_check.py

@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    """gpu_check.py --dry-run: its stages on the CPU at tiny sizes, the same code that reads and reports the figures
    of a GPU run, so that the script cannot rot."""
    result = run_script(["gpu_check.py", "--dry-run", "--out", str(tmp_path)], timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench.json", "bench.log", "environment.log", "summary.json", "summary.md", "tests.log", "train.log",
        "train_metrics.jsonl"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["environment", "tests", "bench", "train"] and summary["passed"]
    assert all(s["status"] == "ok" and s["seconds"] <= s["limit_s"] for s in stages.values())
    assert stages["environment"]["figures"]["cuda_available"] is False
    tests = stages["tests"]["figures"]
    assert tests["counts"]["skipped"] >= 6 and set(tests["counts"]) == {"skipped"}      # no GPU in a dry run
    bench = stages["bench"]["figures"]
    assert {(r["model"], r["res"]) for r in bench["rows"]} == {(m, px) for m in ("cat-tiny", "vit-tiny")
                                                               for px in (32, 64)}
    assert all(r["train_images_per_s"] > 0 and r["batch"] == 2 for r in bench["rows"])
    assert [r["res"] for r in bench["ratios"]] == [32, 64]
    assert len(json.loads((tmp_path / "bench.json").read_text())["runs"]) == 1       # one bench.py for both sizes
    trained = stages["train"]["figures"]
    assert trained["steps"] == 3 and trained["warm_images_per_s"] > 0 and 0 <= trained["val_top1"] <= 100
    report = (tmp_path / "summary.md").read_text()
    assert "dry run on the CPU" in report and "`cat-tiny` | 64 | 2 |" in report and "images/s once warm" in report


def test_gpu_check_records_a_failed_or_late_stage_and_goes_on(tmp_path, monkeypatch):
    """A stage that fails or runs past its time is recorded with its log's end, and the next stage still runs with
    its own time."""
    plan = gpu_check.Plan(dry_run=True)
    plan.limits, plan.budget = {"first": 2, "second": 5, "third": 5}, 12
    check = gpu_check.Check(tmp_path, plan)
    python = [sys.executable, "-c"]
    first = check.stage("first", [[*python, "import time; print('started', flush=True); time.sleep(60)"]])
    second = check.stage("second", [[*python, "raise SystemExit('broken')"], [*python, "print('after')"]],
                         lambda log: {"after": "after" in log})
    third = check.stage("third", [[*python, "print('fine')"]], lambda log: 1 / 0)
    assert first["status"] == "timeout" and "started" in first["log_tail"] and first["seconds"] < 2 + 21
    assert second["status"] == "failed (exit 1)" and second["figures"] == {"after": True}
    assert [c["status"] for c in second["commands"]] == ["failed (exit 1)", "ok"]
    assert third["status"] == "failed" and "ZeroDivisionError" in third["figures_error"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["timeout", "failed (exit 1)", "failed"]
    assert not summary["passed"] and "## first: timeout" in (tmp_path / "summary.md").read_text()
