"""The four families' released checkpoints as tld models, and tld models in their layouts.

``load_official(path_or_state_dict, family=..., preset=...)`` returns the tld model of a U-ViT
(baofff/U-ViT), DiT (facebookresearch/DiT), U-DiT (YuchuanTian/U-DiT) or TLD
(apapiu/transformer_latent_diffusion) checkpoint; ``to_official(model)`` writes a tld model's
weights in its family's reference layout, exactly (the round trip is bit for bit).

The key maps below are written from the reference code's module names (each reference's
``state_dict()``); the key names and shapes of every released file are recorded in
``tld/interop/KEYS.md``, which ``tests/test_interop_official.py`` checks against ``official_shapes``.

Time and label conventions (what each reference network is fed; tld's t is always timestep / 1000,
except TLD whose network already takes its noise level in [0, 1]):

- **U-ViT.** The network embeds a timestep tau with the raw sinusoid. Continuous-time models
  (CIFAR-10 and the ImageNet-256/512 U-ViT-L, VP SDE with beta from 0.1 to 20) are fed tau = 999 t
  for SDE time t in [0, 1]; discrete models (ImageNet-256/512 U-ViT-H, MS-COCO; Stable Diffusion's
  scaled-linear betas 0.00085..0.012) are fed the step n in 1..1000. tld's t = tau / 1000 in both.
  Class models have 1001 label rows: row 1000 is the null class (tld: ``num_classes=1000`` with its
  null row). MS-COCO's null condition is the CLIP encoding of the empty prompt (77 x 768), not zeros.
- **DiT** and **U-DiT.** The network is fed the integer DDPM step k in 0..999 (linear betas
  1e-4..0.02); tld's t = k / 1000. Label 1000 is the null class.
- **TLD.** The network is fed the noise level sigma in [0, 1] of x_t = (1 - sigma) x0 + sigma eps
  (tld's ``rectified`` schedule, t = sigma) and predicts x0; the condition is the pooled CLIP
  ViT-L/14 text embedding (768), and the null condition is the zero vector.

Files are read with safetensors when they are ``.safetensors``, otherwise with
``torch.load(weights_only=True)``: a pickle holding anything but tensors is refused with a message
(no arbitrary object is ever unpickled).
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models import DiT, TLDNet, UDiT, UViT

FAMILIES = ("uvit", "dit", "udit", "tld")
_CLASSES = {"uvit": UViT, "dit": DiT, "udit": UDiT, "tld": TLDNet}


@dataclass(frozen=True)
class OfficialFile:
    """One released checkpoint: where it comes from, and the tld model that holds it."""

    name: str
    family: str
    filename: str
    source: str  # where to download it from
    kwargs: dict = field(default_factory=dict)  # the tld model's constructor arguments
    note: str = ""  # the network's time and label conventions (see the module docstring)


_UVIT = dict(mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False)
_UVIT_DRIVE = "https://drive.google.com/file/d/{}/view (linked from the baofff/U-ViT README, 'Pretrained Models')"
_CONT = "continuous VP SDE (beta 0.1..20), network fed tau = 999 t; noise prediction"
_DISC = "discrete SD scaled-linear betas, network fed the step n in 1..1000; noise prediction"
_DIT = dict(patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_heads=16, num_classes=1000, learn_sigma=True)
_UDIT = dict(img_size=32, in_chans=4, num_classes=1000, learn_sigma=True, rep=True, mlp_ratio=2.0,
             depth=(2, 5, 8, 5, 2))
_UDIT_HUB = "https://huggingface.co/yuchuantian/U-DiT/resolve/main/{}"
_TLD = dict(img_size=32, patch_size=2, in_chans=4, embed_dim=768, depth=12, head_dim=64, mlp_ratio=4.0,
            noise_embed_dim=256, text_dim=768, conv_mlp=True, attn_proj=False, final_norm=False)

OFFICIAL: dict[str, OfficialFile] = {f.name: f for f in [
    # U-ViT (baofff/U-ViT, configs/*.py): each file is the nnet_ema.pth state dict of a run
    OfficialFile("cifar10_uvit_small", "uvit", "cifar10_uvit_small.pth",
                 _UVIT_DRIVE.format("1yoYyuzR_hQYWU0mkTj659tMTnoCWCMv-"),
                 dict(img_size=32, patch_size=2, in_chans=3, embed_dim=512, depth=12, num_heads=8, conv=True, **_UVIT),
                 "U-ViT-S/2, CIFAR-10 pixels, unconditional; " + _CONT),
    OfficialFile("imagenet256_uvit_large", "uvit", "imagenet256_uvit_large.pth",
                 _UVIT_DRIVE.format("1w7T1hiwKODgkYyMH9Nc9JNUThbxFZgs3"),
                 dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1024, depth=20, num_heads=16,
                      num_classes=1000, conv=True, **_UVIT),
                 "U-ViT-L/2, ImageNet-256 SD latents (x 0.18215), null label 1000; " + _CONT),
    OfficialFile("imagenet256_uvit_huge", "uvit", "imagenet256_uvit_huge.pth",
                 _UVIT_DRIVE.format("13StUdrjaaSXjfqqF7M47BzPyhMAArQ4u"),
                 dict(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_heads=16,
                      num_classes=1000, conv=False, **_UVIT),
                 "U-ViT-H/2, ImageNet-256 SD latents (x 0.18215), null label 1000; " + _DISC),
    OfficialFile("imagenet512_uvit_large", "uvit", "imagenet512_uvit_large.pth",
                 _UVIT_DRIVE.format("1mkj4aN2utHMBTWQX9l1nYue9vleL7ZSB"),
                 dict(img_size=64, patch_size=4, in_chans=4, embed_dim=1024, depth=20, num_heads=16,
                      num_classes=1000, conv=True, **_UVIT),
                 "U-ViT-L/4, ImageNet-512 SD latents (x 0.18215), null label 1000; " + _CONT),
    OfficialFile("imagenet512_uvit_huge", "uvit", "imagenet512_uvit_huge.pth",
                 _UVIT_DRIVE.format("1uegr2o7cuKXtf2akWGAN2Vnlrtw5YKQq"),
                 dict(img_size=64, patch_size=4, in_chans=4, embed_dim=1152, depth=28, num_heads=16,
                      num_classes=1000, conv=False, **_UVIT),
                 "U-ViT-H/4, ImageNet-512 SD latents (x 0.18215), null label 1000; " + _DISC),
    OfficialFile("mscoco_uvit_small", "uvit", "mscoco_uvit_small.pth",
                 _UVIT_DRIVE.format("15JsZWRz2byYNU6K093et5e5Xqd4uwA8S"),
                 dict(img_size=32, patch_size=2, in_chans=4, embed_dim=512, depth=12, num_heads=8, text_dim=768,
                      text_len=77, conv=True, **_UVIT),
                 "U-ViT-S/2, MS-COCO SD latents (x 0.23010), 77 CLIP ViT-L/14 tokens, null = the empty "
                 "prompt's tokens; " + _DISC),
    OfficialFile("mscoco_uvit_small_deep", "uvit", "mscoco_uvit_small_deep.pth",
                 _UVIT_DRIVE.format("1gHRy8sn039Wy-iFL21wH8TiheHK8Ky71"),
                 dict(img_size=32, patch_size=2, in_chans=4, embed_dim=512, depth=16, num_heads=8, text_dim=768,
                      text_len=77, conv=True, **_UVIT),
                 "U-ViT-S/2 (deep, depth 16), MS-COCO SD latents (x 0.23010), null = the empty prompt's tokens; "
                 + _DISC),
    # DiT (facebookresearch/DiT, download.py): EMA state dicts
    OfficialFile("DiT-XL-2-256x256", "dit", "DiT-XL-2-256x256.pt",
                 "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", dict(img_size=32, **_DIT),
                 "DiT-XL/2, ImageNet-256 SD latents (x 0.18215); step k in 0..999 (linear betas); null label 1000; "
                 "noise + learned-sigma channels"),
    OfficialFile("DiT-XL-2-512x512", "dit", "DiT-XL-2-512x512.pt",
                 "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", dict(img_size=64, **_DIT),
                 "DiT-XL/2, ImageNet-512 SD latents (x 0.18215); step k in 0..999 (linear betas); null label 1000; "
                 "noise + learned-sigma channels"),
    # U-DiT (YuchuanTian/U-DiT, udit_models.py U_DiT_S/B/L): EMA state dicts with the trainable rep-FFN
    *[OfficialFile(f"U-DiT-{s}-{k}", "udit", f"U-DiT-{s}-{k}.pt", _UDIT_HUB.format(f"U-DiT-{s}-{k}.pt"),
                   dict(embed_dim=c, num_heads=h, **_UDIT),
                   f"U-DiT-{s}, ImageNet-256 SD latents (x 0.18215); step k in 0..999 (linear betas); null label "
                   f"1000; noise + learned-sigma channels")
      for s, c, h, k in [("S", 96, 4, "400k"), ("B", 192, 8, "400k"), ("L", 384, 16, "400k"), ("L", 384, 16, "1000k")]],
    # TLD (apapiu/transformer_latent_diffusion): the released denoiser, and the current code's layout
    OfficialFile("state_dict_378000", "tld", "state_dict_378000.pth",
                 "https://huggingface.co/apapiu/small_ldt/resolve/main/state_dict_378000.pth",
                 dict(cross_heads=4, norm="post", **_TLD),
                 "the released 100M denoiser (app.py config); trained with the reference's original blocks "
                 "(branch legacy_dh_order: post-norm, heads split as (d h), 4 cross-attention heads); "
                 "SDXL VAE latents / 8; noise level sigma in [0, 1]; x0 prediction; null = zero text vector"),
    OfficialFile("tld-current", "tld", "", "a denoiser trained with the reference's current main branch",
                 dict(cross_heads=12, norm="pre", **_TLD),
                 "the current reference blocks (pre-norm, heads split as (h d), D / 64 cross-attention heads); "
                 "same keys and shapes as state_dict_378000, so it is never picked by shape alone"),
]}

# tld presets that are exactly an official file's model
ALIASES = {"uvit-s/2": "cifar10_uvit_small", "uvit-h/2": "imagenet256_uvit_huge", "dit-xl/2": "DiT-XL-2-256x256",
           "udit-s": "U-DiT-S-400k", "udit-b": "U-DiT-B-400k", "udit-l": "U-DiT-L-400k"}


# ---------------------------------------------------------------------------------------------
# Key maps: a tld key -> the reference's key (the inverse comes from the tld model's key list)
# ---------------------------------------------------------------------------------------------


def _rename_uvit(k: str) -> str:
    return "pos_embed" if k == "pos_embed.weight" else k  # the one difference: a bare Parameter


def _rename_dit(k: str) -> str:
    return "y_embedder.embedding_table.weight" if k == "y_embedder.weight" else k


_UDIT_STAGES = {"enc1": "encoder_level_1", "enc2": "encoder_level_2", "mid": "latent", "dec2": "decoder_level_2",
                "dec1": "decoder_level_1"}
_UDIT_TOP = {"stem.": "x_embedder.proj.", "down1.0.": "down1_2.body.0.", "down2.0.": "down2_3.body.0.",
             "up2.0.": "up3_2.body.0.", "up1.0.": "up2_1.body.0.", "fuse2.": "reduce_chan_level2.",
             "fuse1.": "reduce_chan_level1.", "output.": "output.", "final_modulation.": "final_layer.adaLN_modulation.",
             "final_conv.": "final_layer.out_proj."}
_UDIT_ATTN = {"qkv": "to_qkv", "proj": "to_out", "logit_scale": "logit_scale", "downsampler": "downsampler.layer"}
_UDIT_FFN = {"in1": "project_in.0", "in2": "project_in.1", "dw5": "dwconv.0", "dw3": "dwconv.1", "dw1": "dwconv.2",
             "out1": "project_out.0", "out2": "project_out.1",  # the trainable rep-FFN
             "fc1": "project_in", "dwconv": "dwconv", "fc2": "project_out"}  # a merged FFN (the reference's rep=0)


def _rename_udit(k: str) -> str:
    if m := re.fullmatch(r"t_embedders\.(\d)\.(.+)", k):
        return f"t_embedder_{int(m[1]) + 1}.{m[2]}"
    if m := re.fullmatch(r"y_embedders\.(\d)\.weight", k):
        return f"y_embedder_{int(m[1]) + 1}.embedding_table.weight"
    if m := re.fullmatch(r"(enc1|enc2|mid|dec2|dec1)\.(\d+)\.(.+)", k):
        stage, i, rest = _UDIT_STAGES[m[1]], m[2], m[3]
        if r := re.fullmatch(r"adaLN_modulation\.(\d)\.(.+)", rest):
            rest = f"adaLN_modulation{int(r[1]) + 1}.{r[2]}"
        elif r := re.fullmatch(r"attn\.(\d)\.([a-z_]+?)(\.weight|\.bias|)", rest):
            rest = f"attn{int(r[1]) + 1}.{_UDIT_ATTN[r[2]]}{r[3]}"
        elif r := re.fullmatch(r"ffn\.(\d)\.([a-z0-9]+)\.(weight|bias)", rest):
            rest = f"mlp{int(r[1]) + 1}.{_UDIT_FFN[r[2]]}.{r[3]}"
        return f"{stage}.{i}.{rest}"
    for new, old in _UDIT_TOP.items():
        if k.startswith(new):
            return old + k[len(new):]
    return k


_TLD_TOP = {"patch_conv.": "denoiser_trans_block.patchify_and_embed.0.",
            "patch_norm.": "denoiser_trans_block.patchify_and_embed.2.",
            "patch_proj.": "denoiser_trans_block.patchify_and_embed.3.",
            "embed_norm.": "denoiser_trans_block.patchify_and_embed.4.",
            "pos_embed.": "denoiser_trans_block.pos_embed.", "noise_mlp.0.": "fourier_feats.1.",
            "noise_mlp.2.": "fourier_feats.3.", "label_proj.": "label_proj.", "context_norm.": "norm.",
            "out_proj.": "denoiser_trans_block.out_proj.0."}
_TLD_BLOCK = {"attn.qkv.": "self_attention.qkv_linear.", "cross_attn.q.": "cross_attention.q_linear.",
              "cross_attn.kv.": "cross_attention.kv_linear.", "mlp.fc1.": "mlp.mlp.0.", "mlp.dwconv.": "mlp.mlp.1.",
              "mlp.fc2.": "mlp.mlp.3.", "norm1.": "norm1.", "norm2.": "norm2.", "norm3.": "norm3."}


def _rename_tld(k: str) -> str:
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", k):
        for new, old in _TLD_BLOCK.items():
            if m[2].startswith(new):
                return f"denoiser_trans_block.decoder_blocks.{m[1]}.{old}{m[2][len(new):]}"
    for new, old in _TLD_TOP.items():
        if k.startswith(new):
            return old + k[len(new):]
    return k


_RENAME = {"uvit": _rename_uvit, "dit": _rename_dit, "udit": _rename_udit, "tld": _rename_tld}


# ---------------------------------------------------------------------------------------------
# TLD's tensor conversions: pos_embed and 1x1-conv shapes, output channel order, head order
# ---------------------------------------------------------------------------------------------


def _head_order_perm(dim: int, self_heads: int, cross_heads: int) -> torch.Tensor:
    """P with tld_channel[j] = reference_channel[P[j]], for the original TLD's "(d h)" head split.

    The reference's original attention splits a D-vector into heads as (d h): channel c belongs to
    head c % H. tld's attention splits as (h d): head j // (D / H). With no output projection the
    attention writes its heads straight into the residual stream, so the fix is to relabel the
    residual stream's channels: with self-attention's and cross-attention's head counts nested
    (one divides the other), one relabelling groups both kinds of heads into contiguous blocks.
    """
    fine, coarse = max(self_heads, cross_heads), min(self_heads, cross_heads)
    if fine % coarse or dim % fine:
        raise ValueError(f"cannot reorder (d h) heads into (h d) for {self_heads} self- and {cross_heads} "
                         f"cross-attention heads of width {dim}: one head count must divide the other")
    per, dh = fine // coarse, dim // fine  # fine heads per coarse head, channels per fine head
    j = torch.arange(dim)
    g, di = j // dh, j % dh  # tld fine head and channel within it
    r = g // per + (g % per) * coarse  # the reference's fine head that tld's head g holds
    return di * fine + r


def _tld_residual_keys(k: str) -> tuple[bool, bool]:
    """(rows, cols): whether a TLD tensor's rows / columns index the residual stream."""
    if re.fullmatch(r"blocks\.\d+\.norm\d\.(weight|bias)", k) or k in (
            "patch_proj.weight", "patch_proj.bias", "embed_norm.weight", "embed_norm.bias"):
        return True, False  # a vector (or rows) on the residual stream
    if re.fullmatch(r"blocks\.\d+\.(attn\.qkv|cross_attn\.q)\.weight", k):
        return True, True
    if re.fullmatch(r"blocks\.\d+\.cross_attn\.kv\.weight", k):
        return True, False  # its input is the context, not the residual stream
    if re.fullmatch(r"blocks\.\d+\.mlp\.fc1\.weight", k) or k == "out_proj.weight":
        return False, True
    if re.fullmatch(r"blocks\.\d+\.mlp\.fc2\.(weight|bias)", k):
        return True, False
    if k == "pos_embed.weight":
        return False, True
    return False, False


