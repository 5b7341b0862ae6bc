"""DiT: a plain transformer on patches, conditioned by adaLN-Zero (Peebles & Xie, ICCV 2023; lesson 05).

The condition is one vector per image, c = MLP(sinusoid(1000 t)) + label embedding, and it
enters every block through the LayerNorms: SiLU -> Linear gives a shift, a scale and a residual
gate for the attention and for the MLP (``tld.blocks.AdaLNZeroBlock``). The modulation Linears
and the output Linear start at zero, so every block starts as the identity and the untrained
model outputs exactly zero. Patches carry a fixed 2-D sin-cos position embedding, kept as a
frozen parameter so the counts match the paper's (675,129,632 for DiT-XL/2).

``conditioning="in-context"`` is the paper's simplest alternative (section 3.2): the time and
label vectors are two extra tokens in the sequence of plain ViT blocks. Lesson 05 trains both.

With ``learn_sigma`` the output has 2 * in_chans channels: the noise prediction, then the
interpolation weights of the learned variance (Nichol & Dhariwal 2021); a sampler that only
wants the noise takes ``out[:, :in_chans]``.

``per_block_embedders=True`` gives every block its own timestep and label embedders, the layout
of diffusers' ``DiTTransformer2DModel`` (each of its blocks holds a ``CombinedTimestepLabelEmbeddings``),
so that a DiT trained or fine-tuned in diffusers loads exactly (``tld.interop.load_diffusers_dit``).
The reference DiT, and every preset, has one shared embedder (the default).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..blocks import AdaLNZeroBlock, Block, modulate
from ..patch import PatchEmbed, check_patchable, sincos_2d, unpatchify
from .common import Conditioning, check_inputs


def dit_timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                           freq_shift: float = 0.0) -> torch.Tensor:
    """[cos, sin] of 1000 t at frequencies max_period^(-i / (dim/2 - freq_shift)) -> [B, dim].

    DiT's reference uses ``freq_shift=0``; diffusers' DiT uses ``freq_shift=1`` (its
    ``Timesteps(downscale_freq_shift=1)``), which the diffusers interop must reproduce.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = (t.float() * 1000.0)[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoid of the integer-step time 1000 t -> Linear-SiLU-Linear."""

    def __init__(self, dim: int, freq_dim: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.freq_dim, self.freq_shift = freq_dim, freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = dit_timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) -> Linear to p*p*out channels per token; zero-initialised."""

    def __init__(self, dim: int, patch_size: int, out_chans: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_chans)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(Conditioning, nn.Module):
    """A diffusion transformer on latent patches, conditioned by adaLN-Zero (Peebles & Xie 2023).

    Called as ``model(x, t, cond)``: x [B, in_chans, img_size, img_size], t [B] in [0, 1] (a
    scalar is broadcast), cond [B] labels (None when num_classes is 0); returns
    [B, out_chans, img_size, img_size], out_chans = 2 * in_chans with learn_sigma, else in_chans.
    The null condition (for guidance and label dropout) is ``self.null_condition(cond)``: the null
    class, label num_classes, the extra row of the label table.

    Args:
        img_size: height and width of the input (latent) image; 32 for 256 px images through the
            SD VAE, as in the paper.
        patch_size: side of the square patches; img_size must be divisible by it (the /2 of DiT-XL/2).
        in_chans: channels of the input latent (4 for the SD VAE).
        embed_dim: width D of every token and of the condition vector c; divisible by 4 for the
            fixed 2-D sin-cos position embedding of the patches.
        depth: number of transformer blocks.
        num_heads: attention heads per block; embed_dim must be divisible by it.
        mlp_ratio: MLP hidden width as a multiple of embed_dim.
        num_classes: number of class labels; the label table has num_classes + 1 rows (row
            num_classes is the null class) and c = timestep embedding + label embedding.
            0 makes the model unconditional (c is the timestep embedding alone).
        learn_sigma: also predict the variance interpolation weights (Nichol & Dhariwal 2021):
            2 * in_chans output channels, the noise prediction first.
        conditioning: "adaln-zero" (the paper's choice: c modulates every block's LayerNorms and
            gates) or "in-context" (time and label vectors as two extra tokens of plain ViT
            blocks, paper section 3.2).
        freq_shift: the timestep sinusoid's frequency shift: 0 in DiT's reference, 1 in diffusers'
            DiT (``downscale_freq_shift=1``), for loading its weights exactly.
        per_block_embedders: one timestep embedder and one label table per block (diffusers'
            layout). Block 0 and the final layer use ``t_embedder`` / ``y_embedder`` (diffusers' final
            layer reads block 0's); block i >= 1 uses ``block_t_embedders[i - 1]`` and
            ``block_y_embedders[i - 1]``. False (the reference, every preset): one shared embedder.
        mlp_norm_eps: eps of the LayerNorm before each adaLN-Zero block's MLP: 1e-6 in the
            reference, 1e-5 reproduces diffusers' DiT.
        attn_backend: the attention kernel, "sdpa" (PyTorch's fused kernels), "xformers"
            (memory-efficient attention, if installed) or "math" (written out; for teaching).
        gradient_checkpointing: recompute block activations in the backward pass to save
            memory (training only).
    """

    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 4, embed_dim: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 learn_sigma: bool = True, conditioning: str = "adaln-zero", freq_shift: float = 0.0,
                 mlp_norm_eps: float = 1e-6, per_block_embedders: bool = False, attn_backend: str = "sdpa",
                 gradient_checkpointing: bool = False):
        super().__init__()
        if conditioning not in ("adaln-zero", "in-context"):
            raise ValueError(f"unknown DiT conditioning {conditioning!r}; expected 'adaln-zero' or 'in-context'")
        if per_block_embedders and conditioning != "adaln-zero":
            raise ValueError("per_block_embedders needs conditioning='adaln-zero' (in-context blocks take no condition)")
        check_patchable(img_size, img_size, patch_size)
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.learn_sigma = learn_sigma
        self.out_chans = 2 * in_chans if learn_sigma else in_chans
        self.conditioning = conditioning
        self.per_block_embedders = bool(per_block_embedders)
        self.gradient_checkpointing = gradient_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        # fixed, not learned; a frozen Parameter (as in the reference) so checkpoints and counts carry it
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid)[None], requires_grad=False)
        self.t_embedder = TimestepEmbedder(embed_dim, freq_shift=freq_shift)
        # row num_classes is the null label, used for classifier-free guidance
        self.y_embedder = nn.Embedding(num_classes + 1, embed_dim) if num_classes else None
        if self.per_block_embedders:  # blocks 1 .. depth-1; block 0 uses the two above
            self.block_t_embedders = nn.ModuleList([TimestepEmbedder(embed_dim, freq_shift=freq_shift)
                                                    for _ in range(depth - 1)])
            self.block_y_embedders = (nn.ModuleList([nn.Embedding(num_classes + 1, embed_dim) for _ in range(depth - 1)])
                                      if num_classes else None)

        if conditioning == "adaln-zero":
            self.blocks = nn.ModuleList([
                AdaLNZeroBlock(embed_dim, num_heads, mlp_ratio, mlp_eps=mlp_norm_eps, backend=attn_backend)
                for _ in range(depth)])
            self.final_layer = FinalLayer(embed_dim, patch_size, self.out_chans)
        else:
            self.extras = 2 if num_classes else 1
            self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, backend=attn_backend)
                                         for _ in range(depth)])
            self.norm = nn.LayerNorm(embed_dim)
            self.head = nn.Linear(embed_dim, patch_size * patch_size * self.out_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier-uniform Linears, N(0, 0.02) embeddings, then zero the adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight  # the patch conv is a Linear on flattened patches
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for table in [self.y_embedder, *(getattr(self, "block_y_embedders", None) or [])]:
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
        for emb in [self.t_embedder, *getattr(self, "block_t_embedders", [])]:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        if self.conditioning == "adaln-zero":
            # adaLN-Zero: every gate starts at 0, so each block is the identity (DiT section 3.2)
            for blk in self.blocks:
                blk.zero_init()
            for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        else:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def condition(self, t: torch.Tensor, cond: torch.Tensor | None, block: int = 0) -> torch.Tensor:
        """c = t_embedder(t) + y_embedder(label): the vector the blocks and the final layer are modulated by.

        With ``per_block_embedders``, ``block`` i >= 1 gets its own embedders' vector; block 0's is
        also the final layer's.
        """
        if block and self.per_block_embedders:
            c = self.block_t_embedders[block - 1](t)
            return c + self.block_y_embedders[block - 1](cond) if self.num_classes else c
        c = self.t_embedder(t)
        return c + self.y_embedder(cond) if self.num_classes else c

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = check_inputs(self, x, t, cond, "DiT")
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.condition(t, cond).to(tokens.dtype)
        if self.conditioning == "adaln-zero":
            for i, blk in enumerate(self.blocks):
                c_i = self.condition(t, cond, i).to(tokens.dtype) if i and self.per_block_embedders else c
                tokens = self._run(blk, tokens, c_i)
            out = self.final_layer(tokens, c)
        else:
            extra = [self.t_embedder(t)[:, None].to(tokens.dtype)]
            if self.num_classes:
                extra.append(self.y_embedder(cond)[:, None])
            tokens = torch.cat(extra + [tokens], dim=1)
            for blk in self.blocks:
                tokens = self._run(blk, tokens)
            out = self.head(self.norm(tokens))[:, self.extras:]
        return unpatchify(out, self.patch_size, self.out_chans)

    def _run(self, blk, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

