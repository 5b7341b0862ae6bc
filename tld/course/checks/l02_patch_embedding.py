"""Checkers of lesson 02, patch embedding: ``patchify``, ``unpatchify`` and the 2-D sin-cos embedding."""

from __future__ import annotations

import torch

from ...patch import patchify, sincos_2d, unpatchify
from .common import _call, _close, _compare, _gen, _ok, checker


def _same_values_per_token(got: torch.Tensor, exp: torch.Tensor) -> bool:
    return got.shape == exp.shape and torch.allclose(got.sort(-1).values, exp.sort(-1).values)


@checker("patchify")
def check_patchify(fn) -> None:
    """``fn(x, patch_size) -> tokens``: [B, C, H, W] -> [B, (H/p)(W/p), p*p*C], layout (p, p, C)."""
    g = _gen(2)
    cases = [(2, 3, 8, 8, 2), (1, 4, 12, 8, 4), (3, 1, 6, 6, 3), (1, 3, 4, 4, 1)]
    worst = 0.0
    for b, c, h, w, p in cases:
        x = torch.randn(b, c, h, w, generator=g)
        case = f"x of shape {(b, c, h, w)}, patch_size {p}"

        def hint(got, exp, p=p, c=c):
            if _same_values_per_token(got, exp):
                return (f"each token holds the right values in the wrong order: tld lays a token out as "
                        f"(p, p, C) = ({p}, {p}, {c}), the C channels of one pixel together, pixels row by row")
            if got.shape == exp.shape and torch.allclose(got.flatten().sort().values, exp.flatten().sort().values):
                return "the right values, but tokens in the wrong order: walk the patch grid row by row (h, then w)"
            return None

        got = _call("patchify", fn, case, x, p)
        worst = max(worst, _compare("patchify", got, patchify(x, p), case, atol=0, rtol=0, hint=hint))
    _ok("patchify", len(cases), "tld.patch.patchify", worst)


@checker("unpatchify")
def check_unpatchify(fn) -> None:
    """``fn(tokens, patch_size, channels) -> images``: the inverse of patchify on a square grid."""
    g = _gen(3)
    cases = [(2, 3, 8, 2), (1, 4, 12, 4), (3, 1, 6, 3)]
    worst = 0.0
    for b, c, s, p in cases:
        x = torch.randn(b, c, s, s, generator=g)
        tokens = patchify(x, p)
        case = f"tokens of shape {tuple(tokens.shape)} (from images {(b, c, s, s)}), patch_size {p}, channels {c}"

        def hint(got, exp):
            if got.shape == exp.shape and torch.allclose(got.flatten().sort().values, exp.flatten().sort().values):
                return ("the right values in the wrong places: undo patchify's steps in reverse order, "
                        "reading each token as (p, p, C)")
            return None

        got = _call("unpatchify", fn, case, tokens, p, c)
        worst = max(worst, _compare("unpatchify", got, unpatchify(tokens, p, c), case, atol=0, rtol=0, hint=hint))
    _ok("unpatchify", len(cases), "tld.patch.unpatchify (and it inverts patchify)", worst)


@checker("sincos_2d")
def check_sincos_2d(fn) -> None:
    """``fn(dim, grid) -> [grid*grid, dim]``: fixed 2-D sin-cos position embedding (MAE / DiT)."""
    cases = [(8, 2), (16, 4), (64, 8)]
    worst = 0.0
    for dim, grid in cases:
        case = f"dim {dim}, grid {grid}x{grid}"

        def hint(got, exp, dim=dim):
            h = dim // 2
            if _close(got, torch.cat([exp[:, h:], exp[:, :h]], 1)):
                return "x and y are swapped: the first half of the channels encodes x (the column), the second y (the row)"
            q = dim // 4
            swap = torch.cat([exp[:, q:h], exp[:, :q], exp[:, h + q:], exp[:, h:h + q]], 1)
            if _close(got, swap):
                return "in each half put the sines first, then the cosines: [sin, cos]"
            return ("each half of the channels embeds one axis with D/4 frequencies, geometric from 1 down "
                    "toward 1/10000; tokens run row-major like patchify",
                    "per axis: omega has D/4 entries, 10000 ** (-arange(D/4) / (D/4)); outer product with the "
                    "positions 0..grid-1; concatenate sin and cos")

        got = _call("sincos_2d", fn, case, dim, grid)
        worst = max(worst, _compare("sincos_2d", got, sincos_2d(dim, grid), case, atol=1e-5, rtol=1e-5, hint=hint))
    _ok("sincos_2d", len(cases), "tld.patch.sincos_2d", worst)
