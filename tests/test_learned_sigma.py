"""Claims of the learned variance (Nichol & Dhariwal 2021), as DiT trains and samples it.

- ``step_log_variances`` on vp-linear's grid are DDPM's beta_k and beta~_k, from the betas table.
- The ddpm sampler, given a model with 2C output channels, takes the ancestral step with the
  interpolated variance exp(frac log beta + (1 - frac) log beta~): checked on the closed-form
  Gaussian mixture (its exact denoiser), against the textbook DDPM posterior written from the betas.
- The hybrid loss: L_simple trains the mean alone (the vlb's mean is detached), the vlb term is 0
  where the model's mean and variance are the true posterior's, and lambda T = 0.001 x 1000.
"""

import math

import pytest
import torch

from tld import diffusion
from tld.diffusion import get_schedule, hybrid_loss, step_log_variances, vlb_term
from tld.gmm import GMM
from tld.samplers import sample


def learned_gmm_model(gmm, schedule, v):
    """The GMM's exact eps model with a constant (or per-element) raw variance output v appended."""
    exact = gmm.model(schedule, "eps")

    def model(x, t, cond=None):
        eps = exact(x, t, cond)
        return torch.cat([eps, torch.as_tensor(v, dtype=eps.dtype).expand_as(eps)], dim=1)

    return model


def test_step_variances_on_the_vp_linear_grid_are_ddpms_beta_and_beta_tilde():
    sch = get_schedule("vp-linear")
    abar = sch.alphas_cumprod
    for k in (1, 10, 500, 999):
        t, s = torch.tensor(k / 1000, dtype=torch.float64), torch.tensor((k - 1) / 1000, dtype=torch.float64)
        log_beta, log_beta_tilde = step_log_variances(sch.alpha(t), sch.sigma(t), sch.alpha(s), sch.sigma(s))
        beta = sch.betas[k]
        beta_tilde = (1 - abar[k - 1]) / (1 - abar[k]) * beta
        assert log_beta.exp().item() == pytest.approx(beta.item(), rel=1e-9)
        assert log_beta_tilde.exp().item() == pytest.approx(beta_tilde.item(), rel=1e-9)


@pytest.mark.parametrize("k, frac", [(600, 0.3), (40, 0.9), (999, 0.0)])
def test_ddpm_step_with_learned_variance_matches_the_interpolated_variance_formula(k, frac):
    sch = get_schedule("vp-linear")
    gmm = GMM.ring(k=4, dim=2)
    x_t = torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = torch.full((64, 2, 1, 1), 2 * frac - 1, dtype=torch.float64)
    v[0] = 1.0   # one row at the upper end: Sigma = beta
    model = learned_gmm_model(gmm, sch, v)
    out = sample(model, x_t, sch, sampler="ddpm", prediction="eps", timesteps=[k / 1000, (k - 1) / 1000],
                 final_denoise=False, generator=torch.Generator().manual_seed(7), progress=False)
    # the textbook DDPM step k -> k-1 from the betas table (Ho et al. 2020 eq. 7; Nichol & Dhariwal eq. 15)
    abar, beta = sch.alphas_cumprod, sch.betas[k]
    eps = gmm.model(sch, "eps")(x_t, torch.full((64,), k / 1000, dtype=torch.float64))
    x0 = (x_t - (1 - abar[k]).sqrt() * eps) / abar[k].sqrt()
    mean = (abar[k - 1].sqrt() * beta / (1 - abar[k])) * x0 + ((1 - beta).sqrt() * (1 - abar[k - 1]) / (1 - abar[k])) * x_t
    beta_tilde = (1 - abar[k - 1]) / (1 - abar[k]) * beta
    f = (v + 1) / 2
    var = torch.exp(f * math.log(beta) + (1 - f) * math.log(beta_tilde))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(out, mean + var.sqrt() * z, rtol=1e-7, atol=1e-9)


