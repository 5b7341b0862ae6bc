"""Sampling: integrate the reverse process from noise to data (lessons 07, 08).

Each sampler is a plain function over a *denoiser* ``D(x, t) -> (x0_pred, eps_pred)``, in the
spirit of k-diffusion; ``sample()`` builds that denoiser from a model of any prediction type,
with classifier-free guidance, and runs the sampler over a grid of times.

Time grid: ``steps + 1`` times from ``t_max`` down to ``t_min``; the model is called at the first
``steps`` of them. With ``final_denoise=True`` the last update lands on clean data (sigma = 0)
instead of on ``t_min``, i.e. it returns the last prediction of x0 carried to sigma = 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .diffusion import PREDICTIONS, Schedule, convert, get_schedule

SAMPLERS = ("ddpm", "ddim")
SPACINGS = ("time", "logsnr")

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v.to(x.dtype)


def time_grid(schedule: Schedule, steps: int, spacing: str = "time", t_max: float | None = None,
              t_min: float | None = None) -> torch.Tensor:
    """``steps + 1`` decreasing times from t_max to t_min (float64).

    ``time``: uniform in t. ``logsnr``: uniform in lambda_t = log(alpha_t^2 / sigma_t^2).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t_max = schedule.t_max if t_max is None else t_max
    t_min = schedule.t_min if t_min is None else t_min
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if spacing == "time":
        return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)
    if spacing == "logsnr":
        lam = schedule.log_snr(torch.tensor([t_max, t_min], dtype=torch.float64))
        if not torch.isfinite(lam).all():
            raise ValueError(f"logsnr spacing needs a finite log-SNR at t_max and t_min (got {lam.tolist()}); "
                             "move t_min above 0 or t_max below 1")
        return schedule.t_from_log_snr(torch.linspace(lam[0].item(), lam[1].item(), steps + 1, dtype=torch.float64))
    raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")


def make_denoiser(model, schedule: Schedule, prediction: str = "eps", cond=None, null_cond=None,
                  guidance: float = 1.0) -> Denoiser:
    """Wrap ``model(x, t, cond)`` as D(x, t) -> (x0_pred, eps_pred), with classifier-free guidance.

    Guidance combines the two predictions as ``uncond + w * (cond - uncond)`` in the model's own
    output space; for eps, x0 and v this is the same affine combination, so the result agrees in
    every space. With w > 1 both branches run in one batched call.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    if guidance != 1.0 and null_cond is None:
        raise ValueError(f"guidance={guidance} needs null_cond (the 'no condition' input to guide against)")

    def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tb = t.to(x.dtype).expand(x.shape[0]) if t.ndim == 0 else t.to(x.dtype)
        if guidance == 1.0:
            out = model(x, tb, cond)
        else:
            both = model(torch.cat([x, x]), torch.cat([tb, tb]), _cat_cond(cond, null_cond))
            out_c, out_u = both.chunk(2)
            out = out_u + guidance * (out_c - out_u)
        x0 = convert(out, x, tb, schedule, prediction, "x0")
        eps = convert(out, x, tb, schedule, prediction, "eps")
        return x0, eps

    return denoise


def _cat_cond(cond, null_cond):
    if torch.is_tensor(cond):
        return torch.cat([cond, null_cond.expand_as(cond) if null_cond.shape != cond.shape else null_cond])
    if isinstance(cond, (tuple, list)):
        return type(cond)(_cat_cond(c, n) for c, n in zip(cond, null_cond))
    raise TypeError(f"cannot batch a condition of type {type(cond).__name__} for guidance")


def ddim_step(x, x0, eps, alpha_s, sigma_s, eta: float = 0.0, noise=None, lam_t=None, lam_s=None):
    """One DDIM step to time s (Song et al. 2021, eq. 12), written for any schedule.

    x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z, with c = eta * sigma_s * sqrt(1 - e^{lam_t - lam_s}),
    the DDPM posterior's standard deviation scaled by eta (eta = 1 is ancestral DDPM).
    """
    if eta == 0.0 or sigma_s == 0:
        return alpha_s * x0 + sigma_s * eps
    c = eta * sigma_s * torch.sqrt(-torch.expm1(lam_t - lam_s)).clamp(min=0)
    return alpha_s * x0 + torch.sqrt((sigma_s**2 - c**2).clamp(min=0)) * eps + c * noise


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor, schedule: Schedule, *, eta: float = 0.0,
                final_denoise: bool = True, generator=None, progress: bool = True, trajectory: list | None = None):
    """DDIM (eta = 0: deterministic, the probability-flow ODE's first-order solver; eta = 1: DDPM)."""
    alphas, sigmas, lams = schedule.alpha(ts), schedule.sigma(ts), schedule.log_snr(ts)
    n = len(ts) - 1
    for i in tqdm(range(n), disable=not progress, desc="sampling", leave=False):
        x0, eps = denoiser(x, ts[i].to(x.device))
        last = i == n - 1
        if last and final_denoise:
            x = x0
        else:
            noise = None
            if eta > 0:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = ddim_step(x, x0, eps, alphas[i + 1].item(), sigmas[i + 1].item(), eta, noise,
                          lams[i], lams[i + 1])
        if trajectory is not None:
            trajectory.append(x.detach().cpu())
    return x


def sample(model, noise: torch.Tensor, schedule, *, sampler: str = "ddim", steps: int = 50,
           prediction: str = "eps", cond=None, null_cond=None, guidance: float = 1.0, spacing: str = "time",
           t_max: float | None = None, t_min: float | None = None, final_denoise: bool = True,
           generator: torch.Generator | None = None, progress: bool = True, return_trajectory: bool = False,
           eta: float = 0.0):
    """Draw samples from ``model`` starting at ``noise`` (pure N(0, I) at t_max).

    ``sampler``: ``ddim`` (``eta`` 0..1) or ``ddpm`` (DDIM with eta = 1, i.e. ancestral sampling).
    Returns x [B, C, H, W]; with ``return_trajectory`` also the list of x after each step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    schedule = get_schedule(schedule)
    ts = time_grid(schedule, steps, spacing, t_max, t_min)
    # start from pure noise scaled to the schedule's sigma at t_max (1 for VP schedules)
    x = noise * schedule.sigma(ts[:1]).item() if not schedule.variance_preserving else noise
    denoiser = make_denoiser(model, schedule, prediction, cond, null_cond, guidance)
    traj = [x.detach().cpu()] if return_trajectory else None
    eta = 1.0 if sampler == "ddpm" else eta
    with torch.no_grad():
        x = sample_ddim(denoiser, x, ts, schedule, eta=eta, final_denoise=final_denoise, generator=generator,
                        progress=progress, trajectory=traj)
    return (x, traj) if return_trajectory else x
