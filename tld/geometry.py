"""A second, stricter reader of shapes: fit the ideal geometry and measure how well it fits (lesson 13).

The shapes classifier (`tld.judge`) is a CNN trained on renders: it says "square" for anything more
square than round, so a square with notched corners still passes. This reader shares no weights and no
training with it. It works by analysis by synthesis:

1. **Silhouette.** The background colour is the median of the border pixels; each pixel's coverage is
   its colour distance from the background over the shape colour's (the brightest 5 % of pixels).
2. **Fit.** For each shape kind it searches the centre and size of the dataset's own ideal shape
   (`tld.data`'s signed distances, the renderer that drew the training images) that best overlaps the
   silhouette, starting from the silhouette's centroid and area, and then the width of its edge (1 to 3
   px: a decoder's blur softens edges without changing the shape).
3. **Read.** The kind with the best soft IoU (sum of min / sum of max) is what the image shows, and the
   image passes only when that IoU is at least ``strict_iou(size)``: notched corners, flat sides on a circle,
   rounded or pinched corners and blobs all lower the IoU of every ideal shape.

``strict_iou(size)`` is set from renders, not from model samples: every real image passes it, and the
deliberately distorted ones of ``distorted_batch`` (notched squares, octagons for circles, rounded
squares, lobed blobs) fail it, where the classifier accepts most of them; tests/test_geometry.py checks
both. It asks for render precision: an autoencoder's reconstruction of a perfect render already loses
some (shapes-t2i's first decoder: 300 reconstructed renders at mean IoU 0.973, 75 % pass; its fine-tuned
decoder: 0.987 and 100 %, against 0.994 and 100 % for the renders themselves), so report ``iou`` and
``wrong_pixels`` (pixels on the wrong side of half coverage after the fit) beside ``strict``.

Pixel noise is not a shape defect: coverage within ``NOISE_FLOOR`` of either end is clipped (``_floor``), so
renders with Gaussian noise of std 0.05 still pass (the worst of 300: IoU 0.970) while every distortion
fails as before. Blur is a softness defect and ``strict`` counts it: after a Gaussian blur of std 0.35 px
every render passes, 0.5 px 84 %, 0.75 px 18 %.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import _TRIANGLE_SCALE, SHAPES, ShapesDataset, _signed_distance

__all__ = ["strict_iou", "fit_shapes", "geometric_reads", "summarise_reads", "geometric_accuracy", "distorted_batch", "DISTORTIONS"]

STRICT_EDGE = 1.0   # strict_iou(size) = 1 - STRICT_EDGE / size: a fixed budget of about one pixel of edge
NOISE_FLOOR = 0.1   # coverage below this counts as background, above 1 - this as the shape (see _floor)


def strict_iou(size: int) -> float:
    """The IoU an image of ``size`` px must reach: 0.969 at 32 px, 0.938 at 16 px.

    The edge's share of a shape's area grows as 1 / size, and so does the fit's error on a perfect
    render (the worst of 300 renders: 0.979 at 32 px, 0.948 at 16 px), hence a bound of that form.
    """
    return 1 - STRICT_EDGE / size
# area of each ideal shape as a multiple of s^2 (s: the dataset's half-extent)
_AREA = {"circle": np.pi, "square": (2 * 0.9) ** 2, "triangle": 2 * float(_TRIANGLE_SCALE) ** 2}
_ROUNDS = 4   # coarse to fine: each round searches 5 x 5 centres and 5 sizes around the best so far
_EDGES = (1.0, 1.5, 2.0, 2.5, 3.0)   # edge ramp widths in pixels tried at the end


def _coverage(images: np.ndarray) -> np.ndarray:
    """Soft silhouettes [B, H, W] in [0, 1] of images [B, 3, H, W] in [-1, 1].

    A pixel's coverage is how far it has moved from the background *towards the shape's colour*:
    the projection of (pixel - background) on (colour - background). A dark rim or a tinted speck of
    noise, which moves elsewhere in colour space, counts as background.
    """
    b = len(images)
    border = np.concatenate([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], axis=2)
    bg = np.median(border, axis=2)[:, :, None, None]                  # [B, 3, 1, 1]
    diff = (images - bg).reshape(b, 3, -1)                            # [B, 3, HW]
    dist = np.sqrt((diff**2).sum(1))                                  # [B, HW]
    # the shape's own colour: the mean of its top 1 % of pixels (a shape covers at least ~4 % of the image)
    top = dist >= np.quantile(dist, 0.99, axis=1, keepdims=True)
    colour = (diff * top[:, None]).sum(2) / np.maximum(top.sum(1), 1)[:, None]   # [B, 3]
    proj = (diff * colour[:, :, None]).sum(1) / np.maximum((colour**2).sum(1), 1e-6)[:, None]
    return _floor(proj).reshape(b, *images.shape[-2:])


def _floor(c):
    """Coverage with a dead zone of NOISE_FLOOR at each end, stretched back to [0, 1].

    Without it the soft IoU is a measure of pixel noise, not of shape: a shape covers ~5 % of the image,
    so faint noise over the other 95 % outweighs its edge (renders plus Gaussian noise of std 0.02, 1 %
    of the range, scored IoU 0.91 and all failed ``strict`` with not one pixel wrong). The ideal shapes
    go through the same dead zone, so a noiseless render still fits itself.
    """
    return np.clip((c - np.float32(NOISE_FLOOR)) / np.float32(1 - 2 * NOISE_FLOOR), 0, 1)


def _ideal(shape, xs, ys, cx, cy, s, edge=1.0) -> np.ndarray:
    """The dataset's ideal ``shape`` with an edge ramp ``edge`` px wide, through the same dead zone as a silhouette."""
    return _floor(np.clip(np.float32(0.5) - _signed_distance(shape, xs, ys, cx, cy, s) / edge, 0, 1))


