"""Starting a sampler part-way (SDEdit), DDIM inversion, Heun's method and classifier guidance (lessons 14, 15),
each against an exact answer: today's runs bit for bit, the closed-form Gaussian mixture, or a formula."""

import math

import pytest
import torch

from tld.diffusion import add_noise, get_schedule
from tld.gmm import GMM, rms_error
from tld.models import create
from tld.samplers import (
    classifier_guided,
    generate,
    invert,
    make_denoiser,
    sample,
    sample_heun,
    sampling_grid,
    time_grid,
)


@pytest.fixture(scope="module")
def gmm():
    return GMM.random(k=6, dim=4, seed=0)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- t_start

@pytest.mark.parametrize("schedule", ["vp-linear", "vp-cosine", "rectified"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_starting_at_t_max_from_fresh_noise_is_todays_run_bit_for_bit(gmm, noise, schedule, prediction):
    s = get_schedule(schedule)
    model = gmm.model(schedule, prediction)
    for sampler in ("ddim", "dpm++2m", "heun"):
        today = sample(model, noise, schedule, sampler=sampler, steps=7, prediction=prediction, progress=False)
        t0 = sampling_grid(s, 7, prediction)[0].item()
        x_t = noise if s.variance_preserving else noise * s.sigma(torch.tensor(t0, dtype=torch.float64)).item()
        started = sample(model, x_t, schedule, sampler=sampler, steps=7, prediction=prediction, t_start=t0,
                         progress=False)
        assert torch.equal(today, started), (sampler, (today - started).abs().max())


@pytest.mark.parametrize("schedule", ["vp-cosine", "rectified"])
def test_starting_from_x_t_at_t_uses_the_grid_from_t_and_solves_the_ode_from_there(gmm, noise, schedule):
    model = gmm.model(schedule, "x0")
    x0 = gmm.sample(64, generator=torch.Generator().manual_seed(2))
    x_t = add_noise(x0, noise, torch.tensor(0.6, dtype=torch.float64), get_schedule(schedule))
    x, traj = sample(model, x_t, schedule, sampler="dpm++2m", steps=30, prediction="x0", t_start=0.6,
                     progress=False, return_trajectory=True)
    assert torch.equal(traj[0], x_t), "the given x_t is the start, as it is"
    same_grid = sample(model, x_t, schedule, sampler="dpm++2m", prediction="x0", progress=False, t_start=0.6,
                       timesteps=time_grid(schedule, 30, t_max=0.6))
    assert torch.equal(x, same_grid)
    assert rms_error(x, gmm.reference(x_t, schedule, 0.6, None)) < 5e-3   # measured 2.9e-3 (vp-cosine)


def test_t_start_refuses_a_second_first_time():
    model = GMM.ring(4).model("vp-cosine", "eps")
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="t_start=0.5 and t_max=0.7"):
        sample(model, x, "vp-cosine", steps=3, t_start=0.5, t_max=0.7, progress=False)
    with pytest.raises(ValueError, match="t_start=0.5 differs from the first of the timesteps"):
        sample(model, x, "vp-cosine", timesteps=[0.6, 0.3, 0.0], t_start=0.5, progress=False)


def test_generate_starts_from_a_given_x_t():
    torch.manual_seed(0)
    model = create("uvit-tiny", depth=2, embed_dim=16, patch_size=4).eval()
    labels = torch.tensor([0, 5])
    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mine = generate(model, "vp-cosine", prediction="x0", cond=labels, steps=4, x_start=x_t, t_start=0.5,
                    clamp=False)
    with torch.no_grad():
        theirs = sample(model, x_t, "vp-cosine", prediction="x0", cond=labels, steps=4, t_start=0.5, progress=False)
    assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match="together"):
        generate(model, "vp-cosine", prediction="x0", cond=labels, x_start=x_t)


# --------------------------------------------------------------------------- inversion

def test_ddim_inversion_round_trip_error_falls_with_steps(gmm):
    """Measured (GMM.random, 64 of its samples, vp-cosine, x0 model): 0.185, 0.129, 0.091, 0.049 at 10..80 steps."""
    x0 = gmm.sample(64, generator=torch.Generator().manual_seed(5))
    model = gmm.model("vp-cosine", "x0")
    errors = []
    for n in (10, 20, 40, 80):
        x_T = invert(model, x0, "vp-cosine", steps=n, prediction="x0", progress=False)
        back = sample(model, x_T, "vp-cosine", sampler="ddim", steps=n, prediction="x0", t_start=0.999,
                      progress=False)
        errors.append(rms_error(back, x0))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 3, errors


def test_inversion_step_is_ddim_run_upward_and_its_trajectory_rises(gmm):
    model = gmm.model("rectified", "eps")
    x0 = gmm.sample(8, generator=torch.Generator().manual_seed(6))
    x_T, traj = invert(model, x0, "rectified", steps=5, prediction="eps", progress=False, return_trajectory=True)
    ts = sampling_grid("rectified", 5, "eps").flip(0)
    assert len(traj) == 6 and torch.equal(traj[0], x0) and torch.equal(traj[-1], x_T)
    s = get_schedule("rectified")
    d = make_denoiser(model, s, "eps")
    x1, x2 = traj[1], traj[2]
    x0_pred, eps_pred = d(x1, ts[1])   # a step from a noisy point: the model asked where it is
    torch.testing.assert_close(x2, s.alpha(ts[2]) * x0_pred + s.sigma(ts[2]) * eps_pred)
    _, eps_first = d(x0, ts[1])        # the first step from clean data: x0 = x, eps asked at the next time
    torch.testing.assert_close(x1, s.alpha(ts[1]) * x0 + s.sigma(ts[1]) * eps_first)


