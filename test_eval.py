"""eval.py on a checkpoint trained here, its refusals, bench.py's smoke mode and experiments.py's plan."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import eval as evaluate_script
import experiments
import train
import runtime
from checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from model import PRESETS, count_flops

REPO = Path(__file__).parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train.main(["--dim", "32", "--depth", "2", "--heads", "2", "--res", "32", "--shapes-size", "256",
                       "--batch-size", "32", "--workers", "0", "--max-steps", "8", "--ema", "0.5",
                       "--pos", "ape+axial", "--out-dir", str(out)]) == 0
    return str(out / "ckpt.pt")


@pytest.fixture
def tf32_on():
    """TF32 switched on, as bench.py used to do; runtime.fp32_means_fp32 must switch it off again."""
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = False


def test_eval_at_two_resolutions(checkpoint, tmp_path, capsys, tf32_on):
    rows = evaluate_script.main(["--ckpt", checkpoint, "--res", "32", "48", "--json", str(tmp_path / "r.json"),
                                 "--workers", "0"])
    assert [r["res"] for r in rows] == [32, 48] and not torch.backends.cuda.matmul.allow_tf32   # as train.py
    for r in rows:
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["images"] == 2000 and r["loss"] > 0
        assert r["images_per_s"] > 0 and r["params_m"] > 0
    assert rows[1]["gflops"] > rows[0]["gflops"]
    # the training run's own final evaluation (EMA weights, 32 px) is what eval.py reports at 32 px
    state = load_checkpoint(checkpoint)
    assert rows[0]["top1"] == pytest.approx(state["metrics"]["ema_val_top1"])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["weights"] == "EMA" and [r["res"] for r in saved["rows"]] == [32, 48]
    table = capsys.readouterr().out
    assert "top-1" in table and "GFLOPs" in table


def test_eval_model_weights_and_form_override(checkpoint):
    raw = evaluate_script.main(["--ckpt", checkpoint, "--no-ema", "--workers", "0"])[0]
    state = load_checkpoint(checkpoint)
    assert raw["top1"] == pytest.approx(state["metrics"]["val_top1"])
    # The two product orders agree to fp32 rounding, so compare them in fp32: in bf16 they differ by bf16's
    # rounding, which flips a few of the 2000 predictions on some CPUs (AVX512-BF16 rounds unlike AMX).
    quadratic, linear = (evaluate_script.main(["--ckpt", checkpoint, "--no-ema", "--no-amp", *form,
                                               "--workers", "0"])[0] for form in ([], ["--form", "linear"]))
    assert linear["top1"] == pytest.approx(quadratic["top1"])
    assert linear["loss"] == pytest.approx(quadratic["loss"], rel=1e-4)


@pytest.mark.slow
def test_eval_under_torchrun_matches_one_process(checkpoint):
    one = evaluate_script.main(["--ckpt", checkpoint, "--workers", "0"])[0]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "eval.py", "--ckpt", checkpoint, "--workers", "0", "--json", "/dev/stdout"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    two = json.loads(result.stdout[result.stdout.index("{"):])["rows"][0]
    assert two["images"] == one["images"] and two["top1"] == pytest.approx(one["top1"])
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--res", "36"], "--res 36 not divisible by the patch size 8"),
    (["--model", "vit-tiny"], "weights do not fit the model"),
    (["--dim", "64"], "weights do not fit the model"),
    (["--form", "linear", "--model", "vit-tiny"], "--form is only used by the cross_axis attention, not by vit-tiny's"),
])
def test_eval_bad_requests_fail_clearly(checkpoint, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_script.main(["--ckpt", checkpoint, "--workers", "0", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_refuses_a_malicious_checkpoint_without_running_it(tmp_path, capsys):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": CHECKPOINT_FORMAT, "config": {}, "model": RunsCode()}, path)
    with pytest.raises(SystemExit):
        evaluate_script.main(["--ckpt", str(path)])
    assert not marker.exists()
    assert "evil.pt: refused" in capsys.readouterr().err


def test_eval_truncated_checkpoint_and_missing_default(checkpoint, tmp_path, capsys, monkeypatch):
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(Path(checkpoint).read_bytes()[:5000])
    with pytest.raises(SystemExit):
        evaluate_script.main(["--ckpt", str(truncated)])
    assert "cut.pt: unreadable or truncated" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)                          # no runs/ here: the default run has not happened
    with pytest.raises(SystemExit):
        evaluate_script.main([])
    assert "train it first with `python train.py`" in capsys.readouterr().err


def test_unreadable_val_images_are_left_out_and_counted(tmp_path, capsys):
    """An unreadable val file used to be replaced by the next readable one, silently changing the val set."""
    from PIL import Image
    for split, count in (("train", 16), ("val", 4)):
        for name in ("a", "b"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (i * 10, 0, 0)).save(folder / f"{i}.png")
    (tmp_path / "data" / "val" / "a" / "broken.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="leaving out unreadable image .*broken.png"):
        assert train.main(["--dim", "32", "--depth", "2", "--heads", "2", "--res", "32", "--data", "imagefolder",
                           "--data-dir", str(tmp_path / "data"), "--batch-size", "8", "--workers", "0",
                           "--max-steps", "1", "--out-dir", str(run)]) == 0
    with open(run / "metrics.jsonl") as f:
        final = [json.loads(line) for line in f][-1]
    assert final["val_images"] == 8 and final["val_left_out"] == 1
    rows = evaluate_script.main(["--ckpt", str(run / "ckpt.pt"), "--workers", "0", "--json", str(tmp_path / "r.json")])
    assert rows[0]["images"] == 8 and rows[0]["left_out"] == 1
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["left_out"] == 1
    assert "unreadable" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_smoke(tmp_path, tf32_on):
    # one precision policy everywhere (runtime.fp32_means_fp32): the benchmark used to turn TF32 on
    result = bench.main(["--smoke", "--kernel-ceiling", "--json", str(tmp_path / "bench.json")])
    assert not torch.backends.cuda.matmul.allow_tf32
    models = {r["model"] for r in result["rows"]}
    assert models == {"cat-tiny", "vit-tiny", "performer-tiny"}
    assert all(r["train_images_per_s"] > 0 and r["activation_mib"] > 0 for r in result["rows"])
    # the step's FLOP kernels alone take part of the step, and so run faster than the whole step does
    assert all(0 < r["kernel_share"] < 1 and r["kernel_tflops_per_s"] > r["train_tflops_per_s"]
               for r in result["rows"])
    assert [r["res"] for r in result["ratios"]] == [32, 64]
    assert set(result["exponents"]) == models
    assert {r["width"] for r in result["crossover"]} == {4, 8, 16}
    assert json.loads((tmp_path / "bench.json").read_text())["rows"]
    # bf16 matmuls are timed where bf16 runs (the default --amp): an AVX2 CPU would emulate them, ~20 s each
    bf16 = {"bf16", "bf16 weight gradient"} if result["args"]["amp"] else set()
    assert set(result["matmul_flops_per_s"]) == {"fp32", *bf16}


def test_flop_kernels_are_recorded_in_their_layouts_and_replayed_alone(monkeypatch):
    """A Linear's step is three matmuls; the weight gradient's is grad_out^T @ input, a transposed operand, the
    layout this CPU runs at half speed. Replay keeps each layout exactly and times calls alike only once."""
    linear, x = torch.nn.Linear(7, 3), torch.randn(5, 7, requires_grad=True)   # as inside a network
    recorder = bench.RecordFlopKernels()
    with recorder:
        linear(x).square().sum().backward()
    aten = torch.ops.aten
    assert [func for func, _, _ in recorder.calls] == [aten.addmm.default, aten.mm.default, aten.mm.default]
    forward, weight_gradient = recorder.calls[0][1], recorder.calls[2][1]
    assert (forward[2].shape, forward[2].stride) == ((7, 3), (1, 7))                # W^T, a view
    assert (weight_gradient[0].shape, weight_gradient[0].stride) == ((3, 5), (1, 3))  # grad_out^T, a view
    for layout in (*forward, bench.Layout((4, 3), (0, 1), torch.bfloat16)):          # expanded, too
        t = layout.tensor("cpu")
        assert (tuple(t.shape), t.stride(), t.dtype) == (layout.shape, layout.stride, layout.dtype)
    timings = []
    monkeypatch.setattr(bench, "timed", lambda fn, device: timings.append(fn()) or 1.0)
    assert bench.kernel_seconds(recorder.calls * 2, torch.device("cpu"), repeats=2) == 6.0
    assert len(timings) == 3 * 2                                                     # 3 distinct calls


@pytest.mark.parametrize("args,message", [(["--res", "100"], "not divisible by the patch size 8"),
                                          (["--res", "0"], "must be a positive integer"),
                                          (["--batch-size", "-1"], "must be a positive integer")])
def test_bench_refuses_bad_sizes(args, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(args)
    assert message in capsys.readouterr().err


def test_every_experiment_is_a_valid_train_command():
    """The sweep takes hours: a typo in one of its runs must fail here, not in the middle of it."""
    plan = experiments.plan(seeds=[0, 1, 2])
    # 10 families + 3 x 2 more headline seeds, 2 seeds x (5 rotaries + 5 shapes + 5 ViT rotaries + ViT and 6
    # Table 4 rows at 10 epochs)
    screen = 2 + len(experiments.LEVERS)            # the patchify stem, the conv stem, each lever on the conv stem
    assert len(plan) == 10 + 6 + 2 * (5 + 5 + 5 + 7) + 1 + screen                   # + rotary-cat-fp32-s0
    assert list(plan)[:3] == ["cat-tiny-s0", "vit-tiny-s0", "resnet18-s0"]       # the headline first
    assert list(plan)[-screen - 3:-screen] == ["cat-tiny-s2", "vit-tiny-s2", "cat-tiny-scaled-s2"]   # third seeds
    assert all(name.startswith("small-") for name in list(plan)[-screen:])                           # the screen last
    assert not any(name.startswith("small-") for name in experiments.plan(seeds=[1, 2]))              # seed 0's only
    for name, (flags, res) in plan.items():
        args, _ = train.parse_args([*flags, "--out-dir", f"out/{name}"])
        assert args.data == ("shapes" if name.startswith("shapes") else "imagefolder")
        assert args.seed == int(name[-1])
        if name.startswith("small-"):
            assert (args.res, res, args.epochs, args.seed, args.pos) == (80, [80], 10, 0, "scaled")
            assert args.stem == ("patch" if name == "small-patch-s0" else "conv")
        elif name.startswith(("rotary", "vit-rotary")):
            assert (args.res, res, args.epochs) == (80, [80, 120, 160], 20)
        elif args.data == "imagefolder":
            assert args.res == 128 and args.epochs == (10 if "-e10-" in name else 20)
        if args.model == "cat-tiny":    # the preset may change mid-sweep: no CAT run takes its rotary or imprint
            assert args.pos is not None and args.imprint is not None, name
    assert train.parse_args(plan["cat-xy-mask-e10-s1"][0])[0].xy_mask
    assert train.parse_args(plan["rotary-scaled-s0"][0])[0].pos == "scaled"
    assert plan["rotary-cat-fp32-s0"] == ([*plan["rotary-cat-s0"][0], "--no-amp"], plan["rotary-cat-s0"][1])
    assert train.parse_args(plan["rotary-cat-fp32-s0"][0])[0].amp is False
    assert train.parse_args(plan["resnet18-s0"][0])[0].model == "resnet18"
    vit_mixed = train.parse_args(plan["vit-rotary-ape+mixed-s1"][0])[0]
    assert (vit_mixed.model, vit_mixed.pos) == ("vit-tiny", "ape+mixed")
    assert [train.parse_args(plan[f"{m}-conv-stem-s0"][0])[0].stem for m in ("cat-tiny", "vit-tiny")] == ["conv"] * 2
    assert [train.parse_args(plan[n][0])[0].pos for n in ("cat-tiny-s2", "cat-tiny-scaled-s0")] == ["cat", "scaled"]
    def settings(name):                 # every parsed flag's value (not `given`, the list of flags typed)
        return {key: value for key, value in vars(train.parse_args(plan[name][0])[0]).items() if key != "given"}
    base = settings("small-conv-s0")
    changed = {lever: {key: value for key, value in settings(f"small-conv+{lever}-s0").items() if base[key] != value}
               for lever in experiments.LEVERS}
    assert changed == {"trivial": {"auto_augment": "trivial"}, "mix": {"mixup": 0.8, "cutmix": 1.0},  # one lever each
                       "erase": {"erase": 0.25}, "ema": {"ema": 0.998}, "lr2e-3": {"lr": 2e-3},
                       "mlp2": {"mlp_ratio": 2}, "depth8": {"depth": 8}, "cls": {"pool": "cls"}}
    cat = {"train_seconds": 600.0, "train_images_per_s": 150.0, "machine": "Xeon (AMX)"}
    vit = {"train_seconds": 1500.0, "train_images_per_s": 64.0, "machine": "Xeon (AMX)"}
    unknown = {name: {k: v for k, v in run.items() if k != "machine"} for name, run in (("cat-tiny-s0", cat),
                                                                                      ("vit-tiny-s0", vit))}
    assert experiments.equal_time_plan([0], unknown) == {}          # times from machines not recorded: no pair
    timed = experiments.equal_time_plan([0, 1], {"cat-tiny-s0": cat, "vit-tiny-s0": vit, "cat-tiny-s1": cat})
    flags, _ = timed.pop("vit-tiny-time-s0")                  # seed 1's ViT has not run: no run for it yet
    assert not timed and train.parse_args(flags)[0].max_steps == 600 * 64 // 64   # CAT's seconds at ViT's speed
    # seed 1's two runs trained on different machines: its ViT gets the step count of seed 0's pair
    here, there = {"machine": "Xeon (AMX)"}, {"machine": "EPYC (AVX512-BF16)"}
    results = {"cat-tiny-s0": {**cat, **here}, "vit-tiny-s0": {**vit, **here}, "cat-tiny-s1": {**cat, **there},
               "vit-tiny-s1": {"train_seconds": 3000.0, "train_images_per_s": 32.0, **here}}
    timed = experiments.equal_time_plan([0, 1], results)
    assert [train.parse_args(timed[f"vit-tiny-time-s{s}"][0])[0].max_steps for s in (0, 1)] == [600, 600]
    results["cat-tiny-s1"] = {"train_seconds": 1000.0, "train_images_per_s": 75.0, **here}   # now one machine
    assert train.parse_args(experiments.equal_time_plan([1], results)["vit-tiny-time-s1"][0])[0].max_steps == 500


def test_the_results_docs_count_the_runs_planned():
    """docs/results.md's status line gives the plan's run count."""
    text = (REPO / "docs" / "results.md").read_text()
    total, planned = map(int, re.search(r"plans\s+(\d+) runs \((\d+), plus `vit-tiny` at", text).groups())
    assert (total, planned) == (len(experiments.plan([0, 1, 2])) + 3, len(experiments.plan([0, 1, 2])))


def test_headline_time_ratio_comes_from_one_machine():
    """CAT's 10-epoch run trained on an EPYC and ViT's on a Xeon: their times are not comparable, so the ratio
    falls back to the 20-epoch pair that shares a machine, and says which."""
    here, there = "Xeon (AMX), 2 threads", "EPYC (AVX512-BF16), 2 threads"
    results = {"cat-tiny-e10-s0": {"train_seconds": 1300.0, "machine": there},
               "vit-tiny-e10-s0": {"train_seconds": 2000.0, "machine": here},
               "cat-tiny-s0": {"train_seconds": 1500.0, "machine": here},
               "vit-tiny-s0": {"train_seconds": 4000.0, "machine": here},
               "vit-tiny-s1": {"train_seconds": 9000.0, "machine": there}}
    assert experiments.time_ratio(results) == f"training time 0.38x (cat-tiny / vit-tiny on {here})"
    results["cat-tiny-e10-s1"] = {"train_seconds": 700.0, "machine": here}      # now a 10-epoch pair on one machine
    assert experiments.time_ratio(results) == f"training time 0.35x (cat-tiny-e10 / vit-tiny-e10 on {here})"
    assert "no CAT and ViT" in experiments.time_ratio({"cat-tiny-s0": results["cat-tiny-s0"]})
    del results["vit-tiny-e10-s0"]["machine"]                       # an entry that never recorded its machine
    assert experiments.time_ratio(results) == f"training time 0.38x (cat-tiny / vit-tiny on {here})"


def test_report_never_averages_speeds_from_different_machines():
    """cat-tiny's third seed trained on the EPYC, at half the Xeon's speed: its row gives each machine's own
    figure, tagged, where one mean over the three would describe no machine."""
    def run(top1, per_s, machine):
        return {"params": 1e6, "flops_per_image": 1e9, "train_images_per_s": per_s, "train_seconds": 189e3 / per_s,
                "machine": machine, "eval": [{"res": 128, "top1": top1}, {"res": 160, "top1": top1}]}
    xeon, epyc = "Intel(R) Xeon(R) Processor (AMX), 2 threads", "AMD EPYC (AVX512-BF16), 2 threads"
    results = {"cat-tiny-s0": run(70, 130, xeon), "cat-tiny-s1": run(71, 136, xeon), "cat-tiny-s2": run(72, 70, epyc)}
    row = next(line for line in experiments.report(results).splitlines() if line.startswith("| cat-tiny, `cat`"))
    assert "| 71.0 ± 1.0 (3) |" in row                                      # accuracy: every seed
    assert "| 133 ± 4 (2) Xeon; 70 EPYC | 23.7 ± 0.8 (2) Xeon; 45.0 EPYC |" in row


def test_the_sweep_trains_in_fp32_where_bf16_would_be_emulated(monkeypatch):
    """The recipe trains in bf16: on an AVX2-only CPU, emulated, one run would take days (65 s a vit-tiny step), so
    there it trains and evaluates in fp32; with bf16 units, as the recipe says."""
    launched = []
    monkeypatch.setattr(experiments, "run_command", lambda command, env: launched.append(command[1:]) or
                        threads.append(env["OMP_NUM_THREADS"]))
    monkeypatch.setattr(experiments, "load_checkpoint", lambda path: {"step": 5, "total_steps": 5})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: None)
    experiments.run("vit-tiny-e10-s1", ["--amp"], [128])
    assert [(c[0], "--no-amp" in c) for c in launched] == [("train.py", True), ("eval.py", True)]
    assert threads == [str(len(os.sched_getaffinity(0)))] * 2       # the sweep's processes use every core
    launched.clear()
    monkeypatch.setattr(runtime, "cpu_bf16_units", lambda: "AVX512-BF16")
    experiments.run("vit-tiny-e10-s1", ["--amp"], [128])
    assert [(c[0], "--no-amp" in c) for c in launched] == [("train.py", False), ("eval.py", False)]


def test_a_run_stopped_by_a_signal_is_not_evaluated(monkeypatch):
    """train.py saves and exits 0 on SIGTERM: the sweep must not evaluate (and record) the half-trained run."""
    launched = []
    monkeypatch.setattr(experiments, "run_command", lambda command, env: launched.append(command[1]))
    monkeypatch.setattr(experiments, "load_checkpoint", lambda path: {"step": 3, "total_steps": 5})
    with pytest.raises(SystemExit, match="vit-tiny-e10-s1: training stopped at step 3 of 5"):
        experiments.run("vit-tiny-e10-s1", [], [128])
    assert launched == ["train.py"]


def test_the_queue_follows_the_questions(monkeypatch):
    """What is left runs in the order of the questions it answers: the fp32 calibration, the stems, `scaled`'s
    seeds, the rotaries inside ViT seed by seed, then the rest."""
    results = experiments.load_results(experiments.RESULTS)
    done = {name: r for name, r in results.items()
            if not name.startswith(("cat-tiny-conv-stem", "vit-tiny-conv-stem", "rotary-cat-fp32", "vit-rotary",
                                    "small-"))
            and name not in ("cat-tiny-scaled-s1", "cat-tiny-scaled-s2")}
    runs = {**experiments.plan([0, 1, 2]), **experiments.equal_time_plan([0, 1, 2], done)}
    order = sorted((n for n in runs if n not in done), key=experiments.by_question)
    vit_rotaries = [f"vit-rotary-{pos}-s{seed}" for seed in (0, 1) for pos in experiments.VIT_ROTARIES]
    assert order[:15] == ["rotary-cat-fp32-s0", "cat-tiny-conv-stem-s0", "vit-tiny-conv-stem-s0",
                          "cat-tiny-scaled-s1", "cat-tiny-scaled-s2", *vit_rotaries]
    screen = 2 + len(experiments.LEVERS)
    assert all(n.startswith("small-") for n in order[-screen:])
    assert not any(n.startswith("small-") for n in order[:-screen])


def test_the_screen_table_gives_each_lever_its_gain_on_the_conv_stem():
    def run(top1):
        return {"params": 1.59e6, "flops_per_image": 0.35e9, "train_seconds": 600.0, "machine": "EPYC (AVX512-BF16)",
                "eval": [{"res": 80, "top1": top1}]}
    results = {"small-patch-s0": run(60.0), "small-conv-s0": run(70.0), "small-conv+mix-s0": run(71.5)}
    rows = experiments.screen_table(results)
    assert rows[0].endswith("no rotary run has two seeds yet")
    assert "| `patch` | 1.59M | 0.35 | 60.0 | -10.0 | 10.0 EPYC |" in rows
    assert "| `conv+mix` | 1.59M | 0.35 | 71.5 | +1.5 | 10.0 EPYC |" in rows
    assert "| `conv+ema` | - | - | - | - | - |" in rows                     # queued
    # the bar: the widest gap between two seeds of one rotary run at 80 px (mixed's 1.7 here, not cat's 1.6)
    results |= {f"rotary-{pos}-s{seed}": run(top1) for pos, seed, top1 in
                [("cat", 0, 67.9), ("cat", 1, 69.5), ("mixed", 0, 69.2), ("mixed", 1, 70.9), ("axial", 0, 60.0)]}
    results["small-conv+ema-s0"] = run(71.8)
    rows = experiments.screen_table(results)
    assert "a gain counts (bold) above 1.7 points" in rows[0]
    assert "| `conv+mix` | 1.59M | 0.35 | 71.5 | +1.5 | 10.0 EPYC |" in rows
    assert "| `conv+ema` | 1.59M | 0.35 | 71.8 | **+1.8** | 10.0 EPYC |" in rows


def screen_results(**gains):
    """A finished screen: `conv` at 70.0, each lever at 70.0 + its gain (0 unless given), and a bar of 1.7 points."""
    def run(top1, res=80):
        return {"params": 1.59e6, "flops_per_image": 0.35e9, "train_seconds": 600.0,
                "machine": "EPYC (AVX512-BF16)", "eval": [{"res": res, "top1": top1}, {"res": 160, "top1": top1}]}
    results = {"rotary-mixed-s0": run(69.2), "rotary-mixed-s1": run(70.9), "small-patch-s0": run(62.0),
               "small-conv-s0": run(70.0)}
    return run, results | {f"small-conv+{lever}-s0": run(70.0 + gains.get(lever, 0.0)) for lever in experiments.LEVERS}


def test_a_screen_run_without_its_training_resolution_counts_as_unfinished():
    """A results entry for a screen run but no top-1 at 80 px (a file edited by hand) leaves the choice open and
    shows the run as queued, where arithmetic on the missing figure would stop --report."""
    run, results = screen_results(trivial=2.0)
    results["small-conv+mix-s0"]["eval"] = [{"res": 160, "top1": 70.0}]
    assert experiments.screen_winners(results) is None and experiments.screen_choice(results) is None
    assert "| `conv+mix` | - | - | - | - | - |" in experiments.screen_table(results)


def test_the_model_levers_are_those_the_resnet_refuses(capsys):
    """A lever outside MODEL_LEVERS runs unchanged for the ResNet-18 and the ViT in the confirmation: each must be
    a training flag that both accept, and each model lever one that the ResNet-18 refuses (it changes CAT)."""
    for lever, flags in experiments.LEVERS.items():
        for family in ("resnet18", "vit-tiny"):
            command = [*experiments.recipe(128, 20), *experiments.FAMILIES[family], *flags]
            if lever in experiments.MODEL_LEVERS and family == "resnet18":
                with pytest.raises(SystemExit):
                    train.parse_args(command)
                assert flags[0][2:] in capsys.readouterr().err.replace("_", "-")     # for this lever's flag
            elif lever not in experiments.MODEL_LEVERS:
                train.parse_args(command)


def test_the_capacity_levers_spend_most_of_the_flops_left_under_the_resnets():
    """mlp2 (width) and depth8 (depth) each add to the conv-stem CAT at 128 px more than half of what it is short of
    the ResNet-18's FLOPs, and neither goes past them."""
    def flops(flags):
        args, parser = train.parse_args([*experiments.recipe(128, 20), *flags])
        return count_flops(train.model_config(args, parser, PRESETS[args.model], num_classes=10), 128)
    resnet, conv = flops(experiments.FAMILIES["resnet18"]), flops(experiments.SCREEN_BASE)
    for lever in experiments.CAPACITY:
        assert conv + (resnet - conv) / 2 < flops([*experiments.SCREEN_BASE, *experiments.LEVERS[lever]]) <= resnet


