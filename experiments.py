"""The README's results: CAT against ViT, Performer, Swin and a ResNet-18 on Imagenette, the CAT paper's Table 4,
the 2D rotaries across resolutions, the paper's 10-epoch headline, and a screen of what helps CAT on small data
with its confirmation against the ResNet-18.

    python experiments.py                      # every run not finished yet, in order; about 19 h on 2 Xeon cores (AMX)
    python experiments.py --runs cat-tiny-s0   # some runs only (by name; --list shows them all)
    python experiments.py --commit             # commit the results file after each run (for long sweeps)
    python experiments.py --report             # the tables and plots from the results file only
    python experiments.py --data-dir DIR       # Imagenette elsewhere (docs/training.md: making imagenette-160)

Each run is `python train.py ...` into runs/imagenette/NAME, then `python eval.py` there at its resolutions. A
finished run's figures go into --json (assets/imagenette.json), and a run found there is never run again, so the
sweep can be stopped at any time and restarted in a later session or on another machine (an interrupted run
resumes from the checkpoint train.py saved when it was stopped, if its folder is still there). What is left runs
in the order of the questions it answers (QUESTIONS), then every table's first seed before any table's second.

Every model gets one recipe, not tuned for any of them (RECIPE): AdamW, peak lr 1e-3 with 5% warmup and cosine
decay, weight decay 0.05 on matrices and kernels, label smoothing 0.1, random-resized crops (scale 0.35-1) and
flips, batch 64, bf16 autocast and torch.compile, one process; `none` of the heavier augmentations. Where bf16
would be emulated (a CPU without AMX or AVX512-BF16), a run trains in fp32 instead; each run records its precision,
and rotary-cat-fp32-s0 measures what fp32 changes (the same run as rotary-cat-s0 in fp32).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

import runtime
from checkpoint import load_checkpoint

OUT = os.path.join("runs", "imagenette")
DATA = os.path.join("..", "shared", "data", "imagenette-160")     # the default --data-dir
RESULTS = os.path.join("assets", "imagenette.json")
BATCH = 64
RECIPE = ["--data", "imagefolder", "--batch-size", str(BATCH), "--lr", "1e-3", "--warmup", "0.05",
          "--weight-decay", "0.05", "--label-smoothing", "0.1", "--crop-scale", "0.35", "--log-every", "50",
          "--amp", "--compile"]
RES, EPOCHS, SHORT = 128, 20, 10                # the families at 128 px for 20 epochs; Table 4 and headline: 10
ROTARY_RES, ROTARY_EVAL = 80, [80, 120, 160]    # the rotaries: trained at 80 px, evaluated up to 2x


def cat_tiny(pos="cat", imprint="constant"):
    """cat-tiny's flags with its rotary and imprint pinned: the results of this sweep may change the preset (README,
    recommended presets), and the runs still queued must match the finished ones."""
    return ["--model", "cat-tiny", "--pos", pos, "--imprint", imprint]


FAMILIES = {                                    # run label: train.py flags
    "cat-tiny": cat_tiny(),
    "vit-tiny": ["--model", "vit-tiny"],
    "resnet18": ["--model", "resnet18"],
    "swin-tiny": ["--model", "swin-tiny"],
    "performer-tiny": ["--model", "performer-tiny"],
    # the released code's behaviour at cat-tiny size
    "cat-ref-tiny": [*cat_tiny("cat_ref", "tanh_decay"), "--axis", "row", "--pool", "corner"],
    "vit-tiny-mlp1": ["--model", "vit-tiny", "--mlp-ratio", "1"],     # ViT with CAT's FFN: attention vs attention
    "cat-tiny-scaled": cat_tiny(pos="scaled"),  # the recommended rotary (README) at 128 px
    # a convolutional stem in place of the patchify layer (Xiao et al. 2021), the known fix for small data
    "cat-tiny-conv-stem": [*cat_tiny(pos="scaled"), "--stem", "conv"],
    "vit-tiny-conv-stem": ["--model", "vit-tiny", "--stem", "conv"],
}
SHOWN = {"cat-tiny": "cat-tiny, `cat` rotary", "cat-tiny-scaled": "cat-tiny, `scaled` rotary",
         "vit-tiny-time": "vit-tiny at cat-tiny's time"}
HEADLINE_SEEDS = ("cat-tiny", "vit-tiny", "cat-tiny-scaled")       # 3 seeds; the other families 1
HEADLINE = (*HEADLINE_SEEDS, "resnet18")        # run first
TABLE4 = {                                      # paper Table 4 rows on cat-tiny, 10 epochs
    "cat-tiny": "w/ Embedding Imprint (constant: cat-tiny's own)",
    "cat-imprint-none": "Baseline Cross-Axis (no imprint)",
    "cat-imprint-tanh_decay": "w/ Tanh Residual",
    "cat-imprint-tanh_grow": "w/ Backwards Tanh Residual",
    "cat-mid-norm": "w/ Mid-Normalisation",
    "cat-xy-mask": "w/ Learned X/Y Mask",
}
TABLE4_FLAGS = {"cat-tiny": cat_tiny(), "cat-imprint-none": cat_tiny(imprint="none"),
                "cat-imprint-tanh_decay": cat_tiny(imprint="tanh_decay"),
                "cat-imprint-tanh_grow": cat_tiny(imprint="tanh_grow"), "cat-mid-norm": [*cat_tiny(), "--mid-norm"],
                "cat-xy-mask": [*cat_tiny(), "--xy-mask"]}
ROTARIES = ["cat", "scaled", "mixed", "axial", "none"]
# The same test inside a ViT, where RoPE-ViT (Heo et al. 2024, DeiT-III ViT-S) found RoPE-Mixed gaining at higher
# resolution: 80.9 at 224 px, 81.8 at 384; APE alone 80.4 -> 79.4.
VIT_ROTARIES = ["ape", "axial", "mixed", "scaled", "ape+mixed"]
# A CAT for small data: the levers known to help transformers on small data (docs/results.md), screened cheaply
# (80 px, 10 epochs, seed 0) each alone on top of the best CAT here so far (the `scaled` rotary and the
# convolutional stem), with the patchify stem beside them for scale. They run after everything above.
SCREEN_SEED = 0
LEVERS = {"trivial": ["--auto-augment", "trivial"],         # TrivialAugmentWide (Mueller & Hutter 2021)
          "mix": ["--mixup", "0.8", "--cutmix", "1.0"],      # DeiT's MixUp and CutMix
          "erase": ["--erase", "0.25"],                      # DeiT's random erasing
          "ema": ["--ema", "0.998"],                         # an average over the last ~500 of 1,470 steps
          "lr2e-3": ["--lr", "2e-3"],                        # twice the recipe's peak
          "mlp2": ["--mlp-ratio", "2"],                      # a wider FFN: 1.12 GFLOPs at 128 px, ResNet-18's 1.18
          "depth8": ["--depth", "8"],                        # two more blocks: 1.13 GFLOPs at 128 px
          "cls": ["--pool", "cls"]}                          # a class token against cat-tiny's mean of the grid
SCREEN_BASE = FAMILIES["cat-tiny-conv-stem"]
SCREEN = {"patch": [*cat_tiny(pos="scaled"), "--stem", "patch"], "conv": SCREEN_BASE,     # label: flags
          **{f"conv+{lever}": [*SCREEN_BASE, *flags] for lever, flags in LEVERS.items()}}
# Then, by a fixed rule (small_data_plan): the levers that clear the bar run together on `conv` (of the CAPACITY
# levers, which together would pass the ResNet-18's FLOPs, only the better; a tie to the first, the cheaper); the
# best of those levers alone and together (ties to fewer levers) is confirmed at the families' size and length on
# 3 seeds, and its training levers run unchanged for the ResNet-18 and the ViT, so that the comparison stays fair;
# the model levers are CAT's own. Where no lever clears the bar, the confirmation is `conv` itself
# (cat-tiny-conv-stem) against the ResNet-18, both to 3 seeds.
MODEL_LEVERS = ("mlp2", "depth8", "cls")
CAPACITY = ("mlp2", "depth8")       # width or depth: each spends most of the FLOPs left under the ResNet-18's
CONFIRMED = {"cat": "cat-tiny-conv-stem", "resnet18": "resnet18", "vit-tiny": "vit-tiny"}    # model: its family
SHAPES = ["--data", "shapes", "--epochs", "1"]  # the built-in shapes: the label depends on where things are
FINAL_EVAL_ONLY = ["--eval-every", str(10**9)]  # no validation during training (eval.py runs after it): the
                                                # families keep theirs, for the curves of top-1 against time


def recipe(res, epochs, data_dir=DATA):
    return [*RECIPE, "--data-dir", data_dir, "--res", str(res), "--epochs", str(epochs)]


def plan(seeds, data_dir=DATA):
    """{run name: (train.py flags, resolutions to evaluate at)}: per seed, the headline families, then the
    rotaries, then the other families, then the 10-epoch runs; last the small-data screen, on seed 0 alone
    (by_question orders what is left to run)."""
    groups = {}                                 # (seed index, group) -> runs
    for i, seed in enumerate(seeds):
        s = ["--seed", str(seed)]
        for label, flags in FAMILIES.items():
            if i == 0 or label in HEADLINE_SEEDS:
                group = groups.setdefault((i, 0 if label in HEADLINE else 2), {})
                group[f"{label}-s{seed}"] = ([*recipe(RES, EPOCHS, data_dir), *flags, *s], [RES, 160])
        if i >= 2:
            continue                            # 2 seeds for everything below
        rotaries = groups.setdefault((i, 1), {})
        at_80 = [*recipe(ROTARY_RES, EPOCHS, data_dir), *FINAL_EVAL_ONLY]
        for pos in ROTARIES:
            rotaries[f"rotary-{pos}-s{seed}"] = ([*at_80, *cat_tiny(pos), *s], ROTARY_EVAL)
            rotaries[f"shapes-{pos}-s{seed}"] = ([*SHAPES, *cat_tiny(pos), *s], [])
        if i == 0:                              # what fp32 changes: one bf16 run again in fp32
            rotaries[f"rotary-cat-fp32-s{seed}"] = ([*at_80, *cat_tiny("cat"), *s, "--no-amp"], ROTARY_EVAL)
        for pos in VIT_ROTARIES:
            rotaries[f"vit-rotary-{pos}-s{seed}"] = ([*at_80, "--model", "vit-tiny", "--pos", pos, *s], ROTARY_EVAL)
        short, tenth = [*recipe(RES, SHORT, data_dir), *FINAL_EVAL_ONLY], groups.setdefault((i, 3), {})
        tenth[f"vit-tiny-e{SHORT}-s{seed}"] = ([*short, "--model", "vit-tiny", *s], [RES])
        for label, flags in TABLE4_FLAGS.items():
            tenth[f"{label}-e{SHORT}-s{seed}"] = ([*short, *flags, *s], [RES])
    if SCREEN_SEED in seeds:
        groups[(len(seeds), 0)] = {screen_run(label): ([*screen_recipe(data_dir), *flags], [ROTARY_RES])
                                   for label, flags in SCREEN.items()}
    return {name: v for key in sorted(groups) for name, v in groups[key].items()}


def screen_recipe(data_dir=DATA):
    return [*recipe(ROTARY_RES, SHORT, data_dir), *FINAL_EVAL_ONLY, "--seed", str(SCREEN_SEED)]


def screen_run(label):
    """The screen's run of SCREEN's `label` ('conv+mix' -> 'small-conv+mix-s0')."""
    return f"small-{label}-s{SCREEN_SEED}"


def screen_name(levers):
    """The screen's run of `levers` together on `conv`."""
    return screen_run("conv+" + "+".join(levers))


