"""Data for CAT: the built-in `shapes` task, CIFAR-10/100, ImageFolder trees, augmentation, MixUp/CutMix and a
DDP-aware sampler.

Every dataset yields (image, label, skipped): a normalised float tensor (3, res, res), the class index, and how
many unreadable files were skipped to produce the item (0 normally; the training loop sums it). A training set
replaces an unreadable file by the next readable one; an evaluation set must not change, so there it yields
a blank image with label -1, which `train.evaluate` leaves out and counts. Random augmentation of item i is
seeded by (seed, epoch, i) alone, so a resumed run sees exactly the same images whatever the worker layout:
call dataset.set_epoch(e) before each epoch. Repeated augmentation asks for item (i, copy), and each copy
gets its own seed.
"""
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import datasets
from torchvision.transforms import v2

DATASETS = ("shapes", "cifar10", "cifar100", "imagefolder")
SPLITS = ("train", "val")
AUTO_AUGMENTS = ("none", "randaug", "trivial")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # eval resizes to res / 0.875 and centre-crops res (the usual ImageNet protocol)
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}  # what torchvision expects


def mix_seed(*parts):
    """One 32-bit seed from several ints; unlike `seed + epoch`, (0, 1) and (1, 0) give different seeds."""
    return int(np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------
# shapes: a red and a blue shape on a noisy background; the label is whether the red one is the small or the large
# one (2) x where the red one lies relative to the blue one (4), so it needs colour, size and both axes. Each
# shape is a disc or a square at random, which the label ignores. (A first version asked which outline the red
# shape had, disc vs square and then disc vs cross; with 8 px patches and shapes at any offset inside them,
# tying colour to outline took far longer to learn than the relation, so size is the content cue now.)

SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
SHAPES_CLASSES = [f"{size} red {relation} {SIZES[1 - s]} blue"
                  for s, size in enumerate(SIZES) for relation in RELATIONS]
SHAPES_SIZES = {"train": 12000, "val": 2000}
SIZE_RANGES = {"small": (0.14, 0.20), "large": (0.28, 0.36)}  # side / diameter as a fraction of the image side
OUTLINES = ("disc", "square")
SHAPE_GAP = 0.04                 # least empty space between the two shapes along the relation's axis


def shapes_label(red_size, relation):
    return SIZES.index(red_size) * len(RELATIONS) + RELATIONS.index(relation)


def render_shapes(res, red_size, relation, rng):
    """Render one `shapes` image as float32 (res, res, 3) in [0, 1]: the red shape is the `red_size` one and
    lies `relation` the blue one. Geometry is drawn in units of the image side and the res-dependent noise is
    drawn last, so the same rng state gives the same picture at any resolution."""
    if red_size not in SIZES or relation not in RELATIONS:
        raise ValueError(f"red_size must be one of {SIZES} and relation one of {RELATIONS}")
    blue_size = SIZES[1 - SIZES.index(red_size)]
    size_red, size_blue = rng.uniform(*SIZE_RANGES[red_size]), rng.uniform(*SIZE_RANGES[blue_size])
    outline_red, outline_blue = rng.choice(OUTLINES, size=2)
    centre_red, centre_blue = _place_pair(relation, size_red, size_blue, rng)
    red = rng.uniform(0.75, 1.0) * np.array([1.0, *rng.uniform(0, 0.25, size=2)])
    blue = rng.uniform(0.75, 1.0) * np.array([rng.uniform(0, 0.25), rng.uniform(0, 0.4), 1.0])
    distractors = [(rng.uniform(0, 1, size=2), rng.uniform(0.06, 0.12), rng.uniform(0.1, 0.9))
                   for _ in range(rng.integers(0, 4))]
    background = rng.uniform(0.25, 0.75) + rng.uniform(-0.05, 0.05, size=3)  # low-saturation tint

    coords = (np.arange(res) + 0.5) / res  # pixel centres in image-side units
    ys, xs = coords[:, None], coords[None, :]
    image = np.empty((res, res, 3), dtype=np.float32)
    image[:] = background
    for centre, size, grey in distractors:  # grey discs drawn underneath: shape-like but colourless
        image[_shape_mask("disc", centre, size, ys, xs)] = grey
    image[_shape_mask(outline_red, centre_red, size_red, ys, xs)] = red
    image[_shape_mask(outline_blue, centre_blue, size_blue, ys, xs)] = blue
    image += (rng.random(size=image.shape, dtype=np.float32) - 0.5) * 0.09  # uniform pixel noise, std ~0.026
    return np.clip(image, 0.0, 1.0, out=image)


def _place_pair(relation, size_red, size_blue, rng):
    """(y, x) centres of the red and blue shapes, with y pointing down. Along the relation's axis the centres are
    at least half the sizes plus a gap apart (so the shapes never overlap); across it the offset is at most
    half the offset along it, so the relation is never ambiguous. Both shapes lie fully inside the image."""
    red_first = relation in ("left of", "above")  # first = smaller coordinate along the axis
    size_1, size_2 = (size_red, size_blue) if red_first else (size_blue, size_red)
    reach = (size_1 + size_2) / 2
    along = rng.uniform(reach + SHAPE_GAP, 1 - reach)
    across = rng.uniform(-along / 2, along / 2)
    along_1 = rng.uniform(size_1 / 2, 1 - size_2 / 2 - along)
    across_1 = rng.uniform(max(size_1 / 2, size_2 / 2 - across), min(1 - size_1 / 2, 1 - size_2 / 2 - across))
    first, second = (along_1, across_1), (along_1 + along, across_1 + across)
    red, blue = (first, second) if red_first else (second, first)
    if relation in ("above", "below"):
        return red, blue  # along = y
    return red[::-1], blue[::-1]  # along = x


def _shape_mask(kind, centre, size, ys, xs):
    dy, dx = ys - centre[0], xs - centre[1]
    if kind == "disc":
        return dy**2 + dx**2 <= (size / 2) ** 2
    return (np.abs(dy) <= size / 2) & (np.abs(dx) <= size / 2)


# ----------------------------------------------------------------------------------------------------------
# augmentation

@dataclass
class AugConfig:
    """Training-time augmentation (all torchvision.transforms.v2). Ignored by `shapes`, where crops, flips,
    rotations and colour changes could all change the label."""
    crop_scale: float = 0.35   # RandomResizedCrop scale=(crop_scale, 1); 1.0 disables cropping
    flip: bool = True          # horizontal flip
    auto_augment: str = "none"  # none | randaug | trivial
    randaug_magnitude: int = 9
    erase: float = 0.0         # RandomErasing probability

    def __post_init__(self):
        if self.auto_augment not in AUTO_AUGMENTS:
            raise ValueError(f"auto_augment must be one of {', '.join(AUTO_AUGMENTS)}, got {self.auto_augment!r}")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if not 0 <= self.randaug_magnitude <= 30:
            raise ValueError(f"randaug_magnitude must be in 0..30, got {self.randaug_magnitude}")
        if not 0 <= self.erase <= 1:
            raise ValueError(f"erase (a probability) must be in [0, 1], got {self.erase}")


def _to_normalised_tensor():
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(res, aug):
    if aug.crop_scale < 1:
        steps = [v2.ToImage(), v2.RandomResizedCrop(res, scale=(aug.crop_scale, 1.0), antialias=True)]
    else:
        steps = [v2.ToImage(), v2.Resize(res, antialias=True), v2.CenterCrop(res)]
    if aug.flip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.auto_augment == "randaug":
        steps.append(v2.RandAugment(magnitude=aug.randaug_magnitude))
    elif aug.auto_augment == "trivial":
        steps.append(v2.TrivialAugmentWide())
    steps += _to_normalised_tensor()
    if aug.erase > 0:
        steps.append(v2.RandomErasing(p=aug.erase))  # after Normalize, so erased pixels are the mean (0)
    return v2.Compose(steps + [v2.ToPureTensor()])


def eval_transform(res, crop_ratio=EVAL_CROP_RATIO):
    """Resize the short side to res / crop_ratio, centre-crop res. crop_ratio=1 just resizes (a no-op at the
    native size, which is what CIFAR uses)."""
    steps = [v2.ToImage(), v2.Resize(round(res / crop_ratio), antialias=True), v2.CenterCrop(res)]
    return v2.Compose(steps + _to_normalised_tensor() + [v2.ToPureTensor()])


def batch_mixer(num_classes, mixup=0.0, cutmix=0.0):
    """None when both alphas are 0, else a callable (images, labels) -> (images, soft targets (B, C)).
    MixUp / CutMix draw from torch's global RNG only, which the training loop saves for resume."""
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"mixup and cutmix are Beta alphas and must be >= 0, got {mixup} and {cutmix}")
    mixers = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


