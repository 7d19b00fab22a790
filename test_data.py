"""Tests for data.py: shapes, imagefolder (incl. bad files), CIFAR errors, seeded augmentation, sampler, mixing."""
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

TINY_IMAGENET = Path(__file__).parent.parent / "shared/data/tiny-imagenet-20"


# ---------------------------------------------------------------------------------------------------- shapes

def colour_masks(image):
    """Red and blue pixels of a rendered (H, W, 3) image in [0, 1], from colour alone."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return r - np.maximum(g, b) > 0.25, b - np.maximum(r, g) > 0.25


def relation_from_pixels(image):
    red, blue = colour_masks(image)
    (ry, rx), (by, bx) = [np.argwhere(mask).mean(axis=0) for mask in (red, blue)]
    dy, dx = ry - by, rx - bx
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def red_size_from_pixels(image):
    """The small shape covers at most (0.20 / 0.28)^2, about half, of the large one's area."""
    red, blue = colour_masks(image)
    return "small" if red.sum() < blue.sum() else "large"


def unnormalise(tensor):
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    return (tensor.permute(1, 2, 0) * std + mean).numpy()


def test_shapes_classes_and_shape():
    ds = data.build_dataset("shapes", None, "train", 48)
    assert len(ds.classes) == 8 and len(set(ds.classes)) == 8
    assert ds.classes[0] == "small red left of large blue"
    image, label, skipped = ds[5]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 8 and skipped == 0
    assert len(ds) == data.SHAPES_SIZES["train"] == 12000 and len(data.build_dataset("shapes", None, "val", 48)) == 2000


def test_shapes_deterministic_and_splits_differ():
    train = data.build_dataset("shapes", None, "train", 32, shapes_size=50)
    again = data.build_dataset("shapes", None, "train", 32, shapes_size=50)
    val = data.build_dataset("shapes", None, "val", 32, shapes_size=50)
    assert torch.equal(train[7][0], train[7][0])
    assert torch.equal(train[7][0], again[7][0])
    assert not torch.equal(train[7][0], val[7][0])
    other_seed = data.build_dataset("shapes", None, "train", 32, shapes_size=50, seed=1)
    assert not torch.equal(train[7][0], other_seed[7][0])


@pytest.mark.parametrize("red_size", data.SIZES)
@pytest.mark.parametrize("relation", data.RELATIONS)
def test_known_arrangement_gives_known_label_at_two_resolutions(red_size, relation):
    label = data.shapes_label(red_size, relation)
    assert data.SHAPES_CLASSES[label].startswith(f"{red_size} red {relation} ")
    for res in (32, 64):
        image = data.render_shapes(res, red_size, relation, np.random.default_rng(123))
        assert image.shape == (res, res, 3) and image.dtype == np.float32
        assert relation_from_pixels(image) == relation
        assert red_size_from_pixels(image) == red_size


def test_dataset_labels_match_pixels():
    ds = data.build_dataset("shapes", None, "val", 64, shapes_size=200)
    for index in range(len(ds)):
        image, label, _ = ds[index]
        image = unnormalise(image)
        kind, relation = divmod(label, len(data.RELATIONS))
        assert relation_from_pixels(image) == data.RELATIONS[relation], index
        assert red_size_from_pixels(image) == data.SIZES[kind], index


# ----------------------------------------------------------------------------------------------- imagefolder

def write_image(path, size=(40, 48), mode="RGB", fmt=None):
    colour = 128 if mode == "L" else (200, 30, 60)
    Image.new(mode, size, colour).save(path, format=fmt)


def make_folder(root, classes=("cat", "dog"), val_classes=None):
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            write_image(folder / "good0.png")
            write_image(folder / "good1.jpg", mode="L")  # greyscale must come out 3-channel
            write_image(folder / "good2.png", size=(70, 30))
    return root


