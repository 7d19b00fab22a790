"""Swin Transformer as an attention family beside CAT, built on torchvision's Swin, with RoPE inside windows.

torchvision (`torchvision.models.swin_transformer`) provides the model: patch embedding, stages of
shifted-window blocks with a relative position bias (RPB), patch merging, the v2 blocks (scaled cosine attention
with a continuous position bias) and the head. This file adds what it lacks, as the RoPE-ViT paper (Heo et al.
2024) does for Swin: the `axial` and `mixed` rotations of rope2d.py applied to q and k inside each window, with or
without the RPB. `Swin` takes a model.CATConfig with attn='swin' and offers the same interface as model.CAT.

Config fields used: `pos` (below), `dim` and `heads` for stage 1 (both double at every stage; the head width
stays dim/heads), `stages` (blocks per stage), `window`, `patch`, `mlp_ratio`, `dropout`, `drop_path` (torchvision's
stochastic depth, rising linearly to it over the blocks), `num_classes`, `grad_checkpoint` (per block). `pool` must
be 'mean' (Swin averages its last feature map) and `stem` 'patch'. `img_size` is only the training size. Ignored:
`depth` and CAT's own `axis`, `form`, `mid_norm`, `imprint`, `performer_kernel`, `performer_features`.

`pos` choices:
  rpb                torchvision's Swin exactly (`swin-t` with it is torchvision.models.swin_t; test_swin.py checks)
  axial, mixed       RoPE inside windows instead of the RPB
  rpb+axial, ...     both
  swinv2             torchvision's v2 blocks and PatchMergingV2 (use window 8 for swin_v2_t's sizes)

Resolution rule (torchvision's, and RoPE-ViT's Swin): the window stays `window` x `window` patches in every
stage and at every image size, so a larger image gets more windows, not larger ones. A stage whose grid is not a
multiple of the window is zero-padded at the bottom and right (the padded tokens take part as keys, as in
torchvision and the original Swin); along an axis where the padded grid is no larger than the window there is a
single window and the shift is switched off. RoPE coordinates are local to the window (0 .. window-1 on each
axis), so every window and every resolution sees the same angles: RoPE inside windows neither extrapolates nor
interpolates; what changes with the image size is how much of the image one window covers. (Coordinates on the
whole grid would give the same scores, RoPE being relative and the shift mask keeping wrapped strips apart; local
ones keep the angles small and one table serves every window.) Any image size divisible by the patch works,
non-square included (patch merging pads odd grids).
"""
import dataclasses
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.swin_transformer import (PatchMerging, PatchMergingV2, ShiftedWindowAttention,
                                                 SwinTransformer, SwinTransformerBlock, SwinTransformerBlockV2)

import rope2d
from model import check_images, take_indices

# Positional parameters, kept out of weight decay: the RPB table, v2's logit scale and the whole continuous
# position bias MLP (as the Swin V2 code does), RoPE-Mixed frequencies.
POSITIONAL = ("relative_position_bias_table", "logit_scale", "cpb_mlp", "rope.freqs")


# ----------------------------------------------------------------------------------------------
# Windows

def partition(x, wh, ww):
    """(B, Hp, Wp, C) -> (B * nW, wh * ww, C): windows in row-major order, batch outermost."""
    B, Hp, Wp, C = x.shape
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, C).transpose(2, 3)       # (B, Hp/wh, Wp/ww, wh, ww, C)
    return x.reshape(-1, wh * ww, C)


