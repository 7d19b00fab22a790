"""Model behaviour : shapes, exact equalities, positional properties, configs."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import rope2d
from model import (ATTENTION, CAT, CHOICES, PRESETS, SWIN_POS, CATConfig, CrossAxisAttention, PerformerAttention,
                   SoftmaxAttention, config_from_dict, count_flops, cross_axis_attention, imprint_alpha)


def small(**overrides):
    """A model small enough to run dozens of times in a test: 32 px, patch 8, 4 x 4 grid, head dim 16."""
    base = dict(img_size=32, patch=8, dim=32, depth=2, heads=2, num_classes=5, performer_features=24)
    return CATConfig(**{**base, **overrides})


def shuffle_rows(images, patch, order):
    """Permute whole patch rows of a batch of images."""
    B, C, R, W = images.shape
    return images.view(B, C, R // patch, patch, W)[:, :, order].reshape(B, C, R, W)


# ---------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("attn", list(ATTENTION))
@pytest.mark.parametrize("pos", rope2d.SCHEMES)
def test_output_shape_every_attention_and_position(attn, pos):
    torch.manual_seed(0)
    model = CAT(small(attn=attn, pos=pos))
    for size in [(32, 32), (48, 48), (32, 56)]:        # training grid, a larger one, a non-square one
        logits = model(torch.randn(2, 3, *size))
        assert logits.shape == (2, 5)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("attn", list(ATTENTION))
@pytest.mark.parametrize("pool", CHOICES["pool"])
def test_every_pooling(attn, pool):
    model = CAT(small(attn=attn, pool=pool))
    assert model(torch.randn(2, 3, 40, 24)).shape == (2, 5)


def test_images_not_divisible_by_patch_fail_clearly():
    model = CAT(small())
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        model(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 32, 32))


# ---------------------------------------------------------------------------------------------- cross-axis

def test_quadratic_and_linear_forms_agree():
    torch.manual_seed(0)
    for H, W, d in [(5, 7, 8), (6, 3, 16), (4, 20, 4)]:
        q, k, v = (torch.randn(2, 3, H, W, d) for _ in range(3))
        quadratic = cross_axis_attention(q, k, v, "quadratic")
        linear = cross_axis_attention(q, k, v, "linear")
        torch.testing.assert_close(linear, quadratic, rtol=1e-4, atol=1e-4 * quadratic.abs().max().item())


def test_quadratic_form_is_the_spec_formula():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, 5, dtype=torch.float64) for _ in range(3))
    scores = torch.einsum("bhijc,bhikc->bhijk", q, k)            # S[i, j, j'] within row i
    vbar = v.sum(2)                                               # Vbar[j'] summed over rows
    expected = torch.einsum("bhijk,bhkc->bhijc", scores, vbar)
    torch.testing.assert_close(cross_axis_attention(q, k, v, "quadratic"), expected)


def counted_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("W,d", [(4, 32), (32, 4), (16, 16), (64, 8)])
def test_auto_picks_the_cheaper_form(W, d):
    """Where the FLOPs differ clearly, auto takes the form with fewer; at W = d (equal FLOPs) the quadratic
    one, which the CPU measurement behind LINEAR_ABOVE found faster there."""
    q, k, v = (torch.randn(1, 1, 6, W, d) for _ in range(3))
    costs = {form: counted_flops(lambda: cross_axis_attention(q, k, v, form)) for form in CHOICES["form"]}
    assert costs["auto"] == min(costs["quadratic"], costs["linear"])
    if W == d:
        assert costs["quadratic"] == costs["linear"]


def test_bad_form_and_mid_norm_with_linear_fail():
    q = torch.randn(1, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="form"):
        cross_axis_attention(q, q, q, "cubic")
    with pytest.raises(ValueError, match="mid_norm"):
        cross_axis_attention(q, q, q, "linear", mid_norm=True)
    with pytest.raises(ValueError, match="mid_norm"):
        small(mid_norm=True, form="linear")


def xy_masked_attention(**overrides):
    torch.manual_seed(0)
    attention = CrossAxisAttention(small(xy_mask=True, pos="none", **overrides), layer=0)
    nn.init.normal_(attention.mask.focus.weight)                     # a focus away from the centre
    return attention


def test_xy_mask_multiplies_the_scores_and_keeps_both_forms_exact():
    """Table 4's learned X/Y mask: scores S[i, j, j'] times exp(-rate |key - focus|_1), as docs/design.md writes it."""
    attention = xy_masked_attention()
    embed = torch.randn(2, 4, 5, 32)
    q, k, v = (torch.randn(2, 2, 4, 5, 16) for _ in range(3))
    fx, fy = torch.tanh(attention.mask.focus(embed.mean((1, 2)))).unbind(-1)
    x, y = torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 4)
    distance = (x.view(1, 1, 5) - fx.view(2, 1, 1)).abs() + (y.view(1, 4, 1) - fy.view(2, 1, 1)).abs()
    weights = torch.exp(-F.softplus(attention.mask.rate).view(1, 2, 1, 1) * distance.unsqueeze(1))   # (B, h, H, W')
    scores = torch.einsum("bhijd,bhikd->bhijk", q, k * attention.gamma) * weights.unsqueeze(3)
    expected = attention.norm(torch.einsum("bhijk,bhkd->bhijd", scores, v.sum(2)))
    for form in ("quadratic", "linear"):
        attention.form = form
        torch.testing.assert_close(attention.attend(q, k, v, False, embed), expected, rtol=1e-4, atol=1e-5)


def test_xy_mask_learns_and_leaves_the_class_token_alone():
    attention = xy_masked_attention(pool="cls")
    embed = torch.randn(2, 4, 6, 32)                                  # the last column: the class token
    weights = attention.mask(embed, cls_column=True)
    assert weights.shape == (2, 2, 4, 6, 1) and (weights[:, :, :, -1] == 1).all() and (weights[:, :, :, :-1] < 1).all()
    model = CAT(small(xy_mask=True))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for block in model.blocks:
        assert block.attn.mask.focus.weight.grad.abs().sum() > 0 and block.attn.mask.rate.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="xy_mask needs attn='cross_axis'"):
        small(xy_mask=True, attn="softmax")


def test_mid_norm_changes_the_output():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, 8) for _ in range(3))
    assert not torch.allclose(cross_axis_attention(q, k, v, mid_norm=True), cross_axis_attention(q, k, v))


def test_group_norm_cancels_gamma():
    torch.manual_seed(0)
    attention = CrossAxisAttention(small(pos="cat"), layer=0)
    assert torch.allclose(attention.gamma.flatten(), 1 - 2.0 ** (-5 - torch.arange(2.0)))
    x = torch.randn(2, 4, 4, 32)
    with_gamma = attention(x)
    attention.gamma.fill_(1.0)
    without_gamma = attention(x)
    torch.testing.assert_close(with_gamma, without_gamma, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the row blindness

@pytest.mark.parametrize("pos", ["cat", "axial", "mixed", "none"])
def test_row_axis_with_true_rotary_cannot_tell_rows_apart(pos):
    """The paper's formulation with a true rotation is equivariant to permuting patch rows (docs/design.md)."""
    torch.manual_seed(0)
    model = CAT(small(pos=pos, axis="row", imprint="none", depth=3)).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
        for order in [torch.tensor([2, 0, 3, 1]), torch.tensor([3, 2, 1, 0])]:   # a shuffle, a vertical flip
            torch.testing.assert_close(model(shuffle_rows(images, 8, order)), logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos,axis", [("cat", "alternate"), ("axial", "alternate"), ("mixed", "alternate"),
                                      ("cat_ref", "row")])
