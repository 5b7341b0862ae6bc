"""Checkers of lesson 05, adaLN-Zero: ``modulate`` and the residual gate."""

from __future__ import annotations

import torch

from ...blocks import AdaLNZeroBlock, modulate
from .common import CheckError, _call, _close, _compare, _gen, _ok, _scalar, checker


@checker("modulate")
def check_modulate(fn) -> None:
    """``fn(x, shift, scale) -> x * (1 + scale) + shift`` with x [B, N, D], shift/scale [B, D]."""
    g = _gen(6)
    cases = [(3, 4, 6), (2, 5, 8), (1, 7, 16)]  # smallest first; N != B, so a missing unsqueeze shows
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


def _random_block(seed: int, d: int, zero: bool = False):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        block = AdaLNZeroBlock(d, num_heads=2).eval()
        if not zero:
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.5)
            torch.nn.init.normal_(block.adaLN_modulation[-1].bias, std=0.5)
    return block


def _block_variant(block, x, c, order=(0, 1, 2, 3, 4, 5), gates=True):
    parts = block.adaLN_modulation(c).chunk(6, dim=-1)
    sh1, sc1, g1, sh2, sc2, g2 = (parts[i] for i in order)
    h = block.attn(modulate(block.norm1(x), sh1, sc1))
    x = x + (g1[:, None] * h if gates else h)
    h = block.mlp(modulate(block.norm2(x), sh2, sc2))
    return x + (g2[:, None] * h if gates else h)


@checker("dit_block")
def check_dit_block(fn) -> None:
    """``fn(block, x, c) -> [B, N, D]``: the forward of a ``tld.blocks.AdaLNZeroBlock`` written from its parts
    (``norm1``, ``attn``, ``norm2``, ``mlp``, ``adaLN_modulation``), with a non-zero modulation."""
    g = _gen(27)
    cases = [(1, 2, 8), (2, 5, 16), (3, 4, 32)]
    worst = 0.0
    for b, n, d in cases:
        block = _random_block(int(torch.randint(1000, (1,), generator=g)), d)
        x, c = torch.randn(b, n, d, generator=g), torch.randn(b, d, generator=g)
        case = f"x {(b, n, d)}, c {(b, d)}, AdaLNZeroBlock({d}) with a random (non-zero) modulation"
        with torch.no_grad():
            expected = block(x, c)
            got = _call("dit_block", fn, case, block, x, c)

        def hint(got, exp, block=block, x=x, c=c):
            with torch.no_grad():
                if _close(got, _block_variant(block, x, c, gates=False)):
                    return "each branch is multiplied by its gate before the residual add (the 'Zero' of adaLN-Zero)"
                if _close(got, _block_variant(block, x, c, order=(1, 0, 2, 4, 3, 5))):
                    return "the six chunks come in the order shift, scale, gate (attention), then shift, scale, gate (MLP)"
                if _close(got, _block_variant(block, x, c, order=(3, 4, 5, 0, 1, 2))):
                    return "the first three chunks modulate the attention branch, the last three the MLP"
            return ("two residual branches, attention then MLP; each normalises x, modulates it with its own shift "
                    "and scale, and adds the branch scaled by its gate",
                    "the modulation's output splits into six equal pieces along its last axis; the MLP branch reads x "
                    "after the attention update")

        worst = max(worst, _compare("dit_block", got, expected, case, atol=1e-5, rtol=1e-4, hint=hint))
    _ok("dit_block", len(cases), "tld.blocks.AdaLNZeroBlock.forward", worst)


ZERO_GRAD_SHARE = (0.8, 0.95)   # AdaLNZeroBlock(32, 4) at init: 88.8% of its numbers get no gradient


def _zero_grad_fraction(block, x, c) -> float:
    block.zero_grad(set_to_none=True)
    block(x, c).pow(2).sum().backward()
    total = sum(p.numel() for p in block.parameters())
    zero = sum(p.numel() if p.grad is None else int((p.grad == 0).sum()) for p in block.parameters())
    block.zero_grad(set_to_none=True)
    return zero / total


@checker("zero_grad_fraction")
def check_zero_grad_fraction(fn) -> None:
    """``fn(block, x, c) -> float``: after ``block(x, c).pow(2).sum().backward()``, the fraction of the block's
    parameter numbers whose gradient is exactly 0 (None counts as 0)."""
    g = _gen(28)
    found = None
    for d, zero in ((8, False), (16, True), (32, True)):
        block = _random_block(int(torch.randint(1000, (1,), generator=g)), d, zero=zero).train()
        x, c = torch.randn(2, 5, d, generator=g), torch.randn(2, d, generator=g)
        case = f"AdaLNZeroBlock({d}, 2) {'at its adaLN-Zero init' if zero else 'with a random modulation'}, x {(2, 5, d)}"
        expected = torch.tensor(_zero_grad_fraction(block, x, c), dtype=torch.float64)

        def hint(got, exp):
            return ("count numbers, not tensors: a tensor can have some zero and some non-zero gradient entries; "
                    "a parameter without a .grad got none", "(p.grad == 0).sum() per parameter, over the total numel")

        got = _scalar("zero_grad_fraction", _call("zero_grad_fraction", fn, case, block, x, c), case)
        _compare("zero_grad_fraction", got, expected, case, atol=1e-9, rtol=0, hint=hint)
        found = got.item()
    if not ZERO_GRAD_SHARE[0] <= found <= ZERO_GRAD_SHARE[1]:
        raise CheckError(f"check_zero_grad_fraction: {found:.3f} outside {ZERO_GRAD_SHARE}")
    _ok("zero_grad_fraction", 3, "a count of zero gradients after one backward", 0.0)
    print(f"  answer: at init {found:.1%} of AdaLNZeroBlock(32)'s numbers get no gradient: with every gate 0 only "
          f"the modulation's last Linear learns on the first step, and opens the gates")
