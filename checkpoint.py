"""CAT checkpoints: the file format, atomic writes, the rotation of older files, and the checks that decide
whether a run may continue from one (--resume) or start from its weights (--init-from).

A checkpoint is a dict saved with torch.save and read with weights_only=True, so a file can never run code:
    format       "cat-checkpoint-v1"
    config       the model's CATConfig as a dict (model.config_from_dict rebuilds it)
    classes      the class names, in label order
    model        the model's state_dict;  ema: the EMA's (AveragedModel: keys "module.*" and "n_averaged") or None
    args         the train.py flags;  step, epoch, total_steps, ...: where the run stands
    optimizer, scheduler, rng, ...: what an exact continuation needs
"""
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import mix_seed
from model import PRESETS, build_model, config_from_dict
from runtime import MODEL_HELP

CHECKPOINT_FORMAT = "cat-checkpoint-v1"


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


def architecture_changes(config, wanted):
    """['--dim 64 (was 32)', ...] for the fields of `wanted` ({field: value}) that differ from `config` (a dict)."""
    config = asdict(config_from_dict(config))                   # fields added since it was written: defaults
    return [changed_flag({"img_size": "res"}.get(name, name), value, config[name])
            for name, value in wanted.items() if config[name] != value]


def changed_flag(name, value, was):
    """'--dim 64 (was 32)': a flag (by its dest name) that differs from what the run or checkpoint had."""
    return f"--{name.replace('_', '-')} {value} (was {was})"


def class_map(trained, found, where, exact=False):
    """How a dataset's labels map onto a model's: None when both have the same class names in the same order,
    else a tensor giving the model's label of each of the data's classes, matched by name. ValueError when the data
    has classes the model was not trained on, or with exact=True (a resumed run against its checkpoint) any
    difference at all."""
    found, trained = list(found), list(trained)
    if found == trained:
        return None
    unknown = [name for name in found if name not in trained]
    if unknown or exact:
        one = len(unknown) == 1
        what = (f"{len(unknown)} {'class that is not an expected one' if one else 'classes that are not expected ones'}"
                f" ({', '.join(unknown[:3])}{', ...' * (len(unknown) > 3)})" if unknown
                else "the expected classes in another order or a subset")
        raise ValueError(f"{where} has {what}; expected {len(trained)}: {', '.join(trained[:4])}"
                         f"{', ...' * (len(trained) > 4)}")
    return torch.tensor([trained.index(name) for name in found])


def fine_tuning_weights(state, path, model, classes, new_head=False):
    """(weights, what was loaded) of checkpoint `state` (read from `path`) for `model`, which was built from its
    config for a run on `classes`: the EMA weights if it has them; its head only if it was trained on the same
    classes, in the same order, and not new_head; a learned position table resized to the new grid (rotaries need
    nothing)."""
    source = model_from_checkpoint(state, path)
    weights = source.state_dict()
    which = "EMA weights" if state.get("ema") is not None else "weights (no EMA in it)"
    keep_head = not new_head and state.get("classes") == list(classes)
    if not keep_head:
        head = ("head.", "fc.")                                      # fc.: resnet18's, torchvision's name
        weights = {name: w for name, w in weights.items() if not name.startswith(head)}
        weights.update({name: w for name, w in model.state_dict().items() if name.startswith(head)})
    if "ape.table" in weights and weights["ape.table"].shape != model.ape.table.shape:
        weights["ape.table"] = F.interpolate(weights["ape.table"], size=model.ape.table.shape[-2:], mode="bicubic",
                                             align_corners=False)
    reason = ("--new-head" if new_head else f"its {len(state.get('classes') or [])} classes are not these "
              f"{len(classes)}" if not keep_head else f"the same {len(classes)} classes")
    head = "head kept" if keep_head else "new head"
    return weights, (f"{which} of step {state.get('step')}, {source.config.img_size}px -> {model.config.img_size}px; "
                     f"{head} ({reason})")


RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "run.json", "tb")    # and ckpt-STEP.pt: what a run writes


def files_to_clear(args, parser, resuming):
    """A new run never writes over another run's files: refuse, or with --overwrite name them for clear_out_dir
    (which deletes them only once every start-up check has passed). --resume auto that found no checkpoint starts
    over what its own earlier attempt left. A --init-from checkpoint in the folder to clear is refused."""
    found = [n for n in os.listdir(args.out_dir) if n in RUN_FILES or n.startswith("ckpt-")] \
        if os.path.isdir(args.out_dir) else []
    if resuming or not found:
        return []
    if not (args.overwrite or args.resume == "auto"):
        parser.error(f"--out-dir {args.out_dir} holds another run ({', '.join(sorted(found))}). Continue it with "
                     f"`python train.py --out-dir {args.out_dir} --resume`, start over there with --overwrite, or "
                     f"choose another --out-dir")
    if args.init_from and os.path.realpath(args.init_from) in {os.path.realpath(os.path.join(args.out_dir, name))
                                                                for name in found}:
        parser.error(f"--init-from {args.init_from} is inside --out-dir {args.out_dir}, whose run files a new run "
                     f"there deletes: copy the checkpoint elsewhere first, or choose another --out-dir")
    return found


