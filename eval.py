"""Evaluate a checkpoint at one or more resolutions.

    python eval.py                                   # the default run's checkpoint at its training resolution
    python eval.py --res 64 96 128 --json res.json   # multi-resolution, as in the RoPE-ViT paper's table
    torchrun --nproc_per_node=2 eval.py --ckpt runs/cat-paper-imagefolder/ckpt.pt --res 224 384

The data and the model come from the checkpoint unless flags override them; the val folder's classes are matched
with the checkpoint's by name. Positional schemes at a new resolution: `ape` is resized bicubically, `axial` and
`mixed` extrapolate to positions beyond the training grid, `cat` and `scaled` interpolate (the same [-pi, pi] range
at every size).
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Subset
from tqdm import tqdm

import data
from checkpoint import CheckpointError, class_map, load_checkpoint, model_from_checkpoint
from model import PRESETS, config_from_dict, count_flops, nearest_sizes
from runtime import (ArgumentParser, add_model_flags, all_sum, autocast, compute_threads, default_workers,
                     in_flag_terms, model_overrides, non_negative_int, positive_int, setup_device,
                     SignalSafeLoader, unused_model_flags, use_bf16)

DEFAULT_CHECKPOINT = os.path.join("runs", "cat-tiny-shapes", "ckpt.pt")   # where the default run writes


def parse_args(argv=None):
    parser = ArgumentParser(prog="eval.py", description=__doc__)
    parser.add_argument("--ckpt", default=DEFAULT_CHECKPOINT, help=f"checkpoint (default: {DEFAULT_CHECKPOINT})")
    parser.add_argument("--res", type=positive_int, nargs="+", default=None,
                        help="resolutions to evaluate at (default: the training resolution)")
    parser.add_argument("--data", choices=data.DATASETS, default=None, help="default: the checkpoint's")
    parser.add_argument("--data-dir", default=None, help="default: the checkpoint's")
    parser.add_argument("--strict-images", action="store_true", help="stop at an unreadable image")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="per process (default 128)")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="DataLoader workers (default: as train.py)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA weights when the checkpoint has them (default: yes)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on with CUDA and on CPUs with AMX or AVX512-BF16)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_model_flags(parser, "another preset for the checkpoint's weights (default: the checkpoint's own model)",
                    "model options (default: the checkpoint's; e.g. --form linear; one that changes the weights "
                    "fails)")
    parser.set_defaults(model=None)
    return parser.parse_args(argv), parser


def build(args, parser):
    """(model, config, checkpoint state) from the checkpoint and the overriding flags."""
    try:
        state = load_checkpoint(args.ckpt)
        config = config_from_dict(state["config"])
        overrides = model_overrides(args)
        model_name = args.model or state.get("args", {}).get("model", "the checkpoint")
        unused = unused_model_flags(overrides, PRESETS[args.model] if args.model else config, model_name)
        if unused:
            parser.error(unused[0])
        if args.model:
            config = replace(PRESETS[args.model], img_size=config.img_size, num_classes=config.num_classes)
        if overrides or args.model:
            state = {**state, "config": asdict(replace(config, **overrides))}
        model = model_from_checkpoint(state, args.ckpt, use_ema=args.ema)
    except (CheckpointError, ValueError) as error:
        parser.error(in_flag_terms(str(error)))
    return model, model.config, state


def main(argv=None):
    args, parser = parse_args(argv)
    if not os.path.exists(args.ckpt):
        hint = " (train it first with `python train.py`)" if args.ckpt == DEFAULT_CHECKPOINT else ""
        parser.error(f"{args.ckpt}: no such checkpoint file{hint}")
    model, config, state = build(args, parser)
    trained = state.get("args", {})
    resolutions = args.res or [config.img_size]
    bad = [r for r in resolutions if r % config.patch]
    if bad:
        nearest = ", ".join(" or ".join(map(str, nearest_sizes(r, config.patch))) for r in bad)
        parser.error(f"--res {' '.join(map(str, bad))} not divisible by the patch size {config.patch} (the nearest: "
                     f"{nearest})")
    name = args.data or trained.get("data", "shapes")
    root = args.data_dir or trained.get("data_dir", "data")

    rank, world, device = setup_device()
    amp = use_bf16(args.amp, device, lambda text: print(text, file=sys.stderr) if rank == 0 else None)
    workers = default_workers(device) if args.workers is None else args.workers
    torch.set_num_threads(compute_threads(workers))
    model.to(device)
    rows = []
    try:
        for res in resolutions:
            try:
                dataset = data.build_dataset(name, root, "val", res, strict_images=args.strict_images,
                                             seed=trained.get("seed", 0))
            except (ValueError, FileNotFoundError, NotADirectoryError) as error:
                parser.error(str(error))
            if res == resolutions[0]:                     # the same classes at every resolution
                label_map = check_classes(state, dataset, f"{root}/val" if name == "imagefolder" else name, parser,
                                          rank == 0)
            loader = eval_loader(dataset, args.batch_size, device, workers, rank, world)
            metrics = evaluate(model, loader, device, amp, world, progress=rank == 0, label_map=label_map)
            rows.append({"res": res, **metrics, "gflops": count_flops(config, res) / 1e9,
                         "params_m": model.num_params() / 1e6})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        weights = "EMA" if args.ema and state.get("ema") is not None else "model"
        print(f"{args.ckpt} ({weights} weights, trained at {config.img_size}px, step {state['step']}) on {name} val")
        print(format_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ckpt": args.ckpt, "data": name, "weights": weights, "config": asdict(config),
                           "rows": rows}, f, indent=2)
    return rows


def check_classes(state, dataset, where, parser, is_main):
    """class_map of the checkpoint's classes and the data's; says when it maps by name, refuses other classes."""
    trained = state.get("classes")
    if trained is None:                                      # written without names: the count must do
        if len(dataset.classes) != state["config"]["num_classes"]:
            parser.error(f"{where} has {len(dataset.classes)} classes, the checkpoint's model "
                         f"{state['config']['num_classes']}")
        return None
    try:
        label_map = class_map(trained, dataset.classes, where)
    except ValueError as error:
        parser.error(f"{error}: not the classes {state.get('args', {}).get('data_dir', 'the checkpoint')} trained on")
    if label_map is not None and is_main:
        print(f"note: the {len(dataset.classes)} classes of {where} are matched to the checkpoint's {len(trained)} "
              f"by name (they come in another order, or are a subset)")
    return label_map


def eval_loader(dataset, batch_size, device, workers=0, rank=0, world=1):
    """Every world-th image of `dataset` for this process, in order; workers persist between evaluations. Its own
    generator: the workers' seed must not be drawn from (and shift) the global one, which a training run's dropout
    and MixUp draw from: a run resumed after a validation would differ from one that was never stopped."""
    shard = Subset(dataset, range(rank, len(dataset), world))
    return SignalSafeLoader(shard, workers, batch_size=batch_size, pin_memory=device.type == "cuda",
                            generator=torch.Generator())


@torch.no_grad()
def evaluate(model, loader, device, amp, world=1, progress=False, label_map=None):
    """top-1, top-5 (percent), mean loss, images/s over an eval_loader's images, summed over the processes.
    Unreadable files (label -1, see data.py) are left out of every figure and counted in `left_out`.
    label_map: the model's label for each of the data's (class_map), when the two number the classes differently."""
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
        if label_map is not None:
            labels = label_map.to(labels.device)[labels]
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


def format_table(rows):
    """One line per resolution; `images` counts the val images scored, `unreadable` the files left out."""
    header = (f"{'res':>5} {'top-1':>7} {'top-5':>7} {'loss':>7} {'images':>7} {'unreadable':>10} {'img/s':>8} "
              f"{'GFLOPs':>8} {'params':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['res']:>5} {r['top1']:>6.2f}% {r['top5']:>6.2f}% {r['loss']:>7.4f} {r['images']:>7} "
                     f"{r['left_out']:>10} {r['images_per_s']:>8.1f} {r['gflops']:>8.3f} {r['params_m']:>7.2f}M")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