def test_learned_variance_at_beta_tilde_samples_exactly_like_plain_ddpm():
    sch = get_schedule("vp-linear")
    gmm = GMM.ring(k=4, dim=2)
    noise = torch.randn(32, 2, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kw = dict(sampler="ddpm", prediction="eps", steps=25, progress=False)
    plain = sample(gmm.model(sch, "eps"), noise, sch, generator=torch.Generator().manual_seed(3), **kw)
    learned = sample(learned_gmm_model(gmm, sch, -1.0), noise, sch, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(learned, plain, rtol=1e-6, atol=1e-8)
    # and at frac = 1 (Sigma = beta, more noise per step) it differs
    big = sample(learned_gmm_model(gmm, sch, 1.0), noise, sch, generator=torch.Generator().manual_seed(3), **kw)
    assert (big - plain).abs().max() > 1e-3
    # the ODE samplers ignore the variance channels
    ode = sample(learned_gmm_model(gmm, sch, 0.5), noise, sch, sampler="dpm++2m", steps=10, prediction="eps",
                 progress=False)
    torch.testing.assert_close(ode, sample(gmm.model(sch, "eps"), noise, sch, sampler="dpm++2m", steps=10,
                                           prediction="eps", progress=False))


def _batch(seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    sch = get_schedule("vp-linear")
    x0 = torch.rand(b, 2, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.0003, 0.0009, 0.1, 0.4, 0.7, 0.99])[:b]
    return sch, x0, eps, t, diffusion.add_noise(x0, eps, t, sch)


def test_hybrid_loss_trains_the_mean_with_l_simple_alone_and_the_variance_with_the_vlb():
    sch, x0, eps, t, x_t = _batch()
    out = torch.cat([eps + 0.3 * torch.randn(eps.shape), torch.zeros_like(eps)], 1).requires_grad_(True)
    hybrid_loss(out, x0, eps, t, x_t, sch, "eps").sum().backward()
    simple = out.detach()[:, :2].clone().requires_grad_(True)
    diffusion.loss(simple, x0, eps, t, sch, "eps").sum().backward()
    torch.testing.assert_close(out.grad[:, :2], simple.grad)   # the vlb adds nothing to the mean's gradient
    assert out.grad[:, 2:].abs().sum() > 0                      # and trains the variance
    # a C-channel output is plain L_simple
    torch.testing.assert_close(hybrid_loss(out.detach()[:, :2], x0, eps, t, x_t, sch, "eps"),
                               diffusion.loss(out.detach()[:, :2], x0, eps, t, sch, "eps"))


def test_vlb_is_zero_at_the_true_posterior_and_weighted_lambda_times_t():
    sch, x0, eps, t, x_t = _batch()
    v_post = -torch.ones_like(x0)   # frac 0: Sigma = beta~, the true posterior's variance
    kl = vlb_term(eps, v_post, x0, x_t, t, sch, "eps")
    assert kl[2:].abs().max() < 1e-4, kl   # t >= 1/T: KL(q || p) with p = q
    assert (kl[:2] > 0).all()              # t < 1/T: the decoder's -log p(x0 bin) in bits, positive
    wrong = vlb_term(eps, torch.ones_like(x0), x0, x_t, t, sch, "eps")
    assert (wrong[2:4] > 1e3 * kl[2:4]).all(), (wrong, kl)   # Sigma = beta is wrong (at large t beta ~ beta~)
    mse = diffusion.loss(eps, x0, eps, t, sch, "eps")
    out = torch.cat([eps, torch.ones_like(x0)], 1)
    torch.testing.assert_close(hybrid_loss(out, x0, eps, t, x_t, sch, "eps"), mse + 0.001 * 1000 * wrong)


def test_a_learn_sigma_dit_trains_with_the_hybrid_loss_and_samples_with_its_variance(tmp_path):
    from tld.runs import load_model
    from tld.samplers import generate
    from tld.train import config_from_args, train

    out = tmp_path / "run"
    summary = train(config_from_args(["preset=smoke", "model=dit-course", "model.learn_sigma=true", "model.depth=1",
                                      "model.embed_dim=32", "model.num_heads=2", "schedule=vp-linear",
                                      "prediction=eps", f"out_dir={out}", "max_steps=3", "progress=false",
                                      "sample_sampler=ddpm", "sample_steps=3"]))
    assert math.isfinite(summary["final_loss"])
    model = load_model(out)
    assert model.out_chans == 2 * model.in_chans
    x = generate(model, "vp-linear", prediction="eps", cond=torch.tensor([0, 5]), steps=3, sampler="ddpm", seed=0,
                 guidance=1.5)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_the_dit_recipe_learns_sigma_and_samples_with_ddpm():
    from tld.config import config_from_args
    from tld.models import create

    cfg = config_from_args(["preset=dit-xl2-imagenet"])
    assert "learn_sigma" not in cfg.model_overrides and cfg.vlb_weight == 0.001
    assert (cfg.sample_sampler, cfg.sample_steps, cfg.schedule, cfg.prediction) == ("ddpm", 250, "vp-linear", "eps")
    with torch.device("meta"):
        assert create(cfg.model, **cfg.model_overrides).out_chans == 8
