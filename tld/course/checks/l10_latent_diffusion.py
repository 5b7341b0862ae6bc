"""Checkers of lesson 10, latent diffusion: the VAE sample and KL, the latent scale, PSNR."""

from __future__ import annotations

import math

import torch

from ...autoencoder import latent_scale, psnr, tiny_vae_config
from ...data import ShapesDataset
from .common import CheckError, _call, _close, _compare, _gen, _ok, _scalar, checker


def _posterior(shape, g, lo=-4.0, hi=1.0):
    mean = torch.randn(shape, generator=g)
    logvar = torch.rand(shape, generator=g) * (hi - lo) + lo
    return mean, logvar


@checker("vae_sample")
def check_vae_sample(fn) -> None:
    """``fn(mean, logvar, eps) -> z = mean + exp(logvar / 2) * eps``: the reparameterised VAE sample."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    g = _gen(16)
    cases = [(2, 4, 4, 4), (1, 3, 8, 8), (3, 2, 2, 2)]
    worst = 0.0
    for i, shape in enumerate(cases):
        mean, logvar = _posterior(shape, g)
        posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
        expected = posterior.sample(_gen(100 + i))
        eps = torch.randn(shape, generator=_gen(100 + i))  # the same draw as the library's sample
        case = f"mean, logvar and eps of shape {shape}, logvar in [-4, 1]"

        def hint(got, exp, mean=mean, logvar=logvar, eps=eps):
            if _close(got, mean + logvar.exp() * eps):
                return "logvar is log(sigma^2): the standard deviation is exp(0.5 * logvar), not exp(logvar)"
            if _close(got, mean + logvar * eps):
                return "logvar is a log variance: the standard deviation is exp(logvar / 2)"
            return ("the reparameterised sample is the mean plus the standard deviation times eps (Kingma & Welling "
                    "2014): at eps = 0 it is the mean", "the standard deviation is the exponential of half the logvar")

        got = _call("vae_sample", fn, case, mean, logvar, eps)
        worst = max(worst, _compare("vae_sample", got, expected, case, atol=1e-5, rtol=1e-5, hint=hint))
    _ok("vae_sample", len(cases), "diffusers' DiagonalGaussianDistribution.sample (the AutoencoderKL posterior)", worst)


@checker("vae_kl")
def check_vae_kl(fn) -> None:
    """``fn(mean, logvar) -> [B]``: KL(N(mean, e^logvar) || N(0, I)) summed over C, H, W, one per image."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    g = _gen(17)
    cases = [((2, 4, 4, 4), "random"), ((3, 2, 8, 8), "random"), ((2, 4, 2, 2), "standard normal: KL 0")]
    worst = 0.0
    for shape, kind in cases:
        mean, logvar = _posterior(shape, g)
        if kind != "random":
            mean, logvar = torch.zeros(shape), torch.zeros(shape)
        expected = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).kl()
        case = f"mean and logvar of shape {shape} ({kind})"

        def hint(got, exp, mean=mean, logvar=logvar):
            terms = mean.pow(2) + logvar.exp() - 1 - logvar
            if _close(got, terms.sum([1, 2, 3])):
                return "the Gaussian KL has a factor 1/2: 0.5 * (mean^2 + var - 1 - logvar)"
            if _close(got, 0.5 * terms.mean([1, 2, 3])):
                return "sum over C, H, W (one number per image), as diffusers' DiagonalGaussianDistribution.kl() does"
            if got.numel() == 1:
                return f"one KL per image: return shape [{len(exp)}], summed over dims 1, 2, 3 only"
            return ("the KL of N(mean, var) to N(0, 1) is (mean^2 + var - 1 - log var) / 2 per number, summed over "
                    "C, H, W: 0 exactly when mean = 0 and logvar = 0", "one value per image: sum over dims 1, 2, 3")

        got = _call("vae_kl", fn, case, mean, logvar)
        worst = max(worst, _compare("vae_kl", got, expected, case, atol=1e-4, rtol=1e-5, hint=hint))
    _ok("vae_kl", len(cases), "diffusers' DiagonalGaussianDistribution.kl (the AutoencoderKL's KL-reg)", worst)


