"""U-DiT: a U-shaped DiT whose attention runs on downsampled tokens (Tian et al., NeurIPS 2024; lesson 11).

The network works on feature maps [B, C, H, W] (a 3x3 conv stem, patch size 1) at three
widths: C at H x W, 2C at H/2, 4C at H/4 (PixelUnshuffle down, PixelShuffle up, concat skips
fused by a 1x1 conv). The decoder's last level runs at width 2C, as in the reference.

Attention on downsampled tokens: a depthwise 5x5 conv (plus shortcut) mixes neighbours, then
the map is split into its four stride-2 sub-grids (pixels (2i+a, 2j+b) for a, b in {0, 1}).
Each sub-grid attends only within itself: four attentions over N/4 tokens cost 4 (N/4)^2 =
N^2/4, a quarter of full attention. Queries and keys get RoPE-2D (positions on the sub-grid),
then cosine attention with a learned per-head temperature (init 10, clamped at 100).

The feed-forward is re-parameterisable: trained as 1x1 -> 1x1, GELU, identity + dw5 + dw3 +
dw1, 1x1 -> 1x1 (more parameters, better optimisation), it folds exactly into 1x1, GELU, dw5,
1x1 for inference. ``model.merged()`` returns a new, merged model and never touches the
trained weights (the reference folds into its weights through a detached view on every
``.eval()``, corrupting them).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..blocks import attention
from .common import Conditioning, check_inputs
from .dit import TimestepEmbedder


def layer_norm_2d(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the channels of each pixel of [B, C, H, W], no affine (adaLN supplies it)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=eps).permute(0, 3, 1, 2)


def modulate_2d(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


def rope_2d(x: torch.Tensor, grid_h: int, grid_w: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding on a 2-D grid; x [..., N = grid_h * grid_w, d] row-major.

    Channel pairs (2k, 2k+1) are rotated by angle pos * theta^(-4 floor(k/2) / d), with pos the
    column for even k and the row for odd k (the reference's interleaving of x and y).
    """
    d = x.shape[-1]
    if d % 4:
        raise ValueError(f"RoPE-2D needs a head dimension divisible by 4, got {d}")
    k = torch.arange(d // 2, device=x.device)
    freqs = theta ** (-4 * (k // 2) / d)  # [d/2]
    rows, cols = torch.meshgrid(torch.arange(grid_h, device=x.device), torch.arange(grid_w, device=x.device),
                                indexing="ij")
    pos = torch.where(k % 2 == 0, cols.reshape(-1, 1), rows.reshape(-1, 1))  # [N, d/2]
    angle = pos.float() * freqs.float()
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def split_subgrids(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> [B, factor^2, (H/f)(W/f), C]: sub-grid (a, b) holds pixels (f i + a, f j + b)."""
    return rearrange(x, "b c (h a) (w e) -> b (a e) (h w) c", a=factor, e=factor)


def merge_subgrids(x: torch.Tensor, h: int, w: int, factor: int = 2) -> torch.Tensor:
    """Inverse of ``split_subgrids``: [B, f^2, N/f^2, C] -> [B, C, H, W]."""
    return rearrange(x, "b (a e) (h w) c -> b c (h a) (w e)", a=factor, e=factor, h=h // factor, w=w // factor)


class DownsampledAttention(nn.Module):
    """Self-attention within each stride-2 sub-grid of the map, after a depthwise 5x5 conv + shortcut."""

    def __init__(self, dim: int, num_heads: int, factor: int = 2, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.factor, self.backend = num_heads, factor, backend
        self.downsampler = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        # cosine attention temperature, per head: init 10, at most 100 (Swin-v2 / U-DiT)
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), 10.0).log())
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        f, nh = self.factor, self.num_heads
        if h % f or w % f:
            raise ValueError(f"a {h}x{w} map cannot be split into stride-{f} sub-grids; use a multiple of {f}")
        tokens = split_subgrids(self.downsampler(x) + x, f)  # [B, f^2, N', C]
        q, k, v = self.qkv(tokens).view(b * f * f, -1, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
        q, k = rope_2d(q, h // f, w // f), rope_2d(k, h // f, w // f)
        # cosine similarity times a learned temperature; attention() divides by sqrt(d), so undo that
        temp = self.logit_scale.clamp(max=math.log(100.0)).exp() * q.shape[-1] ** 0.5
        q, k = F.normalize(q, dim=-1) * temp.to(q.dtype), F.normalize(k, dim=-1)
        out = attention(q, k, v, self.backend)  # [B f^2, heads, N', d]
        out = out.transpose(1, 2).reshape(b, f * f, -1, c)
        return self.proj(merge_subgrids(out, h, w, f))


class RepFFN(nn.Module):
    """Training-time FFN: (1x1 -> 1x1), GELU, identity + dw5 + dw3 + dw1, (1x1 -> 1x1).

    Every branch is linear around the one GELU, so ``merged()`` folds it into 1x1, GELU,
    depthwise 5x5, 1x1 with the same output (U-DiT section 3.3).
    """

    def __init__(self, dim: int, ratio: float = 2.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.in1, self.in2 = nn.Conv2d(dim, hidden // 2, 1), nn.Conv2d(hidden // 2, hidden, 1)
        self.dw5 = nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden)
        self.dw3 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.dw1 = nn.Conv2d(hidden, hidden, 1, groups=hidden)
        self.out1, self.out2 = nn.Conv2d(hidden, hidden // 2, 1), nn.Conv2d(hidden // 2, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The branches are folded on the fly (OREPA-style): 3 convolutions instead of 7, the same function and,
        # by the chain rule, the same gradient for every trained weight; ``forward_branches`` is the textbook form
        (w_in, b_in), (kernel, b_dw), (w_out, b_out) = self._folded()
        h = F.gelu(F.conv2d(x, w_in, b_in))
        h = F.conv2d(h, kernel, b_dw, padding=2, groups=kernel.shape[0])
        return F.conv2d(h, w_out, b_out)

    def forward_branches(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN as U-DiT writes it, one convolution per branch (equal to ``forward`` up to rounding)."""
        h = F.gelu(self.in2(self.in1(x)))
        h = h + self.dw5(h) + self.dw3(h) + self.dw1(h)
        return self.out2(self.out1(h))

    def _folded(self):
        """The weights of the equivalent 1x1, depthwise 5x5, 1x1 (differentiable in the trained weights)."""
        def fold_1x1(first: nn.Conv2d, second: nn.Conv2d):
            w1, w2 = first.weight[:, :, 0, 0], second.weight[:, :, 0, 0]
            return (w2 @ w1)[:, :, None, None], w2 @ first.bias + second.bias

        # identity + dw5 + dw3 + dw1 = one dw5 with the smaller kernels (and a 1) added at its centre
        kernel = self.dw5.weight + F.pad(self.dw3.weight, (1, 1, 1, 1)) + F.pad(self.dw1.weight + 1.0, (2, 2, 2, 2))
        bias = self.dw5.bias + self.dw3.bias + self.dw1.bias
        return fold_1x1(self.in1, self.in2), (kernel, bias), fold_1x1(self.out1, self.out2)

    @torch.no_grad()
    def merged(self) -> MergedFFN:
        """A new MergedFFN with the same function; reads this module's weights, never writes them."""
        dim, hidden = self.in1.in_channels, self.dw5.out_channels
        m = MergedFFN(dim, hidden).to(self.dw5.weight)
        for (w, b), conv in zip(self._folded(), (m.fc1, m.dwconv, m.fc2)):
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        return m


class MergedFFN(nn.Module):
    """Inference FFN: 1x1, GELU, depthwise 5x5, 1x1."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dwconv(F.gelu(self.fc1(x))))


class UDiTBlock(nn.Module):
    """Two (downsampled attention, FFN) pairs, each pair adaLN-Zero-modulated by its own Linear."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, rep: bool = True, backend: str = "sdpa"):
        super().__init__()
        ffn = (lambda: RepFFN(dim, mlp_ratio)) if rep else (lambda: MergedFFN(dim, int(dim * mlp_ratio)))
        self.attn = nn.ModuleList([DownsampledAttention(dim, num_heads, backend=backend) for _ in range(2)])
        self.ffn = nn.ModuleList([ffn() for _ in range(2)])
        self.adaLN_modulation = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) for _ in range(2)])

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for attn, ffn, mod in zip(self.attn, self.ffn, self.adaLN_modulation):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod(c).chunk(6, dim=-1)
            x = x + gate_msa[:, :, None, None] * attn(modulate_2d(layer_norm_2d(x), shift_msa, scale_msa))
            x = x + gate_mlp[:, :, None, None] * ffn(modulate_2d(layer_norm_2d(x), shift_mlp, scale_mlp))
        return x


class UDiT(Conditioning, nn.Module):
    """A U-shaped DiT on feature maps whose attention runs on downsampled tokens (Tian et al. 2024).

    Called as ``model(x, t, cond)``: x [B, in_chans, img_size, img_size], t [B] in [0, 1] (a
    scalar is broadcast), cond [B] labels (None when num_classes is 0); returns
    [B, out_chans, img_size, img_size], out_chans = 2 * in_chans with learn_sigma, else in_chans.
    The null condition (for guidance and label dropout) is ``self.null_condition(cond)``: the null
    class, label num_classes, the extra row of every label table.

    Args:
        img_size: height and width of the input (latent) image; divisible by 8 (two 2x
            downsamplings, then stride-2 sub-grids). There is no patch size: a 3x3 conv stem
            makes a C-channel map at full resolution.
        in_chans: channels of the input latent (4 for the SD VAE).
        embed_dim: width C of the first level; the levels are C at H x W, 2C at H/2, 4C at H/4,
            and the decoder's last level stays at 2C (the reference).
        num_heads: attention heads at every level; each width / num_heads must be divisible by 4
            for RoPE-2D.
        depth: blocks in each of the 5 stages (enc1 at C, enc2 at 2C, mid at 4C, dec2 at 2C,
            dec1 at 2C); each block is two adaLN-Zero (downsampled attention, FFN) pairs, the
            attention running within each of the map's four stride-2 sub-grids, with RoPE-2D.
        mlp_ratio: FFN hidden width as a multiple of the level's width.
        num_classes: number of class labels; each level has its own timestep embedder and label
            table (num_classes + 1 rows, row num_classes the null class), summed into its c.
            0 makes the model unconditional.
        learn_sigma: also predict the variance interpolation weights (as DiT): 2 * in_chans
            output channels, the noise prediction first.
        rep: build the re-parameterisable training FFN (1x1 -> 1x1, GELU, identity + dw5 + dw3 +
            dw1, 1x1 -> 1x1); ``merged()`` folds it into 1x1, GELU, dw5, 1x1 for inference.
            False builds the merged FFN directly.
        attn_backend: the attention kernel, "sdpa" (PyTorch's fused kernels), "xformers"
            (memory-efficient attention, if installed) or "math" (written out; for teaching).
        gradient_checkpointing: recompute block activations in the backward pass to save
            memory (training only).
    """

    def __init__(self, img_size: int = 32, in_chans: int = 4, embed_dim: int = 96, num_heads: int = 4,
                 depth: tuple = (2, 5, 8, 5, 2), mlp_ratio: float = 2.0, num_classes: int = 1000,
                 learn_sigma: bool = True, rep: bool = True, attn_backend: str = "sdpa",
                 gradient_checkpointing: bool = False):
        super().__init__()
        if img_size % 8:
            raise ValueError(f"U-DiT needs an image size divisible by 8 (two 2x downsamplings, then "
                             f"stride-2 sub-grids), got {img_size}; use {img_size - img_size % 8 or 8}")
        if len(depth) != 5:
            raise ValueError(f"depth lists blocks of 5 stages (enc1, enc2, mid, dec2, dec1), got {depth}")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.embed_dim, self.rep = embed_dim, rep
        self.out_chans = 2 * in_chans if learn_sigma else in_chans
        self.gradient_checkpointing = gradient_checkpointing
        c = embed_dim
        self.stem = nn.Conv2d(in_chans, c, 3, padding=1)
        # one condition embedder per width (C, 2C, 4C), as in the reference
        widths = (c, 2 * c, 4 * c)
        self.t_embedders = nn.ModuleList([TimestepEmbedder(w) for w in widths])
        self.y_embedders = nn.ModuleList([nn.Embedding(num_classes + 1, w) for w in widths]) if num_classes else None

        def stage(width, n):
            return nn.ModuleList([UDiTBlock(width, num_heads, mlp_ratio, rep, attn_backend) for _ in range(n)])

        self.enc1, self.enc2, self.mid = stage(c, depth[0]), stage(2 * c, depth[1]), stage(4 * c, depth[2])
        self.down1 = nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))
        self.down2 = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1, bias=False), nn.PixelUnshuffle(2))
        self.up2 = nn.Sequential(nn.Conv2d(4 * c, 8 * c, 3, padding=1, bias=False), nn.PixelShuffle(2))
        self.fuse2 = nn.Conv2d(4 * c, 2 * c, 1)
        self.dec2 = stage(2 * c, depth[3])
        self.up1 = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 3, padding=1, bias=False), nn.PixelShuffle(2))
        self.fuse1 = nn.Conv2d(2 * c, 2 * c, 1)  # the last level stays at width 2C (reference)
        self.dec1 = stage(2 * c, depth[4])
        self.output = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(2 * c, 4 * c))
        self.final_conv = nn.Conv2d(2 * c, self.out_chans, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference's DiT-style init: Xavier everywhere, N(0, 0.02) embeddings, adaLN-Zero."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for emb in self.t_embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for emb in self.y_embedders or []:
            nn.init.normal_(emb.weight, std=0.02)
        for blk in self.blocks():
            for mod in blk.adaLN_modulation:
                nn.init.zeros_(mod[-1].weight)
                nn.init.zeros_(mod[-1].bias)
        for layer in (self.final_modulation[-1], self.final_conv):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def blocks(self):
        return [*self.enc1, *self.enc2, *self.mid, *self.dec2, *self.dec1]

    @torch.no_grad()
    def merged(self) -> UDiT:
        """A new U-DiT with every RepFFN folded into a MergedFFN, in eval mode; ``self`` is untouched."""
        if not self.rep:
            return copy.deepcopy(self).eval()
        new = copy.deepcopy(self)
        for blk in new.blocks():
            blk.ffn = nn.ModuleList([f.merged() for f in blk.ffn])
        new.rep = False
        return new.eval()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = check_inputs(self, x, t, cond, "U-DiT")
        c1, c2, c3 = [emb(t) + (self.y_embedders[i](cond) if self.num_classes else 0)
                      for i, emb in enumerate(self.t_embedders)]
        h = self.stem(x)
        for blk in self.enc1:
            h = self._run(blk, h, c1)
        skip1 = h
        h = self.down1(h)
        for blk in self.enc2:
            h = self._run(blk, h, c2)
        skip2 = h
        h = self.down2(h)
        for blk in self.mid:
            h = self._run(blk, h, c3)
        h = self.fuse2(torch.cat([self.up2(h), skip2], dim=1))
        for blk in self.dec2:
            h = self._run(blk, h, c2)
        h = self.fuse1(torch.cat([self.up1(h), skip1], dim=1))
        for blk in self.dec1:
            h = self._run(blk, h, c2)
        h = self.output(h)
        shift, scale = self.final_modulation(c2).chunk(2, dim=-1)
        return self.final_conv(modulate_2d(layer_norm_2d(h), shift, scale))

    def _run(self, blk, h, c):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, h, c, use_reentrant=False)
        return blk(h, c)

