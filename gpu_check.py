"""Check a GPU machine in one command, in at most 8 minutes on one GPU:

    python gpu_check.py --out gpu-check               # the CUDA tests, bench.py at 224/384/768 px, a training run
    python gpu_check.py --out gpu-check --minutes 15  # more time for each stage (a slower GPU compiles slower)
    python gpu_check.py --dry-run --out /tmp/check    # the same stages on the CPU at tiny sizes, in seconds

The stages, each in its own processes under its own time limit:
  environment  the GPU, its memory, the driver, torch and CUDA
  tests        pytest test_cuda.py: compiled bf16 training and eval.py, exact resume, the rotations, NCCL, compiled
               DDP with gradient accumulation, CPU against CUDA logits of every preset
  bench        bench.py, cat-paper against vit-paper at 224, 384 and 768 px (batch 32, 32, 8; bf16 and compile, the
               CUDA defaults): images/s, MFU and peak memory, one process per resolution
  train        train.py with its defaults (cat-tiny on the shapes data, compile, bf16) for 300 steps: images/s once
               warm

Every stage writes its log into OUT as it runs (NAME.log), and summary.json and summary.md are rewritten as each
stage ends, so nothing is lost if the machine goes away. A stage that fails or runs out of time is recorded as such
and the next one runs; time a stage leaves unused passes to the next. The exit status is 0 when every stage passed.
--dry-run hides the GPUs and runs the same stages on the CPU at tiny sizes and without torch.compile (which costs
20-80 s per model on a CPU), so that the script cannot rot (test_cuda.py runs it).
"""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent
PYTHON = sys.executable

# What the environment stage prints, as one line 'environment: {json}'.
ENVIRONMENT = """
import json, os, platform, subprocess, torch, runtime
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
info = {"device_name": runtime.device_name(device), "cuda_available": cuda, "gpus": torch.cuda.device_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "cpu_cores": os.cpu_count()}
if cuda:
    p = torch.cuda.get_device_properties(device)
    peak = runtime.peak_flops(device)
    info.update(memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                multiprocessors=p.multi_processor_count, bf16=runtime.bf16_is_fast(device),
                bf16_peak_tflops=peak / 1e12 if peak else None)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
print("environment:", json.dumps(info))
"""


class Plan:
    """What each stage runs, at GPU or dry-run sizes, and the seconds it may take (time left unused moves on)."""

    def __init__(self, dry_run, minutes=8):
        self.dry_run = dry_run
        if dry_run:
            self.limits = {"environment": 30, "tests": 60, "bench": 60, "train": 60}
            self.bench = [((32, 64), 2)]                     # (resolutions, batch) of each bench.py process
            self.bench_flags = ["--smoke", "--device", "cpu", "--models", "cat-tiny", "vit-tiny", "--no-compile",
                                "--no-amp"]
            self.train_flags = ["--dim", "32", "--depth", "2", "--heads", "2", "--res", "32", "--shapes-size", "256",
                                "--batch-size", "16", "--workers", "0", "--max-steps", "3", "--log-every", "1",
                                "--no-compile"]
        else:
            # 7 min 50 s in all. bench.py compiles each model at each resolution, its training step and its forward
            # alone: most of the stage's time.
            self.limits = {"environment": 20, "tests": 150, "bench": 240, "train": 60}
            # 768 px at batch 32 would need about 55 GiB of activations per model (bench.py's CPU figures x 32)
            self.bench = [((224,), 32), ((384,), 32), ((768,), 8)]
            self.bench_flags = ["--device", "cuda", "--models", "cat-paper", "vit-paper"]
            self.train_flags = ["--model", "cat-tiny", "--max-steps", "300", "--log-every", "20"]
        # --minutes other than 8: every limit in proportion
        self.limits = {name: seconds * minutes / 8 for name, seconds in self.limits.items()}
        self.budget = sum(self.limits.values())