def _permute(x: torch.Tensor, perm: torch.Tensor, rows: bool, cols: bool, inverse: bool) -> torch.Tensor:
    if inverse:
        perm = torch.argsort(perm)
    perm = perm.to(x.device)
    if rows:  # fused projections (q, k, v or k, v) permute each chunk alike
        n = x.shape[0] // perm.numel()
        x = torch.cat([part[perm] for part in x.chunk(n)]) if n > 1 else x[perm]
    if cols:
        x = x[..., perm]
    return x


def _patch_order(model: TLDNet, inverse: bool) -> torch.Tensor:
    """Row order of the output projection: the reference's (c p1 p2) -> tld's (p1 p2 c)."""
    c, p = model.in_chans, model.patch_size
    idx = torch.arange(c * p * p).view(c, p, p).permute(1, 2, 0).reshape(-1)  # tld row -> reference row
    return torch.argsort(idx) if inverse else idx


def _tld_heads(model: TLDNet) -> tuple[int, int, bool]:
    blk = model.blocks[0]
    legacy = blk.norm_kind == "post"  # the original reference: post-norm with (d h) heads
    return blk.attn.num_heads, blk.cross_attn.num_heads, legacy


def _tld_export(model: TLDNet, sd: dict) -> dict:
    hs, hc, legacy = _tld_heads(model)
    perm = _head_order_perm(model.embed_dim, hs, hc) if legacy else None
    out = {}
    for k, v in sd.items():
        if perm is not None:
            v = _permute(v, perm, *_tld_residual_keys(k), inverse=True)
        if k == "out_proj.weight" or k == "out_proj.bias":
            v = v[_patch_order(model, inverse=True).to(v.device)]
        if k == "pos_embed.weight":
            v = v[0]
        if re.fullmatch(r"blocks\.\d+\.mlp\.fc[12]\.weight", k):
            v = v[:, :, None, None]
        out[_rename_tld(k)] = v
    w = sd["noise_mlp.0.weight"]
    out["fourier_feats.0.angular_speeds"] = _tld_speeds(model.noise_embed_dim, w.device).to(w.dtype)
    grid = (model.img_size // model.patch_size) ** 2
    out["denoiser_trans_block.precomputed_pos_enc"] = torch.arange(grid, device=w.device)
    return out


def _tld_speeds(noise_embed_dim: int, device="cpu") -> torch.Tensor:
    """The reference's buffer ``angular_speeds``: 2 pi exp(linspace(log 1, log 1000, dim / 2))."""
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), noise_embed_dim // 2, device=device))
    return 2.0 * torch.pi * freqs