def unpartition(windows, B, Hp, Wp, wh, ww):
    """Inverse of partition: (B * nW, wh * ww, C) -> (B, Hp, Wp, C)."""
    x = windows.view(B, Hp // wh, Wp // ww, wh, ww, -1).transpose(2, 3)  # (B, Hp/wh, wh, Wp/ww, ww, C)
    return x.reshape(B, Hp, Wp, -1)


def shift_mask(Hp, Wp, window, shift, device):
    """Additive mask of a shifted block, (nW, 1, N, N): -inf between tokens of one window that were not
    neighbours before the cyclic roll, 0 elsewhere.

    After rolling by -s, the last s rows are the top rows wrapped around; the last row of windows mixes them with
    the bottom rows. Each row gets the label of the strip it lies in, 0: [0, Hp - wh) (no window there holds
    wrapped rows), 1: [Hp - wh, Hp - s), 2: [Hp - s, Hp) (the wrapped rows); likewise for columns. Two tokens
    may attend to each other only if both labels agree.
    """
    def strips(size, w, s):
        i = torch.arange(size, device=device)
        return (i >= size - w).long() + (i >= size - s).long()

    label = strips(Hp, window[0], shift[0])[:, None] * 3 + strips(Wp, window[1], shift[1])   # (Hp, Wp)
    label = partition(label[None, :, :, None], *window).squeeze(-1)                            # (nW, N)
    blocked = label[:, :, None] != label[:, None, :]                                           # (nW, N, N)
    return torch.zeros(blocked.shape, device=device).masked_fill(blocked, float("-inf")).unsqueeze(1)


class WindowRoPEAttention(ShiftedWindowAttention):
    """torchvision's shifted-window attention with RoPE inside each window, with or without its RPB.

    The functional shifted_window_attention has no hook between the qkv projection and the scores, so the window
    attention is written out here, step for step as torchvision does it (pad, roll, partition, attend, merge,
    roll back, crop), with q and k rotated by window-local coordinates and scaled_dot_product_attention taking
    the RPB and the shift mask as attn_mask. With the rotation at zero angles it computes torchvision's output.
    """

    def __init__(self, dim, window_size, shift_size, num_heads, *, rotary, rpb, **kwargs):
        if rotary not in ("axial", "mixed"):
            raise ValueError(f"rotary must be 'axial' or 'mixed', got {rotary!r}")
        super().__init__(dim, window_size, shift_size, num_heads, **kwargs)
        self.rpb = rpb
        if not rpb:                                                    # RoPE alone: no table to learn
            del self.relative_position_bias_table, self.relative_position_index
        self.head_dim = dim // num_heads
        self.rope = rope2d.MixedFrequencies(num_heads, self.head_dim) if rotary == "mixed" else None

    def angles(self, device):
        """Angles of the window's tokens in row-major order, (h or 1, N, d/2). Coordinates are local to the
        window, so all windows, shifted or not, and all resolutions share them."""
        wh, ww = self.window_size
        if self.rope is None:
            return rope2d.axial_angles(wh, ww, self.head_dim, device=device).flatten(1, 2)
        return self.rope(wh, ww).flatten(1, 2)

    def rotate(self, q, k):                                            # (B * nW, h, N, d) each
        angles = self.angles(q.device)
        return rope2d.rotate(q, angles, interleaved=True), rope2d.rotate(k, angles, interleaved=True)

    def attention_bias(self, Hp, Wp, shift, batch, dtype, device):
        """What SDPA adds to the scaled scores: the RPB (1, h, N, N) and, in a shifted block, the shift mask,
        repeated over the batch to (B * nW, ., N, N) to follow partition's order (a 4-D mask keeps SDPA's fused
        kernels available). None when neither applies."""
        bias = self.get_relative_position_bias() if self.rpb else None
        if any(shift):
            mask = shift_mask(Hp, Wp, self.window_size, shift, device)            # (nW, 1, N, N)
            bias = (mask if bias is None else bias + mask).repeat(batch, 1, 1, 1)
        return None if bias is None else bias.to(dtype)

    def forward(self, x):                                              # (B, H, W, C)
        B, H, W, C = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, -W % ww, 0, -H % wh))                   # (B, Hp, Wp, C), whole windows
        Hp, Wp = x.shape[1:3]
        # No shift along an axis that one window already covers: there is nothing to connect.
        shift = [s if w < n else 0 for s, w, n in zip(self.shift_size, self.window_size, (Hp, Wp))]
        if any(shift):
            x = torch.roll(x, (-shift[0], -shift[1]), (1, 2))
        qkv = self.qkv(partition(x, wh, ww)).unflatten(-1, (3, self.num_heads, self.head_dim))  # (B*nW, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # (B * nW, h, N, d) each
        q, k = self.rotate(q, k)
        bias = self.attention_bias(Hp, Wp, shift, B, q.dtype, q.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        o = F.dropout(self.proj(o.transpose(1, 2).flatten(2)), self.dropout, self.training)   # (B * nW, N, C)
        x = unpartition(o, B, Hp, Wp, wh, ww)                          # (B, Hp, Wp, C)
        if any(shift):
            x = torch.roll(x, shift, (1, 2))
        return x[:, :H, :W]


def swin_layers(pos):
    """torchvision's block and patch merging for a `pos` choice (the block builds its own attention)."""
    if pos == "swinv2":
        return SwinTransformerBlockV2, PatchMergingV2
    if pos == "rpb":
        return SwinTransformerBlock, PatchMerging
    attention = partial(WindowRoPEAttention, rotary=pos.removeprefix("rpb+"), rpb=pos.startswith("rpb+"))
    return partial(SwinTransformerBlock, attn_layer=attention), PatchMerging


# ----------------------------------------------------------------------------------------------
# Model

class Swin(SwinTransformer):
    """torchvision's SwinTransformer built from a CATConfig, with CAT's interface.

    forward(images (B, 3, R, R')) -> logits (B, num_classes), for any R, R' divisible by the patch. Module names
    are torchvision's, so torchvision checkpoints of the same sizes load as they are: `features` (the patch
    embedding, then the stages with a patch merging between each two), `norm`, `head`.
    """

    def __init__(self, config):
        if config.attn != "swin":
            raise ValueError(f"Swin needs attn='swin', got {config.attn!r}")
        if config.pool != "mean":
            raise ValueError(f"pool must be 'mean' for attn='swin' (Swin averages its last feature map), "
                             f"got {config.pool!r}")
        if sum(config.stages) < 2:   # torchvision spreads drop_path over sum(stages) - 1 steps
            raise ValueError(f"stages must hold at least 2 blocks in all, got {config.stages}")
        block, merging = swin_layers(config.pos)
        super().__init__(patch_size=[config.patch] * 2, embed_dim=config.dim, depths=list(config.stages),
                         num_heads=[config.heads * 2 ** i for i in range(len(config.stages))],
                         window_size=[config.window] * 2, mlp_ratio=config.mlp_ratio, dropout=config.dropout,
                         stochastic_depth_prob=config.drop_path, num_classes=config.num_classes,
                         block=block, downsample_layer=merging)
        self.config = config

    def forward(self, images):
        return self.forward_head(self.forward_features(images))

    def forward_features(self, images):
        """(B, 3, R, R') -> the last stage after the final norm, (B, R/(p*2^(S-1)), R'/(p*2^(S-1)), C),
        sizes rounded up at each patch merging."""
        return self.forward_intermediates(images, [-1], output_fmt="NHWC", norm=True)[0]

    def forward_head(self, features, pre_logits=False):
        """(B, H, W, C) -> mean-pooled (B, C) if pre_logits, else logits (B, num_classes)."""
        x = self.flatten(self.avgpool(self.permute(features)))        # torchvision's pooling, for exact logits
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, images, indices=None, output_fmt="NCHW", norm=False):
        """model.CAT's interface, with stages for blocks: the output of each stage in `indices` (None: all; an
        int n: the last n; negative counts from the end), before the patch merging that follows it, as a list
        of (B, C, H, W) maps (output_fmt 'NCHW') or (B, H, W, C) ('NHWC'), in the order of `indices`. norm=True
        passes the last stage through the final norm (forward_features' grid); the other stages have other
        widths and no norm of their own, and are returned as they are."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        stages = self.features[1::2]                                   # features: embed, stage, merge, stage, ...
        take = take_indices(indices, len(stages))
        check_images(images, self.config.patch)
        # The residual stream keeps the weights' dtype under autocast (fp32, as in model.CAT): the patch
        # embedding and every patch merging end in a bf16 matmul. A bf16 stream, and the embedding's LayerNorm
        # on bf16, put 6-9% relative error into the gradients, against 0.4% for CAT (test_numerics.py).
        dtype = self.head.weight.dtype
        conv, to_channels_last, embed_norm = self.features[0]
        x = embed_norm(to_channels_last(conv(images)).to(dtype))       # (B, H, W, C) patch embedding + norm
        maps = {}
        for i, stage in enumerate(stages[:max(take) + 1]):            # no further than needed
            if i:
                x = self.features[2 * i](x).to(dtype)                  # patch merging: grid / 2, width * 2
            x = self.run_stage(stage, x)
            if i in take:
                maps[i] = self.norm(x) if norm and i == len(stages) - 1 else x
        maps = [maps[i] for i in take]
        return maps if output_fmt == "NHWC" else [m.permute(0, 3, 1, 2) for m in maps]

    def run_stage(self, stage, x):
        """The blocks of one stage, each with activation checkpointing when configured (as model.CAT.run_block:
        the RNG state is restored before the recomputation, so stochastic depth drops the same blocks)."""
        if not (self.config.grad_checkpoint and self.training and torch.is_grad_enabled()):
            return stage(x)
        from torch.utils.checkpoint import checkpoint
        for block in stage:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def reset_classifier(self, num_classes):
        """A new, freshly initialised head for num_classes classes (e.g. to fine-tune); the rest is kept."""
        old = self.head
        self.head = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        nn.init.trunc_normal_(self.head.weight, std=0.02)             # torchvision's init of Linear layers
        nn.init.zeros_(self.head.bias)
        self.num_classes = num_classes
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def param_groups(self, weight_decay):
        """AdamW groups: decay only matrices and conv kernels; not norms, biases or positional parameters
        (POSITIONAL: RPB tables, v2's logit scale and position-bias MLP, RoPE-Mixed frequencies)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            positional = any(key in name for key in POSITIONAL)
            (no_decay if p.dim() < 2 or positional else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

