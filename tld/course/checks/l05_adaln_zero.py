"""Checkers of lesson 05, adaLN-Zero: ``modulate`` and the residual gate."""

from __future__ import annotations

import torch

from ...blocks import AdaLNZeroBlock, modulate
from .common import _call, _close, _compare, _gen, _ok, checker


@checker("modulate")
def check_modulate(fn) -> None:
    """``fn(x, shift, scale) -> x * (1 + scale) + shift`` with x [B, N, D], shift/scale [B, D]."""
    g = _gen(6)
    cases = [(2, 5, 8), (3, 4, 6), (1, 7, 16)]  # N != B, so a missing unsqueeze shows
    worst = 0.0
    for b, n, d in cases:
        x, shift, scale = torch.randn(b, n, d, generator=g), torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
        case = f"x {(b, n, d)}, shift and scale {(b, d)}"
        formula = x * (1 + scale[:, None]) + shift[:, None]

        def hint(got, exp, x=x, shift=shift, scale=scale):
            if _close(got, x * scale[:, None] + shift[:, None]):
                return "use (1 + scale): a zero scale must leave x unchanged, so zero-init starts as a plain LayerNorm"
            if _close(got, (x + shift[:, None]) * (1 + scale[:, None])):
                return "scale first, then shift: x * (1 + scale) + shift"
            return ("shift and scale are one vector per sample [B, D]; x is [B, N, D]: they must apply to every "
                    "token", "insert a token axis: shift[:, None] has shape [B, 1, D]")

        got = _call("modulate", fn, case, x, shift, scale)
        worst = max(worst, _compare("modulate", got, formula, case, hint=hint))
        worst = max(worst, _compare("modulate", got, modulate(x, shift, scale), case))
    _ok("modulate", len(cases), "x * (1 + scale) + shift and tld.blocks.modulate", worst)


@checker("gate")
def check_gate(fn) -> None:
    """``fn(x, gate, branch) -> x + gate * branch`` with x, branch [B, N, D] and gate [B, D].

    Checked inside a DiT block: your gate replaces both residual gates of
    ``tld.blocks.AdaLNZeroBlock`` (with a non-zero, random modulation).
    """
    g = _gen(7)
    cases = [(2, 5, 16), (3, 4, 8)]
    worst = 0.0
    for b, n, d in cases:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1000, (1,), generator=g)))
            block = AdaLNZeroBlock(d, num_heads=2).eval()
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.5)  # not zero: gates matter
        x, c = torch.randn(b, n, d, generator=g), torch.randn(b, d, generator=g)
        case = f"x {(b, n, d)}, gate {(b, d)}, inside AdaLNZeroBlock({d})"
        with torch.no_grad():
            expected = block(x, c)
            sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=-1)
            branch = block.attn(modulate(block.norm1(x), sh1, sc1))
            h = _call("gate", fn, case, x, g1, branch)
            got = h
            if torch.is_tensor(h) and h.shape == x.shape:
                got = _call("gate", fn, case, h, g2, block.mlp(modulate(block.norm2(h), sh2, sc2)))

        def hint(got, exp, x=x, g1=g1, branch=branch, h=h):
            if _close(h, g1[:, None] * branch):
                return "keep the residual: x + gate * branch (a zero gate must give back x: the identity)"
            if _close(h, x + branch):
                return "multiply the branch by the gate before adding it"
            return ("gate is one vector per sample [B, D]; branch is [B, N, D]: it must apply to every token",
                    "insert a token axis: gate[:, None] has shape [B, 1, D]")

        worst = max(worst, _compare("gate", got, expected, case, atol=1e-5, rtol=1e-4, hint=hint))
    _ok("gate", len(cases), "x + gate * branch inside tld.blocks.AdaLNZeroBlock", worst)