def test_of_the_capacity_levers_only_the_better_one_goes_on():
    """mlp2 and depth8 together would pass the ResNet-18's FLOPs: where both clear the bar, the better one stays
    among the winners (on a tie the first, the cheaper wider FFN), and only it is bold in the screen's table."""
    for gains, winners in (({"mlp2": 2.0, "depth8": 2.5}, ["trivial", "depth8"]),
                           ({"mlp2": 2.5, "depth8": 2.0}, ["trivial", "mlp2"]),
                           ({"mlp2": 2.5, "depth8": 2.5}, ["trivial", "mlp2"])):
        run, results = screen_results(trivial=2.0, **gains)
        assert experiments.screen_winners(results) == winners
        assert list(experiments.small_data_plan([0], results)) == [experiments.screen_name(winners)]
        rows = {row.split(" | ")[0]: row for row in experiments.screen_table(results)}
        for lever in experiments.CAPACITY:
            assert ("**" in rows[f"| `conv+{lever}`"]) == (lever in winners)
    run, results = screen_results(mlp2=2.0, depth8=2.5)             # the two alone: depth8 is confirmed, by itself
    runs = {name: train.parse_args(flags)[0] for name, (flags, _) in experiments.small_data_plan([0], results).items()}
    assert list(runs) == ["small-cat+depth8-s0", "resnet18-s0"]
    assert (runs["small-cat+depth8-s0"].depth, runs["resnet18-s0"].depth) == (8, None)     # depth8 is CAT's own


