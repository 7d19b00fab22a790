"""What train.py, eval.py and bench.py share at run time: the model flags, the device and distributed start-up,
the precision policy, CPU memory, and the record of the machine a run used."""
import argparse
import atexit
import ctypes
import multiprocessing
import os
import re
import signal
import sys
from contextlib import nullcontext
from time import monotonic
from dataclasses import fields

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from model import CHOICES, PRESETS, CATConfig

# bf16 dense peak (FLOP/s) for the MFU column; other devices: pass --peak-tflops.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "3090": 71e12}


# ---------------------------------------------------------------------------------------------- flags

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
    "stem": "patch embedding: one patch x patch convolution, or conv: strided 3x3 convolutions (Xiao et al. 2021)",
    "dropout": "dropout after attention and FFN",
    "drop_path": "stochastic depth rate of the last block (linear in depth)",
    "stages": "swin: blocks per stage, e.g. 2 2 6 2",
    "window": "swin: window side in patches",
    "grad_checkpoint": "recompute each block's activations in the backward pass: less memory, ~1/3 more time "
                       "(not resnet18)",
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with errors in one line that names the flag and points at --help (not the whole usage), and the
    description (a script's docstring) shown as written."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        """Under torchrun every process parses the same flags: rank 0 alone says why they are refused."""
        self.exit(2, f"{self.prog}: error: {message}\n(python {self.prog} --help lists every flag)\n"
                  if os.environ.get("RANK", "0") == "0" else None)


def add_model_flags(parser, model_help="preset (default cat-tiny)", group_title="model options (default: the "
                    "preset's value)"):
    """--model PRESET plus one flag per CATConfig field, which overrides the preset."""
    parser.add_argument("--model", default="cat-tiny", choices=sorted(PRESETS), help=model_help)
    group = parser.add_argument_group(group_title)
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


# The model fields that only some attention families read (model.py, swin.py; resnet18, torchvision's, reads none
# of them). The others each family reads or checks itself (CATConfig refuses a resnet18 with positions, say).
TRANSFORMERS = ("cross_axis", "softmax", "performer")
READ_BY = {**dict.fromkeys(("dim", "heads", "mlp_ratio", "dropout", "drop_path"), (*TRANSFORMERS, "swin")),
           **dict.fromkeys(("depth", "imprint"), TRANSFORMERS), **dict.fromkeys(("axis", "form"), ("cross_axis",)),
           **dict.fromkeys(("performer_kernel", "performer_features"), ("performer",)),
           **dict.fromkeys(("stages", "window"), ("swin",))}


def unused_model_flags(overrides, config, model):
    """Why the model flags in `overrides` would be silently ignored by `config` (of preset `model`, or the
    attention --attn gives it), whose attention never reads them: one line each."""
    attn = overrides.get("attn", config.attn)
    whose = f"--attn {attn}" if "attn" in overrides else f"{model}'s ({attn})"
    reasons = [f"--{name.replace('_', '-')} is only used by the {', '.join(READ_BY[name])} attention, not by {whose}"
               for name in overrides if name in READ_BY and attn not in READ_BY[name]]
    if attn == "performer" and "performer_features" in overrides and \
            overrides.get("performer_kernel", config.performer_kernel) == "relu":
        reasons.append("--performer-features is only used by the favor kernel, not by --performer-kernel relu")
    return reasons


def in_flag_terms(message, names=()):
    """A CATConfig (or other) error in the words of the command line: 'img_size (60) must ...' becomes
    '--res 60 must ...', 'mlp_ratio must ...' '--mlp-ratio must ...'. names: more fields that are flags."""
    message = re.sub(r"\bimg_size\b", "res", message)
    fields = "|".join([*MODEL_HELP, "res", *names])
    message = re.sub(rf"\b({fields}) \(([^)\s]*)\)", lambda m: f"--{m[1].replace('_', '-')} {m[2]}", message)
    return re.sub(rf"\b({fields})\b(?= must| \()", lambda m: "--" + m[1].replace("_", "-"), message)


# ---------------------------------------------------------------------------------------------- device

def setup_device():
    """(rank, world, device) of this process, with the precision policy (fp32_means_fp32) and, on CPU, the memory
    policy (keep_freed_memory) set. torchrun sets RANK/WORLD_SIZE; plain python is a world of one."""
    fp32_means_fp32()
    rank, world, device = setup_distributed()
    if device.type == "cpu":
        keep_freed_memory()
    return rank, world, device


def setup_distributed():
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
    if device.type == "cuda":                   # it counts an emulating GPU unless told not to
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_bf16_units() is not None


def use_bf16(amp, device, warn):
    """Whether to run in bf16 autocast: --amp / --no-amp, by default where bf16 is fast. Warns where it is not."""
    fast = bf16_is_fast(device)
    if amp and not fast:
        warn(f"warning: --amp on {device_name(device)}: bf16 autocast runs emulated here, far slower than fp32 "
             f"(--no-amp); {EMULATED_BF16}")
    return fast if amp is None else amp


def peak_flops(device):
    """The device's dense bf16 peak in FLOP/s, for the MFU column, where PEAK_FLOPS knows it; else None."""
    if device.type != "cuda":
        return None
    return next((flops for name, flops in PEAK_FLOPS.items() if name in torch.cuda.get_device_name(device)), None)


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



def compute_threads(workers, cores=None):
    """Threads for this process's own compute: the cores it may run on (its CPU affinity, shared with the other
    processes torchrun started on this machine), less its loader workers, at least one; OMP_NUM_THREADS, when set
    (torchrun sets 1 for several processes), wins. Oversubscribed, the compute threads wait on each other:
    `python train.py` ran at 15 images/s instead of 169 beside another job on 2 cores (docs/training.md)."""
    if os.environ.get("OMP_NUM_THREADS"):                      # "4" or, nested, "4,2": the outer level
        return max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0]))
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - workers)