def _iou(cov, shape, xs, ys, cx, cy, s, edge=1.0) -> np.ndarray:
    ideal = _ideal(shape, xs, ys, cx, cy, s, edge)
    return np.minimum(ideal, cov).sum((-1, -2)) / np.maximum(np.maximum(ideal, cov).sum((-1, -2)), 1e-6)


def _fit_one(cov: np.ndarray, shape: str, xs: np.ndarray, ys: np.ndarray) -> tuple[float, np.ndarray]:
    """The best soft IoU of an ideal ``shape`` with the silhouette ``cov`` [H, W], and that ideal [H, W]."""
    mass = cov.sum()
    if mass < 1:
        return 0.0, np.zeros_like(cov)
    s = np.float32(np.sqrt(mass / _AREA[shape]))
    cx, cy = np.float32((cov * xs).sum() / mass), np.float32((cov * ys).sum() / mass)
    if shape == "triangle":   # its centroid sits a third of the half-height below the centre of its box
        cy -= _TRIANGLE_SCALE * s / 3
    step, sstep = np.float32(1.0), np.float32(0.08)
    grid = np.linspace(-2, 2, 5, dtype=np.float32)
    for _ in range(_ROUNDS):
        cxs = (cx + step * grid)[:, None, None, None, None]
        cys = (cy + step * grid)[None, :, None, None, None]
        ss = (s * (1 + sstep * grid))[None, None, :, None, None]
        iou = _iou(cov, shape, xs[None, None, None], ys[None, None, None], cxs, cys, ss)
        i, j, k = np.unravel_index(int(iou.argmax()), iou.shape)
        cx, cy, s = cxs[i, 0, 0, 0, 0], cys[0, j, 0, 0, 0], ss[0, 0, k, 0, 0]
        step, sstep = step / 2, sstep / 2
    # a softer edge than the renders' 1-pixel ramp (a decoder's blur) is not a wrong shape: fit its width too
    # (this last grid holds the best fit so far, at edge 1, so it can only improve on it)
    edges = np.asarray(_EDGES, dtype=np.float32)[None, None, None, :, None, None]
    cxs = (cx + step * grid[1:4])[:, None, None, None, None, None]
    cys = (cy + step * grid[1:4])[None, :, None, None, None, None]
    ss = (s * (1 + sstep * grid))[None, None, :, None, None, None]
    x4, y4 = xs[None, None, None, None], ys[None, None, None, None]
    iou = _iou(cov, shape, x4, y4, cxs, cys, ss, edges)
    i, j, k, e = np.unravel_index(int(iou.argmax()), iou.shape)
    ideal = _ideal(shape, xs, ys, cxs[i, 0, 0, 0, 0, 0], cys[0, j, 0, 0, 0, 0], ss[0, 0, k, 0, 0, 0],
                   edges[0, 0, 0, e, 0, 0])
    return float(iou.max()), ideal


def fit_shapes(images, shapes=SHAPES) -> dict:
    """For images [B, 3, H, W] in [-1, 1]: {'iou': [B, n_shapes] best fit per kind, 'shape': [B] best kind}."""
    x = torch.as_tensor(images).detach().float().cpu().numpy()
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    xs = (np.arange(w, dtype=np.float32) + np.float32(0.5))[None, :]
    ys = (np.arange(h, dtype=np.float32) + np.float32(0.5))[:, None]
    cov = _coverage(x)
    fits = [[_fit_one(c, name, xs, ys) for name in shapes] for c in cov]
    iou = np.array([[f[0] for f in row] for row in fits], dtype=np.float64)
    # pixels that the silhouette and the fitted ideal shape disagree on, each cut at half coverage
    wrong = np.array([[((f[1] > 0.5) != (c > 0.5)).sum() for f in row] for row, c in zip(fits, cov)])
    return {"iou": torch.from_numpy(iou), "shape": torch.from_numpy(iou.argmax(1)), "wrong_pixels": torch.from_numpy(wrong)}