# ----------------------------------------------------------------------------------------------------------
# datasets

class DataError(RuntimeError):
    """A data problem found while iterating (strict_images, nothing readable, a failed download); the scripts
    print its message as one line. Raised inside DataLoader workers it keeps its type."""


class UnreadableImage(Exception):
    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class SeededDataset(Dataset):
    """Base class: subclasses give __len__ and load(index) -> (image, label), raising UnreadableImage for a bad
    file. Adds the per-(seed, epoch, index) seeded transform and the skipping of unreadable files."""

    def __init__(self, classes, transform, seed=0, strict_images=False, where="", omit_unreadable=False):
        self.classes, self.transform, self.seed = list(classes), transform, seed
        self.strict_images, self.where, self.omit_unreadable = strict_images, where, omit_unreadable
        # In shared memory, so that set_epoch reaches the persistent DataLoader workers' copies too
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._warned = set()

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    @property
    def epoch(self):
        return int(self._epoch)

    def __getitem__(self, item):
        """item: an index, or (index, copy) for the copies of repeated augmentation (ShardedSampler)."""
        index, copy = item if isinstance(item, tuple) else (item, 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image, label, skipped = self._load_readable(index)
        # fork_rng: the transform's draws depend only on (seed, epoch, index, copy) and leave the global RNG
        # alone; transforms use only the CPU generator, and seeding it alone is 100x cheaper than torch.manual_seed
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, self.epoch, index, *[copy] * (copy > 0)))
            image = self.transform(image)
        return image, label, skipped

    def _load_readable(self, index):
        """Item `index`, or else the next readable one (wrapping around), with how many files were skipped.
        With omit_unreadable, an unreadable item is a blank image labelled -1 instead (skipped = 1)."""
        for skipped in range(len(self)):
            try:
                image, label = self.load((index + skipped) % len(self))
                return image, label, skipped
            except UnreadableImage as err:
                if self.strict_images:
                    raise DataError(f"unreadable image {err} (drop --strict-images to skip such files)") from None
                if err.path not in self._warned:
                    self._warned.add(err.path)
                    warnings.warn(f"{'leaving out' if self.omit_unreadable else 'skipping'} unreadable image "
                                  f"{err}", stacklevel=2)
                if self.omit_unreadable:
                    return Image.new("RGB", (32, 32)), -1, 1
        raise DataError(f"no readable images in {self.where}: all {len(self)} files failed to load")


