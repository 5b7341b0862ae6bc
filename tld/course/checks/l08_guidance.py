"""Checker of lesson 08, classifier-free guidance: the guided combination."""

from __future__ import annotations

import torch

from ... import assets
from ...diffusion import get_schedule
from ...evaluate import load_shapes_classifier, shapes_accuracy
from ...samplers import make_denoiser
from ...train import generate, load_model
from .common import CheckError, _call, _close, _compare, _gen, _ok, _scalar, checker


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


def _rescale(cond, guided, phi):
    dims = list(range(1, cond.ndim))
    rescaled = guided * cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return phi * rescaled + (1 - phi) * guided


@checker("cfg_rescale")
def check_cfg_rescale(fn) -> None:
    """``fn(out_cond, out_guided, phi) -> out``: CFG rescale (Lin et al. 2024, eq. 15-16): the guided output
    scaled to the conditional output's standard deviation (one std per sample), mixed back with weight phi."""
    g = _gen(32)
    cases = [((1, 1, 2, 2), 0.7), ((2, 3, 4, 4), 0.0), ((3, 4, 4, 4), 1.0), ((2, 3, 8, 8), 0.7)]
    worst = 0.0
    for shape, phi in cases:
        cond = torch.randn(shape, generator=g, dtype=torch.float64)
        spread = torch.linspace(1.5, 3.0, shape[0], dtype=torch.float64).view(-1, *[1] * (len(shape) - 1))
        guided = spread * (cond + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64))
        case = f"out_cond and out_guided {shape} (the guided one {spread.flatten().tolist()} times wider), phi {phi}"

        def hint(got, exp, cond=cond, guided=guided, phi=phi):
            whole = phi * guided * cond.std() / guided.std() + (1 - phi) * guided
            if _close(got, whole, 1e-8):
                return "one standard deviation per sample (over C, H, W), not one for the whole batch"
            if _close(got, _rescale(cond, guided, 1 - phi), 1e-8):
                return "phi weighs the rescaled output: phi = 1 is fully rescaled, phi = 0 is plain CFG"
            if _close(got, _rescale(guided, cond, phi), 1e-8):
                return "rescale the guided output to the conditional output's spread, not the other way round"
            return ("after rescaling, each sample of the output has the conditional output's standard deviation "
                    "when phi = 1; phi = 0 leaves the guided output alone",
                    "std over every dim but the batch, keepdim=True, so the ratio broadcasts")

        got = _call("cfg_rescale", fn, case, cond, guided, phi)
        worst = max(worst, _compare("cfg_rescale", got, _rescale(cond, guided, phi), case, atol=1e-8, rtol=1e-8,
                                    hint=hint))
    _ok("cfg_rescale", len(cases), "Lin et al. 2024's rescale (diffusers' rescale_noise_cfg)", worst)


BEST_GUIDANCE = (1.5, 4.5)   # shapes-cond-uvit, 18 labels, 6 steps: adherence peaks at w = 2 (seeds 0 and 1)
GUIDANCES = (1.0, 2.0, 3.0, 4.0, 6.0)
_SHIPPED: dict = {}


def _adherence(w: float) -> float:
    if w in _SHIPPED:
        return _SHIPPED[w]
    if not _SHIPPED:
        _SHIPPED.update(model=load_model(assets.path("shapes-cond-uvit")), classifier=load_shapes_classifier())
    labels = torch.arange(18)
    x = generate(_SHIPPED["model"], _SHIPPED["model"].train_config, labels, steps=6, sampler="dpm++2m",
                 guidance=w, seed=0)
    _SHIPPED[w] = shapes_accuracy(x, labels // 6, labels % 6, classifier=_SHIPPED["classifier"])["all"]
    return _SHIPPED[w]


@checker("adherence_at")
def check_adherence_at(fn) -> None:
    """``fn(w) -> float``: the shape-and-color adherence of the shipped ``shapes-cond-uvit`` at guidance w: one image
    per class (labels 0..17), ``tld.train.generate(..., steps=6, sampler="dpm++2m", guidance=w, seed=0)``, read
    back by ``tld.evaluate.shapes_accuracy(...)["all"]``."""
    case = "guidance w = 3.0"
    got = _scalar("adherence_at", _call("adherence_at", fn, case, 3.0), case)

    def hint(got, exp):
        if got.item() > 1:
            return "adherence is a fraction of the images (0 to 1), not a count"
        return ("sample one image per class with the exercise's settings and count the images whose shape and color "
                "the classifier reads back as asked", "labels // 6 is the shape, labels % 6 the color")

    _compare("adherence_at", got, torch.tensor(_adherence(3.0), dtype=torch.float64), case, atol=1e-6, rtol=0,
             hint=hint)
    sweep = {w: _scalar("adherence_at", fn(w), f"guidance {w}").item() for w in GUIDANCES}
    best = max(sweep, key=sweep.get)
    if not BEST_GUIDANCE[0] <= best <= BEST_GUIDANCE[1]:
        raise CheckError(f"check_adherence_at: adherence peaks at w = {best}, outside {BEST_GUIDANCE}: {sweep}")
    _ok("adherence_at", 1, "shapes_accuracy of the shipped model's samples", 0.0)
    print("  answer: " + ", ".join(f"w={w:g}: {a:.2f}" for w, a in sweep.items())
          + f"; adherence peaks at w = {best:g}: past it, samples over-saturate and the classifier misreads them")
