"""Claims of lesson 01: each schedule is its closed form, the conversions are exact, t is drawn as stated."""

import itertools
import math

import mpmath
import pytest
import torch

from tld.diffusion import (
    PREDICTIONS,
    SCHEDULES,
    add_noise,
    convert,
    edm_coefficients,
    get_schedule,
    loss,
    sample_t,
    target,
)

NAMES = sorted(SCHEDULES)
VP = ["vp-cosine", "vp-linear"]


def dense_grid(name: str, n: int = 4001, dtype=torch.float64) -> torch.Tensor:
    """t on (0, t_max] avoiding the endpoints where lambda is +-inf (rectified at 0 and 1)."""
    hi = 1 - 1e-4 if name == "rectified" else get_schedule(name).t_max
    return torch.linspace(1e-4, hi, n, dtype=dtype)


# --------------------------------------------------------------------------- closed forms

def test_vp_linear_alpha_squared_is_ddpm_cumprod_at_every_integer_step():
    s = get_schedule("vp-linear")
    k = torch.arange(1000, dtype=torch.float64)
    alpha2 = s.alpha(k / 1000) ** 2
    ref = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(alpha2, ref, rtol=1e-12, atol=0)


def test_vp_linear_matches_diffusers_ddpm_scheduler_alphas_cumprod():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear")
    k = torch.arange(1000, dtype=torch.float64)
    ours = get_schedule("vp-linear").alpha(k / 1000) ** 2
    # diffusers accumulates its cumprod in float32: 1e-6 relative covers 1000 float32 products
    torch.testing.assert_close(ours, sched.alphas_cumprod.double(), rtol=1e-6, atol=0)