# --------------------------------------------------------------------------- Heun

def test_heun_is_second_order_and_beats_euler_at_equal_model_calls(gmm, noise):
    """Measured (rectified, x0 model, time grid): Heun 2.5e-2, 7.0e-3, 1.8e-3 at 10, 20, 40 steps; Euler at 40 calls 1.6e-2."""
    ref = gmm.reference(noise, "rectified", 1.0, None)
    kw = dict(prediction="x0", spacing="time", progress=False)
    model = gmm.model("rectified", "x0")
    heun = [rms_error(sample(model, noise, "rectified", sampler="heun", steps=n, **kw), ref) for n in (10, 20, 40)]
    assert heun[0] / heun[1] > 3 and heun[1] / heun[2] > 3, heun
    euler_40 = rms_error(sample(model, noise, "rectified", sampler="euler", steps=40, **kw), ref)
    assert heun[1] < euler_40 / 2, (heun[1], euler_40)   # 20 Heun steps = 39 model calls


def test_heun_counts_two_calls_a_step_and_one_for_the_last_onto_data(gmm, noise):
    calls = []
    model = gmm.model("rectified", "x0")

    def counted(x, t, cond=None):
        calls.append(1)
        return model(x, t, cond)

    sample(counted, noise, "rectified", sampler="heun", steps=6, prediction="x0", progress=False)
    assert len(calls) == 2 * 6 - 1
    calls.clear()
    ts = time_grid("rectified", 3, t_min=0.2)
    sample_heun(make_denoiser(counted, "rectified", "x0"), noise, ts, get_schedule("rectified"), final_denoise=False,
                progress=False)
    assert len(calls) == 2 * 3


# --------------------------------------------------------------------------- classifier guidance

def test_classifier_guidance_adds_the_scaled_gradient_of_log_p_through_the_denoiser():
    """With x0_pred = W x_t (a linear denoiser) and log p(y | x0) = -|x0 - c|^2 / 2, the gradient with respect
    to x_t is W^T (c - W x_t): the guided x0 is x0_pred + scale sigma^2 / alpha W^T (c - W x_t)."""
    s = get_schedule("vp-cosine")
    g = torch.Generator().manual_seed(0)
    w, c = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, dtype=torch.float64, generator=g)

    def model(x, t, cond=None):
        return x @ w.T

    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    base = make_denoiser(model, s, "x0")
    scale = 0.7
    x0, eps = classifier_guided(base, lambda x0: -0.5 * (x0 - c).pow(2).sum(1), scale, s)(x, t)
    a, sig = s.alpha(t).item(), s.sigma(t).item()
    grad = (c - x @ w.T) @ w
    torch.testing.assert_close(x0, x @ w.T + scale * sig**2 / a * grad)
    torch.testing.assert_close(eps, (x - a * x0) / sig)   # still a consistent pair: x_t = alpha x0 + sigma eps
    x0_plain, _ = classifier_guided(base, lambda x0: -0.5 * (x0 - c).pow(2).sum(1), 0.0, s)(x, t)
    torch.testing.assert_close(x0_plain, x @ w.T)
    # per-example times take the same path
    x0_b, _ = classifier_guided(base, lambda x0: -0.5 * (x0 - c).pow(2).sum(1), scale, s)(x, t.expand(5))
    torch.testing.assert_close(x0_b, x0)


def test_classifier_guidance_moves_samples_toward_the_wanted_component():
    ring = GMM.ring(8, std=0.1)
    model = ring.model("vp-cosine", "x0")
    s = get_schedule("vp-cosine")
    target = ring.means[0]

    def log_prob(x0):   # a soft classifier: "near component 0"
        return -(x0 - target).pow(2).sum(1) / (2 * 0.3**2)

    x = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = sampling_grid(s, 30, "x0")
    from tld.samplers import sample_ddim
    near = {}
    for scale in (0.0, 1.0):
        with torch.no_grad():
            out = sample_ddim(classifier_guided(make_denoiser(model, s, "x0"), log_prob, scale, s), x, ts, s,
                              progress=False)
        near[scale] = (torch.cdist(out, ring.means).argmin(1) == 0).double().mean().item()
    assert near[0.0] < 0.25 and near[1.0] > 0.6, near
    assert math.isfinite(near[1.0])


def test_fixed_point_inversion_cuts_the_round_trip_error_on_fine_grids_and_can_diverge_on_coarse_ones(gmm):
    """Measured (GMM.random, vp-cosine, x0 model): at 40 steps 9.1e-2 (no iteration) -> 4.7e-3 (3);
    at 10 steps 1.9e-1 -> 7.3e-2 (1) but 2.1e-1 (10 iterations)."""
    x0 = gmm.sample(64, generator=torch.Generator().manual_seed(5))
    model = gmm.model("vp-cosine", "x0")

    def round_trip(steps, iters):
        x_T = invert(model, x0, "vp-cosine", steps=steps, prediction="x0", iters=iters, progress=False)
        return rms_error(sample(model, x_T, "vp-cosine", steps=steps, prediction="x0", t_start=0.999,
                                progress=False), x0)

    assert round_trip(40, 3) < round_trip(40, 0) / 10
    assert round_trip(10, 1) < round_trip(10, 0) / 2
    assert round_trip(10, 10) > round_trip(10, 1)
