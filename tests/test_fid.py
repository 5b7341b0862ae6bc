"""Claims of FID: it is a true Fréchet distance, and on shapes it separates real from noisy images.

Measured here (n = 400 per set, shapes-classifier features): FID(real, held-out real) is a
few hundred (mostly the small-N bias of a 1024-dim covariance), FID(real, noise) above 10 000, and
FID rises with every step of added noise.
"""

import numpy as np
import pytest
import scipy.linalg
import torch

from tld.data import ShapesDataset
from tld.evaluate import (
    feature_statistics,
    fid,
    frechet_distance,
    image_features,
    inception_available,
    load_shapes_classifier,
)

N = 400
NOISE_LEVELS = (0.0, 0.1, 0.2, 0.4, 0.8)


def shapes01(seed, n=N):
    return (ShapesDataset(size=32, seed=seed, length=n).batch(range(n))["image"] + 1) / 2


@pytest.fixture(scope="module")
def measured():
    """FID of held-out reals with increasing noise, and of uniform noise, against one real set."""
    real = feature_statistics(image_features(shapes01(seed=1)))
    held_out = shapes01(seed=2)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(held_out.shape, generator=gen)
    by_level = [frechet_distance(*real, *feature_statistics(image_features((held_out + s * noise).clamp(0, 1))))
                for s in NOISE_LEVELS]
    pure = frechet_distance(*real, *feature_statistics(image_features(torch.rand(held_out.shape, generator=gen))))
    return {"by_level": by_level, "pure_noise": pure}


def test_frechet_distance_matches_scipy_sqrtm_on_full_rank_gaussians():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + 0.5
    (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])  # one variance 0: singular
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_identical_singular_statistics_is_zero():
    f = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))  # 20 samples, 64 dims: rank 19
    mu, sigma = feature_statistics(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_classifier_features_leave_the_classifier_outputs_untouched():
    clf = load_shapes_classifier()
    x = ShapesDataset(size=32, seed=3, length=8).batch(range(8))["image"]
    with torch.no_grad():
        before = clf(x)["shape"].clone()
        feats = clf.embed(x)
        assert torch.allclose(clf.shape_head(feats), before), "heads must read exactly these features"
        assert torch.equal(clf(x)["shape"], before)
    assert feats.shape == (8, clf.shape_head.in_features)


def test_fid_of_real_vs_held_out_real_is_small_against_noise(measured):
    real_vs_real = measured["by_level"][0]
    assert real_vs_real < measured["pure_noise"] / 10, measured
    assert real_vs_real < measured["by_level"][-2] / 3, measured  # noise std 0.4 on [0, 1] images


def test_fid_rises_monotonically_as_noise_is_added(measured):
    levels = measured["by_level"]
    assert all(b > a for a, b in zip(levels, levels[1:])), dict(zip(NOISE_LEVELS, levels))


def test_fid_of_real_vs_real_falls_as_the_sample_count_grows():
    # the small-N bias (Chong & Forsyth 2020): two sets from ONE distribution still score far from zero
    fa, fb = image_features(shapes01(seed=11, n=512)), image_features(shapes01(seed=12, n=512))
    by_n = {n: frechet_distance(*feature_statistics(fa[:n]), *feature_statistics(fb[:n])) for n in (32, 128, 512)}
    assert by_n[32] > 2 * by_n[128] > 4 * by_n[512] > 0, by_n


def test_fid_auto_uses_classifier_features_when_inception_is_missing():
    if inception_available():
        pytest.skip("Inception weights are installed here")
    a, b = shapes01(seed=5, n=64), shapes01(seed=6, n=64)
    assert fid(a, b, features="auto") == fid(a, b, features="classifier")


def test_inception_fid_without_backend_or_weights_says_what_is_missing():
    if inception_available():
        pytest.skip("Inception weights are installed here")
    with pytest.raises(FileNotFoundError, match="torch-fidelity|weights file"):
        fid(shapes01(seed=5, n=8), shapes01(seed=6, n=8), features="inception")


def test_fid_rejects_images_outside_unit_range_and_unknown_features():
    x = shapes01(seed=5, n=8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fid(x * 2 - 1, x, features="classifier")
    with pytest.raises(ValueError, match="unknown FID features"):
        fid(x, x, features="clip")