def test_the_screen_chooses_what_to_confirm_by_its_rule():
    """Levers above the bar run together on `conv`; the best of them alone and together is confirmed at 128 px for
    20 epochs on 3 seeds, its training flags unchanged for the ResNet-18 and the ViT, its model flags CAT's own."""
    def parsed(runs):
        return {name: train.parse_args(flags)[0] for name, (flags, _) in runs.items()}
    run, results = screen_results(trivial=2.0, mix=1.5, mlp2=1.8)
    assert experiments.small_data_plan([0, 1, 2], {k: v for k, v in results.items() if k != "small-conv+cls-s0"}) == {}
    runs = experiments.small_data_plan([0, 1, 2], results)              # two winners: their run together first
    assert list(runs) == ["small-conv+trivial+mlp2-s0"] and runs["small-conv+trivial+mlp2-s0"][1] == [80]
    both = parsed(runs)["small-conv+trivial+mlp2-s0"]
    assert (both.res, both.epochs, both.seed, both.stem, both.pos) == (80, 10, 0, "conv", "scaled")
    assert (both.auto_augment, both.mlp_ratio, both.mixup) == ("trivial", 2, 0.0)     # mix's +1.5 is under the bar
    assert experiments.screen_choice(results) is None

    results["small-conv+trivial+mlp2-s0"] = run(73.0)                   # together beats either alone
    runs = parsed(experiments.small_data_plan([0, 1, 2], results))
    assert experiments.screen_choice(results) == ["trivial", "mlp2"]
    confirmed = ["small-cat+trivial+mlp2", "small-resnet18+trivial", "small-vit-tiny+trivial"]
    assert list(runs) == ["small-conv+trivial+mlp2-s0", *[f"{n}-s{s}" for s in (0, 1, 2) for n in confirmed]]
    for name in runs:
        if not name.startswith("small-conv+"):
            assert (runs[name].res, runs[name].epochs, runs[name].seed, runs[name].auto_augment) == (128, 20, int(name[-1]),
                                                                                                   "trivial")
    cat, resnet, vit = (runs[f"{n}-s1"] for n in confirmed)
    assert [cat.model, resnet.model, vit.model] == ["cat-tiny", "resnet18", "vit-tiny"]
    assert (cat.stem, cat.pos, cat.mlp_ratio, vit.mlp_ratio) == ("conv", "scaled", 2, None)   # mlp2 is CAT's own

    results["small-conv+trivial+mlp2-s0"] = run(71.0)                   # together loses to trivial alone
    assert experiments.screen_choice(results) == ["trivial"]
    results["small-conv+trivial+mlp2-s0"] = run(72.0)                   # ties trivial alone: the fewer levers
    assert experiments.screen_choice(results) == ["trivial"]

    run, results = screen_results(**{"lr2e-3": 3.0})                    # one winner that overrides a recipe flag
    runs = parsed(experiments.small_data_plan([0, 1, 2], results))
    assert list(runs)[:3] == ["small-cat+lr2e-3-s0", "small-resnet18+lr2e-3-s0", "small-vit-tiny+lr2e-3-s0"]
    assert {args.lr for args in runs.values()} == {2e-3}

    run, results = screen_results(cls=2.5)                              # one winner, and it changes the model only
    runs = parsed(experiments.small_data_plan([0, 1, 2], results))      # the ResNet-18's shared recipe to 3 seeds
    assert list(runs) == [f"{n}-s{s}" for s in (0, 1, 2) for n in ("small-cat+cls", "resnet18")]
    assert runs["small-cat+cls-s0"].pool == "cls" and runs["resnet18-s2"].model == "resnet18"

    run, results = screen_results(erase=1.0)                            # nothing clears the bar: `conv` itself
    runs = experiments.small_data_plan([0, 1, 2], results)
    plan = experiments.plan([0])
    assert list(runs) == [f"{n}-s{s}" for s in (0, 1, 2) for n in ("cat-tiny-conv-stem", "resnet18")]
    assert runs["cat-tiny-conv-stem-s0"] == plan["cat-tiny-conv-stem-s0"] and runs["resnet18-s0"] == plan["resnet18-s0"]
    # the sequel runs after the rest of the study, even where it continues a family
    assert experiments.by_question("resnet18-s1") == experiments.by_question("small-conv-s0")
    assert experiments.by_question("resnet18-s0") < experiments.by_question("small-conv-s0")
    assert experiments.by_question("cat-tiny-conv-stem-s2") > experiments.by_question("vit-tiny-e10-s1")


