"""Checkers of lesson 07, samplers: one DDIM step and one DPM-Solver++(2M) step."""

from __future__ import annotations

import math

import torch

from ...diffusion import get_schedule
from ...gmm import GMM, rms_error
from ...samplers import ddim_step, dpm_solver_pp_step, sample
from .common import CheckError, _call, _close, _compare, _gen, _ok, _scalar, checker


def _grid_case(name: str, ts):
    """alpha, sigma and lambda = log(alpha / sigma) (half the log-SNR) as floats at times ts."""
    s = get_schedule(name)
    t = torch.tensor(ts, dtype=torch.float64)
    return s.alpha(t).tolist(), s.sigma(t).tolist(), (0.5 * s.log_snr(t)).tolist()


@checker("ddim_step")
def check_ddim_step(fn) -> None:
    """``fn(x_t, eps_pred, alpha_t, sigma_t, alpha_s, sigma_s) -> x_s``: one deterministic DDIM step t -> s."""
    g = _gen(8)
    cases = [("vp-linear", (0.8, 0.6)), ("vp-cosine", (0.5, 0.2)), ("rectified", (0.9, 0.7))]
    worst = 0.0
    for name, ts in cases:
        (a_t, a_s), (s_t, s_s), _ = _grid_case(name, ts)
        x, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                        dtype=torch.float64)
        x0 = (x - s_t * eps) / a_t
        case = f"schedule {name!r}, t {ts[0]} -> s {ts[1]}: alpha_t {a_t:.4f}, sigma_t {s_t:.4f}, alpha_s {a_s:.4f}, sigma_s {s_s:.4f}"

        def hint(got, exp, x=x, eps=eps, a_s=a_s, s_s=s_s):
            if _close(got, a_s * x + s_s * eps):
                return ("that moves x_t itself to time s; first predict the clean image x0_pred from x_t and "
                        "eps_pred (solve x_t = alpha_t x0 + sigma_t eps for x0)")
            return ("DDIM keeps the predicted noise and re-noises the predicted clean image to the level of s "
                    "(Song et al. 2021, eq. 12 with sigma = 0): at s = t it must give back x_t",
                    "two lines: x0_pred from (x_t, eps_pred, alpha_t, sigma_t); then combine x0_pred and eps_pred "
                    "with the s-side coefficients")

        got = _call("ddim_step", fn, case, x, eps, a_t, s_t, a_s, s_s)
        expected = ddim_step(x, x0, eps, a_s, s_s)
        worst = max(worst, _compare("ddim_step", got, expected, case, atol=1e-8, rtol=1e-8, hint=hint))
    _ok("ddim_step", len(cases), "tld.samplers.ddim_step", worst)


