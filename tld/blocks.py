"""Transformer pieces shared by every denoiser (lesson 03).

Attention runs on one of three backends that agree to 1e-5:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
  kernels on GPU, a fused kernel on CPU). The default.
- ``xformers``: ``xformers.ops.memory_efficient_attention``, when xformers is installed.
- ``math``: softmax(q k^T / sqrt(d)) v written out, for teaching and for attention maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")


def xformers_unavailable_reason() -> str:
    """Why the xformers backend cannot run here, or "" when it can: the error importing xformers (not
    installed, or a wheel whose compiled parts fail to load), or "imports but has no kernels" (a wheel
    built for another torch imports fine, then says "xFormers can't load C++/CUDA extensions")."""
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 - whatever stops the import is the reason, reported as is
        return f"importing xformers failed: {type(e).__name__}: {e}"
    if not getattr(xformers, "_has_cpp_library", True):
        return (f"xformers {getattr(xformers, '__version__', '')} imports but its C++/CUDA kernels did not load "
                f"(a build for another torch than {torch.__version__}?)")
    return ""


def xformers_available() -> bool:
    """True when xformers imports *and* its compiled kernels loaded (``xformers_unavailable_reason`` says why not)."""
    return not xformers_unavailable_reason()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on [B, H, N, d] tensors; ``mask`` [B, M] is True where a key is kept."""
    if backend == "sdpa":
        attn_mask = None if mask is None else mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if backend == "math":
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1) @ v
    if backend == "xformers":
        why = xformers_unavailable_reason()
        if why:
            raise ValueError(f"attention backend 'xformers' is unavailable: {why}. It needs the xformers package "
                             f"built for torch {torch.__version__}: pip install xformers")
        import xformers.ops as xops

        bias = None
        if mask is not None:
            b, h, n, m = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            bias = torch.zeros(b, h, n, m, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
        # xformers wants [B, N, H, d]
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) [B, H, N, M]: the attention map, for pictures."""
    return ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(dim=-1)


def _check_heads(dim: int, num_heads: int, backend: str) -> None:
    if dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection.

    ``proj=False`` drops the output projection (the TLD reference has none).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, proj: bool = True,
                 backend: str = "sdpa"):
        super().__init__()
        _check_heads(dim, num_heads, backend)
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim) if proj else nn.Identity()

    def qkv_heads(self, x: torch.Tensor):
        b, n, d = x.shape
        # [B, N, 3, H, d_h] -> three [B, H, N, d_h] views, no copy until the kernel needs one
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv_heads(x)
        out = attention(q, k, v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Queries from the tokens, keys and values from a context sequence (text, or TLD's 2 tokens)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qkv_bias: bool = False,
                 proj: bool = True, backend: str = "sdpa"):
        super().__init__()
        _check_heads(dim, num_heads, backend)
        self.num_heads = num_heads
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim) if proj else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        m, h = context.shape[1], self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        kv = self.kv(context).view(b, m, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = attention(q, kv[0], kv[1], self.backend, mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvMlp(nn.Module):
    """The depthwise-conv MLP of TLD and LocalViT: 1x1 -> depthwise 3x3 -> GELU -> 1x1.

    Tokens are laid back on their (grid_h, grid_w) patch grid for the 3x3 depthwise conv, which
    gives every token its neighbours' information inside the MLP. The first ``n_extra`` tokens
    (time, class, text) are not on the grid: they skip the depthwise conv.
    """

    def __init__(self, dim: int, hidden: int, grid: tuple[int, int], n_extra: int = 0):
        super().__init__()
        self.grid = grid
        self.n_extra = n_extra
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        extra, patches = h[:, : self.n_extra], h[:, self.n_extra:]
        b, n, c = patches.shape
        gh, gw = self.grid
        if n != gh * gw:
            raise ValueError(f"ConvMlp expected {gh}x{gw}={gh * gw} patch tokens after {self.n_extra} extra, got {n}")
        grid = patches.transpose(1, 2).reshape(b, c, gh, gw)
        patches = self.dwconv(grid).flatten(2).transpose(1, 2)
        h = torch.cat([extra, patches], dim=1) if self.n_extra else patches
        return self.fc2(self.act(h))


class Block(nn.Module):
    """Pre-norm ViT block (U-ViT): x + Attn(LN x), then x + MLP(LN x).

    With ``skip`` set, the block first fuses a long skip from the shallow half of the network:
    ``concat``: x = Linear([x, skip]) (U-ViT; replaces x, no residual), ``add``: x = x + skip.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 skip: str | None = None, backend: str = "sdpa", conv_mlp_grid: tuple[int, int] | None = None,
                 n_extra: int = 0):
        super().__init__()
        if skip not in (None, "concat", "add"):
            raise ValueError(f"unknown skip kind {skip!r}; expected None, 'concat' or 'add'")
        self.skip = skip
        self.skip_linear = nn.Linear(2 * dim, dim) if skip == "concat" else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        if conv_mlp_grid is None:
            self.mlp = Mlp(dim, hidden)
        else:
            self.mlp = ConvMlp(dim, hidden, conv_mlp_grid, n_extra=n_extra)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip is not None and skip is None:
            raise ValueError(f"this block fuses a long skip ({self.skip!r}); pass the shallow tokens as skip")
        if self.skip == "concat":
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        elif self.skip == "add":
            x = x + skip
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0,
                       order: str = "cos_sin") -> torch.Tensor:
    """Sinusoidal embedding of times t [B] -> [B, dim] (DDPM / guided-diffusion).

    ``scale`` maps tld's t in [0, 1] onto the integer-step range the references embed
    (t * 1000); frequencies run from 1 down to 1/max_period.
    """
    if order not in ("cos_sin", "sin_cos"):
        raise ValueError(f"unknown order {order!r}; expected 'cos_sin' (DDPM, DiT) or 'sin_cos' (TLD)")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    cos, sin = torch.cos(args), torch.sin(args)
    emb = torch.cat([cos, sin] if order == "cos_sin" else [sin, cos], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def init_vit_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal(0.02) Linear weights, zero biases, unit LayerNorms (ViT / U-ViT init)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# Conditioning blocks: adaLN-Zero (DiT, lesson 05) and cross-attention (TLD, lesson 05)
# ---------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with one (shift, scale) per sample broadcast over tokens.

    ``x`` is [B, N, D] and shift/scale [B, D]. Writing ``1 + scale`` means a zero scale is the
    identity, which is what makes a zero-initialised modulation start as a plain LayerNorm.
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class AdaLNZeroBlock(nn.Module):
    """DiT block: LayerNorms without affine whose shift/scale, and residual gates, come from c.

    SiLU -> Linear(cond_dim, 6D) turns the condition c [B, cond_dim] into (shift, scale, gate)
    for the attention and for the MLP. The Linear is zero-initialised, so every gate is 0 and
    the block starts as the identity (DiT, Peebles & Xie 2023, section 3.2 "adaLN-Zero").
    ``mlp_eps`` lets diffusers' DiT (LayerNorm eps 1e-5 before the MLP) be reproduced exactly.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, cond_dim: int | None = None,
                 eps: float = 1e-6, mlp_eps: float | None = None, backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=True, backend=backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps if mlp_eps is None else mlp_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))
        self.zero_init()

    def zero_init(self) -> None:
        """Zero the modulation: gates 0, so the block is the identity (adaLN-Zero)."""
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class CrossAttentionBlock(nn.Module):
    """TLD block: self-attention -> cross-attention to a context -> MLP, each with a residual.

    ``norm="pre"`` (x = x + f(LN x)) is the TLD reference's current block (apapiu/transformer_latent_diffusion,
    "add pre norm", February 2024) and the usual, easier-to-train choice; ``norm="post"`` (x = LN(x + f(x)))
    is the reference's earlier ``DecoderBlock``.
    ``attn_proj=False`` drops the attention output projections, as the reference does.
    With ``conv_mlp_grid`` the MLP is the depthwise-conv MLP (``ConvMlp``).
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, cross_heads: int | None = None,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, attn_proj: bool = True, norm: str = "pre",
                 conv_mlp_grid: tuple[int, int] | None = None, backend: str = "sdpa"):
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"unknown norm placement {norm!r}; expected 'pre' or 'post'")
        self.norm_kind = norm
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj=attn_proj, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, context_dim, cross_heads or num_heads, qkv_bias=qkv_bias,
                                         proj=attn_proj, backend=backend)
        self.norm3 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = Mlp(dim, hidden) if conv_mlp_grid is None else ConvMlp(dim, hidden, conv_mlp_grid)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_kind == "post":
            x = self.norm1(x + self.attn(x))
            x = self.norm2(x + self.cross_attn(x, context, mask))
            return self.norm3(x + self.mlp(x))
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context, mask)
        return x + self.mlp(self.norm3(x))
