"""Checkers of lesson 11, U-DiT: the sub-grid split, folding the FFN's depthwise kernels, the cost of attention."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ...blocks import Attention
from ...models.udit import DownsampledAttention, RepFFN, split_subgrids
from .common import CheckError, _call, _close, _compare, _gen, _ok, _scalar, checker


@checker("split_subgrids")
def check_split_subgrids(fn) -> None:
    """``fn(x) -> [B, 4, (H/2)(W/2), C]``: the four stride-2 sub-grids of a feature map [B, C, H, W]; sub-grid
    2a + b holds the pixels (2i + a, 2j + b), tokens row by row, channels last."""
    g = _gen(40)
    cases = [(1, 1, 2, 2), (2, 3, 4, 6), (1, 8, 8, 8)]
    worst = 0.0
    for shape in cases:
        x = torch.randn(shape, generator=g)
        case = f"x {shape}"

        def hint(got, exp, x=x):
            if got.shape == exp.shape and _close(got[:, [0, 2, 1, 3]], exp, 0):
                return "sub-grid 2a + b has row offset a and column offset b: (0, 1) comes before (1, 0)"
            if got.shape == exp.shape and _close(got.sort(-2).values, exp.sort(-2).values, 0):
                return "each sub-grid's tokens run row by row (i, then j), like patchify's"
            if got.shape == exp.shape and _close(got.flatten().sort().values, exp.flatten().sort().values, 0):
                return "the right numbers in the wrong places: channels last, one token per sub-grid pixel"
            return ("four half-resolution copies: every second row and column, starting at offsets (0, 0), (0, 1), "
                    "(1, 0), (1, 1)", "slicing x[:, :, a::2, b::2], then flatten the grid and move channels last")

        got = _call("split_subgrids", fn, case, x.clone())
        worst = max(worst, _compare("split_subgrids", got, split_subgrids(x), case, atol=0, rtol=0, hint=hint))
    _ok("split_subgrids", len(cases), "tld.models.udit.split_subgrids", worst)


@checker("fold_kernels")
def check_fold_kernels(fn) -> None:
    """``fn(k5, k3, k1) -> k``: one depthwise 5x5 kernel [C, 1, 5, 5] equal to identity + dw5 + dw3 + dw1, the
    branches of U-DiT's training FFN (kernels [C, 1, 5, 5], [C, 1, 3, 3], [C, 1, 1, 1])."""
    g = _gen(41)
    cases = [1, 2, 8]  # hidden channels 2, 4, 16
    worst = 0.0
    for c in cases:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1000, (1,), generator=g)))
            ffn = RepFFN(c, ratio=2.0)
        k5, k3, k1 = (m.weight.detach().clone() for m in (ffn.dw5, ffn.dw3, ffn.dw1))
        c = k5.shape[0]
        case = f"k5 {tuple(k5.shape)}, k3 {tuple(k3.shape)}, k1 {tuple(k1.shape)}"
        expected = ffn.merged().dwconv.weight.detach()

        def hint(got, exp, k5=k5, k3=k3, k1=k1):
            no_id = exp.clone()
            no_id[:, :, 2, 2] -= 1
            if _close(got, no_id, 1e-6):
                return "the branch sum also holds h itself (h + dw5 h + ...): the identity is a 1 at the kernel's centre"
            if got.shape == exp.shape and _close(got.sum((2, 3)), exp.sum((2, 3)), 1e-6):
                return "a smaller kernel sits at the centre of the 5x5: the 3x3 covers rows and columns 1..3"
            return ("convolution is linear in its kernel: the sum of the branches is one conv whose kernel is the sum "
                    "of the kernels, each padded to 5x5 around its centre",
                    "clone k5, add k3 into the central 3x3 window and k1 plus 1 at the centre")

        got = _call("fold_kernels", fn, case, k5.clone(), k3.clone(), k1.clone())
        worst = max(worst, _compare("fold_kernels", got, expected, case, atol=1e-6, rtol=1e-6, hint=hint))
        x = torch.randn(1, c, 6, 6, generator=g)
        with torch.no_grad():
            branches = x + ffn.dw5(x) + ffn.dw3(x) + ffn.dw1(x)
            folded = torch.nn.functional.conv2d(x, got, ffn.dw5.bias + ffn.dw3.bias + ffn.dw1.bias, padding=2,
                                                groups=c)
        worst = max(worst, _compare("fold_kernels", folded, branches, case + ", applied to a 6x6 map",
                                    atol=1e-5, rtol=1e-5))
    _ok("fold_kernels", len(cases), "tld.models.udit.RepFFN.merged() (and the four branches' output)", worst)


def _flops(side: int, width: int = 64, heads: int = 2) -> float:
    with torch.device("meta"):
        full, down = Attention(width, heads, qkv_bias=True), DownsampledAttention(width, heads)
        x = torch.randn(1, width, side, side)
        out = []
        for m, inp in ((full, x.flatten(2).transpose(1, 2)), (down, x)):
            with FlopCounterMode(display=False) as counter:
                m(inp)
            out.append(counter.get_total_flops())
    return out[1] / out[0]


HALF_COST_SIDE = 32   # width 64, 2 heads: downsampled / full FLOPs 0.53 at 16x16, 0.34 at 32x32


@checker("flop_ratio")
def check_flop_ratio(fn) -> None:
    """``fn(side) -> float``: total FLOPs of one ``DownsampledAttention(64, 2)`` forward over those of one full
    ``Attention(64, 2, qkv_bias=True)`` on a side x side map (counted by ``FlopCounterMode`` on the meta device)."""
    found = {}
    for side in (8, 16):
        case = f"a {side}x{side} map, width 64, 2 heads"
        expected = torch.tensor(_flops(side), dtype=torch.float64)

        def hint(got, exp):
            if got.item() > 1:
                return "downsampled over full, not full over downsampled"
            return ("count both layers' total FLOPs (projections, convs and attention), full attention on the "
                    "[1, N, C] tokens, the downsampled layer on the [1, C, H, W] map",
                    "FlopCounterMode(display=False) around each forward, .get_total_flops(), modules built under "
                    "torch.device('meta')")

        got = _scalar("flop_ratio", _call("flop_ratio", fn, case, side), case)
        _compare("flop_ratio", got, expected, case, atol=1e-6, rtol=1e-6, hint=hint)
        found[side] = got.item()
    for side in (4, 32, 64):
        found[side] = _scalar("flop_ratio", fn(side), f"side {side}").item()
    half = min(s for s, r in found.items() if r < 0.5)
    if half != HALF_COST_SIDE:
        raise CheckError(f"check_flop_ratio: half the cost first at side {half}, expected {HALF_COST_SIDE}: {found}")
    _ok("flop_ratio", 2, "FlopCounterMode on the two layers", 0.0)
    print("  answer: " + ", ".join(f"{s}x{s}: {r:.2f}" for s, r in sorted(found.items()))
          + f"; below half the cost from {half}x{half} on: the projections dominate small maps")