def test_vp_cosine_alpha_is_the_iddpm_formula():
    s, off = get_schedule("vp-cosine"), 0.008
    t = torch.linspace(0, 0.999, 2001, dtype=torch.float64)
    f = lambda u: torch.cos(math.pi / 2 * (u + off) / (1 + off))  # Nichol & Dhariwal 2021, eq. 17
    ref = f(t) / math.cos(math.pi / 2 * off / (1 + off))
    torch.testing.assert_close(s.alpha(t), ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(s.sigma(t), torch.sqrt(1 - ref**2), rtol=1e-9, atol=1e-12)


def test_rectified_is_alpha_one_minus_t_sigma_t():
    s = get_schedule("rectified")
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    torch.testing.assert_close(s.alpha(t), 1 - t, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(s.sigma(t), t, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", VP)
def test_vp_schedules_preserve_variance_alpha2_plus_sigma2_is_one(name):
    s = get_schedule(name)
    t = torch.cat([torch.tensor([0.0, 1e-9, 1e-6, 1e-3], dtype=torch.float64), dense_grid(name)])
    torch.testing.assert_close(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-12)


def test_rectified_alpha_plus_sigma_is_one():
    s = get_schedule("rectified")
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    torch.testing.assert_close(s.alpha(t) + s.sigma(t), torch.ones_like(t), rtol=0, atol=1e-15)


def _mp_sigma(name: str, t: float) -> float:
    """sigma_t in 50-digit arithmetic, straight from the definitions."""
    mpmath.mp.dps = 50
    t = mpmath.mpf(t)
    if name == "vp-cosine":
        s = mpmath.mpf("0.008")
        f = lambda u: mpmath.cos(mpmath.pi / 2 * (u + s) / (1 + s))
        return float(mpmath.sqrt(1 - (f(t) / f(0)) ** 2))
    # vp-linear: log(alpha^2) linear in t between the grid points k/1000 and (k+1)/1000
    b0, b1 = mpmath.mpf("1e-4"), mpmath.mpf("1e-4") + (mpmath.mpf("0.02") - mpmath.mpf("1e-4")) / 999
    frac = t * 1000
    la2 = mpmath.log(1 - b0) + frac * mpmath.log(1 - b1)
    return float(mpmath.sqrt(-mpmath.expm1(la2)))


@pytest.mark.parametrize("name", VP)
@pytest.mark.parametrize("t", [1e-9, 1e-6, 1e-4])
def test_vp_sigma_near_zero_is_positive_and_accurate(name, t):
    # sqrt(1 - alpha^2) would lose every digit here; the schedules avoid the cancellation.
    sigma = get_schedule(name).sigma(torch.tensor(t, dtype=torch.float64)).item()
    assert sigma > 0
    assert sigma == pytest.approx(_mp_sigma(name, t), rel=1e-10)
    sigma32 = get_schedule(name).sigma(torch.tensor(t, dtype=torch.float32)).item()
    assert sigma32 == pytest.approx(_mp_sigma(name, t), rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_log_snr_is_strictly_decreasing(name):
    s = get_schedule(name)
    lam = s.log_snr(dense_grid(name, 20001))
    assert torch.isfinite(lam).all()
    assert (lam.diff() < 0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_t_from_log_snr_inverts_log_snr(name, dtype, tol):
    s = get_schedule(name)
    t = dense_grid(name, 10001, dtype)
    lam = s.log_snr(t)
    assert lam.dtype == dtype
    back = s.t_from_log_snr(lam)
    assert back.dtype == dtype
    torch.testing.assert_close(back, t, rtol=0, atol=tol)


def test_schedules_return_the_dtype_of_t_and_accept_python_floats():
    s = get_schedule("vp-cosine")
    assert s.alpha(torch.tensor([0.5], dtype=torch.float16)).dtype == torch.float16
    assert s.sigma(0.5).item() == pytest.approx(s.sigma(torch.tensor(0.5)).item(), rel=1e-6)
    assert s.log_snr(torch.tensor(0.5, dtype=torch.float64)).dtype == torch.float64


# --------------------------------------------------------------------------- noising and targets

def _example(name, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, b, dtype=torch.float64)
    x_t = add_noise(x0, eps, t, get_schedule(name))
    return x0, eps, t, x_t


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_is_alpha_x0_plus_sigma_eps(name):
    s = get_schedule(name)
    x0, eps, t, x_t = _example(name)
    ref = s.alpha(t)[:, None, None, None] * x0 + s.sigma(t)[:, None, None, None] * eps
    torch.testing.assert_close(x_t, ref, rtol=0, atol=0)
    # a scalar t means the same time for every example
    torch.testing.assert_close(add_noise(x0, eps, torch.tensor(0.3), s),
                               add_noise(x0, eps, torch.full((6,), 0.3), s))


def test_add_noise_rejects_mismatched_shapes():
    s = get_schedule("rectified")
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\).*\(2, 3, 8, 4\)"):
        add_noise(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 4), torch.rand(2), s)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("src,dst", list(itertools.permutations(PREDICTIONS, 2)))
def test_convert_round_trips_and_maps_true_target_to_true_target(name, src, dst):
    s = get_schedule(name)
    x0, eps, t, x_t = _example(name)
    p = torch.randn_like(x0)  # any prediction, not only the right one
    back = convert(convert(p, x_t, t, s, src, dst), x_t, t, s, dst, src)
    torch.testing.assert_close(back, p, rtol=1e-9, atol=1e-9)
    got = convert(target(x0, eps, t, s, src), x_t, t, s, src, dst)
    torch.testing.assert_close(got, target(x0, eps, t, s, dst), rtol=1e-9, atol=1e-9)


def test_edm_preconditioning_is_v_at_sigma_data_one_and_skips_its_input_at_low_noise():
    s = get_schedule("vp-cosine")
    x0, eps, t, x_t = _example("vp-cosine")
    a, sg = s.alpha(t)[:, None, None, None], s.sigma(t)[:, None, None, None]
    # Karras et al. 2022, Table 1, on the VE level s = sigma / alpha of x_t / alpha
    s_ve, sd = sg / a, 0.5
    c_skip, c_out = edm_coefficients(a, sg, sd)
    torch.testing.assert_close(c_skip * a, sd**2 / (s_ve**2 + sd**2))
    torch.testing.assert_close(c_out, s_ve * sd / (s_ve**2 + sd**2).sqrt())
    # sigma_data = 1 on a VP schedule: x0_hat = alpha x_t + sigma F, i.e. v prediction with F = -v
    one_skip, one_out = edm_coefficients(a, sg, 1.0)
    torch.testing.assert_close(one_skip, a)
    torch.testing.assert_close(one_out, sg)
    # the target F = (x0 - c_skip x_t) / c_out, and F = 0 says "x0 is c_skip x_t": at low noise nearly x_t
    f = target(x0, eps, t, s, "edm")
    torch.testing.assert_close(convert(f, x_t, t, s, "edm", "x0"), x0, rtol=1e-9, atol=1e-9)
    low = torch.full((6,), 0.01, dtype=torch.float64)
    x_low = add_noise(x0, eps, low, s)
    assert (convert(torch.zeros_like(x0), x_low, low, s, "edm", "x0") - x0).abs().max() < 6 * s.sigma(low)[0]
    high = torch.full((6,), 1.0, dtype=torch.float64)
    torch.testing.assert_close(convert(torch.ones_like(x0), add_noise(x0, eps, high, s), high, s, "edm", "x0"),
                               torch.full_like(x0, float(s.sigma(high)[0]) * sd / (s.sigma(high)[0] ** 2 + sd**2 * s.alpha(high)[0] ** 2).sqrt()),
                               rtol=1e-6, atol=1e-6)


def test_v_target_is_alpha_eps_minus_sigma_x0():
    s = get_schedule("vp-cosine")
    x0, eps, t, _ = _example("vp-cosine")
    a, sg = s.alpha(t)[:, None, None, None], s.sigma(t)[:, None, None, None]
    torch.testing.assert_close(target(x0, eps, t, s, "v"), a * eps - sg * x0)  # Salimans & Ho 2022


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_is_zero_for_the_exact_target_and_positive_otherwise(prediction):
    s = get_schedule("vp-linear")
    x0, eps, t, _ = _example("vp-linear")
    tgt = target(x0, eps, t, s, prediction)
    lo = loss(tgt, x0, eps, t, s, prediction)
    assert lo.shape == (6,)
    assert torch.equal(lo, torch.zeros(6, dtype=lo.dtype))
    assert (loss(tgt + 0.1, x0, eps, t, s, prediction) > 0).all()


def test_loss_rejects_wrong_output_shape():
    s = get_schedule("rectified")
    x0, eps, t, _ = _example("rectified")
    with pytest.raises(ValueError, match="expected"):
        loss(x0[:, :2], x0, eps, t, s, "x0")


# --------------------------------------------------------------------------- training-time t

@pytest.mark.parametrize("kind", ["uniform", "beta", "logit-normal"])
def test_sample_t_stays_in_range_and_is_reproducible_by_generator(kind):
    draw = lambda: sample_t(5000, kind, generator=torch.Generator().manual_seed(7), t_min=0.1, t_max=0.9)
    t = draw()
    assert t.shape == (5000,)
    assert t.min() >= 0.1 and t.max() <= 0.9
    # [t_min, t_max] is the affine image of the [0, 1] draw: the distribution is rescaled, not clipped
    unit = sample_t(5000, kind, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(t, 0.1 + 0.8 * unit, atol=1e-6, rtol=0)
    assert torch.equal(t, draw())
    assert not torch.equal(t, sample_t(5000, kind, generator=torch.Generator().manual_seed(8),
                                       t_min=0.1, t_max=0.9))


def test_sample_t_beta_1_2p5_has_the_beta_distribution():
    t = sample_t(100_000, "beta", generator=torch.Generator().manual_seed(0)).double()
    # Beta(1, 2.5): mean 1/3.5, sd 0.213, so the standard error of the mean is 6.7e-4
    assert t.mean().item() == pytest.approx(1 / 3.5, abs=4e-3)
    # the whole CDF, not only the mean: P(t <= x) = 1 - (1 - x)^2.5
    for x in (0.1, 0.3, 0.5, 0.8):
        assert (t <= x).double().mean().item() == pytest.approx(1 - (1 - x) ** 2.5, abs=5e-3)


def test_sample_t_logit_normal_has_median_one_half_and_normal_logits():
    t = sample_t(100_000, "logit-normal", generator=torch.Generator().manual_seed(0)).double()
    assert t.median().item() == pytest.approx(0.5, abs=5e-3)
    logits = torch.log(t / (1 - t))
    assert logits.std().item() == pytest.approx(1.0, abs=1e-2)


def test_sample_t_uniform_has_mean_one_half():
    t = sample_t(100_000, "uniform", generator=torch.Generator().manual_seed(0)).double()
    assert t.mean().item() == pytest.approx(0.5, abs=4e-3)
    assert t.min() >= 0 and t.max() <= 1


def test_unknown_names_raise_value_error_naming_them():
    with pytest.raises(ValueError, match="'vp-quadratic'.*vp-cosine"):
        get_schedule("vp-quadratic")
    with pytest.raises(ValueError, match="'gamma'.*logit-normal"):
        sample_t(4, "gamma")
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="'score'"):
        convert(x, x, torch.rand(2), get_schedule("rectified"), "score", "x0")
    with pytest.raises(ValueError, match="'velocity'"):
        target(x, x, torch.rand(2), get_schedule("rectified"), "velocity")
    with pytest.raises(ValueError, match="a=2.0, b=3.0"):
        sample_t(4, "beta", beta_a=2.0, beta_b=3.0)


# -------------------------------------------------------------------- eps / x0 / v as weightings of one loss

@pytest.mark.parametrize("name", ["vp-linear", "vp-cosine", "rectified"])
def test_each_prediction_loss_is_the_x0_error_times_x0_error_scale(name):
    from tld.diffusion import convert, get_schedule, loss, x0_error_scale
    sched = get_schedule(name)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=torch.float64)
    x_t = add_noise(x0, eps, t, sched)
    x0_hat = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)   # one wrong guess of x0
    err_x0 = (x0_hat - x0).pow(2).flatten(1).mean(1)
    for prediction in ("eps", "x0", "v", "edm"):
        pred = convert(x0_hat, x_t, t, sched, "x0", prediction)   # the same guess, said in that prediction
        got = loss(pred, x0, eps, t, sched, prediction).double()
        torch.testing.assert_close(got, err_x0 * x0_error_scale(t, sched, prediction), rtol=1e-4, atol=1e-9)
        # min-SNR-gamma is one objective whatever the prediction: min(SNR, 5) times the x0 error
        snr = sched.alpha(t) ** 2 / sched.sigma(t) ** 2
        weighted = loss(pred, x0, eps, t, sched, prediction, "min-snr", 5.0).double()
        torch.testing.assert_close(weighted, err_x0 * snr.clamp(max=5.0), rtol=1e-4, atol=1e-9)
        # EDM's lambda(s) = (s^2 + sd^2) / (s sd)^2 on the VE noise level s = sigma / alpha, over 1 / sd^2
        s_ve = sched.sigma(t) / sched.alpha(t)
        lam = (s_ve**2 + 0.25) / (s_ve * 0.5) ** 2 * 0.25
        edm = loss(pred, x0, eps, t, sched, prediction, "edm", sigma_data=0.5).double()
        torch.testing.assert_close(edm, err_x0 * lam, rtol=1e-4, atol=1e-9)
        # "x0": the plain x0 error, whatever the network outputs (x0 prediction's own loss)
        torch.testing.assert_close(loss(pred, x0, eps, t, sched, prediction, "x0").double(), err_x0, rtol=1e-4, atol=1e-9)
    # v prediction's own weighting is EDM's with sigma_data = 1 (on a VP schedule, where alpha^2 + sigma^2 = 1)
    if name != "rectified":
        v_pred = convert(x0_hat, x_t, t, sched, "x0", "v")
        torch.testing.assert_close(loss(v_pred, x0, eps, t, sched, "v").double(),
                                   loss(x0_hat, x0, eps, t, sched, "x0", "edm", sigma_data=1.0).double(),
                                   rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="sigma_data must be > 0, got 0"):
        loss(x0_hat, x0, eps, t, sched, "x0", "edm", sigma_data=0)
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        loss(x0_hat, x0, eps, t, sched, "x0", "snr")
