"""Forward diffusion in continuous time t in [0, 1]: schedules, noising, prediction targets.

Every schedule writes a noisy sample as ``x_t = alpha_t * x0 + sigma_t * eps`` and exposes
``alpha(t)``, ``sigma(t)``, ``log_snr(t)`` = log(alpha_t^2 / sigma_t^2) and the inverse
``t_from_log_snr``. (DPM-Solver's lambda_t = log(alpha_t / sigma_t) is half of it, and only the
samplers use that name.) Schedules compute in float64 and return the dtype of ``t``, so samplers
that step in log-SNR stay accurate in float32 models.

Schedules (lesson 01):

- ``vp-linear``: DDPM's betas, linear from 1e-4 to 0.02 over 1000 steps (Ho et al. 2020).
  ``t = k / 1000`` is diffusers' integer timestep ``k``: ``alpha(k/1000)**2`` equals
  ``prod_{j<=k} (1 - beta_j)`` exactly, and log(alpha^2) is linear in t between grid points.
- ``vp-cosine``: alpha_t = f(t)/f(0), f(t) = cos(pi/2 * (t+s)/(1+s)), s = 0.008
  (Nichol & Dhariwal 2021), sigma_t = sqrt(1 - alpha_t^2).
- ``rectified``: TLD's linear interpolation x0 * (1 - sigma) + eps * sigma with sigma = t.
"""

from __future__ import annotations

import math

import torch

PREDICTIONS = ("eps", "x0", "v", "edm")
EDM_SIGMA_DATA = 0.5   # prediction="edm": EDM's preconditioning with its sigma_data (Karras et al. 2022)
TIME_SAMPLERS = ("uniform", "beta", "logit-normal")
LOSS_WEIGHTINGS = ("none", "min-snr", "edm", "x0")


def _as_tensor(t) -> torch.Tensor:
    if not torch.is_tensor(t):
        t = torch.as_tensor(t, dtype=torch.float64)
    return t