class ShapesDataset(SeededDataset):
    """Rendered on the fly at `res` (no resize or crop); item i of a split is the same for a given seed."""

    def __init__(self, split, res, size, seed=0):
        super().__init__(SHAPES_CLASSES, v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), seed, where="shapes")
        self.split_stream = SPLITS.index(split)  # train and val draw from different seed streams
        self.res, self.size = res, size

    def __len__(self):
        return self.size

    def load(self, index):
        label = index % len(SHAPES_CLASSES)  # balanced classes; loaders shuffle
        size, relation = divmod(label, len(RELATIONS))
        rng = np.random.default_rng([self.seed % 2**64, self.split_stream, index])
        image = render_shapes(self.res, SIZES[size], RELATIONS[relation], rng)
        return torch.from_numpy(image).permute(2, 0, 1), label


class CifarDataset(SeededDataset):
    def __init__(self, name, root, split, transform, seed=0, download=False, omit_unreadable=False):
        folder = Path(root) / CIFAR_FOLDERS[name]
        make = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            self.data = make(root, train=split == "train", download=download)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(f"{name} not found or incomplete in {folder}: extract the CIFAR python "
                                    f"version there (torchvision layout) or pass --download") from None
        except OSError as err:  # download failed (offline, disk full, ...)
            raise DataError(f"downloading {name} into {root} failed: {err}") from None
        super().__init__(self.data.classes, transform, seed, where=str(folder), omit_unreadable=omit_unreadable)

    def __len__(self):
        return len(self.data)

    def load(self, index):
        return self.data[index]  # (PIL RGB image, label)


