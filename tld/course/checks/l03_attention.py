"""Checkers of lesson 03, attention: scaled dot-product attention and splitting heads."""

from __future__ import annotations

import math

import torch

from ...blocks import Attention, attention
from .common import _call, _close, _compare, _gen, _ok, checker


@checker("attention")
def check_attention(fn) -> None:
    """``fn(q, k, v) -> softmax(q k^T / sqrt(d)) v`` on [B, H, N, d] (keys may differ in number: M)."""
    g = _gen(4)
    cases = [(2, 4, 10, 16, 10), (1, 2, 7, 8, 5), (3, 1, 4, 32, 9)]
    worst = 0.0
    for b, h, n, d, m in cases:
        q, k, v = (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g),
                   torch.randn(b, h, m, d, generator=g))
        case = f"q {(b, h, n, d)}, k and v {(b, h, m, d)}"

        def hint(got, exp, q=q, k=k, v=v, d=d):
            s = q @ k.transpose(-2, -1)
            if _close(got, s.softmax(-1) @ v):
                return "scale the scores by 1 / sqrt(d) before the softmax (Vaswani et al. 2017, eq. 1)"
            if _close(got, (s / d).softmax(-1) @ v):
                return "divide by sqrt(d), not by d"
            if got.shape == exp.shape and _close(got, (s / math.sqrt(d)).softmax(-2) @ v):
                return "softmax over the keys (the last dimension), so each query's weights sum to 1"
            return None

        got = _call("attention", fn, case, q, k, v)
        expected = attention(q, k, v, backend="math")
        worst = max(worst, _compare("attention", got, expected, case, atol=1e-5, rtol=1e-4, hint=hint))
    _ok("attention", len(cases), "tld.blocks.attention (and F.scaled_dot_product_attention)", worst)


@checker("split_heads")
def check_split_heads(fn) -> None:
    """``fn(x, num_heads) -> [B, H, N, D/H]``: cut the channels of tokens [B, N, D] into H heads."""
    g = _gen(11)
    cases = [(2, 5, 16, 4), (1, 7, 12, 3), (3, 4, 8, 1)]
    worst = 0.0
    for b, n, d, h in cases:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(1000, (1,), generator=g)))
            attn = Attention(d, h)
        x = torch.randn(b, n, d, generator=g)
        case = f"x {(b, n, d)}, num_heads {h}"
        with torch.no_grad():
            q_lib = attn.qkv_heads(x)[0]
            q_tokens = attn.qkv(x)[..., :d]  # the query third of the fused projection, [B, N, D]

        def hint(got, exp, q_tokens=q_tokens, b=b, n=n, d=d, h=h):
            if _close(got, q_tokens.reshape(b, h, n, d // h)):
                return ("a reshape straight to [B, H, N, d] mixes tokens across heads: reshape to "
                        "[B, N, H, d] first, then transpose(1, 2)")
            return ("each head gets a contiguous slice of D/H channels of every token: head h holds channels "
                    "h*D/H .. (h+1)*D/H - 1",
                    "split the channel axis into two axes (heads, channels per head) first, then move the heads "
                    "axis in front of the tokens")

        got = _call("split_heads", fn, case, q_tokens, h)
        worst = max(worst, _compare("split_heads", got, q_lib, case, atol=1e-6, rtol=1e-6, hint=hint))
    _ok("split_heads", len(cases), "tld.blocks.Attention.qkv_heads", worst)
