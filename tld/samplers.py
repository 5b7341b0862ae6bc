"""Sampling: integrate the reverse process from noise to data (lessons 07, 08), or from a given x_t, and back (14, 15).

Each sampler is a plain function over a *denoiser* ``D(x, t) -> (x0_pred, eps_pred)``, in the
spirit of k-diffusion; ``sample()`` builds that denoiser from a model of any prediction type,
with classifier-free guidance, and runs the sampler over a grid of times.

Time grid: ``steps + 1`` times from ``t_max`` down to ``t_min``; the model is called at the first
``steps`` of them. With ``final_denoise=True`` the last update lands on clean data (sigma = 0)
instead of on ``t_min`` (a first-order step: x = the last prediction of x0, as in diffusers).

Symbols: ``alpha_t``, ``sigma_t`` of the schedule; ``lambda_t = log(alpha_t / sigma_t)`` is *half*
of ``Schedule.log_snr`` (DPM-Solver's convention); ``h = lambda_s - lambda_t`` for a step t -> s.
Rectified starts at t = 1 where alpha = 0 and lambda = -inf, and clean data has lambda = +inf:
every sampler takes those ends as limits (e^{-h} = 0, sigma_s / sigma_t finite), never 0 * inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .diffusion import (
    PREDICTIONS,
    Schedule,
    convert,
    edm_coefficients,
    get_schedule,
    learned_log_variance,
    split_learned_variance,
    step_log_variances,
)

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++3m", "euler", "heun")
SPACINGS = ("time", "logsnr", "karras")
# Measured with DPM-Solver++(2M) on closed-form GMM problems (`python -m tld.bench spacing`, lesson 07):
# logSNR-uniform is best at 20+ steps on every schedule, and at 10 steps on vp-linear (4.4e-2 vs 9.6e-2
# time-uniform, 5.5e-2 Karras) and on the 2-D ring for all schedules; at 10 steps on GMM.random,
# time-uniform wins on vp-cosine (2.8e-2 vs 4.3e-2) and rectified (2.0e-2 vs 4.3e-2). Karras is never best.
DEFAULT_SPACING = "logsnr"
# logsnr / karras grids run between these noise levels in EDM units sigma~ = sigma / alpha
# (Karras et al. 2022 use 0.002..80); the first and last time stay t_max and t_min exactly.
SIGMA_TILDE_MIN, SIGMA_TILDE_MAX = 0.03, 80.0
KARRAS_RHO = 7.0

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------------------------


def time_grid(schedule: Schedule, steps: int, spacing: str = DEFAULT_SPACING, t_max: float | None = None,
              t_min: float | None = None) -> torch.Tensor:
    """``steps + 1`` decreasing times from t_max to t_min (float64).

    ``time``: uniform in t (diffusers' "linspace"). ``logsnr``: uniform in lambda_t (DPM-Solver's
    choice). ``karras``: sigma~ = sigma / alpha spaced as sigma~^(1/7) uniform (Karras et al. 2022,
    eq. 5). For the last two the spaced range is clipped to sigma~ in [0.002, 1000] so that
    infinite log-SNR ends (rectified at t = 1, clean data at t = 0) still give a finite grid.
    """
    schedule = get_schedule(schedule)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t_max = schedule.t_max if t_max is None else float(t_max)
    t_min = schedule.t_min if t_min is None else float(t_min)
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if spacing == "time":
        return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    lam_lo, lam_hi = -2 * math.log(SIGMA_TILDE_MAX), -2 * math.log(SIGMA_TILDE_MIN)  # in log_snr units
    ends = schedule.log_snr(torch.tensor([t_max, t_min], dtype=torch.float64)).clamp(lam_lo, lam_hi)
    if ends[0] >= ends[1]:
        raise ValueError(f"t_max={t_max} and t_min={t_min} fall outside the spaced range; use spacing='time'")
    if spacing == "logsnr":
        lam = torch.linspace(ends[0].item(), ends[1].item(), steps + 1, dtype=torch.float64)
    else:
        inv_rho = 1.0 / KARRAS_RHO
        st_max, st_min = torch.exp(-ends / 2).tolist()  # log_snr = -2 log sigma~
        ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        st = (st_max**inv_rho + ramp * (st_min**inv_rho - st_max**inv_rho)) ** KARRAS_RHO
        lam = -2 * torch.log(st)
    ts = schedule.t_from_log_snr(lam)
    ts[0], ts[-1] = t_max, t_min
    return ts


def _grid_values(schedule: Schedule, ts: torch.Tensor, final_denoise: bool):
    """alpha, sigma, lambda = log(alpha / sigma) at each grid time, as Python floats.

    With ``final_denoise`` the last point is clean data: alpha = 1, sigma = 0, lambda = +inf.
    """
    ts = ts.double().cpu()
    alphas, sigmas = schedule.alpha(ts).tolist(), schedule.sigma(ts).tolist()
    lams = (0.5 * schedule.log_snr(ts)).tolist()
    if final_denoise:
        alphas[-1], sigmas[-1], lams[-1] = 1.0, 0.0, math.inf
    return alphas, sigmas, lams


# ---------------------------------------------------------------------------------------------
# The denoiser: any model and prediction type -> (x0_pred, eps_pred), with guidance
# ---------------------------------------------------------------------------------------------


def _lincomb(x, c: float, *terms):
    """c * x + sum(w * y for y, w in terms), in 1 + len(terms) passes over memory.

    The sampler updates below are written out this way because on small inputs a sampler step
    costs its number of elementwise passes; the comments give the textbook form.
    """
    out = x * c
    for y, w in terms:
        out.add_(y, alpha=w)
    return out


def _split(out, x, a: float, s: float, prediction: str):
    """Model output of kind ``prediction`` at (alpha, sigma) = (a, s) -> (x0, eps), scalars only."""
    if prediction == "eps":  # x0 = (x - sigma eps) / alpha
        inv_a = 1.0 / a if a else math.inf
        return _lincomb(x, inv_a, (out, -s * inv_a)), out
    if prediction == "x0":  # eps = (x - alpha x0) / sigma; at sigma = 0 eps is unused: zeros, not 0/0
        return out, _lincomb(x, 1.0 / s, (out, -a / s)) if s > 0 else torch.zeros_like(out)
    if prediction == "edm":  # x0 = c_skip x + c_out F (EDM's preconditioning), then as for x0
        c_skip, c_out = edm_coefficients(a, s)
        return _split(_lincomb(x, c_skip, (out, c_out)), x, a, s, "x0")
    norm = a * a + s * s  # v = alpha eps - sigma x0 (Salimans & Ho 2022)
    return _lincomb(x, a / norm, (out, -s / norm)), _lincomb(x, s / norm, (out, a / norm))


def _as(x0, eps, x, a: float, s: float, space: str):
    if space == "x0":
        return x0
    if space == "eps":
        return eps
    if space == "edm":
        c_skip, c_out = edm_coefficients(a, s)
        return (x0 - c_skip * x) / c_out
    return a * eps - s * x0


# The course's sampling of its shapes models: guidance only while t >= 0.3 (Kynkäänniemi et al. 2024). Guided at
# every step, the shipped models' squares come out notched and their circles flat-sided (lesson 08 measures it);
# make demo, the lessons' side-by-side panels and the cpu presets' sample grids all sample this way.
GUIDANCE_INTERVAL = (0.3, 1.0)


def interval_string(interval: tuple[float, float] | None) -> str:
    """The command line's form of an interval: ``(0.3, 1.0)`` -> ``"0.3,1"``; None -> ``""`` (every step)."""
    return "" if interval is None else ",".join(f"{v:g}" for v in interval)