def test_the_confirmation_table_gives_each_model_its_gap_to_the_resnet_under_the_same_recipe():
    run, results = screen_results(trivial=2.0, cls=2.5)
    results["small-conv+trivial+cls-s0"] = run(73.0)
    rows = experiments.confirmation_table(results)
    assert "the screen's levers: `trivial` `cls`" in rows[0]
    assert rows[-1] == "| `small-vit-tiny+trivial` | - | - | - | - |"                 # queued
    results |= {"resnet18-s0": run(85.4, 128), "cat-tiny-conv-stem-s0": run(80.9, 128),
                "small-resnet18+trivial-s0": run(86.0, 128), "small-cat+trivial+cls-s0": run(82.0, 128),
                "small-cat+trivial+cls-s1": run(83.0, 128)}
    rows = experiments.confirmation_table(results)
    assert "| `cat-tiny-conv-stem` | 80.9 | 80.9 | 4.5 | 10.0 EPYC |" in rows
    assert "| `resnet18` | 85.4 | 85.4 | - | 10.0 EPYC |" in rows
    assert "| `small-cat+trivial+cls` | 82.5 ± 0.7 (2) | 82.5 ± 0.7 (2) | 3.5 | 10.0 ± 0.0 (2) EPYC |" in rows
    assert "| `small-resnet18+trivial` | 86.0 | 86.0 | - | 10.0 EPYC |" in rows
    assert "not chosen yet" in experiments.confirmation_table({})[0]
    run, results = screen_results()
    assert "none (no lever cleared the bar)" in experiments.confirmation_table(results)[0]
    assert len(experiments.confirmation_table(results)) == 4 + 3                          # the shared recipe's rows
    run, results = screen_results(cls=2.5)                  # the CAT changes, the ResNet-18 keeps the shared recipe
    assert [row.split(" | ")[0] for row in experiments.confirmation_table(results)[4:]] == [
        "| `cat-tiny-conv-stem`", "| `resnet18`", "| `vit-tiny`", "| `small-cat+cls`"]


