"""torch.compile sees each model's forward as one graph, with no graph break: for every preset and every positional
scheme. A break would split a compiled training step in two and run the Python between the pieces on every step.
torch._dynamo.explain traces the forward without compiling it (no inductor), so this costs seconds; graph breaks do
not depend on the device. What inductor then leaves to eager kernels inside the graph: docs/benchmarks.md."""
from dataclasses import replace

import pytest
import torch
import torch._dynamo

import rope2d
from model import PRESETS, SWIN_POS, build_model


def tiny(name, **overrides):
    """A preset's choices at a size that traces and runs in a blink: 32 px, width 32 (Swin 16), two blocks (Swin: a
    stage of two, the second with shifted windows, and one of one after the patch merging)."""
    config = PRESETS[name]
    size = {"img_size": 32, "num_classes": 4}
    if config.attn == "swin":
        size.update(patch=4, dim=16, heads=2, stages=(2, 1), window=4)
    elif config.attn != "resnet18":
        size.update(patch=8, dim=32, depth=2, heads=2, performer_features=8)
    return replace(config, **{**size, **overrides})


def one_block(name):
    """Overrides that trace every module of a preset's family in the fewest blocks: one (Swin: one stage of two, the
    second with shifted windows; ResNet-18 is what it is)."""
    attn = PRESETS[name].attn
    return {"stages": (2,)} if attn == "swin" else {} if attn == "resnet18" else {"depth": 1}


# Every preset with its own positional scheme (cat-tiny and swin-tiny at tiny()'s size: both axes of `alternate`,
# and Swin's patch merging; the others in one block). Then every other scheme in one block of cat-tiny (the ViT-style
# families share the rotary code) or one stage of swin-tiny, the rotaries traced inside their sums with `ape` or
# `rpb` (ape+axial traces axial's code, and ape's); the class token; gradient checkpointing. 16 s on 2 CPU cores.
CASES = [*((name, {} if name in ("cat-tiny", "swin-tiny") else one_block(name)) for name in PRESETS),
         *(("cat-tiny", {"pos": pos, "depth": 1}) for pos in ("none", "ape+cat", "ape+axial", "ape+mixed")),
         *(("swin-tiny", {"pos": pos, "stages": (2,)}) for pos in ("rpb+axial", "rpb+mixed", "swinv2")),
         ("cat-tiny", {"pool": "cls", "depth": 1}), ("cat-tiny", {"grad_checkpoint": True, "depth": 1})]


def test_every_positional_scheme_is_traced():
    """Each scheme of rope2d and of Swin is in CASES, alone or inside a sum (ape+axial, rpb+mixed)."""
    traced = {overrides.get("pos", PRESETS[name].pos) for name, overrides in CASES}
    assert {*rope2d.SCHEMES, *SWIN_POS} <= traced | {part for pos in traced for part in pos.split("+")}


def graphs(model, images):
    explained = torch._dynamo.explain(model)(images)
    return explained.graph_count, explained.graph_break_count, [str(r.reason) for r in explained.break_reasons]


@pytest.mark.parametrize("name,overrides", CASES, ids=[name + "".join(f"/{k}={v}" for k, v in o.items() if k not in
                                                                       ("depth", "stages")) for name, o in CASES])
def test_training_forward_is_one_graph(name, overrides):
    """In training mode with gradients, as train.py compiles it (the learned rotations go through rope2d.Rotation)."""
    torch.manual_seed(0)
    config = tiny(name, **overrides)
    model = build_model(config).train()
    assert graphs(model, torch.randn(2, 3, config.img_size, config.img_size)) == (1, 0, [])


def test_inference_forward_is_one_graph():
    """Under no_grad, as bench.py compiles the forward it times (the learned rotation takes the real form there)."""
    model = build_model(tiny("cat-tiny", depth=1)).eval()
    with torch.no_grad():
        assert graphs(model, torch.randn(2, 3, 32, 32)) == (1, 0, [])
