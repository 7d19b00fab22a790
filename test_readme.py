"""The README's Python snippets run as pasted: each ```python block, in a fresh namespace, in a folder that holds
the files it opens (a tiny checkpoint made here, a photo), so the README cannot drift from the code. No block is
skipped: a new block that opens another file needs its entry in FILES."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train

README = Path(__file__).parent / "README.md"


def python_blocks():
    """[(first line number, source)] of the README's ```python blocks."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M)]


def tiny_checkpoint(folder):
    """runs/imagenette/best.pt, as the README's inference snippet expects: a 2-step cat-tiny run on shapes at
    32 px with EMA weights (so the snippet's EMA branch runs)."""
    assert train.main(["--dim", "32", "--depth", "2", "--heads", "2", "--res", "32", "--shapes-size", "64",
                       "--batch-size", "32", "--workers", "0", "--max-steps", "2", "--ema", "0.5",
                       "--out-dir", str(folder / "runs" / "imagenette")]) == 0


def photo(folder):
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "photo.jpg")


FILES = {"runs/imagenette/best.pt": tiny_checkpoint, "photo.jpg": photo}   # what a block opens: how to make it

BLOCKS = python_blocks()


def check_model_block(namespace, printed):
    assert namespace["logits"].shape == (2, 1000)
    assert round(namespace["model"].num_params() / 1e6, 1) == 32.7                # "32.7M parameters"
    assert namespace["mine"].config.num_classes == 10


def check_inference_block(namespace, printed):
    lines = printed.strip().splitlines()[-3:]
    assert len(lines) == 3 and all(re.fullmatch(r".+: \d+\.\d%", line) for line in lines)


def check_backbone_block(namespace, printed):
    assert namespace["grid"].shape == (2, 12, 16, 192)                               # as its comments say
    assert [m.shape for m in namespace["maps"]] == [(2, 192, 12, 16)] * 3
    assert namespace["logits"].shape == (2, 8)                                        # cat-tiny: 8 classes
    assert namespace["model"](namespace["images"]).shape == (2, 21)                   # after reset_classifier(21)


# What each block is checked for beyond running, keyed by a string only that block holds.
CHECKS = {'PRESETS["cat-paper"]': check_model_block, "photo.jpg": check_inference_block,
          "forward_intermediates": check_backbone_block}


def test_the_readme_has_its_blocks_and_each_is_checked():
    assert len(BLOCKS) >= 3
    for line, source in BLOCKS:
        assert sum(key in source for key in CHECKS) == 1, f"README.md:{line} must match exactly one CHECKS key"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for every block, each file in FILES made once, when a block first asks for it."""
    folder, made = tmp_path_factory.mktemp("readme"), set()

    def needing(source):
        for name, make in FILES.items():
            if name in source and name not in made:
                make(folder)
                made.add(name)
        return folder
    return needing


@pytest.mark.parametrize("line, source", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_python_block_runs_as_pasted(line, source, workdir, monkeypatch, capsys):
    torch.manual_seed(0)
    monkeypatch.chdir(workdir(source))
    capsys.readouterr()
    namespace = {"__name__": "__main__"}                 # nothing imported: a block brings its own imports
    exec(compile(source, f"README.md:{line}", "exec"), namespace)
    for key, check in CHECKS.items():
        if key in source:
            check(namespace, capsys.readouterr().out)
