"""Tests of swin.py: torchvision conformance, RoPE inside windows, the shift mask, shapes, training, interface."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from model import PRESETS, SWIN_POS, CATConfig, build_model, count_flops
from swin import Swin, WindowRoPEAttention


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny, so their many small ops run as fast on one thread, and a second thread only
    stalls them (measured: 0.5 s -> 37 s) whenever another process holds the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(pos="rpb", **changes):
    """A 2-stage Swin for 32 px: grid 8 x 8 (4 windows, shifted blocks shift) then 4 x 4 (one window)."""
    cfg = CATConfig(attn="swin", pos=pos, img_size=32, patch=4, dim=16, heads=2, stages=(2, 2), window=4,
                    mlp_ratio=2.0, num_classes=5, imprint="none")
    return replace(cfg, **changes)


def rope_attention(pos, dim=16, heads=2, window=4, shift=0):
    return WindowRoPEAttention(dim, [window] * 2, [shift] * 2, heads, rotary=pos.removeprefix("rpb+"),
                               rpb=pos.startswith("rpb+"))


# ----------------------------------------------------------------------------------------------
# Conformance with torchvision

@pytest.mark.parametrize("reference, pos, window", [("swin_t", "rpb", 7), ("swin_v2_t", "swinv2", 8)])
def test_swin_t_is_torchvision(reference, pos, window):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, reference)().eval()          # random weights: nothing is downloaded
    with torch.device("meta"):                                         # no time spent initialising ours
        ours = Swin(replace(PRESETS["swin-t"], pos=pos, window=window)).eval()
    ours.load_state_dict(theirs.state_dict(), assign=True)             # strict: same names and shapes
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    images = torch.randn(1, 3, 32, 64)                                 # non-square, padded windows in every stage
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-5, atol=1e-5)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("size", [(10, 7), (8, 8), (3, 2)])
@pytest.mark.parametrize("shift", [0, 2])
def test_rope_attention_at_zero_angles_is_torchvision(size, shift):
    """The written-out window attention (padding, roll, partition, RPB, shift mask) computes torchvision's when
    the RoPE-Mixed frequencies are zero (no rotation)."""
    torch.manual_seed(0)
    theirs = ShiftedWindowAttention(16, [4, 4], [shift] * 2, 2)
    ours = rope_attention("rpb+mixed", shift=shift)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert missing == ["rope.freqs"] and not unexpected
    with torch.no_grad():
        ours.rope.freqs.zero_()
    x = torch.randn(2, *size, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# RoPE inside windows

@pytest.mark.parametrize("pos", ["axial", "mixed"])
def test_rope_scores_are_relative_within_window(pos):
    """One query vector and one key vector placed at two tokens of a window: shifting both tokens by the same
    offset leaves their rotated score unchanged, and the score does depend on the offset."""
    torch.manual_seed(0)
    attn = rope_attention(pos, dim=32, heads=2, window=5)
    q, k = torch.randn(2, 2, 1, 16).expand(-1, -1, 25, -1).unbind(0)  # (1, h, N, d), the same at all tokens
    rq, rk = attn.rotate(q, k)
    scores = (rq @ rk.transpose(-1, -2)).view(2, 5, 5, 5, 5)          # (h, row_q, col_q, row_k, col_k)
    for dr, dc in [(1, 0), (0, 2), (1, 1), (2, 3)]:
        torch.testing.assert_close(scores[:, dr:, dc:, dr:, dc:], scores[:, :5 - dr, :5 - dc, :5 - dr, :5 - dc],
                                   rtol=1e-4, atol=1e-5)
    assert (scores[:, 0, 0, 0, 0] - scores[:, 0, 0, 1, 2]).abs().min() > 1e-3


@pytest.mark.parametrize("pos", ["axial", "mixed", "rpb+mixed"])
def test_every_window_is_treated_alike(pos):
    """In an unshifted block, moving the input by one whole window moves the output the same way: all windows
    share one table of window-local angles (and one RPB). Grid coordinates would pass too, RoPE being relative;
    anything absolute across windows would not."""
    torch.manual_seed(0)
    attn = rope_attention(pos)
    x = torch.randn(1, 8, 12, 16)
    moved = torch.roll(x, 4, 2)
    torch.testing.assert_close(attn(moved), torch.roll(attn(x), 4, 2), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The shifted-window mask

@pytest.mark.parametrize("make", [
    lambda: ShiftedWindowAttention(16, [4, 4], [2, 2], 2),
    lambda: ShiftedWindowAttentionV2(16, [4, 4], [2, 2], 2),
    lambda: rope_attention("axial", shift=2),
    lambda: rope_attention("rpb+mixed", shift=2),
], ids=["rpb", "swinv2", "axial", "rpb+mixed"])
def test_shift_mask_stops_attention_across_the_wraparound(make):
    """Rolling 8 x 8 by -2 puts tokens (0, 0) and (7, 7) into one window, neighbours only through the roll:
    (0, 0)'s output must not depend on (7, 7), (7, 0) or (0, 7), but does on (1, 1)."""
    torch.manual_seed(0)
    attn = make()
    x = torch.randn(1, 8, 8, 16, requires_grad=True)
    attn(x)[0, 0, 0].sum().backward()
    influence = x.grad[0].abs().sum(-1)                                # (8, 8)
    # torchvision masks with -100 rather than -inf: a weight of e^-100 ~ 4e-44 remains, which counts as none.
    assert max(influence[7, 7], influence[7, 0], influence[0, 7]) < 1e-30 * influence[1, 1]


# ----------------------------------------------------------------------------------------------
# The model

