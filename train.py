"""Train CAT (or a baseline) on one machine or many.

    python train.py                              # cat-tiny on the built-in shapes data, CPU or GPU
    torchrun --nproc_per_node=2 train.py         # the same, data-parallel (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node=8 train.py --model cat-paper --data imagefolder --data-dir /data/imagenet

Everything a run needs to continue lives in OUT_DIR/ckpt.pt (model, optimizer, scheduler, EMA, data position,
RNG); `--resume` picks it up exactly, `--resume auto` too when there is one and starts fresh otherwise (the
command line for `torchrun --max-restarts`), also on another number of processes. The checkpoints before it
stay as ckpt-STEP.pt (--keep-last), the best by val top-1 as best.pt. Metrics go to OUT_DIR/metrics.jsonl.
SIGINT/SIGTERM save and exit.
"""
import argparse
import ctypes
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data
from model import CHOICES, PRESETS, CATConfig, build_model, config_from_dict, count_flops

CHECKPOINT_FORMAT = "cat-checkpoint-v1"
# bf16 dense peak (FLOP/s) for the MFU column; other devices: pass --peak-tflops.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "3090": 71e12}

MODEL_HELP = {
    "patch": "patch size in pixels",
    "dim": "model width D",
    "depth": "number of blocks",
    "heads": "attention heads",
    "mlp_ratio": "FFN hidden size / D (CAT paper: 1, ViT: 4)",
    "attn": "attention family",
    "axis": "cross-axis scores within rows only (row, the paper) or rows and columns in turn (alternate)",
    "form": "cross-axis product order (auto picks the cheaper)",
    "mid_norm": "ablation: normalise the scores between the two cross-axis products",
    "xy_mask": "ablation (paper Table 4): scores decay with the key's distance from a learned (x, y) focus",
    "performer_kernel": "Performer feature map",
    "performer_features": "FAVOR+ random features per head",
    "pos": "positional scheme",
    "imprint": "residual imprint schedule (paper Table 4)",
    "pool": "how the grid becomes one vector",
    "dropout": "dropout after attention and FFN",
    "drop_path": "stochastic depth rate of the last block (linear in depth)",
    "stages": "swin: blocks per stage, e.g. 2 2 6 2",
    "window": "swin: window side in patches",
    "grad_checkpoint": "recompute each block's activations in the backward pass: less memory, ~1/3 more time",
}


# ---------------------------------------------------------------------------------------------- arguments

def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_model_flags(parser):
    """--model PRESET plus one flag per CATConfig field, which overrides the preset."""
    parser.add_argument("--model", default="cat-tiny", choices=sorted(PRESETS), help="preset (default cat-tiny)")
    group = parser.add_argument_group("model options (default: the preset's value)")
    for f in fields(CATConfig):
        if f.name not in MODEL_HELP:                         # img_size is --res; num_classes comes from the data
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=MODEL_HELP[f.name])
        elif f.type in (tuple, "tuple"):
            group.add_argument(flag, type=positive_int, nargs="+", default=None, help=MODEL_HELP[f.name])
        else:
            kind = (positive_int if isinstance(f.default, int) else
                    non_negative_float if isinstance(f.default, float) else str)
            group.add_argument(flag, type=kind, default=None, choices=CHOICES.get(f.name), help=MODEL_HELP[f.name])


def model_overrides(args):
    """{CATConfig field: value} of the model flags given on the command line."""
    values = {name: getattr(args, name) for name in MODEL_HELP if getattr(args, name) is not None}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}


