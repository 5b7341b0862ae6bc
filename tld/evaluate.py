"""Evaluation: does a generated image show what its caption asked for?

A small CNN trained on `ShapesDataset` reads shape, color and position back from
an image; `shapes_accuracy` compares what it reads with what was asked. It is
trained on renders at several sizes (16..32 px) plus a little noise, so it judges
samples from a model trained at 16, 24 or 32 px alike.

FID (`fid`, `frechet_distance`) compares feature statistics of two image sets: Inception-v3
features when installed with weights, the classifier's penultimate features offline.

    python -m tld.evaluate checkpoint=data/pretrained/shapes-cond n=72     # sample, score, report (lesson 13)
    python -m tld.evaluate train-classifier     # rebuild data/pretrained/shapes-classifier (~1 min)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tld.data import DEFAULT_COLORS, POSITIONS, SHAPES, ShapesDataset, parse_caption

__all__ = [
    "ShapesClassifier", "train_shapes_classifier", "classifier_accuracy",
    "save_shapes_classifier", "load_shapes_classifier", "shapes_accuracy", "shapes_adherence",
    "fid", "frechet_distance", "feature_statistics", "image_features", "inception_available",
    "evaluate_checkpoint", "eval_config_from_args", "format_summary", "main",
]

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "data" / "pretrained" / "shapes-classifier"
CACHE_DIR = Path.home() / ".cache" / "tld" / "shapes-classifier"


# --------------------------------------------------------------------------- the classifier

class ShapesClassifier(nn.Module):
    """A four-layer CNN with one head each for shape, color and position.

    Inputs [B, 3, H, W] in [-1, 1] of any size >= 8 are resized (bilinear) to
    `size` first, so the same weights judge images of any resolution. The
    feature map is flattened rather than pooled: position needs to know *where*.
    """

    def __init__(self, size: int = 32, width: int = 32, shapes=SHAPES, colors=DEFAULT_COLORS,
                 positions=tuple(POSITIONS)):
        super().__init__()
        if size % 8:
            raise ValueError(f"classifier size {size} must be a multiple of 8 (three stride-2 layers)")
        self.config = {"size": size, "width": width, "shapes": list(shapes),
                       "colors": list(colors), "positions": list(positions)}
        self.size = size
        self.shapes, self.colors, self.positions = tuple(shapes), tuple(colors), tuple(positions)
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w // 2, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        n_feat = 2 * w * (size // 8) ** 2
        self.shape_head = nn.Linear(n_feat, len(shapes))
        self.color_head = nn.Linear(n_feat, len(colors))
        self.position_head = nn.Linear(n_feat, len(positions))

    def forward(self, images: torch.Tensor) -> dict:
        """Logits {'shape': [B, n_shapes], 'color': [B, n_colors], 'position': [B, 9]}."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ShapesClassifier expects images [B, 3, H, W], got shape {tuple(images.shape)}")
        if min(images.shape[-2:]) < 8:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is too small; the classifier needs >= 8 px")
        if images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        h = self.features(images)
        return {"shape": self.shape_head(h), "color": self.color_head(h), "position": self.position_head(h)}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate features [B, n_feat] that all three heads read (used for FID).

        (Named `embed` because `features` is the convolutional stack's attribute.)
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ShapesClassifier expects images [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.features(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict:
        """Predicted indices {'shape', 'color', 'position'}, each a [B] long tensor."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = {"shape": [], "color": [], "position": []}
        for chunk in torch.as_tensor(images).split(batch_size):
            logits = self(chunk.to(device=device, dtype=torch.float32))
            for k in out:
                out[k].append(logits[k].argmax(-1).cpu())
        self.train(was_training)
        return {k: torch.cat(v) for k, v in out.items()}


def _training_batch(datasets, batch_size: int, gen: torch.Generator, size: int) -> tuple:
    """A batch rendered at a random size among `datasets`, resized to `size`, with light noise.

    Mixing render sizes teaches the classifier what a 16-px circle looks like
    after upsampling; the noise keeps it calm on imperfect generated samples.
    """
    ds = datasets[int(torch.randint(len(datasets), (1,), generator=gen))]
    idx = torch.randint(len(ds), (batch_size,), generator=gen).tolist()
    b = ds.batch(idx)
    x = b["image"]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    noise_std = 0.1 * torch.rand(batch_size, 1, 1, 1, generator=gen)
    x = x + noise_std * torch.randn(x.shape, generator=gen)
    return x, b["shape"], b["color"], b["position"]


def train_shapes_classifier(size: int = 32, steps: int = 600, seed: int = 0, batch_size: int = 64,
                            lr: float = 3e-3, render_sizes=(16, 20, 24, 28, 32),
                            progress: bool = False) -> ShapesClassifier:
    """Train a `ShapesClassifier` from scratch on freshly rendered shapes (~20 s on one core).

    Training data uses ShapesDataset seeds 10_000 + seed + k, so the default
    held-out seeds (0, 1, ...) are never seen.
    """
    from tld.train import fit_one_cycle

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():   # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = ShapesClassifier(size=size)
    datasets = [ShapesDataset(size=s, seed=10_000 + seed + k, length=1_000_000)
                for k, s in enumerate(render_sizes)]
    def loss_at(step):
        x, shape, color, pos = _training_batch(datasets, batch_size, gen, size)
        logits = model(x)
        return (F.cross_entropy(logits["shape"], shape) + F.cross_entropy(logits["color"], color)
                + F.cross_entropy(logits["position"], pos))

    return fit_one_cycle(model, loss_at, steps, lr, weight_decay=1e-4, pct_start=0.15, progress=progress,
                         every=100)


def classifier_accuracy(model: ShapesClassifier, size: int = 32, n: int = 1000, seed: int = 1) -> dict:
    """Held-out accuracy of each head on `n` fresh renders at `size` px."""
    b = ShapesDataset(size=size, seed=seed, length=n).batch(range(n))
    return shapes_accuracy(b["image"], b["shape"], b["color"], b["position"], classifier=model)


# --------------------------------------------------------------------------- saving and loading

def save_shapes_classifier(model: ShapesClassifier, out_dir) -> Path:
    """Write `model.safetensors` + `config.json` into `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.chmod(0o644)
    tmp.replace(out / "model.safetensors")   # rename last: never leave a half-written file
    (out / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    return out


def _load_from(folder: Path) -> ShapesClassifier:
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    model = ShapesClassifier(**config)
    state = load_file(str(folder / "model.safetensors"))
    expected = set(model.state_dict())
    if set(state) != expected:
        raise ValueError(f"{folder / 'model.safetensors'} does not hold ShapesClassifier weights; "
                         f"missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}")
    model.load_state_dict(state)
    return model.eval()


_LOADED: dict = {}


def load_shapes_classifier(path=None, device="cpu") -> ShapesClassifier:
    """The shipped classifier (`data/pretrained/shapes-classifier`), loaded once per process.

    If the shipped files are missing (say, a non-editable install), train one
    (~20 s) and cache it under ~/.cache/tld/shapes-classifier.
    """
    folder = Path(path) if path is not None else PRETRAINED_DIR
    if path is not None and not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors in {str(folder)!r}")
    if not (folder / "model.safetensors").is_file():
        folder = CACHE_DIR
        if not (folder / "model.safetensors").is_file():
            print(f"tld: shapes classifier weights not found; training one and caching it in {folder}")
            save_shapes_classifier(train_shapes_classifier(), folder)
    key = (str(folder.resolve()), str(device))
    if key not in _LOADED:
        _LOADED[key] = _load_from(folder).to(device)
    return _LOADED[key]


# --------------------------------------------------------------------------- accuracy

def _as_indices(values, names: tuple, what: str) -> torch.Tensor:
    """Targets given as ints (indices into `names`) or as names -> long tensor."""
    if isinstance(values, torch.Tensor):
        return values.long().cpu()
    values = list(values)
    out = []
    for v in values:
        if isinstance(v, str):
            if v not in names:
                raise ValueError(f"unknown {what} {v!r}; the classifier knows {', '.join(names)}")
            out.append(names.index(v))
        else:
            out.append(int(v))
    return torch.tensor(out, dtype=torch.long)


def shapes_accuracy(images, shapes, colors, positions=None, classifier=None) -> dict:
    """Fraction of images whose shape / color / position the classifier reads as asked.

    `images` [B, 3, H, W] in [-1, 1]; targets are indices or names (e.g. 'red').
    Returns {'shape', 'color', 'position' (None when not given), 'all'}, where
    'all' counts an image right only if every given attribute is right.
    """
    model = classifier if classifier is not None else load_shapes_classifier()
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    targets = {"shape": _as_indices(shapes, model.shapes, "shape"),
               "color": _as_indices(colors, model.colors, "color")}
    if positions is not None:
        targets["position"] = _as_indices(positions, model.positions, "position")
    for k, v in targets.items():
        if len(v) != len(images):
            raise ValueError(f"got {len(images)} images but {len(v)} {k} targets")
    pred = model.predict(images)
    right = {k: pred[k] == v for k, v in targets.items()}
    every = torch.stack(list(right.values())).all(0)
    out = {k: v.float().mean().item() for k, v in right.items()}
    out.setdefault("position", None)
    out["all"] = every.float().mean().item()
    return out


def shapes_adherence(images, captions, classifier=None) -> dict:
    """Prompt adherence of images [B, 3, H, W] in [0, 1] to their shapes captions.

    Parses each caption (`tld.data.parse_caption`) and scores shape, color and
    position with `shapes_accuracy`.
    """
    parsed = [parse_caption(c) for c in captions]
    images = torch.as_tensor(images).float() * 2 - 1
    return shapes_accuracy(images, [p["shape"] for p in parsed], [p["color"] for p in parsed],
                           [p["position"] for p in parsed], classifier=classifier)


# --------------------------------------------------------------------------- FID

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


# --------------------------------------------------------------------------- evaluating a checkpoint

EVAL_KEYS = {  # key: (default, type); None default = required
    "checkpoint": (None, str), "n": (None, int), "steps": (20, int), "guidance": (3.0, float),
    "sampler": ("dpm++2m", str), "seed": (0, int), "out": ("", str), "features": ("classifier", str),
    "batch_size": (64, int), "progress": (True, bool),
}
HELD_OUT_SEED = 777   # real images and captions for evaluation; no training set or test above uses it
EVAL_USAGE = ("python -m tld.evaluate checkpoint=PATH n=N [steps=20] [guidance=3] [sampler=dpm++2m] [seed=0] "
              "[out=DIR] [features=classifier] [batch_size=64] [progress=true]\n"
              "       python -m tld.evaluate train-classifier [--out DIR] [--steps N] [--seed S]")


def eval_config_from_args(args: list[str]) -> dict:
    """``key=value`` strings -> the evaluation settings, checked; errors name the key and the valid ones."""
    from .samplers import SAMPLERS

    given = {}
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"expected key=value, got {arg!r}; usage: {EVAL_USAGE.splitlines()[0]}")
        k, v = arg.split("=", 1)
        k = k.strip().lstrip("-").replace("-", "_")
        if k not in EVAL_KEYS:
            raise ValueError(f"unknown key {k!r}; valid keys: {', '.join(EVAL_KEYS)}")
        given[k] = v.strip()
    cfg = {}
    for k, (default, kind) in EVAL_KEYS.items():
        if k not in given:
            if default is None:
                raise ValueError(f"missing {k}=...; usage: {EVAL_USAGE.splitlines()[0]}")
            cfg[k] = default
            continue
        v = given[k]
        try:
            if kind is bool:
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                cfg[k] = v.lower() in ("true", "1", "yes")
            elif kind is int:
                cfg[k] = int(float(v)) if float(v).is_integer() else int(v)
            else:
                cfg[k] = kind(v)
        except ValueError:
            raise ValueError(f"{k} expects {'an' if kind is int else 'a'} {kind.__name__}, got {v!r}") from None
    limits = {"n": 2, "steps": 1, "batch_size": 1}   # FID needs two samples for a covariance
    for k, lo in limits.items():
        if cfg[k] < lo:
            raise ValueError(f"{k} must be at least {lo}, got {cfg[k]}")
    if cfg["guidance"] < 0:
        raise ValueError(f"guidance must be >= 0 (1 = no guidance), got {cfg['guidance']}")
    if cfg["sampler"] not in SAMPLERS:
        raise ValueError(f"unknown sampler {cfg['sampler']!r}; valid samplers: {', '.join(SAMPLERS)}")
    if cfg["features"] not in FID_FEATURES:
        raise ValueError(f"unknown features {cfg['features']!r}; valid features: {', '.join(FID_FEATURES)}")
    if not Path(cfg["checkpoint"]).exists():
        raise FileNotFoundError(f"checkpoint {cfg['checkpoint']!r} does not exist; pass a run or checkpoint folder "
                                "(tld.train.load_model) or a text-to-image pipeline folder (with pipeline.json)")
    return cfg


def load_for_eval(path):
    """('text', TextToImage) for a pipeline folder (or a text run holding one), else ('class', model)."""
    from .pipeline import TextToImage
    from .train import load_model

    path = Path(path)
    for folder in (path, path / "pipeline"):
        if (folder / "pipeline.json").is_file():
            return "text", TextToImage.from_pretrained(folder)
    model = load_model(path)
    dataset = model.train_config.get("dataset", "shapes")
    if dataset != "shapes" or model.in_chans != 3:
        raise ValueError(f"{str(path)!r} was trained on dataset={dataset!r} with {model.in_chans} channels; the "
                         "shapes classifier (FID features and adherence) judges 3-channel shapes images only")
    return "class", model


class _StepBar:
    """One tqdm bar over every sampler step of every batch (a forward hook ticks it per model call)."""

    def __init__(self, model, total: int, enabled: bool, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=not enabled, desc=desc, unit="step")
        self.handle = model.register_forward_hook(self._tick)

    def _tick(self, *_):
        self.bar.update(1)   # returns None: a hook's return value would replace the model output

    def close(self):
        self.handle.remove()
        self.bar.n = self.bar.total   # a sampler may call the model once more or less than `steps`
        self.bar.close()


def generate_for_eval(kind: str, gen, n: int, steps: int, guidance: float, sampler: str, seed: int,
                      batch_size: int = 64, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """n samples [n, 3, H, W] in [0, 1] and what each was asked for.

    class: labels cycle over the classes (label = shape * n_colors + color, as ShapesDataset);
    text: the captions of the held-out ShapesDataset(seed=777). Batch k uses seed + k.
    """
    from .train import generate

    batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    model = gen if kind == "class" else gen.denoiser
    bar = _StepBar(model, len(batches) * steps, progress, f"sampling {n} images")
    out = []
    try:
        if kind == "class":
            nc = gen.num_classes
            labels = torch.arange(n) % nc if nc else None
            for k, idx in enumerate(batches):
                lab = labels[idx.start:idx.stop] if labels is not None else None
                x = generate(gen, gen.train_config, lab, n=len(idx), steps=steps, sampler=sampler,
                             guidance=guidance if nc else 1.0, seed=seed + k)
                out.append(((x + 1) / 2).cpu())
            asked = {"labels": labels}
        else:
            from .pipeline import held_out_captions

            captions = held_out_captions(n)
            for k, idx in enumerate(batches):
                out.append(gen([captions[i] for i in idx], steps=steps, guidance=guidance, seed=seed + k,
                               sampler=sampler))
            asked = {"captions": captions}
    finally:
        bar.close()
    return torch.cat(out).float().clamp(0, 1), asked


def _attribute_targets(asked: dict, colors=DEFAULT_COLORS) -> dict | None:
    """{'shape', 'color'[, 'position']} index tensors for what the samples were asked to show."""
    if asked.get("captions") is not None:
        parsed = [parse_caption(c) for c in asked["captions"]]
        return {k: [p[k] for p in parsed] for k in ("shape", "color", "position")}
    labels = asked.get("labels")
    if labels is None:
        return None
    return {"shape": labels // len(colors), "color": labels % len(colors)}


def _class_names(targets: dict, clf: ShapesClassifier) -> list:
    shapes = _as_indices(targets["shape"], clf.shapes, "shape")
    colors = _as_indices(targets["color"], clf.colors, "color")
    return [f"{clf.colors[c]} {clf.shapes[s]}" for s, c in zip(shapes.tolist(), colors.tolist())]


def evaluate_checkpoint(checkpoint, n: int, steps: int = 20, guidance: float = 3.0, sampler: str = "dpm++2m",
                        seed: int = 0, out=None, features: str = "classifier", batch_size: int = 64,
                        progress: bool = False) -> dict:
    """Sample n images from a checkpoint, score them, write report.json + pictures into `out`.

    FID compares the samples with n held-out real shapes (ShapesDataset seed 777, rendered at the
    samples' size); `fid_real_floor` is FID between two real sets of the same n, the value a
    perfect model would get at this sample count (FID is biased upwards at small n).
    """
    import matplotlib

    from .data import ShapesDataset

    t0 = time.perf_counter()
    out = Path(out) if out else Path(checkpoint) / "eval"
    kind, gen = load_for_eval(checkpoint)
    t1 = time.perf_counter()
    images, asked = generate_for_eval(kind, gen, n, steps, guidance, sampler, seed, batch_size, progress)
    sampling_s = time.perf_counter() - t1
    size = images.shape[-1]
    real = (ShapesDataset(size=size, seed=HELD_OUT_SEED, length=n).batch(range(n))["image"] + 1) / 2
    other = (ShapesDataset(size=size, seed=HELD_OUT_SEED + 1, length=n).batch(range(n))["image"] + 1) / 2
    if features == "auto":
        features = "inception" if inception_available() else "classifier"
    clf = load_shapes_classifier()
    f_gen, f_real, f_other = (image_features(x, features, clf) for x in (images, real, other))
    stats_real = feature_statistics(f_real)
    fid_value = frechet_distance(*feature_statistics(f_gen), *stats_real)
    fid_floor = frechet_distance(*feature_statistics(f_other), *stats_real)

    targets = _attribute_targets(asked, clf.colors)
    adherence, per_class, right = None, {}, None
    if targets is not None:
        adherence = shapes_accuracy(images * 2 - 1, targets["shape"], targets["color"], targets.get("position"),
                                    classifier=clf)
        pred = clf.predict(images * 2 - 1)
        right = torch.stack([pred[k] == _as_indices(v, getattr(clf, k + "s"), k) for k, v in targets.items()]).all(0)
        names = _class_names(targets, clf)
        for name in dict.fromkeys(f"{c} {s}" for s in clf.shapes for c in clf.colors):
            sel = [i for i, nm in enumerate(names) if nm == name]
            if sel:
                per_class[name] = right[sel].float().mean().item()
        captions = asked.get("captions") or names
    else:
        captions = [f"sample {i}" for i in range(n)]

    out.mkdir(parents=True, exist_ok=True)
    backend = matplotlib.get_backend()
    matplotlib.use("Agg", force=True)   # files only: no window, also without a display
    try:
        files = _write_pictures(out, images, captions, right, per_class, f_gen, f_real, kind)
    finally:
        matplotlib.use(backend, force=True)
    report = {
        "checkpoint": str(checkpoint), "kind": kind, "n": n, "steps": steps, "guidance": guidance,
        "sampler": sampler, "seed": seed, "image_size": size,
        "seconds": round(time.perf_counter() - t0, 3), "sampling_seconds": round(sampling_s, 3),
        "fid": fid_value, "fid_features": features, "fid_real_floor": fid_floor,
        "fid_real": f"ShapesDataset(size={size}, seed={HELD_OUT_SEED}), first {n} items",
        "adherence": adherence, "per_class": per_class, "files": files,
    }
    if kind == "class":
        report["num_classes"] = gen.num_classes
    _tmp = out / "report.json.tmp"
    _tmp.write_text(json.dumps(report, indent=2) + "\n")
    _tmp.replace(out / "report.json")
    report["out"] = str(out)
    return report


def _write_pictures(out: Path, images, captions, right, per_class: dict, f_gen, f_real, kind: str) -> list:
    import textwrap

    import matplotlib.pyplot as plt

    from .viz import show

    files = []
    k = min(len(images), 36)   # a readable grid: the first 36 samples
    fig = show(images[:k], nrow=min(k, 9 if kind == "text" else 6), labels=captions[:k], size=1.3, fontsize=6,
               title="samples (red label: the classifier reads something else)" if right is not None else "samples")
    lines = max(len(textwrap.wrap(str(c), 18)) for c in captions[:k])   # show() wraps labels at 18 characters
    if lines > 1:   # make room for the extra lines above each row
        w, h = fig.get_size_inches()
        fig.set_size_inches(w, h + 0.13 * (lines - 1) * -(-k // min(k, 9 if kind == "text" else 6)))
        fig.tight_layout()
    if right is not None:
        for ax, ok in zip(fig.axes, right[:k].tolist()):
            ax.title.set_color("black" if ok else "red")
    fig.savefig(out / "samples.png", dpi=100)
    plt.close(fig)
    files.append("samples.png")

    if per_class:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(per_class)), 3))
        names = list(per_class)
        ax.bar(range(len(names)), [per_class[c] for c in names],
               color=[c.split()[0] if c.split()[0] in DEFAULT_COLORS else "grey" for c in names], edgecolor="black")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction read back right")
        ax.set_title("adherence per class (every asked attribute right)")
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=100)
        plt.close(fig)
        files.append("accuracy.png")

    # Real and generated features projected on the real set's top two principal axes:
    # FID compares these two clouds' means and covariances (in all dimensions, not just two).
    fr, fg = (np.asarray(f, dtype=np.float64) for f in (f_real, f_gen))
    mean = fr.mean(0)
    _, _, vt = np.linalg.svd(fr - mean, full_matrices=False)
    pr, pg = (fr - mean) @ vt[:2].T, (fg - mean) @ vt[:2].T
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.scatter(pr[:, 0], pr[:, 1], s=12, alpha=0.6, label="real (held out)")
    ax.scatter(pg[:, 0], pg[:, 1], s=12, alpha=0.6, marker="x", label="generated")
    ax.set_xlabel("PC 1 of real features")
    ax.set_ylabel("PC 2")
    ax.set_title("classifier features: real vs generated", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "features.png", dpi=100)
    plt.close(fig)
    files.append("features.png")
    return files


def format_summary(report: dict) -> str:
    """The one-screen summary printed at the end of `python -m tld.evaluate`."""
    what = (f"class-conditional, {report['num_classes']} classes" if report["kind"] == "class"
            else "text-to-image pipeline")
    lines = [
        f"evaluated {report['checkpoint']} ({what}, {report['image_size']}x{report['image_size']})",
        f"  {report['n']} samples: {report['sampler']} {report['steps']} steps, guidance {report['guidance']:g}, "
        f"seed {report['seed']}; sampling {report['sampling_seconds']:.1f} s, {report['seconds']:.1f} s in all",
        f"  FID ({report['fid_features']} features, vs {report['n']} held-out real)  {report['fid']:10.2f}",
        f"  FID real vs real at the same n (the floor)          {report['fid_real_floor']:10.2f}",
    ]
    adh = report["adherence"]
    if adh is not None:
        parts = [f"{k} {adh[k]:.3f}" for k in ("color", "shape", "position", "all") if adh.get(k) is not None]
        lines.append("  adherence  " + "  ".join(parts))
        worst = sorted((kv for kv in report["per_class"].items() if kv[1] < 1), key=lambda kv: kv[1])[:3]
        lines.append("  weakest classes  " + (", ".join(f"{k} {v:.2f}" for k, v in worst) if worst
                                              else "none: every class read back right"))
    lines.append(f"  wrote report.json, {', '.join(report['files'])} in {report['out']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def _train_classifier_cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m tld.evaluate train-classifier",
                                     description="train the shapes classifier and save it")
    parser.add_argument("--out", default=str(PRETRAINED_DIR))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    model = train_shapes_classifier(steps=args.steps, seed=args.seed, progress=True)
    print(f"trained in {time.perf_counter() - t0:.1f}s")
    for s in (16, 24, 32):
        acc = classifier_accuracy(model, size=s)
        print(f"held-out accuracy at {s}px: " + "  ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    print(f"saved to {save_shapes_classifier(model, args.out)}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train-classifier":
        return _train_classifier_cli(argv[1:])
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__.split("\n")[0] + "\n\nusage: " + EVAL_USAGE)
        return 0 if argv else 2
    try:
        cfg = eval_config_from_args(argv)
        report = evaluate_checkpoint(**cfg)
    except (ValueError, FileNotFoundError) as e:   # speak to the learner, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
