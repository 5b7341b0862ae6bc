"""Pictures: image grids for every lesson.

`image_grid` returns a PIL image (works everywhere, no display needed);
`show` draws a grid with matplotlib, with optional captions under each image.
"""

from __future__ import annotations

import numpy as np
import torch

from .diffusion import get_schedule

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


# ---------------------------------------------------------------------------------------------
# Schedules (lesson 01) and position-embedding similarity (lesson 02)
# ---------------------------------------------------------------------------------------------


def plot_schedules(schedules, n: int = 500, t_eps: float = 1e-3):
    """alpha_t, sigma_t and log_snr(t) = log(alpha_t^2 / sigma_t^2) against t, one line per schedule, in 3 panels.

    `schedules` is a list of names or schedule objects; t runs over [t_eps, 1 - t_eps] so that
    the log-SNR stays finite. Returns the figure.
    """
    import matplotlib.pyplot as plt

    t = torch.linspace(t_eps, 1 - t_eps, n, dtype=torch.float64)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for s in map(get_schedule, schedules):
        for ax, fn in zip(axes, (s.alpha, s.sigma, s.log_snr)):
            ax.plot(t.numpy(), fn(t).numpy(), label=s.name)
    for ax, title in zip(axes, (r"$\alpha_t$ (signal)", r"$\sigma_t$ (noise)", r"$\mathrm{logSNR}_t=\log(\alpha_t^2/\sigma_t^2)$")):
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig


def similarity_map(pos_embed, grid, positions) -> torch.Tensor:
    """Cosine similarity of chosen grid positions with every position: [len(positions), gh, gw].

    `pos_embed` is [N, D] or [1, N, D] over a row-major (gh, gw) grid; `positions` are (row, col).
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    e = torch.as_tensor(pos_embed).detach().float().reshape(-1, torch.as_tensor(pos_embed).shape[-1])
    if e.shape[0] != gh * gw:
        raise ValueError(f"position embedding has {e.shape[0]} rows, expected {gh}x{gw}={gh * gw}")
    e = torch.nn.functional.normalize(e, dim=-1)
    idx = torch.tensor([r * gw + c for r, c in positions])
    return (e[idx] @ e.T).reshape(len(idx), gh, gw)


def show_maps(maps, titles=None, size: float = 1.8, cmap: str = "viridis", vmin=None, vmax=None,
              marks=None, title=None):
    """Draw 2-D maps [K, H, W] side by side as heatmaps; `marks` are (row, col) dots, one per map."""
    import matplotlib.pyplot as plt

    maps = torch.as_tensor(maps).detach().float().cpu()
    k = maps.shape[0]
    fig, axes = plt.subplots(1, k, figsize=(k * size, size + 0.4), squeeze=False)
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(maps[i].numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        if marks is not None:
            ax.plot(marks[i][1], marks[i][0], "r.", markersize=8)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


__all__ += ["plot_schedules", "similarity_map", "show_maps"]