def _out(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    return value.to(dtype)


class Schedule:
    """A noise schedule in continuous time. Subclasses define ``_log_alpha2(t)`` (float64).

    ``t_min`` and ``t_max`` are the default sampling range (training draws t in the same range).
    """

    name = "schedule"
    t_min = 0.0
    t_max = 1.0
    variance_preserving = True

    # --- what subclasses provide (float64 in, float64 out) ---
    def _log_alpha2(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_sigma2(self, t: torch.Tensor) -> torch.Tensor:
        # Variance preserving: sigma^2 = 1 - alpha^2, computed without cancellation near t = 0.
        return torch.log(-torch.expm1(self._log_alpha2(t)))

    def _t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- the public interface, on tensors of any shape ---
    def alpha(self, t) -> torch.Tensor:
        t = _as_tensor(t)
        return _out(torch.exp(0.5 * self._log_alpha2(t.double())), t)

    def sigma(self, t) -> torch.Tensor:
        t = _as_tensor(t)
        return _out(torch.exp(0.5 * self._log_sigma2(t.double())), t)

    def log_snr(self, t) -> torch.Tensor:
        """log(alpha_t^2 / sigma_t^2); strictly decreasing in t."""
        t = _as_tensor(t)
        td = t.double()
        return _out(self._log_alpha2(td) - self._log_sigma2(td), t)

    def t_from_log_snr(self, lam) -> torch.Tensor:
        """The inverse of ``log_snr``: the time at which the log-SNR equals ``lam``."""
        lam = _as_tensor(lam)
        return _out(self._t_from_log_snr(lam.double()), lam)

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha(t), self.sigma(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class VPLinear(Schedule):
    """DDPM's discrete linear betas, made continuous by interpolating log(alpha^2) in t."""

    name = "vp-linear"
    t_min = 0.0
    t_max = 0.999  # diffusers' last timestep, 999

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000):
        self.num_steps = num_steps
        self.betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        # one more beta so that t = 1 (k = num_steps) is defined too
        step = (beta_end - beta_start) / (num_steps - 1)
        betas_ext = torch.cat([self.betas, torch.tensor([beta_end + step], dtype=torch.float64)])
        self._grid_log_alpha2 = torch.cumsum(torch.log1p(-betas_ext), 0)  # at t_k = k / num_steps
        self.alphas_cumprod = torch.exp(self._grid_log_alpha2[:num_steps])

    def _log_alpha2(self, t):
        g = self._grid_log_alpha2.to(t.device)
        k = (t * self.num_steps).clamp(0, self.num_steps)
        lo = k.floor().clamp(max=self.num_steps - 1).long()
        frac = k - lo
        return g[lo] + frac * (g[lo + 1] - g[lo])

    def _t_from_log_snr(self, lam):
        g = self._grid_log_alpha2.to(lam.device)
        la2 = torch.nn.functional.logsigmoid(lam)  # log alpha^2 = log sigmoid(log_snr) for VP
        # g is decreasing: search on its negation, then interpolate linearly in the segment.
        neg = (-g).contiguous()
        idx = torch.searchsorted(neg, (-la2).contiguous().reshape(-1)).reshape(la2.shape)
        hi = idx.clamp(1, self.num_steps)
        lo = hi - 1
        frac = (la2 - g[lo]) / (g[hi] - g[lo])
        return (lo + frac) / self.num_steps


class VPCosine(Schedule):
    """iDDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17) with offset s = 0.008."""

    name = "vp-cosine"
    t_min = 0.0
    t_max = 0.999  # alpha_1 = 0 exactly; stop just short so every conversion is finite

    def __init__(self, s: float = 0.008):
        self.s = s
        self._theta0 = math.pi / 2 * s / (1 + s)

    def _theta(self, t):
        return math.pi / 2 * (t + self.s) / (1 + self.s)

    def _log_alpha2(self, t):
        return 2 * (torch.log(torch.cos(self._theta(t))) - math.log(math.cos(self._theta0)))

    def _log_sigma2(self, t):
        # cos^2 b - cos^2 a = sin(a + b) sin(a - b): no cancellation near t = 0
        a = self._theta(t)
        b = self._theta0
        return torch.log(torch.sin(a + b) * torch.sin(a - b)) - 2 * math.log(math.cos(b))

    def _t_from_log_snr(self, lam):
        alpha = torch.exp(0.5 * torch.nn.functional.logsigmoid(lam))
        theta = torch.acos((alpha * math.cos(self._theta0)).clamp(-1, 1))
        return theta * 2 / math.pi * (1 + self.s) - self.s


class Rectified(Schedule):
    """TLD's linear interpolation: x_t = (1 - t) * x0 + t * eps, so alpha = 1 - t, sigma = t."""

    name = "rectified"
    t_min = 0.0
    t_max = 1.0
    variance_preserving = False

    def _log_alpha2(self, t):
        return 2 * torch.log1p(-t)

    def _log_sigma2(self, t):
        return 2 * torch.log(t)

    def _t_from_log_snr(self, lam):
        # log_snr = 2 log((1 - t) / t)  =>  t = sigmoid(-log_snr / 2)
        return torch.sigmoid(-lam / 2)


SCHEDULES = {"vp-linear": VPLinear, "vp-cosine": VPCosine, "rectified": Rectified}


def get_schedule(name: str | Schedule, **kwargs) -> Schedule:
    """Build a schedule by name: ``vp-linear``, ``vp-cosine`` or ``rectified``."""
    if isinstance(name, Schedule):
        return name
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)


# ---------------------------------------------------------------------------------------------
# Noising and the three prediction targets
# ---------------------------------------------------------------------------------------------


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] to broadcast against x."""
    v = v.to(device=x.device, dtype=x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """x_t = alpha_t * x0 + sigma_t * eps, with t of shape [B] (or a scalar)."""
    if x0.shape != eps.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)} but eps has {tuple(eps.shape)}; they must match")
    t = torch.as_tensor(t, device=x0.device)
    if t.ndim == 0:
        t = t.expand(x0.shape[0])
    alpha_t, sigma_t = _bcast(schedule.alpha(t), x0), _bcast(schedule.sigma(t), x0)
    return alpha_t * x0 + sigma_t * eps


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def edm_coefficients(alpha: torch.Tensor, sigma: torch.Tensor, sigma_data: float = EDM_SIGMA_DATA):
    """(c_skip, c_out) of EDM's preconditioning (Karras et al. 2022) on x_t = alpha x0 + sigma eps:
    the network's output F gives x0_hat = c_skip x_t + c_out F.

    EDM writes it on x_t / alpha = x0 + s eps, s = sigma / alpha: D = s_d^2 / (s^2 + s_d^2) (x_t / alpha)
    + s s_d / sqrt(s^2 + s_d^2) F. Multiplied out, c_skip = s_d^2 alpha / (sigma^2 + s_d^2 alpha^2) and
    c_out = sigma s_d / sqrt(sigma^2 + s_d^2 alpha^2). At low noise x0_hat is nearly x_t and F's error is
    scaled by sigma (like v); at pure noise c_skip = 0 and F is x0 / s_d (like x0). On a VP schedule,
    s_d = 1 gives c_skip = alpha, c_out = sigma: v prediction with F = -v. The input is not rescaled (EDM's
    c_in): a VP x_t already has unit scale.
    """
    d = sigma**2 + sigma_data**2 * alpha**2
    return sigma_data**2 * alpha / d, sigma * sigma_data / d**0.5   # tensors or floats


def convert(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule,
            src: str, dst: str) -> torch.Tensor:
    """Turn a model output of kind ``src`` into kind ``dst`` (each of eps, x0, v, edm).

    With x_t = a x0 + s eps and v = a eps - s x0 (Salimans & Ho 2022), for any schedule:
    x0 = (a x_t - s v) / (a^2 + s^2) and eps = (s x_t + a v) / (a^2 + s^2). ``edm`` is the output F of
    EDM's preconditioned network, x0 = c_skip x_t + c_out F (``edm_coefficients``).
    """
    _check_prediction(src)
    _check_prediction(dst)
    if src == dst:
        return pred
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    a, s = _bcast(schedule.alpha(t), x_t), _bcast(schedule.sigma(t), x_t)
    # first to (x0, eps) ...
    if src == "eps":
        eps = pred
        x0 = (x_t - s * eps) / a
    elif src == "x0":
        x0 = pred
        eps = (x_t - a * x0) / s
    elif src == "edm":
        c_skip, c_out = edm_coefficients(a, s)
        x0 = c_skip * x_t + c_out * pred
        eps = (x_t - a * x0) / s
    else:
        norm = a * a + s * s
        x0 = (a * x_t - s * pred) / norm
        eps = (s * x_t + a * pred) / norm
    # ... then to what was asked for
    if dst == "x0":
        return x0
    if dst == "eps":
        return eps
    if dst == "edm":
        c_skip, c_out = edm_coefficients(a, s)
        return (x0 - c_skip * x_t) / c_out
    return a * eps - s * x0


def to_x0(pred, x_t, t, schedule, prediction):
    return convert(pred, x_t, t, schedule, prediction, "x0")


def target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: Schedule, prediction: str) -> torch.Tensor:
    """What a model of the given prediction type should output for (x0, eps, t)."""
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    a, s = _bcast(schedule.alpha(t), x0), _bcast(schedule.sigma(t), x0)
    if prediction == "edm":
        c_skip, c_out = edm_coefficients(a, s)
        return (x0 - c_skip * (a * x0 + s * eps)) / c_out
    return a * eps - s * x0


# ---------------------------------------------------------------------------------------------
# Training-time distributions of t
# ---------------------------------------------------------------------------------------------


def sample_t(n: int, kind: str = "uniform", *, generator: torch.Generator | None = None,
             device=None, t_min: float = 0.0, t_max: float = 1.0,
             beta_a: float = 1.0, beta_b: float = 2.5, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Draw n training times in [t_min, t_max].

    - ``uniform``: the usual choice for VP schedules.
    - ``beta``: Beta(a, b) — TLD draws sigma ~ Beta(1, 2.5), favouring low noise. Sampled by the
      inverse CDF, which is closed-form when a == 1 or b == 1, so it is reproducible by generator.
    - ``logit-normal``: sigmoid(mean + std * N(0, 1)) (Esser et al. 2024, SD3), favouring the middle.
    """
    if kind not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {kind!r}; expected one of {TIME_SAMPLERS}")
    if kind == "logit-normal":
        u = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    else:
        u = torch.rand(n, generator=generator, device=device)
        if kind == "beta":
            if beta_a == 1.0:  # CDF 1 - (1 - x)^b
                u = 1 - (1 - u) ** (1.0 / beta_b)
            elif beta_b == 1.0:  # CDF x^a
                u = u ** (1.0 / beta_a)
            else:
                raise ValueError(f"beta time sampler supports a == 1 or b == 1 (got a={beta_a}, b={beta_b})")
    return t_min + (t_max - t_min) * u


