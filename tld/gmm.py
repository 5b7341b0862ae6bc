"""A test problem with an exact denoiser: data from a mixture of isotropic Gaussians (lessons 07, 08).

If x0 ~ sum_k w_k N(mu_k, s_k^2 I) and x_t = alpha_t x0 + sigma_t eps, then x_t | k is Gaussian
too, N(alpha_t mu_k, (alpha_t^2 s_k^2 + sigma_t^2) I), so E[x0 | x_t] is a responsibility-weighted
sum of per-component Wiener filters, in closed form for *every* schedule:

    E[x0 | x_t, k] = mu_k + alpha_t s_k^2 / (alpha_t^2 s_k^2 + sigma_t^2) (x_t - alpha_t mu_k)

A "model" built from it is the perfect denoiser, so a sampler's distance from the exact solution
of the probability-flow ODE is its discretisation error alone. ``GMM.reference`` solves that ODE
with scipy in float64 to ~1e-9 (checked against a tighter tolerance in the tests).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .diffusion import PREDICTIONS, Schedule, edm_coefficients, get_schedule


class GMM:
    """A mixture of isotropic Gaussians in ``dim`` dimensions (float64 throughout)."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # [K, d]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)  # [K]
        k = len(self.means)
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        if self.means.ndim != 2 or len(self.stds) != k or len(w) != k:
            raise ValueError(f"need means [K, d], stds [K] and weights [K]; got {tuple(self.means.shape)}, "
                             f"{tuple(self.stds.shape)}, {tuple(w.shape)}")
        if (self.stds <= 0).any():
            raise ValueError(f"component stds must be positive, got {self.stds.tolist()}")
        self.log_w = torch.log(w / w.sum())
        self.dim = self.means.shape[1]

    @classmethod
    def ring(cls, k: int = 8, radius: float = 1.0, std: float = 0.1, dim: int = 2):
        """k components on a circle in the first two coordinates (the course's 2-D picture)."""
        ang = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        means = torch.zeros(k, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * torch.cos(ang), radius * torch.sin(ang)
        return cls(means, torch.full((k,), std))

    @classmethod
    def random(cls, k: int = 6, dim: int = 4, seed: int = 0):
        """Random means in [-1, 1]^d, stds in [0.05, 0.3], uneven weights: a harder problem."""
        g = torch.Generator().manual_seed(seed)
        means = torch.rand(k, dim, generator=g, dtype=torch.float64) * 2 - 1
        stds = 0.05 + 0.25 * torch.rand(k, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
        return cls(means, stds, weights)

    def log_prob(self, x) -> torch.Tensor:
        """The exact log-density log p(x) [N] of points x [N, dim] (float64)."""
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1, self.dim)
        var = self.stds**2
        d2 = ((x[:, None, :] - self.means) ** 2).sum(-1)
        return torch.logsumexp(self.log_w - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var), dim=1)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    # --- the exact denoiser -------------------------------------------------------------------
    def _posterior(self, x, alpha, sigma):
        """Responsibilities r [B, K] and per-component means E[x0 | x_t, k] [B, K, d]."""
        var = alpha**2 * self.stds**2 + sigma**2  # [K] (alpha, sigma scalars) or [B, K]
        a3 = alpha[..., None] if torch.is_tensor(alpha) else alpha  # [B, 1] -> [B, 1, 1]
        diff = x[:, None, :] - a3 * self.means  # [B, K, d]
        logp = self.log_w - 0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * torch.log(var)
        r = torch.softmax(logp, -1)
        mean_k = self.means + (alpha * self.stds**2 / var)[..., None] * diff
        return r, mean_k

    def x0_mean(self, x, alpha, sigma) -> torch.Tensor:
        """E[x0 | x_t = x] for x [B, d] at noise level (alpha, sigma) (floats or [B, 1] tensors)."""
        r, mean_k = self._posterior(x, alpha, sigma)
        return (r[..., None] * mean_k).sum(1)

    def model(self, schedule: str | Schedule = "vp-cosine", prediction: str = "eps", conditional=None):
        """The perfect ``model(x, t, cond)`` for a schedule and prediction type.

        ``x`` may be any shape [B, ...] with prod(...) == dim; it computes in float64 and returns
        x's dtype. With ``conditional`` (another GMM, e.g. a subset of the components) the model is
        class-conditional: rows whose ``cond`` is 1 get the conditional mixture's denoiser, rows
        whose ``cond`` is 0 (the null label) this one's, as for classifier-free guidance.
        """
        schedule = get_schedule(schedule)
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")

        def model(x, t, cond=None):
            shape, dtype = x.shape, x.dtype
            xf = x.reshape(shape[0], -1).double()
            if xf.shape[1] != self.dim:
                raise ValueError(f"this GMM lives in {self.dim} dimensions, got x of shape {tuple(shape)}")
            td = torch.as_tensor(t, dtype=torch.float64).expand(shape[0])
            a, s = schedule.alpha(td)[:, None], schedule.sigma(td)[:, None]
            x0 = self.x0_mean(xf, a, s)
            if conditional is not None and cond is not None:
                is_cond = torch.as_tensor(cond).reshape(-1).to(torch.bool)
                x0 = torch.where(is_cond[:, None], conditional.x0_mean(xf, a, s), x0)
            if prediction == "x0":
                out = x0
            elif prediction == "edm":
                c_skip, c_out = edm_coefficients(a, s)
                out = (x0 - c_skip * xf) / c_out
            else:
                # eps from x0 needs sigma > 0; at sigma = 0 the posterior is exact and eps is moot
                eps = (xf - a * x0) / s.clamp(min=1e-300)
                out = eps if prediction == "eps" else a * eps - s * x0
            return out.reshape(shape).to(dtype)

        return model

    # --- the reference solution of the probability-flow ODE ----------------------------------
    def _tilde_velocity(self, xt, st):
        """d x~ / d sigma~ in EDM form (x~ = x / alpha, sigma~ = sigma / alpha): -sigma~ * score."""
        r, _ = self._posterior(xt, 1.0, st)
        var = self.stds**2 + st**2
        diff = xt[:, None, :] - self.means
        return st * (r[..., None] * diff / var[:, None]).sum(1)

    def reference(self, x, schedule, t_start: float, t_end: float | None, rtol: float = 1e-11,
                  atol: float = 1e-12) -> torch.Tensor:
        """Solve the probability-flow ODE from x at t_start to t_end (None: to clean data, sigma = 0).

        Works for any schedule, rectified at t = 1 (alpha = 0) included: the ODE is equivariant
        under scaling, so we follow z = x / sqrt(alpha^2 + sigma^2) in the angle phi = atan(sigma/alpha),
        dz/dphi = cos(phi) eps_hat - sin(phi) x0_hat, down to phi = pi/4, then x~ = x / alpha in
        sigma~ = tan(phi), where the velocity -sigma~ score stays smooth down to sigma~ = 0.
        """
        from scipy.integrate import solve_ivp

        schedule = get_schedule(schedule)
        shape = x.shape
        xf = x.reshape(shape[0], -1).double()
        a0, s0 = (float(v) for v in schedule.alpha_sigma(torch.tensor(t_start, dtype=torch.float64)))
        if t_end is None:
            a1, s1 = 1.0, 0.0
        else:
            a1, s1 = (float(v) for v in schedule.alpha_sigma(torch.tensor(t_end, dtype=torch.float64)))
        phi0, phi1 = math.atan2(s0, a0), math.atan2(s1, a1)
        z = xf / math.hypot(a0, s0)
        n, d = xf.shape

        def f_phi(phi, y):
            zz = torch.from_numpy(y).reshape(n, d)
            c, s = math.cos(phi), math.sin(phi)
            x0 = self.x0_mean(zz, c, s)
            eps = (zz - c * x0) / s
            return (c * eps - s * x0).reshape(-1).numpy()

        def f_tilde(st, y):
            return self._tilde_velocity(torch.from_numpy(y).reshape(n, d), st).reshape(-1).numpy()

        y = z.reshape(-1).numpy()
        mid = max(phi1, math.pi / 4)
        if phi0 > mid:
            y = solve_ivp(f_phi, (phi0, mid), y, method="DOP853", rtol=rtol, atol=atol).y[:, -1]
        phi_now = min(phi0, mid)
        if phi1 < phi_now:
            # switch to x~ = z / cos(phi), sigma~ = tan(phi)
            y = y / math.cos(phi_now)
            y = solve_ivp(f_tilde, (math.tan(phi_now), math.tan(phi1)), y, method="DOP853", rtol=rtol,
                          atol=atol).y[:, -1]
            y = y * math.cos(phi1)
        out = torch.from_numpy(np.ascontiguousarray(y)).reshape(n, d) * math.hypot(a1, s1)
        return out.reshape(shape)


def rms_error(x, ref) -> float:
    """Root-mean-square distance per coordinate between samples and the reference."""
    return (x.double() - ref.double()).pow(2).mean().sqrt().item()
