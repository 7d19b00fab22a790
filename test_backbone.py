"""CAT as a backbone (issue 14): the feature API, reset_classifier, activation checkpointing, torch.export,
fine-tuning from a checkpoint (train.py --init-from)."""
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import train
from checkpoint import CHECKPOINT_FORMAT, fine_tuning_weights, load_checkpoint, save_checkpoint
from model import CAT, PRESETS, CATConfig, build_model

FAMILIES = ("cross_axis", "softmax", "performer")
POOLS = ("mean", "corner", "cls")


def small(**overrides):
    """As in test_model.py: 32 px, patch 8, a 4 x 4 grid, dim 32, depth 2, head dim 16."""
    base = dict(img_size=32, patch=8, dim=32, depth=2, heads=2, num_classes=5, performer_features=24)
    return CATConfig(**{**base, **overrides})


def shrunk(preset, **overrides):
    """A preset's choices (attention, positions, axis, imprint, pool, MLP ratio) at small()'s size."""
    return replace(PRESETS[preset], img_size=32, patch=8, dim=32, depth=2, heads=2, num_classes=5,
                   performer_features=24, **overrides)


# ---------------------------------------------------------------------------------------------- feature API

@pytest.mark.parametrize("attn", FAMILIES)
def test_feature_shapes_at_any_resolution(attn):
    model = CAT(small(attn=attn)).eval()
    for R, R2 in [(32, 32), (48, 48), (32, 56)]:            # training grid, a larger one, a non-square one
        images = torch.randn(2, 3, R, R2)
        H, W = R // 8, R2 // 8
        assert model.forward_features(images).shape == (2, H, W, 32)
        maps = model.forward_intermediates(images)
        assert [m.shape for m in maps] == [(2, 32, H, W)] * 2
        assert [m.shape for m in model.forward_intermediates(images, output_fmt="NHWC")] == [(2, H, W, 32)] * 2


@pytest.mark.parametrize("attn", FAMILIES)
@pytest.mark.parametrize("pool", POOLS)
def test_forward_is_head_of_features(attn, pool):
    torch.manual_seed(0)
    model = CAT(small(attn=attn, pool=pool)).eval()
    images = torch.randn(2, 3, 40, 24)
    features = model.forward_features(images)
    # Every token comes back; with pool='cls' that includes the class-token column, last
    assert features.shape == (2, 5, 3 + (pool == "cls"), 32)
    logits = model(images)
    assert torch.equal(logits, model.forward_head(features))
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, 32)
    assert torch.equal(model.head(pooled), logits)


@pytest.mark.parametrize("pool", ("mean", "cls"))
def test_last_intermediate_with_norm_is_the_patch_grid_of_the_features(pool):
    model = CAT(small(pool=pool)).eval()
    images = torch.randn(2, 3, 32, 48)
    grid = model.forward_intermediates(images, [-1], "NHWC", norm=True)[0]
    torch.testing.assert_close(grid, model.forward_features(images)[:, :, :6], rtol=0, atol=0)