def _tld_import(model: TLDNet, off: dict) -> dict:
    hs, hc, legacy = _tld_heads(model)
    perm = _head_order_perm(model.embed_dim, hs, hc) if legacy else None
    speeds = off["fourier_feats.0.angular_speeds"]
    want = _tld_speeds(model.noise_embed_dim)
    if speeds.device.type != "meta" and not torch.allclose(speeds.float().cpu(), want, rtol=1e-5):
        raise ValueError("fourier_feats.0.angular_speeds is not 2 pi exp(linspace(log 1, log 1000)): this TLD "
                         "denoiser embeds its noise level at other frequencies than tld's TLDNet")
    pos = off["denoiser_trans_block.precomputed_pos_enc"]
    if pos.device.type != "meta" and not torch.equal(pos.cpu(), torch.arange(pos.numel())):
        raise ValueError("denoiser_trans_block.precomputed_pos_enc is not 0, 1, ..., N-1")
    out = {}
    for k in model.state_dict():
        v = off[_rename_tld(k)]
        if re.fullmatch(r"blocks\.\d+\.mlp\.fc[12]\.weight", k):
            v = v[:, :, 0, 0]
        if k == "pos_embed.weight":
            v = v[None]
        if k == "out_proj.weight" or k == "out_proj.bias":
            v = v[_patch_order(model, inverse=False).to(v.device)]
        if perm is not None:
            v = _permute(v, perm, *_tld_residual_keys(k), inverse=False)
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# The tld model of an official file, the official layout of a tld model
# ---------------------------------------------------------------------------------------------