def geometric_reads(images, shapes, threshold: float | None = None, names=SHAPES) -> dict:
    """Per image, the strict reading of images [B, 3, H, W] in [-1, 1] against the asked shapes (indices or names).

    Returns [B] tensors: 'right' (read as the asked kind), 'passed' (right *and* fitting it with IoU >= threshold,
    default ``strict_iou`` of the image size), 'iou' (with the asked kind) and 'wrong_pixels' (pixels off the
    fitted asked kind); ``geometric_accuracy`` is their summary.
    """
    asked = torch.tensor([names.index(s) if isinstance(s, str) else int(s) for s in shapes])
    fit = fit_shapes(images, names)
    threshold = strict_iou(torch.as_tensor(images).shape[-1]) if threshold is None else threshold
    if len(asked) != len(fit["shape"]):
        raise ValueError(f"got {len(fit['shape'])} images but {len(asked)} shapes")
    right = fit["shape"] == asked
    iou_asked = fit["iou"][torch.arange(len(asked)), asked]
    return {"right": right, "passed": right & (iou_asked >= threshold), "iou": iou_asked,
            "wrong_pixels": fit["wrong_pixels"][torch.arange(len(asked)), asked]}


def geometric_accuracy(images, shapes, threshold: float | None = None, names=SHAPES) -> dict:
    """The strict reading of images [B, 3, H, W] in [-1, 1] against the asked shapes (indices or names).

    Returns {'shape': the fraction read as the asked kind, 'strict': the fraction read as the asked kind
    *and* fitting it with IoU >= threshold (default ``strict_iou`` of the image size), 'iou': the mean IoU
    with the asked kind, 'wrong_pixels': the median count of pixels off the fitted asked kind}.
    """
    return summarise_reads(geometric_reads(images, shapes, threshold, names))


def summarise_reads(reads: dict) -> dict:
    """``geometric_reads``' per-image tensors as ``geometric_accuracy``'s fractions, mean IoU and median wrong pixels."""
    return {"shape": reads["right"].float().mean().item(), "strict": reads["passed"].float().mean().item(),
            "iou": reads["iou"].mean().item(), "wrong_pixels": reads["wrong_pixels"].float().median().item()}


# --------------------------------------------------------------------------- deliberately distorted shapes

DISTORTIONS = ("notched square", "octagon circle", "rounded square", "blob")


def _distorted_distance(kind: str, xs, ys, cx, cy, s):
    dx, dy = xs - cx, ys - cy
    if kind == "notched square":      # a square with a bite out of every corner
        half = np.float32(0.9) * s
        sq = np.maximum(np.abs(dx), np.abs(dy)) - half
        bite = np.float32(0.4) * half - np.sqrt((np.abs(dx) - half) ** 2 + (np.abs(dy) - half) ** 2)
        return np.maximum(sq, bite)
    if kind == "octagon circle":      # a regular octagon of the circle's size: flat sides, corners
        r = np.abs(dx), np.abs(dy)
        diag = (r[0] + r[1]) / np.sqrt(np.float32(2))
        return np.maximum(np.maximum(r[0], r[1]), diag) - s * np.float32(0.95)
    if kind == "rounded square":      # a square whose corners are quarter circles of half its side
        half, rad = np.float32(0.9) * s, np.float32(0.45) * s
        qx, qy = np.maximum(np.abs(dx) - (half - rad), 0), np.maximum(np.abs(dy) - (half - rad), 0)
        inner = np.minimum(np.maximum(np.abs(dx), np.abs(dy)) - (half - rad), 0)
        return np.sqrt(qx**2 + qy**2) + inner - rad
    # blob: a circle whose edge wobbles with three lobes
    ang = np.arctan2(dy, dx)
    return np.sqrt(dx * dx + dy * dy) - s * (1 + np.float32(0.15) * np.cos(3 * ang))


def distorted_batch(kind: str, n: int = 64, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, list]:
    """n renders of a distortion at the dataset's positions, sizes and colours: (images, the shape they imitate)."""
    if kind not in DISTORTIONS:
        raise ValueError(f"unknown distortion {kind!r}; expected one of {DISTORTIONS}")
    ds = ShapesDataset(size=size, seed=seed, length=n)
    images = []
    for i in range(n):
        _, color, _, cx, cy, s = ds.params(i)
        cov = np.clip(np.float32(0.5) - _distorted_distance(kind, ds._xs, ds._ys, cx, cy, s), 0, 1)
        images.append(torch.from_numpy(ds._bg + ds._delta[color] * cov))
    imitates = "square" if "square" in kind else "circle"
    return torch.stack(images), [imitates] * n
