"""The TLD denoiser (tld/models/tldnet.py) and the cross-attention block (tld/blocks.py)."""

import pytest
import torch

from tld.blocks import CrossAttentionBlock
from tld.models import count_on_meta, create
from tld.models.tldnet import TLDNet, noise_embedding


def test_tld_100m_counts_the_reference():
    assert count_on_meta("tld-100m") == 101_164_352


def test_tld_improvement_options_add_exactly_their_parameters():
    d, depth = 768, 12
    base = count_on_meta("tld-100m")
    assert count_on_meta("tld-100m", final_norm=True) == base + 2 * d
    assert count_on_meta("tld-100m", attn_proj=True) == base + depth * 2 * (d * d + d)
    # the plain MLP has no depthwise 3x3 (9 weights + 1 bias per hidden channel)
    assert count_on_meta("tld-100m", conv_mlp=False) == base - depth * 4 * d * 10


def test_noise_embedding_is_sin_then_cos_at_log_spaced_frequencies():
    sigma = torch.tensor([0.0, 0.1])
    emb = noise_embedding(sigma, 8)
    assert torch.equal(emb[0], torch.cat([torch.zeros(4), torch.ones(4)]))
    # lowest frequency 1, highest 1000: angles 2 pi * 0.1 and 2 pi * 100
    torch.testing.assert_close(emb[1, 0], torch.sin(torch.tensor(0.2 * torch.pi)))
    torch.testing.assert_close(emb[1, 3], torch.sin(torch.tensor(200 * torch.pi)), atol=1e-4, rtol=0)


def test_tldnet_uses_text_and_its_null_is_the_zero_vector():
    torch.manual_seed(0)
    model = TLDNet(img_size=16, patch_size=2, in_chans=4, embed_dim=64, depth=2, text_dim=32).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.rand(2)
    text = torch.randn(2, 32)
    out = model(x, t, text)
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, t, torch.randn(2, 32)))
    torch.testing.assert_close(model(x, t, None), model(x, t, torch.zeros(2, 32)))


def test_tldnet_class_conditional_course_preset():
    torch.manual_seed(0)
    model = create("tld-course")
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    a = model(x, t, torch.tensor([0, 18]))  # 18 is the null class
    assert a.shape == x.shape
    assert not torch.allclose(a, model(x, t, torch.tensor([1, 17])))
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t, None)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_cross_attention_block_reads_its_context(norm):
    torch.manual_seed(0)
    blk = CrossAttentionBlock(16, 8, num_heads=2, norm=norm, conv_mlp_grid=(3, 3))
    x = torch.randn(2, 9, 16)
    a = blk(x, torch.randn(2, 2, 8))
    assert a.shape == x.shape
    assert not torch.allclose(a, blk(x, torch.randn(2, 2, 8)))
    if norm == "post":  # post-norm: every token leaves the block LayerNorm'd
        torch.testing.assert_close(a.mean(-1), torch.zeros(2, 9), atol=1e-5, rtol=0)


def test_conv_mlp_mixes_neighbouring_patches_and_plain_mlp_does_not():
    torch.manual_seed(0)
    for conv, expect_spread in ((True, True), (False, False)):
        model = TLDNet(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=1, head_dim=16,
                       num_classes=2, conv_mlp=conv).eval()
        blk = model.blocks[0]
        x = torch.randn(1, 16, 32)
        y = x.clone()
        y[0, 5] += 1.0  # one token of the 4x4 grid
        diff = (blk.mlp(x) - blk.mlp(y)).abs().sum(-1)[0]
        assert (diff[[0, 1, 2, 4, 6, 8, 9, 10]] > 0).all() == expect_spread  # its 8 neighbours
        assert diff[15] == 0  # a far token is untouched either way


def test_tld_100m_is_pre_norm_like_the_current_reference_and_post_norm_costs_the_same():
    from tld.models import PRESETS

    # the current reference (tld/transformer_blocks.py DecoderBlock): pre-norm, and embed_dim // 64 heads for
    # the cross-attention as for the self-attention (the released file's blocks had 4 cross heads, post-norm)
    assert PRESETS["tld-100m"].kwargs["norm"] == "pre" and PRESETS["tld-100m"].kwargs["cross_heads"] == 768 // 64
    assert count_on_meta("tld-100m") == count_on_meta("tld-100m", norm="post") == 101_164_352
    torch.manual_seed(0)
    pre = create("tld-course", num_classes=0, text_dim=8, depth=1, norm="pre")
    post = create("tld-course", num_classes=0, text_dim=8, depth=1, norm="post")
    post.load_state_dict(pre.state_dict())   # the same weights, placed differently
    x, t, text = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.8]), torch.randn(2, 8)
    assert (pre(x, t, text) - post(x, t, text)).abs().max() > 1e-3