@checker("dpm_solver_2m_step")
def check_dpm_solver_2m_step(fn) -> None:
    """``fn(x_t, x0_pred, x0_prev, lambda_prev, lambda_t, lambda_s, alpha_s, sigma_s, sigma_t) -> x_s``.

    One DPM-Solver++(2M) step t -> s (Lu et al. 2022b, Algorithm 2), lambda = log(alpha / sigma):
    h = lambda_s - lambda_t, r = (lambda_t - lambda_prev) / h,
    D = (1 + 1/(2r)) x0_pred - x0_prev / (2r), x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D.
    """
    g = _gen(9)
    cases = [("vp-cosine", (0.7, 0.6, 0.45)), ("vp-linear", (0.5, 0.4, 0.2)), ("rectified", (0.9, 0.6, 0.5))]
    worst = 0.0
    for name, ts in cases:
        (_, _, a_s), (_, s_t, s_s), (l_p, l_t, l_s) = _grid_case(name, ts)
        shape = (2, 3, 4, 4)
        x, m0, m1 = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
        h, r = l_s - l_t, (l_t - l_p) / (l_s - l_t)
        d = (1 + 1 / (2 * r)) * m0 - m1 / (2 * r)
        formula = (s_s / s_t) * x - a_s * math.expm1(-h) * d
        case = (f"schedule {name!r}, times prev {ts[0]}, t {ts[1]}, s {ts[2]}: lambda {l_p:.4f}, {l_t:.4f}, "
                f"{l_s:.4f}; h {h:.4f}, r {r:.4f}")

        def hint(got, exp, x=x, m0=m0, m1=m1, h=h, r=r, s_t=s_t, s_s=s_s, a_s=a_s):
            first = (s_s / s_t) * x - a_s * math.expm1(-h) * m0
            if _close(got, first):
                return "that is the first-order step (DDIM); use D = (1 + 1/(2r)) x0_pred - x0_prev / (2r)"
            d_inv = (1 + r / 2) * m0 - r / 2 * m1
            if _close(got, (s_s / s_t) * x - a_s * math.expm1(-h) * d_inv):
                return "r is the previous step over this one: r = h_prev / h = (lambda_t - lambda_prev) / h"
            if _close(got, (s_s / s_t) * x + a_s * math.expm1(-h) * ((1 + 1 / (2 * r)) * m0 - m1 / (2 * r))):
                return "sign: alpha_s * (1 - e^{-h}) * D, i.e. minus alpha_s * expm1(-h) * D"
            return ("the update is (sigma_s / sigma_t) x_t plus alpha_s (1 - e^-h) times the extrapolated D; "
                    "lambda here is log(alpha / sigma), half the log-SNR",
                    "compute h, then r, then D, then x_s; math.expm1(-h) is e^-h - 1 without cancellation")

        got = _call("dpm_solver_2m_step", fn, case, x, m0, m1, l_p, l_t, l_s, a_s, s_s, s_t)
        worst = max(worst, _compare("dpm_solver_2m_step", got, formula, case, atol=1e-8, rtol=1e-8, hint=hint))
        library = dpm_solver_pp_step(x, [m1, m0], [l_p, l_t], a_s, s_s, s_t, l_s, order=2)
        worst = max(worst, _compare("dpm_solver_2m_step", got, library, case, atol=1e-8, rtol=1e-8, hint=hint))
    _ok("dpm_solver_2m_step", len(cases), "the 2M formula and tld.samplers.dpm_solver_pp_step(order=2)", worst)


@checker("ddpm_step")
def check_ddpm_step(fn) -> None:
    """``fn(x_t, x0_pred, alpha_t, sigma_t, alpha_s, sigma_s, noise) -> x_s``: one ancestral DDPM step t -> s,
    a draw from the posterior q(x_s | x_t, x0 = x0_pred) (Ho et al. 2020, eq. 6-7, for any schedule)."""
    g = _gen(31)
    cases = [("vp-cosine", (0.5, 0.4), (1, 1, 2, 2)), ("vp-linear", (0.8, 0.6), (2, 3, 4, 4)),
             ("rectified", (0.9, 0.7), (2, 3, 4, 4))]
    worst = 0.0
    for name, ts, shape in cases:
        (a_t, a_s), (s_t, s_s), (l_t, l_s) = _grid_case(name, ts)
        x, x0, z = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
        eps = (x - a_t * x0) / s_t
        case = (f"schedule {name!r}, t {ts[0]} -> s {ts[1]}: alpha_t {a_t:.4f}, sigma_t {s_t:.4f}, "
                f"alpha_s {a_s:.4f}, sigma_s {s_s:.4f}; x_t {shape}")
        expected = ddim_step(x, x0, eps, a_s, s_s, eta=1.0, noise=z, lam_t=l_t, lam_s=l_s)

        def hint(got, exp, x=x, x0=x0, z=z, eps=eps, a_t=a_t, s_t=s_t, a_s=a_s, s_s=s_s):
            a_ts = a_t / a_s
            var_ts = s_t**2 - a_ts**2 * s_s**2
            mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * x0
            if _close(got, mean, 1e-8):
                return "that is the posterior mean; the ancestral step adds the posterior standard deviation times noise"
            if _close(got, mean + math.sqrt(var_ts) * z, 1e-8):
                return ("the noise is scaled by the posterior's std, sigma_{t|s} sigma_s / sigma_t, not by sigma_{t|s} "
                        "(the forward step's)")
            if _close(got, a_s * x0 + s_s * eps, 1e-8):
                return "that is the deterministic DDIM step; DDPM draws x_s from the posterior q(x_s | x_t, x0)"
            return ("the posterior is Gaussian: its mean mixes x_t and x0_pred, its variance is sigma_{t|s}^2 "
                    "sigma_s^2 / sigma_t^2, with alpha_{t|s} the ratio of alpha_t to alpha_s and sigma_{t|s}^2 = sigma_t^2 - "
                    "alpha_{t|s}^2 sigma_s^2", "mean coefficients: alpha_{t|s} sigma_s^2 / sigma_t^2 on x_t and "
                    "alpha_s sigma_{t|s}^2 / sigma_t^2 on x0_pred")

        got = _call("ddpm_step", fn, case, x, x0, a_t, s_t, a_s, s_s, z)
        worst = max(worst, _compare("ddpm_step", got, expected, case, atol=1e-8, rtol=1e-8, hint=hint))
    _ok("ddpm_step", len(cases), "tld.samplers.ddim_step(eta=1) (DDIM with eta 1 is DDPM)", worst)