@pytest.mark.parametrize("attn", FAMILIES)
@pytest.mark.parametrize("pool", ("mean", "cls"))
def test_intermediates_match_hooks_on_the_blocks(attn, pool):
    torch.manual_seed(0)
    model = CAT(small(attn=attn, pool=pool, depth=3)).eval()
    images = torch.randn(2, 3, 32, 40)
    seen = []
    hooks = [block.register_forward_hook(lambda module, args, out: seen.append(out)) for block in model.blocks]
    model(images)
    # (B, H, W(+1), D) as the blocks see them -> the patch grid (B, D, H, W)
    expected = [out[:, :, :5].permute(0, 3, 1, 2) for out in seen]
    seen.clear()
    maps = model.forward_intermediates(images)
    assert len(seen) == 3 and len(maps) == 3
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    normed = model.forward_intermediates(images, [0, 2], norm=True)
    torch.testing.assert_close(normed[1], model.norm(expected[2].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    # Only the blocks up to the deepest one asked for run
    seen.clear()
    model.forward_intermediates(images, [0])
    assert len(seen) == 1
    for hook in hooks:
        hook.remove()


def test_intermediate_indices():
    model = CAT(small(depth=4)).eval()
    images = torch.randn(1, 3, 32, 32)
    every = model.forward_intermediates(images)
    pick = lambda indices: model.forward_intermediates(images, indices)
    assert all(torch.equal(a, b) for a, b in zip(pick(2), every[2:]))             # int n: the last n blocks
    assert all(torch.equal(a, b) for a, b in zip(pick([-1, 0]), [every[3], every[0]]))   # in the order asked
    assert all(torch.equal(a, b) for a, b in zip(pick((1,)), [every[1]]))
    for bad in (0, 5, -1, [4], [-5], [], [1.0], [True], "1", {1}):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(images, bad)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(images, output_fmt="NCWH")


def test_every_entry_point_checks_images_the_same_way():
    model = CAT(small())
    entry_points = (model, model.forward_features, model.forward_intermediates)
    for call in entry_points:
        with pytest.raises(ValueError, match="not divisible by the patch size 8"):
            call(torch.randn(1, 3, 36, 32))
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            call(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="forward_features"):
        model.forward_head(torch.randn(2, 4, 4, 16))


def test_reset_classifier_changes_only_the_head():
    config = small(pool="cls")
    model = CAT(config).to(torch.float64)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    model.reset_classifier(7)
    after = model.state_dict()
    assert set(after) == set(before)
    for name in before:
        if not name.startswith("head."):
            assert torch.equal(after[name], before[name]), name
    assert after["head.weight"].shape == (7, 32) and after["head.bias"].shape == (7,)
    assert after["head.weight"].dtype == torch.float64                     # the old head's dtype (and device)
    assert model.float()(torch.randn(2, 3, 32, 48)).shape == (2, 7)
    assert model.config.num_classes == 7 and config.num_classes == 5      # the config it was built from is kept
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(0)


# ---------------------------------------------------------------------------------------------- checkpointing

def gradients(model, images, labels, seed):
    torch.manual_seed(seed)                                  # the same dropout / drop_path masks for each model
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def saved_tensors(model, images):
    """How many tensors autograd keeps for the backward pass."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images)
    return count


def assert_checkpointing_changes_memory_not_gradients(plain, checkpointed, images, labels):
    """The same weights, the same random masks: the same gradients, with fewer tensors kept. -> the gradients."""
    checkpointed.load_state_dict(plain.state_dict())
    expected = gradients(plain, images, labels, seed=1)
    got = gradients(checkpointed, images, labels, seed=1)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert saved_tensors(checkpointed, images) < saved_tensors(plain, images) / 2
    return expected


@pytest.mark.parametrize("attn,pool", [("cross_axis", "cls"), ("softmax", "mean"), ("performer", "corner")])
def test_gradient_checkpointing_gives_the_same_gradients(attn, pool):
    options = dict(attn=attn, pool=pool, pos="ape+mixed", dropout=0.1, drop_path=0.3)
    torch.manual_seed(0)
    plain = CAT(small(**options)).train()
    checkpointed = CAT(small(**options, grad_checkpoint=True)).train()
    images, labels = torch.randn(4, 3, 32, 40), torch.tensor([0, 1, 2, 3])
    expected = assert_checkpointing_changes_memory_not_gradients(plain, checkpointed, images, labels)
    # the masks were really random (another seed, other gradients)
    other = gradients(plain, images, labels, seed=2)
    assert not torch.allclose(other["patch_embed.weight"], expected["patch_embed.weight"])


@pytest.mark.parametrize("attn", ("softmax", "performer"))
def test_the_class_token_stays_one_token_under_dropout(attn):
    """Softmax and Performer attention read the class token once (row 0's copy of the class-token column) and
    the head averages every copy: under dropout the copies must stay one token, not drift apart."""
    torch.manual_seed(0)
    model = CAT(small(attn=attn, pool="cls", depth=3, dropout=0.5)).train()
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append(out[:, :, -1]))   # (B, H, D)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for column in seen:
        assert torch.equal(column, column[:, :1].expand_as(column))
    assert model.cls_token.grad.abs().sum() > 0


def test_gradient_checkpointing_only_while_training_with_grad():
    model = CAT(small(grad_checkpoint=True)).eval()
    images = torch.randn(2, 3, 32, 32)
    assert saved_tensors(model, images) == saved_tensors(CAT(small()).eval(), images)


# ---------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("config", [
    shrunk("cat-paper"),                                     # pos 'cat', alternate axis, constant imprint
    shrunk("vit-paper"),                                     # softmax + 'ape'
    small(pos="axial", pool="cls"),
    small(attn="performer", pos="ape+mixed"),
], ids=["cat-paper", "vit-paper", "axial-cls", "performer-mixed"])
def test_export_round_trip(config):
    """torch.export traces the real-form rotation (no complex numbers), at the shape it was exported with."""
    torch.manual_seed(0)
    model = CAT(config).eval()
    images = torch.randn(2, 3, 32, 40)
    program = torch.export.export(model, (images,))
    other = torch.randn(2, 3, 32, 40)
    torch.testing.assert_close(program.module()(other), model(other), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("pos", ["mixed", "scaled"])
def test_export_with_dynamic_image_size(pos):
    """Batch, height and width stay symbolic with the in-graph rotaries (axial, mixed, scaled: cat-tiny's) or no
    positions. ('cat' and 'ape' pin the grid size for now: torch.linspace in rope2d.cat_coords and
    AbsolutePosition's size check.) form='auto' keeps the cross-axis product order of the export shape, checked
    at run time: valid up to a grid of LINEAR_ABOVE * head dim (22 here), so the Dims stop at 16."""
    torch.manual_seed(0)
    model = CAT(small(pos=pos, pool="cls")).eval()
    rows, cols = Dim("rows", min=2, max=16), Dim("cols", min=2, max=16)    # grid sizes; images are 8x that
    shapes = {"images": {0: Dim("batch", min=1, max=8), 2: 8 * rows, 3: 8 * cols}}
    program = torch.export.export(model, (torch.randn(2, 3, 32, 40),), dynamic_shapes=shapes)
    for size in [(3, 32, 40), (1, 48, 24), (2, 64, 64)]:
        images = torch.randn(size[0], 3, *size[1:])
        torch.testing.assert_close(program.module()(images), model(images), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- fine-tuning

TINY_RUN = ["--dim", "32", "--depth", "2", "--heads", "2", "--workers", "0", "--log-every", "1"]


def colour_folder(root, classes=("red", "blue"), per_class=(24, 8)):
    """root/{train,val}/CLASS/*.png: noisy images whose mean colour gives the class."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (40, 40, 3))
                pixels[..., 0 if c == 0 else 2] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_init_from_fine_tunes_on_new_classes_at_a_new_resolution(tmp_path):
    """A run on shapes (8 classes, 32 px), then a fine-tune from its weights on a folder with 2 classes at 48 px:
    a new head, the position table resized, a fresh schedule; and it learns."""
    source = tmp_path / "shapes"
    assert train.main([*TINY_RUN, "--res", "32", "--pos", "ape+mixed", "--shapes-size", "256", "--batch-size", "32",
                       "--max-steps", "4", "--out-dir", str(source)]) == 0
    weights = load_checkpoint(str(source / "ckpt.pt"))["model"]
    tuned = tmp_path / "tuned"
    assert train.main([*TINY_RUN, "--res", "48", "--pos", "ape+mixed", "--data", "imagefolder", "--data-dir",
                       str(colour_folder(tmp_path / "colours")), "--batch-size", "8", "--lr", "3e-3", "--epochs", "4",
                       "--init-from", str(source / "ckpt.pt"), "--out-dir", str(tuned)]) == 0
    with open(tuned / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert records[0]["step"] == 0                                                   # a fresh schedule
    assert json.loads((tuned / "run.json").read_text())["config"]["num_classes"] == 2   # a new head
    assert records[-1]["val_top1"] == 100.0                                          # chance: 50%
    first = load_checkpoint(str(tuned / "ckpt.pt"))
    assert first["model"]["ape.table"].shape == (1, 32, 6, 6) and weights["ape.table"].shape == (1, 32, 4, 4)


def test_init_from_refuses_another_model_in_one_line(tmp_path, capsys):
    source = tmp_path / "source"
    assert train.main([*TINY_RUN, "--res", "32", "--shapes-size", "64", "--batch-size", "32", "--max-steps", "1",
                       "--out-dir", str(source)]) == 0
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY_RUN, "--res", "32", "--dim", "64", "--shapes-size", "64", "--max-steps", "1",
                    "--init-from", str(source / "ckpt.pt"), "--out-dir", str(tmp_path / "other")])
    assert exit_info.value.code == 2
    error, hint = capsys.readouterr().err.strip().splitlines()[-2:]
    assert "--dim 64 (was 32): the model comes from the checkpoint (--init-from)" in error
    assert hint == "(python train.py --help lists every flag)"


@pytest.mark.slow
def test_init_from_takes_the_model_from_the_checkpoint_and_says_what_it_loaded(tmp_path, capsys):
    """No architecture flags retyped; the head is kept only for the same class names (--new-head: never)."""
    source = tmp_path / "source"
    assert train.main([*TINY_RUN, "--res", "32", "--shapes-size", "64", "--batch-size", "32", "--max-steps", "2",
                       "--ema", "0.5", "--out-dir", str(source)]) == 0
    head = load_checkpoint(str(source / "ckpt.pt"))["ema"]["module.head.weight"]
    for extra, kept in (([], True), (["--new-head"], False)):
        out = tmp_path / f"tuned{len(extra)}"
        capsys.readouterr()
        assert train.main(["--init-from", str(source / "ckpt.pt"), "--shapes-size", "64", "--batch-size", "32",
                           "--max-steps", "1", "--lr", "0", "--workers", "0", "--out-dir", str(out), *extra]) == 0
        said = capsys.readouterr().out
        assert "EMA weights of step 2, 32px -> 32px" in said
        assert ("head kept (the same 8 classes)" if kept else "new head (--new-head)") in said
        tuned = load_checkpoint(str(out / "ckpt.pt"))
        assert tuned["config"]["dim"] == 32 and tuned["args"]["model"] == "cat-tiny"
        assert torch.equal(tuned["model"]["head.weight"], head) == kept


def test_resnet18_is_torchvisions_with_the_training_interface():
    """The ConvNet reference is torchvision's resnet18, not a copy: same modules, same logits from the same
    weights; it trains through train.py like any preset."""
    import torchvision
    torch.manual_seed(0)
    model = build_model(replace(PRESETS["resnet18"], num_classes=10)).eval()
    reference = torchvision.models.resnet18(num_classes=10).eval()
    reference.load_state_dict(model.state_dict())                           # strict: the same modules
    images = torch.randn(2, 3, 64, 96)
    torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
    decay, no_decay = model.param_groups(0.05)
    assert len(decay["params"]) == 21 and all(p.dim() == 1 for p in no_decay["params"])   # 20 convs + the head
    with pytest.raises(ValueError, match="pos='none'"):
        replace(PRESETS["resnet18"], pos="cat")
    # Activation checkpointing would update the BatchNorm statistics twice: refused rather than ignored
    with pytest.raises(ValueError, match="grad_checkpoint is not offered for resnet18"):
        replace(PRESETS["resnet18"], grad_checkpoint=True)


def test_resnet18_fine_tunes_to_new_classes(tmp_path):
    """--init-from on resnet18: every weight but the head (torchvision's `fc`) comes from the checkpoint."""
    source = build_model(replace(PRESETS["resnet18"], num_classes=10))
    save_checkpoint({"format": CHECKPOINT_FORMAT, "config": asdict(source.config),
                           "model": source.state_dict()}, str(tmp_path / "c.pt"))
    target = build_model(replace(PRESETS["resnet18"], num_classes=3))
    path = str(tmp_path / "c.pt")
    weights, note = fine_tuning_weights(load_checkpoint(path), path, target, ["a", "b", "c"])
    target.load_state_dict(weights)
    assert "new head" in note
    torch.testing.assert_close(target.conv1.weight, source.conv1.weight)
    assert target.fc.weight.shape == (3, 512)
    target.reset_classifier(7)
    assert target(torch.randn(1, 3, 64, 64)).shape == (1, 7) and target.config.num_classes == 7
    assert PRESETS["resnet18"].num_classes == 1000                  # the preset is not touched
    # The new head keeps the model's dtype: a bf16 model still runs after it
    target.to(torch.bfloat16).reset_classifier(4)
    assert target.fc.weight.dtype == torch.bfloat16
    assert target(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).shape == (1, 4)
