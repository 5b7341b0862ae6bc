"""FID and KID: how far apart two image sets are in a feature space (lesson 13).

Features come from Inception-v3 (``inception``: the published protocol, when a backend and its
weights are on disk) or from a classifier's penultimate layer (``classifier:<name>``, offline: the
shapes classifier of `tld.judge`). Figures in two feature spaces are not comparable, so every
figure is reported with the name of its space (``feature_space``); nothing picks one silently.

- FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the two feature sets.
- KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
  k(x, y) = (x·y / d + 1)³, averaged over random subsets, with its standard error. It is unbiased
  at any sample count, where FID is biased upwards at small N.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .judge import load_shapes_classifier

__all__ = ["fid", "kid", "mmd2_unbiased", "polynomial_kernel", "frechet_distance", "feature_statistics",
           "image_features", "inception_available", "inception_input", "feature_space", "resolve_features", "FID_FEATURES", "INCEPTION_SIZE",
           "KID_SUBSETS", "KID_SUBSET_SIZE"]

# torch-fidelity's Inception-v3 (the TF-FID port that torchmetrics also uses) and its file name in
# the torch hub cache; clean-fid's TorchScript port of the same network.
INCEPTION_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_CLEANFID_FILE = "inception-2015-12-05.pt"
# "auto" (inception when available, else classifier) is still accepted, and says what it chose
FID_FEATURES = ("auto", "classifier", "inception")
INCEPTION_SIZE = 299   # every Inception protocol (TF-FID, torch-fidelity, clean-fid) resizes to 299 x 299
# KID's subsets, as torch-fidelity and clean-fid draw them: 100 subsets of 1000 features per set
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) between two Gaussians (Heusel et al. 2017, eq. 6).

    tr (S1 S2)^{1/2} is computed as tr (S1^{1/2} S2 S1^{1/2})^{1/2}: the same eigenvalues, but of a
    symmetric PSD matrix, so `eigh` applies and no complex parts or NaNs arise when the
    covariances are singular (fewer samples than feature dimensions), as `sqrtm` of S1 S2 can.
    """
    mu1, mu2 = (np.asarray(torch.as_tensor(m).detach().cpu(), dtype=np.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (np.asarray(torch.as_tensor(s).detach().cpu(), dtype=np.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"mu2 has shape {mu2.shape}, expected ({d},) like mu1")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} has shape {s.shape}, expected ({d}, {d}) for {d}-dim features")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    return float(max(value, 0.0))  # rounding can leave -1e-12 for identical statistics


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64, unbiased) of features [N, D]."""
    f = np.asarray(torch.as_tensor(features).detach().cpu(), dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (x·y / d + coef0)^degree for rows of x [..., n, d] and y [..., m, d] -> [..., n, m]."""
    return (x @ np.swapaxes(y, -1, -2) / x.shape[-1] + coef0) ** degree


def mmd2_unbiased(x, y, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """The unbiased estimate of MMD² between the samples x [..., m, d] and y [..., n, d] (float64).

    MMD² = E k(x, x') + E k(y, y') - 2 E k(x, y); the two within-set means leave out the diagonal
    (k(x_i, x_i)), which is what makes the estimate unbiased (Gretton et al. 2012, eq. 3).
    Leading dimensions are batches of independent estimates.
    """
    x, y = (np.asarray(torch.as_tensor(a).detach().cpu(), dtype=np.float64) for a in (x, y))
    m, n = x.shape[-2], y.shape[-2]
    if m < 2 or n < 2 or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"mmd2_unbiased needs [..., m >= 2, d] and [..., n >= 2, d], got {x.shape} and {y.shape}")
    kxx, kyy, kxy = polynomial_kernel(x, x, degree, coef0), polynomial_kernel(y, y, degree, coef0), \
        polynomial_kernel(x, y, degree, coef0)
    diag = lambda k: np.trace(k, axis1=-2, axis2=-1)
    within_x = (kxx.sum((-2, -1)) - diag(kxx)) / (m * (m - 1))
    within_y = (kyy.sum((-2, -1)) - diag(kyy)) / (n * (n - 1))
    return within_x + within_y - 2 * kxy.mean((-2, -1))


def kid(features_a, features_b, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        degree: int = 3, coef0: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) between features [N_a, D] and [N_b, D].

    The unbiased MMD² with k(x, y) = (x·y / D + 1)³, on ``subsets`` pairs of random subsets of
    ``subset_size`` features from each set (drawn without replacement, numpy seeded by ``seed``;
    torch-fidelity's and clean-fid's defaults: 100 subsets of 1000; with fewer features the subsets
    hold min(N_a, N_b) each). Returns (mean over the subsets, its standard error).

    The standard error is std / sqrt(subsets) (std over the subsets, ddof 1), but never below
    std * sqrt(subset_size / min(N_a, N_b)): the subsets overlap, and their mean cannot be surer
    than one estimate on all the features (when a subset is the whole set, every subset gives the
    same value and the spread over them says nothing). Multiply by 1000 for the "KID x 10³" of tables.
    """
    fa, fb = (np.asarray(torch.as_tensor(f).detach().cpu(), dtype=np.float64) for f in (features_a, features_b))
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
        raise ValueError(f"kid needs features [N_a, D] and [N_b, D] of one width, got {fa.shape} and {fb.shape}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kid needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, len(fa), len(fb))
    if m < 2:
        raise ValueError(f"kid needs at least 2 features per set, got {len(fa)} and {len(fb)}")
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(fa[rng.choice(len(fa), m, replace=False)],
                                     fb[rng.choice(len(fb), m, replace=False)], degree, coef0)
                       for _ in range(subsets)])
    std = float(values.std(ddof=1)) if subsets > 1 else 0.0
    stderr = max(std / np.sqrt(subsets), std * np.sqrt(m / min(len(fa), len(fb))))
    return float(values.mean()), float(stderr)


def feature_space(features: str, classifier=None) -> str:
    """The name a figure in this feature space is reported under: ``inception`` or ``classifier:<name>``.

    The classifier's name is its ``name`` attribute (the shipped shapes classifier:
    ``shapes-classifier``), else its class name.
    """
    if features == "inception":
        return "inception"
    if features.split(":")[0] == "classifier":
        if classifier is None:
            return features if ":" in features else "classifier:shapes-classifier"
        name = getattr(classifier, "name", None) or type(classifier).__name__
        return "classifier:" + {"ShapesClassifier": "shapes-classifier"}.get(str(name), str(name))
    raise ValueError(f"unknown FID features {features!r}; expected 'inception' or 'classifier' "
                     f"('classifier:<name>')")


def resolve_features(features: str) -> str:
    """``auto`` -> ``inception`` when it is installed with its weights, else ``classifier``, and says which."""
    if features != "auto":
        return features
    chosen = "inception" if inception_available() else "classifier"
    print(f"FID/KID features='auto' chose {feature_space(chosen)!r}"
          + ("" if chosen == "inception" else " (Inception-v3 is not installed with its weights here)"),
          file=sys.stderr)
    return chosen


def _inception_weights() -> tuple[str | None, Path | None, list]:
    """(backend, weights path) for the first Inception backend installed with its weights on disk.

    Also returns what is missing, for the error message. Nothing is ever downloaded.
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    env = os.environ.get("TLD_INCEPTION_WEIGHTS")
    missing = []
    have_fidelity = importlib.util.find_spec("torch_fidelity") is not None  # torchmetrics' FID uses it too
    have_cleanfid = importlib.util.find_spec("cleanfid") is not None
    if not (have_fidelity or have_cleanfid):
        missing.append("a package: clean-fid, installed as `pip install --no-deps clean-fid requests` (its "
                       "Inception module needs no torchvision; a plain install pulls torchvision and a CUDA torch), "
                       "or torch-fidelity where torchvision works")
    if have_fidelity:
        path = Path(env) if env and env.endswith(".pth") else hub / INCEPTION_FIDELITY_FILE
        if path.is_file():
            return "torch-fidelity", path, []
        missing.append(f"torch-fidelity's weights file {path}")
    if have_cleanfid:
        folder = Path(env).parent if env and env.endswith(".pt") else Path.home() / ".cache" / "tld"
        if (folder / INCEPTION_CLEANFID_FILE).is_file():
            return "clean-fid", folder / INCEPTION_CLEANFID_FILE, []
        missing.append(f"clean-fid's weights file {folder / INCEPTION_CLEANFID_FILE}")
    return None, None, missing