class FolderDataset(SeededDataset):
    """ROOT/SPLIT/CLASS/* via ImageFolder's file scan (names only, no decoding); images are opened lazily."""

    def __init__(self, root, split, transform, seed=0, strict_images=False, omit_unreadable=False):
        split_dir = check_image_folder(root, split)
        folder = datasets.ImageFolder(split_dir, allow_empty=True)
        counts = np.bincount(folder.targets, minlength=len(folder.classes))
        empty = [name for name, count in zip(folder.classes, counts) if count == 0]
        if empty:
            raise FileNotFoundError(f"{split_dir / empty[0]} has no image files "
                                    f"(looked for {', '.join(datasets.folder.IMG_EXTENSIONS)})")
        super().__init__(folder.classes, transform, seed, strict_images, str(split_dir), omit_unreadable)
        self.samples = folder.samples

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                return to_rgb(image), label     # decodes fully (truncation shows here); greys and 16-bit -> RGB
        except Exception as err:  # PIL raises many types for bad files (OSError, ValueError, SyntaxError, ...)
            raise UnreadableImage(path, f"{type(err).__name__}: {err}") from None


def to_rgb(image):
    """A PIL image of any mode -> 8-bit RGB, scaling the wide single-channel modes instead of clipping them (PIL's
    convert("RGB") clips them at 255, so a mid-grey 16-bit PNG would come out white):
      I;16 (and I;16B / I;16L / I;16N)  0..65535 -> 0..255, as 16-bit PNG and TIFF greys open
      I (32-bit int)   taken as 16-bit, 0..65535, when its values fit (older Pillows open 16-bit PNGs as I);
                       else as 0..2^31 - 1; negative values clip to 0
      F (32-bit float) [0, 1] when no value exceeds 1, else 0..255 when none exceeds 255, else 0..65535;
                       negative values clip to 0 (NaN -> 0)
    Every other mode goes through convert("RGB") (palette, LA, RGBA, CMYK, ...)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if image.mode == "F":
            values = np.nan_to_num(values, nan=0.0)
            peak = values.max(initial=0.0)
            top = 1.0 if peak <= 1 else 255.0 if peak <= 255 else 65535.0
        else:
            top = 65535.0 if image.mode != "I" or values.max(initial=0) <= 65535 else 2.0**31 - 1
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")          # uint8 (H, W): mode L
    return image.convert("RGB")


def check_image_folder(root, split):
    """Check the ImageNet layout ROOT/{train,val}/CLASS/* by folder names only; -> the split's folder. Only the
    split asked for must exist, and only it is named in an error (eval.py needs no train folder); for training
    (split train) both must have the same class names."""
    root = Path(root)
    layout = f"imagefolder expects {root}/{split}/CLASS/*" + (f" and {root}/val/CLASS/*" if split == "train" else "")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist: {layout}")
    if not (root / split).is_dir():
        raise FileNotFoundError(f"{root / split} is missing: {layout}")
    class_names = {name: {entry.name for entry in os.scandir(root / name) if entry.is_dir()}
                   for name in SPLITS if (root / name).is_dir()}
    if not class_names[split]:
        raise FileNotFoundError(f"{root / split} has no class folders: {layout}")
    if split == "train" and class_names.get("val") and class_names["train"] != class_names["val"]:
        only_train = sorted(class_names["train"] - class_names["val"])
        only_val = sorted(class_names["val"] - class_names["train"])
        raise ValueError(f"train and val classes differ under {root}: only in train: {_short(only_train)}; "
                         f"only in val: {_short(only_val)}")
    return root / split


def _short(names, most=10):
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "") or "none"


def build_dataset(name, root, split, res, *, train_aug=None, download=False, strict_images=False,
                  shapes_size=None, seed=0):
    """-> dataset of (image (3, res, res) normalised float, label, skipped) with `.classes` and `.set_epoch`.
    train_aug: an AugConfig for the training transform; None gives the eval transform (`shapes` ignores it and
    only normalises) and leaves unreadable files out (label -1) instead of replacing them.
    shapes_size: length of this split of `shapes` (default: SHAPES_SIZES)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if not isinstance(res, int) or res < 8:
        raise ValueError(f"res must be an int >= 8, got {res!r}")
    if name == "shapes":
        size = SHAPES_SIZES[split] if shapes_size is None else shapes_size
        if size < 1:
            raise ValueError(f"shapes_size must be >= 1, got {size}")
        return ShapesDataset(split, res, size, seed)
    if root is None:
        raise ValueError(f"dataset {name} needs a data root folder")
    if name in CIFAR_FOLDERS:
        transform = eval_transform(res, crop_ratio=1.0) if train_aug is None else train_transform(res, train_aug)
        return CifarDataset(name, root, split, transform, seed, download, omit_unreadable=train_aug is None)
    transform = eval_transform(res) if train_aug is None else train_transform(res, train_aug)
    return FolderDataset(root, split, transform, seed, strict_images, omit_unreadable=train_aug is None)


# ----------------------------------------------------------------------------------------------------------
# sampler

class ShardedSampler(Sampler):
    """DDP-aware sampler: a permutation seeded by (seed, epoch) only (never the global RNG), the epoch's global
    order, dealt out in turn over the ranks: position p of it goes to rank p % num_replicas, so every step of
    batch B x accumulation A on W ranks consumes the next B * A * W positions of that order, whatever W is.
    An epoch can therefore continue on another number of ranks (set_epoch's `consumed`): the rest of the order
    is dealt out over the new ranks, and no sample is skipped or repeated. repeats > 1 is repeated
    augmentation: each index appears `repeats` times in a row in the order, as (index, copy), so its copies go
    to different ranks (when num_replicas >= repeats) and get different augmentations (SeededDataset seeds each
    copy); each rank still yields ceil(length / num_replicas) samples an epoch.
    Without drop_last the list is padded by wrapping around (so a few samples repeat, also with shuffle=False)."""

    def __init__(self, length, num_replicas=1, rank=0, shuffle=True, seed=0, repeats=1, drop_last=False):
        if length < 1 or num_replicas < 1 or repeats < 1:
            raise ValueError(f"length, num_replicas and repeats must be >= 1, got {length}, {num_replicas}, {repeats}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, got {rank}")
        self.length, self.num_replicas, self.rank = length, num_replicas, rank
        self.shuffle, self.seed, self.repeats, self.drop_last = shuffle, seed, repeats, drop_last
        self.per_rank = length // num_replicas if drop_last else math.ceil(length / num_replicas)
        if self.per_rank == 0:
            raise ValueError(f"drop_last with {length} samples and {num_replicas} ranks leaves no samples")
        self.epoch, self.consumed = 0, 0

    def set_epoch(self, epoch, start=0, consumed=None):
        """start: how many of this rank's samples this epoch were already consumed (exact mid-epoch resume on
        the same ranks). consumed: how many positions of the epoch's global order all ranks together consumed,
        possibly on another number of ranks; it replaces start."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in 0..{self.per_rank}, got {start}")
        if consumed is not None and consumed < 0:
            raise ValueError(f"consumed must be >= 0, got {consumed}")
        self.epoch = epoch
        self.consumed = start * self.num_replicas if consumed is None else consumed

    def epoch_order(self):
        """The epoch's global order: indices, or (index, copy) rows with repeats."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        if self.repeats > 1:
            order = torch.stack([order.repeat_interleave(self.repeats),
                                 torch.arange(self.repeats).repeat(self.length)], 1)   # (index, copy) rows
        return order

    def rank_indices(self):
        """This rank's share of the rest of the epoch: positions consumed + rank + k * num_replicas of the
        order (wrapping around to pad)."""
        order = self.epoch_order()
        positions = self.consumed + self.rank + self.num_replicas * torch.arange(len(self))
        return [tuple(i) if isinstance(i, list) else i for i in order[positions % len(order)].tolist()]

    def __iter__(self):
        return iter(self.rank_indices())

    def __len__(self):
        left = max(self.length - self.consumed, 0)
        return left // self.num_replicas if self.drop_last else math.ceil(left / self.num_replicas)
