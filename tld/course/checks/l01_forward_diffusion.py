"""Checkers of lesson 01, forward diffusion: ``add_noise`` and the log-SNR."""

from __future__ import annotations

import torch

from ...diffusion import add_noise, get_schedule
from .common import _call, _close, _compare, _gen, _ok, checker


@checker("add_noise")
def check_add_noise(fn) -> None:
    """``fn(x0, eps, t, schedule) -> x_t`` with x0, eps [B, C, H, W], t [B]: alpha_t x0 + sigma_t eps."""
    g = _gen(1)
    worst = 0.0
    cases = [("vp-linear", (4, 3, 8, 8)), ("vp-cosine", (3, 1, 5, 7)), ("rectified", (2, 4, 4, 4))]
    for name, shape in cases:
        schedule = get_schedule(name)
        x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        t = torch.rand(shape[0], generator=g) * 0.98 + 0.01
        case = f"schedule {name!r}, x0 {tuple(shape)}, t {[round(v, 3) for v in t.tolist()]}"

        def hint(got, exp, x0=x0, eps=eps, t=t, schedule=schedule):
            a, s = schedule.alpha(t).view(-1, 1, 1, 1), schedule.sigma(t).view(-1, 1, 1, 1)
            if _close(got, a**2 * x0 + s**2 * eps):
                return "alpha(t) and sigma(t) are already the square roots: do not square them"
            if _close(got, s * x0 + a * eps):
                return "alpha_t multiplies the image x0 and sigma_t the noise eps, not the other way round"
            if _close(got, (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * eps):
                return "that is the rectified schedule; ask the schedule: schedule.alpha(t), schedule.sigma(t)"
            return ("t has one value per image: alpha_t and sigma_t, of shape [B], must scale every number of "
                    "their own image, so they have to broadcast over C, H, W",
                    "give them the shape [B, 1, 1, 1] (.view or [:, None, None, None]) before multiplying")

        got = _call("add_noise", fn, case, x0, eps, t, schedule)
        worst = max(worst, _compare("add_noise", got, add_noise(x0, eps, t, schedule), case, hint=hint))
    _ok("add_noise", len(cases), "tld.diffusion.add_noise", worst)


@checker("log_snr")
def check_log_snr(fn) -> None:
    """``fn(t, schedule) -> lambda_t = log(alpha_t^2 / sigma_t^2)`` on a tensor of times."""
    worst = 0.0
    t = torch.tensor([1e-3, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    names = ("vp-linear", "vp-cosine", "rectified")
    for name in names:
        schedule = get_schedule(name)
        case = f"schedule {name!r}, t = {t.tolist()} (float64)"
        expected = schedule.log_snr(t)

        def hint(got, exp):
            if _close(got, exp / 2):
                return ("that is log(alpha/sigma), half of lambda_t (DPM-Solver's convention); "
                        "the log-SNR is log(alpha^2 / sigma^2)")
            if _close(got, torch.exp(exp)):
                return "that is the SNR itself; take its log"
            if _close(got, -exp):
                return "sign: the SNR is alpha^2 / sigma^2 (signal over noise), falling with t"
            return ("the log-SNR is the log of (signal / noise) squared: 0 where alpha_t = sigma_t, falling with t",
                    "take torch.log of schedule.alpha(t) and of schedule.sigma(t) separately and combine the logs; "
                    "mind the square")

        got = _call("log_snr", fn, case, t, schedule)
        worst = max(worst, _compare("log_snr", got, expected, case, atol=1e-6, rtol=1e-6, hint=hint))
    _ok("log_snr", len(names), "Schedule.log_snr", worst)
