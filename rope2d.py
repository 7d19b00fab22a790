"""Positional schemes for transformers on a 2D patch grid (docs/design.md: Positional schemes). Needs only torch.

Rotary schemes turn q and k of shape (B, heads, H, W, c) by position-dependent angles, so that q.k
depends only on the offset between two tokens:
  cat      the CAT paper's 2D rotary: coordinates scaled to [-pi, pi], sinusoidal frequency bands per head
  axial    RoPE-Axial (Heo et al. 2024): integer coordinates, x on half the pairs and y on the other half
  mixed    RoPE-Mixed (Heo et al. 2024): learned frequencies, each pair turns by fx*x + fy*y
  scaled   RoPE-Mixed on image coordinates: positions scaled to the image as in `cat`, so that a larger image
           samples the same angles more finely instead of reaching unseen ones; every head spans the
           frequencies from one radian per training-grid step down to a quarter turn across the image
  cat_ref  the released CAT code, reproduced bugs included: not a rotation but an absolute modulation
Absolute: `ape`, a learned table for the training grid, resized bicubically for other grids.
Combinations: `ape+cat`, `ape+axial`, `ape+mixed`; and `none`.

Everything here is computed in fp32 (fp64 stays fp64), also under autocast, and at any grid size.
"""
import math
import warnings
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

ROTARY = ("cat", "cat_ref", "axial", "mixed", "scaled")
# torch.compile leaves the complex multiplications of Rotation to the eager kernel, the fast choice here
# (docs/benchmarks.md); its warning that this may be slower than eager does not apply.
warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex operators")
SCHEMES = ("none", "ape", *ROTARY, "ape+cat", "ape+axial", "ape+mixed")


def split_scheme(pos):
    """'ape+axial' -> (True, 'axial'); 'cat' -> (False, 'cat'); 'ape' -> (True, None); 'none' -> (False, None)."""
    if pos not in SCHEMES:
        raise ValueError(f"pos must be one of {SCHEMES}, got {pos!r}")
    ape = pos.startswith("ape")
    rotary = pos.removeprefix("ape").removeprefix("+") or None
    return ape, None if rotary == "none" else rotary


# ----------------------------------------------------------------------------------------------
# Angles. Each returns fp32 angles shaped (heads or 1, H, W, pairs).

def cat_coords(H, W, device=None):
    """Row and column coordinates of the `cat` scheme: (H,) and (W,).

    The longer side spans [-pi, pi]; the shorter one +-pi*short/long, which keeps the aspect ratio.
    Height runs from +pi down to -pi and width from -pi up to +pi, as in the released code.
    """
    longer = max(H, W)

    def span(n):
        half = math.pi * n / longer
        return torch.linspace(-half, half, n, device=device) if n > 1 else torch.zeros(1, device=device)

    return -span(H), span(W)


