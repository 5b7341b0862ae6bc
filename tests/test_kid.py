"""Claims of KID and of the named feature spaces (tld.fid).

KID: the unbiased MMD² with the cubic kernel k(x, y) = (x·y / d + 1)³. Checked against a closed form:
for independent Gaussians a ~ N(mu_a, S_a), b ~ N(mu_b, S_b), E k(a, b) follows from the first three
moments of a·b, so MMD² between two Gaussians is exact, and the mean of many small-sample estimates
must land on it (unbiasedness), as must one large-sample KID.

Inception: the network and its weights are not on this machine, so the resizing path is run with a
stand-in of the same interface as clean-fid's InceptionV3W (which asserts 299 x 299 input in [0, 255]).
"""

import numpy as np
import pytest
import torch

import tld.fid as fidmod
from tld.fid import (
    INCEPTION_SIZE,
    feature_space,
    image_features,
    inception_available,
    inception_input,
    kid,
    mmd2_unbiased,
)


def expected_kernel(mu_a, cov_a, mu_b, cov_b) -> float:
    """E (a·b / d + 1)³ for independent a ~ N(mu_a, cov_a), b ~ N(mu_b, cov_b), in closed form.

    With s = a·b: E s = mu_a·mu_b; E s² = tr(M_a M_b), M = cov + mu mu^T; and, since s | a is
    N(a·mu_b, a^T cov_b a), E s³ = E[(a·mu_b)³] + 3 E[(a·mu_b)(a^T cov_b a)] where
    E[(a·u)³] = m³ + 3 m v (m = u·mu_a, v = u^T cov_a u) and
    E[(a·u)(a^T B a)] = (u·mu_a)(mu_a^T B mu_a + tr(B cov_a)) + 2 u^T cov_a B mu_a.
    """
    d = len(mu_a)
    u = mu_b
    m, v = u @ mu_a, u @ cov_a @ u
    e1 = mu_a @ mu_b
    e2 = np.trace((cov_a + np.outer(mu_a, mu_a)) @ (cov_b + np.outer(mu_b, mu_b)))
    e3 = m**3 + 3 * m * v + 3 * ((u @ mu_a) * (mu_a @ cov_b @ mu_a + np.trace(cov_b @ cov_a))
                                 + 2 * u @ cov_a @ cov_b @ mu_a)
    return e3 / d**3 + 3 * e2 / d**2 + 3 * e1 / d + 1


MU_A, COV_A = np.array([0.3, -0.2, 0.5]), np.diag([1.0, 0.5, 2.0])
L = np.array([[1.0, 0.0, 0.0], [0.4, 0.8, 0.0], [-0.3, 0.2, 0.6]])
MU_B, COV_B = np.array([0.0, 0.6, -0.4]), L @ L.T


def exact_mmd2() -> float:
    return (expected_kernel(MU_A, COV_A, MU_A, COV_A) + expected_kernel(MU_B, COV_B, MU_B, COV_B)
            - 2 * expected_kernel(MU_A, COV_A, MU_B, COV_B))


def draw(rng, mu, cov, shape):
    return rng.multivariate_normal(mu, cov, size=shape)


def test_closed_form_kernel_mean_matches_monte_carlo():
    rng = np.random.default_rng(0)
    a, b = draw(rng, MU_A, COV_A, 400_000), draw(rng, MU_B, COV_B, 400_000)
    k = (np.einsum("nd,nd->n", a, b) / 3 + 1) ** 3
    assert abs(k.mean() - expected_kernel(MU_A, COV_A, MU_B, COV_B)) < 4 * k.std() / np.sqrt(len(k))


def test_small_sample_estimates_average_to_the_exact_mmd2():
    # unbiased: the mean of 20 000 estimates from 6 + 6 points lands on the exact value
    rng = np.random.default_rng(1)
    est = mmd2_unbiased(draw(rng, MU_A, COV_A, (20_000, 6)), draw(rng, MU_B, COV_B, (20_000, 6)))
    exact = exact_mmd2()
    assert exact > 0.1
    assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(len(est)), (est.mean(), exact)
    # the biased (V-statistic) estimate, diagonal kept, is far off at this size: the diagonal matters
    x, y = draw(rng, MU_A, COV_A, (20_000, 6)), draw(rng, MU_B, COV_B, (20_000, 6))
    k = lambda p, q: (p @ np.swapaxes(q, -1, -2) / 3 + 1) ** 3
    biased = (k(x, x).mean((1, 2)) + k(y, y).mean((1, 2)) - 2 * k(x, y).mean((1, 2))).mean()
    assert abs(biased - exact) > 10 * est.std() / np.sqrt(len(est))


def test_kid_on_large_samples_matches_the_exact_mmd2_within_its_stderr():
    rng = np.random.default_rng(2)
    value, stderr = kid(draw(rng, MU_A, COV_A, 3000), draw(rng, MU_B, COV_B, 3000), subsets=50, subset_size=500)
    assert 0 < stderr < 0.2 * exact_mmd2()
    assert abs(value - exact_mmd2()) < 4 * stderr, (value, stderr, exact_mmd2())


