"""Input checks every denoiser shares: one place for the errors a learner sees."""

from __future__ import annotations

import torch


def check_inputs(model, x: torch.Tensor, t, cond, name: str) -> torch.Tensor:
    """Check x [B, C, H, W], t [B] (a scalar is broadcast) and, for class models, labels [B]; return t."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if x.ndim != 4 or tuple(x.shape[1:]) != (model.in_chans, model.img_size, model.img_size):
        raise ValueError(f"expected x of shape [B, {model.in_chans}, {model.img_size}, {model.img_size}], "
                         f"got {tuple(x.shape)}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"expected t of shape [{x.shape[0]}] (one time in [0, 1] per image), got {tuple(t.shape)}")
    check_labels(model, cond, x.shape[0], name)
    return t


def check_labels(model, cond, batch: int, name: str) -> None:
    if model.num_classes and (cond is None or tuple(cond.shape) != (batch,)):
        raise ValueError(f"this {name} is class-conditional: cond must be [B] integer labels "
                         f"(null class {model.num_classes}), got {None if cond is None else tuple(cond.shape)}")