def x0_error_scale(t: torch.Tensor, schedule: Schedule, prediction: str) -> torch.Tensor:
    """How much larger the squared error of a ``prediction`` is than the error of the x0 it implies ([B]).

    With x_t fixed, a prediction's error is a multiple of the implied x0's error: eps = (x_t - alpha x0) / sigma
    gives eps_hat - eps = -(alpha / sigma)(x0_hat - x0), and v = alpha eps - sigma x0 gives
    v_hat - v = -((alpha^2 + sigma^2) / sigma)(x0_hat - x0). So the eps, x0 and v losses are one loss, the
    x0 error, weighted per t by SNR = alpha^2 / sigma^2, 1 and (alpha^2 + sigma^2)^2 / sigma^2 (SNR + 1 on a
    VP schedule; Kingma et al. 2021 and Hang et al. 2023 write the same identity). EDM's F errs by the x0
    error over c_out, so its loss weighs the x0 error by 1 / c_out^2 (EDM's own lambda, Karras et al. 2022).
    """
    _check_prediction(prediction)
    a, s = schedule.alpha(t).double(), schedule.sigma(t).double()
    if prediction == "x0":
        return torch.ones_like(a)
    if prediction == "edm":
        return edm_coefficients(a, s)[1] ** -2
    if prediction == "eps":
        return a**2 / s**2
    return (a**2 + s**2) ** 2 / s**2