def test_the_resolution_plot_has_both_models_rotaries_as_seed_means():
    def run(*top1):
        return {"eval": [{"res": r, "top1": t} for r, t in zip(experiments.ROTARY_EVAL, top1)]}
    results = {"rotary-cat-s0": run(68.0, 69.0, 67.0), "rotary-cat-s1": run(70.0, 69.0, 68.0),
               "rotary-cat-fp32-s0": run(0, 0, 0), "vit-rotary-mixed-s0": run(68.0, 67.5, 61.4),
               "cat-tiny-s0": run(90, 90, 90)}
    assert experiments.resolution_curves(results) == {
        ("rotary", "cat"): list(zip(experiments.ROTARY_EVAL, [69.0, 69.0, 67.5])),     # fp32 is not a seed of `cat`
        ("vit-rotary", "mixed"): list(zip(experiments.ROTARY_EVAL, [68.0, 67.5, 61.4]))}


def test_the_sweep_keeps_edits_made_to_the_results_file_while_a_run_trains(tmp_path, monkeypatch):
    """A run takes up to an hour: a correction written to the results file meanwhile must survive its save."""
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"old": {"machine": "as first written"}}))
    monkeypatch.setattr(experiments, "plan", lambda seeds, data_dir: {"new": (["--seed", "0"], [])})
    monkeypatch.setattr(experiments, "equal_time_plan", lambda seeds, results, data_dir: {})
    monkeypatch.setattr(experiments, "report", lambda results: "")
    monkeypatch.setattr(experiments, "angle_spreads", lambda: "")
    finished = []
    monkeypatch.setattr(experiments, "summary", lambda name, flags, res: {"machine": "here"} if finished else None)

    def run(name, flags, res):          # the edit lands while the run trains
        path.write_text(json.dumps({"old": {"machine": "corrected"}}))
        finished.append(name)
    monkeypatch.setattr(experiments, "run", run)
    monkeypatch.setattr(sys, "argv", ["experiments.py", "--json", str(path), "--plot", ""])
    experiments.main()
    assert json.loads(path.read_text()) == {"old": {"machine": "corrected"}, "new": {"machine": "here"}}