def model_config(args, parser, num_classes):
    """The preset with the command line's overrides, the resolution and the data's class count."""
    overrides = model_overrides(args)
    preset = PRESETS[args.model]
    try:
        return replace(preset, img_size=args.res or preset.img_size, num_classes=num_classes, **overrides)
    except ValueError as error:
        parser.error(str(error))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="shapes", choices=data.DATASETS, help="dataset (default: the built-in shapes)")
    g.add_argument("--data-dir", default="data", help="dataset root (cifar: torchvision's folder; imagefolder: "
                   "ROOT/train/CLASS/*, ROOT/val/CLASS/*)")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data-dir")
    g.add_argument("--strict-images", action="store_true", help="stop at an unreadable image instead of skipping it")
    g.add_argument("--shapes-size", type=positive_int, default=None,
                   help=f"training images of the shapes data (default {data.SHAPES_SIZES['train']}; "
                        f"val is {data.SHAPES_SIZES['val']})")
    g.add_argument("--res", type=positive_int, default=None, help="training resolution (default: the preset's)")
    g.add_argument("--workers", type=non_negative_int, default=None, help="DataLoader workers per process "
                   "(default: on CUDA the process's share of the CPU cores less one, at most 8; 1 on CPU)")
    g.add_argument("--crop-scale", type=non_negative_float, default=0.35,
                   help="RandomResizedCrop min scale (default 0.35; 1: resize and centre-crop; not for shapes)")
    g.add_argument("--no-flip", action="store_true", help="no horizontal flips (always off for shapes)")
    g.add_argument("--auto-augment", default="none", choices=("none", "randaug", "trivial"),
                   help="RandAugment or TrivialAugmentWide (never used for shapes)")
    g.add_argument("--erase", type=non_negative_float, default=0.0, help="RandomErasing probability")
    g.add_argument("--mixup", type=non_negative_float, default=0.0, help="MixUp alpha (0: off)")
    g.add_argument("--cutmix", type=non_negative_float, default=0.0, help="CutMix alpha (0: off)")
    g.add_argument("--repeated-aug", type=positive_int, default=1,
                   help="repeated augmentation: copies of each image, spread over processes (default 1: off)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=2, help="passes over the training set (default 2)")
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="cap on optimizer steps (the schedule spans the capped run)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="per process (default 64)")
    g.add_argument("--accum", type=positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=non_negative_float, default=3e-4, help="peak learning rate (paper: 3e-4)")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.05,
                   help="AdamW decay of weight matrices only (default 0.05)")
    g.add_argument("--warmup", type=non_negative_float, default=0.05,
                   help="fraction of the steps in linear warmup before the cosine decay (default 0.05)")
    g.add_argument("--clip-grad", type=non_negative_float, default=1.0, help="max gradient norm (default 1; 0: off)")
    g.add_argument("--label-smoothing", type=non_negative_float, default=0.1, help="default 0.1")
    g.add_argument("--ema", type=non_negative_float, default=0.0, help="EMA decay of the weights (0: off)")
    g.add_argument("--seed", type=int, default=0, help="weights, data order, augmentation (default 0)")
    g = parser.add_argument_group("system")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA and on CPUs with AMX or AVX512-BF16)")
    g.add_argument("--peak-tflops", type=non_negative_float, default=None,
                   help="device peak for the MFU column (default: known GPUs only)")
    g = parser.add_argument_group("output")
    g.add_argument("--out-dir", default=None, help="default: runs/MODEL-DATA")
    g.add_argument("--resume", nargs="?", const="required", default=None, choices=("required", "auto"),
                   help="continue from OUT_DIR/ckpt.pt (an unreadable one: from the newest readable ckpt-STEP.pt); "
                        "--resume auto: the same when there is one, else start fresh: the command line for the "
                        "first launch and every restart under torchrun --max-restarts")
    g.add_argument("--keep-last", type=positive_int, default=2, metavar="K",
                   help="checkpoints kept: ckpt.pt, the newest, and the K-1 before it as ckpt-STEP.pt (default 2)")
    g.add_argument("--init-from", default=None, metavar="CKPT",
                   help="fine-tune: start from this checkpoint's weights (new head if the class count differs, "
                        "position table resized to --res) with a fresh optimizer and schedule")
    g.add_argument("--eval-every", type=non_negative_int, default=0, help="steps between evaluations (0: every epoch)")
    g.add_argument("--save-every", type=non_negative_int, default=0, help="steps between checkpoints (0: every epoch)")
    g.add_argument("--log-every", type=positive_int, default=10, help="steps between metric lines (default 10)")
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join("runs", f"{args.model}-{args.data}")
    model_config(args, parser, num_classes=1)                 # refuse a bad model before any work
    if args.data == "shapes" and args.data_dir != "data":
        parser.error("--data-dir is not used by the shapes data")
    return args, parser


# ---------------------------------------------------------------------------------------------- distributed