def check_interval(value, name: str = "guidance_interval") -> tuple[float, float] | None:
    """A guidance interval as ``(lo, hi)`` floats with 0 <= lo < hi <= 1, or None (guide at every step).

    Takes a pair, ``None``, or the command line's string form (``"0.3,1"``, ``"none"``); anything else
    is a ValueError that names the value. The demo, the pipeline and ``make_denoiser`` all check here.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        lo, hi = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected two times lo,hi in [0, 1] (e.g. 0.3,1) or none") from None
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"{name}={value!r}: expected 0 <= lo < hi <= 1")
    return lo, hi


def make_denoiser(model, schedule: Schedule, prediction: str = "eps", cond=None, null_cond=None,
                  guidance: float = 1.0, guidance_space: str | None = None, times=None,
                  guidance_interval: tuple[float, float] | None = None) -> Denoiser:
    """Wrap ``model(x, t, cond)`` as D(x, t) -> (x0_pred, eps_pred), with classifier-free guidance.

    Guidance (Ho & Salimans 2022, eq. 6) is ``uncond + w * (cond - uncond)``, taken in
    ``guidance_space`` (eps, x0 or v; default: the model's own output). At fixed (x_t, t) every
    conversion is affine in the output with the same x_t for both branches, so the result is the
    same in every space (lesson 08 checks it). w = 1: one call per step; w != 1: both branches in
    one batched call. ``times``: the grid it will be called on, so alpha and sigma are computed
    once, vectorised (the schedule's float64 maths costs more than a sampler step on small inputs).
    ``guidance_interval=(lo, hi)``: guide only at times lo <= t <= hi and take the plain conditional
    prediction elsewhere (one model call). Kynkäänniemi et al. 2024 guide only in a middle interval of noise
    levels: at high noise guidance mostly costs diversity, and at low noise, where the sampler draws edges,
    it over-sharpens them (on shapes-cond-uvit, guidance 3 at every t leaves dark halos and notched sides;
    lesson 08 measures both readers with and without the interval).
    """
    schedule = get_schedule(schedule)
    guidance_interval = check_interval(guidance_interval)
    if guidance_interval is not None:
        lo, hi = guidance_interval
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    space = prediction if guidance_space is None else guidance_space
    if space not in PREDICTIONS:
        raise ValueError(f"unknown guidance_space {guidance_space!r}; expected one of {PREDICTIONS}")
    if guidance != 1.0 and null_cond is None:
        raise ValueError(f"guidance={guidance} needs null_cond (the 'no condition' input to guide against)")
    guided = guidance != 1.0
    both_cond = _cat_cond(cond, null_cond) if guided else None
    cache: dict = {}
    if times is not None:
        td = torch.as_tensor(times, dtype=torch.float64).flatten().cpu()
        for t, a, s in zip(td.tolist(), schedule.alpha(td).tolist(), schedule.sigma(td).tolist()):
            cache[t] = (a, s, None)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if t.ndim != 0:  # one time per example: the general (slower) path
            w = guidance
            if guided and guidance_interval is not None:
                w = torch.where((t >= lo) & (t <= hi), guidance, 1.0).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
            x0, eps, denoise.var = _denoise_batched_t(model, x, t, schedule, prediction, cond, both_cond, w, space)
            return x0, eps
        key = float(t)
        here = guided and (guidance_interval is None or lo <= key <= hi)
        a, s, tb = cache.get(key) or (None, None, None)
        if tb is None:  # alpha, sigma as floats and the [B] time tensor, once per grid time
            if a is None:
                a, s = schedule.alpha(t.double().cpu()).item(), schedule.sigma(t.double().cpu()).item()
            n = x.shape[0] * (2 if here else 1)
            tb = torch.full((n,), key, dtype=x.dtype, device=x.device)
            cache[key] = (a, s, tb)
        if not here:
            out, denoise.var = split_learned_variance(model(x, tb, cond), x.shape[1])
            return _split(out, x, a, s, prediction)
        out_c, out_u = model(torch.cat([x, x]), tb, both_cond).chunk(2)
        # a learned variance comes from the conditional branch (DiT's forward_with_cfg), guidance acts on the mean
        (out_c, denoise.var), (out_u, _) = (split_learned_variance(o, x.shape[1]) for o in (out_c, out_u))
        if space != prediction:
            out_c, out_u = (_as(*_split(o, x, a, s, prediction), x, a, s, space) for o in (out_c, out_u))
        return _split(out_u + guidance * (out_c - out_u), x, a, s, space)

    denoise.var = None   # after each call: the model's raw variance values when it predicts one (2C channels)
    return denoise


def _denoise_batched_t(model, x, t, schedule, prediction, cond, both_cond, guidance, space):
    tb = t.to(device=x.device, dtype=x.dtype)
    if both_cond is None:
        out, var = split_learned_variance(model(x, tb, cond), x.shape[1])
        return convert(out, x, tb, schedule, prediction, "x0"), convert(out, x, tb, schedule, prediction, "eps"), var
    out_c, out_u = model(torch.cat([x, x]), torch.cat([tb, tb]), both_cond).chunk(2)
    (out_c, var), (out_u, _) = (split_learned_variance(o, x.shape[1]) for o in (out_c, out_u))
    out_c, out_u = (convert(o, x, tb, schedule, prediction, space) for o in (out_c, out_u))
    out = out_u + guidance * (out_c - out_u)
    return convert(out, x, tb, schedule, space, "x0"), convert(out, x, tb, schedule, space, "eps"), var


def _cat_cond(cond, null_cond):
    if torch.is_tensor(cond):
        null = torch.as_tensor(null_cond, device=cond.device, dtype=cond.dtype)
        return torch.cat([cond, null.expand_as(cond) if null.shape != cond.shape else null])
    if isinstance(cond, (tuple, list)):
        return type(cond)(_cat_cond(c, n) for c, n in zip(cond, null_cond))
    raise TypeError(f"cannot batch a condition of type {type(cond).__name__} for guidance; "
                    "pass a tensor (or a tuple of tensors) as cond and null_cond")


def _steps(ts, progress: bool):
    return tqdm(range(len(ts) - 1), disable=not progress, desc="sampling", leave=False)


# ---------------------------------------------------------------------------------------------
# Samplers: each a plain function over a denoiser and a grid of times
# ---------------------------------------------------------------------------------------------


def ddim_step(x, x0, eps, alpha_s, sigma_s, eta: float = 0.0, noise=None, lam_t=None, lam_s=None):
    """One DDIM step to time s (Song et al. 2021, eq. 12), written for any schedule.

    x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z, with c = eta * sigma_s * sqrt(1 - e^{-2h}),
    h = lambda_s - lambda_t: the DDPM posterior's standard deviation scaled by eta (eta = 1 is DDPM).
    """
    if eta == 0.0 or sigma_s == 0:
        return _lincomb(x0, alpha_s, (eps, sigma_s))
    c = eta * sigma_s * math.sqrt(max(-math.expm1(-2 * (lam_s - lam_t)), 0.0))
    return _lincomb(x0, alpha_s, (eps, math.sqrt(max(sigma_s**2 - c**2, 0.0))), (noise, c))


def learned_variance_step(x0, eps, v, alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float, noise):
    """One ancestral DDPM step t -> s with the model's learned variance (Nichol & Dhariwal 2021; DiT's sampler).

    x_s = mu~(x_t, x0) + exp(log Sigma / 2) z: the posterior mean alpha_s x0 + sqrt(sigma_s^2 - beta~) eps,
    as in DDPM, and log Sigma = frac log beta + (1 - frac) log beta~, frac = (v + 1) / 2, with beta, beta~
    the step's forward and posterior variances (``tld.diffusion.step_log_variances``): on a respaced
    grid, those of the respaced step, as DiT's 250-step sampler uses them.
    """
    log_beta, log_beta_tilde = (float(u) for u in step_log_variances(alpha_t, sigma_t, alpha_s, sigma_s))
    mean = _lincomb(x0, alpha_s, (eps, math.sqrt(max(sigma_s**2 - math.exp(log_beta_tilde), 0.0))))
    log_var = learned_log_variance(v.to(mean.dtype), log_beta, log_beta_tilde)
    return mean + torch.exp(0.5 * log_var) * noise


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor, schedule: Schedule, *, eta: float = 0.0,
                final_denoise: bool = True, generator=None, progress: bool = True, trajectory: list | None = None):
    """DDIM (Song et al. 2021, eq. 12). eta = 0: the probability-flow ODE's first-order solver
    (the same as DPM-Solver-1 and as Euler in sigma~ = sigma/alpha); eta = 1: ancestral DDPM
    (Ho et al. 2020, Algorithm 2) on an arbitrary grid."""
    alphas, sigmas, lams = _grid_values(schedule, ts, final_denoise)
    for i in _steps(ts, progress):
        x0, eps = denoiser(x, ts[i])
        noise = None
        if eta > 0 and sigmas[i + 1] > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        var = getattr(denoiser, "var", None)
        if eta == 1.0 and var is not None and noise is not None:   # DDPM with the model's own variance
            x = learned_variance_step(x0, eps, var, alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1], noise)
        else:
            x = ddim_step(x, x0, eps, alphas[i + 1], sigmas[i + 1], eta, noise, lams[i], lams[i + 1])
        if trajectory is not None:
            trajectory.append(x.detach().cpu())
    return x


def dpm_solver_pp_step(x, x0s: list, lam_hist: list, alpha_s: float, sigma_s: float, sigma_t: float,
                       lam_s: float, order: int):
    """One multistep DPM-Solver++ update t -> s in data (x0) prediction (Lu et al. 2022b, Alg. 2).

    ``x0s`` / ``lam_hist``: the newest x0 predictions and their lambdas, newest last. With
    h = lambda_s - lambda_t and phi_1 = 1 - e^{-h}:
      order 1: x_s = (sigma_s / sigma_t) x + alpha_s phi_1 x0_i                       (= DDIM)
      order 2: D = (1 + 1/(2r)) x0_i - x0_{i-1} / (2r), r = h_{i-1} / h             (2M)
      order 3: adds the second divided difference (the 3M update of diffusers / k-diffusion).
    Ends with infinite lambda are limits: from lambda_t = -inf, e^{-h} = 0 and the step is order 1.
    """
    lam_t = lam_hist[-1]
    h = lam_s - lam_t
    phi1 = -math.expm1(-h)  # 1 at h = inf
    ratio = sigma_s / sigma_t  # finite: sigma_t > 0 wherever the model is called
    # the usable order: every past step in the formula must have a finite length
    hs = [lam_hist[j] - lam_hist[j - 1] for j in range(len(lam_hist) - 1, 0, -1)]  # h_{i-1}, h_{i-2}, ...
    k = 1
    while k < order and k - 1 < len(hs) and math.isfinite(hs[k - 1]) and math.isfinite(h):
        k += 1
    m0, c = x0s[-1], alpha_s * phi1
    if k == 1:
        return _lincomb(x, ratio, (m0, c))
    r0 = hs[0] / h
    if k == 2:
        # D = m0 + (m0 - m1) / (2 r0);  x_s = ratio x + alpha_s phi1 D
        return _lincomb(x, ratio, (m0, c * (1 + 0.5 / r0)), (x0s[-2], -c * 0.5 / r0))
    # 3M: D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
    #     D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1) / (r0 + r1),
    #     x_s = ratio x + alpha_s (phi1 m0 + phi2 D1 - phi3 D2)
    r1 = hs[1] / h
    phi2 = 1 - phi1 / h  # (e^{-h} - 1) / h + 1
    phi3 = (h - phi1) / h**2 - 0.5  # (e^{-h} - 1 + h) / h^2 - 1/2
    rho = r0 / (r0 + r1)
    c_a = phi2 * (1 + rho) - phi3 / (r0 + r1)  # coefficient of D1_0
    c_b = -phi2 * rho + phi3 / (r0 + r1)  # coefficient of D1_1
    return _lincomb(x, ratio, (m0, alpha_s * (phi1 + c_a / r0)), (x0s[-2], alpha_s * (c_b / r1 - c_a / r0)),
                    (x0s[-3], -alpha_s * c_b / r1))


def final_step(x, x0, alpha_t: float):
    """The step onto clean data, second order: x~_0 = (x~_t + x0_pred) / 2, with x~ = x / alpha.

    lambda = +inf there, so we switch to Karras et al.'s variables x~ = x / alpha, sigma~ = sigma / alpha,
    where dx~/dsigma~ = (x~ - x0_pred) / sigma~ -> 0 as sigma~ -> 0, and take the trapezoid rule
    (Heun, Karras et al. 2022 Alg. 1) using that known zero slope at sigma~ = 0. Its error is
    O(sigma~_t^4), against O(sigma~_t^2) for returning x0_pred.
    """
    return _lincomb(x0, 0.5, (x, 0.5 / alpha_t))


def sample_dpmpp(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor, schedule: Schedule, *, order: int = 2,
                 final_denoise: bool = True, progress: bool = True, trajectory: list | None = None):
    """DPM-Solver++(2M) / (3M): multistep exponential integrator of the probability-flow ODE in
    lambda, with data prediction (Lu et al. 2022b, "DPM-Solver++", Algorithm 2). The first steps
    use the lower orders the history allows; a step onto clean data (lambda = +inf) is the
    second-order ``final_step`` (order 1: it returns the last x0 prediction, like DDIM)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    alphas, sigmas, lams = _grid_values(schedule, ts, final_denoise)
    x0s, lam_hist = [], []
    for i in _steps(ts, progress):
        x0, _ = denoiser(x, ts[i])
        x0s, lam_hist = (x0s + [x0])[-order:], (lam_hist + [lams[i]])[-order:]
        if sigmas[i + 1] == 0 and order == 1:  # clean data: e^{-h} = 0 and sigma_s / sigma_t = 0
            x = alphas[i + 1] * x0
        elif sigmas[i + 1] == 0:
            x = alphas[i + 1] * final_step(x, x0, alphas[i])
        else:
            x = dpm_solver_pp_step(x, x0s, lam_hist, alphas[i + 1], sigmas[i + 1], sigmas[i], lams[i + 1], order)
        if trajectory is not None:
            trajectory.append(x.detach().cpu())
    return x


def _derivative(f, ts: torch.Tensor, delta: float = 1e-6) -> list:
    """d f / d t at each time by central differences in float64 (one-sided at 0 and 1)."""
    lo, hi = (ts - delta).clamp(0, 1), (ts + delta).clamp(0, 1)
    return ((f(hi) - f(lo)) / (hi - lo)).tolist()


def sample_euler(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor, schedule: Schedule, *,
                 final_denoise: bool = True, progress: bool = True, trajectory: list | None = None):
    """Euler's method on the probability-flow ODE in the schedule's own time t:
    dx/dt = alpha'_t x0_pred + sigma'_t eps_pred (the flow-matching sampler; Lipman et al. 2023,
    Liu et al. 2023). For rectified (alpha = 1 - t, sigma = t) it is exactly DDIM; for VP
    schedules it is a different, less accurate first-order method. (Euler in sigma~ = sigma/alpha,
    Karras et al. 2022 Alg. 1 and diffusers' EulerDiscreteScheduler, equals DDIM for every schedule.)"""
    td = ts.double().cpu()
    d_alpha, d_sigma = _derivative(schedule.alpha, td), _derivative(schedule.sigma, td)
    alphas, sigmas, _ = _grid_values(schedule, ts, final_denoise)
    for i in _steps(ts, progress):
        x0, eps = denoiser(x, ts[i])
        if sigmas[i + 1] == 0 and final_denoise:
            x = x0
        else:
            dt = (td[i + 1] - td[i]).item()
            x = _lincomb(x, 1.0, (x0, dt * d_alpha[i]), (eps, dt * d_sigma[i]))  # x + dt (alpha' x0 + sigma' eps)
        if trajectory is not None:
            trajectory.append(x.detach().cpu())
    return x


def sample_heun(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor, schedule: Schedule, *,
                final_denoise: bool = True, progress: bool = True, trajectory: list | None = None):
    """Heun's method (the explicit trapezoid rule) on the probability-flow ODE in the schedule's own time t,
    dx/dt = alpha'_t x0_pred + sigma'_t eps_pred, as in Karras et al. 2022, Alg. 1 (there in sigma~).

    Each step takes an Euler step to s, evaluates the slope there, and steps again with the mean of the two
    slopes: second order, two model calls per step. A step that ends on clean data (sigma_s = 0) stays an
    Euler step (the slope there needs eps at sigma = 0), so ``len(ts) - 1`` steps cost ``2 (len(ts) - 1) - 1``
    model calls with ``final_denoise`` and ``2 (len(ts) - 1)`` without. On rectified the slope is the
    flow-matching velocity eps - x0 (Liu et al. 2023; Lipman et al. 2023)."""
    td = ts.double().cpu()
    d_alpha, d_sigma = _derivative(schedule.alpha, td), _derivative(schedule.sigma, td)
    _, sigmas, _ = _grid_values(schedule, ts, final_denoise)
    for i in _steps(ts, progress):
        x0, eps = denoiser(x, ts[i])
        dt = (td[i + 1] - td[i]).item()
        if sigmas[i + 1] == 0 and final_denoise:  # onto clean data: the Euler step lands on x0_pred
            x = x0
        else:
            x_euler = _lincomb(x, 1.0, (x0, dt * d_alpha[i]), (eps, dt * d_sigma[i]))
            x0_s, eps_s = denoiser(x_euler, ts[i + 1])
            # x + dt/2 (slope at t + slope at s), slope = alpha' x0 + sigma' eps
            x = _lincomb(x, 1.0, (x0, 0.5 * dt * d_alpha[i]), (eps, 0.5 * dt * d_sigma[i]),
                         (x0_s, 0.5 * dt * d_alpha[i + 1]), (eps_s, 0.5 * dt * d_sigma[i + 1]))
        if trajectory is not None:
            trajectory.append(x.detach().cpu())
    return x


def classifier_guided(denoiser: Denoiser, log_prob: Callable[[torch.Tensor], torch.Tensor], scale: float,
                      schedule: Schedule) -> Denoiser:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2 in eps form) with a classifier of *clean* images.

    ``log_prob(x0_pred) -> [B]``: log p(y | x0) of the wanted y. The guide is the gradient of
    log p(y | x_t) ~ log p(y | x0_pred(x_t)), back through the denoiser, added to the score:
    eps~ = eps_pred - scale * sigma_t * grad, i.e. x0~ = x0_pred + scale * sigma_t^2 / alpha_t * grad.
    ``scale`` = 0 returns the denoiser's own predictions. Needs alpha_t > 0 (not rectified at t = 1).
    """
    schedule = get_schedule(schedule)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if scale == 0:
            return denoiser(x, t)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            x0, eps = denoiser(x_in, t)
            (grad,) = torch.autograd.grad(log_prob(x0).sum(), x_in)
        td = torch.as_tensor(t, dtype=torch.float64).cpu()
        a, s = schedule.alpha(td), schedule.sigma(td)
        if (a <= 0).any():
            raise ValueError(f"classifier guidance needs alpha_t > 0; got t={td.tolist()}")
        shape = (-1,) + (1,) * (x.ndim - 1) if td.ndim else ()
        a, s = (v.reshape(shape).to(device=x.device, dtype=x.dtype) for v in (a, s))
        return x0.detach() + (scale * s**2 / a) * grad, eps.detach() - (scale * s) * grad

    return denoise


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def sampling_grid(schedule, steps: int, prediction: str = "eps", *, spacing: str = DEFAULT_SPACING,
                  t_max: float | None = None, t_min: float | None = None, timesteps=None,
                  t_start: float | None = None) -> torch.Tensor:
    """The decreasing float64 grid ``sample`` runs on (``steps + 1`` times; ``invert`` runs it backwards).

    ``timesteps`` as given (checked); else ``time_grid`` from ``t_start`` (or t_max) to t_min. An eps model
    on rectified starts at 0.999 by default, since x0 = (x - sigma eps) / alpha is undefined at alpha = 0.
    """
    schedule = get_schedule(schedule)
    if timesteps is not None:
        ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
        if len(ts) < 2 or not (ts[1:] < ts[:-1]).all() or ts[-1] < 0 or ts[0] > 1:
            raise ValueError(f"timesteps must decrease within [0, 1] and hold at least 2 times, got {ts.tolist()}")
        if t_start is not None and float(t_start) != ts[0].item():
            raise ValueError(f"t_start={t_start} differs from the first of the timesteps ({ts[0].item()}); "
                             "give one or the other")
    else:
        if t_start is not None:
            if t_max is not None and float(t_max) != float(t_start):
                raise ValueError(f"t_start={t_start} and t_max={t_max} both set the first time; give one")
            t_max = t_start
        if t_max is None and prediction == "eps" and schedule.alpha(torch.tensor(schedule.t_max)).item() == 0:
            t_max = 0.999  # x0 = (x - sigma eps) / alpha is undefined at alpha = 0
        ts = time_grid(schedule, steps, spacing, t_max, t_min)
    if prediction == "eps" and schedule.alpha(ts[:1]).item() == 0:
        raise ValueError(f"an eps-prediction model cannot start at t={ts[0].item()} where alpha = 0; "
                         "use t_max < 1 (for example 0.999)")
    return ts


def invert(model, x: torch.Tensor, schedule, *, steps: int = 50, prediction: str = "eps", cond=None,
           null_cond=None, guidance: float = 1.0, spacing: str = DEFAULT_SPACING, t_max: float | None = None,
           t_min: float | None = None, timesteps=None, iters: int = 0, progress: bool = True,
           return_trajectory: bool = False):
    """DDIM inversion: carry a clean image ``x`` (at t_min; 0 by default) up to x_t at t_max (lesson 14).

    The deterministic DDIM step run upward on the grid ``sample`` would use, reversed: from u to the next,
    larger time v, x_v = alpha_v x0_pred(x_u, u) + sigma_v eps_pred(x_u, u) (Song et al. 2021, sec. 4.3;
    Mokady et al. 2023 use it to edit real images). Where sigma_u = 0 (clean data) eps_pred is undefined, so
    that first step asks the model at v instead (as diffusers' DDIMInverseScheduler does at every step).
    Each step uses the slope at its start where the sampler coming back uses the slope at its end, so a
    round trip ``sample(model, invert(...), schedule, sampler="ddim", t_start=t_max)`` on the same grid
    returns x only up to an error that falls as the steps grow (first order).

    ``iters`` > 0 refines each step from a noisy point by fixed-point iteration on the equation the DDIM step
    back must satisfy, x_u = alpha_u x0_pred(x_v, v) + sigma_u eps, eps = (x_v - alpha_v x0_pred) / sigma_v:
    x_v <- alpha_v x0_pred(x_v, v) + sigma_v (x_u - alpha_u x0_pred(x_v, v)) / sigma_u (as in Pan et al. 2023's
    fixed-point inversion); each iteration is one more model call. It converges when the steps are small and
    can diverge on coarse grids (lesson 14 measures both).
    Returns x at t_max [B, ...]; with ``return_trajectory`` also the list of x at each time, from t_min up.
    """
    schedule = get_schedule(schedule)
    ts = sampling_grid(schedule, steps, prediction, spacing=spacing, t_max=t_max, t_min=t_min, timesteps=timesteps)
    up = ts.flip(0)
    denoiser = make_denoiser(model, schedule, prediction, cond, null_cond, guidance, times=up)
    alphas, sigmas = schedule.alpha(up).tolist(), schedule.sigma(up).tolist()
    traj = [x.detach().cpu()] if return_trajectory else None
    with torch.no_grad():
        for i in tqdm(range(len(up) - 1), disable=not progress, desc="inverting", leave=False):
            if sigmas[i] > 0:
                x0, eps = denoiser(x, up[i])
            else:  # clean data: x0 is x itself, and eps is the model's guess at the next time
                x0, (_, eps) = x, denoiser(x, up[i + 1])
            x_next = ddim_step(x, x0, eps, alphas[i + 1], sigmas[i + 1])
            for _ in range(iters if sigmas[i] > 0 else 0):
                x0_v, _ = denoiser(x_next, up[i + 1])
                x_next = _lincomb(x0_v, alphas[i + 1], (x, sigmas[i + 1] / sigmas[i]),
                                  (x0_v, -alphas[i] * sigmas[i + 1] / sigmas[i]))
            x = x_next
            if traj is not None:
                traj.append(x.detach().cpu())
    return (x, traj) if return_trajectory else x


def sample(model, noise: torch.Tensor, schedule, *, sampler: str = "ddim", steps: int = 50,
           prediction: str = "eps", cond=None, null_cond=None, guidance: float = 1.0,
           spacing: str = DEFAULT_SPACING, t_max: float | None = None, t_min: float | None = None,
           final_denoise: bool = True, generator: torch.Generator | None = None, progress: bool = True,
           return_trajectory: bool = False, eta: float | None = None, timesteps=None,
           guidance_space: str | None = None, t_start: float | None = None,
           guidance_interval: tuple[float, float] | None = None):
    """Draw samples from ``model`` starting at ``noise`` (pure N(0, I) at t_max), or from a given x_t at ``t_start``.

    ``sampler``: ``ddpm`` (ancestral), ``ddim`` (``eta`` 0..1), ``dpm++2m``, ``dpm++3m``, ``euler``.
    ``eta``: the DDIM noise scale; None means the sampler's own: 0 for ddim, 1 for ddpm (DDPM *is*
    DDIM with eta = 1, so ddpm with another eta is refused: ask for ddim with it). The ODE solvers
    (dpm++, euler) add no noise and refuse an eta other than 0.
    ``steps`` is the number of model evaluations (twice the batch when guided, in one call).
    ``timesteps``: an explicit decreasing grid of ``steps + 1`` times (overrides spacing, t_max, t_min).
    With eps prediction the model cannot give x0 where alpha = 0, so rectified then starts at t = 0.999.
    ``heun`` is second order at two model calls a step (see ``sample_heun``): ``steps`` counts its steps.
    ``guidance_interval=(lo, hi)``: guide only at grid times in [lo, hi] (see ``make_denoiser``).

    Starting part-way (SDEdit, a DDIM inversion's output; lesson 14): with ``t_start`` the input is taken
    as x_t at time t_start exactly as given (no rescaling), and the grid of ``steps + 1`` times runs from
    t_start down to t_min with the same spacing rules. ``x_t = add_noise(image, eps, t, schedule)`` then
    ``sample(model, x_t, schedule, t_start=t)`` denoises a real image from t. Without it the input is
    N(0, I) noise, scaled to sigma at the first time for schedules that are not variance preserving;
    ``t_start=t_max`` with that scaled noise (for VP schedules: the noise itself) is the same run, bit for
    bit. With ``timesteps``, ``t_start`` must be their first time.
    Returns x [B, C, H, W]; with ``return_trajectory`` also the list of x before and after each step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    eta = _sampler_eta(sampler, eta)
    schedule = get_schedule(schedule)
    ts = sampling_grid(schedule, steps, prediction, spacing=spacing, t_max=t_max, t_min=t_min,
                       timesteps=timesteps, t_start=t_start)
    if t_start is not None:  # a given x_t at ts[0] = t_start, as it is
        x = noise
    else:  # pure noise scaled to sigma at t_max (1 for VP schedules)
        x = noise if schedule.variance_preserving else noise * schedule.sigma(ts[:1]).item()
    denoiser = make_denoiser(model, schedule, prediction, cond, null_cond, guidance, guidance_space, times=ts[:-1],
                             guidance_interval=guidance_interval)
    traj = [x.detach().cpu()] if return_trajectory else None
    kw = dict(final_denoise=final_denoise, progress=progress, trajectory=traj)
    with torch.no_grad():
        if sampler in ("ddim", "ddpm"):
            x = sample_ddim(denoiser, x, ts, schedule, eta=eta, generator=generator, **kw)
        elif sampler == "euler":
            x = sample_euler(denoiser, x, ts, schedule, **kw)
        elif sampler == "heun":
            x = sample_heun(denoiser, x, ts, schedule, **kw)
        else:
            x = sample_dpmpp(denoiser, x, ts, schedule, order=int(sampler[-2]), **kw)
    return (x, traj) if return_trajectory else x


def _sampler_eta(sampler: str, eta: float | None) -> float:
    """The DDIM eta a sampler runs with: the default of each, and the combinations that mean nothing refused."""
    if sampler == "ddim":
        return 0.0 if eta is None else float(eta)
    if sampler == "ddpm":
        if eta is not None and float(eta) != 1.0:
            raise ValueError(f"sampler='ddpm' is DDIM with eta=1 by definition; for eta={eta} use "
                             f"sampler='ddim', eta={eta}")
        return 1.0
    if eta is not None and float(eta) != 0.0:
        raise ValueError(f"sampler={sampler!r} solves the probability-flow ODE and adds no noise, so eta={eta} "
                         f"would be ignored; use sampler='ddim', eta={eta} for a stochastic sampler")
    return 0.0


@torch.no_grad()
def generate(model, schedule, *, prediction: str, cond=None, n: int | None = None, steps: int = 50,
             sampler: str = "ddim", guidance: float = 1.0, null_cond=None, seed: int = 0, clamp: bool = True,
             progress: bool = False, x_start: torch.Tensor | None = None,
             t_start: float | None = None, guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Samples of a trained denoiser from fresh noise seeded by ``seed``: what the trainer's sample
    grids, the pipelines and the evaluator all draw with.

    Args:
        model: a tld denoiser (it knows its ``in_chans`` and ``img_size``).
        schedule: the schedule it was trained on (a name or a Schedule).
        prediction: what it predicts: ``eps``, ``x0`` or ``v``.
        cond: one condition per sample (labels [B], text [B, D] or [B, L, D]); None for unconditional.
        n: how many samples when ``cond`` is None.
        steps, sampler, guidance, guidance_interval: as in ``sample``.
        null_cond: what guidance contrasts with; by default the model's own null condition
            (``model.null_condition(cond)``: the null class, or the zero vector for text).
        seed: the noise and any sampler randomness come from one generator seeded with it.
        clamp: clip the result to [-1, 1] (pixels); pass False for latents.
        x_start, t_start: start from this x_t [B, C, H, W] at time t_start instead of fresh noise
            (``sample``'s ``t_start``: SDEdit, an inversion's output); ``seed`` then drives only the
            sampler's own randomness. Give both or neither.
    Returns:
        x [B, C, H, W] on the model's device.
    """
    device = next(model.parameters()).device
    if cond is None and n is None:
        raise ValueError("generate needs cond (one condition per sample) or n (how many unconditional samples)")
    if (x_start is None) != (t_start is None):
        raise ValueError(f"give x_start and t_start together (got x_start {'set' if x_start is not None else None}, "
                         f"t_start={t_start})")
    n = len(cond) if cond is not None else n
    g = torch.Generator().manual_seed(seed)
    if x_start is not None:
        if x_start.shape[0] != n:
            raise ValueError(f"x_start holds {x_start.shape[0]} images but there are {n} conditions")
        noise = x_start.to(device)
    else:
        noise = torch.randn(n, model.in_chans, model.img_size, model.img_size, generator=g).to(device)
    if cond is not None:
        cond = cond.to(device)
        if null_cond is None and guidance != 1.0:
            null_cond = model.null_condition(cond)
    x = sample(model, noise, schedule, sampler=sampler, steps=steps, prediction=prediction, cond=cond,
               null_cond=null_cond, guidance=guidance, generator=g, progress=progress, t_start=t_start,
               guidance_interval=guidance_interval)
    return x.clamp(-1, 1) if clamp else x