# What is left to run goes in the order of the questions it answers (docs/results.md): what fp32 changes (the
# cheapest run, and before any fp32 run joins the tables); does the convolutional stem help; is `scaled` better
# than `cat` beyond the seed noise; does RoPE-Mixed lose at 2x inside a ViT as it does inside CAT. Then the rest.
QUESTIONS = ("rotary-cat-fp32", "cat-tiny-conv-stem", "vit-tiny-conv-stem", "cat-tiny-scaled", "vit-rotary")


def by_question(name):
    """The study's questions in order, then its other runs, then the small-data screen and its sequel (which may
    continue cat-tiny-conv-stem and resnet18 past seed 0)."""
    if name.startswith("small-") or re.fullmatch(r"(cat-tiny-conv-stem|resnet18)-s[1-9]\d*", name):
        return len(QUESTIONS) + 1
    return next((i for i, prefix in enumerate(QUESTIONS) if name.startswith(prefix)), len(QUESTIONS))


def equal_time_plan(seeds, results, data_dir=DATA):
    """ViT given CAT's training time instead of its epochs: as many steps as it makes in the seconds cat-tiny
    took for 20 epochs, on the same cosine schedule (compressed to those steps). Known once both have run. The
    two speeds must come from one machine (sessions here get different CPUs): the seed's own pair when its two
    runs trained on the same recorded machine (one CPU and, where recorded, one boot), else the first seed's pair
    that did."""
    def pair(seed):
        return results.get(f"cat-tiny-s{seed}"), results.get(f"vit-tiny-s{seed}")
    timed = [p for p in map(pair, seeds) if all(p) and p[0].get("machine") and p[0]["machine"] == p[1].get("machine")]
    runs = {}
    for seed in seeds:
        own = pair(seed)
        if all(own) and timed:
            cat, vit = own if own in timed else timed[0]
            steps = round(cat["train_seconds"] * vit["train_images_per_s"] / BATCH)
            flags, res = plan([seed], data_dir)[f"vit-tiny-s{seed}"]
            runs[f"vit-tiny-time-s{seed}"] = ([*flags, "--max-steps", str(steps)], res)
    return runs


