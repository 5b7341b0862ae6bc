"""Checkers of lesson 14, guidance beyond CFG and editing: a classifier-guided denoiser, a fixed-point DDIM
inversion step, and the round-trip error of inversion.

Hints are graded: a first failure says what is wrong in concepts (the property violated, on which case); a
code-level hint comes with ``hint=2`` or after the third failure of the same task. No hint is the answer.
"""

from __future__ import annotations

import math

import torch

from ...diffusion import get_schedule
from ...gmm import GMM, rms_error
from ...samplers import classifier_guided, invert, make_denoiser, sample, sampling_grid
from .common import CheckError, _call, _close, _gen, _ok, _scalar

_FAILURES: dict = {}


def _graded(task: str, hint: int, concept: str, code: str | None) -> str:
    """The hint text of a failure: the concept always, the code-level hint only when asked or after 3 failures."""
    n = _FAILURES[task] = _FAILURES.get(task, 0) + 1
    if code and (hint >= 2 or n >= 3):
        return f"{concept}\n  code hint: {code}"
    more = f" (a code-level hint: check_{task}(fn, hint=2))" if code else ""
    return concept + more


def _compare(task: str, got, expected: torch.Tensor, case: str, hint: int, diagnose, atol=1e-7, rtol=1e-6) -> float:
    """Shape, finiteness and values of ``got``; on a mismatch ``diagnose(got)`` gives (concept, code)."""
    if not torch.is_tensor(got):
        raise CheckError(f"check_{task}: your function returned {type(got).__name__}, expected a tensor of shape "
                         f"{tuple(expected.shape)}\n  on {case}")
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckError(f"check_{task}: wrong shape: got {tuple(got.shape)}, expected {tuple(expected.shape)}\n"
                         f"  on {case}\n  hint: " + _graded(task, hint, *diagnose(got)))
    g, e = got.detach().double(), expected.detach().double()
    if not torch.isfinite(g).all():
        raise CheckError(f"check_{task}: your result holds non-finite values\n  on {case}\n  hint: "
                         + _graded(task, hint, *diagnose(got)))
    err = (g - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        raise CheckError(f"check_{task}: wrong values: max abs error {err.max().item():.3g}; {int(bad.sum())} of "
                         f"{bad.numel()} values differ\n  on {case}\n  hint: " + _graded(task, hint, *diagnose(got)))
    return err.max().item()


def _passed(task: str) -> None:
    _FAILURES.pop(task, None)


# --------------------------------------------------------------------------- classifier guidance

def _linear_denoiser(schedule, seed: int):
    """x0_pred = tanh(W x_t): a differentiable denoiser whose Jacobian is not the identity."""
    w = torch.randn(4, 4, generator=_gen(seed), dtype=torch.float64) / 2

    def model(x, t, cond=None):
        return torch.tanh(x @ w.T)

    return make_denoiser(model, schedule, "x0")


def _log_prob(seed: int):
    """log softmax of a linear 3-class classifier on x0, for class 1."""
    a = torch.randn(3, 4, generator=_gen(seed), dtype=torch.float64)

    def log_prob(x0):
        return torch.log_softmax(x0 @ a.T, -1)[:, 1]

    return log_prob


def check_classifier_guided(fn, hint: int = 1) -> None:
    """``fn(denoiser, log_prob, scale, schedule) -> denoiser``: classifier guidance through x0_pred.

    The returned denoiser maps (x_t, t) to (x0~, eps~) = (x0_pred + scale sigma_t^2 / alpha_t g,
    eps_pred - scale sigma_t g), with g the gradient of log_prob(x0_pred(x_t)) with respect to x_t.
    """
    task = "classifier_guided"
    cases = [("vp-cosine", 0.4, 1.5), ("rectified", 0.6, 0.8), ("vp-linear", 0.2, 3.0)]
    worst = 0.0
    for k, (name, t_val, scale) in enumerate(cases):
        s = get_schedule(name)
        base, log_prob = _linear_denoiser(s, 30 + k), _log_prob(40 + k)
        x = torch.randn(5, 4, generator=_gen(50 + k), dtype=torch.float64)
        t = torch.tensor(t_val, dtype=torch.float64)
        a, sig = s.alpha(t).item(), s.sigma(t).item()
        x0_plain, eps_plain = base(x, t)
        x0_exp, eps_exp = classifier_guided(base, log_prob, scale, s)(x, t)
        # the usual wrong answers, for the diagnosis
        x0_var = x0_plain.detach().clone().requires_grad_(True)
        (g_x0,) = torch.autograd.grad(log_prob(x0_var).sum(), x0_var)
        g_xt = (x0_exp - x0_plain) / (scale * sig**2 / a)
        case = f"schedule {name!r}, t = {t_val} (alpha_t {a:.4f}, sigma_t {sig:.4f}), scale {scale}, x_t of shape (5, 4)"

        def diagnose(got, x0_plain=x0_plain, g_x0=g_x0, g_xt=g_xt, a=a, sig=sig, scale=scale):
            if _close(got, x0_plain):
                return ("your guided x0 equals the denoiser's own prediction: the classifier's gradient never "
                        "reached it (is the gradient taken, and is it with respect to the denoiser's input?)",
                        "make a leaf copy of x_t that requires grad, call the denoiser on it, then differentiate")
            if _close(got, x0_plain + scale * sig**2 / a * g_x0):
                return ("you differentiated log p with respect to x0_pred; guidance needs the gradient with "
                        "respect to x_t, back through the denoiser (the chain rule through x0_pred(x_t))",
                        "torch.autograd.grad(..., inputs=<the x_t leaf>), not the x0_pred tensor")
            if _close(got, x0_plain + scale * g_xt):
                return ("the gradient is right but its scale is not: a change of the score by s*g moves x0 by "
                        "s * sigma_t^2 / alpha_t * g (Tweedie's formula)", None)
            if _close(got, x0_plain - scale * sig**2 / a * g_xt):
                return ("guidance climbs the classifier's log-probability: the correction is added, not "
                        "subtracted", None)
            return ("guided x0 = x0_pred + scale * sigma_t^2 / alpha_t * (gradient of log p(y | x0_pred(x_t)) "
                    "with respect to x_t)", None)

        def diagnose_eps(got, eps_plain=eps_plain):
            if _close(got, eps_plain):
                return ("your eps is the unguided one: x0 and eps must stay a consistent pair, "
                        "x_t = alpha_t x0 + sigma_t eps, so eps moves by -scale * sigma_t * g", None)
            return ("guided eps = eps_pred - scale * sigma_t * g, the same gradient g as for x0", None)

        out = _call(task, fn, case, base, log_prob, scale, s)
        if not callable(out):
            raise CheckError(f"check_{task}: your function returned {type(out).__name__}; it should return a "
                             f"denoiser, a function (x_t, t) -> (x0, eps)\n  on {case}")
        got = _call(task, out, case, x, t)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise CheckError(f"check_{task}: your denoiser returned {type(got).__name__}; it should return the "
                             f"pair (x0, eps)\n  on {case}")
        worst = max(worst, _compare(task, got[0], x0_exp, case + " (x0)", hint, diagnose))
        worst = max(worst, _compare(task, got[1], eps_exp, case + " (eps)", hint, diagnose_eps))
    _passed(task)
    _ok(task, len(cases), "tld.samplers.classifier_guided", worst)


# --------------------------------------------------------------------------- fixed-point inversion

def _gmm_case(name: str, seed: int):
    gmm = GMM.random(k=4, dim=3, seed=seed)
    return gmm, gmm.model(name, "x0")


def check_fixed_point_inversion_step(fn, hint: int = 1) -> None:
    """``fn(denoiser, x_u, t_u, t_v, schedule, iters) -> x_v``: one DDIM inversion step from t_u up to t_v > t_u,
    refined by ``iters`` fixed-point iterations (iters = 0: the plain DDIM inversion step)."""
    task = "fixed_point_inversion_step"
    cases = [("vp-cosine", 0.3, 0.45, 0), ("vp-cosine", 0.3, 0.45, 3), ("rectified", 0.5, 0.6, 2),
             ("vp-linear", 0.1, 0.2, 1)]
    worst = 0.0
    for k, (name, t_u, t_v, iters) in enumerate(cases):
        s = get_schedule(name)
        gmm, model = _gmm_case(name, 60 + k)
        den = make_denoiser(model, s, "x0")
        x_u = torch.randn(6, 3, generator=_gen(70 + k), dtype=torch.float64) * s.sigma(torch.tensor(t_u)).item() \
            + s.alpha(torch.tensor(t_u)).item() * gmm.sample(6, generator=_gen(80 + k))
        expected = invert(model, x_u, s, timesteps=[t_v, t_u], prediction="x0", iters=iters, progress=False)
        explicit = invert(model, x_u, s, timesteps=[t_v, t_u], prediction="x0", iters=0, progress=False)
        case = f"schedule {name!r}, t_u = {t_u} -> t_v = {t_v}, iters = {iters}, x_u of shape (6, 3)"

        def diagnose(got, explicit=explicit, iters=iters, x_u=x_u):
            if iters > 0 and _close(got, explicit):
                return ("with iters > 0 the result should differ from the plain DDIM inversion step: each "
                        "iteration asks the model again, at the current guess of x_v", None)
            if _close(got, x_u):
                return ("x_v equals x_u: the step never left its start (the times must go up: t_u to t_v)", None)
            if iters == 0:
                return ("iters = 0 is the plain DDIM step run upward: x_v = alpha_v x0_pred + sigma_v eps_pred, "
                        "both predicted at (x_u, t_u)", None)
            return ("each iteration solves the DDIM step back for x_v: x_u = alpha_u x0 + sigma_u eps with x0 "
                    "predicted at (x_v, t_v) and eps = (x_v - alpha_v x0) / sigma_v; the eps that makes it "
                    "exact comes from the start point x_u",
                    "inside the loop: x0 = denoiser(x_v, t_v)[0]; then x_v = alpha_v * x0 + sigma_v * <the eps "
                    "that x_u and this x0 imply at t_u>")

        got = _call(task, fn, case, den, x_u, t_u, t_v, s, iters)
        worst = max(worst, _compare(task, got, expected, case, hint, diagnose, atol=1e-8, rtol=1e-8))
    _passed(task)
    _ok(task, len(cases), "tld.samplers.invert(..., iters=k) on one step", worst)


# --------------------------------------------------------------------------- the round-trip error

def _reference_round_trip(model, x0, schedule, steps, prediction, iters):
    x_t = invert(model, x0, schedule, steps=steps, prediction=prediction, iters=iters, progress=False)
    t_max = sampling_grid(schedule, steps, prediction)[0].item()
    back = sample(model, x_t, schedule, sampler="ddim", steps=steps, prediction=prediction, t_start=t_max,
                  progress=False)
    return rms_error(back, x0)


def check_round_trip_error(fn, hint: int = 1) -> None:
    """``fn(model, x0, schedule, steps, prediction, iters) -> float``: invert x0 with ``steps`` DDIM steps (and
    ``iters`` fixed-point iterations), sample it back with DDIM on the same grid, and return the RMS error."""
    task = "round_trip_error"
    cases = [("vp-cosine", 6, 0), ("rectified", 8, 1), ("vp-cosine", 10, 2)]
    worst = 0.0
    for k, (name, steps, iters) in enumerate(cases):
        gmm, model = _gmm_case(name, 90 + k)
        x0 = gmm.sample(32, generator=_gen(100 + k))
        expected = _reference_round_trip(model, x0, name, steps, "x0", iters)
        case = f"schedule {name!r}, {steps} steps, iters = {iters}, 32 points of a 3-d Gaussian mixture"
        got = _scalar(task, _call(task, fn, case, model, x0, name, steps, "x0", iters), case).item()
        if not math.isfinite(got) or abs(got - expected) > 1e-6 * max(1.0, expected):
            if abs(got - expected**2) < 1e-6:
                concept, code = ("that is the mean *squared* error; the round-trip error here is its square root "
                                 "(RMS, in the units of the data)"), None
            elif got < 1e-9:
                concept, code = ("an error of zero means nothing was inverted or nothing was sampled back: invert "
                                 "to t_max, then sample from there (sample(..., t_start=...))"), None
            else:
                concept = ("invert with tld.samplers.invert (steps, iters), sample back with DDIM from the "
                           "inverted x_t at the first time of the same grid, then the RMS distance to x0")
                code = "sample(model, x_T, schedule, sampler=\"ddim\", steps=steps, prediction=..., t_start=<t_max>)"
            raise CheckError(f"check_{task}: wrong values: max abs error {abs(got - expected):.3g} (you returned "
                             f"{got:.6g})\n  on {case}\n  hint: " + _graded(task, hint, concept, code))
        worst = max(worst, abs(got - expected))
    _passed(task)
    _ok(task, len(cases), "tld.samplers.invert then sample(t_start=t_max)", worst)
