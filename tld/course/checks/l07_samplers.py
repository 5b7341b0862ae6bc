"""Checkers of lesson 07, samplers: one DDIM step and one DPM-Solver++(2M) step."""

from __future__ import annotations

import math

import torch

from ...diffusion import get_schedule
from ...samplers import ddim_step, dpm_solver_pp_step
from .common import _call, _close, _compare, _gen, _ok, checker


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
