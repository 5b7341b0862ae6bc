"""Checkers of lesson 01, forward diffusion: ``add_noise`` and the log-SNR."""

from __future__ import annotations

import torch

from ...diffusion import add_noise, get_schedule, target
from .common import CheckError, _call, _close, _compare, _gen, _ok, _scalar, checker


@checker("add_noise")
def check_add_noise(fn) -> None:
    """``fn(x0, eps, t, schedule) -> x_t`` with x0, eps [B, C, H, W], t [B]: alpha_t x0 + sigma_t eps."""
    g = _gen(1)
    worst = 0.0
    cases = [("vp-linear", (2, 1, 2, 2)), ("vp-cosine", (3, 1, 5, 7)), ("rectified", (4, 3, 8, 8))]  # smallest first
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


@checker("v_target")
def check_v_target(fn) -> None:
    """``fn(x0, eps, t, schedule) -> v = alpha_t eps - sigma_t x0`` (Salimans & Ho 2022), one t per image."""
    g = _gen(21)
    worst = 0.0
    cases = [("vp-cosine", (2, 1, 2, 2)), ("vp-linear", (3, 3, 4, 4)), ("rectified", (2, 4, 4, 8))]
    for name, shape in cases:
        schedule = get_schedule(name)
        x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        t = torch.rand(shape[0], generator=g) * 0.98 + 0.01
        case = f"schedule {name!r}, x0 {tuple(shape)}, t {[round(v, 3) for v in t.tolist()]}"

        def hint(got, exp, x0=x0, eps=eps, t=t, schedule=schedule):
            a, s = schedule.alpha(t).view(-1, 1, 1, 1), schedule.sigma(t).view(-1, 1, 1, 1)
            if _close(got, a * x0 - s * eps):
                return "x0 and eps are swapped: v leans toward eps at small t (v = alpha_t eps - sigma_t x0)"
            if _close(got, s * x0 - a * eps) or _close(got, -exp):
                return "sign: v = alpha_t eps - sigma_t x0, so at t near 0 it is close to eps"
            if _close(got, eps - x0):
                return ("eps - x0 is the rectified-flow velocity dx_t/dt; v is the velocity in the angle phi with "
                        "alpha = cos phi, sigma = sin phi (Salimans & Ho 2022), on every schedule")
            return ("v is the rate of change of x_t along the circle (alpha_t, sigma_t): its coefficient on eps is "
                    "alpha_t and on x0 it is -sigma_t", "alpha_t and sigma_t from the schedule, shaped [B, 1, 1, 1]")

        got = _call("v_target", fn, case, x0, eps, t, schedule)
        worst = max(worst, _compare("v_target", got, target(x0, eps, t, schedule, "v"), case, hint=hint))
    _ok("v_target", len(cases), "tld.diffusion.target(..., 'v')", worst)


def _crossing(schedule) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if schedule.log_snr(torch.tensor(mid, dtype=torch.float64)) > 0 else (lo, mid)
    return (lo + hi) / 2


LINEAR_CROSSING = (0.2, 0.3)   # vp-linear reaches SNR 1 at t = 0.258: it spends three quarters of t in noise


@checker("snr_one_time")
def check_snr_one_time(fn) -> None:
    """``fn(schedule) -> t``: the time at which signal and noise are equal (alpha_t = sigma_t, log-SNR 0), to 1e-4."""
    names = ("rectified", "vp-cosine", "vp-linear")
    found = {}
    for name in names:
        schedule = get_schedule(name)
        case = f"schedule {name!r}"
        expected = torch.tensor(_crossing(schedule), dtype=torch.float64)

        def hint(got, exp):
            if _close(got, 1 - exp, 1e-4):
                return "that is 1 - t: the log-SNR is large at t = 0 (clean) and falls with t"
            return ("log_snr(t) falls strictly from +inf to -inf: keep a bracket [lo, hi] with log_snr(lo) > 0 > "
                    "log_snr(hi) and halve it", "about 40 halvings of [0, 1] reach 1e-12; evaluate in float64")

        got = _scalar("snr_one_time", _call("snr_one_time", fn, case, schedule), case)
        _compare("snr_one_time", got, expected, case, atol=1e-4, rtol=0, hint=hint)
        found[name] = got.item()
    lo, hi = LINEAR_CROSSING
    if not lo <= found["vp-linear"] <= hi:
        raise CheckError(f"check_snr_one_time: vp-linear crosses at {found['vp-linear']:.3f}, expected in [{lo}, {hi}]")
    _ok("snr_one_time", len(names), "a bisection on Schedule.log_snr", 0.0)
    print("  answer: SNR 1 at " + ", ".join(f"{n} t = {v:.3f}" for n, v in found.items())
          + ": vp-linear is mostly noise after its first quarter")
