"""Train CAT (or a baseline) on one machine or many.

    python train.py                              # cat-tiny on the built-in shapes data, CPU or GPU
    torchrun --nproc_per_node=2 train.py         # the same, data-parallel (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node=8 train.py --model cat-paper --data imagefolder --data-dir /data/imagenet
    python train.py --out-dir runs/X --resume    # continue a stopped run, with its own flags

OUT_DIR (default runs/MODEL-DATA) holds one run: ckpt.pt (all an exact continuation needs), older ones as
ckpt-STEP.pt, the best as best.pt, run.json and metrics.jsonl. Ctrl-C or SIGTERM saves and exits.
"""
import argparse
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import data
from checkpoint import (RunFiles, architecture_changes, check_out_dir, check_same_classes, check_same_start,
                        clear_out_dir, files_to_clear, fine_tuning_weights, keep_images_per_step,
                        load_starting_point, restore, tensorboard_writer)
from eval import eval_loader, evaluate
from model import PRESETS, build_model, count_flops
from runtime import (ArgumentParser, StopFlag, add_model_flags, all_sum, autocast, boot_id, compute_threads,
                     default_workers, device_name, in_flag_terms, model_overrides, non_negative_float,
                     non_negative_int, peak_flops, positive_int, setup_device, SignalSafeLoader,
                     unused_model_flags, use_bf16)


# ---------------------------------------------------------------------------------------------- arguments

def build_parser():
    parser = ArgumentParser(prog="train.py", description=__doc__)
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
    g.add_argument("--res", type=positive_int, default=None,
                   help="training resolution (default: the preset's, or with --init-from the checkpoint's)")
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
                   help="fraction of the steps in linear warmup before the cosine decay, 0 to 1 (default 0.05)")
    g.add_argument("--clip-grad", type=non_negative_float, default=1.0, help="max gradient norm (default 1; 0: off)")
    g.add_argument("--label-smoothing", type=non_negative_float, default=0.1, help="0 to 1 (default 0.1)")
    g.add_argument("--ema", type=non_negative_float, default=0.0,
                   help="EMA decay of the weights, below 1, e.g. 0.999 (0: off)")
    g.add_argument("--seed", type=int, default=0, help="weights, data order, augmentation (default 0)")
    g = parser.add_argument_group("system")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA and on CPUs with AMX or AVX512-BF16; where bf16 "
                        "would be emulated, --amp warns)")
    g.add_argument("--peak-tflops", type=non_negative_float, default=None,
                   help="device peak for the MFU column (default: known GPUs only)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (torch.use_deterministic_algorithms), so that a resumed run on CUDA "
                        "matches an uninterrupted one bit for bit (on CPU it does anyway); slower "
                        "(docs/reliability.md)")

    g = parser.add_argument_group("output")
    g.add_argument("--out-dir", default=None, help="the run's folder (default: runs/MODEL-DATA)")
    g.add_argument("--resume", nargs="?", const="required", default=None, choices=("required", "auto"),
                   help="continue the run in OUT_DIR with its own flags (given ones are checked against them), from "
                        "ckpt.pt or, if that is unreadable, the newest readable ckpt-STEP.pt; --resume auto: the same "
                        "when there is one, else start fresh: the command line for torchrun --max-restarts")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an OUT_DIR that holds another run, "
                   "deleting its checkpoints and logs (without it, train.py refuses)")
    g.add_argument("--keep-last", type=positive_int, default=2, metavar="K",
                   help="checkpoints kept: ckpt.pt, the newest, and the K-1 before it as ckpt-STEP.pt (default 2)")
    g.add_argument("--init-from", default=None, metavar="CKPT",
                   help="fine-tune: start from this checkpoint's model and weights (EMA ones if it has them) with a "
                        "fresh optimizer and schedule; its head is kept if the classes are the same ones, the "
                        "position table resized to --res")
    g.add_argument("--new-head", action="store_true", help="with --init-from: a new head even for the same classes")
    g.add_argument("--eval-every", type=non_negative_int, default=0, help="steps between evaluations (0: every epoch)")
    g.add_argument("--save-every", type=non_negative_int, default=0, help="steps between checkpoints (0: every epoch)")
    g.add_argument("--log-every", type=positive_int, default=10, help="steps between metric lines (default 10)")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUT_DIR/tb for TensorBoard "
                   "(pip install tensorboard; then tensorboard --logdir runs)")
    return parser