def cat_angles(H, W, dim, heads, device=None):
    """Angles of the paper's 2D rotary (`cat`): (heads, H, W, d/2).

    Frequencies f_m = 10000**(-4m/dim), m < dim/4, decay over the hidden size (paper Sec. 2.2); head n
    takes the n-th contiguous band, so head 0 sees the finest scale. Inside a head, rotation pair 2m
    turns by the height angle y*f and pair 2m+1 by the width angle x*f.
    """
    d = dim // heads
    y, x = cat_coords(H, W, device)
    freqs = 10000.0 ** (-4 * torch.arange(dim // 4, device=device) / dim)
    freqs = freqs.view(heads, 1, 1, d // 4)                       # (h, 1, 1, d/4) bands
    height = y.view(1, H, 1, 1) * freqs                            # (h, H, 1, d/4)
    width = x.view(1, 1, W, 1) * freqs                             # (h, 1, W, d/4)
    return torch.stack(torch.broadcast_tensors(height, width), -1).flatten(-2)  # (h, H, W, d/2)


def axial_angles(H, W, head_dim, theta=100.0, device=None):
    """RoPE-Axial angles: (1, H, W, d/2). Pairs [0, d/4) turn by x*t_m, pairs [d/4, d/2) by y*t_m,
    with t_m = theta**(-4m/d) on integer coordinates; the same for every head and layer."""
    freqs = theta ** (-4 * torch.arange(head_dim // 4, device=device) / head_dim)
    x = torch.arange(W, device=device).view(1, W, 1) * freqs       # (1, W, d/4)
    y = torch.arange(H, device=device).view(H, 1, 1) * freqs       # (H, 1, d/4)
    return torch.cat(torch.broadcast_tensors(x, y), -1).unsqueeze(0)  # (1, H, W, d/2)


def image_coords(H, W, device=None):
    """Patch-centre coordinates of the `scaled` scheme: (H,) and (W,), both in units where the longer side
    spans [-pi, pi]. A patch keeps its coordinate, up to where inside it the centre falls, at any resolution
    of the same image: (i + 1/2) / n of the side, unlike `cat`'s linspace, whose end points stay at +-pi."""
    step = 2 * math.pi / max(H, W)
    return [(torch.arange(n, device=device) + 0.5 - n / 2) * step for n in (H, W)]


class MixedFrequencies(nn.Module):
    """RoPE-Mixed: learned frequencies (fx, fy) per head and rotation pair; pair c turns by fx_c*x + fy_c*y.

    Init (Heo et al. 2024): magnitudes theta**(-4m/d), m < d/4; a random direction phi per head for the
    first d/4 pairs and phi + pi/2 for the next d/4. Kept out of weight decay by the training script.

    With `grid` (the `scaled` scheme) x and y are image_coords() instead of patch indices, and the magnitudes
    run geometrically, in every head, from grid/(2 pi) (one radian per patch of the grid's training size) down
    to 1/4 (a quarter turn across the image): the fastest pair tells neighbours apart, the slowest still orders
    the whole image without wrapping around. At the training size this is RoPE-Mixed with theta ~ 2 grid / pi
    instead of 10; elsewhere it interpolates where RoPE-Mixed extrapolates.
    """

    def __init__(self, heads, head_dim, theta=10.0, grid=None):
        super().__init__()
        if grid is None:
            magnitude = theta ** (-4 * torch.arange(head_dim // 4) / head_dim)   # (d/4,)
        else:
            magnitude = torch.linspace(math.log(grid / (2 * math.pi)), math.log(0.25), head_dim // 4).exp()
        self.grid = grid
        phi = torch.rand(heads, 1) * 2 * math.pi                              # (h, 1)
        direction = torch.cat([phi, phi + math.pi / 2], -1).repeat_interleave(head_dim // 4, -1)  # (h, d/2)
        magnitude = magnitude.repeat(2)                                       # (d/2,)
        self.freqs = nn.Parameter(torch.stack([magnitude * direction.cos(), magnitude * direction.sin()]))

    def forward(self, H, W):
        fx, fy = self.freqs.float()[:, :, None, None, :]                    # (h, 1, 1, d/2) each
        if self.grid is None:
            y, x = torch.arange(H, device=fx.device), torch.arange(W, device=fx.device)
        else:
            y, x = image_coords(H, W, fx.device)
        return fx * x.view(W, 1) + fy * y.view(H, 1, 1)                      # (h, H, W, d/2)


def cat_ref_scale(H, W, head_dim, device=None):
    """The released code's "rotation", reproduced: a per-channel factor (1, H, W, d).

    Three slips make it differ from `cat` (docs/design.md): (a) operator precedence floor-divides the frequency
    exponent to 0, so every frequency is 1; (b) even channels take the width angle, odd channels the height
    angle; (c) channel c is multiplied by cos(t_c) - sin(t_c) in the first half of the head and by
    cos(t_c) + sin(t_c) in the second half: an absolute modulation, not a rotation of channel pairs.
    """
    y, x = cat_coords(H, W, device)
    theta = torch.stack(torch.broadcast_tensors(x.view(1, W), y.view(H, 1)), -1)   # (H, W, 2): width, height
    theta = theta.repeat(1, 1, head_dim // 2)                                       # (H, W, d)
    sign = torch.ones(head_dim, device=device)
    sign[: head_dim // 2] = -1
    return (theta.cos() + sign * theta.sin()).unsqueeze(0)                          # (1, H, W, d)


# ----------------------------------------------------------------------------------------------
# Applying them.

def rotate(x, angles, interleaved):
    """Turn channel pairs of x (..., c) by angles (..., c/2), broadcast over x's leading dims, in fp32 (fp64 stays
    fp64); the result has x's dtype.

    interleaved=False pairs channel i with i + c/2 ("rotate half", `cat`); True pairs 2i with 2i+1 (RoPE-ViT's
    `axial` and `mixed`). A pair (a, b) is the complex number a + ib, turned by multiplying it with e^(it).
    """
    # Exported programs hold no complex tensors; and for fixed angles torch.compile fuses the real form into what
    # surrounds it, faster than a complex multiplication. Learned angles go through Rotation.
    if torch.compiler.is_exporting() or (torch.compiler.is_compiling() and not angles.requires_grad):
        (a, b), cos, sin = pairs(at_least_fp32(x), interleaved), angles.cos(), angles.sin()
        a, b = a * cos - b * sin, a * sin + b * cos
        return (torch.stack([a, b], -1).flatten(-2) if interleaved else torch.cat([a, b], -1)).type_as(x)
    return Rotation.apply(x, angles, interleaved)


class Rotation(torch.autograd.Function):
    """rotate() for angles that learn: forward and backward each one complex multiplication. Turning is
    orthogonal, so x's gradient is the incoming one turned back, g e^(-it); and the angle's is Im(conj(z) g e^(-it))
    for the pair z = a + ib, summed over the dims the angles were broadcast along (the batch). The arithmetic stays
    complex under torch.compile too: inductor leaves it to the eager kernel, which beats the code it generates for
    the real form on strided (2i, 2i+1) pairs. With autograd's backward of that real form, the learned angles of
    `mixed` and `scaled` made a compiled training step 1.22x `cat`'s; with this one, 1.04x in fp32 and 1.11-1.15x in
    bf16, whose fused `cat` step is shorter (docs/benchmarks.md)."""

    @staticmethod
    def forward(x, angles, interleaved):
        return turn(x, torch.polar(torch.ones_like(angles), angles), interleaved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, angles, ctx.interleaved = inputs
        ctx.save_for_backward(x if angles.requires_grad else None, angles)     # Swin's axial: no angle gradient

    @staticmethod
    def backward(ctx, grad):
        x, angles = ctx.saved_tensors
        back = torch.polar(torch.ones_like(angles), -angles)
        grad_z = as_complex(at_least_fp32(grad.contiguous()), ctx.interleaved) * back      # x's gradient, complex
        grad_angles = None
        if ctx.needs_input_grad[1]:
            z = as_complex(at_least_fp32(x), ctx.interleaved)
            grad_angles = (z.conj() * grad_z).imag.sum_to_size(angles.shape)
        return as_real(grad_z, ctx.interleaved).type_as(grad), grad_angles, None


def turn(x, turns, interleaved):
    """x's pairs turned by unit complex numbers e^(it) (turns, (..., c/2)), in x's dtype."""
    return as_real(as_complex(at_least_fp32(x), interleaved) * turns, interleaved).type_as(x)


def as_complex(x, interleaved):
    """(..., c) real -> (..., c/2) complex, one number per rotation pair (a view where the pairs are adjacent)."""
    return torch.view_as_complex(x.unflatten(-1, (-1, 2))) if interleaved else torch.complex(*x.chunk(2, -1))


def as_real(z, interleaved):
    """Inverse of as_complex."""
    pairs_last = torch.view_as_real(z)                                         # (..., c/2, 2)
    return pairs_last.flatten(-2) if interleaved else pairs_last.transpose(-1, -2).flatten(-2)


def pairs(x, interleaved):
    """x (..., c) -> the two halves (a, b) of its rotation pairs, (..., c/2) each."""
    return x.unflatten(-1, (-1, 2)).unbind(-1) if interleaved else x.chunk(2, -1)


def at_least_fp32(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def fit_channels(table, channels, cls_column, pad_value):
    """Adapt a per-position table (..., H, W, n) to the tensor it is applied to: repeat it cyclically along
    the last dim to `channels` (Performer features outnumber head channels), and add the class-token column,
    which gets `pad_value` (no rotation / unit scale)."""
    if table.shape[-1] != channels:
        table = table.repeat(*[1] * (table.dim() - 1), -(-channels // table.shape[-1]))[..., :channels]
    if cls_column:
        table = F.pad(table, (0, 0, 0, 1), value=pad_value)
    return table


@lru_cache(maxsize=32)
@torch.inference_mode(False)
def fixed_turns(scheme, dim, heads, H, W, channels, cls_column, device):
    """e^(i angle) of a fixed scheme (`cat`, `axial`) for one grid, computed once and shared by every layer:
    at 768 px the table is as large as q itself for a batch of one. Always a normal tensor: a table first
    made under torch.inference_mode() would be cached as an inference tensor, which autograd then refuses to
    save in every later training step."""
    angles = cat_angles(H, W, dim, heads, device) if scheme == "cat" else axial_angles(H, W, dim // heads,
                                                                                      device=device)
    angles = fit_channels(angles, channels // 2, cls_column, 0.0)
    return torch.polar(torch.ones_like(angles), angles)


class RotaryPosition(nn.Module):
    """The positional transform of q and k in one attention layer, for any grid size.

    forward(x (B, h, H, W', c), cls_column) -> same shape. With cls_column the last column holds the class
    token, which is left as it is. c is the head dim, or the Performer's feature count.
    """

    def __init__(self, scheme, dim, heads, grid=None):
        super().__init__()
        if scheme not in ROTARY:
            raise ValueError(f"rotary scheme must be one of {ROTARY}, got {scheme!r}")
        if scheme == "scaled" and not grid:
            raise ValueError("the scaled rotary needs the training grid size (grid, in patches)")
        self.scheme, self.dim, self.heads, self.head_dim = scheme, dim, heads, dim // heads
        self.mixed = None                                  # the learned frequencies of `mixed` and `scaled`
        if scheme in ("mixed", "scaled"):
            self.mixed = MixedFrequencies(heads, self.head_dim, grid=grid if scheme == "scaled" else None)

    def angles(self, H, W, device=None):
        """(heads or 1, H, W, d/2) fp32 angles of the rotary schemes (not `cat_ref`: it has none)."""
        if self.scheme == "cat":
            return cat_angles(H, W, self.dim, self.heads, device)
        if self.scheme == "axial":
            return axial_angles(H, W, self.head_dim, device=device)
        return self.mixed(H, W)

    def forward(self, x, cls_column=False):
        H, W = x.shape[-3], x.shape[-2] - cls_column
        if self.scheme == "cat_ref":
            scale = fit_channels(cat_ref_scale(H, W, self.head_dim, x.device), x.shape[-1], cls_column, 1.0)
            return (x.float() * scale).type_as(x)
        interleaved = self.scheme != "cat"
        if self.mixed is None and not torch.compiler.is_compiling():     # eager: a table computed once
            turns = fixed_turns(self.scheme, self.dim, self.heads, H, W, x.shape[-1], cls_column, x.device)
            return turn(x, turns, interleaved)
        angles = fit_channels(self.angles(H, W, x.device), x.shape[-1] // 2, cls_column, 0.0)
        return rotate(x, angles, interleaved)


def angle_spread(angles):
    """(heads,) radians: per head, the widest range of angles one rotation pair sweeps across the grid. A head
    whose spread is far below one radian turns its q and k by almost the same angle everywhere: it hardly
    tells positions apart (`cat`'s later heads; README, Results)."""
    return (angles.amax((1, 2)) - angles.amin((1, 2))).amax(-1)


class AbsolutePosition(nn.Module):
    """Learned absolute embedding (`ape`) for the training grid; resized bicubically for other grids."""

    def __init__(self, dim, grid):
        super().__init__()
        self.table = nn.Parameter(torch.empty(1, dim, *grid))     # (1, D, H0, W0)
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, x):                                          # x: (B, H, W, D)
        table = self.table.float()
        if tuple(x.shape[1:3]) != tuple(table.shape[-2:]):
            table = F.interpolate(table, size=x.shape[1:3], mode="bicubic", align_corners=False)
        return x + table.permute(0, 2, 3, 1).type_as(x)