class Check:
    """Runs the stages one after another into OUT and keeps OUT/summary.json and summary.md up to date."""

    def __init__(self, out, plan):
        self.out, self.plan = out, plan
        self.start = time.monotonic()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": ""} if plan.dry_run else {})}
        self.summary = {"dry_run": plan.dry_run, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "budget_s": round(plan.budget), "stages": []}

    def limit(self, name):
        """The stage's own seconds plus what the stages before it left unused."""
        names = list(self.plan.limits)
        later = sum(self.plan.limits[n] for n in names[names.index(name) + 1:])
        return self.plan.budget - (time.monotonic() - self.start) - later

    def stage(self, name, commands, figures=None):
        """Run `commands` (argument lists) in turn within the stage's time, into OUT/NAME.log. After each one,
        figures(log text) gives the stage's figures so far and the summary is rewritten. A command that fails is
        recorded and the next still runs; once the time is up the rest are left out."""
        limit = self.limit(name)
        deadline, tick = time.monotonic() + limit, time.monotonic()
        record = {"name": name, "status": "running", "limit_s": round(limit), "log": f"{name}.log", "commands": []}
        self.summary["stages"].append(record)
        print(f"[{self.elapsed():5.0f} s] {name}: up to {limit:.0f} s", flush=True)
        log_path, failures = self.out / f"{name}.log", []
        with open(log_path, "w") as log:
            for command in commands:
                left = deadline - time.monotonic()
                if left <= 1:
                    record["commands"].append({"command": shlex.join(command), "status": "not run: no time left"})
                    failures.append("timeout")
                    continue
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                status, seconds = run(command, log, self.env, left)
                record["commands"].append({"command": shlex.join(command), "status": status,
                                           "seconds": round(seconds, 1)})
                failures += [status] if status != "ok" else []
                if figures is not None:
                    try:
                        record["figures"] = figures(log_path.read_text(errors="replace"))
                        record.pop("figures_error", None)
                    except Exception as error:           # a figure that cannot be read must not stop the check
                        record["figures_error"] = f"{type(error).__name__}: {error}"
                record["seconds"] = round(time.monotonic() - tick, 1)
                self.write()
        record["status"] = failures[0] if failures else "failed" if "figures_error" in record else "ok"
        record["seconds"] = round(time.monotonic() - tick, 1)
        if record["status"] != "ok":
            record["log_tail"] = log_path.read_text(errors="replace")[-3000:]
        self.write()
        print(f"[{self.elapsed():5.0f} s] {name}: {record['status']} in {record['seconds']:.0f} s", flush=True)
        return record

    def elapsed(self):
        return time.monotonic() - self.start

    def write(self):
        self.summary["seconds"] = round(self.elapsed(), 1)
        self.summary["passed"] = all(s["status"] == "ok" for s in self.summary["stages"])
        write_atomically(self.out / "summary.json", json.dumps(self.summary, indent=2) + "\n")
        write_atomically(self.out / "summary.md", markdown(self.summary))


def run(command, log, env, seconds):
    """(status, seconds): 'ok', 'failed (exit N)' or 'timeout'. A command past its time gets SIGTERM (train.py then
    saves and stops), then SIGKILL 20 s later, with every process it started."""
    tick = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        stop(proc)
        log.write(f"\n[gpu_check: stopped after {seconds:.0f} s]\n")
        return "timeout", time.monotonic() - tick
    except BaseException:                           # Ctrl-C: its own session keeps the stage from seeing it
        stop(proc)
        raise
    return ("ok" if code == 0 else f"failed (exit {code})"), time.monotonic() - tick


