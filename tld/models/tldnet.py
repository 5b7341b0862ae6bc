"""The TLD denoiser (apapiu/transformer_latent_diffusion; lessons 05 and 09).

Conditioning by cross-attention to two tokens: the noise level's sinusoidal embedding (after
an MLP) and the pooled text embedding (after a Linear), LayerNorm'd together into a 2-token
context. Every block is self-attention -> cross-attention to that context -> depthwise-conv MLP
(1x1, depthwise 3x3, GELU, 1x1: the 3x3 lets neighbouring patches talk inside the MLP, against
blocky, patchy samples). Patches enter through Conv(C -> C p^2, stride p) -> LayerNorm ->
Linear -> LayerNorm, plus a learned 1-D position embedding.

The reference predicts x0 under the ``rectified`` schedule x_t = (1 - sigma) x0 + sigma eps,
with sigma ~ Beta(1, 2.5): train it with ``schedule=rectified prediction=x0``. Here the model
is told t, and for ``rectified`` t is sigma.

Reference choices kept in ``tld-100m`` (101,164,352 parameters): pre-norm blocks (the reference's
current ``tld/transformer_blocks.py``, since its February 2024 commit "add pre norm"; earlier versions
were post-norm), no attention output projection, no final norm, and embed_dim // 64 = 12 cross-attention
heads like the self-attention's (the released ``state_dict_378000.pth`` was trained with the earlier blocks:
post-norm and 4 cross heads; ``tld.interop.load_official`` reads it so). Options:
``norm="post"`` (the earlier reference, same parameter count), ``attn_proj=True``, ``final_norm=True``,
``conv_mlp=False`` (the plain MLP, for lesson 05). The class default stays ``norm="post"``: the course
presets and the shipped ``shapes-t2i`` were trained with it, and their saved configs do not name it.

Conditions: ``text_dim`` > 0 takes pooled text [B, text_dim] (``None`` is the null condition,
the zero vector, as in the reference's guidance dropout); ``num_classes`` > 0 takes labels [B]
through an embedding table whose row ``num_classes`` is the null class.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..blocks import CrossAttentionBlock
from ..patch import LearnedPosEmbed, check_patchable, unpatchify
from .common import Conditioning, check_inputs


def noise_embedding(sigma: torch.Tensor, dim: int, min_freq: float = 1.0, max_freq: float = 1000.0) -> torch.Tensor:
    """[sin, cos] of 2 pi f sigma for dim/2 frequencies f log-spaced in [min_freq, max_freq] -> [B, dim]."""
    freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2, device=sigma.device))
    args = 2 * math.pi * freqs[None] * sigma.float()[:, None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class TLDNet(Conditioning, nn.Module):
    """The TLD denoiser: patch tokens cross-attending to a 2-token [noise level, condition] context.

    Called as ``model(x, t, cond)``: x [B, in_chans, img_size, img_size], t [B] in [0, 1] (a
    scalar is broadcast; sigma under ``rectified``), cond pooled text [B, text_dim] (None reads
    as the zero vector) or, with num_classes, labels [B]; returns [B, in_chans, img_size, img_size].
    The null condition (for guidance and label dropout) is ``self.null_condition(cond)``: the zero
    vector [B, text_dim] for text models (the reference's); the null class, label num_classes,
    for class models.

    Args:
        img_size: height and width of the input (latent) image.
        patch_size: side of the square patches; img_size must be divisible by it. Patches enter
            through Conv(C -> C p^2, stride p) -> LayerNorm -> Linear -> LayerNorm, plus a
            learned 1-D position embedding over the (img_size / p)^2 tokens.
        in_chans: channels of the input, and of the output.
        embed_dim: width D of the patch tokens and of the two context tokens; divisible by head_dim.
        depth: number of blocks, each self-attention -> cross-attention to the context -> MLP.
        head_dim: channels per self-attention head: embed_dim // head_dim heads.
        cross_heads: number of cross-attention heads (keys and values: the 2 context tokens);
            4 in the reference.
        mlp_ratio: MLP hidden width as a multiple of embed_dim.
        noise_embed_dim: width of the noise-level sinusoid ([sin, cos] of 2 pi f t, f log-spaced
            in [1, 1000]), mapped by Linear -> GELU -> Linear to D: the first context token.
        text_dim: width of the pooled text embedding (768 for CLIP ViT-L/14), mapped by a Linear
            to D: the second context token. Ignored when num_classes > 0.
        num_classes: > 0 replaces the text by class labels: a table of num_classes + 1 rows
            (row num_classes the null class) gives the second context token.
        conv_mlp: the depthwise-conv MLP (1x1 -> depthwise 3x3 -> GELU -> 1x1 on the patch grid,
            against blocky samples); False is the plain Linear -> GELU -> Linear (lesson 05).
        norm: "pre" (x = x + f(LN x): the reference's current blocks, and ``tld-100m``'s) or "post"
            (x = LN(x + f(x)): the reference before February 2024, and the course presets'). The
            same LayerNorms either way, so the same parameter count.
        attn_proj: keep the attention output projections; the reference has none.
        final_norm: a LayerNorm before the output Linear; the reference has none.
        attn_backend: the attention kernel, "sdpa" (PyTorch's fused kernels), "xformers"
            (memory-efficient attention, if installed) or "math" (written out; for teaching).
        gradient_checkpointing: recompute block activations in the backward pass to save
            memory (training only).
    """

    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 4, embed_dim: int = 768,
                 depth: int = 12, head_dim: int = 64, cross_heads: int = 4, mlp_ratio: float = 4.0,
                 noise_embed_dim: int = 256, text_dim: int = 768, num_classes: int = 0, conv_mlp: bool = True,
                 norm: str = "post", attn_proj: bool = False, final_norm: bool = False,
                 attn_backend: str = "sdpa", gradient_checkpointing: bool = False):
        super().__init__()
        check_patchable(img_size, img_size, patch_size)
        if embed_dim % head_dim:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by head_dim {head_dim}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.noise_embed_dim = embed_dim, noise_embed_dim
        self.num_classes = num_classes
        self.text_dim = 0 if num_classes else text_dim
        self.gradient_checkpointing = gradient_checkpointing
        grid = img_size // patch_size
        patch_dim = in_chans * patch_size * patch_size

        self.patch_conv = nn.Conv2d(in_chans, patch_dim, patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(patch_dim)
        self.patch_proj = nn.Linear(patch_dim, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.pos_embed = LearnedPosEmbed(grid * grid, embed_dim)

        self.noise_mlp = nn.Sequential(nn.Linear(noise_embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        if num_classes:
            self.label_embed = nn.Embedding(num_classes + 1, embed_dim)
        else:
            self.label_proj = nn.Linear(text_dim, embed_dim)
        self.context_norm = nn.LayerNorm(embed_dim)

        self.blocks = nn.ModuleList([
            CrossAttentionBlock(embed_dim, embed_dim, embed_dim // head_dim, cross_heads, mlp_ratio,
                                attn_proj=attn_proj, norm=norm, conv_mlp_grid=(grid, grid) if conv_mlp else None,
                                backend=attn_backend)
            for _ in range(depth)])
        self.final_norm = nn.LayerNorm(embed_dim) if final_norm else nn.Identity()
        self.out_proj = nn.Linear(embed_dim, patch_dim)

    def context(self, t: torch.Tensor, cond: torch.Tensor | None, batch: int, dtype) -> torch.Tensor:
        """The 2-token context [noise-level embedding, condition embedding], LayerNorm'd: [B, 2, D]."""
        noise = self.noise_mlp(noise_embedding(t, self.noise_embed_dim).to(dtype))
        if self.num_classes:
            label = self.label_embed(cond)
        else:
            if cond is None:
                cond = torch.zeros(batch, self.text_dim, device=t.device, dtype=dtype)  # the null condition
            if cond.shape != (batch, self.text_dim):
                raise ValueError(f"this TLDNet takes pooled text embeddings [B, {self.text_dim}], got {tuple(cond.shape)}")
            label = self.label_proj(cond.to(dtype))
        return self.context_norm(torch.stack([noise, label], dim=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = check_inputs(self, x, t, cond, "TLDNet")
        tokens = self.patch_conv(x).flatten(2).transpose(1, 2)
        tokens = self.pos_embed(self.embed_norm(self.patch_proj(self.patch_norm(tokens))))
        ctx = self.context(t, cond, x.shape[0], tokens.dtype)
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, ctx, use_reentrant=False)
            else:
                tokens = blk(tokens, ctx)
        out = self.out_proj(self.final_norm(tokens))
        return unpatchify(out, self.patch_size, self.in_chans)