def inception_available() -> bool:
    """True when an Inception backend is installed and its weights are on disk (no download)."""
    return _inception_weights()[0] is not None


def _load_inception(device):
    """(backend, network) of the first Inception backend installed with its weights; an error naming
    what is missing otherwise. Nothing is ever downloaded."""
    backend, path, missing = _inception_weights()
    if backend is None:
        raise FileNotFoundError(
            "Inception FID/KID needs " + "; and ".join(missing) + ". tld never downloads them: install the "
            "package, put the weights file in place (or point TLD_INCEPTION_WEIGHTS at it), or use "
            "features='classifier' for the offline shapes-classifier features (figures named "
            "'classifier:shapes-classifier', not comparable with published ones).")
    try:
        if backend == "torch-fidelity":
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=str(path))
        else:
            from cleanfid.inception_torchscript import InceptionV3W

            net = InceptionV3W(str(path.parent), download=False)
    except ImportError as e:   # torch-fidelity imports torchvision at its top, for one
        raise ImportError(f"the Inception backend {backend} is installed but does not import ({e}); clean-fid's "
                          "Inception module imports without torchvision: pip install --no-deps clean-fid requests, "
                          f"with its weights file {INCEPTION_CLEANFID_FILE} in ~/.cache/tld") from e
    return backend, net.to(device).eval()


