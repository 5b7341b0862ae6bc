"""Datasets for the course: procedural shapes, sklearn digits, and captioned image folders.

Every dataset returns dicts with the same keys, so the rest of `tld` never cares
which one it trains on:

    image    float32 tensor [C, H, W] in [-1, 1]
    caption  str  ("a red circle at the top left", "the digit 7", ...)
    label    int  (class index for class conditioning; -1 when there is none)

The shapes dataset is the course's workhorse: it needs no download, renders
thousands of images per second on one CPU core, and every image comes with a
caption and a label we can read back from generated samples (`tld.evaluate`).
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "SHAPES", "COLORS", "DEFAULT_COLORS", "POSITIONS",
    "ShapesDataset", "DigitsDataset", "CaptionedImageFolder",
    "parse_caption", "make_caption", "measure_render_rate", "make_loader",
]

# --------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle")

# RGB in [0, 255]. The first six are the default palette (3 shapes x 6 colors = 18
# classes); the rest are extras for experiments. Hues are far apart so a small
# classifier can tell them apart even at 16x16.
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (230, 50, 220),
    "cyan": (40, 220, 230),
    "orange": (250, 140, 20),
    "white": (240, 240, 240),
}
DEFAULT_COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")

# Centre of each named cell of a 3x3 grid, as (x, y) fractions of the image
# (y grows downwards, as in image arrays). 0.2/0.5/0.8 rather than 1/6/.../5/6
# leaves room for bigger shapes without touching the border.
POSITIONS = {
    "top left": (0.2, 0.2), "top": (0.5, 0.2), "top right": (0.8, 0.2),
    "left": (0.2, 0.5), "center": (0.5, 0.5), "right": (0.8, 0.5),
    "bottom left": (0.2, 0.8), "bottom": (0.5, 0.8), "bottom right": (0.8, 0.8),
}

# How a position reads in a caption. Chosen to sound natural and to be
# unambiguous when parsed back.
_POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
_PHRASE_TO_POSITION = {phrase: name for name, phrase in _POSITION_PHRASES.items()}

# Shape half-extent and centre jitter, as fractions of the image side. Every
# centre stays well within its third of the image; centres are also clamped so
# that one background pixel separates each shape from the border at any size.
_HALF_EXTENT = (0.11, 0.15)
_JITTER = 0.025
_TRIANGLE_SCALE = np.float32(1.12)


def make_caption(shape: str, color: str, position: str) -> str:
    """'a red circle at the top left' from its three names."""
    return f"a {color} {shape} {_POSITION_PHRASES[position]}"


_CAPTION_RE = re.compile(r"^an? (?P<color>[a-z]+) (?P<shape>[a-z]+) (?P<where>(?:at|in|on) the [a-z ]+)$")


def parse_caption(caption: str) -> dict:
    """Read a shapes caption back into names: {'shape', 'color', 'position'}.

    Case, surrounding spaces, repeated spaces and a final period are forgiven;
    anything else that is not a caption `ShapesDataset` could have written
    raises a ValueError saying which part was not understood.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}: {caption!r}")
    text = " ".join(caption.lower().strip().rstrip(".").split())
    m = _CAPTION_RE.match(text)
    if m is None:
        raise ValueError(
            f"cannot parse caption {caption!r}; expected 'a <color> <shape> <where>', "
            f"e.g. {make_caption('circle', 'red', 'top left')!r}")
    color, shape, where = m["color"], m["shape"], m["where"]
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r} in caption {caption!r}; known colors: {', '.join(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} in caption {caption!r}; known shapes: {', '.join(SHAPES)}")
    if where not in _PHRASE_TO_POSITION:
        raise ValueError(
            f"unknown position {where!r} in caption {caption!r}; "
            f"known positions: {', '.join(repr(p) for p in _PHRASE_TO_POSITION)}")
    return {"shape": shape, "color": color, "position": _PHRASE_TO_POSITION[where]}


def _check_size(size, who: str, minimum: int = 8) -> int:
    """Image sizes are plain ints >= minimum; say so in words a learner can act on."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"image size must be an int, got {type(size).__name__} {size!r}; {who} needs size >= {minimum}")
    if size < minimum:
        raise ValueError(f"image size {size} is too small; {who} needs size >= {minimum}")
    return int(size)


def _check_names(given, known, what: str) -> tuple:
    given = tuple(given)
    if not given:
        raise ValueError(f"{what} must not be empty; choose from {', '.join(known)}")
    for name in given:
        if name not in known:
            raise ValueError(f"unknown {what[:-1]} {name!r}; choose from {', '.join(known)}")
    if len(set(given)) != len(given):
        raise ValueError(f"{what} has duplicates: {given}")
    return given


# --------------------------------------------------------------------------- rendering

def _signed_distance(shape: str, xs, ys, cx, cy, s):
    """Signed distance in pixels from each pixel centre to the shape's edge (< 0 inside).

    `xs` is [1, W] and `ys` is [H, 1], so most arithmetic stays on 1-D rows and
    columns and only the final combination is [H, W] (this is what makes
    rendering fast). `cx, cy, s` may be scalars or [B, 1, 1] arrays.
    """
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - s
    if shape == "square":
        # A slightly smaller half-side so a square does not look heavier than a circle.
        return np.maximum(np.abs(dx), np.abs(dy)) - np.float32(0.9) * s
    # Triangle: apex at the top, base along the bottom of its box (the box is
    # _TRIANGLE_SCALE larger than the others': a triangle fills only half its box).
    # Max over the three edges' signed line distances is exact inside; the two
    # box planes (above the apex, beside the base corners) keep the outside
    # estimate from bleeding past the box, so anti-aliasing stays within 1/2 pixel.
    s = _TRIANGLE_SCALE * s
    inv = np.float32(1 / np.sqrt(5.0))
    adx = np.abs(dx)
    side = adx * np.float32(2 * inv) - (dy + s) * inv
    box = np.maximum(adx - s, -dy - s)
    return np.maximum(np.maximum(side, dy - s), box)


class ShapesDataset(Dataset):
    """Colored shapes on a dark background, with captions and labels.

    `ds[i]` is a dict with `image` [3, size, size] float32 in [-1, 1], `caption`,
    `label` = shape_index * len(colors) + color_index, and the integer indices
    `shape`, `color`, `position`. Item i depends only on (seed, i): the same pair
    always gives a bit-identical image, in any order and in any worker process.
    """

    def __init__(self, size: int = 32, seed: int = 0, length: int = 50_000,
                 shapes=SHAPES, colors=DEFAULT_COLORS, positions=tuple(POSITIONS),
                 background=(16, 16, 24), antialias: bool = True):
        self.size = _check_size(size, "ShapesDataset")
        self.seed = int(seed)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length = int(length)
        self.shapes = _check_names(shapes, SHAPES, "shapes")
        self.colors = _check_names(colors, COLORS, "colors")
        self.positions = _check_names(positions, POSITIONS, "positions")
        self.antialias = antialias
        # Pixel-centre coordinates, precomputed once: x as a row, y as a column.
        coords = np.arange(self.size, dtype=np.float32) + np.float32(0.5)
        self._xs, self._ys = coords[None, :], coords[:, None]
        # Colors and background in [-1, 1], shaped [3, 1, 1] to broadcast over pixels.
        bg = np.asarray(background, dtype=np.float32) / 127.5 - 1
        self._bg = bg[:, None, None]
        rgb = np.asarray([COLORS[c] for c in self.colors], dtype=np.float32) / 127.5 - 1
        self._delta = (rgb - bg)[:, :, None, None]   # [n_colors, 3, 1, 1]
        self._centres = np.asarray([POSITIONS[p] for p in self.positions], dtype=np.float32) * self.size

    # -- classes and captions
    @property
    def num_classes(self) -> int:
        return len(self.shapes) * len(self.colors)

    @property
    def class_names(self) -> list:
        """['red circle', 'green circle', ...] in label order."""
        return [f"{c} {s}" for s in self.shapes for c in self.colors]

    def captions_for_label(self, label: int) -> list:
        """Every caption (one per position) that can go with a class label."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} out of range; this dataset has {self.num_classes} classes")
        shape, color = self.shapes[label // len(self.colors)], self.colors[label % len(self.colors)]
        return [make_caption(shape, color, p) for p in self.positions]

    # -- items
    def __len__(self) -> int:
        return self.length

    def params(self, i: int) -> tuple:
        """The random choices behind item i: (shape, color, position, cx, cy, s), pixels."""
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for ShapesDataset of length {self.length}")
        i = int(i) % self.length
        # One generator per item seeded by (seed, i): order- and worker-independent.
        u = np.random.default_rng([self.seed, i]).random(6, dtype=np.float32)
        # min(): never index past the end, whatever float32 rounding does to u * n.
        shape = min(int(u[0] * len(self.shapes)), len(self.shapes) - 1)
        color = min(int(u[1] * len(self.colors)), len(self.colors) - 1)
        pos = min(int(u[2] * len(self.positions)), len(self.positions) - 1)
        lo, hi = _HALF_EXTENT
        # Every scalar is float32 so that NumPy 1's promotion (float32 scalar * Python float -> float64)
        # gives the same bits as NumPy 2's: the dataset renders identically under both.
        s = (np.float32(lo) + np.float32(hi - lo) * u[3]) * np.float32(self.size)
        jx, jy = (u[4:6] * 2 - 1) * np.float32(_JITTER * self.size)
        cx, cy = self._centres[pos] + np.array([jx, jy], dtype=np.float32)
        # Keep the edge (plus its half-pixel anti-aliasing ramp) > 1 pixel from the border.
        scale = _TRIANGLE_SCALE if self.shapes[shape] == "triangle" else np.float32(1)
        margin = s * scale + np.float32(1.25)
        cx = min(max(cx, margin), self.size - margin)
        cy = min(max(cy, margin), self.size - margin)
        return shape, color, pos, np.float32(cx), np.float32(cy), s

    def _coverage(self, shape_name, cx, cy, s):
        d = _signed_distance(shape_name, self._xs, self._ys, cx, cy, s)
        if self.antialias:
            # Coverage of a pixel from its signed distance: a 1-pixel ramp across the edge.
            return np.clip(np.float32(0.5) - d, 0, 1)
        return (d <= 0).astype(np.float32)

    def _item(self, shape, color, pos, image) -> dict:
        shape_name, color_name = self.shapes[shape], self.colors[color]
        return {
            "image": image,
            "caption": make_caption(shape_name, color_name, self.positions[pos]),
            "label": shape * len(self.colors) + color,
            "shape": shape, "color": color, "position": pos,
        }

    def __getitem__(self, i: int) -> dict:
        shape, color, pos, cx, cy, s = self.params(i)
        cov = self._coverage(self.shapes[shape], cx, cy, s)
        image = self._bg + self._delta[color] * cov   # [3, H, W]
        return self._item(shape, color, pos, torch.from_numpy(image))

    def batch(self, indices) -> dict:
        """Items for many indices at once, stacked (captions as a list).

        Equal to stacking `ds[i]`, bit for bit; renders each shape kind in one
        vectorised call, which is faster than a loop for large batches.
        """
        params = [self.params(int(i)) for i in indices]
        shape, color, pos = (np.array([p[k] for p in params], dtype=np.int64) for k in range(3))
        cx, cy, s = (np.array([p[k] for p in params], dtype=np.float32)[:, None, None] for k in range(3, 6))
        cov = np.empty((len(params), self.size, self.size), dtype=np.float32)
        for k, name in enumerate(self.shapes):
            sel = shape == k
            if sel.any():
                cov[sel] = self._coverage(name, cx[sel], cy[sel], s[sel])
        images = self._bg[None] + self._delta[color] * cov[:, None]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(images)),
            "caption": [make_caption(self.shapes[a], self.colors[b], self.positions[c])
                        for a, b, c in zip(shape, color, pos)],
            "label": torch.from_numpy(shape * len(self.colors) + color),
            "shape": torch.from_numpy(shape), "color": torch.from_numpy(color),
            "position": torch.from_numpy(pos),
        }

    def grid(self, n: int = 16, start: int = 0) -> torch.Tensor:
        """The first n images as one [n, 3, H, W] tensor (handy for plotting)."""
        return self.batch(range(start, start + n))["image"]