def add_bad_files(folder):
    (folder / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (folder / "empty.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_imagefolder_loads(tmp_path):
    root = make_folder(tmp_path / "root")
    ds = data.build_dataset("imagefolder", root, "train", 32)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    for index in range(len(ds)):
        image, label, skipped = ds[index]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and skipped == 0
    assert [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert len(data.build_dataset("imagefolder", root, "val", 32)) == 6


def test_imagefolder_skips_bad_files_and_warns_once(tmp_path):
    root = make_folder(tmp_path / "root")
    add_bad_files(root / "train" / "cat")
    ds = data.build_dataset("imagefolder", root, "train", 32, train_aug=data.AugConfig())
    # sorted cat files: corrupt, empty, good0, good1, good2, truncated; then dog's three
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))] + [ds[0]]
    assert [skipped for _, _, skipped in items] == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert items[5][1] == 1  # truncated cat file replaced by the next readable item, a dog
    assert all(image.shape == (3, 32, 32) for image, _, _ in items)
    messages = [str(w.message) for w in caught]
    for name in ("corrupt.jpg", "empty.jpg", "truncated.jpg"):
        assert sum(name in m for m in messages) == 1, messages  # once per file, though ds[0] was read twice
    assert all("skipping unreadable image" in m for m in messages)


def test_imagefolder_strict_images_raises_naming_file(tmp_path):
    root = make_folder(tmp_path / "root")
    add_bad_files(root / "train" / "cat")
    ds = data.build_dataset("imagefolder", root, "train", 32, strict_images=True)
    with pytest.raises(RuntimeError, match="corrupt.jpg"):
        ds[0]
    assert ds[2][2] == 0


def test_imagefolder_all_bad_is_a_clear_error(tmp_path):
    root = tmp_path / "root"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "cat" / "bad.jpg").write_bytes(b"not an image")
    ds = data.build_dataset("imagefolder", root, "train", 32, train_aug=data.AugConfig())
    with pytest.warns(UserWarning, match="bad.jpg"), pytest.raises(RuntimeError, match="no readable images"):
        ds[0]


def test_evaluation_set_leaves_bad_files_out_instead_of_replacing_them(tmp_path):
    """A validation set must not change: an unreadable file is a blank image labelled -1 (left out and counted
    by eval.evaluate), never a duplicate of the next file."""
    root = make_folder(tmp_path / "root")
    add_bad_files(root / "val" / "cat")
    ds = data.build_dataset("imagefolder", root, "val", 32)
    with pytest.warns(UserWarning, match="leaving out unreadable image .*corrupt.jpg"):
        items = [ds[i] for i in range(len(ds))]
    assert [label for _, label, _ in items] == [-1, -1, 0, 0, 0, -1, 1, 1, 1]
    assert [skipped for _, _, skipped in items] == [1, 1, 0, 0, 0, 1, 0, 0, 0]
    assert all(image.shape == (3, 32, 32) for image, _, _ in items)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.build_dataset("imagefolder", tmp_path / "nowhere", "train", 32)

    (tmp_path / "a" / "train" / "cat").mkdir(parents=True)
    write_image(tmp_path / "a" / "train" / "cat" / "good.png")
    assert len(data.build_dataset("imagefolder", tmp_path / "a", "train", 32)) == 1   # only the split asked for
    with pytest.raises(FileNotFoundError, match=r"val is missing: imagefolder expects [^ ]*/val/CLASS/\*$"):
        data.build_dataset("imagefolder", tmp_path / "a", "val", 32)
    (tmp_path / "a" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="val has no class folders"):
        data.build_dataset("imagefolder", tmp_path / "a", "val", 32)

    root = make_folder(tmp_path / "b", classes=("cat", "dog"), val_classes=("cat", "emu"))
    with pytest.raises(ValueError, match="only in train: dog; only in val: emu"):
        data.build_dataset("imagefolder", root, "train", 32)
    assert data.build_dataset("imagefolder", root, "val", 32).classes == ["cat", "emu"]   # eval.py reads val alone

    root = make_folder(tmp_path / "c")
    for path in (root / "train" / "dog").iterdir():
        path.unlink()
    (root / "train" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="dog has no image files"):
        data.build_dataset("imagefolder", root, "train", 32)


