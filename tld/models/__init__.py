"""Denoisers and their named presets (lessons 04, 05, 11).

Every model is called as ``model(x, t, cond) -> prediction`` with x [B, C, H, W] and t [B] in
[0, 1]. ``create(name, **overrides)`` builds a preset; it works under ``torch.device("meta")``
so the papers' largest models can be counted without allocating them::

    with torch.device("meta"):
        n = count_parameters(create("uvit-h/2"))   # 500,832,016
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .common import Conditioning, null_condition
from .dit import DiT
from .tldnet import TLDNet
from .udit import UDiT
from .uvit import UViT

__all__ = ["Preset", "PRESETS", "create", "count_parameters", "count_on_meta", "family", "Conditioning",
           "null_condition", "UViT", "DiT", "UDiT", "TLDNet"]


@dataclass(frozen=True)
class Preset:
    cls: type  # the model class
    kwargs: dict = field(default_factory=dict)
    doc: str = ""


# The one preset table: the papers' exact sizes and the course's small models.
PRESETS: dict[str, Preset] = {
    # U-ViT, Bao et al. 2023, Table 7: the paper's exact configurations.
    "uvit-s/2": Preset(UViT, dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12,
                                         num_heads=8, conv=True),
                       "U-ViT-S/2, CIFAR-10 32x32, unconditional, 3x3 output conv (44,255,328 params)"),
    "uvit-h/2": Preset(UViT, dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28,
                                         num_heads=16, num_classes=1000, conv=False),
                       "U-ViT-H/2, ImageNet-256 latents 4x32x32, 1000 classes + null (500,832,016 params)"),
    # Course presets: small enough to train on a laptop CPU.
    "uvit-tiny": Preset(UViT, dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2,
                                          num_heads=2, num_classes=18),
                        "a few-thousand-parameter U-ViT for tests"),
    "uvit-course": Preset(UViT, dict(img_size=32, patch_size=4, in_chans=3, embed_dim=128, depth=6,
                                            num_heads=4, num_classes=18, conv_mlp=True),
                          "the CPU course model: shapes 32x32, 18 classes, depthwise-conv MLP"),
    # DiT, Peebles & Xie 2023, Table 1 (tld/models/dit.py): latents 4x32x32, 1000 classes + null, learned sigma.
    "dit-s/2": Preset(DiT, dict(img_size=32, patch_size=2, in_chans=4, embed_dim=384, depth=12, num_heads=6,
                                      num_classes=1000, learn_sigma=True), "DiT-S/2 (32,963,360 params)"),
    "dit-b/2": Preset(DiT, dict(img_size=32, patch_size=2, in_chans=4, embed_dim=768, depth=12, num_heads=12,
                                      num_classes=1000, learn_sigma=True), "DiT-B/2 (130,512,416 params)"),
    "dit-l/2": Preset(DiT, dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=24, num_heads=16,
                                      num_classes=1000, learn_sigma=True), "DiT-L/2 (458,102,816 params)"),
    "dit-xl/2": Preset(DiT, dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28,
                                       num_heads=16, num_classes=1000, learn_sigma=True),
                       "DiT-XL/2 (675,129,632 params)"),
    "dit-course": Preset(DiT, dict(img_size=32, patch_size=4, in_chans=3, embed_dim=128, depth=6, num_heads=4,
                                         num_classes=18, learn_sigma=False),
                         "the CPU course DiT: shapes 32x32, 18 classes, adaLN-Zero"),
    # U-DiT, Tian et al. 2024 (tld/models/udit.py): latents 4x32x32, 1000 classes; counts as trained / merged.
    "udit-s": Preset(UDiT, dict(img_size=32, in_chans=4, embed_dim=96, num_heads=4, num_classes=1000),
                     "U-DiT-S (58,896,568 trained; 52,045,240 merged)"),
    "udit-b": Preset(UDiT, dict(img_size=32, in_chans=4, embed_dim=192, num_heads=8, num_classes=1000),
                     "U-DiT-B (231,251,304 trained; 204,425,064 merged)"),
    "udit-l": Preset(UDiT, dict(img_size=32, in_chans=4, embed_dim=384, num_heads=16, num_classes=1000),
                     "U-DiT-L (916,335,304 trained; 810,188,488 merged)"),
    "udit-course": Preset(UDiT, dict(img_size=32, in_chans=3, embed_dim=32, num_heads=2, depth=(1, 1, 2, 1, 1),
                                            num_classes=18, learn_sigma=False),
                          "the CPU course U-DiT: shapes 32x32, 18 classes"),
    # The TLD denoiser, apapiu/transformer_latent_diffusion (tld/models/tldnet.py).
    "tld-100m": Preset(TLDNet, dict(img_size=32, patch_size=2, in_chans=4, embed_dim=768, depth=12,
                                    noise_embed_dim=256, text_dim=768, norm="pre", cross_heads=12),
                       "the TLD denoiser, latents 4x32x32, pooled CLIP 768, pre-norm as the reference now is "
                       "(101,164,352 params)"),
    "tld-course": Preset(TLDNet, dict(img_size=32, patch_size=4, in_chans=3, embed_dim=128, depth=6,
                                               head_dim=32, noise_embed_dim=64, num_classes=18),
                         "the CPU course TLD denoiser: shapes 32x32, 18 classes, cross-attention"),
}


FAMILIES = {UViT: "uvit", DiT: "dit", UDiT: "udit", TLDNet: "tld"}


def family(name: str) -> str:
    """The architecture family of a preset: ``uvit``, ``dit``, ``udit`` or ``tld``."""
    return FAMILIES[_preset(name).cls]


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def create(name: str, **overrides) -> nn.Module:
    """Build the preset ``name``, with any constructor argument overridden."""
    preset = _preset(name)
    return preset.cls(**{**preset.kwargs, **overrides})


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_on_meta(name: str, **overrides) -> int:
    """Parameter count of a preset, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return count_parameters(create(name, **overrides))