def measure_render_rate(size: int = 32, n: int = 2000, seed: int = 0) -> float:
    """Images per second rendered by `ShapesDataset.__getitem__` in a plain loop."""
    ds = ShapesDataset(size=size, seed=seed, length=max(n, 1))
    for i in range(min(n, 50)):   # warm up caches and lazy imports
        ds[i]
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- digits

class DigitsDataset(Dataset):
    """sklearn's 8x8 handwritten digits (bundled, no download), optionally upsized.

    Items: `image` [channels, size, size] in [-1, 1], `label` 0..9, `caption`
    'the digit 7'. The 1797 images are split 80/20 into train/test by `seed`.
    """

    def __init__(self, size: int = 8, seed: int = 0, split: str = "train", channels: int = 1):
        from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

        self.size = _check_size(size, "DigitsDataset")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        digits = load_digits()
        order = np.random.default_rng(seed).permutation(len(digits.target))
        n_test = len(order) // 5
        keep = order[:n_test] if split == "test" else order[n_test:]
        x = torch.from_numpy(digits.images[keep].astype(np.float32) / 16.0)[:, None]  # [N,1,8,8] in [0,1]
        if self.size != 8:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                align_corners=False, antialias=self.size < 8).clamp(0, 1)
        self.images = (x * 2 - 1).expand(-1, channels, -1, -1).contiguous()
        self.labels = digits.target[keep].astype(np.int64)
        self.split, self.channels = split, channels
        self.num_classes = 10
        self.class_names = [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        label = int(self.labels[i])
        return {"image": self.images[i], "label": label, "caption": f"the digit {label}"}


# --------------------------------------------------------------------------- image folders

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_CAPTION_FILES = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")
_CAPTION_COLUMNS = ("caption", "text", "prompt")
_FILE_COLUMNS = ("file_name", "file", "image", "path")


def _read_rows(path: Path) -> tuple:
    """Rows of a .jsonl or .csv caption file as (list of dicts, list of column names)."""
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n} is not valid JSON: {e}") from None
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return rows, columns
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return rows, list(reader.fieldnames or [])
    raise ValueError(f"caption file {path} must end in .jsonl or .csv")


