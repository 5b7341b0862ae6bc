"""The judge: a small classifier reads shape, color and position back from an image (lessons 08, 13).

A four-layer CNN trained on `ShapesDataset` says what an image shows; `shapes_accuracy` compares
that with what was asked, and `shapes_adherence` does it for captions. It is trained on renders at
several sizes (16..32 px) plus a little noise, so it judges samples from a model trained at 16, 24
or 32 px alike. Its penultimate features are also the offline FID's features (`tld.fid`).

    python -m tld.evaluate train-classifier     # rebuild tld/assets/shapes-classifier (~1 min)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import assets, io
from .data import DEFAULT_COLORS, POSITIONS, SHAPES, ShapesDataset, parse_caption
from .optim import fit_one_cycle

__all__ = [
    "ShapesClassifier", "train_shapes_classifier", "classifier_accuracy", "save_shapes_classifier",
    "load_shapes_classifier", "shapes_accuracy", "shapes_adherence", "HELD_OUT_SEED", "held_out_captions",
]

HELD_OUT_SEED = 777   # real images and captions for evaluation; no training set or test uses it
PRETRAINED_DIR = assets.ROOT / "shapes-classifier"

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
    """Write ``config.json`` + ``model.safetensors`` into ``out_dir``, atomically (``tld.io``)."""
    return io.save_state(out_dir, model.config, keep=("README.md",), model=model.state_dict())


def _load_from(folder: Path) -> ShapesClassifier:
    config, states = io.load_state(folder, "model")
    model = ShapesClassifier(**config)
    io.load_exact(model, states["model"], folder / "model.safetensors", "ShapesClassifier")
    return model.eval()


_LOADED: dict = {}


def load_shapes_classifier(path=None, device="cpu") -> ShapesClassifier:
    """The shipped classifier (``tld.assets.path("shapes-classifier")``), or the one saved in ``path``;
    loaded once per process. A missing one is an error that names it, never a quietly retrained one."""
    folder = Path(path) if path is not None else assets.path("shapes-classifier")
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors in {str(folder)!r} (a saved shapes classifier holds "
                                "config.json + model.safetensors: python -m tld.evaluate train-classifier --out DIR)")
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


def held_out_captions(n: int = 256, size: int = 32, seed: int | None = None) -> list[str]:
    """Captions of shapes renders no tld training run uses (``HELD_OUT_SEED`` by default)."""
    return ShapesDataset(size=size, seed=HELD_OUT_SEED if seed is None else seed, length=n).batch(range(n))["caption"]