def family_of(model: nn.Module) -> str:
    for fam, cls in _CLASSES.items():
        if isinstance(model, cls):
            return fam
    raise TypeError(f"no official layout for a {type(model).__name__}; expected a tld UViT, DiT, UDiT or TLDNet")


def _check_representable(model: nn.Module, fam: str) -> None:
    """Refuse a tld model the reference code cannot express (its weights would load, its function would not)."""
    problems = []
    if fam == "uvit":
        if model.out_blocks and model.out_blocks[0].skip != "concat":
            problems.append(f"skip={model.out_blocks[0].skip!r} (the reference fuses long skips by concat)")
        if any(type(b.mlp).__name__ == "ConvMlp" for b in model.in_blocks):
            problems.append("conv_mlp=True (the reference's MLP is Linear-GELU-Linear)")
    elif fam == "dit":
        if model.conditioning != "adaln-zero":
            problems.append(f"conditioning={model.conditioning!r}")
        if model.per_block_embedders:
            problems.append("per_block_embedders=True (the reference has one embedder)")
        if model.t_embedder.freq_shift != 0:
            problems.append(f"freq_shift={model.t_embedder.freq_shift} (the reference's sinusoid uses 0)")
        if model.blocks[0].norm2.eps != 1e-6:
            problems.append(f"mlp_norm_eps={model.blocks[0].norm2.eps} (the reference uses 1e-6)")
        if not model.num_classes:
            problems.append("num_classes=0 (the reference DiT is class-conditional)")
    elif fam == "udit":
        if not model.num_classes:
            problems.append("num_classes=0 (the reference U-DiT is class-conditional)")
    elif fam == "tld":
        blk = model.blocks[0]
        if not isinstance(blk.attn.proj, nn.Identity) or not isinstance(model.final_norm, nn.Identity):
            problems.append("attn_proj or final_norm (the reference has neither)")
        if type(blk.mlp).__name__ != "ConvMlp":
            problems.append("conv_mlp=False (the reference's denoiser uses the depthwise-conv MLP)")
        if model.num_classes:
            problems.append("num_classes > 0 (the reference takes pooled text)")
        if blk.attn.num_heads * 64 != model.embed_dim:
            problems.append(f"{blk.attn.num_heads} self-attention heads (the reference's are 64 channels wide)")
    if problems:
        raise ValueError(f"this tld {type(model).__name__} has no {fam} reference layout: " + "; ".join(problems))


