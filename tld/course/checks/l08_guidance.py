"""Checker of lesson 08, classifier-free guidance: the guided combination."""

from __future__ import annotations

import torch

from ...diffusion import get_schedule
from ...samplers import make_denoiser
from .common import _call, _close, _compare, _gen, _ok, checker


@checker("guidance")
def check_guidance(fn) -> None:
    """``fn(out_cond, out_uncond, w) -> out_uncond + w * (out_cond - out_uncond)`` (Ho & Salimans 2022)."""
    g = _gen(10)
    schedule = get_schedule("vp-cosine")
    w_cond, w_null = torch.randn(3, 1, 1, generator=g), torch.randn(3, 1, 1, generator=g)

    def model(x, t, cond):  # a toy eps model whose output depends on the condition (null = 2)
        scale = torch.where(cond[:, None, None, None] == 2, w_null, w_cond)
        return torch.tanh(x * scale + t[:, None, None, None])

    worst = 0.0
    ws = (0.0, 1.0, 1.5, 4.0)
    for w in ws:
        x = torch.randn(2, 3, 4, 4, generator=g)
        t = torch.tensor(0.6)
        cond, null = torch.tensor([0, 1]), torch.tensor([2, 2])
        tb = t.expand(2)
        out_c, out_u = model(x, tb, cond), model(x, tb, null)
        case = f"guidance w = {w} on eps outputs of shape {tuple(x.shape)}"

        def hint(got, exp, out_c=out_c, out_u=out_u, w=w):
            if _close(got, out_c + w * (out_c - out_u)):
                return ("that is U-ViT's convention (its scale s equals w - 1); here w = 1 must give the "
                        "conditional output: uncond + w * (cond - uncond)")
            if _close(got, out_u + w * (out_u - out_c)):
                return "the direction points from the unconditional to the conditional output: cond - uncond"
            return ("guidance extrapolates from the unconditional output along the direction to the conditional "
                    "one: w = 0 must give uncond, w = 1 must give cond")

        got = _call("guidance", fn, case, out_c, out_u, w)
        # the library's guided denoiser, in eps space: its eps prediction is the guided output
        _, eps = make_denoiser(model, schedule, "eps", cond, null, guidance=w)(x, t)
        worst = max(worst, _compare("guidance", got, eps, case, atol=1e-5, rtol=1e-5, hint=hint))
    _ok("guidance", len(ws), "tld.samplers.make_denoiser(guidance=w)", worst)
