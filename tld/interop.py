"""Other libraries' models as tld models (lessons 05 and 12).

``load_diffusers_dit`` turns a diffusers ``DiTTransformer2DModel`` (the official DiT-XL/2
weights are published in that format as ``facebook/DiT-XL-2-256``) into a ``tld`` DiT.
Nothing here downloads: pass a model, or a folder on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .models.dit import DiT


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
    return DiTTransformer2DModel.from_pretrained(str(path))


def load_diffusers_dit(transformer_or_path) -> DiT:
    """A tld DiT with the weights of a diffusers ``DiTTransformer2DModel`` (an instance or a folder).

    Times: diffusers' DiT takes the integer DDPM step ``timestep`` in 0..999; tld takes
    t = timestep / 1000 in [0, 1], so ``model(x, timestep / 1000, y)`` equals
    ``transformer(x, timestep=timestep, class_labels=y).sample``.

    diffusers differs from the DiT reference in two details that are reproduced here:
    its timestep sinusoid divides by (half - 1) (``freq_shift=1``) and its LayerNorm before
    the MLP uses ``config.norm_eps`` (1e-5 by default, not 1e-6). It also stores one copy
    of the timestep/label embedder per block; DiT has one, so all copies must be equal (they
    are in the official weights).
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
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    sd = {k: v.detach() for k, v in transformer.state_dict().items()}
    num_classes = cfg.num_embeds_ada_norm
    table = sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]
    if table.shape[0] != num_classes + 1:
        raise ValueError(f"label table has {table.shape[0]} rows; expected {num_classes} classes + 1 null row")

    with torch.device(table.device):
        model = DiT(img_size=cfg.sample_size, patch_size=cfg.patch_size, in_chans=in_chans, embed_dim=dim,
                    depth=cfg.num_layers, num_heads=cfg.num_attention_heads, num_classes=num_classes,
                    learn_sigma=out_chans == 2 * in_chans, freq_shift=1.0, mlp_norm_eps=cfg.norm_eps)

    emb = "transformer_blocks.{i}.norm1.emb."
    for i in range(1, cfg.num_layers):
        for k in [k for k in sd if k.startswith(emb.format(i=0))]:
            other = k.replace(emb.format(i=0), emb.format(i=i))
            if not torch.equal(sd[k], sd[other]):
                raise ValueError(f"block {i}'s timestep/label embedder differs from block 0's ({other}); "
                                 f"DiT has a single embedder, so they must be equal")
    e0 = emb.format(i=0)
    new = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd[e0 + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[e0 + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[e0 + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[e0 + "timestep_embedder.linear_2.bias"],
        "y_embedder.weight": table,
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
        "pos_embed": model.pos_embed.detach(),  # the same fixed 2-D sin-cos (diffusers keeps it as a buffer)
    }
    for i in range(cfg.num_layers):
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
