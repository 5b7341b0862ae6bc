"""diffusers' ``DiTTransformer2DModel`` in and out (lessons 05 and 12).

``load_diffusers_dit`` turns any ``DiTTransformer2DModel`` (the official DiT-XL/2 weights are
published in that format as ``facebook/DiT-XL-2-256``; every DiT trained or fine-tuned in diffusers
is one too) into a tld ``DiT`` with the same outputs; ``to_diffusers_dit`` goes the other way, so a
DiT trained here runs in diffusers' ``DiTPipeline`` with any diffusers scheduler.
Nothing here downloads: pass a model, or a folder on disk.

Times: diffusers' DiT takes the integer DDPM step ``timestep`` in 0..999; tld's DiT takes
t = timestep / 1000 in [0, 1]. Labels: 0..num_classes-1, and num_classes (1000 for ImageNet, the
label ``DiTPipeline`` guides against) is the null class in both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..models.dit import DiT

_EMB = "transformer_blocks.{i}.norm1.emb."
# diffusers' CombinedTimestepLabelEmbeddings -> tld's TimestepEmbedder / Embedding, per block
_EMB_KEYS = {"timestep_embedder.linear_1.weight": "mlp.0.weight", "timestep_embedder.linear_1.bias": "mlp.0.bias",
             "timestep_embedder.linear_2.weight": "mlp.2.weight", "timestep_embedder.linear_2.bias": "mlp.2.bias"}
_TABLE = "class_embedder.embedding_table.weight"
# diffusers has no config field for the sinusoid's frequency shift (it is fixed at 1); to_diffusers_dit
# records a tld DiT's own shift under this config key, and load_diffusers_dit re-applies it from a folder
FREQ_SHIFT_KEY = "tld_freq_shift"


def _set_freq_shift(transformer, shift: float) -> None:
    for blk in transformer.transformer_blocks:
        blk.norm1.emb.time_proj.downscale_freq_shift = shift


def _load_transformer(path):
    from diffusers import DiTTransformer2DModel

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no DiT folder at {str(path)!r}: expected a folder written by save_pretrained "
                                f"(config.json + weights), or a pipeline folder with a transformer/ subfolder")
    if (path / "transformer" / "config.json").exists():  # a whole DiTPipeline folder
        path = path / "transformer"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; expected a DiTTransformer2DModel folder")
    transformer = DiTTransformer2DModel.from_pretrained(str(path))
    shift = json.loads((path / "config.json").read_text()).get(FREQ_SHIFT_KEY)
    if shift is not None:  # written by to_diffusers_dit for a DiT whose shift is not diffusers' 1
        _set_freq_shift(transformer, float(shift))
    return transformer


def _first_differing_embedder(sd: dict, depth: int) -> str | None:
    """The first key of a block i >= 1 whose timestep/label embedder differs from block 0's, or None."""
    e0 = _EMB.format(i=0)
    for i in range(1, depth):
        for k in [k for k in sd if k.startswith(e0)]:
            other = k.replace(e0, _EMB.format(i=i))
            if not torch.equal(sd[k], sd[other]):
                return other
    return None


