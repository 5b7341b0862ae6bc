"""U-ViT: all inputs are tokens, with long skips (Bao et al., CVPR 2023; lesson 04).

Time, class label (or text) and image patches all enter as tokens of one sequence, with one
learned 1-D position embedding over the whole sequence. Blocks come in a shallow half, a
middle block and a deep half; each deep block fuses the output of its mirror-image shallow
block at its entry, last in first out. Head: LayerNorm -> Linear -> unpatchify -> 3x3 conv.

Token order (the reference's): class models [label, time, patches]; text models
[time, text tokens, patches]; unconditional [time, patches]. The time token is the raw
sinusoid of 1000 * t (no MLP) unless ``mlp_time_embed`` is set.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..blocks import Block, init_vit_weights, timestep_embedding
from ..patch import LearnedPosEmbed, PatchEmbed, check_patchable, unpatchify
from .common import Conditioning, check_inputs


class UViT(Conditioning, nn.Module):
    """A ViT on tokens of time, condition and patches, with long skips (Bao et al. 2023).

    Called as ``model(x, t, cond)``: x [B, in_chans, img_size, img_size], t [B] in [0, 1] (a
    scalar is broadcast), cond [B] labels, [B, text_len, text_dim] text tokens (also [B, text_dim]
    when text_len is 1) or None; returns the prediction [B, in_chans, img_size, img_size].
    The null condition (for guidance and label dropout) is ``self.null_condition(cond)``: the null
    class, label num_classes, for class models; the zero vector of cond's shape for text models.

    Args:
        img_size: height and width of the input (latent) image.
        patch_size: side of the square patches; img_size must be divisible by it.
        in_chans: channels of the input, and of the output (no learned sigma).
        embed_dim: width D of every token.
        depth: nominal number of blocks; the network has depth // 2 shallow blocks, one middle
            block and depth // 2 deep blocks, 2 * (depth // 2) + 1 in all (the reference's count).
        num_heads: attention heads per block; embed_dim must be divisible by it.
        mlp_ratio: MLP hidden width as a multiple of embed_dim.
        qkv_bias: bias on the fused q/k/v projection (off by default, as in the reference).
        num_classes: > 0 makes the model class-conditional: the label embedding is one token,
            placed before the time token ([label, time, patches]). 0 for text or none.
        class_dropout_null: give the label table one extra row, index num_classes, the null class
            that guidance and label dropout need; False builds a model without a null class.
        text_dim: > 0 makes the model text-conditional (exclusive with num_classes): each text
            token [text_dim] goes through a Linear to D and enters after the time token
            ([time, text tokens, patches]).
        text_len: number of text tokens (77 for CLIP); sizes the position embedding.
        conv: end the head (LayerNorm -> Linear -> unpatchify) with a 3x3 conv on the image,
            as the reference does.
        skip: how each deep block fuses its mirror shallow block's output at its entry:
            "concat" is Linear(concat(deep, shallow)) (the reference), "add" is deep + shallow,
            None drops the long skips.
        mlp_time_embed: pass the time sinusoid through Linear(D, 4D) -> SiLU -> Linear(4D, D);
            False (the reference's default) uses the raw sinusoid of 1000 t as the time token.
        conv_mlp: make every MLP the depthwise-conv MLP (1x1 -> depthwise 3x3 -> GELU -> 1x1) on
            the patch grid; the extra tokens (time, label, text) skip the conv.
        attn_backend: the attention kernel, "sdpa" (PyTorch's fused kernels), "xformers"
            (memory-efficient attention, if installed) or "math" (written out; for teaching).
        gradient_checkpointing: recompute block activations in the backward pass to save
            memory (training only).
    """

    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 3, embed_dim: int = 512,
                 depth: int = 12, num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 num_classes: int = 0, class_dropout_null: bool = True, text_dim: int = 0, text_len: int = 77,
                 conv: bool = True, skip: str | None = "concat", mlp_time_embed: bool = False,
                 conv_mlp: bool = False, attn_backend: str = "sdpa", gradient_checkpointing: bool = False):
        super().__init__()
        check_patchable(img_size, img_size, patch_size)
        if num_classes and text_dim:
            raise ValueError("a U-ViT is conditioned on class labels or on text, not both")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.text_dim, self.text_len = text_dim, text_len
        self.gradient_checkpointing = gradient_checkpointing

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        num_patches = grid * grid
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed else nn.Identity()
        )
        self.has_null_class = bool(class_dropout_null)
        if num_classes:
            # one extra row, index num_classes, is the "no label" class for classifier-free guidance
            self.label_emb = nn.Embedding(num_classes + int(class_dropout_null), embed_dim)
            self.extras = 2
        elif text_dim:
            self.context_embed = nn.Linear(text_dim, embed_dim)
            self.extras = 1 + text_len
        else:
            self.extras = 1
        self.pos_embed = LearnedPosEmbed(self.extras + num_patches, embed_dim)

        conv_grid = (grid, grid) if conv_mlp else None
        make = lambda skip_kind: Block(embed_dim, num_heads, mlp_ratio, qkv_bias, skip=skip_kind,
                                       backend=attn_backend, conv_mlp_grid=conv_grid, n_extra=self.extras)
        self.in_blocks = nn.ModuleList([make(None) for _ in range(depth // 2)])
        self.mid_block = make(None)
        self.out_blocks = nn.ModuleList([make(skip) for _ in range(depth // 2)])

        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size * patch_size * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        self.apply(init_vit_weights)

    def _check_inputs(self, x, t, cond):
        t = check_inputs(self, x, t, cond, "U-ViT")
        if self.text_dim and self.text_len == 1 and cond is not None and cond.ndim == 2:
            cond = cond[:, None]  # a pooled text vector [B, D] is one context token
        if self.text_dim and (cond is None or cond.shape[1:] != (self.text_len, self.text_dim)):
            raise ValueError(f"this U-ViT takes text tokens [B, {self.text_len}, {self.text_dim}]"
                             f"{f' or pooled text [B, {self.text_dim}]' if self.text_len == 1 else ''}, got "
                             f"{None if cond is None else tuple(cond.shape)}")
        return t, cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t, cond = self._check_inputs(x, t, cond)
        tokens = self.patch_embed(x)
        time_token = self.time_embed(timestep_embedding(t, self.embed_dim).to(tokens.dtype))[:, None]
        if self.num_classes:
            extra = [self.label_emb(cond)[:, None], time_token]
        elif self.text_dim:
            extra = [time_token, self.context_embed(cond.to(tokens.dtype))]
        else:
            extra = [time_token]
        x = self.pos_embed(torch.cat(extra + [tokens], dim=1))

        run = self._run_block
        skips = []
        for blk in self.in_blocks:
            x = run(blk, x)
            skips.append(x)
        x = run(self.mid_block, x)
        for blk in self.out_blocks:
            x = run(blk, x, skips.pop())  # last in, first out

        x = self.decoder_pred(self.norm(x))[:, self.extras:]
        x = unpatchify(x, self.patch_size, self.in_chans)
        return self.final_layer(x)

    def _run_block(self, blk, x, skip=None):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, skip, use_reentrant=False)
        return blk(x, skip)