def screen_winners(results):
    """The levers whose gain on `conv` in the screen clears the bar (seed_gap), in LEVERS' order, of the CAPACITY
    levers only the best; None until every screen run has finished."""
    bar = seed_gap(results)
    scores = {label: top1(results, screen_run(label), ROTARY_RES) for label in SCREEN}
    if bar is None or None in scores.values():
        return None
    winners = [lever for lever in LEVERS if scores[f"conv+{lever}"] - scores["conv"] > bar]
    capacity = max((lever for lever in winners if lever in CAPACITY), key=lambda lever: scores[f"conv+{lever}"],
                   default=None)
    return [lever for lever in winners if lever not in CAPACITY or lever == capacity]


def screen_choice(results):
    """The levers to confirm: the best at ROTARY_RES of each winner alone and, where there are several, all of
    them together (small-conv+A+B-s0); [] where no lever won; None until those runs have finished."""
    winners = screen_winners(results)
    if not winners:
        return winners
    candidates = [[lever] for lever in winners]
    if len(winners) > 1:
        candidates.append(winners)
    scores = [top1(results, screen_name(levers), ROTARY_RES) for levers in candidates]
    return None if None in scores else candidates[scores.index(max(scores))]


def confirmation(levers):
    """{model: (run label, its train.py flags beyond the families' recipe)} of the confirmation of `levers`: the CAT
    with them all, the ResNet-18 and the ViT with the training ones. Without training levers the ResNet-18 keeps the
    shared recipe (the ViT has three seeds of it already), and without any the CAT is cat-tiny-conv-stem itself."""
    training = [lever for lever in levers if lever not in MODEL_LEVERS]
    runs = {}
    for model, family in CONFIRMED.items():
        own = levers if model == "cat" else training
        if own or model != "vit-tiny":          # the ViT's shared recipe has its three seeds already
            label = f"small-{model}+{'+'.join(own)}" if own else family
            runs[model] = (label, [*FAMILIES[family], *lever_flags(own)])
    return runs


