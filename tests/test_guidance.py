"""Classifier-free guidance: where it is combined does not matter, and how many model calls it costs."""

import pytest
import torch

from tld.gmm import GMM
from tld.samplers import GUIDANCE_INTERVAL, check_interval, interval_string, sample

# the unconditional data: a ring of 8; the condition "1": only the two components on the right
RING = GMM.ring(8, std=0.1)
RIGHT = GMM(RING.means[[0, 1]], RING.stds[[0, 1]])


def guided_model(prediction, schedule="vp-cosine"):
    return RING.model(schedule, prediction, conditional=RIGHT)


class CountingModel:
    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, x, t, cond=None):
        self.batches.append(len(x))
        return self.model(x, t, cond)


def run(model, guidance, prediction="eps", guidance_space=None, n=256, schedule="vp-cosine", steps=12):
    noise = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return sample(model, noise, schedule, sampler="dpm++2m", steps=steps, prediction=prediction,
                  cond=torch.ones(n), null_cond=torch.zeros(n), guidance=guidance,
                  guidance_space=guidance_space, progress=False)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_guidance_in_eps_space_equals_guidance_in_x0_space(prediction):
    model = guided_model(prediction)
    outs = {space: run(model, 3.0, prediction, space) for space in ("eps", "x0", "v", "edm")}
    for space in ("x0", "v", "edm"):
        torch.testing.assert_close(outs["eps"], outs[space], atol=1e-9, rtol=0)


def test_guided_samples_agree_across_model_prediction_types():
    ref = run(guided_model("eps"), 4.0, "eps")
    for prediction in ("x0", "v", "edm"):
        torch.testing.assert_close(run(guided_model(prediction), 4.0, prediction), ref, atol=1e-9, rtol=0)


def test_guidance_1_makes_one_unbatched_call_per_step():
    model = CountingModel(guided_model("eps"))
    run(model, 1.0, n=16, steps=9)
    assert model.batches == [16] * 9


def test_guidance_above_1_makes_one_batched_call_per_step():
    model = CountingModel(guided_model("eps"))
    run(model, 2.5, n=16, steps=9)
    assert model.batches == [32] * 9


def test_guidance_1_is_the_conditional_model_and_0_the_unconditional():
    model = guided_model("eps")
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(sampler="dpm++2m", steps=12, progress=False)
    cond_only = sample(model, noise, "vp-cosine", cond=torch.ones(64), **kw)
    uncond_only = sample(model, noise, "vp-cosine", cond=torch.zeros(64), **kw)
    torch.testing.assert_close(run(model, 1.0, n=64), cond_only, atol=1e-12, rtol=0)
    torch.testing.assert_close(run(model, 0.0, n=64), uncond_only, atol=1e-9, rtol=0)


def test_stronger_guidance_puts_more_samples_on_the_condition():
    model = guided_model("eps")

    def on_condition(w):  # fraction of samples nearest to one of the two conditional components
        x = run(model, w, n=512)
        return (torch.cdist(x, RING.means).argmin(1) < 2).float().mean().item()

    fractions = [on_condition(w) for w in (0.0, 1.0, 3.0)]
    assert fractions[0] < 0.4  # unconditional: about 2 of 8 components
    assert fractions[1] > 0.9 and fractions[2] >= fractions[1]


def test_guidance_without_null_cond_is_refused():
    model = guided_model("eps")
    with pytest.raises(ValueError, match="null_cond"):
        sample(model, torch.randn(4, 2), "vp-cosine", sampler="ddim", steps=3, cond=torch.ones(4), guidance=2.0)


def test_a_guidance_interval_guides_only_inside_it_and_costs_one_call_outside():
    from tld.samplers import make_denoiser, time_grid
    model = guided_model("eps")
    ts = time_grid("vp-cosine", 12)
    # an interval holding every grid time is plain guidance; one holding none is the conditional model
    torch.testing.assert_close(run_interval(model, (0.0, 1.0)), run(model, 3.0, n=64), atol=0, rtol=0)
    between = (0.6 * float(ts[1]) + 0.4 * float(ts[0]), 0.4 * float(ts[1]) + 0.6 * float(ts[0]))
    assert not any(between[0] <= t <= between[1] for t in ts.tolist())
    torch.testing.assert_close(run_interval(model, between), run(model, 1.0, n=64), atol=0, rtol=0)
    # in between: batched (guided) calls exactly at the grid times inside [lo, hi], single calls elsewhere
    counted = CountingModel(model)
    lo, hi = 0.3, 0.8
    run_interval(counted, (lo, hi), n=16)
    inside = [lo <= t <= hi for t in ts[:-1].tolist()]
    assert 0 < sum(inside) < len(inside)
    assert counted.batches == [32 if i else 16 for i in inside]
    # and the step is the guided one inside and the conditional one outside, per example as well
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kw = dict(cond=torch.ones(4), null_cond=torch.zeros(4))
    d_int = make_denoiser(model, "vp-cosine", "eps", guidance=3.0, guidance_interval=(lo, hi), **kw)
    d_all = make_denoiser(model, "vp-cosine", "eps", guidance=3.0, **kw)
    d_one = make_denoiser(model, "vp-cosine", "eps", **kw)
    t = torch.tensor([0.2, 0.5, 0.7, 0.9], dtype=torch.float64)
    inside = ((t >= lo) & (t <= hi))[:, None]
    want = torch.where(inside, d_all(x, t)[0], d_one(x, t)[0])
    assert not torch.allclose(d_all(x, t)[0], d_one(x, t)[0])   # guidance does change these steps
    torch.testing.assert_close(d_int(x, t)[0], want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"guidance_interval=\(0.8, 0.3\): expected 0 <= lo < hi <= 1"):
        make_denoiser(model, "vp-cosine", "eps", guidance=3.0, guidance_interval=(0.8, 0.3), **kw)


@pytest.mark.parametrize("value, want", [(None, None), ("none", None), ("0.3,1", (0.3, 1.0)), ((0, 1), (0.0, 1.0)),
                                         ([0.25, 0.5], (0.25, 0.5))])
def test_check_interval_reads_pairs_strings_and_none(value, want):
    assert check_interval(value) == want


@pytest.mark.parametrize("interval", [None, (0.3, 1.0), (0.0, 0.25), (0.125, 0.875)])
def test_interval_string_reads_back_as_the_same_interval(interval):
    text = interval_string(interval)
    assert check_interval(text or None) == interval
    assert interval_string(GUIDANCE_INTERVAL) == "0.3,1"   # the form the cpu presets carry


@pytest.mark.parametrize("value, message", [("0.5", "expected two times lo,hi"), ((0.1, 0.2, 0.3), "expected two times"),
                                            ((0.5, 0.5), "0 <= lo < hi <= 1"), ((-0.1, 0.5), "0 <= lo < hi <= 1"),
                                            ("0.2,1.5", "0 <= lo < hi <= 1"), (0.3, "expected two times")])
def test_check_interval_names_a_bad_value(value, message):
    with pytest.raises(ValueError, match=message) as err:
        check_interval(value)
    assert repr(value) in str(err.value)


def run_interval(model, interval, n=64):
    noise = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return sample(model, noise, "vp-cosine", sampler="dpm++2m", steps=12, prediction="eps", cond=torch.ones(n),
                  null_cond=torch.zeros(n), guidance=3.0, guidance_interval=interval, progress=False)