def test_alternate_axis_or_modulation_sees_rows(pos, axis):
    torch.manual_seed(0)
    model = CAT(small(pos=pos, axis=axis, imprint="none", depth=3)).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        change = (model(shuffle_rows(images, 8, torch.tensor([3, 2, 1, 0]))) - model(images)).abs().max()
    assert change > 1e-3


def test_recommended_presets_see_both_axes():
    """cat-paper keeps the paper's rotary; cat-tiny, the preset the README's results rest on, the scaled one."""
    assert [(PRESETS[name].axis, PRESETS[name].pos) for name in ("cat-paper", "cat-tiny")] == [
        ("alternate", "cat"), ("alternate", "scaled")]


# ---------------------------------------------------------------------------------------------- positions

def rotated_score(rotary, q, k, p, r, grid):
    """<R(p) q, R(r) k> for one query at grid position p and one key at position r."""
    H, W = grid
    qs = rotary(q.view(1, -1, 1, 1, q.shape[-1]).expand(1, -1, H, W, -1))
    ks = rotary(k.view(1, -1, 1, 1, k.shape[-1]).expand(1, -1, H, W, -1))
    return (qs[0, :, p[0], p[1]] * ks[0, :, r[0], r[1]]).sum(-1)   # one score per head


@pytest.mark.parametrize("scheme", ["cat", "axial", "mixed", "scaled"])
def test_true_rotations_are_relative(scheme):
    torch.manual_seed(0)
    rotary = rope2d.RotaryPosition(scheme, dim=64, heads=4, grid=7)
    q, k = torch.randn(4, 16), torch.randn(4, 16)
    grid = (7, 7)
    base = rotated_score(rotary, q, k, (1, 2), (3, 0), grid)
    for shift in [(1, 1), (3, 4), (-1, 2)]:
        moved = rotated_score(rotary, q, k, (1 + shift[0], 2 + shift[1]), (3 + shift[0], shift[1]), grid)
        torch.testing.assert_close(moved, base, rtol=1e-5, atol=1e-5)   # fp32 angles
    # and the score does depend on the offset
    assert not torch.allclose(rotated_score(rotary, q, k, (1, 2), (1, 5), grid), base)