def loss(pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
         schedule: Schedule, prediction: str, weighting: str = "none", gamma: float = 5.0,
         sigma_data: float = 0.5) -> torch.Tensor:
    """Mean squared error against the target of ``prediction``, one value per example ([B]).

    ``weighting="min-snr"`` is Min-SNR-gamma (Hang et al. 2023): whatever the prediction, the loss becomes
    min(SNR, gamma) times the squared error of the implied x0, i.e. the prediction's error divided by
    ``x0_error_scale`` and multiplied by min(SNR, gamma). High-SNR (nearly clean) times stop dominating
    and the very noisy ones are damped, as in x0 prediction for t near 1.

    ``weighting="edm"`` is the weighting of Karras et al. 2022 (EDM): on the noise level s = sigma / alpha of
    x_t / alpha = x0 + s eps, lambda(s) = (s^2 + sigma_data^2) / (s sigma_data)^2 times the x0 error, here
    divided by 1 / sigma_data^2 so that pure noise weighs 1: 1 + sigma_data^2 SNR (v prediction's weighting
    is the same with sigma_data = 1). Only the weighting: the network is not preconditioned by EDM's c_skip,
    c_out and c_in, and t keeps its own sampler.

    ``weighting="x0"`` weighs the implied x0 error by 1 at every t, whatever the network outputs: x0
    prediction's weighting on another parameterization. With ``prediction="v"`` the network keeps v's skip
    from its input (x0_hat = alpha x_t - sigma v_hat, so at low noise x0_hat is nearly x_t and the output
    head's error is scaled by sigma), while the loss weighs every time as x0 prediction does. (Measured at
    lesson scale, ``python -m tld.bench quality base=cpu-lesson``: that v network learns the shapes no faster
    than plain v, so the parameterization matters beyond the weighting; lesson 04.)
    """
    tgt = target(x0, eps, t, schedule, prediction)
    if pred.shape != tgt.shape:
        raise ValueError(f"model output has shape {tuple(pred.shape)}, expected {tuple(tgt.shape)}")
    err = (pred.float() - tgt.float()).pow(2).flatten(1).mean(1)
    if weighting == "none":
        return err
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {LOSS_WEIGHTINGS}")
    snr = schedule.alpha(t).double() ** 2 / schedule.sigma(t).double().clamp_min(1e-12) ** 2
    if weighting == "x0":
        w_x0 = torch.ones_like(snr)
    elif weighting == "edm":
        if not sigma_data > 0:
            raise ValueError(f"edm sigma_data must be > 0, got {sigma_data}")
        w_x0 = 1 + sigma_data**2 * snr
    else:
        if not gamma > 0:
            raise ValueError(f"min-snr gamma must be > 0, got {gamma}")
        w_x0 = snr.clamp(max=gamma)
    w = w_x0 / x0_error_scale(t, schedule, prediction).clamp_min(1e-12)
    return err * w.to(err.dtype)