def test_kid_of_one_distribution_is_zero_within_its_stderr_and_positive_otherwise():
    rng = np.random.default_rng(3)
    a, b = draw(rng, MU_B, COV_B, 2000), draw(rng, MU_B, COV_B, 2000)
    value, stderr = kid(a, b, subsets=50, subset_size=500)
    assert stderr > 0 and abs(value) < 3 * stderr, (value, stderr)
    value_ab, stderr_ab = kid(draw(rng, MU_A, COV_A, 2000), b, subsets=50, subset_size=500)
    assert value_ab > 10 * stderr_ab


def test_kid_uses_the_torch_fidelity_defaults_and_caps_the_subset_at_the_sample_count():
    assert (fidmod.KID_SUBSETS, fidmod.KID_SUBSET_SIZE) == (100, 1000)
    rng = np.random.default_rng(4)
    a, b = draw(rng, MU_A, COV_A, 50), draw(rng, MU_B, COV_B, 40)
    value, stderr = kid(a, b, subsets=5)   # subsets of 40: every b subset is all of b
    assert np.isfinite(value) and stderr >= 0
    assert kid(a, b, subsets=5) == (value, stderr)   # seeded: the same subsets every time
    with pytest.raises(ValueError, match="one width"):
        kid(a, b[:, :2])
    with pytest.raises(ValueError, match="at least 2"):
        kid(a[:1], b)


def test_feature_spaces_have_names():
    from tld.judge import load_shapes_classifier

    assert feature_space("inception") == "inception"
    assert feature_space("classifier") == "classifier:shapes-classifier"
    assert feature_space("classifier", load_shapes_classifier()) == "classifier:shapes-classifier"
    with pytest.raises(ValueError, match="'clip'"):
        feature_space("clip")


def test_auto_says_which_features_it_chose(capsys):
    if inception_available():
        pytest.skip("Inception weights are installed here")
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fidmod.fid(x, x.flip(0), features="auto")
    assert "chose 'classifier:shapes-classifier'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the Inception path

class StandInInceptionV3W(torch.nn.Module):
    """clean-fid's InceptionV3W interface: float [B, 3, 299, 299] in [0, 255] -> [B, 2048]."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        assert x.shape[2:] == (299, 299), x.shape   # what clean-fid's network asserts
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 255
        self.seen.append(tuple(x.shape))
        return x.mean((2, 3)).repeat(1, 683)[:, :2048]


class StandInFidelity(torch.nn.Module):
    """torch-fidelity's FeatureExtractorInceptionV3 interface: uint8 [B, 3, H, W] -> ([B, 2048],)."""

    def forward(self, x):
        assert x.dtype == torch.uint8
        return (x.float().mean((2, 3)).repeat(1, 683)[:, :2048],)


@pytest.mark.parametrize("size", [16, 32])
def test_clean_fid_input_is_resized_to_299_and_keeps_a_flat_image_flat(size):
    x = torch.full((2, 3, size, size), 0.5)
    x[1, 0] = 0.25
    inp = inception_input(x, "clean-fid")
    assert inp.shape == (2, 3, INCEPTION_SIZE, INCEPTION_SIZE) and inp.dtype == torch.float32
    torch.testing.assert_close(inp[0], torch.full_like(inp[0], 128.0))   # 0.5 -> 128 (8-bit, rounded)
    torch.testing.assert_close(inp[1, 0], torch.full_like(inp[1, 0], 64.0))
    fid_in = inception_input(x, "torch-fidelity")   # torch-fidelity resizes inside its network
    assert fid_in.dtype == torch.uint8 and fid_in.shape == x.shape


@pytest.mark.parametrize("backend, net", [("clean-fid", StandInInceptionV3W), ("torch-fidelity", StandInFidelity)])
def test_inception_features_of_small_images_run_through_a_stand_in(monkeypatch, backend, net):
    stand_in = net()
    monkeypatch.setattr(fidmod, "_load_inception", lambda device: (backend, stand_in))
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    f = image_features(x, "inception", batch_size=2)
    assert f.shape == (5, 2048)
    if backend == "clean-fid":
        assert stand_in.seen == [(2, 3, 299, 299), (2, 3, 299, 299), (1, 3, 299, 299)]
    # the stand-in's features are channel means: the resize keeps them (to 8-bit rounding and the filter's ringing)
    torch.testing.assert_close(f[:, :3] / 255, x.mean((2, 3)), atol=0.01, rtol=0)


def test_missing_inception_names_the_packages_and_weights():
    if inception_available():
        pytest.skip("Inception weights are installed here")
    with pytest.raises(FileNotFoundError, match="torch-fidelity.*clean-fid|weights file"):
        image_features(torch.rand(2, 3, 16, 16), "inception")