@pytest.mark.parametrize("scheme", ["cat", "axial", "mixed", "scaled"])
def test_rotations_keep_norms(scheme):
    x = torch.randn(2, 4, 5, 6, 16)
    rotated = rope2d.RotaryPosition(scheme, dim=64, heads=4, grid=6)(x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


def test_scaled_rotary_interpolates_where_mixed_extrapolates():
    """`scaled` gives a point of the image the same angle at any resolution (patch centres as fractions of the
    image); RoPE-Mixed gives a patch index the same angle, so the same image offset turns twice as far at 2x."""
    torch.manual_seed(0)
    scaled = rope2d.RotaryPosition("scaled", dim=64, heads=4, grid=8).mixed
    mixed = rope2d.RotaryPosition("mixed", dim=64, heads=4).mixed
    y, x = rope2d.image_coords(8, 6)
    y2, x2 = rope2d.image_coords(16, 12)
    torch.testing.assert_close(x, (x2[0::2] + x2[1::2]) / 2)          # a coarse patch: the mean of its 2 halves
    torch.testing.assert_close(y[[0, -1]], torch.tensor([-7, 7]) * math.pi / 8)   # centres, not the edges
    for freqs, same in [(scaled, True), (mixed, False)]:
        fine = freqs(16, 16)                                          # (h, 16, 16, d/2)
        centres = (fine[:, 0::2, 0::2] + fine[:, 1::2, 1::2]) / 2     # angles at the coarse patches' centres
        assert torch.allclose(centres, freqs(8, 8), atol=1e-5) == same


def test_scaled_rotary_spans_every_head_from_one_patch_to_the_whole_image():
    """Unlike `cat`, whose later heads barely turn (docs/design.md), every head of `scaled` gets the whole range:
    1 rad per patch of the training grid at the fastest pair, a quarter turn across the image at the slowest."""
    grid, d = 10, 24
    freqs = rope2d.MixedFrequencies(heads=8, head_dim=d, grid=grid).freqs        # (2, h, d/2)
    magnitude = freqs.norm(dim=0)                                                # (h, d/2)
    step = 2 * math.pi / grid
    torch.testing.assert_close(magnitude[:, 0] * step, torch.ones(8))
    torch.testing.assert_close(magnitude[:, d // 4 - 1] * 2 * math.pi, torch.full((8,), math.pi / 2))
    with pytest.raises(ValueError, match="training grid"):
        rope2d.RotaryPosition("scaled", dim=64, heads=4)


def test_cat_ref_matches_hand_computed_modulation():
    """Released code: frequencies 1, even channels width / odd height, cos -/+ sin (cat_ref)."""
    rotary = rope2d.RotaryPosition("cat_ref", dim=8, heads=2)         # head dim 4
    out = rotary(torch.ones(1, 2, 2, 4, 4))                            # a 2 x 4 grid
    # width spans [-pi, pi] over 4 columns: -pi, -pi/3, pi/3, pi; height spans +-pi*2/4: pi/2, -pi/2.
    c, s = 0.5, math.sqrt(3) / 2                                       # cos, sin of pi/3
    expected_0_1 = [c + s, -1.0, c - s, 1.0]      # row 0 (y = pi/2), column 1 (x = -pi/3): x, y, x, y channels
    expected_1_2 = [c - s, 1.0, c + s, -1.0]      # row 1 (y = -pi/2), column 2 (x = pi/3)
    for head in range(2):                                              # every frequency is 1: heads alike
        torch.testing.assert_close(out[0, head, 0, 1], torch.tensor(expected_0_1))
        torch.testing.assert_close(out[0, head, 1, 2], torch.tensor(expected_1_2))


def test_cat_frequency_bands_per_head():
    angles = rope2d.cat_angles(3, 3, dim=32, heads=2)                  # (2, 3, 3, 8), 8 frequencies in all
    freqs = 10000.0 ** (-4 * torch.arange(8) / 32)
    y, x = rope2d.cat_coords(3, 3)
    for head in range(2):
        band = freqs[head * 4:(head + 1) * 4]
        torch.testing.assert_close(angles[head, 2, 1, 0::2], y[2] * band)   # even pairs: height
        torch.testing.assert_close(angles[head, 2, 1, 1::2], x[1] * band)   # odd pairs: width


def test_cat_coords_keep_the_aspect_ratio():
    y, x = rope2d.cat_coords(4, 8)
    torch.testing.assert_close(x[[0, -1]], torch.tensor([-math.pi, math.pi]))
    torch.testing.assert_close(y[[0, -1]], torch.tensor([math.pi / 2, -math.pi / 2]))   # height runs down


@pytest.mark.parametrize("interleaved", [False, True])
def test_complex_and_real_rotations_agree(interleaved):
    x, angles = torch.randn(2, 3, 4, 5, 16), torch.randn(3, 4, 5, 8)
    turns = torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(rope2d.turn(x, turns, interleaved), rope2d.rotate(x, angles, interleaved))
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, -1)
    turned = rope2d.rotate(x, angles, interleaved)
    turned_a, turned_b = (turned[..., 0::2], turned[..., 1::2]) if interleaved else turned.chunk(2, -1)
    torch.testing.assert_close(turned_a, a * angles.cos() - b * angles.sin())    # the pairing, spelled out
    torch.testing.assert_close(turned_b, a * angles.sin() + b * angles.cos())


@pytest.mark.slow
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotation_backward_is_the_derivative(interleaved):
    """Rotation's closed-form backward, against finite differences in fp64 (gradcheck), with the angles broadcast
    over the batch as in the model; and against autograd's backward of the real form in fp32."""
    x = torch.randn(2, 3, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(3, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: rope2d.rotate(x, t, interleaved), (x, angles))
    assert torch.autograd.gradgradcheck(lambda x, t: rope2d.rotate(x, t, interleaved), (x, angles))
    x, angles = x.detach().float().requires_grad_(), angles.detach().float().requires_grad_()
    grad = torch.randn(2, 3, 4, 5, 8)
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, -1)
    c, s = angles.cos(), angles.sin()
    pairs = (a * c - b * s, a * s + b * c)
    expected = torch.stack(pairs, -1).flatten(-2) if interleaved else torch.cat(pairs, -1)
    want = torch.autograd.grad(expected, (x, angles), grad)
    got = torch.autograd.grad(rope2d.rotate(x, angles, interleaved), (x, angles), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_learned_rotation_keeps_the_input_dtype_and_gives_fp32_angle_gradients():
    rotary = rope2d.RotaryPosition("scaled", dim=64, heads=4, grid=6)
    x = torch.randn(2, 4, 6, 6, 16).bfloat16().requires_grad_()
    out = rotary(x)
    out.float().square().sum().backward()
    assert out.dtype == x.grad.dtype == torch.bfloat16 and rotary.mixed.freqs.grad.dtype == torch.float32


def test_rotation_is_fp32_under_autocast():
    rotary = rope2d.RotaryPosition("cat", dim=64, heads=4)
    x = torch.randn(1, 4, 6, 6, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rotary(x)
        angles = rotary.angles(6, 6, x.device)
    assert angles.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, rope2d.rotate(x.float(), angles, False).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_axis_products_stay_finite_under_autocast(dtype):
    """Large activations on a 96 x 96 grid (768 px, patch 8): the unscaled products reach ~1e7, past fp16's
    65504. Under autocast they must still come out finite and match the fp32 computation: fp16 runs them in
    fp32, bf16 (fp32's exponent range) in bf16."""
    torch.manual_seed(0)
    attention = CrossAxisAttention(small(pos="cat", dim=64, heads=4), layer=0)
    x = 20 * torch.randn(1, 96, 96, 64)
    reference = attention(x)
    with torch.autocast("cpu", dtype=dtype):
        mixed = attention(x.to(dtype))
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


@pytest.mark.parametrize("attn", list(ATTENTION))
def test_residual_stream_is_fp32_under_autocast(attn):
    """Only the matmuls run in bf16: the stream every block adds to stays fp32 (as in timm and nanoGPT)."""
    model = CAT(small(attn=attn))
    streams = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, inputs, output: streams.append((inputs[0].dtype, output.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32))
    assert streams == [(torch.float32, torch.float32)] * len(model.blocks)


def test_inference_mode_first_does_not_break_training():
    """A sanity-check forward under inference_mode (as other frameworks run before training) used to cache
    the rotation tables as inference tensors, and every later backward failed."""
    model = CAT(small(pos="cat"))
    with torch.inference_mode():
        model(torch.randn(1, 3, 40, 24))
    model(torch.randn(2, 3, 40, 24)).sum().backward()
    assert model.patch_embed.weight.grad is not None


def test_model_runs_under_bf16_autocast():
    model = CAT(small(pos="ape+mixed"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(torch.randn(2, 3, 48, 32)).float()).all()


def test_compiled_model_matches_eager():
    """torch.compile takes other code paths (real-form rotation, angles computed in the graph): same numbers.
    The one compiled test of the suite (~20 s on 2 CPU cores)."""
    torch.manual_seed(0)
    model = CAT(small(pos="cat", pool="cls"))
    images = torch.randn(2, 3, 32, 40)
    eager = model(images)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model)(images)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for p, grad in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, grad, rtol=1e-3, atol=1e-5)


def test_ape_is_resized_for_other_grids():
    ape = rope2d.AbsolutePosition(8, (4, 4))
    zeros = torch.zeros(1, 4, 4, 8)
    torch.testing.assert_close(ape(zeros), ape.table.permute(0, 2, 3, 1))   # training grid: the table itself
    assert ape(torch.zeros(1, 6, 5, 8)).shape == (1, 6, 5, 8)


def test_split_scheme():
    assert rope2d.split_scheme("ape+mixed") == (True, "mixed")
    assert rope2d.split_scheme("cat") == (False, "cat")
    assert rope2d.split_scheme("ape") == (True, None)
    assert rope2d.split_scheme("none") == (False, None)
    with pytest.raises(ValueError, match="pos must be one of"):
        rope2d.split_scheme("sinusoidal")


# ---------------------------------------------------------------------------------------------- baselines

def favor_estimate_fp64(attention, q, k, v):
    """The same random-feature estimator as PerformerAttention (its features), computed directly in fp64."""
    w = attention.features.double()

    def phi(x):
        x = x.double().flatten(2, 3) * x.shape[-1] ** -0.25
        return torch.exp(x @ w.T - x.square().sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    fq, fk = phi(q), phi(k)
    out = (fq @ (fk.transpose(-1, -2) @ v.double().flatten(2, 3))) / (fq @ fk.sum(2).unsqueeze(-1))
    return out.view(q.shape)


@pytest.mark.parametrize("d", [24, 128])
@pytest.mark.parametrize("std", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_favor_matches_its_fp64_estimator_at_realistic_scales(d, std):
    """Before the shift included |x|^2/2, at std 1 and d = 128 every normaliser sat at the 1e-6 clamp and the
    output was 0.17x the estimator's; at std 1.5, 1e-6x."""
    torch.manual_seed(0)
    attention = PerformerAttention(small(attn="performer", pos="none", dim=2 * d, performer_features=64), layer=0)
    q, k, v = (std * torch.randn(2, 2, 8, 8, d) for _ in range(3))
    expected = favor_estimate_fp64(attention, q, k, v)
    out = attention.attend(q, k, v, cls_column=False).double()
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())
    # and it is as close to exact softmax attention as the estimator itself is
    exact = F.scaled_dot_product_attention(*(t.double().flatten(2, 3) for t in (q, k, v))).view(q.shape)
    assert (out - exact).norm() == pytest.approx((expected - exact).norm().item(), rel=1e-3)


def test_favor_error_shrinks_with_more_features():
    """The estimator converges to softmax attention: 16x the features, well under half the error. (At std 1 it
    converges too, but slowly: its variance grows like exp(|q|^2 + |k|^2).)"""
    torch.manual_seed(0)
    q, k, v = (0.5 * torch.randn(1, 2, 4, 4, 16) for _ in range(3))
    exact = F.scaled_dot_product_attention(*(t.flatten(2, 3) for t in (q, k, v))).view(q.shape)
    errors = []
    for m in (256, 4096):
        attention = PerformerAttention(small(attn="performer", pos="none", performer_features=m), layer=0)
        errors.append(((attention.attend(q, k, v, False) - exact).norm() / exact.norm()).item())
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.1


@pytest.mark.parametrize("attn", ["softmax", "performer"])
def test_class_token_counts_once(attn):
    """With pool=cls the class token sits in an extra column, one copy per row. Softmax and Performer attention
    must see it once: the output equals standard attention over [cls, patches]."""
    torch.manual_seed(0)
    attention = {"softmax": SoftmaxAttention, "performer": PerformerAttention}[attn](
        small(attn=attn, pos="none", pool="cls", performer_features=24), layer=0)
    B, h, H, W, d = 2, 2, 3, 4, 16
    q, k, v = (torch.randn(B, h, H, W + 1, d) for _ in range(3))
    for t in (q, k, v):
        t[:, :, :, -1] = t[:, :, :1, -1]                           # the class-token copies are identical
    tokens = [torch.cat([t[:, :, 0, -1:], t[:, :, :, :-1].flatten(2, 3)], 2) for t in (q, k, v)]  # [cls, patches]
    if attn == "softmax":
        weights = (tokens[0] @ tokens[1].transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    else:
        fq, fk = attention.feature_map(tokens[0], True), attention.feature_map(tokens[1], False)
        weights = fq @ fk.transpose(-1, -2)
        weights = weights / weights.sum(-1, keepdim=True)
    expected = weights @ tokens[2]                                     # (B, h, 1 + H*W, d)
    out = attention.attend(q, k, v, cls_column=True)                   # (B, h, H, W + 1, d)
    torch.testing.assert_close(out[:, :, :, :-1].flatten(2, 3), expected[:, :, 1:])
    torch.testing.assert_close(out[:, :, :, -1], expected[:, :, :1].expand(-1, -1, H, -1))


def test_performer_relu_kernel_is_linear_attention():
    torch.manual_seed(0)
    attention = PerformerAttention(small(attn="performer", performer_kernel="relu", pos="none"), layer=0)
    q, k, v = (torch.randn(1, 2, 3, 3, 16) for _ in range(3))
    fq, fk = F.relu(q.flatten(2, 3)) + 1e-3, F.relu(k.flatten(2, 3)) + 1e-3
    weights = fq @ fk.transpose(-1, -2)
    expected = (weights / weights.sum(-1, keepdim=True)) @ v.flatten(2, 3)
    torch.testing.assert_close(attention.attend(q, k, v, False), expected.view(1, 2, 3, 3, 16))


# ---------------------------------------------------------------------------------------------- imprint

def test_imprint_schedules():
    depth = 5
    alphas = {mode: [imprint_alpha(mode, layer, depth) for layer in range(depth)] for mode in CHOICES["imprint"]}
    assert alphas["none"] == [0.0] * 5
    assert alphas["constant"] == [1.0] * 5
    for layer in range(depth):
        t = math.tanh(math.pi * layer / depth)
        assert alphas["tanh_decay"][layer] == pytest.approx(1 - t)
        assert alphas["tanh_grow"][layer] == pytest.approx(t)
    assert CAT(small(imprint="tanh_grow", depth=5)).alphas == pytest.approx(alphas["tanh_grow"])


def test_imprint_reaches_the_attention():
    torch.manual_seed(0)
    model = CAT(small(imprint="constant"))
    images = torch.randn(2, 3, 32, 32)
    with_imprint = model(images)
    model.alphas = [0.0] * len(model.alphas)
    assert not torch.allclose(with_imprint, model(images))


# ---------------------------------------------------------------------------------------------- presets, params

def test_presets():
    assert {"cat-paper", "cat-ref", "vit-paper", "cat-tiny", "vit-tiny", "performer-tiny"} <= set(PRESETS)
    with torch.device("meta"):
        params = CAT(PRESETS["cat-paper"]).num_params()
    assert 30e6 <= params <= 36e6
    ref = PRESETS["cat-ref"]
    assert (ref.pos, ref.axis, ref.imprint, ref.pool) == ("cat_ref", "row", "tanh_decay", "corner")
    vit = PRESETS["vit-paper"]
    assert (vit.attn, vit.mlp_ratio, vit.pos) == ("softmax", 4.0, "ape")
    assert (vit.dim, vit.depth, vit.heads, vit.patch) == (1024, 5, 8, 8)


def test_flop_count_matches_the_ratio_in_the_spec():
    ratio = count_flops(PRESETS["vit-paper"], 224) / count_flops(PRESETS["cat-paper"], 224)
    assert 2.1 < ratio < 2.4                                           # docs/benchmarks.md: about 2.2x at 224


@pytest.mark.parametrize("attn", list(ATTENTION))
def test_gradients_reach_every_parameter(attn):
    torch.manual_seed(0)
    model = CAT(small(attn=attn, pos="ape+mixed", pool="cls", depth=3))
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_state_dict_round_trip():
    torch.manual_seed(0)
    config = small(attn="performer", pos="mixed")
    model, copy = CAT(config).eval(), CAT(config).eval()
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(model(images), copy(images))
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy(images), model(images), rtol=0, atol=0)


def test_no_weight_decay_on_norms_biases_and_positions():
    model = CAT(small(pos="ape+mixed", pool="cls"))
    decay, no_decay = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "ape.table" in no_decay_names and "cls_token" in no_decay_names
    assert "blocks.0.attn.pos.mixed.freqs" in no_decay_names and "blocks.0.norm1.weight" in no_decay_names
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05


# ---------------------------------------------------------------------------------------------- bad config

@pytest.mark.parametrize("overrides,field", [
    (dict(dim=30, heads=4), "heads"),
    (dict(dim=24, heads=4, pos="cat"), "head dim"),
    (dict(dim=24, heads=4, pos="ape+axial"), "head dim"),
    (dict(img_size=30), "img_size"),
    (dict(attn="linformer"), "attn"),
    (dict(pos="sinusoidal"), "pos"),
    (dict(imprint="sometimes"), "imprint"),
    (dict(axis="diagonal"), "axis"),
    (dict(pool="max"), "pool"),
    (dict(depth=0), "depth"),
    (dict(dim=-8), "dim"),
    (dict(drop_path=1.5), "drop_path"),
    (dict(attn="performer", performer_features=7, pos="mixed"), "performer_features must be even"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small(**overrides)


def test_head_dim_of_six_is_fine_without_rotary():
    CAT(small(dim=24, heads=4, pos="ape"))


def test_odd_performer_features_without_a_rotation_pair_are_fine():
    for pos in ("ape", "cat_ref"):                       # cat_ref scales channels one by one
        model = CAT(small(attn="performer", performer_features=7, pos=pos))
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("attn", ["cross_axis", "softmax"])
def test_conv_stem_gives_the_same_grid_and_counts_its_flops(attn):
    """stem='conv' (Xiao et al. 2021): log2(patch) stride-2 3x3 convolutions with BatchNorm and ReLU, widths
    doubling up to D, then a 1x1 convolution; the blocks see the grid the patchify layer gives."""
    patchify, conv = small(attn=attn, pos="ape"), small(attn=attn, pos="ape", stem="conv")
    model = CAT(conv)
    stem = model.patch_embed
    assert [m.stride for m in stem if isinstance(m, nn.Conv2d)] == [(2, 2)] * 3 + [(1, 1)]     # patch 8
    assert [m.out_channels for m in stem if isinstance(m, nn.Conv2d)] == [8, 16, 32, 32]
    images = torch.randn(2, 3, 40, 24)
    assert model.forward_features(images).shape == CAT(patchify).forward_features(images).shape == (2, 5, 3, 32)
    model(images).sum().backward()
    # FLOPs: the three 3x3 convolutions and the 1x1 one, 2 per multiply-add, per output position
    grid = [16, 8, 4]
    stem_flops = sum(2 * 9 * c_in * c_out * g * g for c_in, c_out, g in zip([3, 8, 16], [8, 16, 32], grid))
    stem_flops += 2 * 32 * 32 * 4 * 4
    assert count_flops(conv, 32) - count_flops(patchify, 32) == stem_flops - 2 * 3 * 64 * 32 * 16
    for bad in (dict(patch=6, img_size=48), dict(patch=1), dict(attn="swin", pos="rpb")):
        with pytest.raises(ValueError, match="stem='conv' needs a power-of-2 patch"):
            small(stem="conv", **bad)


def test_pos_lists_each_scheme_once():
    assert len(CHOICES["pos"]) == len(set(CHOICES["pos"])) and set(CHOICES["pos"]) == set(rope2d.SCHEMES + SWIN_POS)


def test_config_from_dict_refuses_unknown_fields():
    assert config_from_dict({"dim": 64, "heads": 4}).dim == 64
    with pytest.raises(ValueError, match="unknown CATConfig fields: colour"):
        config_from_dict({"colour": "red"})