def parse_args(argv=None):
    """(args, parser); args.given lists the flags typed on the command line (their dest names)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    typed = build_parser()
    for action in typed._actions:                           # a flag not typed leaves no attribute at all
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(typed.parse_args(argv)))
    args.out_dir = args.out_dir or default_out_dir(args)
    if args.tensorboard:
        tensorboard_writer()                    # missing: refused now, before --overwrite deletes anything
    if not args.ema < 1:
        parser.error(f"--ema must be in [0, 1), got {args.ema}: a decay of 1 never moves the average (0: off)")
    if not args.warmup <= 1:
        parser.error(f"--warmup (a fraction of the steps) must be in [0, 1], got {args.warmup}")
    if not args.label_smoothing <= 1:
        parser.error(f"--label-smoothing must be in [0, 1], got {args.label_smoothing}")
    if args.new_head and not args.init_from:
        parser.error("--new-head needs --init-from")
    if not (args.resume or args.init_from):
        model_config(args, parser, PRESETS[args.model], num_classes=1)     # refuse a bad model before any work
    return args, parser


def default_out_dir(args):
    return os.path.join("runs", f"{args.model}-{args.data}")


# Flags that only some data read: typed for other data they would do nothing, silently.
DATA_FLAGS = {"data_dir": ("imagefolder", "cifar10", "cifar100"), "download": ("cifar10", "cifar100"),
              "shapes_size": ("shapes",), **dict.fromkeys(("crop_scale", "no_flip", "auto_augment", "erase"),
                                                          ("imagefolder", "cifar10", "cifar100"))}


def refuse_flags_the_data_ignores(args, parser):
    for name, used_by in DATA_FLAGS.items():
        if name in args.given and args.data not in used_by:
            flag = "--" + name.replace("_", "-")
            if args.data == "shapes":
                parser.error(f"{flag} is not used by the shapes data (the default --data): add --data "
                             f"{' or '.join(used_by)}")
            parser.error(f"{flag} is only for the {' and '.join(used_by)} data, not --data {args.data}")


def model_config(args, parser, base, num_classes, may_change=None):
    """`base` (a preset, or with may_change a checkpoint's model) with the model flags typed and --res, for
    num_classes. may_change: the fields a checkpoint's model lets flags change; any other that differs fails."""
    overrides = model_overrides(args)
    unused = unused_model_flags({k: v for k, v in overrides.items() if k in args.given}, base, args.model)
    if unused:
        parser.error(unused[0])
    if "res" in args.given or may_change is None:
        overrides["img_size"] = args.res or base.img_size
    if may_change is not None:
        changes = architecture_changes(asdict(base), {k: v for k, v in overrides.items() if k not in may_change})
        if changes:
            free = ", ".join(in_flag_terms(f"{name} must")[:-5] for name in sorted(may_change - {"num_classes"}))
            parser.error(f"{', '.join(changes)}: the model comes from the checkpoint"
                         f"{' (--init-from)' if args.init_from else ''}; only {free} may change")
    try:
        return replace(base, num_classes=num_classes, **overrides)
    except ValueError as error:
        parser.error(in_flag_terms(str(error)))


# ---------------------------------------------------------------------------------------------- training

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


def build_data(args, parser, res):
    """(train, val) datasets (data.py checks that their classes agree); a bad folder or flag fails in one line."""
    try:
        aug = data.AugConfig(crop_scale=args.crop_scale, flip=not args.no_flip, auto_augment=args.auto_augment,
                             erase=args.erase)
        train_set = data.build_dataset(args.data, args.data_dir, "train", res, train_aug=aug, download=args.download,
                                       strict_images=args.strict_images, shapes_size=args.shapes_size, seed=args.seed)
        val_set = data.build_dataset(args.data, args.data_dir, "val", res, download=args.download,
                                     strict_images=args.strict_images, seed=args.seed)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        parser.error(in_flag_terms(str(error), ("crop_scale", "erase", "auto_augment")))
    return train_set, val_set


def warn_dropped(n_images, used, args, world, parser, warn):
    """drop_last leaves out the end of every epoch: refuse a batch larger than the data, warn when it leaves out more
    than a small share."""
    batch = args.batch_size * args.accum * world
    if used == 0:
        parser.error(f"--batch-size {args.batch_size} x --accum {args.accum} x {world} process(es) is more than the "
                     f"{n_images} training images")
    if n_images - used > 0.05 * n_images:
        steps = -(-n_images // batch)
        warn(f"warning: {batch} images a step leave out {n_images - used} of the {n_images} training images every "
             f"epoch (the last, incomplete batch is dropped): --batch-size {n_images // (args.accum * world * steps)} "
             f"would use nearly all")


def train(args, parser):
    rank, world, device = setup_device()
    is_main, cuda = rank == 0, device.type == "cuda"
    say, warn = (print, lambda text: print(text, file=sys.stderr)) if is_main else (lambda *a: None,) * 2

    # Where the run starts: its own checkpoint (--resume), another run's (--init-from: `source`), or a preset
    state, resumed_from, source, base, may_change = load_starting_point(args, parser, warn)
    if source is not None and "out_dir" not in args.given:
        args.out_dir = default_out_dir(args)                    # of the checkpoint's model
    if state is None:                   # a resumed run's data and flags are its own, checked against each other
        refuse_flags_the_data_ignores(args, parser)
    if args.deterministic:              # (a resumed run's own) before the first cuBLAS call, which sizes its workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    config = model_config(args, parser, base, num_classes=1, may_change=may_change)
    old_files = files_to_clear(args, parser, state is not None)     # deleted once every check below has passed
    use_amp = use_bf16(args.amp, device, warn)
    use_compile = cuda if args.compile is None else args.compile
    workers = default_workers(device) if args.workers is None else args.workers
    torch.set_num_threads(compute_threads(workers))
    torch.manual_seed(args.seed)                                # same initial weights on every process
    random.seed(args.seed)

    # Data
    train_set, val_set = build_data(args, parser, config.img_size)
    config = replace(config, num_classes=len(train_set.classes))
    world_note = None
    if state is not None:
        check_same_classes(state, train_set.classes, args, parser)
        world_note = keep_images_per_step(state, args, parser, world)
    sampler = data.ShardedSampler(len(train_set), world, rank, shuffle=True, seed=args.seed,
                                  repeats=args.repeated_aug, drop_last=True)
    per_step = args.batch_size * args.accum                  # images per process and optimizer step
    steps_per_epoch = len(sampler) // per_step
    warn_dropped(len(train_set), steps_per_epoch * per_step * world // args.repeated_aug, args, world, parser, warn)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    if state is not None:            # the schedule's length, also when another world size changes the batch
        total_steps = state.get("total_steps", total_steps)

    # Model, optimizer, schedule
    model = build_model(config)
    if source is not None:
        weights, note = fine_tuning_weights(source, args.init_from, model, train_set.classes, args.new_head)
        model.load_state_dict(weights)
        say(f"--init-from {args.init_from}: {note}")
    model.to(device)
    flops_per_image = count_flops(config, config.img_size)
    check_out_dir(args.out_dir, checkpoint_bytes=4 * model.num_params() * (4 if args.ema else 3) + 2**20,
                  copies=args.keep_last + 2)
    optimizer, scheduler = build_optimizer(model, args, device, total_steps)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    mixer = data.batch_mixer(config.num_classes, mixup=args.mixup, cutmix=args.cutmix)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    # The same initial weights on every process (seeded above); from here on each process draws its own
    # dropout, drop-path and MixUp/CutMix, as in DeiT and timm. A resumed run restores each process's state.
    torch.manual_seed(data.mix_seed(args.seed, rank))
    random.seed(data.mix_seed(args.seed, rank))

    # Resume: weights, optimizer, schedule, data position and random state
    run = {"step": 0, "epoch": 0, "step_in_epoch": 0, "samples_in_epoch": 0, "train_seconds": 0.0,
           "best_top1": None, "best_step": None, "total_steps": total_steps, "world_size": world}
    if state is not None:
        restore(state, resumed_from, model, optimizer, scheduler, ema, run, args, rank, world, world_note, say)
    check_same_start(run["step"] if state is not None else None, world)
    raw_model = model
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if use_compile:
        model = torch.compile(model)
    if is_main:
        clear_out_dir(args.out_dir, old_files)
    files = RunFiles(args, is_main, resumed_from, run["step"], warn)
    snapshot = lambda metrics: {"config": asdict(config), "args": vars(args), "classes": list(train_set.classes),
                                "model": raw_model.state_dict(), "ema": ema.state_dict() if ema else None,
                                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **run,
                                "metrics": metrics}
    val_loader = eval_loader(val_set, args.batch_size, device, workers, rank, world)

    say(f"{args.model}: {raw_model.num_params() / 1e6:.2f}M parameters, {flops_per_image / 1e9:.3f} GFLOPs/image "
        f"at {config.img_size}px | {args.data}: {len(train_set)} train / {len(val_set)} val, {config.num_classes} "
        f"classes | {world} process(es) on {device.type}, {total_steps} steps of {per_step * world} images")
    files.start(config, {"step": run["step"], "resumed_from": resumed_from, "world_size": world, "amp": use_amp,
                         "device_name": device_name(device), "boot_id": boot_id(), "compile": use_compile,
                         "params": raw_model.num_params(), "flops_per_image": flops_per_image})
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)

    # The loop
    loader = train_loader(train_set, sampler, args.batch_size, workers, cuda, args.seed)
    model.train()
    metrics = None
    bar = tqdm(total=total_steps, initial=run["step"], disable=not is_main, desc="train", dynamic_ncols=True)
    window = new_window(device)          # summed on the device without a sync; read at the check steps
    with StopFlag(warn, world) as stop:
        while run["step"] < total_steps:
            sampler.set_epoch(run["epoch"], consumed=run["samples_in_epoch"])
            steps_left = len(sampler) // per_step
            if steps_left == 0:         # a resume on more processes can leave less than a step of the epoch
                run.update(epoch=run["epoch"] + 1, step_in_epoch=0, samples_in_epoch=0)
                continue
            train_set.set_epoch(run["epoch"])
            batches = iter(loader)
            while steps_left and run["step"] < total_steps:
                step, tick = run["step"] + 1, time.perf_counter()          # step: the one this iteration makes
                accumulate_gradients(model, batches, args.accum, mixer, criterion, device, use_amp, world, window)
                window["grad_norm"] += gradient_norm(raw_model, args.clip_grad)
                window["steps"] += 1
                epoch_done = steps_left == 1
                evaluate_now = step % args.eval_every == 0 if args.eval_every else epoch_done
                save_now = step % args.save_every == 0 if args.save_every else epoch_done
                stop_now = stop.agreed()            # every step, on every process alike
                # The processes agree on finite losses and gradients (an all-reduce: it waits on the device) every
                # log_every steps and before any evaluation, save or stop, before the update: no save follows a
                # non-finite update.
                check = step % args.log_every == 0 or step == total_steps or evaluate_now or save_now or stop_now
                if check:
                    record, stop_vote = agree(window, stop, step, run["epoch"], device, world, files.ckpt)
                lr = optimizer.param_groups[0]["lr"]                      # the rate this step uses
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(raw_model)
                seconds = time.perf_counter() - tick
                run.update(step=step, step_in_epoch=run["step_in_epoch"] + 1, train_seconds=run["train_seconds"] +
                           seconds, samples_in_epoch=run["samples_in_epoch"] + per_step * world)
                window["seconds"] += seconds
                steps_left -= 1
                bar.update()
                if check:
                    speed = window["steps"] * per_step * world / window["seconds"]
                    record.update(lr=lr, images_per_s=speed, train_seconds=run["train_seconds"],
                                  **({"mfu": 3 * flops_per_image * speed / (peak * world)} if peak else {}))
                    files.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}")
                    window = new_window(device)
                if epoch_done:
                    run.update(epoch=run["epoch"] + 1, step_in_epoch=0, samples_in_epoch=0)
                best = False
                if evaluate_now:
                    metrics, best = validate(raw_model, ema, val_loader, device, use_amp, world, run, files)
                    if is_main:
                        bar.write(f"step {step}: val top-1 {metrics['val_top1']:.2f}%" + (
                            f" (EMA {metrics['ema_val_top1']:.2f}%)" if ema is not None else ""))
                # one process: also a signal that came during this step's update or evaluation
                stopping = stop_now or (check and (stop_vote or (world == 1 and stop.raised)))
                if stopping or save_now or best:
                    files.save(snapshot(metrics), raw_model, world, latest=stopping or save_now, best=best)
                if stopping:
                    bar.close()
                    say(f"\nstopped by signal at step {step}; saved {files.ckpt}. Continue with "
                        f"`python train.py --out-dir {args.out_dir} --resume`")
                    return None
                if epoch_done:
                    break
        bar.close()
        best = False
        if metrics is None or metrics.get("step") != run["step"]:
            metrics, best = validate(raw_model, ema, val_loader, device, use_amp, world, run, files)
        files.save(snapshot(metrics), raw_model, world, best=best)
    return {**metrics, **run, "config": config, "images": run["step"] * per_step * world}


def validate(model, ema, loader, device, amp, world, run, files):
    """(val metrics of the weights and the EMA's, logged; whether the ones eval.py uses are the best so far)."""
    metrics = {f"val_{k}": v for k, v in evaluate(model, loader, device, amp, world).items()}
    if ema is not None:
        metrics.update({f"ema_val_{k}": v for k, v in evaluate(ema, loader, device, amp, world).items()})
    metrics.update(step=run["step"], train_seconds=run["train_seconds"])
    files.log({"epochs_done": run["epoch"], **metrics})
    top1 = metrics.get("ema_val_top1", metrics["val_top1"])
    best = run["best_top1"] is None or top1 > run["best_top1"]
    if best:
        run.update(best_top1=top1, best_step=run["step"])
    return metrics, best


def train_loader(dataset, sampler, batch_size, workers, cuda, seed):
    """Built once: its workers persist from epoch to epoch (the dataset's epoch is in shared memory). Its own
    generator: the worker seed must not come from (and shift) the global RNG, or a run resumed mid-epoch would
    draw different dropout and MixUp than an uninterrupted one."""
    return SignalSafeLoader(dataset, workers, batch_size=batch_size, sampler=sampler, drop_last=True,
                            pin_memory=cuda, generator=torch.Generator().manual_seed(seed))


def accumulate_gradients(model, batches, accum, mixer, criterion, device, amp, world, window):
    """Forward and backward over `accum` micro-batches: their gradients add up (synced over the processes on the
    last one); their loss and skipped images into the window."""
    for micro in range(accum):
        images, labels, skipped = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if mixer is not None:
            images, labels = mixer(images, labels)
        sync = micro == accum - 1 or world == 1
        with autocast(device, amp), (nullcontext() if sync else model.no_sync()):
            loss = criterion(model(images).float(), labels) / accum
        loss.backward()
        window["loss"] += loss.detach()
        window["skipped"] += int(skipped.sum())


def gradient_norm(model, clip):
    """The gradients' total norm, clipped to `clip` (0: not clipped)."""
    if clip:
        return nn.utils.clip_grad_norm_(model.parameters(), clip)
    return nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def new_window(device):
    """What the log steps sum between them, on the device where it is summed without a sync."""
    zero = torch.zeros((), device=device)
    return {"loss": zero.clone(), "grad_norm": zero.clone(), "steps": 0, "skipped": 0, "seconds": 0.0}


def agree(window, stop, step, epoch, device, world, ckpt_path):
    """Sum the window over the processes: (the log record of its steps, the stop vote). FloatingPointError, before
    this step's update, if a loss or a gradient was not finite."""
    loss, norm, votes, skipped = all_sum([float(window["loss"]), float(window["grad_norm"]), float(stop.raised),
                                          window["skipped"]], device)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        first = step + 1 - window["steps"]
        steps = f"step {step}" if first == step else f"steps {first}-{step}"
        what = f"loss is {loss}" if not math.isfinite(loss) else f"the loss is finite but the gradient norm is {norm}"
        raise FloatingPointError(f"{what} at {steps} (epoch {epoch}); stopped before saving. The last good checkpoint "
                                 f"is {ckpt_path}" + ("" if os.path.exists(ckpt_path) else " (none written yet)"))
    n = world * window["steps"]
    return {"step": step, "epoch": epoch, "loss": loss / n, "grad_norm": norm / n, "skipped_images": skipped}, votes > 0


def main(argv=None):
    args, parser = parse_args(argv)
    try:
        result = train(args, parser)
    except (FloatingPointError, data.DataError) as error:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"\nerror: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"\ninterrupted: not saved; {args.out_dir} keeps its last checkpoint", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result is not None and int(os.environ.get("RANK", 0)) == 0:
        ckpt = os.path.join(args.out_dir, "ckpt.pt")
        line = f"val top-1 {result['val_top1']:.2f}%, top-5 {result['val_top5']:.2f}%"
        if "ema_val_top1" in result:
            line += f" (EMA weights: top-1 {result['ema_val_top1']:.2f}%)"
        print(f"\n{line}; best {result['best_top1']:.2f}% at step {result['best_step']} (best.pt)\n"
              f"{result['step']} steps in {result['train_seconds'] / 60:.1f} min of training, "
              f"{result['images'] / max(result['train_seconds'], 1e-9):.0f} images/s\ncheckpoint: {ckpt}\n"
              f"evaluate it at other resolutions: "
              f"python eval.py --ckpt {ckpt} --res {' '.join(str(r) for r in eval_resolutions(result['config']))}")
    return 0


def one_line(error):
    """The message of an error, also when a DataLoader worker wrapped it in its traceback text."""
    line = str(error).strip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return line.removeprefix(prefix)


def eval_resolutions(config):
    """The training resolution, 1.5x and 2x it, rounded up to the patch."""
    res, patch = config.img_size, config.patch
    return [res, *(math.ceil(res * f / patch) * patch for f in (1.5, 2))]


if __name__ == "__main__":
    sys.exit(main())
