"""What every denoiser shares: its input checks (one place for the errors a learner sees) and its null condition."""

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


def null_condition(model, cond):
    """The "no condition" input of ``model`` shaped like ``cond``, the one definition that training
    (condition dropout), sampling (classifier-free guidance) and the pipelines use.

    Class models: the null class (label ``num_classes``, its own embedding row). Text models:
    the zero vector, TLD's choice (a pipeline may guide against the empty prompt's encoding instead,
    when it was trained with that null). ``None`` for an unconditional model.
    """
    if cond is None:
        return None
    if getattr(model, "num_classes", 0):
        return torch.full_like(cond, model.null_class)
    return torch.zeros_like(cond)


class Conditioning:
    """Mixin of the four denoisers: ``null_class``, ``null_condition`` and ``drop_condition``."""

    @property
    def null_class(self) -> int:
        """The label that means "no class": ``num_classes`` (the embedding table has one extra row)."""
        if not self.num_classes:
            raise ValueError(f"this {type(self).__name__} is not class-conditional (num_classes=0): it has no "
                             "null class; its null condition is None (unconditional) or zero text")
        if not getattr(self, "has_null_class", True):
            raise ValueError(f"this {type(self).__name__} was built with class_dropout_null=False: it has no "
                             f"null class, so it cannot be trained with label dropout or sampled with guidance")
        return self.num_classes

    def null_condition(self, cond):
        """The null input shaped like ``cond`` (see ``tld.models.common.null_condition``)."""
        return null_condition(self, cond)

    def drop_condition(self, cond, drop):
        """``cond`` with the rows where the bool mask ``drop`` [B] is True replaced by the null condition.

        This is classifier-free guidance's training half (Ho & Salimans 2022): the same network
        learns the conditional and the unconditional model.
        """
        if cond is None or drop is None:
            return cond
        return torch.where(drop.view(-1, *([1] * (cond.ndim - 1))), self.null_condition(cond), cond)
