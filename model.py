"""The Cross-Axis Transformer (Erickson 2023, arXiv 2311.07184) and its baselines, in one file.

Read top to bottom: config and presets, the cross-axis operation, the three attentions (cross-axis,
softmax ViT, Performer), the block, the model. Needs only torch and rope2d.py. The exact tensor
operations are written out in docs/design.md (The cross-axis attention), since the paper's Sec. 2.1 lost
them in conversion.

Shapes: B batch, H x W patch grid, D model width, h heads, d = D / h head width.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from rope2d import SCHEMES, AbsolutePosition, RotaryPosition, split_scheme

# Swin's positional schemes (swin.py): torchvision's relative position bias, RoPE inside windows, both, or v2's
# scaled cosine attention with a continuous position bias.
SWIN_POS = ("rpb", "axial", "mixed", "rpb+axial", "rpb+mixed", "swinv2")

CHOICES = {
    "attn": ("cross_axis", "softmax", "performer", "swin", "resnet18"),
    "axis": ("row", "alternate"),
    "form": ("auto", "quadratic", "linear"),
    "performer_kernel": ("favor", "relu"),
    "pos": tuple(dict.fromkeys(SCHEMES + SWIN_POS)),               # axial and mixed serve both
    "imprint": ("none", "constant", "tanh_decay", "tanh_grow"),
    "pool": ("mean", "corner", "cls"),
    "stem": ("patch", "conv"),
}


def nearest_sizes(res, patch):
    """The image sizes divisible by the patch just below and above res (only the patch itself below it)."""
    below = res // patch * patch
    return (below, below + patch) if below else (patch,)


@dataclass
class CATConfig:
    """Every model option. The defaults are the paper's model (`cat-paper`), with both axes seen."""
    img_size: int = 224             # training resolution; any multiple of `patch` works at run time
    patch: int = 8
    dim: int = 1024
    depth: int = 5
    heads: int = 8
    mlp_ratio: float = 1.0          # FFN hidden = mlp_ratio * dim; the paper's CAT uses 1
    num_classes: int = 1000
    attn: str = "cross_axis"        # cross_axis | softmax (ViT) | performer | swin (swin.py, needs torchvision)
                                    # | resnet18 (resnet.py: torchvision's; only num_classes and patch apply)
    axis: str = "alternate"         # row: the paper's; alternate: odd blocks swap H and W (docs/design.md)
    form: str = "auto"              # cross-axis product order: auto | quadratic | linear
    mid_norm: bool = False          # ablation: normalise the scores between the two products (paper Sec. 4)
    xy_mask: bool = False           # ablation: the learned X/Y mask of the paper's Table 4 (FocusMask)
    performer_kernel: str = "favor"  # favor: positive orthogonal random features; relu
    performer_features: int = 64    # random features per head for favor
    pos: str = "cat"                # rope2d.SCHEMES
    imprint: str = "constant"       # residual imprint schedule, paper Table 4; docs/design.md
    pool: str = "mean"              # mean | corner (released code) | cls
    stem: str = "patch"             # patch: one patch x patch convolution (ViT's); conv: ConvStem, the same grid
    dropout: float = 0.0
    drop_path: float = 0.0
    grad_checkpoint: bool = False   # training: recompute each block's activations in backward (not resnet18)
    # Swin only (attn='swin'): blocks per stage (depth is unused), heads double and the grid halves per stage
    stages: tuple = (2, 2, 6, 2)
    window: int = 7                 # Swin window side, in patches

    def __post_init__(self):
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("img_size", "patch", "dim", "depth", "heads", "num_classes", "performer_features"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mlp_ratio <= 0 or int(self.mlp_ratio * self.dim) < 1:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("dropout", "drop_path"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.img_size % self.patch:
            raise ValueError(f"img_size ({self.img_size}) must be divisible by patch ({self.patch}): the nearest sizes "
                             f"are {' and '.join(map(str, nearest_sizes(self.img_size, self.patch)))}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        swin = self.attn == "swin"
        if self.pos not in (SWIN_POS if swin else SCHEMES):
            raise ValueError(f"pos must be one of {SWIN_POS if swin else SCHEMES} for attn={self.attn!r}, "
                             f"got {self.pos!r}")
        if swin and (not self.stages or min(self.stages) <= 0 or self.window <= 0):
            raise ValueError(f"swin needs positive stages and window, got {self.stages} and {self.window}")
        rotary = next((r for r in ("axial", "mixed") if r in self.pos), None) if swin else split_scheme(self.pos)[1]
        if rotary and (self.dim // self.heads) % (2 if rotary == "cat_ref" else 4):
            raise ValueError(f"head dim dim/heads = {self.dim // self.heads} must be divisible by "
                             f"{2 if rotary == 'cat_ref' else 4} for pos={self.pos!r}")
        if self.attn == "resnet18" and (self.pos, self.pool, self.patch) != ("none", "mean", 32):
            raise ValueError("resnet18 has no positions and mean-pools after a total stride of 32: it needs "
                             f"pos='none', pool='mean', patch=32, got {self.pos!r}, {self.pool!r}, {self.patch}")
        if self.attn == "resnet18" and self.grad_checkpoint:
            raise ValueError("grad_checkpoint is not offered for resnet18: recomputing a BatchNorm layer in the "
                             "backward pass would update its running statistics twice")
        if self.attn == "performer" and rotary not in (None, "cat_ref") and self.performer_features % 2:
            raise ValueError(f"performer_features must be even with pos={self.pos!r}: the rotary turns the "
                             f"features in pairs, got {self.performer_features}")
        power_of_2 = self.patch >= 2 and not self.patch & (self.patch - 1)
        if self.stem == "conv" and (self.attn in ("swin", "resnet18") or not power_of_2):
            raise ValueError(f"stem='conv' needs a power-of-2 patch of at least 2 and attn cross_axis, softmax or "
                             f"performer, got patch {self.patch} and attn {self.attn!r}")
        if self.xy_mask and self.attn != "cross_axis":
            raise ValueError("xy_mask needs attn='cross_axis': it weights the cross-axis scores")
        if self.mid_norm and (self.attn != "cross_axis" or self.form == "linear"):
            raise ValueError("mid_norm needs attn='cross_axis' and form 'quadratic' or 'auto': "
                             "a normalisation between the products cannot be re-associated")

    @property
    def head_dim(self):
        return self.dim // self.heads

    @property
    def grid(self):
        return self.img_size // self.patch


PRESETS = {
    # The paper's model (Table 3: D 1024, 5 layers, 8 heads, patch 8; ~33M parameters) with the fix of
    # The row blindness (docs/design.md): true 2D rotary needs `alternate` to see both axes.
    "cat-paper": CATConfig(),
    # What the released code does: its modulation (`cat_ref`), row scores only, decaying imprint, corner pool.
    "cat-ref": CATConfig(pos="cat_ref", axis="row", imprint="tanh_decay", pool="corner"),
    # The paper's ViT baseline: same width, depth, heads and patch; softmax attention, MLP 4, APE.
    "vit-paper": CATConfig(attn="softmax", mlp_ratio=4.0, pos="ape", imprint="none"),
    # The same ViT with FAVOR+ linear attention, for the speed comparison.
    "performer-paper": CATConfig(attn="performer", mlp_ratio=4.0, pos="ape", imprint="none"),
    # Small versions for CPU work (64 px, an 8 x 8 grid). cat-tiny takes the `scaled` rotary, which beat the
    # paper's `cat` on Imagenette at 80 and 128 px and kept its top-1 at 2x the resolution (README, Results).
    "cat-tiny": CATConfig(img_size=64, dim=192, depth=6, heads=8, num_classes=8, pos="scaled"),
    "vit-tiny": CATConfig(img_size=64, dim=192, depth=6, heads=8, num_classes=8,
                          attn="softmax", mlp_ratio=4.0, pos="ape", imprint="none"),
    "performer-tiny": CATConfig(img_size=64, dim=192, depth=6, heads=8, num_classes=8,
                                attn="performer", mlp_ratio=4.0, pos="ape", imprint="none"),
    # Swin (swin.py) for CPU work. Patch 4 at 64 px: a 16 x 16 grid, then 8 x 8 and 4 x 4 (one window) over 3
    # stages of 2 blocks (6 blocks, as cat-tiny / vit-tiny have); widths 64/128/256, heads 2/4/8 (head dim 32,
    # as in swin_t), window 4. Matched with num_params and count_flops at 64 px, 8 classes: 2.25M parameters,
    # 0.165 GFLOPs (cat-tiny 1.38M / 0.177, vit-tiny 2.71M / 0.363): parameters between the two, FLOPs at
    # cat-tiny's. Same counts for every pos but swinv2 (2.27M / 0.167).
    "swin-tiny": CATConfig(img_size=64, patch=4, dim=64, heads=2, stages=(2, 2, 2), window=4, num_classes=8,
                           attn="swin", mlp_ratio=4.0, pos="rpb", imprint="none"),
    # torchvision's swin_t (28.3M parameters, 8.98 GFLOPs at 224 px); pos='swinv2' with window=8 is swin_v2_t.
    "swin-t": CATConfig(img_size=224, patch=4, dim=96, heads=3, stages=(2, 2, 6, 2), window=7, num_classes=1000,
                        attn="swin", mlp_ratio=4.0, drop_path=0.2, pos="rpb", imprint="none"),
    # The ConvNet reference (resnet.py): torchvision's resnet18, 11.7M parameters, 3.6 GFLOPs at 224 px.
    "resnet18": CATConfig(img_size=224, patch=32, attn="resnet18", pos="none", imprint="none"),
}


# ----------------------------------------------------------------------------------------------
# The cross-axis operation (docs/design.md: The cross-axis attention)

# `auto` uses the linear form for grids wider than this times the head dim. Measured with bench.py on 2 CPU
# cores, fwd+bwd, 8 heads of dim 128: quadratic faster at W = 128 (236 vs 271 ms), linear at W = 192
# (564 vs 1029 ms) (assets/bench_cpu.json); the crossover lies between 1 d and 1.5 d.
LINEAR_ABOVE = 1.4

def cross_axis_attention(q, k, v, form="auto", mid_norm=False):
    """Every token receives every value, weighted by a score computed inside its own row.

    q, k, v: (B, h, H, W, d) -> (B, h, H, W, d). No softmax and no 1/sqrt(d), as in the released code:
        S[i, j, j'] = <q[i, j], k[i, j']>     (scores within row i)
        Vbar[j']    = sum_i' v[i', j']         (values summed over rows)
        o[i, j]     = sum_j' S[i, j, j'] Vbar[j']
    Without a softmax the product re-associates exactly into the linear form o[i] = q[i] @ (k[i]^T Vbar),
    a d x d matrix per row. Per head, the quadratic form costs ~2*H*W*W*d multiply-adds, the linear one
    ~2*H*W*d*d. Equal FLOPs at W = d, but the linear form needs one extra pass over k (its contraction runs
    over W, in the middle of the layout), so `auto` switches only above W = LINEAR_ABOVE * d, the measured
    crossover (bench.py). mid_norm (the RetNet-style normalisation the paper found to hurt) divides each score
    row by its absolute sum, which only the quadratic form allows.
    """
    if form not in CHOICES["form"]:
        raise ValueError(f"form must be one of {CHOICES['form']}, got {form!r}")
    if form == "auto":
        form = "quadratic" if mid_norm or q.shape[-2] <= LINEAR_ABOVE * q.shape[-1] else "linear"
    vbar = v.sum(2)                                                  # (B, h, W, d)
    if form == "linear":
        if mid_norm:
            raise ValueError("mid_norm cannot use the linear form")
        return q @ (k.transpose(-1, -2) @ vbar.unsqueeze(2))         # (B, h, H, d, d) -> (B, h, H, W, d)
    scores = q @ k.transpose(-1, -2)                                 # (B, h, H, W, W)
    if mid_norm:
        scores = scores / scores.abs().sum(-1, keepdim=True).clamp(min=1)
    # All rows share Vbar: one (H*W, W) @ (W, d) product per head, rather than Vbar broadcast (copied) per row
    return (scores.flatten(2, 3) @ vbar).view(q.shape)               # (B, h, H*W, d) -> (B, h, H, W, d)


class FocusMask(nn.Module):
    """The learned X/Y mask (paper Table 4; docs/design.md): a small head predicts one (x, y) focus per image from the
    patch embedding E (each block's attention has its own head, so the focus may differ from block to block), and
    the score of every key at L1 distance r from it (coordinates in [-1, 1]) is multiplied by exp(-rate_n r), a
    learned decay rate per head n. The weight belongs to the key's position
    alone, so it scales k, and both product orders stay exact: S[i, j, j'] w[i, j'] = <q[i, j], w[i, j'] k[i, j']>.
    """

    def __init__(self, dim, heads):
        super().__init__()
        self.focus = nn.Linear(dim, 2)
        self.rate = nn.Parameter(torch.zeros(heads))                    # softplus(0) = 0.69: a gentle start

    def forward(self, embed, cls_column=False):                        # E (B, H, W', D) -> w (B, h, H, W', 1)
        patches = embed[:, :, :-1] if cls_column else embed
        B, H, W = patches.shape[:3]
        fx, fy = torch.tanh(self.focus(patches.float().mean((1, 2)))).unbind(-1)   # (B,) each, in [-1, 1]
        x = torch.linspace(-1, 1, W, device=embed.device).view(1, 1, W) - fx.view(B, 1, 1)
        y = torch.linspace(-1, 1, H, device=embed.device).view(1, H, 1) - fy.view(B, 1, 1)
        distance = (x.abs() + y.abs()).unsqueeze(1)                     # (B, 1, H, W)
        weights = torch.exp(-F.softplus(self.rate).view(1, -1, 1, 1) * distance)      # (B, h, H, W)
        return F.pad(weights, (0, int(cls_column)), value=1.0).unsqueeze(-1)       # the class token: weight 1


def imprint_alpha(mode, layer, depth):
    """Weight of the embedding imprint in block `layer` (paper Table 4; docs/design.md: Residual imprint)."""
    t = math.tanh(math.pi * layer / depth)
    return {"none": 0.0, "constant": 1.0, "tanh_decay": 1.0 - t, "tanh_grow": t}[mode]


# ----------------------------------------------------------------------------------------------
# Attention

class Attention(nn.Module):
    """What every attention here shares: the qkv projection (+ imprint), heads, positions, output.

    Subclasses define attend(q, k, v, cls_column, embed) on (B, h, H, W, d) tensors (embed: E, for FocusMask).
    """

    def __init__(self, cfg, layer):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        rotary = split_scheme(cfg.pos)[1]
        self.pos = RotaryPosition(rotary, cfg.dim, cfg.heads, cfg.grid) if rotary else None

    def forward(self, x, embed=None, alpha=0.0, cls_column=False):   # x: (B, H, W, D)
        B, H, W, D = x.shape
        qkv = self.qkv(x).view(B, H, W, 3, D)
        if alpha:                                                    # alpha_l * E onto q, k and v
            qkv = qkv.add(embed.unsqueeze(3).to(qkv.dtype), alpha=alpha)
        # unbind, then permute: the backward pass stacks the three gradients straight into the Linear's layout
        q, k, v = (t.permute(0, 3, 1, 2, 4) for t in qkv.view(B, H, W, 3, self.heads, -1).unbind(3))
        o = self.attend(q, k, v, cls_column, embed)                  # (B, h, H, W, d)
        return self.drop(self.proj(o.permute(0, 2, 3, 1, 4).reshape(B, H, W, D)))

    def rotate(self, q, k, cls_column):
        """Positions on q and k; the rotated copies are contiguous, as the matmuls want them."""
        if self.pos is None:
            return q, k
        return self.pos(q, cls_column), self.pos(k, cls_column)


class CrossAxisAttention(Attention):
    """CAT's attention: cross_axis_attention, then RetNet's per-head GroupNorm (paper Sec. 2.1).

    With axis='alternate', odd blocks transpose the grid: scores within a column, values summed over
    columns. Without it a true rotary cannot tell rows apart (docs/design.md, the row blindness): q and k of one
    row share the height angle, which cancels in the scores, and Vbar sums over rows, so the block is
    equivariant to permuting the rows.
    """

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        self.transpose = cfg.axis == "alternate" and layer % 2 == 1
        self.form, self.mid_norm = cfg.form, cfg.mid_norm
        self.norm = nn.GroupNorm(cfg.heads, cfg.heads)               # each head over its whole (H, W, d)
        # RetNet's gamma on k of head n. The GroupNorm that follows cancels it (up to eps); kept for fidelity.
        gamma = 1 - 2.0 ** (-5 - torch.arange(cfg.heads, dtype=torch.float32))
        self.register_buffer("gamma", gamma.view(-1, 1, 1, 1), persistent=False)
        self.mask = FocusMask(cfg.dim, cfg.heads) if cfg.xy_mask else None

    def attend(self, q, k, v, cls_column, embed=None):
        q, k = self.rotate(q, k, cls_column)
        k = k * self.gamma.to(k.dtype)
        if self.mask is not None:
            k = k * self.mask(embed, cls_column).to(k.dtype)
        if self.transpose:
            q, k, v = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)   # (B, h, W, H, d)
        # The products are unscaled sums over d, W and H rows: at 768 px max|o| is ~1e4 already at init. Under
        # fp16 that nears its largest value (65504), so they run in fp32. bf16 has fp32's exponent range and its
        # matmuls accumulate in fp32, so under bf16 they stay bf16; the per-head GroupNorm after them takes the
        # scale out either way (and normalises in fp32 internally).
        fp16 = q.dtype == torch.float16
        with torch.autocast(q.device.type, enabled=False) if fp16 else nullcontext():
            o = cross_axis_attention(*(t.float() if fp16 else t for t in (q, k, v)), self.form, self.mid_norm)
            if self.transpose:
                o = o.transpose(2, 3)                                # back to (B, h, H, W, d)
            return self.norm(o)


def sequence(t, cls_column):
    """(B, h, H, W', c) grid -> (B, h, N, c) token sequence for the attentions that see one: with a class-token
    column, its H identical copies become one token, first. Counting every copy would weigh the class token's
    key H times, a log H bias on its logit that grows with the resolution."""
    if not cls_column:
        return t.flatten(2, 3)
    return torch.cat([t[:, :, 0, -1:], t[:, :, :, :-1].flatten(2, 3)], 2)       # (B, h, 1 + H*W, c)


def grid(o, H, cls_column):
    """Inverse of sequence(): (B, h, N, c) -> (B, h, H, W', c), the class token's output copied to every row."""
    if not cls_column:
        return o.unflatten(2, (H, -1))
    cls = o[:, :, :1].unsqueeze(2).expand(-1, -1, H, -1, -1)                  # (B, h, H, 1, c)
    return torch.cat([o[:, :, 1:].unflatten(2, (H, -1)), cls], 3)


class SoftmaxAttention(Attention):
    """ViT's multi-head attention over all H*W tokens (and the class token) through scaled_dot_product_attention."""

    def attend(self, q, k, v, cls_column, embed=None):
        q, k = self.rotate(q, k, cls_column)
        o = F.scaled_dot_product_attention(*(sequence(t, cls_column) for t in (q, k, v)))   # (B, h, N, d)
        return grid(o, q.shape[2], cls_column)


class PerformerAttention(Attention):
    """Performer (Choromanski et al. 2021): linear attention through a feature map phi.

    favor: FAVOR+ positive orthogonal random features, phi(x) = exp(w.x - |x|^2/2) / sqrt(m), an unbiased
    estimate of the softmax kernel exp(q.k / sqrt(d)); relu: phi(x) = relu(x) + 1e-3 (m = d).
    Rotary positions follow RoFormer's linear-attention form: the feature-mapped q and k are rotated in the
    numerator only; the normaliser stays unrotated and so positive.
    """

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        self.kernel = cfg.performer_kernel
        if self.kernel == "favor":
            self.register_buffer("features", orthogonal_features(cfg.performer_features, cfg.head_dim))

    def feature_map(self, x, is_query):                               # (B, h, N, d) -> (B, h, N, m)
        if self.kernel == "relu":
            return F.relu(x) + 1e-3
        x = x * x.shape[-1] ** -0.25                                 # so that phi(q).phi(k) ~ exp(q.k / sqrt(d))
        exponent = x @ self.features.T - x.square().sum(-1, keepdim=True) / 2   # (B, h, N, m)
        # exp under- or overflows unless shifted by the exponent's max, |x|^2/2 included (at std 1 and d = 128,
        # w.x - |x|^2/2 is ~ -60). The shift cancels between numerator and normaliser, so it is per query for q
        # and one constant over all keys for k.
        shift = exponent.amax(-1, keepdim=True) if is_query else exponent.amax((-2, -1), keepdim=True)
        return torch.exp(exponent - shift.detach()) / math.sqrt(exponent.shape[-1])

    def attend(self, q, k, v, cls_column, embed=None):
        B, h, H, W, d = q.shape
        fq, fk = (self.feature_map(t.float().flatten(2, 3), is_query).view(B, h, H, W, -1)   # fp32 for exp
                  for t, is_query in ((q, True), (k, False)))                              # (B, h, H, W, m)
        rq, rk = self.rotate(fq, fk, cls_column)
        fq, fk, rq, rk, v = (sequence(t, cls_column) for t in (fq, fk, rq, rk, v.float()))   # (B, h, N, .)
        numerator = rq @ (rk.transpose(-1, -2) @ v)                  # (B, h, N, m) @ (B, h, m, d)
        key_sum = fk.sum(2)                                          # (B, h, m)
        normaliser = fq @ key_sum.unsqueeze(-1)                      # (B, h, N, 1), a sum of positive terms
        # A relative floor, only against an exact 0: the normaliser's largest possible value times 1e-12.
        floor = 1e-12 * fq.sum(-1, keepdim=True) * key_sum.amax(-1)[..., None, None]
        return grid(numerator / torch.maximum(normaliser, floor), H, cls_column)


def orthogonal_features(m, d):
    """FAVOR+ projection (m, d): stacked blocks of random orthogonal rows, each rescaled to the norm of a
    Gaussian vector so that the rows are marginally N(0, I) (Choromanski et al. 2021, Sec. 2.4)."""
    blocks = [torch.linalg.qr(torch.randn(d, d))[0].T for _ in range(-(-m // d))]
    return torch.cat(blocks)[:m] * torch.randn(m, d).norm(dim=1, keepdim=True)


ATTENTION = {"cross_axis": CrossAxisAttention, "softmax": SoftmaxAttention, "performer": PerformerAttention}


# ----------------------------------------------------------------------------------------------
# Block and model

def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0 or not training:
        return x
    keep = torch.rand(x.shape[0], *[1] * (x.dim() - 1), device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


class FeedForward(nn.Module):
    """Linear(D, rD) -> SiLU -> Linear(rD, D), no biases (the paper's FFN)."""

    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.up = nn.Linear(cfg.dim, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.dim, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.down(F.silu(self.up(x))))


class Block(nn.Module):
    """Pre-LN transformer block on the grid: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = ATTENTION[cfg.attn](cfg, layer)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = FeedForward(cfg)
        self.drop_path = cfg.drop_path * layer / max(cfg.depth - 1, 1)    # linear in depth
        self.one_class_token = cfg.attn != "cross_axis"            # softmax, Performer: see sequence()

    def forward(self, x, embed=None, alpha=0.0, cls_column=False):   # (B, H, W, D) -> (B, H, W, D)
        x = x + drop_path(self.attn(self.norm1(x), embed, alpha, cls_column), self.drop_path, self.training)
        x = x + drop_path(self.ffn(self.norm2(x)), self.drop_path, self.training)
        if cls_column and self.one_class_token:
            # One token in H copies: dropout draws a mask per copy, so under it they would drift apart while the
            # next attention reads only row 0's and the head averages all. Row 0's is the token; the others follow.
            x = torch.cat([x[:, :, :-1], x[:, :1, -1:].expand(-1, x.shape[1], -1, -1)], 2)
        return x


class ConvStem(nn.Sequential):
    """The convolutional stem of Xiao et al. 2021 ("Early convolutions help transformers see better"), in place
    of the patchify convolution: log2(patch) 3x3 convolutions of stride 2, each with BatchNorm and ReLU, widths
    doubling up to `dim`, then a 1x1 convolution. The same (R / patch) grid, from overlapping receptive fields
    that grow step by step; their FLOPs are counted like any convolution's. (B, 3, R, R') -> (B, dim, R/p, R'/p)."""

    def __init__(self, dim, patch):
        steps = patch.bit_length() - 1
        widths = [3, *(max(dim >> (steps - 1 - i), 1) for i in range(steps))]     # ..., dim / 4, dim / 2, dim
        layers = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.Conv2d(dim, dim, 1))


class CAT(nn.Module):
    """Image classifier: conv patch embedding, blocks on the (H, W) grid, final LayerNorm, pooling, head.

    forward(images (B, 3, R, R')) -> logits (B, num_classes), for any R, R' divisible by the patch; the grid is
    (H, W) = (R / patch, R' / patch). As a backbone, with timm's names (one path: forward is built from them):
        forward_features(images)                  -> (B, H, W, D) grid after the final norm
        forward_head(features, pre_logits=False)  -> logits, or the pooled (B, D) vector
        forward_intermediates(images, indices)    -> [(B, D, H, W)] feature maps of chosen blocks
        reset_classifier(num_classes)             a new head, e.g. to fine-tune on other classes
    """

    def __init__(self, config):
        super().__init__()
        if config.attn == "swin":
            raise ValueError("attn='swin' is built by swin.Swin (torchvision's Swin); use model.build_model(config)")
        self.config = cfg = config
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.dim, cfg.patch)
        else:
            self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch, cfg.patch)     # ViT's patchify
        self.ape = AbsolutePosition(cfg.dim, (cfg.grid, cfg.grid)) if split_scheme(cfg.pos)[0] else None
        # The class token (pool='cls') must sit on the grid for the cross-axis attention: it takes an extra
        # column, one copy per row, and the copies are averaged at the end. The copies are not rotated.
        # Softmax and Performer attention see it once (sequence()), so its copies stay identical.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 1, cfg.dim)) if cfg.pool == "cls" else None
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.depth))
        self.alphas = [imprint_alpha(cfg.imprint, layer, cfg.depth) for layer in range(cfg.depth)]
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.apply(init_weights)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, images):                                       # (B, 3, R, R') -> (B, num_classes)
        return self.forward_head(self.forward_features(images))

    def forward_features(self, images):
        """(B, 3, R, R') -> the grid after the final norm, (B, H, W, D).

        With pool='cls' the class-token column comes along as the last column: (B, H, W + 1, D). As in timm,
        forward_features returns every token and forward_head pools them, so forward = forward_head(
        forward_features) holds for every pool; the class token lives on the grid, so it cannot travel
        separately without a second path. For the pure patch grid use forward_intermediates, which never
        includes it: forward_intermediates(images, [-1], "NHWC", norm=True)[0] is this grid without that column.
        """
        x, embed = self.embed(images)
        for layer in range(len(self.blocks)):
            x = self.run_block(layer, x, embed)
        return self.norm(x)

    def forward_head(self, features, pre_logits=False):
        """Pool forward_features' grid and classify: (B, H, W(+1), D) -> logits (B, num_classes), or with
        pre_logits=True the pooled (B, D) vector that the head would see."""
        if features.dim() != 4 or features.shape[-1] != self.config.dim:
            raise ValueError(f"expected features shaped (B, H, W, {self.config.dim}) as forward_features returns "
                             f"them, got {tuple(features.shape)}")
        if self.config.pool == "mean":
            x = features.mean((1, 2))
        elif self.config.pool == "corner":                           # the released code: bottom-right token
            x = features[:, -1, -1]
        else:
            x = features[:, :, -1].mean(1)                           # the class-token column (one copy per row)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, images, indices=None, output_fmt="NCHW", norm=False):
        """Feature maps of chosen blocks, for dense heads (detection, segmentation): a list of (B, D, H, W),
        or (B, H, W, D) with output_fmt="NHWC", in the order of `indices`.

        indices: block indices (negative count from the end), an int n for the last n blocks, or None for all.
        norm=True passes each map through the final LayerNorm. The class-token column is never included, and
        blocks after the deepest one asked for are not run.
        """
        take = take_indices(indices, len(self.blocks))
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        x, embed = self.embed(images)
        maps = {}
        for layer in range(max(take) + 1):
            x = self.run_block(layer, x, embed)
            if layer in take:
                maps[layer] = self.norm(x) if norm else x
        W = images.shape[3] // self.config.patch                     # drops the class-token column, if any
        maps = [maps[layer][:, :, :W] for layer in take]             # (B, H, W, D) each
        return maps if output_fmt == "NHWC" else [m.permute(0, 3, 1, 2) for m in maps]

    def embed(self, images):
        """Images -> (x, E): the patch grid with positions (and the class-token column), and the imprint E."""
        check_images(images, self.config.patch)
        # channels-last in, so that the permuted embedding is contiguous: (B, H, W, D) all the way down. The
        # residual stream keeps the weights' dtype under autocast (fp32, as in timm and nanoGPT): only the
        # matmuls run in bf16.
        x = self.patch_embed(images.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        x = x.to(self.norm.weight.dtype)
        if self.ape is not None:
            x = self.ape(x)
        if self.cls_token is not None:
            B, H = x.shape[:2]
            x = torch.cat([x, self.cls_token.expand(B, H, 1, -1).to(x.dtype)], 2)  # (B, H, W+1, D)
        return x, x                                                  # E is the input of block 0 (paper Table 4)

    def run_block(self, layer, x, embed):
        """Block `layer` on the grid x (B, H, W(+1), D), with activation checkpointing when configured."""
        block, alpha, cls_column = self.blocks[layer], self.alphas[layer], self.cls_token is not None
        if self.config.grad_checkpoint and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            # Keep only the block's inputs and recompute its activations in the backward pass. Non-reentrant:
            # plain Python arguments (alpha, cls_column) pass through, and the RNG state is restored before the
            # recomputation, so dropout and drop_path draw the same masks twice and the gradients are exact.
            return checkpoint(block, x, embed, alpha, cls_column, use_reentrant=False)
        return block(x, embed, alpha, cls_column)

    def reset_classifier(self, num_classes):
        """A new, freshly initialised head for num_classes (to fine-tune on other classes), on the old head's
        device and dtype; every other weight stays as it is. config.num_classes follows (a copy: a preset the
        model was built from is left alone)."""
        from dataclasses import replace
        self.config = replace(self.config, num_classes=num_classes)  # validates num_classes
        old = self.head.weight
        self.head = nn.Linear(self.config.dim, num_classes, device=old.device, dtype=old.dtype)
        init_weights(self.head)

    def param_groups(self, weight_decay):
        """AdamW groups: decay only matrices and conv kernels; not norms, biases, positional tables,
        RoPE-Mixed frequencies or the class token."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            positional = name.startswith(("ape.", "cls_token")) or ".pos." in name
            (no_decay if p.dim() < 2 or positional else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def check_images(images, patch):
    """The one input check of every entry point (CAT's and Swin's): a clear ValueError rather than a shape error
    deep inside."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images shaped (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[2] % patch or images.shape[3] % patch:
        raise ValueError(f"image size {tuple(images.shape[2:])} is not divisible by the patch size {patch}")


def take_indices(indices, depth):
    """forward_intermediates' `indices` (None: all; an int n: the last n; or a list, negative counting from the
    end) as a list of numbers in 0..depth-1, in the order asked, or a clear ValueError."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 1 <= indices <= depth:
            raise ValueError(f"indices={indices}: an int n means the last n, 1 <= n <= depth = {depth}")
        return list(range(depth - indices, depth))
    if (not isinstance(indices, (list, tuple)) or not indices or
            any(not isinstance(i, int) or isinstance(i, bool) or not -depth <= i < depth for i in indices)):
        raise ValueError(f"indices must be None, an int n (the last n) or a non-empty list of indices "
                         f"in [{-depth}, {depth}), got {indices!r}")
    return [i % depth for i in indices]


def init_weights(module):
    """Truncated-normal (std 0.02) linear and patch weights with zero biases, as in ViT/DeiT: small enough
    that the unscaled cross-axis products start tame, and the usual choice for the baselines."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_model(config):
    """CAT(config), or for attn='swin' the torchvision-based Swin of swin.py, for attn='resnet18' torchvision's
    resnet18 (resnet.py); each imported only then, so that this file still needs nothing but torch."""
    if config.attn == "swin":
        from swin import Swin
        return Swin(config)
    if config.attn == "resnet18":
        from resnet import ResNet18
        return ResNet18(config)
    return CAT(config)


def count_flops(config, height, width=None):
    """Forward FLOPs for one image (2 per multiply-add), counted by torch.utils.flop_counter on the meta
    device: matmuls, convolutions and attention kernels; element-wise work is not counted."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build_model(config)
        images = torch.empty(1, 3, height, width or height)
    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def config_from_dict(values):
    """A CATConfig from a plain dict (e.g. a checkpoint's), refusing unknown fields by name."""
    known = {f.name for f in fields(CATConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown CATConfig fields: {', '.join(unknown)}")
    return CATConfig(**values)