MATCH_DDIM50 = (12, 18)   # GMM ring, vp-cosine: DPM-Solver++(2M) matches DDIM at 50 steps with 15
_PROBLEM: dict = {}


def _sampler_problem():
    """The fixed problem of check_sampler_error: GMM ring, vp-cosine, eps model, 256 float64 noises of seed 0."""
    if not _PROBLEM:
        schedule = get_schedule("vp-cosine")
        gmm = GMM.ring(k=8)
        noise = torch.randn(256, 2, generator=_gen(0), dtype=torch.float64)
        _PROBLEM.update(schedule=schedule, model=gmm.model(schedule, prediction="eps"), noise=noise,
                        reference=gmm.reference(noise, schedule, 1.0, None))
    return _PROBLEM


@checker("sampler_error")
def check_sampler_error(fn) -> None:
    """``fn(sampler, steps) -> float``: the RMS error against the exact ODE solution of
    ``tld.samplers.sample(model, noise, schedule, sampler=sampler, steps=steps, progress=False)`` on the problem
    of the exercise (GMM.ring(k=8), vp-cosine, eps model, noise torch.randn(256, 2) of seed 0 in float64)."""
    p = _sampler_problem()
    errors = {}
    for sampler, steps in (("ddim", 5), ("dpm++2m", 10), ("ddim", 50)):
        case = f"sampler {sampler!r}, {steps} steps"
        x = sample(p["model"], p["noise"], p["schedule"], sampler=sampler, steps=steps, progress=False)
        expected = torch.tensor(rms_error(x, p["reference"]), dtype=torch.float64)

        def hint(got, exp):
            return ("compare the samples with GMM.reference(noise, schedule, 1.0, None), the exact solution of the "
                    "ODE from the same noise; the RMS is over every coordinate",
                    "tld.gmm.rms_error(samples, reference)")

        got = _scalar("sampler_error", _call("sampler_error", fn, case, sampler, steps), case)
        _compare("sampler_error", got, expected, case, atol=1e-9, rtol=1e-6, hint=hint)
        errors[(sampler, steps)] = got.item()
    target_err = errors[("ddim", 50)]
    k = next((s for s in range(2, 31) if fn("dpm++2m", s) <= target_err), None)
    if k is None or not MATCH_DDIM50[0] <= k <= MATCH_DDIM50[1]:
        raise CheckError(f"check_sampler_error: 2M needs {k} steps to match DDIM at 50, outside {MATCH_DDIM50}")
    _ok("sampler_error", 3, "tld.gmm.rms_error against GMM.reference", 0.0)
    print(f"  answer: DDIM at 50 steps is {target_err:.2e} from the exact solution; DPM-Solver++(2M) gets there in "
          f"{k} steps, {50 / k:.1f}x fewer model calls")