def load_diffusers_dit(transformer_or_path) -> DiT:
    """A tld DiT with the weights of a diffusers ``DiTTransformer2DModel`` (an instance or a folder).

    Times: diffusers' DiT takes the integer DDPM step ``timestep`` in 0..999; tld takes
    t = timestep / 1000 in [0, 1], so ``model(x, timestep / 1000, y)`` equals
    ``transformer(x, timestep=timestep, class_labels=y).sample``. The null class is label
    num_classes in both (1000 for ImageNet; ``DiTPipeline`` guides against it).

    diffusers differs from the DiT reference in three details that are reproduced here:
    its timestep sinusoid divides by (half - 1) (``freq_shift=1``), its LayerNorm before the
    MLP uses ``config.norm_eps`` (1e-5 by default, not 1e-6), and every block holds its own
    timestep/label embedder (the final layer reads block 0's). The converted official weights
    hold one embedder copied into every block: then the tld DiT keeps one shared embedder, as the
    reference has. A DiT trained or fine-tuned in diffusers has embedders that differ from block
    to block: then the tld DiT is built with ``per_block_embedders=True`` and uses each block's own.
    """
    if isinstance(transformer_or_path, (str, os.PathLike)):
        transformer = _load_transformer(transformer_or_path)
    else:
        transformer = transformer_or_path
    cfg = transformer.config
    for key, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
                      ("attention_bias", True), ("norm_elementwise_affine", False)):
        if cfg[key] != want:
            raise ValueError(f"cannot convert a DiTTransformer2DModel with {key}={cfg[key]!r}; expected {want!r}")
    in_chans = cfg.in_channels
    out_chans = cfg.out_channels or in_chans
    if out_chans not in (in_chans, 2 * in_chans):
        raise ValueError(f"out_channels {out_chans} is neither in_channels {in_chans} nor twice it (learned sigma)")
    dim, depth = cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers
    sd = {k: v.detach() for k, v in transformer.state_dict().items()}
    num_classes = cfg.num_embeds_ada_norm
    table = sd[_EMB.format(i=0) + _TABLE]
    if table.shape[0] != num_classes + 1:
        raise ValueError(f"label table has {table.shape[0]} rows; expected {num_classes} classes + 1 null row")
    shifts = {float(blk.norm1.emb.time_proj.downscale_freq_shift) for blk in transformer.transformer_blocks}
    if len(shifts) != 1:
        raise ValueError(f"the blocks' timestep sinusoids use different frequency shifts {sorted(shifts)}")
    per_block = _first_differing_embedder(sd, depth) is not None

    with torch.device(table.device):
        model = DiT(img_size=cfg.sample_size, patch_size=cfg.patch_size, in_chans=in_chans, embed_dim=dim,
                    depth=depth, num_heads=cfg.num_attention_heads, num_classes=num_classes,
                    learn_sigma=out_chans == 2 * in_chans, freq_shift=shifts.pop(), mlp_norm_eps=cfg.norm_eps,
                    per_block_embedders=per_block)

    e0 = _EMB.format(i=0)
    new = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        **{f"t_embedder.{dst}": sd[e0 + src] for src, dst in _EMB_KEYS.items()},
        "y_embedder.weight": table,
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
        "pos_embed": model.pos_embed.detach(),  # the same fixed 2-D sin-cos (diffusers keeps it as a buffer)
    }
    if per_block:
        for i in range(1, depth):
            ei = _EMB.format(i=i)
            new.update({f"block_t_embedders.{i - 1}.{dst}": sd[ei + src] for src, dst in _EMB_KEYS.items()})
            new[f"block_y_embedders.{i - 1}.weight"] = sd[ei + _TABLE]
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        # diffusers has separate q, k, v projections; tld fuses them (rows q, then k, then v)
        for kind in ("weight", "bias"):
            new[dst + f"attn.qkv.{kind}"] = torch.cat([sd[src + f"attn1.to_{n}.{kind}"] for n in "qkv"])
            new[dst + f"attn.proj.{kind}"] = sd[src + f"attn1.to_out.0.{kind}"]
            new[dst + f"mlp.fc1.{kind}"] = sd[src + f"ff.net.0.proj.{kind}"]
            new[dst + f"mlp.fc2.{kind}"] = sd[src + f"ff.net.2.{kind}"]
            new[dst + f"adaLN_modulation.1.{kind}"] = sd[src + f"norm1.linear.{kind}"]
    model.load_state_dict(new, strict=True)
    return model.to(dtype=table.dtype).eval()