def clear_out_dir(out_dir, names):
    for name in names:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


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
# the schedule, the data order or the augmentation, so --resume refuses a change to it (the model flags and --res
# are checked through the model, --batch-size and --accum by keep_images_per_step). A finished cosine schedule cannot
# be extended in place: more --epochs would send the learning rate back up; --init-from starts a new schedule.
RESUME_MAY_CHANGE = {"data_dir", "download", "strict_images", "workers", "compile", "amp", "peak_tflops",
                     "deterministic", "out_dir", "resume", "overwrite", "keep_last", "eval_every", "save_every",
                     "log_every", "tensorboard", "given", "res", "batch_size", "accum", *MODEL_HELP}


def load_starting_point(args, parser, warn):
    """(state, path, source, base, may_change): the checkpoint the run starts from, read once: its own (--resume,
    `state` read from `path`), another run's (--init-from, `source`) or none; and the model to build on. Sets flags
    from it: --resume every flag not typed to the run's own value (the parser's default for a flag added since),
    --init-from --model to the checkpoint's."""
    state, path = checkpoint_to_resume(args, parser, warn)
    if state is not None:
        changed = take_run_flags(args, state["args"], vars(parser.parse_args([])))
        if changed:
            parser.error(f"{path}: {refusal(changed, path)}")
        return state, path, None, config_from_dict(state["config"]), {"grad_checkpoint"}   # memory, not weights
    if args.init_from:
        try:
            source = load_checkpoint(args.init_from)
        except CheckpointError as error:
            parser.error(f"--init-from {error}")
        if "model" not in args.given:
            args.model = source["args"].get("model", args.model)
        elif args.model != source["args"].get("model"):
            parser.error(f"--model {args.model} (the checkpoint's is {source['args'].get('model')}): with --init-from "
                         f"the model comes from the checkpoint")
        return None, None, source, config_from_dict(source["config"]), FINE_TUNE_MAY_CHANGE
    return None, None, None, PRESETS[args.model], None


def take_run_flags(args, saved, defaults):
    """--resume: give every flag not typed (args.given) the run's own value, saved in its checkpoint (a flag added
    since: its default). -> ['--flag new (was old)', ...] for the typed ones that differ and may not."""
    changed = []
    for name in [n for n in vars(args) if n not in ("given", "out_dir", "resume")]:   # how this run was started
        was = saved.get(name, defaults.get(name))
        if name not in args.given:
            setattr(args, name, was)
        elif name not in RESUME_MAY_CHANGE and getattr(args, name) != was:
            changed.append(changed_flag(name, getattr(args, name), was))
    return changed


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


def check_same_classes(state, classes, args, parser):
    """Refuse to resume a run on data with other classes."""
    try:
        class_map(state["classes"], classes, f"{args.data_dir}/train", exact=True)
    except ValueError as error:
        parser.error(f"the run was trained on other classes: {error}")


def keep_images_per_step(state, args, parser, world):
    """Resuming: on another number of processes, fit the batch (fit_batch_to_world sets --accum); otherwise
    --batch-size and --accum may change only when their product stays. -> the note on the changed world size for
    the log, or None."""
    saved, saved_world = state["args"], state["world_size"]
    if saved_world != world:
        return fit_batch_to_world(saved, saved_world, args, world)
    if images_per_step(vars(args), world) != images_per_step(saved, saved_world):
        changed = [changed_flag(name, getattr(args, name), saved[name])
                   for name in ("batch_size", "accum") if getattr(args, name) != saved[name]]
        parser.error(refusal(changed, os.path.join(args.out_dir, "ckpt.pt")))
    return None


def refusal(changed, path):
    if any(change.startswith("--model ") for change in changed):       # --init-from keeps the model too
        return (f"the run's weights fit only its own model: {', '.join(changed)}. Leave --model out to continue "
                f"it, or train the other model as a new run in another --out-dir")
    return (f"the run was trained with other values of flags that set the schedule or the data: {', '.join(changed)}. "
            f"Leave them out to continue with the run's own; to train on from its weights with a new schedule, "
            f"start a new run in another --out-dir with --init-from {path}")


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


