"""The README's real-data results: CAT vs ViT, Performer and Swin, and the CAT paper's ablations, on tiny-imagenet-20.

    python experiments.py --data-dir ../shared/data/tiny-imagenet-20        # every table: about 3 h 20 min on 2 CPU cores
    python experiments.py --data-dir ... --tables families                  # one table
    python experiments.py --data-dir ... --runs performer-tiny-s0           # one run of the tables
    python experiments.py --report                                          # the tables from finished runs

Each run is `python train.py ...` then `python eval.py --res 64 96 128` (also 192 and 256 for the rotaries that
could be cat-tiny's default) into runs/experiments/NAME. Finished runs are skipped and an interrupted one resumes,
so the sweep can be stopped and started again at any time. Every model gets the same recipe (below) at 64 px;
--epochs sets the budget (default 3, as in the README; the paper's Table 4 used 10 on ImageNet, and the time
grows in proportion).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from train import positive_int

OUT = os.path.join("runs", "experiments")
BATCH = 64
RECIPE = ["--data", "imagefolder", "--res", "64", "--batch-size", str(BATCH), "--lr", "1e-3", "--warmup", "0.05",
          "--weight-decay", "0.05", "--label-smoothing", "0.1", "--crop-scale", "0.35", "--workers", "1",
          "--log-every", "50"]
EVAL_RES = [64, 96, 128]
FAR_RES = [192, 256]                             # 3x and 4x: only for cat-tiny's candidate rotaries (slow on CPU)
CAT_REF_TINY = ["--model", "cat-tiny", "--pos", "cat_ref", "--axis", "row", "--imprint", "tanh_decay",
                "--pool", "corner"]                                # the released code's behaviour at cat-tiny size
SHAPES = ["--data", "shapes", "--model", "cat-tiny", "--epochs", "1", "--seed", "0",   # 1 epoch of the 16,000
          "--shapes-size", "16000"]                                                     # images it was measured on
IMPRINTS = {"none": "Baseline Cross-Axis", "constant": "w/ Embedding Imprint",     # paper Table 4 rows
            "tanh_decay": "w/ Tanh Residual", "tanh_grow": "w/ Backwards Tanh Residual"}
POSITIONS = ["none", "ape", "cat", "axial", "mixed", "ape+axial", "ape+mixed"]
SWIN_POSITIONS = ["rpb", "axial", "mixed", "rpb+axial", "rpb+mixed", "swinv2"]     # model.SWIN_POS
CAT_DEFAULT_CANDIDATES = ["axial", "mixed"]    # the rotaries closest to cat-tiny's own `cat`: on every seed


def imprint_run(mode):
    return "cat-tiny-s0" if mode == "constant" else f"cat-imprint-{mode}"      # constant: cat-tiny's own


def position_run(family, pos, seed=0):
    own = {"cat": "cat", "vit": "ape"}[family]                                # the preset's own scheme
    if pos == own:
        return f"{family}-tiny-s{seed}"
    return f"{family}-pos-{pos.replace('+', '-')}" + (f"-s{seed}" if seed else "")


def swin_run(pos):
    return "swin-tiny-s0" if pos == "rpb" else f"swin-pos-{pos.replace('+', '-')}"   # rpb: swin-tiny's own


def runs(tables, seeds):
    """{name: train.py flags} for the requested tables; runs shared between tables appear once."""
    plan, other_seeds = {}, {}  # the other seeds of the families table run last: every table first, spread after
    if "families" in tables:
        for seed in seeds:
            for name, flags in [("cat-tiny", ["--model", "cat-tiny"]), ("vit-tiny", ["--model", "vit-tiny"]),
                                ("performer-tiny", ["--model", "performer-tiny"]), ("cat-ref-tiny", CAT_REF_TINY)]:
                (other_seeds if seed != seeds[0] else plan)[f"{name}-s{seed}"] = [*flags, "--seed", str(seed)]
        # the ViT with CAT's FFN width (D instead of 4D): attention against attention, one seed
        plan[f"vit-tiny-mlp1-s{seeds[0]}"] = ["--model", "vit-tiny", "--mlp-ratio", "1", "--seed", str(seeds[0])]
    if "imprint" in tables:
        for mode in IMPRINTS:
            plan[imprint_run(mode)] = ["--model", "cat-tiny", "--imprint", mode, "--seed", "0"]
    if "positions" in tables:
        for family in ["cat", "vit"]:
            for pos in POSITIONS:
                plan[position_run(family, pos)] = ["--model", f"{family}-tiny", "--pos", pos, "--seed", "0"]
        for seed in seeds[1:]:
            for pos in ["cat", *CAT_DEFAULT_CANDIDATES]:
                other_seeds[position_run("cat", pos, seed)] = ["--model", "cat-tiny", "--pos", pos, "--seed", str(seed)]
    if "swin" in tables:
        for pos in SWIN_POSITIONS:
            plan[swin_run(pos)] = ["--model", "swin-tiny", "--pos", pos, "--seed", "0"]
    if "axis" in tables:
        plan["cat-tiny-s0"] = ["--model", "cat-tiny", "--seed", "0"]
        plan["cat-axis-row"] = ["--model", "cat-tiny", "--axis", "row", "--seed", "0"]
        for axis in ["alternate", "row"]:                  # the built-in shapes data: its label needs both axes
            plan[f"shapes-axis-{axis}"] = [*SHAPES, "--axis", axis]
    return {**plan, **other_seeds}


def resolutions(name, flags, seeds):
    """Where a run is evaluated: [] (its training resolution) for shapes, EVAL_RES, and FAR_RES on top for the
    rotaries that could be cat-tiny's default."""
    if flags[:2] == SHAPES[:2]:
        return []
    candidates = {position_run("cat", pos, seed) for pos in ["cat", *CAT_DEFAULT_CANDIDATES] for seed in seeds}
    return EVAL_RES + FAR_RES if name in candidates else EVAL_RES


