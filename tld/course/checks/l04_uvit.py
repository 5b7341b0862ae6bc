"""Checkers of lesson 04, U-ViT: the long-skip fusion and the time token."""

from __future__ import annotations

import torch

from ...blocks import Block, timestep_embedding
from .common import _call, _close, _compare, _gen, _ok, checker


@checker("skip_fusion")
def check_skip_fusion(fn) -> None:
    """``fn(x_deep, x_shallow, linear) -> tokens``: U-ViT's fusion Linear(concat([deep, shallow]))."""
    g = _gen(5)
    worst = 0.0
    dims = [(2, 5, 16), (1, 9, 32)]
    for b, n, d in dims:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1000, (1,), generator=g)))
            block = Block(d, num_heads=2, skip="concat").eval()
        x, skip = torch.randn(b, n, d, generator=g), torch.randn(b, n, d, generator=g)
        case = f"x_deep and x_shallow of shape {(b, n, d)}, linear = Linear({2 * d}, {d})"
        with torch.no_grad():
            expected = block(x, skip)
            fused = _call("skip_fusion", fn, case, x, skip, block.skip_linear)
            if torch.is_tensor(fused) and fused.shape == x.shape:
                # run the rest of the library block on your fused tokens
                got = fused + block.attn(block.norm1(fused))
                got = got + block.mlp(block.norm2(got))
            else:
                got = fused
            lin = block.skip_linear

        def hint(got, exp, x=x, skip=skip, lin=lin, fused=fused):
            with torch.no_grad():
                if _close(fused, lin(torch.cat([skip, x], -1))):
                    return "concatenate deep first, then shallow: torch.cat([x_deep, x_shallow], dim=-1)"
                if _close(fused, x + lin(torch.cat([x, skip], -1))):
                    return "the fused tokens replace x_deep (U-ViT adds no residual around the skip Linear)"
                if _close(fused, x + skip):
                    return "that is the additive skip; U-ViT concatenates along channels and applies `linear`"
                if torch.is_tensor(fused) and fused.shape[-1] == 2 * x.shape[-1]:
                    return "after concatenating, apply `linear` to bring 2D channels back to D"
            return ("the fusion sees both token sets side by side in the channels (2D of them) and maps them back "
                    "to D", "torch.cat along dim=-1, then call `linear`")

        worst = max(worst, _compare("skip_fusion", got, expected, case, atol=1e-5, rtol=1e-4, hint=hint))
    _ok("skip_fusion", len(dims), "tld.blocks.Block(skip='concat')", worst)


@checker("timestep_embedding")
def check_timestep_embedding(fn) -> None:
    """``fn(t, dim) -> [B, dim]``: U-ViT's time token, the raw sinusoid of 1000 t, order [cos, sin]."""
    cases = [(torch.tensor([0.0, 0.25, 0.999]), 16), (torch.tensor([0.5]), 64), (torch.tensor([0.1, 0.9]), 8)]
    worst = 0.0
    for t, dim in cases:
        case = f"t = {[round(v, 4) for v in t.tolist()]}, dim {dim}"

        def hint(got, exp, t=t, dim=dim):
            half = dim // 2
            if _close(got, torch.cat([exp[:, half:], exp[:, :half]], 1)):
                return "order: cosines first, then sines, [cos, sin] (the guided-diffusion / U-ViT order)"
            if _close(got, timestep_embedding(t, dim, scale=1.0)):
                return "tld's t is in [0, 1]; embed the reference's integer step 1000 * t"
            return ("dim/2 frequencies, geometric from 1 down toward 1/10000, times the integer step 1000 t; "
                    "cosines first, then sines",
                    "an outer product of the times [B] with the frequencies [dim/2] gives the angles [B, dim/2]")

        got = _call("timestep_embedding", fn, case, t, dim)
        worst = max(worst, _compare("timestep_embedding", got, timestep_embedding(t, dim), case, atol=1e-4,
                                    rtol=1e-5, hint=hint))
    _ok("timestep_embedding", len(cases), "tld.blocks.timestep_embedding", worst)
