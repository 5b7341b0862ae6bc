"""Checkers of lesson 13, evaluation: the Fréchet distance, KID (the unbiased MMD^2), FID's small-N bias."""

from __future__ import annotations

import numpy as np
import torch

from ...data import ShapesDataset
from ...evaluate import load_shapes_classifier
from ...fid import feature_statistics, frechet_distance, image_features
from .common import CheckError, _call, _close, _compare, _gen, _ok, _scalar, checker


def _gaussians(g, d: int, n: int, shift: float):
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) @ (torch.eye(d, dtype=torch.float64)
                                                               + 0.3 * torch.randn(d, d, generator=g,
                                                                                   dtype=torch.float64)) + shift
    return a.numpy(), b.numpy()


@checker("frechet_distance")
def check_frechet_distance(fn) -> None:
    """``fn(mu1, sigma1, mu2, sigma2) -> float``: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})
    (Heusel et al. 2017), on numpy arrays, as ``tld.fid.frechet_distance``."""
    g = _gen(50)
    cases = [("2-d", 2, 50, 1.0), ("same set twice", 3, 40, 0.0), ("shifted and stretched", 4, 60, 0.5),
             ("shifted and stretched", 16, 200, 2.0)]
    worst = 0.0
    for kind, d, n, shift in cases:
        fa, fb = _gaussians(g, d, n, shift)
        if kind == "same set twice":
            fb = fa.copy()
        s1, s2 = feature_statistics(fa), feature_statistics(fb)
        case = f"{kind}: statistics of {n} samples in {d} dimensions"
        expected = torch.tensor(frechet_distance(*s1, *s2), dtype=torch.float64)

        def hint(got, exp, s1=s1, s2=s2):
            diff = ((s1[0] - s2[0]) ** 2).sum()
            if _close(got, torch.tensor(diff), 1e-6):
                return "the mean term alone; add the covariance term tr(S1 + S2 - 2 (S1 S2)^{1/2})"
            if _close(got, torch.tensor(np.sqrt(max(exp.item(), 0))), 1e-6):
                return "FID is the squared Fréchet distance: no square root at the end"
            no_sqrt = diff + np.trace(s1[1] + s2[1] - 2 * s1[1] @ s2[1])
            if _close(got, torch.tensor(no_sqrt), 1e-6):
                return "the matrix square root of S1 S2, not the product itself"
            return ("two terms: the squared distance of the means, and the trace term that is 0 when the covariances "
                    "are equal", "scipy.linalg.sqrtm of the product of the two covariances (keep its real part), then the trace")

        got = _scalar("frechet_distance", _call("frechet_distance", fn, case, s1[0].copy(), s1[1].copy(),
                                                s2[0].copy(), s2[1].copy()), case)
        worst = max(worst, _compare("frechet_distance", got, expected, case, atol=1e-5, rtol=1e-5, hint=hint))
    _ok("frechet_distance", len(cases), "tld.fid.frechet_distance", worst)


def _mmd2(x: torch.Tensor, y: torch.Tensor, biased: bool = False, scale: bool = True, degree: int = 3):
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / (d if scale else 1) + 1) ** degree  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    if biased:
        return kxx.mean() + kyy.mean() - 2 * kxy.mean()
    return ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
            - 2 * kxy.mean())


def _mmd2_loops(x, y) -> float:
    """The same estimator as a plain double sum (the definition, Bińkowski et al. 2018 eq. 2), for small sets."""
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


@checker("kid")
def check_kid(fn) -> None:
    """``fn(fa, fb) -> float``: KID, the unbiased MMD^2 between feature sets [m, d] and [n, d] with the cubic
    kernel k(x, y) = (x . y / d + 1)^3 (Bińkowski et al. 2018), over the whole sets (no subsets)."""
    g = _gen(51)
    cases = [("same distribution", 2, 5, 4, 0.0), ("shifted", 3, 6, 7, 1.0), ("same distribution", 16, 64, 64, 0.0),
             ("shifted", 64, 100, 80, 0.3)]
    worst = 0.0
    for kind, d, m, n, shift in cases:
        x = torch.randn(m, d, generator=g, dtype=torch.float64)
        y = torch.randn(n, d, generator=g, dtype=torch.float64) + shift
        case = f"{kind}: fa {(m, d)}, fb {(n, d)}"
        expected = _mmd2(x, y)
        if m * n <= 100:
            expected = torch.tensor(_mmd2_loops(x, y), dtype=torch.float64)

        def hint(got, exp, x=x, y=y):
            if _close(got, _mmd2(x, y, biased=True), 1e-8):
                return ("that is the biased MMD^2 (it includes k(x_i, x_i)): leave the diagonal out of the "
                        "within-set means, dividing by m (m - 1); the unbiased one averages to 0 for equal distributions")
            if _close(got, _mmd2(x, y, scale=False), 1e-8):
                return "the cubic kernel divides the dot product by the feature dimension d"
            if _close(got, _mmd2(x, y, degree=2), 1e-8):
                return "the kernel is cubic: (x . y / d + 1)^3"
            return ("MMD^2 = mean k within fa + mean k within fb - 2 mean k across, the within-set means over pairs "
                    "i != j", "three Gram matrices; subtract the diagonal's sum before dividing")

        got = _scalar("kid", _call("kid", fn, case, x.numpy().copy(), y.numpy().copy()), case)
        worst = max(worst, _compare("kid", got, expected.double(), case, atol=1e-8, rtol=1e-6, hint=hint))
    _ok("kid", len(cases), "the unbiased MMD^2 with the cubic kernel (and its double-sum definition)", worst)


BIAS_RATIO = (4.0, 12.0)   # real vs real, classifier features: FID at N=32 is 7x FID at N=256 (about 1/N)
_REAL: dict = {}


def _real_features() -> torch.Tensor:
    if not _REAL:
        images = (ShapesDataset(size=32, seed=777, length=1024).batch(range(1024))["image"] + 1) / 2
        _REAL["f"] = image_features(images, classifier=load_shapes_classifier())
    return _REAL["f"]


@checker("real_fid")
def check_real_fid(fn) -> None:
    """``fn(features, n) -> float``: FID between two disjoint sets of REAL images, the first n rows of ``features``
    and the n rows after them, as ``tld.fid.frechet_distance`` of their ``feature_statistics``."""
    f = _real_features()
    found = {}
    for n in (16, 32, 256):
        case = f"classifier features {tuple(f.shape)} of real shapes, n = {n}"
        if n not in _REAL:
            _REAL[n] = frechet_distance(*feature_statistics(f[:n]), *feature_statistics(f[n:2 * n]))
        expected = torch.tensor(_REAL[n], dtype=torch.float64)

        def hint(got, exp, n=n):
            return ("two sets of n real images each, rows 0..n-1 and n..2n-1: no image in both",
                    "feature_statistics of each slice, then frechet_distance")

        got = _scalar("real_fid", _call("real_fid", fn, case, f.clone(), n), case)
        _compare("real_fid", got, expected, case, atol=1e-6, rtol=1e-6, hint=hint)
        found[n] = got.item()
    ratio = found[32] / found[256]
    if not BIAS_RATIO[0] <= ratio <= BIAS_RATIO[1]:
        raise CheckError(f"check_real_fid: FID(32) / FID(256) = {ratio:.1f}, outside {BIAS_RATIO}")
    _ok("real_fid", len(found), "tld.fid on real-vs-real splits", 0.0)
    print(f"  answer: real vs real FID {found[32]:.0f} at N=32 and {found[256]:.0f} at N=256, {ratio:.1f}x: the "
          f"small-N bias falls about like 1/N (8x), so FIDs compare only at the same N")
