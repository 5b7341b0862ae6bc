"""FID: the Fréchet distance between the feature statistics of two image sets (lesson 13).

Features come from Inception-v3 when a backend and its weights are on disk, or from the shapes
classifier's penultimate layer offline (`tld.judge`); numbers in the two feature spaces are not
comparable with each other.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from .judge import load_shapes_classifier

__all__ = ["fid", "frechet_distance", "feature_statistics", "image_features", "inception_available",
           "FID_FEATURES"]

# torch-fidelity's Inception-v3 (the TF-FID port that torchmetrics also uses) and its file name in
# the torch hub cache; clean-fid's TorchScript port of the same network.
INCEPTION_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_CLEANFID_FILE = "inception-2015-12-05.pt"
FID_FEATURES = ("auto", "classifier", "inception")


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
        missing.append("a package: torch-fidelity (or torchmetrics[image], which brings it) or clean-fid")
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


def _inception_features(images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    backend, path, missing = _inception_weights()
    if backend is None:
        raise FileNotFoundError(
            "Inception FID needs " + "; and ".join(missing) + ". tld never downloads them: install the "
            "package, put the weights file in place (or point TLD_INCEPTION_WEIGHTS at it), or use "
            "fid(..., features='classifier') for the offline shapes-classifier FID.")
    if backend == "torch-fidelity":
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        to_input = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8)  # it resizes to 299 itself
        run = lambda x: net(to_input(x))[0]
    else:
        from cleanfid.inception_torchscript import InceptionV3W

        net = InceptionV3W(str(path.parent), download=False)
        run = lambda x: net(x.clamp(0, 1) * 255)
    net = net.to(device).eval()
    with torch.no_grad():
        return torch.cat([run(chunk.to(device).float()).cpu() for chunk in images.split(batch_size)])


def image_features(images, features: str = "classifier", classifier=None, batch_size: int = 256,
                   device="cpu") -> torch.Tensor:
    """Features [N, D] of images [N, 3, H, W] in [0, 1] for FID.

    ``classifier``: the shapes classifier's penultimate layer (offline; 1024-dim at the shipped
    size), ``inception``: Inception-v3 pool features (2048-dim), only when installed with weights.
    """
    if features not in ("classifier", "inception"):
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

    ``features``: ``inception`` (the standard FID; needs torch-fidelity / torchmetrics or clean-fid
    plus weights on disk), ``classifier`` (offline: the shapes classifier's penultimate features;
    numbers are comparable only with each other, not with published FIDs), or ``auto``
    (inception when available, else classifier). FID is biased upwards at small N: compare sets
    of the same size (Chong & Forsyth 2020).
    """
    if features not in FID_FEATURES:
        raise ValueError(f"unknown FID features {features!r}; expected one of {FID_FEATURES}")
    if features == "auto":
        features = "inception" if inception_available() else "classifier"
    fa = image_features(images_a, features, classifier, batch_size, device)
    fb = image_features(images_b, features, classifier, batch_size, device)
    return frechet_distance(*feature_statistics(fa), *feature_statistics(fb))