def small_data_plan(seeds, results, data_dir=DATA):
    """The screen's sequel, known as the screen finishes: the winning levers together, then the confirmation
    of screen_choice() at RES for EPOCHS, per seed."""
    winners, levers = screen_winners(results), screen_choice(results)
    runs = {}
    if winners and len(winners) > 1:
        runs[screen_name(winners)] = ([*screen_recipe(data_dir), *SCREEN_BASE, *lever_flags(winners)], [ROTARY_RES])
    if levers is None:
        return runs
    for seed in seeds:
        for label, flags in confirmation(levers).values():
            runs[f"{label}-s{seed}"] = ([*recipe(RES, EPOCHS, data_dir), *flags, "--seed", str(seed)], [RES, 160])
    return runs


def lever_flags(levers):
    return [flag for lever in levers for flag in LEVERS[lever]]


def every_run(seeds, results, data_dir=DATA):
    """plan() and the runs known once others have finished: vit-tiny-time and the screen's sequel."""
    return {**plan(seeds, data_dir), **equal_time_plan(seeds, results, data_dir),
            **small_data_plan(seeds, results, data_dir)}


# ---------------------------------------------------------------------------------------------- running

def load_results(path):
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def trained_on(start):
    """Where a run trained, from its start record: the CPU (or GPU) and, where recorded, the boot, since one CPU
    model has run at different speeds in different sessions. 'AMD EPYC (AVX512-BF16), 2 threads, boot f1b82f8a'."""
    boot = start.get("boot_id")
    return start.get("device_name", "not recorded") + (f", boot {boot[:8]}" if boot else "")