def inception_input(images: torch.Tensor, backend: str) -> torch.Tensor:
    """What each backend's network takes, from images [B, 3, H, W] in [0, 1], resized as its protocol does.

    Both first quantize to 8 bits, as images saved to PNG (and ADM's .npz batches) are.
    ``torch-fidelity``: uint8 at any size; its network resizes to 299 itself, with TF-1's bilinear
    interpolation (the TF-FID protocol of ADM's evaluator). ``clean-fid``: float in [0, 255] at
    299 x 299 (its network asserts it); resized here with an antialiased bicubic filter, torch's
    counterpart of the PIL bicubic resize of clean-fid's "clean" mode.
    """
    u8 = (images.clamp(0, 1) * 255).round()
    if backend == "torch-fidelity":
        return u8.to(torch.uint8)
    if backend != "clean-fid":
        raise ValueError(f"unknown Inception backend {backend!r}; expected 'torch-fidelity' or 'clean-fid'")
    if u8.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        u8 = torch.nn.functional.interpolate(u8, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bicubic",
                                             antialias=True, align_corners=False).clamp(0, 255)
    return u8


def _inception_features(images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    backend, net = _load_inception(device)
    out = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            f = net(inception_input(chunk.to(device).float(), backend))
            f = f[0] if isinstance(f, (tuple, list)) else f   # torch-fidelity returns a tuple of features
            out.append(f.reshape(len(chunk), -1).float().cpu())
    return torch.cat(out)


def image_features(images, features: str = "classifier", classifier=None, batch_size: int = 256,
                   device="cpu") -> torch.Tensor:
    """Features [N, D] of images [N, 3, H, W] in [0, 1] for FID and KID.

    ``classifier``: the penultimate layer of ``classifier`` (default: the shipped shapes
    classifier; 1024-dim at its size), ``inception``: Inception-v3 pool features (2048-dim), only
    when installed with its weights. ``feature_space(features, classifier)`` names the result.
    """
    if features not in ("classifier", "inception") and not features.startswith("classifier:"):
        raise ValueError(f"unknown FID features {features!r}; expected 'classifier' or 'inception'")
    images = torch.as_tensor(images).float()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if images.min() < -1e-3 or images.max() > 1 + 1e-3:
        raise ValueError(f"images must be in [0, 1] (got values in [{images.min():.3f}, {images.max():.3f}]); "
                         "for [-1, 1] images pass (x + 1) / 2")
    if features == "inception":
        return _inception_features(images, batch_size, device)
    model = classifier if classifier is not None else load_shapes_classifier(device=device)
    with torch.no_grad():
        return torch.cat([model.embed(chunk.to(device) * 2 - 1).cpu() for chunk in images.split(batch_size)])


def fid(images_a, images_b, features: str = "auto", classifier=None, batch_size: int = 256,
        device="cpu") -> float:
    """Fréchet distance between the feature distributions of two image sets [N, 3, H, W] in [0, 1].

    ``features``: ``inception`` (the standard FID; needs torch-fidelity or clean-fid plus weights
    on disk), ``classifier`` (offline: the shapes classifier's penultimate features; figures are
    comparable only with each other, not with published FIDs: report them as
    ``feature_space('classifier')``), or ``auto`` (inception when available, else classifier,
    printing which it chose). FID is biased upwards at small N: compare sets of the same size
    (Chong & Forsyth 2020), or use ``kid``.
    """
    if features not in FID_FEATURES:
        raise ValueError(f"unknown FID features {features!r}; expected one of {FID_FEATURES}")
    features = resolve_features(features)
    fa = image_features(images_a, features, classifier, batch_size, device)
    fb = image_features(images_b, features, classifier, batch_size, device)
    return frechet_distance(*feature_statistics(fa), *feature_statistics(fb))