def _pick_column(columns, wanted, given, what: str, path: Path) -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{path} has no {what} column {given!r}; columns found: {columns}")
        return given
    for name in wanted:
        if name in columns:
            return name
    raise ValueError(f"{path} has no {what} column; columns found: {columns}; "
                     f"accepted names: {', '.join(wanted)}")


class CaptionedImageFolder(Dataset):
    """A folder of images plus a captions file (.jsonl or .csv) naming them.

    Each row gives a file (column `file_name`, `file`, `image` or `path`,
    relative to `root`) and a caption (`caption`, `text` or `prompt`), and
    optionally an integer `label`. Images are resized (shorter side to `size`)
    and centre-cropped to [3, size, size] in [-1, 1].
    """

    def __init__(self, root, captions=None, size: int = 64,
                 caption_column=None, file_column=None):
        from PIL import Image  # noqa: F401  (fail early if Pillow is missing)

        self.root = Path(root)
        self.size = _check_size(size, "CaptionedImageFolder")
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        if captions is None:
            found = [self.root / n for n in _CAPTION_FILES if (self.root / n).is_file()]
            if not found:
                raise FileNotFoundError(f"no caption file in {str(self.root)!r}; "
                                        f"expected one of {', '.join(_CAPTION_FILES)}")
            path = found[0]
        else:
            path = Path(captions) if Path(captions).is_absolute() else self.root / captions
            if not path.is_file():
                raise FileNotFoundError(f"caption file {str(path)!r} does not exist")
        rows, columns = _read_rows(path)
        if not rows:
            raise ValueError(f"caption file {path} has no rows; it must list at least one image")
        cap_col = _pick_column(columns, _CAPTION_COLUMNS, caption_column, "caption", path)
        file_col = _pick_column(columns, _FILE_COLUMNS, file_column, "file", path)
        self.caption_file = path
        self.files, self.captions, self.labels = [], [], []
        for row in rows:
            name = row.get(file_col)
            if not name:
                raise ValueError(f"{path}: a row has no {file_col!r}: {row}")
            file = self.root / str(name)
            if not file.is_file():
                raise FileNotFoundError(f"{path} lists {str(name)!r}, but {str(file)!r} does not exist")
            self.files.append(file)
            self.captions.append(str(row.get(cap_col) or ""))
            label = row.get("label")
            self.labels.append(int(label) if label not in (None, "") else -1)

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, file) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(file) as im:
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {str(file)!r}: {e}") from None
        # Shorter side to `size`, then centre crop: keeps aspect ratio, never pads.
        w, h = im.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        im = im.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
        return x / 127.5 - 1

    def __getitem__(self, i: int) -> dict:
        return {"image": self.load_image(self.files[i]), "caption": self.captions[i], "label": self.labels[i]}


# --------------------------------------------------------------------------- loaders

def make_loader(dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                num_workers: int = 0, drop_last: bool = True) -> DataLoader:
    """A DataLoader whose shuffling order is fixed by `seed`.

    Items are deterministic by index, so workers need no extra seeding: the
    same seed gives the same batches, epoch after epoch, with any number of
    workers. (Persistent workers would break that: they skip a draw from the
    generator at each new epoch, so the shuffles would drift apart.)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, drop_last=drop_last)