def stop(proc):
    """SIGTERM to the command and every process it started, SIGKILL 20 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            pass


def write_atomically(path, text):
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------- figures

def environment_figures(log):
    line = next(line for line in log.splitlines() if line.startswith("environment: "))
    return json.loads(line.removeprefix("environment: "))


def tests_figures(log):
    """Each test's outcome from pytest -v, and pytest's closing line."""
    outcomes = dict(re.findall(r"^(test_\w+\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", log, re.M))
    counts = {o.lower(): list(outcomes.values()).count(o) for o in sorted(set(outcomes.values()))}
    closing = re.findall(r"^=+ (.*\bin [\d.]+s.*?) =+$", log, re.M)
    skipped = re.findall(r"^SKIPPED \[\d+\] (.*)$", log, re.M)
    return {"counts": counts, "tests": outcomes, "pytest": closing[-1] if closing else None, "skip_reasons": skipped}


def bench_figures(results):
    """The rows and CAT/ViT ratios of the bench.py JSONs written so far."""
    keys = ("model", "res", "batch", "train_images_per_s", "forward_images_per_s", "gflops", "train_tflops_per_s",
            "mfu", "peak_mib", "activation_mib")
    return {"device": results[0]["device"] if results else None,
            "amp": results[0]["args"]["amp"] if results else None,
            "compile": results[0]["args"]["compile"] if results else None,
            "rows": [{k: row.get(k) for k in keys} for result in results for row in result["rows"]],
            "ratios": [{**r, "batch": result["args"]["batch_size"]} for result in results
                       for r in result.get("ratios", [])]}


def train_figures(metrics_path, log):
    """Images/s of the log windows once warm (all but the first, which holds the compilation), MFU, val top-1."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    start = next(r for r in records if r.get("event") == "start")
    windows = [r for r in records if "images_per_s" in r]
    warm = windows[1:] or windows
    speeds = [r["images_per_s"] for r in warm]
    vals = [r for r in records if "val_top1" in r]
    total = re.findall(r"^(\d+) steps in ([\d.]+) min of training, (\d+) images/s", log, re.M)
    return {"device_name": start.get("device_name"), "amp": start.get("amp"), "compile": start.get("compile"),
            "steps": windows[-1]["step"] if windows else 0,
            "warm_images_per_s": statistics.median(speeds) if speeds else None,
            "warm_images_per_s_range": [min(speeds), max(speeds)] if speeds else None,
            "warm_mfu": statistics.median(r["mfu"] for r in warm) if warm and "mfu" in warm[0] else None,
            "first_window_seconds": round(windows[0]["train_seconds"], 1) if windows else None,
            "val_top1": vals[-1]["val_top1"] if vals else None,
            "images_per_s_with_compilation": int(total[-1][2]) if total else None}


# ---------------------------------------------------------------------------------------------- the report

