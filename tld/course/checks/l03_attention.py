"""Checkers of lesson 03, attention: scaled dot-product attention and splitting heads."""

from __future__ import annotations

import math

import torch

from ...blocks import Attention, attention
from .common import CheckError, _call, _close, _compare, _gen, _ok, _scalar, checker


@checker("attention")
def check_attention(fn) -> None:
    """``fn(q, k, v) -> softmax(q k^T / sqrt(d)) v`` on [B, H, N, d] (keys may differ in number: M)."""
    g = _gen(4)
    cases = [(1, 2, 7, 8, 5), (3, 1, 4, 32, 9), (2, 4, 10, 16, 10)]  # smallest first
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
    cases = [(3, 4, 8, 1), (1, 7, 12, 3), (2, 5, 16, 4)]  # smallest first
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
                return ("a reshape straight to [B, H, N, d] mixes tokens across heads: each head must take a "
                        "slice of the channels of every token", "split the channels while the tokens are still "
                        "the second axis, then move the heads axis forward")
            return ("each head gets a contiguous slice of D/H channels of every token: head h holds channels "
                    "h*D/H .. (h+1)*D/H - 1",
                    "split the channel axis into two axes (heads, channels per head) first, then move the heads "
                    "axis in front of the tokens")

        got = _call("split_heads", fn, case, q_tokens, h)
        worst = max(worst, _compare("split_heads", got, q_lib, case, atol=1e-6, rtol=1e-6, hint=hint))
    _ok("split_heads", len(cases), "tld.blocks.Attention.qkv_heads", worst)


@checker("masked_attention")
def check_masked_attention(fn) -> None:
    """``fn(q, k, v, key_mask) -> [B, H, N, d]``: attention that ignores the keys where ``key_mask`` [B, M] is
    False (padding), as ``F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])``."""
    g = _gen(24)
    cases = [(1, 1, 2, 4, 3), (2, 2, 5, 8, 6), (3, 4, 7, 16, 9)]
    worst = 0.0
    for b, h, n, d, m in cases:
        q, k, v = (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g),
                   torch.randn(b, h, m, d, generator=g))
        lengths = [m - i % m for i in range(b)] if b > 1 else [m - 1]
        mask = torch.arange(m)[None] < torch.tensor(lengths)[:, None]
        case = f"q {(b, h, n, d)}, k and v {(b, h, m, d)}, real keys per sample {lengths} of {m}"

        def hint(got, exp, q=q, k=k, v=v, mask=mask, d=d):
            s = q @ k.transpose(-2, -1) / math.sqrt(d)
            w = s.softmax(-1) * mask[:, None, None, :]
            if not torch.isfinite(got).all():
                return ("NaN where every key of a sample was masked: True marks the keys to keep (the real tokens), "
                        "False the padding")
            if _close(got, w @ v):
                return ("zeroing the weights after the softmax leaves rows that no longer sum to 1: mask the scores "
                        "before the softmax, so the real keys share all the weight")
            if (~mask).any() and _close(got, s.masked_fill(mask[:, None, None, :], -math.inf).softmax(-1) @ v):
                return "True marks the keys to keep (real tokens), False the padding to ignore"
            if _close(got, s.softmax(-1) @ v):
                return "the padding keys still get weight: a False key must get weight exactly 0"
            return ("masked keys get score -inf before the softmax, so their weight is exactly 0",
                    "broadcast the [B, M] mask over heads and queries with two new axes")

        got = _call("masked_attention", fn, case, q, k, v, mask.clone())
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        worst = max(worst, _compare("masked_attention", got, expected, case, atol=1e-5, rtol=1e-4, hint=hint))
    _ok("masked_attention", len(cases), "F.scaled_dot_product_attention with a key mask", worst)


PEAK_UNSCALED, PEAK_SCALED = (0.75, 1.0), (0.15, 0.35)   # d = 64, 16 keys: measured 0.85 and 0.25


@checker("peak_weight")
def check_peak_weight(fn) -> None:
    """``fn(q, k, scaled) -> float``: the mean over queries of the largest softmax weight, with scores
    q k^T / sqrt(d) when ``scaled`` else q k^T."""
    g = _gen(25)
    found = {}
    for d, scaled in ((4, True), (8, False), (64, True), (64, False)):
        q, k = torch.randn(32, 16, d, generator=g), torch.randn(32, 16, d, generator=g)
        case = f"q and k {(32, 16, d)} of unit-variance numbers, scaled {scaled}"
        s = q @ k.transpose(-2, -1) / (math.sqrt(d) if scaled else 1)
        expected = s.softmax(-1).amax(-1).mean().double()

        def hint(got, exp, q=q, k=k, d=d, scaled=scaled):
            other = q @ k.transpose(-2, -1) / (1 if scaled else math.sqrt(d))
            if _close(got, other.softmax(-1).amax(-1).mean(), 1e-6):
                return "scaled=True divides the scores by sqrt(d) before the softmax; scaled=False does not"
            return ("softmax over the keys (last axis), take each query's largest weight, average over queries",
                    "amax over the last axis, then mean")

        got = _scalar("peak_weight", _call("peak_weight", fn, case, q, k, scaled), case)
        _compare("peak_weight", got, expected, case, atol=1e-6, rtol=1e-6, hint=hint)
        found[(d, scaled)] = got.item()
    unscaled, scaled = found[(64, False)], found[(64, True)]
    if not (PEAK_UNSCALED[0] <= unscaled <= PEAK_UNSCALED[1] and PEAK_SCALED[0] <= scaled <= PEAK_SCALED[1]):
        raise CheckError(f"check_peak_weight: at d = 64 the peaks are {unscaled:.2f} / {scaled:.2f}, outside "
                         f"{PEAK_UNSCALED} / {PEAK_SCALED}")
    _ok("peak_weight", len(found), "softmax(q k^T [/ sqrt d]).amax(-1).mean()", 0.0)
    print(f"  answer: at d = 64 over 16 keys, the largest weight averages {unscaled:.2f} without the scale and "
          f"{scaled:.2f} with it: without 1/sqrt(d) attention is nearly one-hot and its gradients vanish")