@pytest.mark.parametrize("pos", SWIN_POS)
def test_output_shapes_at_any_size(pos):
    torch.manual_seed(0)
    model = Swin(tiny(pos)).eval()
    for size, grid in [((32, 32), (4, 4)), ((64, 64), (8, 8)), ((32, 48), (4, 6)), ((36, 28), (5, 4))]:
        images = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert model(images).shape == (2, 5)
            assert model.forward_features(images).shape == (2, *grid, 32)


@pytest.mark.parametrize("pos", SWIN_POS)
def test_gradients_reach_every_parameter(pos):
    torch.manual_seed(0)
    model = Swin(tiny(pos))
    (model(torch.randn(2, 3, 32, 32)) * torch.randn(2, 5)).sum().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


@pytest.mark.parametrize("pos", ["rpb", "mixed"])
def test_tiny_training_run_learns(pos):
    """Which quadrant holds the bright square: 32 fixed images, 4 classes, 40 Adam steps."""
    torch.manual_seed(0)
    labels = torch.arange(32) % 4
    images = torch.randn(32, 3, 32, 32) * 0.3
    for i, label in enumerate(labels.tolist()):
        r, c = 16 * (label // 2) + 4, 16 * (label % 2) + 4
        images[i, :, r:r + 8, c:c + 8] += 2.0
    model = Swin(tiny(pos, num_classes=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_feature_api():
    torch.manual_seed(0)
    model = Swin(tiny("rpb+axial", stages=(2, 2, 2))).eval()
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        features = model.forward_features(images)                      # (2, 4, 3, 64)
        torch.testing.assert_close(model(images), model.forward_head(features))
        assert model.forward_head(features, pre_logits=True).shape == (2, 64)
        maps = model.forward_intermediates(images)
        assert [m.shape for m in maps] == [(2, 16, 16, 12), (2, 32, 8, 6), (2, 64, 4, 3)]
        torch.testing.assert_close(model.norm(maps[-1].permute(0, 2, 3, 1)), features, rtol=0, atol=0)
        # CAT's arguments: norm, an int for the last n, and the order of `indices`
        last, = model.forward_intermediates(images, indices=[-1], output_fmt="NHWC", norm=True)
        torch.testing.assert_close(last, features, rtol=0, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(images, 2), maps[1:]))
        picked = model.forward_intermediates(images, [2, 0], norm=True)
        assert torch.equal(picked[1], maps[0]) and torch.equal(picked[0].permute(0, 2, 3, 1), features)
    for bad in ([3], 0, 4, [], [True]):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(images, indices=bad)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(images, output_fmt="NDHWC")

    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reset_classifier(7)
    after = model.state_dict()
    assert model(images).shape == (2, 7) and model.config.num_classes == 7
    assert after["head.weight"].shape == (7, 64)
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith("head."))


@pytest.mark.parametrize("pos", ["rpb+mixed", "swinv2"])
def test_param_groups(pos):
    model = Swin(tiny(pos))
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert ids(decay) | ids(no_decay) == set(names) and not ids(decay) & ids(no_decay)
    kept = sorted(names[i] for i in ids(no_decay))
    decayed = sorted(names[i] for i in ids(decay))
    positional = ("rope.freqs", "relative_position_bias_table") if pos != "swinv2" else ("logit_scale", "cpb_mlp")
    assert all(any(key in name for name in kept) for key in positional)
    assert not any(key in name for name in decayed for key in positional)
    assert all(name.endswith(".weight") and ("norm" not in name) for name in decayed)
    assert "features.0.0.weight" in decayed and "head.weight" in decayed  # patch conv kernel, head matrix
    assert any(name.endswith("attn.qkv.weight") for name in decayed)
    assert any(name.endswith("reduction.weight") for name in decayed)


def test_config_checks_and_input_checks():
    with pytest.raises(ValueError, match="pool"):
        Swin(tiny(pool="cls"))
    with pytest.raises(ValueError, match="attn='swin'"):
        Swin(PRESETS["cat-tiny"])
    with pytest.raises(ValueError, match="stages"):
        Swin(tiny(stages=(1,)))
    model = Swin(tiny())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="divisible by the patch"):
        model(torch.randn(1, 3, 30, 32))


def test_presets_and_flops_on_meta():
    """build_model picks Swin; count_flops runs it on the meta device for every pos; swin-tiny sits near the
    tiny CAT / ViT sizes."""
    assert isinstance(build_model(tiny()), Swin)
    flops = {pos: count_flops(replace(PRESETS["swin-tiny"], pos=pos), 64) for pos in SWIN_POS}
    assert all(0.15e9 < f < 0.2e9 for f in flops.values()), flops
    assert count_flops(PRESETS["swin-tiny"], 96, 128) > flops["rpb"]
    with torch.device("meta"):
        params = Swin(PRESETS["swin-tiny"]).num_params()
    assert 1.38e6 < params < 2.71e6


@pytest.mark.parametrize("pos", ["rpb+mixed", "axial"])
def test_bf16_autocast(pos):
    torch.manual_seed(0)
    model = Swin(tiny(pos)).eval()
    images = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        exact = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), exact, rtol=0.1, atol=0.1)


def test_gradient_checkpointing_gives_the_same_gradients():
    """--grad-checkpoint recomputes each Swin block in the backward pass: the same gradients (stochastic depth and
    dropout draw the same masks twice), and fewer tensors kept."""
    from test_backbone import assert_checkpointing_changes_memory_not_gradients, saved_tensors
    torch.manual_seed(0)
    plain = Swin(tiny("rpb+mixed", dropout=0.1, drop_path=0.3)).train()
    checkpointed = Swin(tiny("rpb+mixed", dropout=0.1, drop_path=0.3, grad_checkpoint=True)).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    assert_checkpointing_changes_memory_not_gradients(plain, checkpointed, images, labels)
    assert saved_tensors(checkpointed.eval(), images) == saved_tensors(plain.eval(), images)
