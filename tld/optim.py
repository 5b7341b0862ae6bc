"""Optimisation pieces every training loop here shares (lesson 06).

* ``fit_one_cycle``: AdamW with a one-cycle learning rate, the loop the course's small helper
  models (the VAE, TinyCLIP, the shapes classifier) train with.
* ``ema_update`` / ``ema_decay_at``: the exponential moving average of the weights that samples
  come from.
* ``lr_at``: the denoiser's schedule, linear warmup then constant or cosine decay; every argument
  explicit, so a lesson can plot it without a training config.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

__all__ = ["fit_one_cycle", "ema_update", "ema_decay_at", "lr_at", "LR_SCHEDULES"]

LR_SCHEDULES = ("constant", "cosine")


def fit_one_cycle(model: nn.Module, loss_at, steps: int, lr: float, weight_decay: float, pct_start: float = 0.1,
                  progress: bool = False, every: int = 50, digits: int = 4) -> nn.Module:
    """Train ``model`` for ``steps`` steps of ``loss_at(step)`` with AdamW and a one-cycle lr.

    Args:
        model: the module to train (left in eval mode at the end).
        loss_at: ``step -> scalar loss``; it draws its own batch, so the caller owns the data.
        steps: optimiser steps.
        lr: the peak learning rate of the one cycle (Smith & Topin 2017).
        weight_decay: AdamW's decoupled weight decay.
        pct_start: fraction of the steps spent warming up to ``lr``.
        progress: print the loss every ``every`` steps (with ``digits`` decimals).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.{digits}f}  {time.perf_counter() - t0:.1f}s")
    return model.eval()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    pe, pm = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if len(pe) != len(pm):
        raise ValueError(f"ema has {len(pe)} parameter tensors, the model {len(pm)}: not the same architecture")
    if all(a.dtype == b.dtype and a.device == b.device for a, b in zip(pe, pm)):
        torch._foreach_lerp_(pe, pm, 1 - decay)  # one fused launch per group instead of one per tensor
    else:
        for a, b in zip(pe, pm):
            a.lerp_(b.to(a.device, a.dtype), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def ema_decay_at(step: int, decay: float) -> float:
    # warm up the average so early samples are not dominated by the random init
    return min(decay, (1 + step) / (10 + step))


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1) -> float:
    """The learning rate at ``step``: linear warmup over ``warmup_steps``, then constant or cosine.

    Args:
        step: the optimiser step, from 0.
        lr: the peak learning rate.
        warmup_steps: steps of linear warmup from lr / warmup_steps to lr.
        max_steps: where the cosine reaches its floor.
        schedule: ``constant`` or ``cosine``.
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r} is not one of {LR_SCHEDULES}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