def test_16_bit_greys_are_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG opens as mode I;16 (older Pillows: I), which convert("RGB") clips: mid-grey came out
    white. It is scaled to 8 bits instead, as are 32-bit int and float images (data.to_rgb)."""
    root = make_folder(tmp_path / "root")
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(root / "val" / "cat" / "grey16.png")
    gradient = np.tile(np.linspace(0, 65535, 40).round().astype(np.uint16), (24, 1))    # 0 .. 65535 across
    Image.fromarray(gradient).save(root / "val" / "dog" / "ramp16.png")
    assert Image.open(root / "val" / "cat" / "grey16.png").mode.startswith("I")
    ds = data.build_dataset("imagefolder", root, "val", 32)
    paths = [Path(path).name for path, _ in ds.samples]
    image, label, _ = ds[paths.index("grey16.png")]
    np.testing.assert_allclose(unnormalise(image), 128 / 255, atol=1e-3)            # not 1.0 (white)
    ramp = np.asarray(ds.load(paths.index("ramp16.png"))[0])
    assert ramp.shape == (24, 40, 3) and (ramp == ramp[..., :1]).all()             # grey in 3 channels
    np.testing.assert_array_equal(ramp[0, :, 0], np.rint(gradient[0] / 257))        # 0 .. 255, every step
    assert ramp.mean() == pytest.approx(127.5, abs=1)
    # The 32-bit modes: I in the 16-bit range (as older Pillows open 16-bit PNGs), F in [0, 1] or 0..255
    for values, expected in [(np.full((4, 4), 32768, np.int32), 128), (np.full((4, 4), 0.5, np.float32), 128),
                             (np.full((4, 4), 100.0, np.float32), 100), (np.full((4, 4), 2**30, np.int32), 128)]:
        rgb = data.to_rgb(Image.fromarray(values))
        assert rgb.mode == "RGB" and (np.asarray(rgb) == expected).all(), (values.dtype, values[0, 0])
    # 8-bit images are untouched
    eight = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    np.testing.assert_array_equal(np.asarray(data.to_rgb(eight)), np.asarray(eight.convert("RGB")))


@pytest.mark.skipif(not TINY_IMAGENET.is_dir(), reason="shared tiny-imagenet-20 not present")
def test_tiny_imagenet_20_loads():
    train = data.build_dataset("imagefolder", TINY_IMAGENET, "train", 64, train_aug=data.AugConfig())
    val = data.build_dataset("imagefolder", TINY_IMAGENET, "val", 64)
    assert len(train.classes) == 20 and train.classes == val.classes
    assert len(train) == 10000 and len(val) == 1000
    image, label, skipped = val[999]
    assert image.shape == (3, 64, 64) and label == 19 and skipped == 0
    assert train[0][0].shape == (3, 64, 64)


# ----------------------------------------------------------------------------------------------------- CIFAR

def test_cifar_missing_says_where_and_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*--download"):
        data.build_dataset("cifar10", tmp_path, "train", 32)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        data.build_dataset("cifar100", tmp_path, "val", 32)


# -------------------------------------------------------------------------------------- seeded augmentation

def test_augmentation_is_seeded_per_item_and_epoch(tmp_path):
    root = make_folder(tmp_path / "root")
    aug = data.AugConfig(crop_scale=0.2, auto_augment="randaug", erase=0.5)
    ds = data.build_dataset("imagefolder", root, "train", 24, train_aug=aug, seed=3)
    rng_before = torch.get_rng_state()
    first = ds[2][0]
    ds[0], ds[4], ds[1]
    assert torch.equal(first, ds[2][0])
    assert torch.equal(rng_before, torch.get_rng_state())  # loading never moves the global RNG
    ds.set_epoch(1)
    assert not torch.equal(first, ds[2][0])
    ds.set_epoch(0)
    assert torch.equal(first, ds[2][0])
    trivial = data.build_dataset("imagefolder", root, "train", 24, train_aug=data.AugConfig(auto_augment="trivial"))
    assert trivial[0][0].shape == (3, 24, 24)


def test_bad_names_raise_value_error_listing_choices():
    with pytest.raises(ValueError, match="shapes, cifar10, cifar100, imagefolder"):
        data.build_dataset("mnist", None, "train", 32)
    with pytest.raises(ValueError, match="none, randaug, trivial"):
        data.AugConfig(auto_augment="autoaug")
    with pytest.raises(ValueError, match="train, val"):
        data.build_dataset("shapes", None, "test", 32)


# ---------------------------------------------------------------------------------------------------- sampler

def test_sampler_ranks_disjoint_and_cover():
    shards = [list(data.ShardedSampler(10, num_replicas=2, rank=r, seed=1)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(10))
    padded = [list(data.ShardedSampler(11, num_replicas=2, rank=r)) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == 6 and set(padded[0]) | set(padded[1]) == set(range(11))
    assert list(data.ShardedSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    assert len(data.ShardedSampler(11, num_replicas=2, drop_last=True)) == 5


def test_sampler_order_depends_on_seed_and_epoch_only():
    a, b = data.ShardedSampler(100, seed=7), data.ShardedSampler(100, seed=7)
    torch.manual_seed(0)
    order = list(a)
    torch.manual_seed(1)  # the global RNG must not matter
    assert order == list(b)
    a.set_epoch(1)
    assert list(a) != order and sorted(a) == list(range(100))
    assert list(data.ShardedSampler(100, seed=8)) != order


def test_sampler_resume_mid_epoch():
    sampler = data.ShardedSampler(50, num_replicas=2, rank=1, seed=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=10)
    assert len(sampler) == 15 and list(sampler) == full[10:]
    sampler.set_epoch(4)
    assert len(sampler) == 25
    with pytest.raises(ValueError, match="start"):
        sampler.set_epoch(4, start=26)


def test_sampler_repeated_augmentation():
    shards = [list(data.ShardedSampler(12, num_replicas=3, rank=r, repeats=3, seed=5)) for r in range(3)]
    assert all(len(shard) == 4 for shard in shards)  # same steps per epoch as without repeats
    for position in range(4):  # the copies of one index go to different ranks, each as its own copy
        assert [shard[position] for shard in shards] == [(shards[0][position][0], copy) for copy in range(3)]
    assert len({index for index, _ in shards[0]}) == 4


def test_repeated_augmentation_copies_differ(tmp_path):
    """The copies of an image that --repeated-aug hands out are augmented differently (they used to be
    bit-identical: the seed was (seed, epoch, index)); copy 0 keeps the seed of a run without repeats."""
    root = make_folder(tmp_path / "root")
    for path in (root / "train").glob("*/*"):                          # texture, so that crops differ
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path, "PNG")
    ds = data.build_dataset("imagefolder", root, "train", 24, train_aug=data.AugConfig(crop_scale=0.2), seed=3)
    one_process = list(data.ShardedSampler(len(ds), num_replicas=1, repeats=2, seed=5))
    assert one_process[0][0] == one_process[1][0]                      # side by side in one batch
    copies = [ds[item][0] for item in one_process[:2]]
    assert not torch.equal(*copies)
    assert torch.equal(copies[0], ds[one_process[0][0]][0])


# ----------------------------------------------------------------------------------------------------- mixing

def test_batch_mixer():
    assert data.batch_mixer(5) is None
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 4])
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixed, targets = data.batch_mixer(5, mixup=mixup, cutmix=cutmix)(images, labels)
        assert mixed.shape == images.shape and targets.shape == (4, 5)
        assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match=">= 0"):
        data.batch_mixer(5, mixup=-1)