def to_official(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a tld U-ViT, DiT, U-DiT or TLDNet as its reference's ``state_dict()`` (exact copies).

    A TLDNet with ``norm="post"`` is written in the released file's layout (the original reference:
    post-norm, (d h) heads); with ``norm="pre"`` in the current reference's ((h d) heads).
    A class U-ViT with a null row writes num_classes + 1 label rows (the reference's num_classes).
    """
    fam = family_of(model)
    _check_representable(model, fam)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if fam == "tld":
        return _tld_export(model, sd)
    return {_RENAME[fam](k): v for k, v in sd.items()}


def official_shapes(model_or_name) -> dict[str, tuple[int, ...]]:
    """The reference state dict's key -> shape of a tld model, an ``OfficialFile`` or an official file's name.

    Built on the meta device: no memory, whatever the size.
    """
    if isinstance(model_or_name, (str, OfficialFile)):
        spec = resolve(model_or_name)
        if spec.name in OFFICIAL and spec.name not in _SHAPES:  # the released files' layouts, computed once
            _SHAPES[spec.name] = official_shapes(_build(spec, device="meta"))
        return dict(_SHAPES[spec.name]) if spec.name in OFFICIAL else official_shapes(_build(spec, device="meta"))
    meta = _build_like(model_or_name)
    return {k: tuple(v.shape) for k, v in to_official(meta).items()}


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def _build(spec: OfficialFile, device=None, **overrides) -> nn.Module:
    with torch.device(device or "cpu"):
        return _CLASSES[spec.family](**{**spec.kwargs, **overrides})


def _build_like(model: nn.Module) -> nn.Module:
    """The model itself when it lives on the meta device, else a meta copy of its structure."""
    if next(model.parameters()).device.type == "meta":
        return model
    return copy.deepcopy(model).to("meta")


def resolve(preset, family: str | None = None) -> OfficialFile:
    """The ``OfficialFile`` of a name (an official file's, a file name, or an equal tld preset)."""
    if isinstance(preset, OfficialFile):
        return preset
    if isinstance(preset, dict):  # a model of the family's reference code at another size
        if family not in FAMILIES:
            raise ValueError(f"a preset given as constructor arguments needs a family, one of {FAMILIES}")
        return OfficialFile("custom", family, "", "", dict(preset), "constructor arguments given by hand")
    name = ALIASES.get(preset, preset)
    for f in OFFICIAL.values():
        if name in (f.name, f.filename) or (f.filename and Path(str(name)).name == f.filename):
            if family and f.family != family:
                raise ValueError(f"{preset!r} is a {f.family} file, not {family}")
            return f
    names = [f.name for f in OFFICIAL.values() if not family or f.family == family]
    raise ValueError(f"unknown official preset {preset!r}; expected one of {', '.join(names)}"
                     f" (or a tld preset among {', '.join(k for k, v in ALIASES.items() if v in names)})")


def _problems(sd: dict, expected: dict) -> list[str]:
    """What keeps ``sd`` from being the expected layout, in key order: missing, wrong shape, unexpected."""
    out = []
    for k, shape in expected.items():
        if k not in sd:
            out.append(f"missing key {k!r} (expected shape {list(shape)})")
        elif tuple(sd[k].shape) != shape:
            out.append(f"key {k!r} has shape {list(sd[k].shape)}, expected {list(shape)}")
    out += [f"unexpected key {k!r} (shape {list(v.shape)})" for k, v in sd.items() if k not in expected]
    return out


def check_layout(sd: dict, spec: OfficialFile) -> None:
    """Raise a ValueError naming the first key of ``sd`` that is missing, of the wrong shape or unexpected."""
    problems = _problems(sd, official_shapes(spec))
    if problems:
        n_missing = sum(p.startswith("missing") for p in problems)
        n_shape = sum(p.startswith("key") for p in problems)
        n_extra = len(problems) - n_missing - n_shape
        hint = _other_family_hint(sd, spec.family)
        raise ValueError(f"not the {spec.family} layout of {spec.name}: {problems[0]} ({n_missing} missing, "
                         f"{n_shape} of the wrong shape, {n_extra} unexpected, of {len(sd)} keys){hint}")


def _other_family_hint(sd: dict, family: str) -> str:
    for f in OFFICIAL.values():
        if f.family != family and not _problems(sd, official_shapes(f)):
            return f"; it matches {f.family} {f.name} (pass family={f.family!r})"
    return ""


def identify(sd: dict, family: str, where: str = "the state dict") -> OfficialFile:
    """The family's first official file whose keys and shapes ``sd`` has, or a ValueError from the closest one."""
    candidates = [f for f in OFFICIAL.values() if f.family == family]
    if not candidates:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    problems = {f.name: _problems(sd, official_shapes(f)) for f in candidates}
    for f in candidates:
        if not problems[f.name]:
            return f
    best = min(candidates, key=lambda f: len(problems[f.name]))
    try:
        check_layout(sd, best)
    except ValueError as e:
        raise ValueError(f"{where} matches no official {family} file; the closest: {e}") from None
    raise AssertionError("unreachable")


def _unwrap(obj, where: str) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: itself, or its EMA / model entry; prefixes of DDP and compile stripped."""
    if isinstance(obj, dict) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("ema", "model_ema", "nnet_ema", "state_dict", "model"):  # DiT/U-DiT train.py, TLD train.py
            if isinstance(obj.get(key), dict) and all(isinstance(v, torch.Tensor) for v in obj[key].values()):
                obj = obj[key]
                break
        else:
            raise ValueError(f"{where} holds no state dict of tensors: its entries are {sorted(map(str, obj))[:8]}")
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a state dict")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict: safetensors for ``.safetensors``, else ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(load_file(str(path)), str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the safe unpickler refuses, the message is the same
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{str(path)!r} cannot be read with torch.load(weights_only=True), which only unpickles tensors and "
            f"plain containers ({first}). tld does not unpickle arbitrary objects. If you trust the file, "
            f"load it yourself, e.g. sd = torch.load(path, weights_only=False)['ema'] (DiT and U-DiT training "
            f"checkpoints also hold the run's argparse args), and pass sd to load_official; or re-save the "
            f"state dict with safetensors.torch.save_file") from e
    return _unwrap(obj, str(path))


def load_official(path_or_state_dict, family: str, preset=None, *, device="cpu", **overrides) -> nn.Module:
    """The tld model holding a released checkpoint (a path, or a state dict already in memory).

    ``family``: ``uvit``, ``dit``, ``udit`` or ``tld``. ``preset``: the official file's name (see
    ``OFFICIAL``: e.g. ``imagenet256_uvit_huge``, ``DiT-XL-2-256x256``, ``U-DiT-L-1000k``,
    ``state_dict_378000``), its file name, or an equal tld preset (``uvit-h/2``, ``dit-xl/2``, ...);
    None picks the family's first file whose keys and shapes all match. ``overrides`` change the
    tld model's constructor arguments that the weights do not fix (``attn_backend``, ``gradient_checkpointing``;
    for TLD, ``norm`` and ``cross_heads`` select the layout: see ``OFFICIAL``).

    Shapes are checked: a ValueError names the first key that is missing, unexpected or of the
    wrong shape (a file of another family or size fails there). The model comes back in eval mode,
    in the file's dtype. Conventions (more in this module's docstring):

    - U-ViT: the network takes tau = 999 t (continuous VP-SDE files) or the step n in 1..1000
      (discrete files); call the tld model at t = tau / 1000. Null class: label 1000 (1001 rows);
      MS-COCO's null is the empty prompt's 77 CLIP tokens.
    - DiT, U-DiT: the network takes the DDPM step k in 0..999; tld's t = k / 1000. Null class: 1000.
    - TLD: the network takes sigma in [0, 1] of x_t = (1 - sigma) x0 + sigma eps, as tld's t
      (``rectified``), and predicts x0; the null condition is the zero text vector.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        sd = read_state_dict(path_or_state_dict)
        where = str(path_or_state_dict)
    else:
        sd = _unwrap(path_or_state_dict, "the state dict")
        where = "the state dict"
    if preset is None:
        spec = identify(sd, family, where)
    else:
        spec = resolve(preset, family)
        check_layout(sd, spec)
    model = _build(spec, device="meta", **overrides)
    if spec.family == "tld":
        new = _tld_import(model, sd)
    else:
        back = {_RENAME[family](k): k for k in model.state_dict()}
        new = {back[k]: v for k, v in sd.items()}
    dtype = next(iter(sd.values())).dtype if sd else torch.float32
    dtype = dtype if dtype.is_floating_point else torch.float32
    with torch.device(device):
        model = _build(spec, **overrides)
    model.load_state_dict({k: v.to(device) for k, v in new.items()}, strict=True)
    return model.to(dtype=dtype).eval()
