"""Checkers of lesson 02, patch embedding: ``patchify``, ``unpatchify`` and the 2-D sin-cos embedding."""

from __future__ import annotations

import torch

from ...patch import patchify, sincos_2d, unpatchify
from .common import CheckError, _call, _close, _compare, _fail, _gen, _ok, _scalar, checker


def _same_values_per_token(got: torch.Tensor, exp: torch.Tensor) -> bool:
    return got.shape == exp.shape and torch.allclose(got.sort(-1).values, exp.sort(-1).values)


@checker("patchify")
def check_patchify(fn) -> None:
    """``fn(x, patch_size) -> tokens``: [B, C, H, W] -> [B, (H/p)(W/p), p*p*C], layout (p, p, C)."""
    g = _gen(2)
    cases = [(1, 3, 4, 4, 1), (2, 3, 8, 8, 2), (3, 1, 6, 6, 3), (1, 4, 12, 8, 4)]  # smallest first
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
    cases = [(3, 1, 6, 3), (2, 3, 8, 2), (1, 4, 12, 4)]
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


@checker("linear_as_conv")
def check_linear_as_conv(fn) -> None:
    """``fn(linear, patch_size, channels) -> nn.Conv2d``: the patch embedding Linear(p*p*C, D) on patchify's
    tokens, as one Conv2d(C, D, kernel p, stride p) on the image (how DiT and U-ViT implement it)."""
    g = _gen(22)
    cases = [(1, 1, 4, 2, 3), (2, 3, 8, 2, 5), (1, 4, 12, 4, 16)]
    worst = 0.0
    for b, c, s, p, d in cases:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1000, (1,), generator=g)))
            linear = torch.nn.Linear(p * p * c, d)
        x = torch.randn(b, c, s, s, generator=g)
        case = f"images {(b, c, s, s)}, patch_size {p}, Linear({p * p * c}, {d})"
        with torch.no_grad():
            expected = linear(patchify(x, p))
            conv = _call("linear_as_conv", fn, case, linear, p, c)
        if not isinstance(conv, torch.nn.Conv2d):
            _fail("linear_as_conv", f"returned {type(conv).__name__}, expected a torch.nn.Conv2d", case)
        if tuple(conv.weight.shape) != (d, c, p, p) or tuple(conv.stride) != (p, p):
            _fail("linear_as_conv", f"conv weight {tuple(conv.weight.shape)} with stride {tuple(conv.stride)}, "
                  f"expected weight {(d, c, p, p)} and stride {(p, p)}", case,
                  "one output position per patch: kernel size and stride are both the patch size")
        with torch.no_grad():
            got = conv(x).flatten(2).transpose(1, 2)

        def hint(got, exp, linear=linear, conv=conv, p=p, c=c):
            w = linear.weight.detach()
            if conv.bias is None or not torch.allclose(conv.bias, linear.bias):
                return "copy the Linear's bias too: every patch gets the same bias"
            if _close(conv.weight, w.reshape(w.shape[0], c, p, p)):
                return ("the Linear reads each token in patchify's layout (p, p, C), channels last; a Conv2d "
                        "weight is [D, C, p, p], channels first: reorder, do not just reshape",
                        "view the weight with the three axes of the token layout, then move the channel axis")
            return ("output token n of the Linear and output position n of the conv must see the same patch with "
                    "the same weights", "compare conv.weight[:, :, i, j] with the Linear's columns of pixel (i, j)")

        worst = max(worst, _compare("linear_as_conv", got, expected, case, atol=1e-5, rtol=1e-5, hint=hint))
    _ok("linear_as_conv", len(cases), "Linear on tld.patch.patchify tokens", worst)


def _neighbour_fraction(emb: torch.Tensor, grid: int) -> float:
    sim = emb.double() @ emb.double().T
    sim.fill_diagonal_(-float("inf"))
    near = sim.argmax(1)
    idx = torch.arange(grid * grid)
    rows, cols = idx // grid, idx % grid
    return (((rows - rows[near]).abs() + (cols - cols[near]).abs()) == 1).double().mean().item()


SMALLEST_FAITHFUL_DIM = 32   # on an 8x8 grid: from D = 32 every position's nearest embedding is a neighbour


@checker("nearest_is_neighbour")
def check_nearest_is_neighbour(fn) -> None:
    """``fn(emb, grid) -> float``: the fraction of the grid*grid positions whose most similar other position
    (dot product of the [grid*grid, D] embeddings, row-major) is one of its 4 neighbours."""
    g = _gen(23)
    cases = [("random", 8, 3), ("sincos", 8, 8), ("sincos", 32, 8), ("sincos", 64, 4)]
    answers = {}
    for kind, dim, grid in cases:
        emb = torch.randn(grid * grid, dim, generator=g) if kind == "random" else sincos_2d(dim, grid)
        case = f"{kind} embedding of dim {dim} on a {grid}x{grid} grid"
        expected = torch.tensor(_neighbour_fraction(emb, grid), dtype=torch.float64)

        def hint(got, exp, emb=emb):
            if got.item() == 1.0 or got.item() == 0.0:
                return "leave each position out of its own search: its own embedding is always the most similar"
            return ("for each position find the most similar other position, then ask whether it is one step up, "
                    "down, left or right (Manhattan distance 1 on the grid)",
                    "set the diagonal of emb @ emb.T to -inf, argmax per row, rows and columns from divmod by grid")

        got = _scalar("nearest_is_neighbour", _call("nearest_is_neighbour", fn, case, emb.clone(), grid), case)
        _compare("nearest_is_neighbour", got, expected, case, atol=1e-9, rtol=0, hint=hint)
    for dim in (8, 16, 32, 64):
        answers[dim] = _scalar("nearest_is_neighbour", fn(sincos_2d(dim, 8), 8), "sincos, grid 8").item()
    smallest = min(d for d, v in answers.items() if v == 1.0)
    if smallest != SMALLEST_FAITHFUL_DIM:
        raise CheckError(f"check_nearest_is_neighbour: smallest faithful dim {smallest}, expected {SMALLEST_FAITHFUL_DIM}")
    _ok("nearest_is_neighbour", len(cases), "a nearest-neighbour count on the embeddings", 0.0)
    print("  answer: on an 8x8 grid, " + ", ".join(f"D={d}: {v:.2f}" for d, v in answers.items())
          + f"; from D = {smallest} the nearest embedding is always a neighbouring patch")