def test_a_run_records_the_machine_it_trained_on(tmp_path, monkeypatch):
    """Sessions here get different CPUs (a Xeon with AMX, an EPYC whose bf16 matmuls are 4x slower): every
    speed in the results must say where it was measured."""
    monkeypatch.setattr(experiments, "OUT", str(tmp_path))
    out = tmp_path / "run"
    assert train.main(["--dim", "16", "--depth", "1", "--heads", "2", "--res", "16", "--shapes-size", "64",
                       "--batch-size", "32", "--workers", "0", "--max-steps", "1", "--out-dir", str(out)]) == 0
    with open(out / "metrics.jsonl") as f:
        start = json.loads(f.readline())
    assert start["device_name"] == runtime.device_name(torch.device("cpu"))
    assert start["device_name"].endswith(f", {torch.get_num_threads()} threads")
    (out / "eval.json").write_text(json.dumps({"rows": [{"res": 16, "top1": 50.0, "top5": 100.0, "loss": 1.0}]}))
    assert start["boot_id"] == runtime.boot_id() and len(runtime.boot_id()) == 36       # Linux: this boot's uuid
    assert experiments.summary("run", [], [16])["machine"] == f"{start['device_name']}, boot {start['boot_id'][:8]}"
    assert experiments.summary("run", [], [16])["precision"] == ("bf16" if start["amp"] else "fp32")


