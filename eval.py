"""Evaluate a checkpoint at one or more resolutions.

    python eval.py                                   # the default run's checkpoint at its training resolution
    python eval.py --res 64 96 128 --json res.json   # multi-resolution, as in the RoPE-ViT paper's table
    torchrun --nproc_per_node=2 eval.py --ckpt runs/cat-paper-imagefolder/ckpt.pt --res 224 384

The data and the model come from the checkpoint unless flags override them. Positional schemes at a new
resolution (SPEC 3): `ape` is resized bicubically, `axial` and `mixed` extrapolate to positions beyond the
training grid, `cat` and `scaled` interpolate (the same [-pi, pi] range at every size).
"""
import argparse
import json
import os
from dataclasses import asdict, replace

import torch
import torch.distributed as dist

import data
from model import PRESETS, config_from_dict, count_flops
from train import (CheckpointError, add_model_flags, bf16_is_fast, default_workers, eval_loader, evaluate,
                   fp32_means_fp32, keep_freed_memory, load_checkpoint, model_from_checkpoint, model_overrides,
                   non_negative_int, positive_int, setup_distributed)

DEFAULT_CHECKPOINT = os.path.join("runs", "cat-tiny-shapes", "ckpt.pt")   # where the default run writes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    add_model_flags(parser)                      # e.g. --form linear; anything that changes weights fails clearly
    parser.set_defaults(model=None)
    return parser.parse_args(argv), parser


def build(args, parser):
    """(model, config, checkpoint state) from the checkpoint and the overriding flags."""
    try:
        state = load_checkpoint(args.ckpt)
        config = config_from_dict(state["config"])
        overrides = model_overrides(args)
        if args.model:
            config = replace(PRESETS[args.model], img_size=config.img_size, num_classes=config.num_classes)
        if overrides or args.model:
            state = {**state, "config": asdict(replace(config, **overrides))}
        model = model_from_checkpoint(state, args.ckpt, use_ema=args.ema)
    except (CheckpointError, ValueError) as error:
        parser.error(str(error))
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
        parser.error(f"--res {' '.join(map(str, bad))} not divisible by the patch size {config.patch}")
    name = args.data or trained.get("data", "shapes")
    root = args.data_dir or trained.get("data_dir", "data")

    rank, world, device = setup_distributed()
    fp32_means_fp32()
    cuda = device.type == "cuda"
    if not cuda:
        keep_freed_memory()
    amp = bf16_is_fast(device) if args.amp is None else args.amp
    workers = default_workers(device) if args.workers is None else args.workers
    model.to(device)
    rows = []
    try:
        for res in resolutions:
            try:
                dataset = data.build_dataset(name, root, "val", res, strict_images=args.strict_images,
                                             seed=trained.get("seed", 0))
            except (ValueError, FileNotFoundError, NotADirectoryError) as error:
                parser.error(str(error))
            if len(dataset.classes) != config.num_classes:
                parser.error(f"{name} has {len(dataset.classes)} classes, the checkpoint's model {config.num_classes}")
            loader = eval_loader(dataset, args.batch_size, device, workers, rank, world)
            metrics = evaluate(model, loader, device, amp, world, progress=rank == 0)
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


def format_table(rows):
    """One line per resolution; `images` counts the val images scored, `left out` the unreadable ones."""
    header = (f"{'res':>5} {'top-1':>7} {'top-5':>7} {'loss':>7} {'images':>7} {'left out':>8} {'img/s':>8} "
              f"{'GFLOPs':>8} {'params':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['res']:>5} {r['top1']:>6.2f}% {r['top5']:>6.2f}% {r['loss']:>7.4f} {r['images']:>7} "
                     f"{r['left_out']:>8} {r['images_per_s']:>8.1f} {r['gflops']:>8.3f} {r['params_m']:>7.2f}M")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