def setup_distributed():
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE; plain python is a world of one."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    if os.environ["RANK"] == "0" and restarts_share_a_store():
        print("warning: torchrun --max-restarts keeps one TCPStore for all attempts, and a restarted group can read "
              "the previous attempt's addresses and fail to connect (pytorch/pytorch#135712): launch torchrun with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and the c10d rendezvous (--standalone or --rdzv-backend=c10d) "
              "to give each attempt its own store", file=sys.stderr)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def restarts_share_a_store():
    """Whether torchrun may restart this group (--max-restarts) on the store of its first attempt, which holds
    that attempt's keys: gloo's peer addresses, NCCL's unique id. torch shares it by default since 2.5."""
    return (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def keep_freed_memory():
    """On glibc, stop handing large freed blocks back to the OS. By default every block over 32 MiB is mmap-ed
    and unmapped again, so each CPU step page-faults its large activations back in: evaluating cat-tiny at
    384 px, batch 128, ran at half speed with most of its time in the kernel. Used on CPU by train.py, eval.py
    and bench.py; the cost is that the process keeps its peak memory. Returns whether it could."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4                      # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def fp32_means_fp32():
    """The one precision policy of train.py, eval.py and bench.py. The speed comes from bf16 autocast (--amp);
    what still runs in fp32 does so for precision (the cross-axis products and GroupNorm under fp16, the
    rotations, the Performer's exp), so TF32 stays off on CUDA, for matmuls and convolutions alike."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def bf16_is_fast(device):
    """Whether bf16 autocast is the default (--amp): on CUDA devices with bf16 support, and on CPUs whose matmul
    units take bf16 (AMX tiles or AVX512-BF16: 2.6 against 0.30 TFLOP/s in fp32 on 2 cores of a Xeon with AMX,
    0.64 against 0.15 on 2 cores of an AMD EPYC with AVX512-BF16). Elsewhere bf16 would be emulated, slower than
    fp32, so the default is fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_units() is not None


EMULATED_BF16 = ("measured on an AMD EPYC with AVX2 only: 1 GFLOP/s for a bf16 matmul against 120 in fp32, and "
                 "65 s per vit-tiny training step at 128 px where an EPYC with AVX512-BF16 takes 2.5")


def cpu_bf16_units():
    """'AMX' or 'AVX512-BF16': the CPU's bf16 matmul units, or None."""
    for units, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            return units
    return None


def device_name(device):
    """What runs the steps, for the metrics log and bench.py: the GPU's name, or the CPU's model with its bf16
    matmul units and thread count. Results from other machines differ in speed (the project's 2-core machines
    have been Xeons with AMX, AMD EPYCs with AVX512-BF16 only, whose bf16 matmuls are 4x slower, and one AMD EPYC
    with AVX2 only, which emulates them)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({cpu_bf16_units() or 'no bf16 units'}), {torch.get_num_threads()} threads"


def boot_id():
    """This boot of this machine (Linux; None elsewhere). Sessions here get CPUs that share a model name but not a
    speed (two EPYC sessions ran cat-tiny at 70 and 132 img/s), so a speed compares only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def all_sum(values, device):
    """Sum a list of floats over all processes."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------------------------------------- checkpoints

class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, not ours or does not fit."""


def save_checkpoint(state, path):
    """Write atomically: a temporary file in the same folder, flushed to disk, then renamed over `path`.
    A crash mid-write leaves the previous checkpoint whole."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """Our checkpoint, or a CheckpointError naming the file. weights_only=True: a file can never run code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:          # torch's message suggests weights_only=False: never that
        reason = next((line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith(
            ("Weights only load failed", "Please file", "Check the documentation"))), "not plain weights")
        raise CheckpointError(f"{path}: refused: not a plain-weights file, so it was not unpickled "
                              f"({reason.removeprefix('WeightsUnpickler error: ')})") from None
    except Exception as error:                                # truncated zip, bad magic, wrong file type...
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a CAT checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    return state


def rotated_checkpoints(out_dir):
    """[(step, path)] of the older checkpoints kept in out_dir as ckpt-STEP.pt, newest first."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    found = [(int(m[1]), os.path.join(out_dir, name)) for name in names if (m := re.fullmatch(r"ckpt-(\d+)\.pt", name))]
    return sorted(found, reverse=True)


def keep_as(path, other):
    """Give file `path` the second name `other` (a hard link: no copy; a copy where links are not possible),
    atomically."""
    tmp = f"{other}.tmp-{os.getpid()}"
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, other)


def save_latest(state, out_dir, keep_last, previous_step, fresh=False):
    """Write `state` as OUT_DIR/ckpt.pt. What ckpt.pt held until now, this run's checkpoint of step
    previous_step (None: nothing of this run's), stays as ckpt-STEP.pt. Of those, the keep_last - 1 newest
    are kept, but none of this step or later (left from a stretch that is being redone) and, on the first save
    of a run that did not resume (fresh), none at all: they are an older run's."""
    latest = os.path.join(out_dir, "ckpt.pt")
    if keep_last > 1 and previous_step not in (None, state["step"]) and os.path.exists(latest):
        keep_as(latest, os.path.join(out_dir, f"ckpt-{previous_step}.pt"))
    save_checkpoint(state, latest)
    older = [path for step, path in rotated_checkpoints(out_dir) if step < state["step"] and not fresh]
    for _, path in rotated_checkpoints(out_dir):
        if path not in older[:keep_last - 1]:
            os.remove(path)


def newest_readable_checkpoint(out_dir, warn):
    """(state, path) of OUT_DIR/ckpt.pt, or when it cannot be read (truncated by a full disk, say) of the
    newest readable ckpt-STEP.pt, warning with both names; (None, None) when there is no checkpoint at all.
    CheckpointError (the newest file's) when there are some but none can be read."""
    latest = os.path.join(out_dir, "ckpt.pt")
    candidates = [latest] * os.path.exists(latest) + [path for _, path in rotated_checkpoints(out_dir)]
    errors = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except CheckpointError as error:
            errors.append(error)
            continue
        for error in errors:
            warn(f"warning: {error}; resuming from the previous checkpoint, {path}")
        return state, path
    if errors:
        raise errors[0]
    return None, None


def model_from_checkpoint(state, path, use_ema=True):
    """Rebuild the model a checkpoint describes, with its EMA weights when it has them and use_ema."""
    try:
        model = build_model(config_from_dict(state["config"]))
        weights = state["model"]
        if use_ema and state.get("ema") is not None:
            weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: weights do not fit the model it describes "
                              f"({str(error).splitlines()[0]})") from None
    return model


# What a fine-tuned model may change from its checkpoint's: the head (class count), the resolution, and what
# does not shape the weights (regularisation, checkpointing, the cross-axis product order).
FINE_TUNE_MAY_CHANGE = {"num_classes", "img_size", "dropout", "drop_path", "grad_checkpoint", "form"}


def fine_tuning_weights(path, model):
    """The weights of checkpoint `path` (EMA ones if it has them) for `model`, a run on new data: the head is
    dropped when the class count differs (the model's fresh head stays), a learned position table is resized
    to the new grid (rotaries need nothing: they are computed for any grid). CheckpointError if the two models
    differ in anything else."""
    state = load_checkpoint(path)
    old = {**asdict(CATConfig()), **state["config"]}             # fields added since it was written: defaults
    differ = [f"{name} {old[name]!r} (here {value!r})" for name, value in asdict(model.config).items()
              if name not in FINE_TUNE_MAY_CHANGE and old[name] != value]
    if differ:
        raise CheckpointError(f"--init-from {path}: its model differs from this run's in more than the head and the "
                              f"resolution: {', '.join(differ)}")
    weights = model_from_checkpoint(state, path).state_dict()
    if old["num_classes"] != model.config.num_classes:
        head = ("head.", "fc.")                                      # fc.: resnet18's, torchvision's name
        weights = {name: w for name, w in weights.items() if not name.startswith(head)}
        weights.update({name: w for name, w in model.state_dict().items() if name.startswith(head)})
    if "ape.table" in weights and weights["ape.table"].shape != model.ape.table.shape:
        weights["ape.table"] = F.interpolate(weights["ape.table"], size=model.ape.table.shape[-2:], mode="bicubic",
                                             align_corners=False)
    return weights


def check_out_dir(out_dir, checkpoint_bytes, copies):
    """Fail at start, not after an hour, when the output folder cannot take `copies` of our checkpoint."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as error:
        raise SystemExit(f"error: --out-dir {out_dir} is not writable ({error.strerror})")
    free = shutil.disk_usage(out_dir).free
    if free < copies * checkpoint_bytes:
        raise SystemExit(f"error: --out-dir {out_dir} has {free / 2**20:.0f} MiB free; a checkpoint needs about "
                         f"{checkpoint_bytes / 2**20:.0f} MiB, and up to {copies} can be on disk at once "
                         f"(--keep-last, best.pt and the temporary file of an atomic write)")


# Flags a resumed run may change: where things are, how fast they run and what is logged. Every other flag sets
# the schedule, the data order or the augmentation, so --resume refuses a change to it (the model flags are
# checked as a whole, through the config). A finished cosine schedule cannot be extended in place: more
# --epochs would send the learning rate back up; --init-from starts a new schedule from the weights instead.
RESUME_MAY_CHANGE = {"data_dir", "download", "strict_images", "workers", "compile", "amp", "peak_tflops",
                     "out_dir", "resume", "keep_last", "eval_every", "save_every", "log_every", "model", *MODEL_HELP}


def changed_flags(saved, args, parser, also_may_change=()):
    """['--flag new (was old)', ...] for the flags outside RESUME_MAY_CHANGE and also_may_change that differ from
    the saved args."""
    was = {name: saved.get(name, parser.get_default(name)) for name in vars(args)}
    return [f"--{name.replace('_', '-')} {value} (was {was[name]})" for name, value in vars(args).items()
            if name not in {*RESUME_MAY_CHANGE, *also_may_change} and value != was[name]]


def images_per_step(args, world):
    """Images per optimizer step over all processes, of an args dict."""
    return args["batch_size"] * args["accum"] * world


def fit_batch_to_world(saved_args, saved_world, args, world):
    """Resuming on another number of processes: keep the images per optimizer step by setting args.accum, where
    one value does. -> what happened, for the log."""
    images = images_per_step(saved_args, saved_world)
    accum, rest = divmod(images, args.batch_size * world)
    if rest:
        return (f"{images_per_step(vars(args), world)} images a step instead of {images} (no --accum gives {images} "
                f"with --batch-size {args.batch_size} on {world} process(es); the learning rate is not rescaled)")
    change = f", --accum {args.accum} -> {accum}" if accum != args.accum else ""
    args.accum = accum
    return f"the same {images} images a step (--batch-size {args.batch_size} x --accum {accum} x {world}{change})"


def checkpoint_to_resume(args, parser, warn):
    """(state, path) to continue from; (None, None) to start fresh: no --resume, or --resume auto and no
    checkpoint in OUT_DIR."""
    if not args.resume:
        return None, None
    try:
        state, path = newest_readable_checkpoint(args.out_dir, warn)
    except CheckpointError as error:
        parser.error(f"{error}, and there is no readable older checkpoint to fall back on")
    if state is None and args.resume == "required":
        parser.error(f"{os.path.join(args.out_dir, 'ckpt.pt')}: no such checkpoint file (--resume auto starts "
                     f"fresh when there is none)")
    return state, path


def check_resumable(state, path, config, args, parser, world):
    """Refuse a checkpoint of another model, schedule or data. On another number of processes, fit the batch
    (fit_batch_to_world): --batch-size and --accum may change then, and otherwise when their product stays.
    -> the note on the changed world size for the log, or None."""
    if {**state["config"], "grad_checkpoint": config.grad_checkpoint} != asdict(config):   # memory, not weights
        parser.error(f"{path} was trained with a different model; resume with the same flags")
    saved_world = state["world_size"]
    note = fit_batch_to_world(state["args"], saved_world, args, world) if saved_world != world else None
    same_images = images_per_step(vars(args), world) == images_per_step(state["args"], saved_world)
    changed = changed_flags(state["args"], args, parser, {"batch_size", "accum"} if note or same_images else ())
    if changed:
        parser.error(f"{path} was trained with other values of flags that set the schedule or the data: "
                     f"{', '.join(changed)}. Resume with the run's own values; to train on from these weights "
                     f"with a new schedule, start a new run with --init-from {path}")
    return note


def check_same_start(step, world):
    """Every process must continue from the same checkpoint. On several machines, each reads OUT_DIR itself,
    so it must be one folder that they all share."""
    if world == 1:
        return
    steps = [None] * world
    dist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        raise SystemExit(f"error: the processes would continue from different checkpoints, of steps {steps} by rank "
                         f"(None: it found none). On several machines --out-dir must be a folder they all share")


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- evaluation

def default_workers(device):
    """DataLoader workers per process: on CUDA the CPU cores this process gets, less one for itself (at most 8);
    on CPU one, since the model's own threads need the cores."""
    if device.type != "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def eval_loader(dataset, batch_size, device, workers=0, rank=0, world=1):
    """Every world-th image of `dataset` for this process, in order; workers persist between evaluations."""
    shard = Subset(dataset, range(rank, len(dataset), world))
    return DataLoader(shard, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      worker_init_fn=ignore_sigint, persistent_workers=workers > 0)


@torch.no_grad()
def evaluate(model, loader, device, amp, world=1, progress=False):
    """top-1, top-5 (percent), mean loss, images/s over an eval_loader's images, summed over the processes.
    Unreadable files (label -1, see data.py) are left out of every figure and counted in `left_out`."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = count = left_out = 0.0
    start = time.perf_counter()
    for images, labels, _ in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images).float()
        readable = labels >= 0
        logits, labels = logits[readable], labels[readable]
        left_out += len(readable) - len(labels)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(1).sum().item()
        count += len(labels)
    seconds = time.perf_counter() - start
    correct1, correct5, loss_sum, count, left_out, seconds = all_sum(
        [correct1, correct5, loss_sum, count, left_out, seconds], device)
    model.train(was_training)
    if count == 0:
        raise data.DataError(f"no readable images to evaluate: all {int(left_out)} files failed to load")
    return {"top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "loss": loss_sum / count,
            "images_per_s": (count + left_out) / (seconds / world), "images": int(count), "left_out": int(left_out)}


def autocast(device, amp):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


# ---------------------------------------------------------------------------------------------- training

class StopFlag:
    """Set by SIGINT/SIGTERM while training; the loop saves and exits at the next step. A second signal
    interrupts at once. The previous handlers come back on exit."""

    def __enter__(self):
        self.raised = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True


def ignore_sigint(_):
    """DataLoader workers leave Ctrl-C to the main process, which saves before exiting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_optimizer(model, args, device, total_steps):
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.param_groups(args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                  fused=fused or None)
    warmup = round(args.warmup * total_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1))
    if warmup == 0:
        return optimizer, cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    return optimizer, torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def train(args, parser):
    rank, world, device = setup_distributed()
    fp32_means_fp32()
    if device.type == "cpu":
        keep_freed_memory()
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    warn = (lambda text: print(text, file=sys.stderr)) if is_main else (lambda text: None)
    cuda = device.type == "cuda"
    fast_bf16 = bf16_is_fast(device)
    use_amp = fast_bf16 if args.amp is None else args.amp
    if use_amp and not fast_bf16:
        warn(f"warning: --amp on {device_name(device)}: bf16 autocast runs emulated here, far slower than fp32 "
             f"(--no-amp); {EMULATED_BF16}")
    use_compile = cuda if args.compile is None else args.compile
    workers = default_workers(device) if args.workers is None else args.workers
    torch.manual_seed(args.seed)                                # same initial weights on every process
    random.seed(args.seed)

    res = args.res or PRESETS[args.model].img_size
    aug = data.AugConfig(crop_scale=args.crop_scale, flip=not args.no_flip, auto_augment=args.auto_augment,
                         erase=args.erase)
    try:
        train_set = data.build_dataset(args.data, args.data_dir, "train", res, train_aug=aug, download=args.download,
                                       strict_images=args.strict_images, shapes_size=args.shapes_size, seed=args.seed)
        val_set = data.build_dataset(args.data, args.data_dir, "val", res, download=args.download,
                                     strict_images=args.strict_images, seed=args.seed)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        parser.error(str(error))
    config = model_config(args, parser, num_classes=len(train_set.classes))
    state, resumed_from = checkpoint_to_resume(args, parser, warn)
    world_note = None if state is None else check_resumable(state, resumed_from, config, args, parser, world)
    if len(train_set) < args.batch_size * args.accum * world:
        parser.error(f"--batch-size {args.batch_size} x --accum {args.accum} x {world} processes is more than "
                     f"the {len(train_set)} training images")

    model = build_model(config)
    if args.init_from:
        try:
            model.load_state_dict(fine_tuning_weights(args.init_from, model))
        except CheckpointError as error:
            parser.error(str(error))
    model.to(device)
    flops_per_image = count_flops(config, res)
    check_out_dir(args.out_dir, checkpoint_bytes=4 * model.num_params() * (4 if args.ema else 3) + 2**20,
                  copies=args.keep_last + 2)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    sampler = data.ShardedSampler(len(train_set), world, rank, shuffle=True, seed=args.seed,
                                  repeats=args.repeated_aug, drop_last=True)
    steps_per_epoch = len(sampler) // (args.batch_size * args.accum)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    if state is not None:            # the schedule's length, also when another world size changes the batch
        total_steps = state.get("total_steps", total_steps)
    optimizer, scheduler = build_optimizer(model, args, device, total_steps)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    mixer = data.batch_mixer(config.num_classes, mixup=args.mixup, cutmix=args.cutmix)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    # The same initial weights on every process (seeded above); from here on each process draws its own
    # dropout, drop-path and MixUp/CutMix, as in DeiT and timm. A resumed run restores each process's state.
    torch.manual_seed(data.mix_seed(args.seed, rank))
    random.seed(data.mix_seed(args.seed, rank))

    step = epoch = step_in_epoch = 0
    samples_in_epoch = 0                  # positions of the epoch's global order consumed by all processes
    train_seconds = 0.0                                       # time in training steps, not eval or saving
    best_top1 = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        samples_in_epoch = state.get("samples_in_epoch",
                                     step_in_epoch * images_per_step(state["args"], state["world_size"]))
        train_seconds, best_top1 = state["train_seconds"], state.get("best_top1")
        say(f"resumed {resumed_from} at step {step} (epoch {epoch}: {samples_in_epoch} of {len(train_set)} images)")
        if world_note is None:
            set_rng_state(state["rng"][rank])
        else:                             # rank r's old stream may not exist: a fresh one for every process
            torch.manual_seed(data.mix_seed(args.seed, rank, step))
            random.seed(data.mix_seed(args.seed, rank, step))
            say(f"{world} process(es) continue a run of {state['world_size']}: the rest of epoch {epoch} is dealt "
                f"out over them, each process's random stream is new, drawn from (seed, rank, step), and it trains "
                f"on {world_note}. The optimizer and the schedule continue; the run is not bit-identical to one "
                f"that kept {state['world_size']} process(es)")
    check_same_start(step if state is not None else None, world)

    raw_model = model
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if use_compile:
        model = torch.compile(model)

    best_path = os.path.join(args.out_dir, "best.pt")
    # What ckpt.pt holds: this run's checkpoint of a step, or None; fresh: the run did not resume (save_latest).
    saved = {"step": step if resumed_from == ckpt_path else None, "fresh": state is None}

    def checkpoint(metrics=None, latest=True, best=False):
        """Gather every process's RNG state; rank 0 writes ckpt.pt (latest) and best.pt (best)."""
        rng = [None] * world
        if world > 1:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if not is_main:
            return
        snapshot = {
            "format": CHECKPOINT_FORMAT, "config": asdict(config), "args": vars(args),
            "classes": list(train_set.classes), "model": raw_model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "samples_in_epoch": samples_in_epoch, "total_steps": total_steps, "world_size": world, "rng": rng,
            "metrics": metrics, "best_top1": best_top1, "train_seconds": train_seconds,
        }
        if latest:
            save_latest(snapshot, args.out_dir, args.keep_last, saved["step"], saved["fresh"])
            saved.update(step=step, fresh=False)
        if best and latest:
            keep_as(ckpt_path, best_path)
        elif best:
            save_checkpoint(snapshot, best_path)

    def improves(metrics):
        """Whether this validation is the best so far, by the top-1 of the weights eval.py uses (EMA with --ema)."""
        nonlocal best_top1
        top1 = metrics.get("ema_val_top1", metrics["val_top1"])
        if best_top1 is not None and top1 <= best_top1:
            return False
        best_top1 = top1
        return True

    val_loader = eval_loader(val_set, args.batch_size, device, workers, rank, world)

    def validate():
        metrics = {f"val_{k}": v for k, v in evaluate(raw_model, val_loader, device, use_amp, world).items()}
        if ema is not None:
            metrics.update({f"ema_val_{k}": v for k, v in evaluate(ema, val_loader, device, use_amp, world).items()})
        metrics.update(step=step, train_seconds=train_seconds)
        log({"epoch": epoch, **metrics})
        return metrics

    def log(record):
        if is_main:
            with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (flops for name, flops in PEAK_FLOPS.items() if cuda and name in torch.cuda.get_device_name(device)), None)
    say(f"{args.model}: {raw_model.num_params() / 1e6:.2f}M parameters, {flops_per_image / 1e9:.3f} GFLOPs/image "
        f"at {res}px | {args.data}: {len(train_set)} train / {len(val_set)} val, {config.num_classes} classes | "
        f"{world} process(es) on {device.type}, {total_steps} steps of {args.batch_size * args.accum * world} images")
    if is_main:
        log({"event": "start", "step": step, "resumed_from": resumed_from, "args": vars(args),
             "config": asdict(config), "world_size": world, "device_name": device_name(device), "boot_id": boot_id(),
             "amp": use_amp, "compile": use_compile,
             "params": raw_model.num_params(), "flops_per_image": flops_per_image})

    # Built once: its workers persist from epoch to epoch (the dataset's epoch is in shared memory). Its own
    # generator: the worker seed must not come from (and shift) the global RNG, or a run resumed mid-epoch
    # would draw different dropout and MixUp than an uninterrupted one.
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        pin_memory=cuda, worker_init_fn=ignore_sigint, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    model.train()
    metrics = None
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    # Summed on the device without a sync; read (one all-reduce) at the steps in check_at
    window = {"loss": torch.zeros((), device=device), "steps": 0, "images": 0, "skipped": 0, "seconds": 0.0}
    per_step = args.batch_size * args.accum                  # images per process and optimizer step
    with StopFlag() as stop:
        while step < total_steps:
            sampler.set_epoch(epoch, consumed=samples_in_epoch)
            steps_left = len(sampler) // per_step
            if steps_left == 0:         # a resume on more processes can leave less than a step of the epoch
                epoch, step_in_epoch, samples_in_epoch = epoch + 1, 0, 0
                continue
            train_set.set_epoch(epoch)
            batches = iter(loader)
            while steps_left and step < total_steps:
                tick = time.perf_counter()
                for micro in range(args.accum):
                    images, labels, skipped = next(batches)
                    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    if mixer is not None:
                        images, labels = mixer(images, labels)
                    sync = micro == args.accum - 1 or world == 1
                    with autocast(device, use_amp), (nullcontext() if sync else model.no_sync()):
                        loss = criterion(model(images).float(), labels) / args.accum
                    loss.backward()
                    window["loss"] += loss.detach()
                    window["skipped"] += int(skipped.sum())
                window["steps"] += 1
                window["images"] += per_step * world
                epoch_done = steps_left == 1
                evaluate_now = (args.eval_every and (step + 1) % args.eval_every == 0) or (
                    not args.eval_every and epoch_done)
                save_now = (args.save_every and (step + 1) % args.save_every == 0) or (
                    not args.save_every and epoch_done)
                # The loss check and the stop vote wait on the device and on every process: not every step, but
                # every log_every steps, and before anything is evaluated or saved. So a NaN loss stops the run
                # before its update at these steps, at most log_every - 1 updates late otherwise, and a
                # checkpoint is never written from poisoned weights.
                check = (step + 1) % args.log_every == 0 or step + 1 == total_steps or evaluate_now or save_now
                if check:
                    loss_total, stop_votes, skipped_total = all_sum(
                        [float(window["loss"]), float(stop.raised), window["skipped"]], device)
                    if not math.isfinite(loss_total):
                        first = step + 2 - window["steps"]
                        steps = f"step {step + 1}" if first == step + 1 else f"steps {first}-{step + 1}"
                        raise FloatingPointError(
                            f"loss is {loss_total} at {steps} (epoch {epoch}); stopped before the update. The last "
                            f"good checkpoint is {ckpt_path}" + ("" if os.path.exists(ckpt_path) else " (none written yet)"))
                if args.clip_grad:
                    nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(raw_model)
                seconds = time.perf_counter() - tick
                train_seconds += seconds
                window["seconds"] += seconds
                step += 1
                step_in_epoch += 1
                steps_left -= 1
                samples_in_epoch += per_step * world
                bar.update()
                if check:
                    speed = window["images"] / window["seconds"]
                    record = {"step": step, "epoch": epoch, "loss": loss_total / (world * window["steps"]),
                              "lr": scheduler.get_last_lr()[0], "images_per_s": speed,
                              "skipped_images": skipped_total, "train_seconds": train_seconds}
                    if peak:
                        record["mfu"] = 3 * flops_per_image * speed / (peak * world)
                    log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", img_s=f"{speed:.0f}")
                    window = {"loss": torch.zeros((), device=device), "steps": 0, "images": 0, "skipped": 0,
                              "seconds": 0.0}
                if epoch_done:
                    epoch, step_in_epoch, samples_in_epoch = epoch + 1, 0, 0
                best = False
                if evaluate_now:
                    metrics = validate()
                    best = improves(metrics)
                    if is_main:
                        bar.write(f"step {step}: val top-1 {metrics['val_top1']:.2f}%" + (
                            f" (EMA {metrics['ema_val_top1']:.2f}%)" if ema is not None else ""))
                stopping = check and stop_votes
                if stopping or save_now or best:
                    checkpoint(metrics, latest=stopping or save_now, best=best)
                if stopping:
                    bar.close()
                    say(f"\nstopped by signal at step {step}; saved {ckpt_path}. Continue with the same command "
                        f"and --resume (or --resume auto).")
                    return None
                if epoch_done:
                    break
        bar.close()
        best = False
        if metrics is None or metrics.get("step") != step:
            metrics = validate()
            best = improves(metrics)
        checkpoint(metrics, best=best)
    return metrics


def main(argv=None):
    args, parser = parse_args(argv)
    try:
        metrics = train(args, parser)
    except (FloatingPointError, data.DataError) as error:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"\nerror: {one_line(error)}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if metrics is not None and int(os.environ.get("RANK", 0)) == 0:
        ckpt = os.path.join(args.out_dir, "ckpt.pt")
        line = f"val top-1 {metrics['val_top1']:.2f}%, top-5 {metrics['val_top5']:.2f}%"
        if "ema_val_top1" in metrics:
            line += f" (EMA weights: top-1 {metrics['ema_val_top1']:.2f}%)"
        print(f"\n{line}\ncheckpoint: {ckpt}\nevaluate it at other resolutions: "
              f"python eval.py --ckpt {ckpt} --res {' '.join(str(r) for r in eval_resolutions(args))}")
    return 0


def one_line(error):
    """The message of an error, also when a DataLoader worker wrapped it in its traceback text."""
    line = str(error).strip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return line.removeprefix(prefix)


def eval_resolutions(args):
    res = args.res or PRESETS[args.model].img_size
    patch = args.patch or PRESETS[args.model].patch
    return [res, *(math.ceil(res * f / patch) * patch for f in (1.5, 2))]


if __name__ == "__main__":
    sys.exit(main())