def to_diffusers_dit(model: DiT):
    """A diffusers ``DiTTransformer2DModel`` with the weights of a tld DiT and the same outputs.

    Times: the returned transformer takes diffusers' integer DDPM step ``timestep`` in 0..999,
    where the tld DiT takes t = timestep / 1000, so ``transformer(x, timestep=k, class_labels=y).sample``
    equals ``model(x, k / 1000, y)``. The null class stays label num_classes; ``DiTPipeline``
    guides against label 1000, so guided pipeline sampling needs ``num_classes=1000`` (with
    ``guidance_scale <= 1`` any class count works). An unconditional DiT becomes a one-class
    transformer whose label rows are zero (diffusers' DiT always takes labels).

    The tld DiT must use adaLN-Zero with an MLP ratio of 4 (diffusers' feed-forward) and the
    reference's LayerNorm eps 1e-6 in the attention branch; the MLP's eps becomes
    ``config.norm_eps``. A shared embedder is copied into every block (the layout of the converted
    official weights); ``per_block_embedders`` copies each block's own. diffusers fixes the time
    sinusoid's frequency shift at 1 with no config field: a tld DiT with another shift (the
    reference's 0, every preset) gets it set on the returned instance's blocks and recorded in
    ``config.tld_freq_shift``; ``load_diffusers_dit`` reads it back from a saved folder, but
    diffusers' own ``from_pretrained`` ignores it, so a saved copy reloaded by diffusers alone
    uses shift 1 (an embedding off by a few percent in frequency).
    """
    from diffusers import DiTTransformer2DModel

    if not isinstance(model, DiT):
        raise TypeError(f"to_diffusers_dit converts a tld DiT, got {type(model).__name__}")
    if model.conditioning != "adaln-zero":
        raise ValueError(f"diffusers' DiT is adaLN-Zero; this DiT uses conditioning={model.conditioning!r}")
    blk = model.blocks[0]
    dim, heads, depth = model.embed_dim, blk.attn.num_heads, len(model.blocks)
    if blk.mlp.fc1.out_features != 4 * dim:
        raise ValueError(f"diffusers' DiT feed-forward is 4 x {dim} wide; this DiT's MLP is {blk.mlp.fc1.out_features}")
    if blk.norm1.eps != 1e-6:
        raise ValueError(f"diffusers' DiT uses LayerNorm eps 1e-6 before attention; this DiT uses {blk.norm1.eps}")
    num_classes = model.num_classes or 1
    ref = model.pos_embed
    tr = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=model.in_chans,
                               out_channels=model.out_chans, num_layers=depth, sample_size=model.img_size,
                               patch_size=model.patch_size, num_embeds_ada_norm=num_classes, norm_eps=blk.norm2.eps)
    sd = {k: v.detach() for k, v in model.state_dict().items()}

    def table(i: int) -> torch.Tensor:
        if not model.num_classes:
            return torch.zeros(2, dim, dtype=ref.dtype, device=ref.device)
        return sd["y_embedder.weight" if i == 0 or not model.per_block_embedders else f"block_y_embedders.{i - 1}.weight"]

    new = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = "t_embedder." if i == 0 or not model.per_block_embedders else f"block_t_embedders.{i - 1}."
        new.update({_EMB.format(i=i) + d: sd[emb + s] for d, s in _EMB_KEYS.items()})
        new[_EMB.format(i=i) + _TABLE] = table(i)
        for kind in ("weight", "bias"):
            for n, part in zip("qkv", sd[src + f"attn.qkv.{kind}"].chunk(3)):
                new[dst + f"attn1.to_{n}.{kind}"] = part
            new[dst + f"attn1.to_out.0.{kind}"] = sd[src + f"attn.proj.{kind}"]
            new[dst + f"ff.net.0.proj.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            new[dst + f"ff.net.2.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
            new[dst + f"norm1.linear.{kind}"] = sd[src + f"adaLN_modulation.1.{kind}"]
    tr.load_state_dict({k: v.float() for k, v in new.items()}, strict=True)
    with torch.no_grad():  # the same fixed sin-cos table, in tld's rounding
        tr.pos_embed.pos_embed.copy_(ref.detach().float().cpu())
    shift = float(model.t_embedder.freq_shift)
    if shift != 1.0:
        _set_freq_shift(tr, shift)
        tr.register_to_config(**{FREQ_SHIFT_KEY: shift})
    return tr.to(device=ref.device, dtype=ref.dtype).eval()