def training_loss(model, x0: torch.Tensor, cond, schedule: Schedule, *, prediction: str = "eps",
                  time_sampler: str = "uniform", generator: torch.Generator | None = None,
                  t_min: float | None = None, t_max: float | None = None, **time_kwargs):
    """One draw of the diffusion loss: sample t and eps, noise x0, ask the model. Returns [B] losses."""
    b = x0.shape[0]
    t = sample_t(b, time_sampler, generator=generator, device=x0.device,
                 t_min=schedule.t_min if t_min is None else t_min,
                 t_max=schedule.t_max if t_max is None else t_max, **time_kwargs).to(x0.dtype)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = add_noise(x0, eps, t, schedule)
    pred = model(x_t, t, cond)
    return loss(pred, x0, eps, t, schedule, prediction)


# ---------------------------------------------------------------------------------------------
# Learned variances: the hybrid objective (Nichol & Dhariwal 2021), as DiT trains it
# ---------------------------------------------------------------------------------------------

VLB_WEIGHT = 0.001   # lambda of L_hybrid = L_simple + lambda * L_vlb (Nichol & Dhariwal 2021, section 3.1)
_LOG2 = math.log(2.0)


def num_steps(schedule: Schedule) -> int:
    """T, the number of discrete steps the variational bound counts: vp-linear's own (1000), else 1000."""
    return int(getattr(schedule, "num_steps", 1000))


def step_log_variances(alpha_t, sigma_t, alpha_s, sigma_s):
    """(log beta, log beta~) of one reverse step t -> s (s earlier, less noisy), for any schedule.

    beta = sigma_{t|s}^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2 is the forward step's variance
    (DDPM's beta_t) and beta~ = sigma_s^2 / sigma_t^2 * beta the posterior q(x_s | x_t, x0)'s (beta~_t).
    Both are sigma^2 (1 - e^{-2h}) with h = lambda_s - lambda_t: sigma_t^2 for beta, sigma_s^2 for
    beta~. On vp-linear's grid t = k / 1000 -> (k - 1) / 1000 they are DDPM's beta_k and
    beta~_k = (1 - abar_{k-1}) / (1 - abar_k) beta_k. (-inf for beta~ when s is clean data.)
    """
    f = lambda v: torch.as_tensor(v, dtype=torch.float64)
    alpha_t, sigma_t, alpha_s, sigma_s = f(alpha_t), f(sigma_t), f(alpha_s), f(sigma_s)
    # 1 - e^{-2h} = 1 - (alpha_t sigma_s / (alpha_s sigma_t))^2
    log_one_minus = torch.log(-torch.expm1(2 * (torch.log(alpha_t) + torch.log(sigma_s)
                                                - torch.log(alpha_s) - torch.log(sigma_t))))
    return 2 * torch.log(sigma_t) + log_one_minus, 2 * torch.log(sigma_s) + log_one_minus