def restore(state, path, model, optimizer, scheduler, ema, run, args, rank, world, world_note, say):
    """Load a checkpoint's weights, optimizer, schedule, position and this process's random state."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    run.update({k: state[k] for k in ("step", "epoch", "step_in_epoch", "train_seconds")},
               best_top1=state.get("best_top1"), best_step=state.get("best_step"),
               samples_in_epoch=state.get("samples_in_epoch",
                                          state["step_in_epoch"] * state["args"]["batch_size"] *
                                          state["args"]["accum"] * state["world_size"]))
    say(f"resumed {path} at step {run['step']} (epoch {run['epoch']}: {run['samples_in_epoch']} images done)")
    if world_note is None:
        set_rng_state(state["rng"][rank])
    else:                             # rank r's old stream may not exist: a fresh one for every process
        torch.manual_seed(mix_seed(args.seed, rank, run["step"]))
        random.seed(mix_seed(args.seed, rank, run["step"]))
        say(f"{world} process(es) continue a run of {state['world_size']}: the rest of epoch {run['epoch']} is dealt "
            f"out over them, each process's random stream is new, drawn from (seed, rank, step), and it trains "
            f"on {world_note}. The optimizer and the schedule continue; the run is not bit-identical to one "
            f"that kept {state['world_size']} process(es)")


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tensorboard_writer():
    """TensorBoard's SummaryWriter, or a one-line exit naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("error: --tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def board_scalars(record):
    """TensorBoard's tags of a metrics line: an evaluation's as val/top1, val/ema_top1, ...; a log step's as
    train/loss, train/lr, ..."""
    numbers = {name: value for name, value in record.items() if name not in ("step", "epoch", "epochs_done")
               and isinstance(value, (int, float)) and not isinstance(value, bool)}
    if "val_top1" in record:
        return {f"val/{name.replace('val_', '')}": value for name, value in numbers.items() if "val_" in name}
    return {f"train/{name}": value for name, value in numbers.items()}


class RunFiles:
    """What a run writes into OUT_DIR. Every process calls save (it gathers their random states); rank 0 writes:
        ckpt.pt, ckpt-STEP.pt, best.pt   the checkpoints (save_latest)
        run.json                         the flags and the model
        metrics.jsonl                    one line per log step and evaluation, and one per start with its machine
        tb/                              with --tensorboard, the same scalars for TensorBoard
    A resumed run first drops the lines of the steps it is about to redo."""

    def __init__(self, args, is_main, resumed_from, step, warn):
        self.args, self.on, self.board = args, is_main, None
        self.ckpt, self.best = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "best.pt")
        self.metrics = os.path.join(args.out_dir, "metrics.jsonl")
        # What ckpt.pt holds: this run's checkpoint of a step, or None; fresh: the run did not resume (save_latest).
        self.saved_step = step if resumed_from == self.ckpt else None
        self.fresh = resumed_from is None
        if not is_main:
            return
        if resumed_from and os.path.exists(self.metrics):
            self.keep_lines_up_to(step, warn)
        if args.tensorboard:
            self.board = tensorboard_writer()(os.path.join(args.out_dir, "tb"),
                                              purge_step=step + 1 if resumed_from else None)

    def keep_lines_up_to(self, step, warn):
        """Drop the lines of the steps after `step` (a resume redoes them) and a last line that a full disk left
        half written; the file is replaced atomically."""
        with open(self.metrics) as f:
            lines = f.read().splitlines(keepends=True)
        records = []
        for i, line in enumerate(lines):
            try:
                records.append((json.loads(line), line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise SystemExit(f"error: {self.metrics}: line {i + 1} is not JSON; mend or remove it to resume")
                warn(f"warning: {self.metrics}: dropped a partly written last line ({line.strip()[:40]}...)")
        tmp = f"{self.metrics}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(line if line.endswith("\n") else line + "\n"
                         for record, line in records if record.get("step", 0) <= step)
        os.replace(tmp, self.metrics)

    def start(self, config, record):
        if self.on:
            with open(os.path.join(self.args.out_dir, "run.json"), "w") as f:
                json.dump({"args": vars(self.args), "config": asdict(config)}, f, indent=1)
            self.log({"event": "start", **record})

    def log(self, record):
        if not self.on:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None and record.get("event") != "start":     # the start's constants are no curves
            for tag, value in board_scalars(record).items():
                self.board.add_scalar(tag, value, record["step"])
            self.board.flush()

    def save(self, snapshot, model, world, latest=True, best=False):
        """Write `snapshot` (and every process's RNG state) as ckpt.pt (latest) and best.pt (best). Never
        non-finite weights: FloatingPointError instead."""
        rng = [None] * world
        if world > 1:
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if not self.on:
            return
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise FloatingPointError(f"non-finite weights at step {snapshot['step']}, not saved. The last good "
                                     f"checkpoint is {self.ckpt}")
        snapshot = {"format": CHECKPOINT_FORMAT, **snapshot, "rng": rng}
        if latest:
            save_latest(snapshot, self.args.out_dir, self.args.keep_last, self.saved_step, self.fresh)
            self.saved_step, self.fresh = snapshot["step"], False
        if best and latest:
            keep_as(self.ckpt, self.best)
        elif best:
            save_checkpoint(snapshot, self.best)
