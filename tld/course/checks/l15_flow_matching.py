"""Checkers of lesson 15, flow matching: a Heun step and a midpoint step of a velocity field, and the
straightness of sampler paths. Hints are graded as in lesson 14's checkers (``hint=2`` for code)."""

from __future__ import annotations

import math

import torch

from ...diffusion import get_schedule
from ...gmm import GMM
from ...samplers import make_denoiser, sample_heun
from .common import CheckError, _call, _close, _gen, _ok
from .l14_guidance_editing import _compare, _passed


def _velocity_field(seed: int):
    """The exact flow-matching velocity u = eps_pred - x0_pred of a 3-d Gaussian mixture on rectified."""
    gmm = GMM.random(k=4, dim=3, seed=seed)
    den = make_denoiser(gmm.model("rectified", "x0"), "rectified", "x0")

    def velocity(x, t):
        x0_pred, eps_pred = den(x, torch.as_tensor(float(t), dtype=torch.float64))
        return eps_pred - x0_pred

    return velocity, den


def _step_cases():
    return [(0.9, 0.7), (0.5, 0.3), (0.3, 0.25)]


def check_heun_step(fn, hint: int = 1) -> None:
    """``fn(velocity, x, t, s) -> x_s``: one Heun step of dx/dt = velocity(x, t) from time t to s (s < t)."""
    task = "heun_step"
    worst = 0.0
    rectified = get_schedule("rectified")
    for k, (t, s) in enumerate(_step_cases()):
        velocity, den = _velocity_field(110 + k)
        x = torch.randn(8, 3, generator=_gen(120 + k), dtype=torch.float64)
        dt = s - t
        u1 = velocity(x, t)
        euler = x + dt * u1
        u2 = velocity(euler, s)
        expected = sample_heun(den, x, torch.tensor([t, s], dtype=torch.float64), rectified, final_denoise=False,
                               progress=False)
        case = f"the exact velocity of a 3-d Gaussian mixture on rectified, t = {t} -> s = {s}, x of shape (8, 3)"

        def diagnose(got, euler=euler, x=x, dt=dt, u2=u2, u1=u1, t=t, velocity=velocity):
            if _close(got, euler):
                return ("that is Euler's step, first order: Heun takes the slope again where Euler lands and "
                        "steps with the mean of the two slopes", None)
            if _close(got, x + dt * u2):
                return ("you stepped with the second slope alone; Heun averages the slope at the start and the "
                        "slope at the Euler prediction", None)
            if _close(got, x + 0.5 * dt * (u1 + velocity(euler, t))):
                return ("the second slope belongs to the end of the step: evaluate it at time s, not t", None)
            if _close(got, x - 0.5 * dt * (u1 + u2)):
                return ("sign of the step: the times go down (s < t), so the step is (s - t) times the slope", None)
            return ("x_s = x + (s - t) * (slope at (x, t) + slope at (the Euler prediction, s)) / 2",
                    "call velocity once at (x, t), take an Euler step to s with that slope, call it again at the "
                    "Euler point and s, then step from x with the mean of the two slopes")

        got = _call(task, fn, case, velocity, x, t, s)
        worst = max(worst, _compare(task, got, expected, case, hint, diagnose, atol=1e-8, rtol=1e-8))
    _passed(task)
    _ok(task, len(_step_cases()), "tld.samplers.sample_heun on one step", worst)


