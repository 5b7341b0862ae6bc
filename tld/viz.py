"""Pictures: image grids for every lesson.

`image_grid` returns a PIL image (works everywhere, no display needed);
`show` draws a grid with matplotlib, with optional captions under each image.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8", "image_grid", "show"]


def to_uint8(images) -> np.ndarray:
    """[B, C, H, W] tensor in [-1, 1] (or [0, 1]) -> uint8 array [B, H, W, 3].

    The range is guessed from the values: anything below -0.01 means [-1, 1].
    One or three channels; one channel is shown as grey.
    """
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, C, H, W] with C = 1 or 3, got shape {tuple(x.shape)}")
    if x.numel() and x.min() < -0.01:
        x = (x + 1) / 2
    x = x.clamp(0, 1).expand(-1, 3, -1, -1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def image_grid(images, nrow: int = 8, padding: int = 2, scale: int = 1, pad_value: int = 255):
    """Tile images [B, C, H, W] into one PIL image, `nrow` images per row.

    `scale` enlarges each pixel (nearest neighbour) so tiny images stay crisp.
    """
    from PIL import Image

    x = to_uint8(images)
    b, h, w, _ = x.shape
    ncol = max(1, min(nrow, b))
    nrows = (b + ncol - 1) // ncol
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), pad_value, np.uint8)
    for k in range(b):
        r, c = divmod(k, ncol)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top:top + h, left:left + w] = x[k]
    img = Image.fromarray(grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def show(images, nrow: int = 8, labels=None, size: float = 1.4, title=None, fontsize: int = 7):
    """Draw images in a matplotlib grid, each with its label (e.g. its caption) below.

    Returns the figure so notebooks can save it; long labels are wrapped.
    """
    import textwrap

    import matplotlib.pyplot as plt

    x = to_uint8(images)
    b = len(x)
    ncol = max(1, min(nrow, b))
    nrows = (b + ncol - 1) // ncol
    extra = 0.35 if labels is not None else 0.0
    fig, axes = plt.subplots(nrows, ncol, figsize=(ncol * size, nrows * (size + extra)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < b:
            ax.imshow(x[k], interpolation="nearest")
            if labels is not None:
                ax.set_title("\n".join(textwrap.wrap(str(labels[k]), 18)), fontsize=fontsize)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