def test_two_sessions_with_one_cpu_name_are_two_machines(tmp_path, monkeypatch):
    """cat-tiny's seed 2 trained on an EPYC, ViT's in a later session on a slower EPYC of the same name: the
    equal-time budget must not mix their speeds (about 600 steps where seed 0's pair gives 1,101), so it falls
    back to seed 0's pair, and the report tags each session's speed apart."""
    monkeypatch.setattr(experiments, "OUT", str(tmp_path))
    epyc = "AMD EPYC (AVX512-BF16), 2 threads"
    for name, per_s, boot in [("cat-tiny-s2", 132, "f1b82f8a-0"), ("vit-tiny-s2", 27, "0c0ffee0-1")]:
        (tmp_path / name).mkdir()
        records = [{"event": "start", "device_name": epyc, "boot_id": boot, "params": 1, "flops_per_image": 1,
                    "amp": True},
                   {"step": 2940, "train_seconds": 2940 * 64 / per_s}]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))
        (tmp_path / name / "eval.json").write_text(json.dumps({"rows": [{"res": 128, "top1": 70.0, "top5": 99.0,
                                                                         "loss": 1.0}]}))
    results = {name: experiments.summary(name, [], [128]) for name in ("cat-tiny-s2", "vit-tiny-s2")}
    assert [experiments.machine_tag(r) for r in results.values()] == ["EPYC f1b8", "EPYC 0c0f"]
    assert experiments.equal_time_plan([2], results) == {}                  # no pair from one machine yet
    xeon = {"machine": "Intel(R) Xeon(R) Processor (AMX), 2 threads"}
    results |= {"cat-tiny-s0": {"train_seconds": 1463.0, "train_images_per_s": 128.6, **xeon},
                "vit-tiny-s0": {"train_seconds": 3908.0, "train_images_per_s": 48.15, **xeon}}
    flags, _ = experiments.equal_time_plan([0, 2], results)["vit-tiny-time-s2"]
    assert train.parse_args(flags)[0].max_steps == round(1463.0 * 48.15 / 64)  # seed 0's pair, not 600