def check_midpoint_step(fn, hint: int = 1) -> None:
    """``fn(velocity, x, t, s) -> x_s``: one explicit midpoint step (RK2): half an Euler step to the middle time
    (t + s) / 2, then the whole step with the slope found there."""
    task = "midpoint_step"
    worst = 0.0
    for k, (t, s) in enumerate(_step_cases()):
        velocity, _ = _velocity_field(130 + k)
        x = torch.randn(8, 3, generator=_gen(140 + k), dtype=torch.float64)
        dt, m = s - t, 0.5 * (t + s)
        u1 = velocity(x, t)
        x_mid = x + 0.5 * dt * u1
        expected = x + dt * velocity(x_mid, m)
        heun = x + 0.5 * dt * (u1 + velocity(x + dt * u1, s))
        case = f"the exact velocity of a 3-d Gaussian mixture on rectified, t = {t} -> s = {s}, x of shape (8, 3)"

        def diagnose(got, x=x, dt=dt, u1=u1, heun=heun, x_mid=x_mid, s=s, t=t, velocity=velocity):
            if _close(got, x + dt * u1):
                return ("that is Euler's step; the midpoint method takes its slope at the middle of the step",
                        None)
            if _close(got, heun):
                return ("that is Heun's step (the mean of two end slopes); the midpoint method uses one slope, "
                        "taken half-way", None)
            if _close(got, x_mid):
                return ("that point is only half-way: the midpoint's slope is then used for the whole step from "
                        "x", None)
            if _close(got, x + dt * velocity(x_mid, s)) or _close(got, x + dt * velocity(x_mid, t)):
                return ("the half-way point lives at the half-way time (t + s) / 2: ask the velocity there", None)
            return ("x_mid = x + (s - t) / 2 * slope at (x, t); x_s = x + (s - t) * slope at (x_mid, (t + s) / 2)",
                    "two velocity calls: one at (x, t), one at (x_mid, (t + s) / 2)")

        got = _call(task, fn, case, velocity, x, t, s)
        worst = max(worst, _compare(task, got, expected, case, hint, diagnose, atol=1e-8, rtol=1e-8))
    # the claim that makes it worth writing: second order (error falls ~4x when the step halves)
    velocity, _ = _velocity_field(150)
    x = torch.randn(16, 3, generator=_gen(151), dtype=torch.float64)
    fine = x
    for i in range(64):
        fine = fn(velocity, fine, 0.9 - 0.4 * i / 64, 0.9 - 0.4 * (i + 1) / 64)
    errs = []
    for n in (4, 8):
        y = x
        for i in range(n):
            y = fn(velocity, y, 0.9 - 0.4 * i / n, 0.9 - 0.4 * (i + 1) / n)
        errs.append((y - fine).pow(2).mean().sqrt().item())
    if not errs[0] / max(errs[1], 1e-300) > 3:
        raise CheckError(f"check_{task}: halving the step cut your error only {errs[0] / max(errs[1], 1e-300):.2f}x "
                         "(second order means about 4x)\n  on 4 and 8 steps from t = 0.9 to 0.5")
    _passed(task)
    _ok(task, len(_step_cases()) + 1, "the midpoint formula and its second order", worst)


def check_path_straightness(fn, hint: int = 1) -> None:
    """``fn(trajectory) -> [B]``: for a list of T + 1 tensors [B, ...] (the points of B paths), each path's chord
    over its arc length: |x_T - x_0| / sum |x_{k+1} - x_k| (1 for a straight path)."""
    task = "path_straightness"
    line = [torch.tensor([[0.0, 0.0], [1.0, 1.0]]) + torch.tensor([[1.0, 2.0], [-1.0, 0.5]]) * k / 4 for k in range(5)]
    corner = [torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])]
    g = _gen(160)
    wiggly = list(torch.randn(7, 5, 2, 3, generator=g, dtype=torch.float64).cumsum(0).unbind(0))

    def reference(traj):
        p = torch.stack([t.double() for t in traj]).flatten(2)
        return (p[-1] - p[0]).norm(dim=1) / (p[1:] - p[:-1]).norm(dim=2).sum(0)

    cases = [(line, "two straight paths of 4 segments"), (corner, "one path with a right-angle corner"),
             (wiggly, "5 random walks of 6 steps in [2, 3]-shaped points")]
    worst = 0.0
    for traj, case in cases:
        expected = reference(traj)

        def diagnose(got, traj=traj, expected=expected):
            p = torch.stack([t.double() for t in traj]).flatten(2)
            squared = (p[-1] - p[0]).norm(dim=1) / (p[1:] - p[:-1]).pow(2).sum(2).sum(0)
            if got.shape != expected.shape:
                return (f"one number per path: B = {len(expected)} paths here, each point flattened to a vector "
                        f"before taking lengths", None)
            if torch.allclose(got.double(), torch.ones_like(expected)):
                return ("every path scores 1, as if it were straight: the arc length must add up every "
                        "segment along the path, not only the chord from start to end", None)
            if _close(got, 1 / expected):
                return ("upside down: the chord (start to end) over the arc (the sum of the segment lengths), "
                        "so a straight path gives 1 and a bent one less", None)
            if _close(got, squared):
                return ("arc length is the sum of the segments' lengths, not of their squared lengths", None)
            return ("|end - start| over the sum of |each segment|, per path, lengths as Euclidean norms of the "
                    "flattened points", "stack the list to [T + 1, B, D] first, then norms over the last axis")

        got = _call(task, fn, case, traj)
        worst = max(worst, _compare(task, got, expected, case, hint, diagnose, atol=1e-9, rtol=1e-7))
    if not math.isclose(float(fn(line)[0]), 1.0, rel_tol=1e-6):
        raise CheckError(f"check_{task}: a straight path must score 1\n  on {cases[0][1]}")
    _passed(task)
    _ok(task, len(cases), "chord / arc length", worst)
