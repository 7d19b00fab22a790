"""Speed, memory and FLOPs of CAT against the ViT and Performer baselines (docs/benchmarks.md).

    python bench.py                  # paper-size models at 224/384/768 px; CPU: batch 1; CUDA: bf16 + compile, batch 32
    python bench.py --smoke                                # seconds: tiny models, small images

The models are timed in turn inside each round (interleaved), so a slow patch of the machine hits them all
alike, and the median round counts. Reported per model and resolution: forward+backward and forward-only
images/s, FLOPs per image (counted by torch.utils.flop_counter), memory, achieved TFLOP/s and MFU (when the
device peak is known); then the CAT/ViT speed ratios, the exponent of cost against token count, and the
quadratic/linear crossover of the cross-axis product.
"""
import argparse
import json
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

from model import LINEAR_ABOVE, PRESETS, build_model, count_flops, cross_axis_attention
from runtime import (ArgumentParser, bf16_is_fast, device_name, fp32_means_fp32, keep_freed_memory, non_negative_int,
                     peak_flops, positive_int)


def parse_args(argv=None):
    parser = ArgumentParser(prog="bench.py", description=__doc__)
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(PRESETS),
                        help="the first is compared with `vit-paper` (or the second) (default: cat-paper vit-paper "
                             "performer-paper; with --smoke their tiny versions)")
    parser.add_argument("--pos", nargs="+", default=None, metavar="POS",
                        help="time each model with each of these positional schemes, as rows MODEL/POS; the first "
                             "pos is compared with the second (e.g. --models cat-tiny --pos cat scaled)")
    parser.add_argument("--res", type=positive_int, nargs="+", default=None,
                        help="square resolutions (default 224 384 768; with --smoke 32 64)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: 1 on CPU, 32 on CUDA")
    parser.add_argument("--iters", type=positive_int, default=None,
                        help="least timed rounds (default: 2 on CPU, 20 on CUDA)")
    parser.add_argument("--min-seconds", type=float, default=None, help="more rounds (up to 100) until every model "
                        "has this much timed training (default: 10 on CPU, 2 on CUDA)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on with CUDA and on CPUs with AMX or AVX512-BF16)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile each model (default: on with CUDA)")
    parser.add_argument("--crossover-widths", type=positive_int, nargs="*", default=[8, 16, 32, 64, 96, 128, 192],
                        help="grid widths for the quadratic/linear timing (none: skip it)")
    parser.add_argument("--timm", action="store_true", help="add timm's ViT of the vit-paper size, if installed")
    parser.add_argument("--features", action="store_true",
                        help="time forward_features (the backbone, no head) instead of the classifier")
    parser.add_argument("--grad-checkpoint", action="store_true",
                        help="also time each model with gradient checkpointing (rows named MODEL+gc)")
    parser.add_argument("--kernel-ceiling", action="store_true",
                        help="also time the FLOP kernels of each training step alone (matmuls, convolutions, "
                             "attention): the step's speed if nothing else took time")
    parser.add_argument("--smoke", action="store_true", help="one round, a short matmul probe, by default tiny "
                        "models at 32/64 px: seconds")
    parser.add_argument("--os-allocator", action="store_true", help="CPU: leave glibc returning freed memory to "
                        "the OS (default: keep it, see runtime.keep_freed_memory)")
    parser.add_argument("--json", default=None, help="write all results to this file")
    parser.add_argument("--plot", default=None, help="PNG of images/s and memory against resolution "
                        "(needs matplotlib; skipped without it)")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    if args.smoke:
        args.models = args.models or ["cat-tiny", "vit-tiny", "performer-tiny"]
        args.res, args.iters, args.warmup, args.min_seconds = args.res or [32, 64], 1, 0, 0
        args.crossover_widths = [4, 8, 16] if args.crossover_widths else []
    args.models = args.models or ["cat-paper", "vit-paper", "performer-paper"]
    args.res = args.res or [224, 384, 768]
    args.batch_size = args.batch_size or (1 if cpu else 32)
    args.iters = args.iters or (2 if cpu else 20)
    args.min_seconds = (10 if cpu else 2) if args.min_seconds is None else args.min_seconds
    args.amp = bf16_is_fast(torch.device(args.device)) if args.amp is None else args.amp
    args.compile = not cpu if args.compile is None else args.compile
    for res in args.res:
        for name in args.models:
            if res % PRESETS[name].patch:
                parser.error(f"--res {res} is not divisible by the patch size {PRESETS[name].patch} of {name}")
    for name in args.models:
        for pos in args.pos or []:
            try:
                replace(PRESETS[name], pos=pos)
            except ValueError as error:
                parser.error(f"--pos {pos} for {name}: {error}")
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def activation_bytes(run, model, images, autocast):
    """Bytes autograd keeps for the backward pass of one forward, run(images) (distinct storages, the weights of
    `model` excluded): the memory that grows with resolution, measurable on any device."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast():
        run(images)
    return sum(storages.values())


def build(name, res, args, device):
    """(the timed callable, the module, its config): the model's forward, or forward_features with --features,
    compiled with --compile. A name PRESET/POS is the preset with that pos; one ending in +gc has gradient
    checkpointing."""
    if name == "timm-vit":
        import timm
        base = PRESETS["vit-paper"]
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=res, patch_size=base.patch, embed_dim=base.dim, depth=base.depth, num_heads=base.heads,
            mlp_ratio=base.mlp_ratio, num_classes=base.num_classes)
        config = base
    else:
        preset, _, pos = name.removesuffix("+gc").partition("/")
        config = replace(PRESETS[preset], img_size=res, grad_checkpoint=name.endswith("+gc"),
                         **({"pos": pos} if pos else {}))
        model = build_model(config)
    model = model.to(device)
    run = model.forward_features if args.features else model
    # dynamic=False: each resolution gets its own static graph. (By default the second shape a forward sees makes
    # dynamo recompile it for any shape, with slower kernels.)
    return (torch.compile(run, dynamic=False) if args.compile else run), model, config


def matmul_rate(device, dtype, seconds=2.0, weight_gradient=False):
    """FLOP/s of one large matmul, (3136 x 1024) @ (1024 x 3072): what this device's matrix units deliver, the
    ceiling a model's training step can approach. weight_gradient: the same FLOPs in the layout of a Linear's
    weight gradient, grad_out^T @ input, (1024 x 3136)^T-strided @ (3136 x 3072), which contracts over the
    leading dimension of both operands (a third of a training step's matmul FLOPs)."""
    a = torch.randn(3136, 1024, device=device, dtype=dtype)
    b = torch.randn(1024, 3072, device=device, dtype=dtype)
    if weight_gradient:
        a, b = torch.randn(3136, 1024, device=device, dtype=dtype).t(), torch.randn(3136, 3072, device=device,
                                                                                     dtype=dtype)
    timed(lambda: a @ b, device)                                       # warm-up
    count, elapsed = 0, 0.0
    while elapsed < seconds:
        elapsed += timed(lambda: a @ b, device)
        count += 1
    return 2 * 3136 * 1024 * 3072 * count / elapsed


# The kernels that do a step's FLOPs: those torch.utils.flop_counter counts, and the CPU's fused attention.
FLOP_KERNELS = {*flop_registry, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward}


@dataclass(frozen=True)
class Layout:
    """A tensor argument of a recorded kernel: what its speed depends on, not its values."""
    shape: tuple
    stride: tuple
    dtype: torch.dtype

    def tensor(self, device):
        """Random values in this exact layout (transposed, expanded or padded strides included)."""
        size = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if all(self.shape) else 0
        base = (torch.randn(size, device=device).to(self.dtype) if self.dtype.is_floating_point
                else torch.zeros(size, dtype=self.dtype, device=device))
        return base.as_strided(self.shape, self.stride)


class RecordFlopKernels(TorchDispatchMode):
    """Records every FLOP kernel an eager step calls, forward and backward, with the layouts of its tensors."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in FLOP_KERNELS:
            layout = lambda x: Layout(tuple(x.shape), x.stride(), x.dtype) if isinstance(x, torch.Tensor) else x
            self.calls.append((func, tree_map(layout, args), tree_map(layout, kwargs)))
        return func(*args, **kwargs)


def kernel_seconds(calls, device, repeats=3):
    """Seconds the recorded kernels take when each runs alone on random inputs of its layouts (the best of
    `repeats` after a warm-up call; calls alike, such as the same Linear in every block, are timed once). It is
    the step's time if everything between the kernels (norms, rotations, casts, copies) took none.
    The layouts are eager mode's: a compiled graph may call some kernels with others."""
    best, total = {}, 0.0
    for func, args, kwargs in calls:
        key = repr((func, args, kwargs))
        if key not in best:
            args, kwargs = tree_map(lambda x: x.tensor(device) if isinstance(x, Layout) else x, (args, kwargs))
            func(*args, **kwargs)
            best[key] = min(timed(lambda: func(*args, **kwargs), device) for _ in range(repeats))
        total += best[key]
    return total


def benchmark(args, matmul_peak=None):
    """Rows of speed and memory per model and resolution. MFU is against the device's bf16 peak on known GPUs,
    else against matmul_peak (the measured matmul rate of the dtype the models run in)."""
    device = torch.device(args.device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else nullcontext
    peak = peak_flops(device) or matmul_peak
    names = [*model_names(args), *([f"{name}+gc" for name in model_names(args)] if args.grad_checkpoint else [])]
    if args.timm:
        try:
            import timm  # noqa: F401
            names.append("timm-vit")
        except ImportError:
            print("timm is not installed: skipping the outside reference")
    rows = []
    for res in args.res:
        torch.manual_seed(0)
        images = torch.randn(args.batch_size, 3, res, res, device=device)
        labels = torch.randint(0, 1000, (args.batch_size,), device=device)
        built = {name: build(name, res, args, device) for name in names}

        def train_step(model, classes):
            with autocast():
                out = model(images).float()
                loss = out.mean() if args.features else F.cross_entropy(out, labels % classes)
            loss.backward()

        def forward_step(model):
            with torch.no_grad(), autocast():
                model(images)

        times = {name: {"train": [], "forward": []} for name in names}
        round_ = 0
        while round_ < args.warmup + args.iters or (round_ < 100 and min(
                sum(t["train"]) for t in times.values()) < args.min_seconds):
            round_ += 1
            for name, (model, raw, config) in built.items():
                raw.zero_grad(set_to_none=True)
                train_time = timed(lambda: train_step(model, config.num_classes), device)
                forward_time = timed(lambda: forward_step(model), device)
                if round_ > args.warmup:
                    times[name]["train"].append(train_time)
                    times[name]["forward"].append(forward_time)
        for name, (model, raw, config) in built.items():
            train_s, forward_s = statistics.median(times[name]["train"]), statistics.median(times[name]["forward"])
            flops = count_flops(config, res) if name != "timm-vit" else None
            row = {"model": name, "res": res, "tokens": (res // config.patch) ** 2, "batch": args.batch_size,
                   "rounds": len(times[name]["train"]),
                   "train_images_per_s": args.batch_size / train_s, "forward_images_per_s": args.batch_size / forward_s,
                   "gflops": flops / 1e9 if flops else None, "params_m": raw_params(raw) / 1e6,
                   "activation_mib": activation_bytes(raw.forward_features if args.features else raw, raw, images,
                                                      autocast) / 2**20}
            if flops:
                row["train_tflops_per_s"] = 3 * flops * row["train_images_per_s"] / 1e12
                row["mfu"] = row["train_tflops_per_s"] * 1e12 / peak if peak else None
            if args.kernel_ceiling:
                recorder = RecordFlopKernels()
                raw.zero_grad(set_to_none=True)
                with recorder:
                    train_step(raw.forward_features if args.features else raw, config.num_classes)
                kernel_s = kernel_seconds(recorder.calls, device)
                row["kernel_ms"], row["kernel_share"] = 1000 * kernel_s, kernel_s / train_s
                if flops:
                    row["kernel_tflops_per_s"] = 3 * flops * args.batch_size / kernel_s / 1e12
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                raw.zero_grad(set_to_none=True)
                train_step(model, config.num_classes)
                row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            rows.append(row)
            print(format_row(row), flush=True)
            if "kernel_ms" in row:
                ceiling = f", {row['kernel_tflops_per_s']:.3f} TFLOP/s" if "kernel_tflops_per_s" in row else ""
                print(f"{'':>17}its FLOP kernels alone: {row['kernel_ms']:.1f} ms a step, "
                      f"{100 * row['kernel_share']:.0f}% of it{ceiling}", flush=True)
        del built
    return rows


def model_names(args):
    """The rows' names: the models, or with --pos each model with each pos (MODEL/POS)."""
    return [f"{name}/{pos}" for name in args.models for pos in args.pos] if args.pos else args.models


def raw_params(model):
    return sum(p.numel() for p in model.parameters())


def format_row(r):
    gflops = f"{r['gflops']:8.2f}" if r["gflops"] else f"{'-':>8}"
    tflops = f"{r['train_tflops_per_s']:7.3f}" if r.get("train_tflops_per_s") else f"{'-':>7}"
    mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") else f"{'-':>6}"
    peak = f"{r['peak_mib']:9.0f}" if "peak_mib" in r else f"{'-':>9}"
    return (f"{r['model']:>16} {r['res']:>5} {r['tokens']:>6} {r['train_images_per_s']:>10.3f} "
            f"{r['forward_images_per_s']:>10.3f} {gflops} {tflops} {mfu} {r['activation_mib']:>9.0f} {peak}")


HEADER = (f"{'model':>16} {'res':>5} {'tokens':>6} {'train im/s':>10} {'fwd im/s':>10} {'GFLOPs':>8} "
          f"{'TFLOP/s':>7} {'MFU':>6} {'act MiB':>9} {'peak MiB':>9}")


def ratios(rows, fast, slow):
    """Speed ratio fast/slow (train and forward) and FLOP ratio slow/fast at each resolution."""
    table = []
    for res in sorted({r["res"] for r in rows}):
        a = next((r for r in rows if r["model"] == fast and r["res"] == res), None)
        b = next((r for r in rows if r["model"] == slow and r["res"] == res), None)
        if a and b:
            table.append({"res": res, "train_speedup": a["train_images_per_s"] / b["train_images_per_s"],
                          "forward_speedup": a["forward_images_per_s"] / b["forward_images_per_s"],
                          "flop_ratio": b["gflops"] / a["gflops"] if a["gflops"] and b["gflops"] else None})
    return table


def cost_exponent(rows, model, key="train_images_per_s"):
    """Least-squares slope of log(seconds per image) against log(tokens): 1 is linear, 2 quadratic."""
    points = [(math.log(r["tokens"]), -math.log(r[key])) for r in rows if r["model"] == model]
    if len(points) < 2:
        return None
    mx, my = (sum(p[i] for p in points) / len(points) for i in (0, 1))
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def crossover(widths, head_dim, heads, device, iters, warmup):
    """Forward+backward time of both cross-axis forms on a square grid of each width, at a fixed head dim."""
    table = []
    for width in widths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, width, width, head_dim, device=device, requires_grad=True) for _ in range(3))
        result = {"width": width}
        for form in ("quadratic", "linear"):
            def step():
                cross_axis_attention(q, k, v, form).sum().backward()
            samples = [timed(step, device) for _ in range(warmup + iters)][warmup:]
            result[form + "_ms"] = 1000 * statistics.median(samples)
        result["auto"] = "quadratic" if width <= LINEAR_ABOVE * head_dim else "linear"
        table.append(result)
    return table


def main(argv=None):
    args = parse_args(argv)
    fp32_means_fp32()                              # what train.py runs: TF32 off, bf16 autocast for speed
    device = torch.device(args.device)
    where = device_name(device)
    if args.device == "cpu" and not args.os_allocator:
        where += ", freed memory kept" if keep_freed_memory() else ""
    print(f"bench on {where}, batch {args.batch_size}, median of >= {args.iters} timed round(s) (and >= "
          f"{args.min_seconds:g} s) after {args.warmup}, amp={args.amp}, compile={args.compile}, "
          f"torch {torch.__version__}")
    seconds = 0.2 if args.smoke else 2.0
    rates = {"fp32": matmul_rate(device, torch.float32, seconds)}
    if args.amp or bf16_is_fast(device):        # emulated bf16 (AVX2 CPUs): ~20 s a matmul, and nothing runs in it
        rates = {"bf16": matmul_rate(device, torch.bfloat16, seconds), **rates,
                 "bf16 weight gradient": matmul_rate(device, torch.bfloat16, seconds, True)}
    print("matmul (3136 x 1024) @ (1024 x 3072): " + ", ".join(f"{name} {rate / 1e12:.2f} TFLOP/s"
                                                            for name, rate in rates.items()))
    print(HEADER)
    rows = benchmark(args, rates["bf16" if args.amp else "fp32"])
    names = model_names(args)
    fast = names[0]
    slow = "vit-paper" if "vit-paper" in names[1:] else names[1] if len(names) > 1 else None
    result = {"device": where, "args": vars(args), "matmul_flops_per_s": rates, "rows": rows}
    if slow:
        result["ratios"] = ratios(rows, fast, slow)
        print(f"\n{fast} / {slow}:  res  train speed  forward speed  FLOP ratio")
        for r in result["ratios"]:
            flop = f"{r['flop_ratio']:.2f}x" if r["flop_ratio"] else "-"
            print(f"{'':>{len(fast) + len(slow) + 3}}{r['res']:>5}  {r['train_speedup']:>10.2f}x  "
                  f"{r['forward_speedup']:>12.2f}x  {flop:>9}")
    result["exponents"] = {name: cost_exponent(rows, name) for name in {r["model"] for r in rows}}
    print("\ncost exponent (seconds per image ~ tokens^e, fwd+bwd): " +
          ", ".join(f"{name} {e:.2f}" for name, e in sorted(result["exponents"].items()) if e is not None))
    if args.crossover_widths:
        base = PRESETS[args.models[0]]
        base = base if base.attn == "cross_axis" else PRESETS["cat-paper"]
        result["crossover"] = crossover(args.crossover_widths, base.head_dim, base.heads, device,
                                        max(args.iters, 3), 1)
        print(f"\ncross-axis forms, fwd+bwd ms on a W x W grid, {base.heads} heads of dim {base.head_dim}:")
        for r in result["crossover"]:
            winner = "linear" if r["linear_ms"] < r["quadratic_ms"] else "quadratic"
            print(f"  W {r['width']:>4}: quadratic {r['quadratic_ms']:9.2f}  linear {r['linear_ms']:9.2f}  "
                  f"faster: {winner:9}  auto: {r['auto']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(rows, args.plot, where)
    return result


def plot(rows, path, where):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        res = [r["res"] for r in mine]
        axes[0].plot(res, [r["train_images_per_s"] for r in mine], "o-", label=name)
        axes[1].plot(res, [r.get("peak_mib", r["activation_mib"]) for r in mine], "o-", label=name)
    axes[0].set(xlabel="resolution (px)", ylabel="train images/s (fwd+bwd)", xscale="log", yscale="log")
    memory = "peak memory (MiB)" if "peak_mib" in rows[0] else "activations saved for backward (MiB)"
    axes[1].set(xlabel="resolution (px)", ylabel=memory, xscale="log", yscale="log")
    resolutions = sorted({r["res"] for r in rows})
    for ax in axes:
        ax.set_xticks(resolutions, [str(r) for r in resolutions])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"CAT vs baselines, {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