def summary(name, flags, res):
    """A finished run's figures from its folder (flags, machine, precision, time, speed, FLOPs, the validation
    curve and the evaluation), or None if it has not been evaluated at every resolution in `res`."""
    path = os.path.join(OUT, name, "eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = json.load(f)["rows"]
    if not set(res) <= {row["res"] for row in rows}:
        return None
    with open(os.path.join(OUT, name, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    starts = [r for r in records if r.get("event") == "start"]
    last = records[-1]
    images = last["step"] * BATCH
    machines = dict.fromkeys(trained_on(r) for r in starts)    # more if it moved
    precisions = dict.fromkeys("bf16" if r["amp"] else "fp32" for r in starts)
    return {"flags": flags, "machine": " then ".join(machines), "precision": " then ".join(precisions),
            "params": starts[0]["params"], "flops_per_image": starts[0]["flops_per_image"],
            "train_seconds": last["train_seconds"], "train_images_per_s": images / last["train_seconds"],
            "curve": [[r["train_seconds"], r.get("epochs_done", r.get("epoch")), r["val_top1"]]   # 'epoch': older logs
                      for r in records if "val_top1" in r],
            "eval": [{k: row[k] for k in ("res", "top1", "top5", "loss")} for row in rows]}


def run(name, flags, res):
    """Train (resuming if the folder has a checkpoint) and evaluate at `res` ([]: the training resolution). The
    recipe's bf16 runs in fp32 where it would be emulated (runtime.EMULATED_BF16: one run would take days)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = [] if runtime.bf16_is_fast(device) else ["--no-amp"]
    out = os.path.join(OUT, name)
    training = [sys.executable, "train.py", *flags, *precision, "--out-dir", out, "--resume", "auto"]
    evaluation = [sys.executable, "eval.py", "--ckpt", os.path.join(out, "ckpt.pt"), *precision,
                  *(["--res", *map(str, res)] if res else []), "--json", os.path.join(out, "eval.json")]
    # The sweep has the machine to itself: every core computes, as in its finished runs (train.py's default leaves
    # the loader worker a core of its own, which a busy machine needs: docs/training.md, threads).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(training[1:])}", flush=True)
    run_command(training, env)
    state = load_checkpoint(os.path.join(out, "ckpt.pt"))
    if state["step"] < state["total_steps"]:            # stopped by a signal: it saved, and resumes next time
        sys.exit(f"{name}: training stopped at step {state['step']} of {state['total_steps']}; run the sweep again "
                 f"to continue it")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(evaluation[1:])}", flush=True)
    run_command(evaluation, env)


def run_command(command, env):
    """subprocess.run(check=True), except that Ctrl-C, which reaches train.py too, waits for it to save and exit
    (subprocess.run would kill it a quarter of a second later, mid-step)."""
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env) as process:
        try:
            process.wait()
        except KeyboardInterrupt:
            process.wait()
            raise
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)


def save(results, path, commit, name):
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    if commit:                  # only this file: whatever else is being edited in the tree stays out
        subprocess.run(["git", "add", path], check=True)
        subprocess.run(["git", "commit", "-q", "-m", f"imagenette results: {name}", "--", path], check=True)


# ---------------------------------------------------------------------------------------------- report

def top1(results, name, res=RES):
    row = next((r for r in results.get(name, {}).get("eval", []) if r["res"] == res), None)
    return row["top1"] if row else None


def seed_top1(results, label, res=RES):
    """Top-1 at res of each finished seed of a family (the runs LABEL-sN)."""
    return [t for n in seeds_of(results, label) if (t := top1(results, n, res)) is not None]


def cell(values, digits=1):
    """'mean ± std (n)' over the seeds that finished, '-' if none did."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} ({len(values)})"


def machine_tag(record):
    """A run's machine in the word a table cell or a legend can carry: 'Intel(R) Xeon(R) Processor (AMX),
    2 threads' -> 'Xeon'; with its boot, 'EPYC f1b8'; trained in fp32, not the recipe's bf16, 'EPYC f1b8 fp32'."""
    machine = record.get("machine", "not recorded")
    cpu = " ".join(re.sub(r"\(R\)|\(.*?\)|Intel|AMD|Processor|,.*", "", machine).split()) or machine
    boot = re.search(r", boot (\w{4})", machine)               # one session's machine: 'EPYC f1b8'
    tag = f"{cpu} {boot[1]}" if boot else cpu
    return tag + " fp32" * ("fp32" in record.get("precision", ""))


def by_machine(runs, value, digits=1):
    """cell() of value(record) per training machine, most runs first: '133 ± 7 (2) Xeon; 70 EPYC'. Speeds and
    times from different CPUs are never averaged together."""
    groups = {}
    for record in runs:
        groups.setdefault(machine_tag(record), []).append(value(record))
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))
    return "; ".join(f"{cell(values, digits)} {machine}" for machine, values in ordered) or "-"


def seeds_of(results, label):
    return [name for name in results if name.startswith(f"{label}-s") and name[len(label) + 2:].isdigit()]


def report(results):
    lines = ["Imagenette (imagenette-160), 128 px, val top-1 %: mean ± std (seeds) where several seeds ran", "",
             f"| model | params | GFLOPs | top-1 @ {EPOCHS} ep | top-1 @ 160 px | train img/s | train min |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label in [*FAMILIES, "vit-tiny-time"]:          # queued families: a row of '-'
        names, shown = seeds_of(results, label), SHOWN.get(label, label)
        if not names:
            lines += [f"| {shown} | - | - | - | - | - | - |"] if label in FAMILIES else []
            continue
        r = [results[n] for n in names]
        lines.append(f"| {shown} | {r[0]['params'] / 1e6:.2f}M | "
                     f"{r[0]['flops_per_image'] / 1e9:.2f} | "
                     f"{cell([top1(results, n) for n in names])} | {cell([top1(results, n, 160) for n in names])}"
                     f" | {by_machine(r, lambda x: x['train_images_per_s'], 0)}"
                     f" | {by_machine(r, lambda x: x['train_seconds'] / 60)} |")
    lines += ["", f"Table 4 on cat-tiny, {SHORT} epochs", "", "| row | top-1 | per seed |", "| --- | --- | --- |"]
    for label, row in TABLE4.items():
        values = [top1(results, n) for n in sorted(seeds_of(results, f"{label}-e{SHORT}"))]
        lines.append(f"| {row} | {cell(values)} | {', '.join(f'{v:.1f}' for v in values)} |")
    lines += ["", f"Rotaries on cat-tiny, trained at {ROTARY_RES} px; shapes: 1 epoch at 64 px", "",
              *rotary_table(results, "rotary", ROTARIES, shapes=True),
              "", f"Rotaries on vit-tiny, trained at {ROTARY_RES} px (RoPE-ViT's DeiT-III ViT-S, 224 -> 384 px: "
              f"RoPE-Mixed 80.9 -> 81.8, APE 80.4 -> 79.4)", "", *rotary_table(results, "vit-rotary", VIT_ROTARIES)]
    lines += ["", *screen_table(results), "", *confirmation_table(results)]
    lines += ["", precision_effect(results)]
    machines = {}
    for name, result in results.items():
        machine = f"{result.get('machine', 'not recorded')}, {result.get('precision', 'precision not recorded')}"
        machines.setdefault(machine, []).append(name)
    lines += ["", "Speeds and times are per training machine and precision, tagged (2 CPU cores each); the machines "
                  "and their runs:"]
    lines += [f"- {machine}: {', '.join(names)}" for machine, names in machines.items()]
    cat, vit = seeds_of(results, f"cat-tiny-e{SHORT}"), seeds_of(results, f"vit-tiny-e{SHORT}")
    if cat and vit:
        def ratio(value):           # CAT's mean over its seeds / ViT's
            return statistics.mean(map(value, cat)) / statistics.mean(map(value, vit))
        lines += ["", f"The paper's headline at {SHORT} epochs, CAT / ViT (seeds {len(cat)} / {len(vit)}): top-1 "
                  f"{ratio(lambda n: top1(results, n)):.2f}x, "
                  f"FLOPs {ratio(lambda n: results[n]['flops_per_image']):.2f}x, {time_ratio(results)}"]
    return "\n".join(lines)


def precision_effect(results):
    """What fp32 changes against the recipe's bf16: rotary-cat-s0 again in fp32, beside the spread of its seeds."""
    fp32, bf16 = results.get("rotary-cat-fp32-s0"), results.get("rotary-cat-s0")
    if not (fp32 and bf16):
        return "Precision: rotary-cat-fp32-s0 (rotary-cat-s0 in fp32) has not run yet"
    cells = []
    for res in ROTARY_EVAL:
        a, b = top1(results, "rotary-cat-fp32-s0", res), top1(results, "rotary-cat-s0", res)
        spread = seed_top1(results, "rotary-cat", res)
        cells.append(f"{res} px {a:.1f} vs {b:.1f} ({a - b:+.1f}; bf16 seeds {min(spread):.1f}-{max(spread):.1f})")
    return f"Precision, rotary-cat-s0 in fp32 vs bf16, top-1: {'; '.join(cells)}"


def seed_gap(results):
    """The widest top-1 gap between two seeds of one CAT rotary run at ROTARY_RES: the screen's bar for a gain."""
    seeds = (seed_top1(results, f"rotary-{pos}", ROTARY_RES) for pos in ROTARIES)
    return max((max(values) - min(values) for values in seeds if len(values) > 1), default=None)


def screen_table(results):
    """The small-data screen: a caption, then each run's top-1 at its training resolution and its gain on `conv`,
    in bold where it clears the seed gap (a CAPACITY lever beaten by the other one not)."""
    base, bar = top1(results, screen_run("conv"), ROTARY_RES), seed_gap(results)
    lines = [f"A CAT for small data, the screen: cat-tiny at {ROTARY_RES} px, {SHORT} epochs, seed {SCREEN_SEED}; "
             "each lever alone on `conv` (the `scaled` rotary and the convolutional stem); `patch`: the patchify stem; "
             + ("no rotary run has two seeds yet" if bar is None else
                f"a gain counts (bold) above {bar:.1f} points, the widest gap between two seeds of one rotary run "
                f"at {ROTARY_RES} px; of {' and '.join(f'`{lever}`' for lever in CAPACITY)} only the better counts"), "",
             f"| run | params | GFLOPs | top-1 @ {ROTARY_RES} px | vs `conv` | train min |", "| --- " * 6 + "|"]
    winners = screen_winners(results)
    labels = list(SCREEN)
    if winners and len(winners) > 1:
        labels.append(f"conv+{'+'.join(winners)}")          # the winners together
    for label in labels:
        name = screen_run(label)
        value = top1(results, name, ROTARY_RES)
        if value is None:
            lines.append(f"| `{label}` | - | - | - | - | - |")
            continue
        record = results[name]
        gain = "-" if base is None else f"{value - base:+.1f}"
        lever = label.removeprefix("conv+")
        beaten = winners is not None and lever in CAPACITY and lever not in winners       # by the other one
        if base is not None and bar is not None and value - base > bar and not beaten:
            gain = f"**{gain}**"
        lines.append(f"| `{label}` | {record['params'] / 1e6:.2f}M | {record['flops_per_image'] / 1e9:.2f} | "
                     f"{value:.1f} | {gain} | {by_machine([record], lambda x: x['train_seconds'] / 60)} |")
    return lines


def confirmation_table(results):
    """The screen's sequel: CAT with the conv stem, the ResNet-18 and the ViT at RES for EPOCHS, under the shared
    recipe and the screen's, and how many points each is behind the ResNet-18 trained with the same flags (means
    over the seeds finished)."""
    levers = screen_choice(results)
    chosen = ("not chosen yet (the screen has not finished)" if levers is None else
              " ".join(f"`{lever}`" for lever in levers) or "none (no lever cleared the bar)")
    lines = [f"A CAT for small data, confirmed: {RES} px, {EPOCHS} epochs; the screen's levers: {chosen}", "",
             f"| run | top-1 @ {RES} px | top-1 @ 160 px | behind resnet18 @ {RES} px | train min |", "| --- " * 5 + "|"]
    rows = {}                                               # run label: the ResNet-18 trained with its flags
    screen = {model: label for model, (label, _) in confirmation(levers or []).items()}
    for labels in (CONFIRMED, screen):                      # the shared recipe's runs, then the screen's
        for label in labels.values():
            rows[label] = labels["resnet18"]
    for label, resnet in rows.items():
        mine, reference = seed_top1(results, label), seed_top1(results, resnet)
        behind = f"{statistics.mean(reference) - statistics.mean(mine):.1f}" if mine and reference else "-"
        minutes = by_machine([results[n] for n in seeds_of(results, label)], lambda x: x["train_seconds"] / 60)
        lines.append(f"| `{label}` | {cell(mine)} | {cell(seed_top1(results, label, 160))} | "
                     f"{'-' if label == resnet else behind} | {minutes} |")
    return lines


def rotary_table(results, prefix, positions, shapes=False):
    """Markdown rows: top-1 of the runs PREFIX-POS-sN at each evaluation resolution, the points lost from the
    training resolution to 2x, (the shapes task,) the training time."""
    lines = ["| pos | " + " | ".join(f"{r} px" for r in ROTARY_EVAL) + f" | points lost {ROTARY_EVAL[0]} -> "
             f"{ROTARY_EVAL[-1]} |" + " shapes |" * shapes + " train min |",
             "| --- " * (len(ROTARY_EVAL) + 3 + shapes) + "|"]
    for pos in positions:
        names = seeds_of(results, f"{prefix}-{pos}")
        at = [[top1(results, n, r) for n in names] for r in ROTARY_EVAL]
        drop = [a - b for a, b in zip(at[0], at[-1]) if a is not None and b is not None]
        minutes = by_machine([results[n] for n in names], lambda x: x["train_seconds"] / 60)
        shapes_cell = f" {cell([top1(results, n, 64) for n in seeds_of(results, f'shapes-{pos}')])} |" * shapes
        lines.append(f"| `{pos}` | " + " | ".join(cell(v) for v in at) + f" | {cell(drop)} |{shapes_cell} {minutes} |")
    return lines


def time_ratio(results):
    """CAT's training time over ViT's at equal epochs, from one machine's runs only (sessions here get different
    CPUs): the 10-epoch runs if both trained on one machine, else the 20-epoch ones (the ratio per epoch is the
    same; train_seconds counts training steps only, not validation)."""
    for suffix in [f"-e{SHORT}", ""]:
        cat, vit = ([results[n] for n in seeds_of(results, f"{label}{suffix}")] for label in ("cat-tiny", "vit-tiny"))
        machine = next((m for r in cat if (m := r.get("machine")) and m in {v.get("machine") for v in vit}), None)
        if machine:
            seconds = [statistics.mean(r["train_seconds"] for r in runs if r.get("machine") == machine)
                       for runs in (cat, vit)]
            return f"training time {seconds[0] / seconds[1]:.2f}x (cat-tiny{suffix} / vit-tiny{suffix} on {machine})"
    return "training time: no CAT and ViT runs on one machine yet"


def angle_spreads():
    """Table: per head, the widest angle range a rotation pair sweeps across the training grid (rope2d.angle_spread),
    for cat-tiny's rotaries at 80 px (mixed and scaled at their initialisation, seed 0) and for cat-paper's `cat`."""
    import rope2d
    from model import PRESETS
    grid = ROTARY_RES // PRESETS["cat-tiny"].patch
    rows = [(f"cat-tiny `{pos}`, {grid} x {grid}", "cat-tiny", pos, grid) for pos in ROTARIES if pos != "none"]
    rows.append(("cat-paper `cat`, 28 x 28 (224 px)", "cat-paper", "cat", 28))
    heads = PRESETS["cat-tiny"].heads
    lines = ["| rotary, grid | " + " | ".join(f"head {h}" for h in range(heads)) + " |", "| --- " * (heads + 1) + "|"]
    for label, preset, pos, n in rows:
        torch.manual_seed(0)
        config = PRESETS[preset]
        spread = rope2d.angle_spread(rope2d.RotaryPosition(pos, config.dim, config.heads, n).angles(n, n))
        lines.append(f"| {label} | " + " | ".join(f"{v:.3g}" for v in spread.expand(heads).tolist()) + " |")
    return "\n".join(lines)


def resolution_curves(results):
    """{(prefix, pos): [(evaluation px, top-1 mean over seeds)]} for the rotary runs that have any, cat-tiny's
    (prefix "rotary") and vit-tiny's ("vit-rotary")."""
    curves = {}
    for prefix, schemes in (("rotary", ROTARIES), ("vit-rotary", VIT_ROTARIES)):
        for pos in schemes:
            points = [(r, statistics.mean(v)) for r in ROTARY_EVAL if (v := seed_top1(results, f"{prefix}-{pos}", r))]
            if points:
                curves[(prefix, pos)] = points
    return curves


def plot(results, path):
    """Left: val top-1 against training time, one line per family and seed. Right: the rotaries' top-1 against
    the evaluation resolution (mean over seeds), cat-tiny's and vit-tiny's."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    machines = [machine_tag(r) for r in results.values()]
    main = max(set(machines), key=machines.count)       # solid lines; other machines dashed and named
    for i, label in enumerate([*FAMILIES, "vit-tiny-time"]):
        shown, color = set(), f"C{i}" if i < 10 else "black"       # the default cycle has 10 colours
        for name in seeds_of(results, label):
            minutes, _, top = zip(*results[name]["curve"])
            machine = machine_tag(results[name])
            key = label if machine == main else f"{label} ({machine})"
            left.plot([m / 60 for m in minutes], top, "-" if machine == main else "--", color=color, alpha=0.8,
                      label=None if key in shown else key)
            shown.add(key)
    left.set(xlabel=f"training time (min, 2 CPU cores, bf16; solid: {main})", ylabel=f"val top-1 (%), {RES} px",
             title=f"Imagenette, {EPOCHS} epochs")
    schemes = list(dict.fromkeys([*ROTARIES, *VIT_ROTARIES]))     # one colour per scheme in both models
    for (prefix, pos), points in resolution_curves(results).items():
        vit = prefix == "vit-rotary"
        right.plot(*zip(*points), "s--" if vit else "o-", color=f"C{schemes.index(pos)}",
                   label=f"vit {pos}" if vit else pos)
    right.set(xlabel="evaluation resolution (px)", xticks=ROTARY_EVAL,
              title=f"rotaries, trained at {ROTARY_RES} px (dashed: vit-tiny)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=None, help="only these runs (by name); default: all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds (default 0 1 2: three for cat-tiny and vit-tiny, two for the tables, "
                             "one for the other families)")
    parser.add_argument("--list", action="store_true", help="print every run's name and flags, then stop")
    parser.add_argument("--report", action="store_true", help="only print the tables and draw the plot")
    parser.add_argument("--commit", action="store_true", help="git-commit --json after each finished run")
    parser.add_argument("--json", default=RESULTS, help=f"the results file (default {RESULTS})")
    parser.add_argument("--data-dir", default=DATA, help=f"Imagenette in the ImageFolder layout, every image 160 x "
                        f"160 (default {DATA}; docs/training.md says how to make it)")
    parser.add_argument("--plot", default=os.path.join("assets", "imagenette.png"),
                        help="PNG of the curves and the rotaries (needs matplotlib; '': none)")
    args = parser.parse_args()
    results = load_results(args.json)
    if args.list:
        for name, (flags, res) in every_run(args.seeds, results, args.data_dir).items():
            print(f"{name}: train.py {' '.join(flags)}; eval at {res or 'the training resolution'}")
        return
    if args.runs:
        unknown = sorted(set(args.runs) - set(every_run(args.seeds, results, args.data_dir)))
        if unknown:     # vit-tiny-time-sN and the screen's sequel only exist once the runs they need have finished
            parser.error(f"--runs: no run named {', '.join(unknown)} (see --list)")
    while not args.report:
        runs = every_run(args.seeds, results, args.data_dir)
        todo = [n for n in runs if n not in results and (not args.runs or n in args.runs)]
        if not todo:
            break
        name = min(todo, key=by_question)                   # the first of the most pressing question's runs
        flags, res = runs[name]
        result = summary(name, flags, res)          # evaluated before the results file saw it: no rerun
        if result is None:
            run(name, flags, res)
            result = summary(name, flags, res)
        results = {**load_results(args.json), name: result}    # keeps edits made to the file during the run
        save(results, args.json, args.commit, name)
    print(report(results))
    print("\nAngle spread per head (radians) at the training grid\n\n" + angle_spreads())
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