def markdown(summary):
    stages = {s["name"]: s for s in summary["stages"]}
    env = stages.get("environment", {}).get("figures", {})
    what = "dry run on the CPU" if summary["dry_run"] else "GPU check"
    lines = [f"# {what}: {env.get('device_name', '?')}", "",
             f"torch {env.get('torch', '?')}, CUDA {env.get('cuda') or '-'}"
             + (f", {env['memory_gib']} GiB" if env.get("memory_gib") else "")
             + (f", driver: {env['nvidia_smi']}" if env.get("nvidia_smi") else "")
             + f"; started {summary['started']}, {summary['seconds']:.0f} s of {summary['budget_s']} s", "",
             "| stage | status | seconds | limit |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} | {s['limit_s']} |"
              for s in summary["stages"]]
    tests = stages.get("tests", {}).get("figures")
    if tests:
        lines += ["", f"## Tests: {tests['pytest'] or 'no closing line (stopped?)'}", ""]
        lines += [f"- {outcome}: `{name}`" for name, outcome in tests["tests"].items()
                  if outcome not in ("PASSED", "SKIPPED")]
        lines += [f"- skipped: {reason}" for reason in tests["skip_reasons"]]
    bench = stages.get("bench", {}).get("figures")
    if bench and bench["rows"]:
        lines += ["", f"## bench.py on {bench['device']} (amp={bench['amp']}, compile={bench['compile']})", "",
                  "| model | px | batch | train img/s | forward img/s | train TFLOP/s | MFU | peak MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in bench["rows"]:
            lines.append(f"| `{r['model']}` | {r['res']} | {r['batch']} | {r['train_images_per_s']:.1f} | "
                         f"{r['forward_images_per_s']:.1f} | {fmt(r['train_tflops_per_s'], '.3g')} | "
                         f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f', '%')} | {fmt(r['peak_mib'], '.0f')} |")
        if bench["ratios"]:
            lines += ["", "| px | CAT / ViT train speed | forward speed | FLOP ratio |", "| --- | --- | --- | --- |"]
            lines += [f"| {r['res']} | {r['train_speedup']:.2f}x | {r['forward_speedup']:.2f}x | "
                      f"{fmt(r['flop_ratio'], '.2f', 'x')} |" for r in bench["ratios"]]
    train = stages.get("train", {}).get("figures")
    if train:
        lines += ["", f"## Training run on {train['device_name']} (amp={train['amp']}, compile={train['compile']})",
                  "", f"{train['steps']} steps; images/s once warm: {fmt(train['warm_images_per_s'], '.0f')} "
                  f"(median of the log windows after the first, range "
                  f"{' to '.join(fmt(v, '.0f') for v in train['warm_images_per_s_range'] or [])}), MFU "
                  f"{fmt(train['warm_mfu'] and 100 * train['warm_mfu'], '.2f', '%')}; the first window (compilation "
                  f"included) ended at {train['first_window_seconds']} s; all steps with compilation: "
                  f"{fmt(train['images_per_s_with_compilation'], 'd')} images/s; val top-1 "
                  f"{fmt(train['val_top1'], '.2f', '%')}"]
    failed = [s for s in summary["stages"] if s["status"] != "ok"]
    for s in failed:
        lines += ["", f"## {s['name']}: {s['status']}", "", "```", s.get("figures_error", ""),
                  s.get("log_tail", "")[-1500:], "```"]
    return "\n".join(lines) + "\n"


def fmt(value, spec, unit=""):
    return "-" if value is None else f"{value:{spec}}{unit}"


# ---------------------------------------------------------------------------------------------- the stages

def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the logs, bench.json, train_metrics.jsonl and the "
                        "summary (created; files of an earlier check there are replaced)")
    parser.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at tiny sizes")
    parser.add_argument("--minutes", type=float, default=8, help="the whole check's time; every stage's limit follows "
                        "in proportion (default 8: a slower GPU may need more for the compilations)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(args.dry_run, args.minutes)
    check = Check(out, plan)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    print(f"gpu_check: {'dry run on the CPU' if plan.dry_run else 'GPU'}, at most {plan.budget} s; writing {out}/",
          flush=True)
    try:
        env = check.stage("environment", [[PYTHON, "-c", ENVIRONMENT]], environment_figures)
        if not plan.dry_run and not env.get("figures", {}).get("cuda_available"):
            env["status"] = "failed: no CUDA device (on a machine without one, --dry-run checks the script)"
            check.write()
            print(env["status"], file=sys.stderr)
            return 2

        check.stage("tests", [[PYTHON, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "test_cuda.py",
                               "-k", "not gpu_check"]], tests_figures)

        bench_json = [work / f"bench-{'-'.join(map(str, res))}.json" for res, _ in plan.bench]

        def bench_so_far(log):
            results = [json.loads(path.read_text()) for path in bench_json if path.exists()]
            write_atomically(out / "bench.json", json.dumps({"runs": results}, indent=2) + "\n")
            return bench_figures(results)

        check.stage("bench", [[PYTHON, "bench.py", *plan.bench_flags, "--res", *map(str, res), "--batch-size",
                               str(batch), "--crossover-widths", "--json", str(path)]
                              for (res, batch), path in zip(plan.bench, bench_json)], bench_so_far)

        run_dir = work / "run"

        def train_so_far(log):
            metrics = run_dir / "metrics.jsonl"
            shutil.copyfile(metrics, out / "train_metrics.jsonl")
            return train_figures(metrics, log)

        check.stage("train", [[PYTHON, "train.py", *plan.train_flags, "--out-dir", str(run_dir)]], train_so_far)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    check.write()
    print(f"gpu_check: {'every stage passed' if check.summary['passed'] else 'some stages failed'} in "
          f"{check.elapsed():.0f} s; {out / 'summary.md'}", flush=True)
    return 0 if check.summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
