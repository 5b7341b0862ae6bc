"""Claims of lesson 02: images become tokens and back exactly; a patch conv is a Linear on patches."""

import pytest
import torch
from torch import nn

from tld.patch import LearnedPosEmbed, PatchEmbed, patchify, sincos_1d, sincos_2d, unpatchify


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 8), 2), ((1, 4, 32, 32), 4), ((3, 1, 6, 10), 2)])
def test_unpatchify_inverts_patchify(shape, p):
    x = torch.randn(shape)
    tokens = patchify(x, p)
    b, c, h, w = shape
    assert tokens.shape == (b, (h // p) * (w // p), p * p * c)
    back = unpatchify(tokens, p, c, height=h, width=w)
    assert torch.equal(back, x)


def test_unpatchify_assumes_a_square_grid_when_no_size_is_given():
    x = torch.randn(2, 3, 12, 12)
    assert torch.equal(unpatchify(patchify(x, 3), 3, 3), x)


def test_patchify_layout_is_row_major_tokens_of_p_p_c():
    b, c, h, w, p = 2, 3, 8, 12, 4
    x = torch.randn(b, c, h, w)
    # cut rows and columns into (grid, within-patch), then put the grid first and the channels last
    manual = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
    assert torch.equal(patchify(x, p), manual)
    # token 1 is the patch at grid row 0, column 1; its first C values are pixel (0, p) of the image
    assert torch.equal(patchify(x, p)[:, 1, :c], x[:, :, 0, p])
    # token (w/p) starts the second grid row
    assert torch.equal(patchify(x, p)[:, w // p, :c], x[:, :, p, 0])


@pytest.mark.parametrize("p,c,d", [(2, 3, 16), (4, 4, 32)])
def test_patch_embed_conv_equals_linear_on_patchify(p, c, d):
    torch.manual_seed(0)
    embed = PatchEmbed(p, c, d)
    x = torch.randn(2, c, 16, 16)
    lin = nn.Linear(p * p * c, d)
    with torch.no_grad():
        # conv weight [D, C, p, p] -> Linear weight [D, p*p*C] in patchify's (p, p, C) order
        lin.weight.copy_(embed.proj.weight.permute(0, 2, 3, 1).reshape(d, -1))
        lin.bias.copy_(embed.proj.bias)
    torch.testing.assert_close(embed(x), lin(patchify(x, p)), rtol=0, atol=1e-6)


def test_sincos_2d_first_half_depends_only_on_column_second_only_on_row():
    gh, gw, dim = 5, 7, 32
    emb = sincos_2d(dim, gh, gw).reshape(gh, gw, dim)
    first, second = emb[..., : dim // 2], emb[..., dim // 2:]
    assert torch.equal(first, first[:1].expand(gh, -1, -1))  # same in every row
    assert torch.equal(second, second[:, :1].expand(-1, gw, -1))  # same in every column
    # and each half really varies along its own axis
    assert not torch.equal(first[0, 0], first[0, 1])
    assert not torch.equal(second[0, 0], second[1, 0])
    torch.testing.assert_close(first[0], sincos_1d(dim // 2, torch.arange(gw)).float())


def test_sincos_2d_matches_diffusers_get_2d_sincos_pos_embed():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    # base_size == grid_size keeps diffusers' positions at 0, 1, ..., grid-1 (as DiT's numpy code)
    ref = embeddings.get_2d_sincos_pos_embed(64, 8, base_size=8, interpolation_scale=1.0, output_type="pt")
    torch.testing.assert_close(sincos_2d(64, 8), ref.float(), rtol=0, atol=1e-6)


def test_sincos_rejects_dimensions_it_cannot_split():
    with pytest.raises(ValueError, match="divisible by 4, got 30"):
        sincos_2d(30, 4)
    with pytest.raises(ValueError, match="even dimension, got 7"):
        sincos_1d(7, torch.arange(3))


def test_learned_pos_embed_adds_one_vector_per_token_and_rejects_wrong_token_count():
    pe = LearnedPosEmbed(16, 8)
    assert pe.weight.shape == (1, 16, 8) and pe.weight.requires_grad
    x = torch.randn(2, 16, 8)
    torch.testing.assert_close(pe(x), x + pe.weight)
    with pytest.raises(ValueError, match="15 tokens.*16"):
        pe(torch.randn(2, 15, 8))


def test_non_divisible_image_size_raises_with_a_suggestion():
    with pytest.raises(ValueError, match="height 30 is not divisible by patch size 4; use 28 or 32"):
        patchify(torch.zeros(1, 3, 30, 32), 4)
    with pytest.raises(ValueError, match="width 30 .* use 28 or 32"):
        PatchEmbed(4, 3, 8)(torch.zeros(1, 3, 32, 30))
    with pytest.raises(ValueError, match="use 3 or 6"):  # smaller than one patch: no zero-size suggestion
        patchify(torch.zeros(1, 3, 2, 6), 3)


def test_bad_shapes_raise_value_errors_that_name_them():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\].*\(3, 8, 8\)"):
        patchify(torch.zeros(3, 8, 8), 2)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(1, 4, 8, 8\)"):
        PatchEmbed(2, 3, 8)(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="token width 12"):
        unpatchify(torch.zeros(1, 16, 12), 2, 4)
    with pytest.raises(ValueError, match="12 tokens do not form a square grid"):
        unpatchify(torch.zeros(1, 12, 12), 2, 3)
    with pytest.raises(ValueError, match="12 tokens do not fill a 4x4"):
        unpatchify(torch.zeros(1, 12, 12), 2, 3, height=8, width=8)