def test_eval_matches_classes_by_name_and_refuses_others(tmp_path, capsys):
    """Only the class count used to be compared: a val folder with the classes in another order scored 0%."""
    from PIL import Image
    import data
    from checkpoint import model_from_checkpoint

    def tree(root, split, names, count):
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (80 * c, i * 20, 0)).save(root / split / name / f"{i}.png")

    full, subset, foreign = tmp_path / "full", tmp_path / "subset", tmp_path / "foreign"
    tree(full, "train", "abc", 8)
    tree(full, "val", "abc", 4)
    tree(subset, "val", "bc", 4)                   # b and c are labels 0 and 1 here, 1 and 2 for the model
    tree(foreign, "val", "bd", 4)
    run = tmp_path / "run"
    assert train.main(["--dim", "32", "--depth", "2", "--heads", "2", "--res", "32", "--data", "imagefolder",
                       "--data-dir", str(full), "--batch-size", "8", "--workers", "0", "--max-steps", "3",
                       "--lr", "3e-3", "--out-dir", str(run)]) == 0
    ckpt = str(run / "ckpt.pt")
    capsys.readouterr()
    top1 = evaluate_script.main(["--ckpt", ckpt, "--data-dir", str(subset), "--workers", "0"])[0]["top1"]
    out = capsys.readouterr().out
    assert f"the 2 classes of {subset}/val are matched to the checkpoint's 3 by name" in out
    model = model_from_checkpoint(load_checkpoint(ckpt), ckpt).eval()
    val = data.build_dataset("imagefolder", str(subset), "val", 32)
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        predicted = model(images).argmax(1)
    assert top1 == pytest.approx(100 * (predicted == torch.tensor([1, 2])[labels]).float().mean().item())
    with pytest.raises(SystemExit) as exit_info:
        evaluate_script.main(["--ckpt", ckpt, "--data-dir", str(foreign), "--workers", "0"])
    assert exit_info.value.code == 2
    assert "1 class that is not an expected one (d)" in capsys.readouterr().err
    tree(subset, "train", "abc", 1)                # a train/ folder beside the subset: eval needs only val/
    assert evaluate_script.main(["--ckpt", ckpt, "--data-dir", str(subset), "--workers", "0"])[0]["top1"] == top1
    with pytest.raises(SystemExit):
        evaluate_script.main(["--ckpt", ckpt, "--data-dir", str(tmp_path / "none"), "--workers", "0"])
    err = capsys.readouterr().err
    assert f"{tmp_path / 'none'}/val/CLASS/*" in err and "train/" not in err     # names only what eval needs


def test_ctrl_c_lets_the_sweeps_training_save_before_it_stops(tmp_path):
    """Ctrl-C reaches the sweep and its train.py alike: subprocess.run killed the child 0.25 s later, mid-step, so
    nothing was saved; run_command waits for it."""
    child = tmp_path / "child.py"
    child.write_text("import signal, sys, time\n"
                     "signal.signal(signal.SIGINT, lambda *a: (time.sleep(1), open(sys.argv[1], 'w').write('saved'),"
                     " sys.exit(0)))\n"
                     "time.sleep(30)\n")
    driver = (f"import os, signal, sys, threading, experiments\n"
              f"signal.signal(signal.SIGINT, signal.default_int_handler)\n"   # a shell's background job ignores it
              f"threading.Timer(1.0, lambda: os.killpg(0, signal.SIGINT)).start()\n"
              f"experiments.run_command([sys.executable, {str(child)!r}, {str(tmp_path / 'saved')!r}],"
              f" dict(os.environ))\n")
    result = subprocess.run([sys.executable, "-c", driver], cwd=Path(__file__).parent, capture_output=True, text=True,
                            timeout=60, start_new_session=True)
    assert "KeyboardInterrupt" in result.stderr
    assert (tmp_path / "saved").read_text() == "saved"