def learned_log_variance(v: torch.Tensor, log_beta, log_beta_tilde) -> torch.Tensor:
    """The model's log variance from its raw variance output v (about [-1, 1]; Nichol & Dhariwal 2021 eq. 15):
    log Sigma = frac log beta + (1 - frac) log beta~, frac = (v + 1) / 2."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


def split_learned_variance(out: torch.Tensor, channels: int):
    """A model output [B, 2C, ...] -> (prediction [B, C, ...], variance values [B, C, ...]); [B, C, ...] -> (out, None)."""
    if out.shape[1] == 2 * channels:
        return out[:, :channels], out[:, channels:]
    return out, None


def _gaussian_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_gaussian_nll(x0, mean, log_var):
    """-log P(x0's 8-bit bin) under N(mean, e^log_var), for data in [-1, 1] (DDPM's decoder L_0); the
    end bins reach to +-inf. Elementwise, in nats."""
    inv_std = torch.exp(-0.5 * log_var)
    c = x0 - mean
    cdf_hi = torch.special.ndtr(inv_std * (c + 1 / 255))
    cdf_lo = torch.special.ndtr(inv_std * (c - 1 / 255))
    tiny = 1e-12
    log_p = torch.where(x0 < -0.999, torch.log(cdf_hi.clamp(min=tiny)),
                        torch.where(x0 > 0.999, torch.log((1 - cdf_lo).clamp(min=tiny)),
                                    torch.log((cdf_hi - cdf_lo).clamp(min=tiny))))
    return -log_p


def vlb_term(pred: torch.Tensor, v: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             schedule: Schedule, prediction: str = "eps") -> torch.Tensor:
    """L_t of the variational bound, in bits per dimension, one value per example ([B]).

    The step is t -> s = t - 1/T (T = ``num_steps``): L_t = KL(q(x_s | x_t, x0) || p(x_s | x_t)) with
    p = N(mu(pred), Sigma(v)); for t < 1/T, s is clean data and L_0 = -log p(x0 | x_t) with 8-bit bins.
    There beta~ = 0, so Sigma interpolates to beta~ of the next step instead (Nichol & Dhariwal's clip).
    The mean comes from ``pred`` as given: pass ``pred.detach()`` for the hybrid loss.
    """
    T = num_steps(schedule)
    t = torch.as_tensor(t, device=x0.device)
    if t.ndim == 0:
        t = t.expand(x0.shape[0])
    td = t.double()
    s = td - 1.0 / T
    first = s < 0
    a_t, s_t = schedule.alpha(td), schedule.sigma(td)
    s_c = s.clamp(min=0)
    a_s = torch.where(first, torch.ones_like(s), schedule.alpha(s_c))
    s_s = torch.where(first, torch.zeros_like(s), schedule.sigma(s_c))
    log_beta, log_beta_tilde = step_log_variances(a_t, s_t, a_s, s_s)
    # the clip: beta~ of the step 1/T -> 0 (DDPM's beta~_1), or of 2/T -> 1/T where sigma_0 = 0 (vp-cosine)
    lo = 0.0 if schedule.sigma(torch.tensor(0.0, dtype=torch.float64)).item() > 0 else 1.0 / T
    ends = torch.tensor([lo + 1.0 / T, lo], dtype=torch.float64)
    a_e, s_e = schedule.alpha(ends), schedule.sigma(ends)
    clip = step_log_variances(a_e[0], s_e[0], a_e[1], s_e[1])[1].to(td.device)
    log_beta_tilde = torch.where(first, clip, log_beta_tilde)
    # posterior mean: alpha_s x0 + sqrt(sigma_s^2 - beta~) eps (DDIM with eta = 1), for the true and the model's (x0, eps)
    coef_eps = torch.sqrt((s_s**2 - torch.exp(log_beta_tilde)).clamp(min=0))
    bc = lambda u: _bcast(u, x0).float()
    eps_true = (x_t - bc(a_t) * x0) / bc(s_t)
    x0_hat, eps_hat = convert(pred, x_t, t, schedule, prediction, "x0"), convert(pred, x_t, t, schedule, prediction, "eps")
    mean_true = bc(a_s) * x0 + bc(coef_eps) * eps_true
    mean_model = bc(a_s) * x0_hat + bc(coef_eps) * eps_hat
    log_var = learned_log_variance(v.float(), bc(log_beta), bc(log_beta_tilde))
    kl = _gaussian_kl(mean_true, bc(log_beta_tilde), mean_model, log_var).flatten(1).mean(1)
    nll = _discretized_gaussian_nll(x0.float(), mean_model, log_var).flatten(1).mean(1)
    return torch.where(first.to(kl.device), nll, kl) / _LOG2


def hybrid_loss(out: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor,
                schedule: Schedule, prediction: str = "eps", vlb_weight: float = VLB_WEIGHT,
                weighting: str = "none", gamma: float = 5.0, sigma_data: float = 0.5) -> torch.Tensor:
    """The training loss of one batch, [B]: ``loss`` for a model of C output channels; for one of 2C
    (a learned variance, DiT's 8 channels for 4), L_hybrid = L_simple + lambda T L_t (Nichol & Dhariwal
    2021, eq. 16: T L_t estimates L_vlb = sum_t L_t), where L_t's mean is computed from the detached
    prediction so that it trains the variance alone and L_simple alone trains the mean (their section
    3.1; DiT's ``frozen_out``). With T = 1000 and lambda = 0.001 that is DiT's mse + vb.
    """
    pred, v = split_learned_variance(out, x0.shape[1])
    simple = loss(pred, x0, eps, t, schedule, prediction, weighting, gamma, sigma_data)
    if v is None:
        return simple
    return simple + vlb_weight * num_steps(schedule) * vlb_term(pred.detach(), v, x0, x_t, t, schedule, prediction)