def _tiny_vae_latents(seed: int, latent_channels: int, widths):
    """A small untrained AutoencoderKL and shapes images it encodes (unscaled posterior means)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(**tiny_vae_config(latent_channels, widths)).eval()
    images = ShapesDataset(size=16, seed=seed, length=8).batch(range(8))["image"]
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean
    return vae, images, z


@checker("latent_scale")
def check_latent_scale(fn) -> None:
    """``fn(z) -> float``: the latent scale factor 1 / std(z), over every number of the unscaled latents."""
    g = _gen(18)
    cases = ["synthetic", (0, 4, (8, 8)), (1, 2, (8, 8, 8))]
    worst = 0.0
    for spec in cases:
        if spec == "synthetic":
            z = 3.0 + 0.2 * torch.randn(4, 4, 4, 4, generator=g)
            expected = 1 / z.std()
            case = "synthetic latents z of shape (4, 4, 4, 4), mean 3, std 0.2"
        else:
            seed, channels, widths = spec
            vae, images, z = _tiny_vae_latents(seed, channels, widths)
            expected = torch.tensor(latent_scale(vae, images))
            case = (f"latents {tuple(z.shape)} of 8 shapes images from a small AutoencoderKL "
                    f"({channels} latent channels, widths {widths})")

        def hint(got, exp, z=z):
            if _close(got, z.std().double()):
                return "that is the spread itself; the scale is its reciprocal, so the scaled latents have std 1"
            if _close(got, 1 / z.var().double()):
                return "divide by the standard deviation, not the variance"
            if _close(got, 1 / z.pow(2).mean().sqrt().double()):
                return "std subtracts the mean (1 / root-mean-square is not 1 / std): use 1 / z.std()"
            return ("one number for all the latents: the factor that gives the scaled latents unit standard deviation "
                    "(LDM; Stable Diffusion's VAE gives 0.18215)")

        got = _scalar("latent_scale", _call("latent_scale", fn, case, z.clone()), case)
        worst = max(worst, _compare("latent_scale", got, expected.double(), case, atol=1e-6, rtol=1e-5, hint=hint))
    _ok("latent_scale", len(cases), "1 / z.std() and tld.autoencoder.latent_scale", worst)


@checker("psnr")
def check_psnr(fn) -> None:
    """``fn(a, b) -> float``: PSNR in dB of images in [-1, 1]: 10 log10(2^2 / MSE), MSE floored at 1e-12."""
    g = _gen(19)
    clean = ShapesDataset(size=16, seed=19, length=4).batch(range(4))["image"]
    cases = [(0.1, clean), (0.5, clean[:2]), (0.02, torch.rand(3, 1, 8, 8, generator=g) * 2 - 1), (0.0, clean[:1])]
    worst = 0.0
    for noise, a in cases:
        b = (a + noise * torch.randn(a.shape, generator=g)).clamp(-1, 1)
        expected = torch.tensor(psnr(a, b), dtype=torch.float64)
        case = (f"images {tuple(a.shape)} in [-1, 1] against a copy with noise std {noise}"
                + (" (identical: MSE 0)" if noise == 0 else ""))

        def hint(got, exp, a=a, b=b):
            mse = (a - b).pow(2).mean().item()
            if mse == 0 and not torch.isfinite(got).all():
                return "identical images have MSE 0: floor it, max(mse, 1e-12), so PSNR is a finite 126 dB"
            if mse and _close(got, torch.tensor(10 * math.log10(1 / mse)), 1e-4):
                return "the images span [-1, 1]: the peak-to-peak range is 2, so PSNR = 10 log10(2^2 / MSE)"
            if mse and _close(got, torch.tensor(20 * math.log10(4 / mse)), 1e-4):
                return "PSNR = 10 log10(peak^2 / MSE) (20 log10 goes with peak / RMSE)"
            return ("PSNR compares the peak-to-peak range squared with the mean squared error, in decibels; images "
                    "in [-1, 1] have range 2", "floor the MSE at 1e-12 so identical images give a finite number")

        got = _scalar("psnr", _call("psnr", fn, case, a.clone(), b.clone()), case)
        worst = max(worst, _compare("psnr", got, expected, case, atol=1e-3, rtol=1e-5, hint=hint))
    _ok("psnr", len(cases), "tld.autoencoder.psnr", worst)


@checker("psnr_per_image")
def check_psnr_per_image(fn) -> None:
    """``fn(a, b) -> [B]``: the PSNR of each image pair, as ``tld.autoencoder.psnr`` computes it for one image."""
    g = _gen(33)
    clean = ShapesDataset(size=16, seed=33, length=4).batch(range(4))["image"]
    cases = [(clean[:1], 0.1), (clean[:3], 0.0), (clean, 0.3)]
    worst = 0.0
    for a, noise in cases:
        std = torch.tensor([noise * (i + 1) for i in range(len(a))]).view(-1, 1, 1, 1)
        b = (a + std * torch.randn(a.shape, generator=g)).clamp(-1, 1)
        if noise == 0:
            b[0] = a[0]
        expected = torch.tensor([psnr(a[i:i + 1], b[i:i + 1]) for i in range(len(a))], dtype=torch.float64)
        case = f"images {tuple(a.shape)} against copies with noise std {std.flatten().tolist()}"

        def hint(got, exp, a=a, b=b):
            if got.numel() == 1:
                return f"one PSNR per image: shape [{len(a)}]"
            mse = (a - b).pow(2).mean().item()
            if _close(got, torch.full_like(got, 10 * math.log10(4 / max(mse, 1e-12))), 1e-4):
                return "that is the PSNR of the whole batch repeated; take each image's own mean squared error"
            return ("PSNR is computed from the mean squared error of each image on its own, floored at 1e-12",
                    "mean over dims 1, 2, 3 gives one MSE per image")

        got = _call("psnr_per_image", fn, case, a.clone(), b.clone())
        worst = max(worst, _compare("psnr_per_image", got, expected, case, atol=1e-3, rtol=1e-5, hint=hint))
    _ok("psnr_per_image", len(cases), "tld.autoencoder.psnr on each image", worst)


DB_PER_HALVING = (5.5, 6.5)   # halving the noise std adds 20 log10 2 = 6.02 dB


@checker("db_per_halving")
def check_db_per_halving(fn) -> None:
    """``fn(images, noise, stds) -> float``: the mean gain in PSNR of ``images + std * noise`` (not clipped) over
    ``images`` from each std to the next, where each std halves the one before."""

    def unclipped_psnr(a, b):
        return 10 * math.log10(4 / max((a - b).pow(2).mean().item(), 1e-12))

    clean = ShapesDataset(size=16, seed=34, length=8).batch(range(8))["image"]
    found = None
    for seed, stds in ((35, [0.2, 0.1]), (36, [0.4, 0.2, 0.1, 0.05]), (37, [0.1, 0.05, 0.025, 0.0125])):
        noise = torch.randn(clean.shape, generator=_gen(seed))
        values = [unclipped_psnr(clean, clean + s * noise) for s in stds]
        expected = torch.tensor(sum(b - a for a, b in zip(values, values[1:])) / (len(stds) - 1), dtype=torch.float64)
        case = f"8 shapes images (16 px), noise stds {stds}"

        def hint(got, exp, values=values):
            if _close(got, torch.tensor(values[-1] - values[0]), 1e-6):
                return "the mean gain per halving: divide the total gain by the number of halvings"
            return ("PSNR at each std, then the differences of consecutive PSNRs, averaged",
                    "your psnr of (images, images + std * noise) for each std, no clipping")

        got = _scalar("db_per_halving", _call("db_per_halving", fn, case, clean.clone(), noise, stds), case)
        _compare("db_per_halving", got, expected, case, atol=1e-4, rtol=0, hint=hint)
        found = got.item()
    if not DB_PER_HALVING[0] <= found <= DB_PER_HALVING[1]:
        raise CheckError(f"check_db_per_halving: {found:.2f} dB outside {DB_PER_HALVING}")
    _ok("db_per_halving", 3, "differences of tld.autoencoder.psnr", 0.0)
    print(f"  answer: {found:.2f} dB per halving of the noise, for any images: the MSE falls 4x and 10 log10 4 = 6.02; "
          f"+6 dB of PSNR is half the RMS error")
