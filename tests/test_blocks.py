"""Claims of lesson 03: the attention backends agree, the fused layers are the written-out math."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tld.blocks import (
    Attention,
    Block,
    ConvMlp,
    CrossAttention,
    Mlp,
    attention,
    attention_weights,
    timestep_embedding,
    xformers_available,
    xformers_unavailable_reason,
)


def _qkv(b=2, h=4, n=24, m=24, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g),
            torch.randn(b, h, m, d, generator=g))


def _key_mask(b=2, m=24):
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[0, 5:] = False  # example 0 keeps only its first 5 keys
    mask[1, ::3] = False
    return mask


# --------------------------------------------------------------------------- attention backends

@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_and_math_backends_agree(masked):
    q, k, v = _qkv(m=20)
    mask = _key_mask(m=20) if masked else None
    torch.testing.assert_close(attention(q, k, v, "sdpa", mask=mask), attention(q, k, v, "math", mask=mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not xformers_available(), reason="xformers is not installed")
@pytest.mark.parametrize("masked", [False, True])
def test_xformers_backend_agrees_with_math(masked):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (a.to(device) for a in _qkv(m=24))
    mask = _key_mask(m=24).to(device) if masked else None
    torch.testing.assert_close(attention(q, k, v, "xformers", mask=mask), attention(q, k, v, "math", mask=mask),
                               rtol=1e-4, atol=1e-4)


def test_masked_keys_get_no_weight():
    q, k, v = _qkv(m=20)
    mask = _key_mask(m=20)
    out = attention(q, k, v, "math", mask=mask)
    # the masked keys' values can be anything: the output must not move
    v2 = torch.where(mask[:, None, :, None], v, torch.full_like(v, 1e3))
    torch.testing.assert_close(attention(q, k, v2, "math", mask=mask), out)
    torch.testing.assert_close(attention(q, k, v2, "sdpa", mask=mask), out, rtol=1e-5, atol=1e-5)


def test_attention_weights_rows_are_a_softmax_of_scaled_scores():
    q, k, v = _qkv()
    w = attention_weights(q, k)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    torch.testing.assert_close(w @ v, attention(q, k, v, "math"))


@pytest.mark.skipif(xformers_available(), reason="xformers is installed")
def test_xformers_backend_without_xformers_says_how_to_install_it():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="pip install xformers"):
        attention(q, k, v, "xformers")


def test_a_failed_xformers_import_is_reported_with_its_cause(monkeypatch):
    """A broken install (here: a CUDA library that will not load) must not read as "not installed"."""
    import builtins
    import sys

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "xformers" or name.startswith("xformers."):
            raise ImportError("libcudart.so.12: cannot open shared object file: No such file or directory")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m == "xformers" or m.startswith("xformers.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    assert xformers_available() is False
    why = xformers_unavailable_reason()
    assert why == ("importing xformers failed: ImportError: libcudart.so.12: cannot open shared object file: "
                   "No such file or directory"), why
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"'xformers' is unavailable: importing xformers failed: ImportError: "
                                         r"libcudart\.so\.12.*pip install xformers"):
        attention(q, k, v, "xformers")


def test_an_xformers_without_kernels_is_reported_as_such(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("xformers")
    fake.__version__, fake._has_cpp_library = "0.0.99", False
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", types.ModuleType("xformers.ops"))
    assert xformers_available() is False
    assert "xformers 0.0.99 imports but its C++/CUDA kernels did not load" in xformers_unavailable_reason()
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="kernels did not load"):
        attention(q, k, v, "xformers")


# --------------------------------------------------------------------------- Attention modules

def test_fused_qkv_attention_equals_explicit_per_head_computation():
    torch.manual_seed(0)
    dim, heads, dh = 32, 4, 8
    attn = Attention(dim, heads, qkv_bias=True, backend="sdpa")
    x = torch.randn(2, 10, dim)
    wq, wk, wv = attn.qkv.weight.split(dim)  # the fused weight stacks [Wq; Wk; Wv]
    bq, bk, bv = attn.qkv.bias.split(dim)
    outs = []
    for i in range(heads):
        sl = slice(i * dh, (i + 1) * dh)  # head i owns channels i*dh..(i+1)*dh of q, k and v
        q = x @ wq[sl].T + bq[sl]
        k = x @ wk[sl].T + bk[sl]
        v = x @ wv[sl].T + bv[sl]
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dh), dim=-1)
        outs.append(a @ v)
    ref = attn.proj(torch.cat(outs, dim=-1))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_attention_backends_give_the_same_module_output():
    torch.manual_seed(0)
    a = Attention(32, 4, backend="sdpa")
    b = Attention(32, 4, backend="math")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_attention_without_proj_has_no_output_projection():
    a = Attention(16, 2, proj=False)
    assert isinstance(a.proj, nn.Identity)
    assert sum(p.numel() for p in a.parameters()) == 16 * 48


def test_cross_attention_shapes_mask_and_reference():
    torch.manual_seed(0)
    dim, ctx_dim, heads = 32, 12, 4
    ca = CrossAttention(dim, ctx_dim, heads, backend="math")
    x, ctx = torch.randn(2, 9, dim), torch.randn(2, 5, ctx_dim)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    out = ca(x, ctx, mask=mask)
    assert out.shape == (2, 9, dim)
    # masking context tokens is the same as deleting them
    torch.testing.assert_close(out[:1], ca(x[:1], ctx[:1, :2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], ca(x[1:], ctx[1:]), rtol=1e-5, atol=1e-5)
    # and it is plain SDPA with q from x and k, v from the context
    q = ca.q(x).view(2, 9, heads, -1).transpose(1, 2)
    k, v = ca.kv(ctx).view(2, 5, 2, heads, -1).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 9, dim)
    torch.testing.assert_close(ca(x, ctx), ca.proj(ref), rtol=1e-5, atol=1e-5)
    sd = CrossAttention(dim, ctx_dim, heads, backend="sdpa")
    sd.load_state_dict(ca.state_dict())
    torch.testing.assert_close(sd(x, ctx, mask=mask), out, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- MLPs

def test_conv_mlp_extra_tokens_bypass_the_conv():
    torch.manual_seed(0)
    dim, grid, n_extra = 8, (4, 4), 2
    mlp = ConvMlp(dim, 16, grid, n_extra=n_extra)
    x = torch.randn(1, n_extra + 16, dim)
    out = mlp(x)
    # extras see only themselves: the plain MLP path fc2(act(fc1(x)))
    torch.testing.assert_close(out[:, :n_extra], mlp.fc2(mlp.act(mlp.fc1(x[:, :n_extra]))))
    # perturbing a patch token leaves the extras' outputs bit-identical ...
    x2 = x.clone()
    x2[:, n_extra + 5] += 1.0
    out2 = mlp(x2)
    assert torch.equal(out2[:, :n_extra], out[:, :n_extra])
    # ... and perturbing an extra token leaves every patch token's output bit-identical
    x3 = x.clone()
    x3[:, 0] += 1.0
    out3 = mlp(x3)
    assert torch.equal(out3[:, n_extra:], out[:, n_extra:])
    assert not torch.equal(out3[:, 0], out[:, 0])


def test_conv_mlp_mixes_exactly_the_3x3_neighbourhood():
    torch.manual_seed(0)
    gh, gw, n_extra = 5, 6, 1
    mlp = ConvMlp(8, 16, (gh, gw), n_extra=n_extra)
    x = torch.randn(1, n_extra + gh * gw, 8)
    r, c = 2, 3
    x2 = x.clone()
    x2[:, n_extra + r * gw + c] += 1.0
    changed = (mlp(x2) - mlp(x))[0, n_extra:].abs().amax(-1).reshape(gh, gw) > 0
    expected = torch.zeros(gh, gw, dtype=torch.bool)
    expected[r - 1:r + 2, c - 1:c + 2] = True
    assert torch.equal(changed, expected)
    # a plain MLP changes only the token itself
    plain = Mlp(8, 16)
    moved = (plain(x2) - plain(x))[0].abs().amax(-1) > 0
    assert moved.nonzero().flatten().tolist() == [n_extra + r * gw + c]


def test_conv_mlp_rejects_a_token_count_that_does_not_fill_the_grid():
    mlp = ConvMlp(8, 16, (4, 4), n_extra=1)
    with pytest.raises(ValueError, match="4x4=16 patch tokens after 1 extra, got 15"):
        mlp(torch.randn(1, 16, 8))


# --------------------------------------------------------------------------- Block

def _body(blk, x):
    """The pre-norm block body without any skip: x + Attn(LN x), then + MLP(LN x)."""
    x = x + blk.attn(blk.norm1(x))
    return x + blk.mlp(blk.norm2(x))


def test_block_without_skip_is_pre_norm_residual_and_ignores_a_skip_argument():
    torch.manual_seed(0)
    blk = Block(16, 2)
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(blk(x), _body(blk, x))
    torch.testing.assert_close(blk(x, torch.randn(2, 6, 16)), blk(x))


def test_block_concat_skip_replaces_x_with_linear_of_concat():
    torch.manual_seed(0)
    blk = Block(16, 2, skip="concat")
    x, skip = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    fused = blk.skip_linear(torch.cat([x, skip], dim=-1))  # U-ViT: no residual around the fusion
    torch.testing.assert_close(blk(x, skip), _body(blk, fused))
    assert not torch.allclose(blk(x, skip), _body(blk, x + fused))


def test_block_add_skip_adds_the_shallow_tokens():
    torch.manual_seed(0)
    blk = Block(16, 2, skip="add")
    x, skip = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    assert blk.skip_linear is None
    torch.testing.assert_close(blk(x, skip), _body(blk, x + skip))


def test_block_with_conv_mlp_uses_it():
    blk = Block(16, 2, conv_mlp_grid=(2, 2), n_extra=1)
    assert isinstance(blk.mlp, ConvMlp)
    assert blk(torch.randn(1, 5, 16)).shape == (1, 5, 16)


# --------------------------------------------------------------------------- timestep embedding

def test_timestep_embedding_shape_and_values():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # t = 0: cos = 1, sin = 0
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    args = 250.0 * freqs  # t = 0.25 is integer step 250
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(args), torch.sin(args)]))
    torch.testing.assert_close(timestep_embedding(t, 8, order="sin_cos")[1], torch.cat([torch.sin(args),
                                                                                        torch.cos(args)]))
    odd = timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and torch.equal(odd[:, -1], torch.zeros(3))


# --------------------------------------------------------------------------- bad inputs

def test_bad_arguments_raise_value_errors_that_name_them():
    with pytest.raises(ValueError, match="dim 30 is not divisible by num_heads 4"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="dim 30 is not divisible by num_heads 4"):
        CrossAttention(30, 8, 4)
    with pytest.raises(ValueError, match="'flash'.*sdpa"):
        Attention(32, 4, backend="flash")
    with pytest.raises(ValueError, match="'flash'.*sdpa"):
        CrossAttention(32, 8, 4, backend="flash")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'flash'"):
        attention(q, k, v, "flash")
    with pytest.raises(ValueError, match="'residual'"):
        Block(16, 2, skip="residual")
    with pytest.raises(ValueError, match="'concat'.*pass the shallow tokens"):
        Block(16, 2, skip="concat")(torch.randn(1, 4, 16))