def finished(name, res=()):
    """The run's evaluation (eval.json), or None if it has none yet or lacks one of the resolutions `res`."""
    path = os.path.join(OUT, name, "eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result if set(res) <= {row["res"] for row in result["rows"]} else None


def train_arguments(flags, out, data_dir, epochs):
    """train.py's arguments for one run: the shared recipe (not for shapes), the run's own flags, its folder."""
    recipe = [] if flags[:2] == SHAPES[:2] else [*RECIPE, "--data-dir", data_dir, "--epochs", str(epochs)]
    return [*recipe, *flags, "--out-dir", out, "--no-amp"]       # these tables were measured in fp32


def run(name, flags, res, args):
    """Train (resuming if a checkpoint exists; not at all if it was evaluated before) and evaluate at `res`; the
    evaluation marks it finished."""
    out = os.path.join(OUT, name)
    training = [sys.executable, "train.py", *train_arguments(flags, out, args.data_dir, args.epochs)]
    if os.path.exists(os.path.join(out, "ckpt.pt")):
        training.append("--resume")
    evaluation = [sys.executable, "eval.py", "--ckpt", os.path.join(out, "ckpt.pt"), "--workers", "1", "--no-amp",
                  *(["--res", *map(str, res)] if res else []), "--json", os.path.join(out, "eval.json")]
    for command in ([] if finished(name) else [training]) + [evaluation]:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def training(name):
    """(seconds in training steps, training images per second) of a finished run, from its metrics log."""
    with open(os.path.join(OUT, name, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    start, last = records[0], records[-1]
    images = last["step"] * start["args"]["batch_size"] * start["args"]["accum"] * start["world_size"]
    return last["train_seconds"], images / last["train_seconds"]


def equal_time_runs(seeds, epochs):
    """CAT given the ViT's training time instead of its epochs (after both finished at equal epochs)."""
    plan = {}
    for seed in seeds:
        if finished(f"cat-tiny-s{seed}") and finished(f"vit-tiny-s{seed}"):
            vit_seconds, _ = training(f"vit-tiny-s{seed}")
            _, cat_speed = training(f"cat-tiny-s{seed}")
            steps = round(vit_seconds * cat_speed / BATCH)
            plan[f"cat-tiny-time-s{seed}"] = ["--model", "cat-tiny", "--seed", str(seed), "--epochs",
                                              str(2 * epochs), "--max-steps", str(steps)]
    return plan


# ---------------------------------------------------------------------------------------------- report

def top1(name, res=64):
    """A run's top-1 at `res`, or None if it was not evaluated there."""
    result = finished(name, [res])
    return next(r["top1"] for r in result["rows"] if r["res"] == res) if result else None


def position_top1s(family, pos, res, seeds):
    """The top-1 at `res` of every seed that ran `pos` on `family`."""
    values = (top1(position_run(family, pos, seed), res) for seed in seeds)
    return [v for v in values if v is not None]


def cell(values):
    """'mean (a, b)' over seeds, or '-' if none finished."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.1f}" + (f" ({', '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else "")


def report(seeds, epochs):
    lines = [f"tiny-imagenet-20, 64 px, {epochs} epochs, val top-1 % (seeds {', '.join(map(str, seeds))}: "
             f"mean (each))", ""]
    lines += ["| model | top-1 @ equal epochs | train img/s | train time (s) | top-1 @ ViT's time |",
              "| --- | --- | --- | --- | --- |"]
    for name in ["cat-tiny", "vit-tiny", "vit-tiny-mlp1", "performer-tiny", "cat-ref-tiny", "swin-tiny"]:
        done = [f"{name}-s{s}" for s in seeds if finished(f"{name}-s{s}")]
        seconds, speed = zip(*map(training, done)) if done else ((), ())
        equal = cell([top1(f"cat-tiny-time-s{s}") for s in seeds]) if name == "cat-tiny" else "-"
        lines.append(f"| {name} | {cell([top1(n) for n in done])} | {cell(speed)} | {cell(seconds)} | {equal} |")
    lines += ["", "| imprint (Table 4 row) | top-1 |", "| --- | --- |"]
    for mode, row in IMPRINTS.items():
        lines.append(f"| `{mode}` ({row}) | {cell([top1(imprint_run(mode))])} |")
    lines += ["", "| position | CAT 64 | CAT 96 | CAT 128 | ViT 64 | ViT 96 | ViT 128 |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for pos in POSITIONS:
        lines.append(f"| `{pos}` | " + " | ".join(cell(position_top1s(family, pos, r, seeds))
                                                  for family in ["cat", "vit"] for r in EVAL_RES) + " |")
    lines += ["", "| cat-tiny rotary | " + " | ".join(f"{r} px" for r in EVAL_RES + FAR_RES) + " |",
              "| --- " * (1 + len(EVAL_RES + FAR_RES)) + "|"]
    for pos in ["cat", *CAT_DEFAULT_CANDIDATES]:
        lines.append(f"| `{pos}` | " + " | ".join(cell(position_top1s("cat", pos, r, seeds))
                                                  for r in EVAL_RES + FAR_RES) + " |")
    lines += ["", "| swin-tiny position | " + " | ".join(f"{r} px" for r in EVAL_RES) + " |",
              "| --- " * (1 + len(EVAL_RES)) + "|"]
    for pos in SWIN_POSITIONS:
        lines.append(f"| `{pos}` | " + " | ".join(cell([top1(swin_run(pos), r)]) for r in EVAL_RES) + " |")
    lines += ["", "| axis (cat rotary) | tiny-imagenet-20 top-1 | shapes top-1 (1 epoch) |", "| --- | --- | --- |",
              f"| `alternate` | {cell([top1('cat-tiny-s0')])} | {cell([top1('shapes-axis-alternate')])} |",
              f"| `row` | {cell([top1('cat-axis-row')])} | {cell([top1('shapes-axis-row')])} |"]
    return "\n".join(lines)


def raw_results(plan):
    """{name: train.py flags, seconds in training steps, images/s, eval rows} of every finished run in `plan`."""
    results = {}
    for name, flags in plan.items():
        result = finished(name)
        if result:
            seconds, speed = training(name)
            rows = [{k: r[k] for k in ("res", "top1", "top5", "loss")} for r in result["rows"]]
            results[name] = {"flags": flags, "train_seconds": seconds, "train_images_per_s": speed, "eval": rows}
    return results


def plot(path, seeds):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    for ax, family in zip(axes, ["cat", "vit"]):
        plotted = set()
        for pos in POSITIONS:       # each point: the mean over the seeds that ran it
            points = [(r, statistics.mean(values)) for r in EVAL_RES + FAR_RES
                      if (values := position_top1s(family, pos, r, seeds))]
            if points:
                ax.plot(*zip(*points), "o-", label=pos)
                plotted.update(r for r, _ in points)
        ax.set(title=f"{family}-tiny, trained at 64 px", xlabel="evaluation resolution (px)", xticks=sorted(plotted))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("tiny-imagenet-20 val top-1 (%), mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "tiny-imagenet-20"),
                        help="an imagefolder tree (default ../shared/data/tiny-imagenet-20)")
    parser.add_argument("--tables", nargs="+", default=["families", "imprint", "positions", "swin", "axis"],
                        choices=["families", "imprint", "positions", "swin", "axis"], help="default: all five")
    parser.add_argument("--runs", nargs="+", default=None,
                        help="only these runs of the tables (by name, e.g. performer-tiny-s0); default: all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the families table")
    parser.add_argument("--epochs", type=positive_int, default=3,
                        help="the budget of every tiny-imagenet run (default 3)")
    parser.add_argument("--report", action="store_true", help="only print the tables of finished runs")
    parser.add_argument("--plot", default=os.path.join("assets", "positions_resolution.png"),
                        help="PNG of top-1 against evaluation resolution per positional scheme "
                             "(needs matplotlib; '': none)")
    parser.add_argument("--json", default=os.path.join("assets", "experiments.json"),
                        help="write every finished run's flags, training time and evaluation here ('': don't)")
    args = parser.parse_args()
    if not args.report:
        while True:             # an equal-time run goes first as soon as its two runs have finished
            todo = {**(equal_time_runs(args.seeds, args.epochs) if "families" in args.tables else {}),
                    **runs(args.tables, args.seeds)}
            if args.runs:
                unknown = sorted(set(args.runs) - set(todo))
                if unknown:
                    parser.error(f"--runs: no run named {', '.join(unknown)} in the tables {' '.join(args.tables)}")
                todo = {name: flags for name, flags in todo.items() if name in args.runs}
            res = {name: resolutions(name, flags, args.seeds) for name, flags in todo.items()}
            name = next((name for name in todo if not finished(name, res[name])), None)
            if name is None:
                break
            run(name, todo[name], res[name], args)
    print(report(args.seeds, args.epochs))
    if args.plot:
        plot(args.plot, args.seeds)
    if args.json:                 # runs finished here update the file; the others' entries are kept
        results = {}
        if os.path.exists(args.json):
            with open(args.json) as f:
                results = json.load(f)
        results.update(raw_results({**equal_time_runs(args.seeds, args.epochs), **runs(args.tables, args.seeds)}))
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"every finished run: {args.json}")


if __name__ == "__main__":
    main()
