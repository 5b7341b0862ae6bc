"""Images as tokens: patchify / unpatchify, patch embedding, position embeddings (lesson 02).

The patch layout inside a token is (p, p, C), as in U-ViT and DiT: token n of image b holds
the p*p pixels of one patch, each pixel's C channels together.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


def check_patchable(height: int, width: int, patch_size: int) -> None:
    """Raise a learner-friendly error when an image cannot be cut into whole patches."""
    for name, n in (("height", height), ("width", width)):
        if n % patch_size:
            lo, hi = n - n % patch_size, n - n % patch_size + patch_size
            lo, hi = (lo, hi) if lo else (hi, hi + patch_size)  # smaller than one patch: two sizes up
            raise ValueError(
                f"image {name} {n} is not divisible by patch size {patch_size}; use {lo} or {hi}"
            )


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C] tokens, row-major over the patch grid."""
    if x.ndim != 4:
        raise ValueError(f"patchify expects images [B, C, H, W], got shape {tuple(x.shape)}")
    check_patchable(x.shape[2], x.shape[3], patch_size)
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int, height: int | None = None,
               width: int | None = None) -> torch.Tensor:
    """[B, N, p*p*C] -> [B, C, H, W]. A square grid is assumed unless height/width are given."""
    b, n, d = tokens.shape
    if d != patch_size * patch_size * channels:
        raise ValueError(f"token width {d} != patch_size^2 * channels = {patch_size}^2 * {channels}")
    if height is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} tokens do not form a square grid; pass height and width")
        h = w = side
    else:
        h, w = height // patch_size, (width or height) // patch_size
        if h * w != n:
            raise ValueError(f"{n} tokens do not fill a {h}x{w} patch grid")
    return rearrange(tokens, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, w=w, p1=patch_size, p2=patch_size)


class PatchEmbed(nn.Module):
    """Cut an image into p x p patches and map each to a D-dim token: a Conv2d with stride p.

    The convolution is the same map as ``nn.Linear(p*p*C, D)`` applied to ``patchify(x, p)``
    (lesson 02 checks it); a convolution avoids materialising the patches.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}")
        check_patchable(x.shape[2], x.shape[3], self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed 1-D sin-cos embedding (Vaswani et al. 2017): [N] -> [N, dim], order [sin, cos]."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid_h * grid_w, dim] (MAE / DiT).

    The first half of the channels encodes the x (column) coordinate, the second half the y
    (row) coordinate; tokens run row-major, like ``patchify``.
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, xs.reshape(-1)), sincos_1d(dim // 2, ys.reshape(-1))], dim=1)
    return emb.float()


class LearnedPosEmbed(nn.Module):
    """A learned position embedding, one D-vector per token (U-ViT, TLD): [1, N, D]."""

    def __init__(self, num_tokens: int, dim: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"{x.shape[1]} tokens, but the position embedding has {self.weight.shape[1]}")
        return x + self.weight