def default_workers(device):
    """DataLoader workers per process: on CUDA the CPU cores this process gets, less one for itself (at most 8);
    on CPU one, since the model's own threads need the cores."""
    if device.type != "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))



WORKER_PIDS = set()         # of SignalSafeLoader's workers, which ignore SIGTERM: end_workers_that_ignore_sigterm


class SignalSafeLoader(DataLoader):
    """A DataLoader whose workers persist between epochs and ignore Ctrl-C and SIGTERM, which reach the whole
    process group (a terminal, timeout, Slurm, torchrun's shutdown): they leave them to the trainer, which saves
    before it exits, and end with it. A worker that died of the signal first would make the trainer fail instead."""

    def __init__(self, dataset, num_workers, **kwargs):
        super().__init__(dataset, num_workers=num_workers, persistent_workers=num_workers > 0,
                         worker_init_fn=workers_leave_signals_to_the_trainer, **kwargs)

    def _get_iterator(self):
        iterator = super()._get_iterator()
        WORKER_PIDS.update(worker.pid for worker in getattr(iterator, "_workers", []))
        return iterator


def workers_leave_signals_to_the_trainer(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register        # registered after multiprocessing's exit handler (torch imports it), so it runs first
def end_workers_that_ignore_sigterm():
    """At exit, multiprocessing ends the daemonic children still alive (the workers of an iterator that an
    uncaught error's traceback keeps) with SIGTERM, then waits for them: ours ignore it, so they get SIGKILL
    first. Only SignalSafeLoader's workers: other children are left to multiprocessing."""
    for child in multiprocessing.active_children():
        if child.pid in WORKER_PIDS:
            child.kill()


class StopFlag:
    """Set by SIGINT/SIGTERM while training: the run saves and exits after the current step (one process; after the
    next for a signal during the update of a step that is not a log step), under torchrun at most two steps later
    (agreed). A second signal, REPEAT_SECONDS or more after the first, interrupts at once; an earlier
    one is the same request delivered twice (torchrun forwards the signal that its process group got too). The
    previous handlers come back on exit."""
    REPEAT_SECONDS = 2.0

    def __init__(self, say, world=1):
        self.say, self.world = say, world

    def __enter__(self):
        self.raised, self.group = False, None
        if self.world > 1:                  # a CPU group even beside NCCL: the vote never waits on the device
            self.group, self.votes = dist.new_group(backend="gloo"), torch.zeros(1)
            self.vote = dist.all_reduce(self.votes, group=self.group, async_op=True)
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, exc_type, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.group is not None and exc_type is None:     # every process ends the loop at the same step
            self.vote.wait()

    def agreed(self):
        """Whether to stop at this step, the same answer on every process: the processes' flags summed by an
        all-reduce started at the previous step and read at this one. So a stop under torchrun, whatever
        --log-every is, comes within torchrun's 30 s between SIGTERM and SIGKILL unless two steps take longer."""
        if self.group is None:
            return self.raised
        self.vote.wait()
        agreed = self.votes.item() > 0
        self.votes.fill_(float(self.raised))
        self.vote = dist.all_reduce(self.votes, group=self.group, async_op=True)
        return agreed

    def handle(self, signum, frame):
        if self.raised:
            if monotonic() - self.raised_at >= self.REPEAT_SECONDS:
                raise KeyboardInterrupt
            return
        self.raised, self.raised_at = True, monotonic()
        self.say(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                 f"(Ctrl-C again, a few seconds later, quits at once without saving)")


def autocast(device, amp):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()

